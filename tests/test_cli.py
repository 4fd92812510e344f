"""End to end through the `slim` CLI on a tiny base pretrained by the project's own recipe (seconds)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from slimpeft.cli import app

runner = CliRunner(env={"COLUMNS": "200"})  # rich sizes tables by COLUMNS when not on a terminal


@pytest.mark.parametrize("command, words", [
    ([], ["pretrain", "data", "train", "eval", "inspect", "bench"]),
    (["train"], ["--method", "--data", "--set", "--resume", "--steps", "--out"]),
    (["eval"], ["--tasks", "--harness", "--limit"]),
    (["inspect"], ["--limit", "--png", "--per-task"]),
    (["bench", "layer"], ["--quick", "--json"]),
])
def test_help_texts(command, words):
    res = runner.invoke(app, [*command, "--help"], terminal_width=200)
    assert res.exit_code == 0
    for w in words:
        assert w in res.output


@pytest.fixture(scope="session")
def slim_run(tiny_base, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "slim"
    res = runner.invoke(app, ["train", "--base", str(tiny_base), "--out", str(out), "--steps", "4", "--save-steps",
                              "2", "--batch-size", "8", "--set", "r=4", "--set", "n_clusters=4", "--no-progress"])
    assert res.exit_code == 0, res.output
    return out


def test_train_writes_a_complete_run_directory(slim_run):
    names = {p.name for p in slim_run.iterdir()}
    assert {"adapter", "run_config.json", "train_log.json", "checkpoints", "tb"} <= names
    assert {p.name for p in (slim_run / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    assert {p.name for p in (slim_run / "checkpoints").iterdir()} == {"checkpoint-2", "checkpoint-4"}
    cfg = json.loads((slim_run / "run_config.json").read_text())
    assert cfg["args"]["method"] == "slim" and cfg["args"]["steps"] == 4 and cfg["method_config"]["r"] == 4
    assert cfg["trainable_params"] > 0 and set(cfg["data_sizes"]) == {
        "downstream/foldoc-def", "downstream/jargon-def", "downstream/foldoc-yesno", "documents"}
    assert cfg["n_train"] == sum(cfg["data_sizes"].values())
    log = json.loads((slim_run / "train_log.json").read_text())
    assert log[-1]["step"] == 4 and log[-1]["train_loss"] > 0  # logging every 10 steps: the summary only
    assert any((slim_run / "tb").rglob("events.out.tfevents.*"))


def test_eval_prints_side_by_side_table_with_retention(slim_run):
    res = runner.invoke(app, ["eval", str(slim_run), "--tasks", "general/wordnet-def,downstream/foldoc-def",
                              "--limit", "6"], terminal_width=200)
    assert res.exit_code == 0, res.output
    for w in ("general/wordnet-def", "downstream/foldoc-def", "retention", "base", "tuned"):
        assert w in res.output
    summary = json.loads((slim_run / "eval.json").read_text())
    assert set(summary["tuned"]) == {"general/wordnet-def", "downstream/foldoc-def"}
    assert summary["retention"] == pytest.approx(summary["general_after"] / summary["general_before"])


def test_inspect_writes_routing_table_and_heatmap(slim_run):
    res = runner.invoke(app, ["inspect", str(slim_run), "--limit", "3"], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "AUROC" in res.output and "L0.gate_proj" in res.output
    assert (slim_run / "routing.png").stat().st_size > 1000
    report = json.loads((slim_run / "routing.json").read_text())
    assert len(report) == 6  # 2 layers x gate/up/down
    for r in report.values():
        assert 0.0 <= r["auroc_sequence"] <= 1.0 and sum(r["expert_load"]) == pytest.approx(1.0)


def test_inspect_per_task_reports_every_task_and_layer(slim_run):
    res = runner.invoke(app, ["inspect", str(slim_run), "--limit", "3", "--per-task"], terminal_width=250)
    assert res.exit_code == 0, res.output
    assert "routing per task" in res.output and "wordnet-hypernym" in res.output
    by_task = json.loads((slim_run / "routing_by_task.json").read_text())
    general = [t for t in by_task if t.startswith("general/")]
    assert len(general) == 4 and len(by_task) == 7
    overall = json.loads((slim_run / "routing.json").read_text())
    for layer, r in overall.items():
        assert all(set(v) == set(overall) for v in by_task.values())
        for t in by_task:
            x = by_task[t][layer]
            assert 0 <= x["identity_weight"] <= 1 and 0 <= x["flagged"] <= 1 and 0 <= x["auroc_vs_downstream"] <= 1
        # the per-task identity weights bracket the general mean of the overall report (a token-weighted average)
        w = [by_task[t][layer]["identity_weight"] for t in general]
        assert min(w) - 1e-6 <= r["identity_weight_general"] <= max(w) + 1e-6


@pytest.mark.parametrize("method", ["lora", "mixlora"])
def test_train_other_methods(tiny_base, tmp_path, method):
    out = tmp_path / method
    res = runner.invoke(app, ["train", "--base", str(tiny_base), "--out", str(out), "--method", method, "--steps",
                              "2", "--batch-size", "4", "--set", "r=4", "--no-progress"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["args"]["method"] == method and (out / "adapter" / "adapter_config.json").is_file()


def test_train_preset_single_head_adapts_and_reloads_the_output_head(tiny_base, tmp_path):
    from slimpeft.training import load_run

    out = tmp_path / "head"
    res = runner.invoke(app, ["train", "--base", str(tiny_base), "--out", str(out), "--preset", "single-head",
                              "--steps", "2", "--batch-size", "4", "--set", "r=4", "--set", "alpha=8",
                              "--no-progress"])
    assert res.exit_code == 0, res.output
    meta = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert meta["config"]["adapt_output_head"] is True
    assert "lm_head" in meta["layers"] and len(meta["layers"]) == 1 + 3 * 2  # the tiny base: 2 layers x 3 MLP
    model, tok, _ = load_run(str(out))
    assert "lm_head" in model.slim_layers()
    ids = tok("a short test", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 2


def test_train_preset_single_with_set_on_top(tiny_base, tmp_path):
    from slimpeft import SINGLE_EXPERT

    out = tmp_path / "single"
    res = runner.invoke(app, ["train", "--base", str(tiny_base), "--out", str(out), "--preset", "single", "--steps",
                              "2", "--batch-size", "4", "--set", "r=4", "--set", "alpha=8", "--no-progress"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())["config"]
    assert cfg["n_lora_experts"] == 1 and cfg["yield_in_training"] is False and cfg["ood_source"] == "prepass"
    assert (cfg["r"], cfg["alpha"]) == (4, 8) and SINGLE_EXPERT["r"] == 128  # --set wins over the preset
    known = "paper, recommended, single, single-head"
    for argv, msg in ((["--preset", "huge"], f"--preset 'huge': unknown; choose from {known}"),
                      (["--preset", "single", "--method", "lora"], "is a SLIM configuration; --method is 'lora'")):
        bad = runner.invoke(app, ["train", "--base", str(tiny_base), "--out", str(tmp_path / "x"), *argv])
        assert bad.exit_code == 2 and msg in bad.output
    assert not (tmp_path / "x").exists()


def test_malformed_jsonl_fails_with_file_and_line_and_trains_nothing(tiny_base, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n')
    out = tmp_path / "run"
    res = runner.invoke(app, ["train", "--base", str(tiny_base), "--out", str(out), "--data", str(data)])
    assert res.exit_code == 2
    assert f"{data}:2" in res.output
    assert not out.exists()


def test_invalid_arguments_are_all_reported(tiny_base, tmp_path):
    res = runner.invoke(app, ["train", "--base", str(tiny_base), "--out", str(tmp_path / "r"), "--method", "nope",
                              "--steps", "0", "--data", "downstream/nope"], terminal_width=200)
    assert res.exit_code == 2
    for w in ("--method 'nope': unknown", "--steps must be > 0", "--data: unknown task(s) ['downstream/nope']"):
        assert w in res.output


def test_data_command_writes_the_suite_with_sizes(tmp_path):
    from slimpeft.data.jsonl import read_jsonl

    res = runner.invoke(app, ["data", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    sizes = json.loads((tmp_path / "sizes.json").read_text())["tasks"]
    assert sizes["downstream/foldoc-def"] == {"train": 100, "test": 50, "documents": 300, "chance": 0.25,
                                              "kind": "downstream"}
    for name, sz in sizes.items():
        assert len(read_jsonl(tmp_path / name / "test.jsonl")) == sz["test"]
    assert "downstream/jargon-def: train 100, test 50, documents 300" in res.output


def test_train_gradient_checkpointing_slides_the_clusters_once_per_step(tiny_base, tmp_path):
    from safetensors.torch import load_file

    counts = {}
    for flag in ([], ["--gradient-checkpointing"]):
        out = tmp_path / ("gc" if flag else "plain")
        res = runner.invoke(app, ["train", "--base", str(tiny_base), "--out", str(out), "--steps", "3",
                                  "--batch-size", "4", "--set", "r=4", "--no-progress", *flag])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "run_config.json").read_text())["args"]["gradient_checkpointing"] == bool(flag)
        tensors = load_file(out / "adapter" / "adapter_model.safetensors")
        counts[bool(flag)] = sorted({int(v) for k, v in tensors.items() if k.endswith("clusters.n_updates")})
    assert counts[True] == counts[False] == [2]  # step 1 fits the clusters, steps 2-3 slide them (not 4 times)
