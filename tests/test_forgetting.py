"""The forgetting benchmark: the plan, the records' schema, resuming, the summary and the CLI."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from slimpeft import methods
from slimpeft.bench import forgetting as fg
from slimpeft.cli import app

TINY = fg.Profile("tiny", seeds=(0,), steps=3, limit=4, lr_points=(1,), sds=False, ablations=("no-yield",),
                  batch_size=4)
SMALL_SLIM = {"r": 2, "n_clusters": 4}


def test_full_plan_covers_every_method_setting_seed_and_ablation(tiny_base):
    from slimpeft.training import load_base

    base, _ = load_base(str(tiny_base))
    full = fg.PROFILES["full"]
    specs = fg.plan(full, base)
    n_down = 3
    per_method = 3 * 3 + n_down * 3  # LR grid x 3 seeds (the lr is chosen on their mean), SDS x 3 seeds
    assert len(specs) == len(fg.METHODS) * per_method + len(fg.ABLATIONS) * 3
    assert len({s.key for s in specs}) == len(specs)  # every run has its own record file
    lora = next(s for s in specs if s.method == "lora")
    slim_budget = methods.trainable_budget("slim", base, **fg.SLIM_BENCH)
    lora_budget = methods.trainable_budget("lora", base, **lora.overrides)
    assert abs(lora_budget - slim_budget) / slim_budget < 0.05  # LoRA at SLIM's trainable budget
    assert {s.lr for s in specs if s.method == "full"} == set(fg.LR_GRID["full"])
    assert all(s.data == s.setting[4:] for s in specs if s.setting.startswith("sds/"))
    with pytest.raises(ValueError, match="unknown"):
        fg.plan(full, base, ["slim", "adalora"])


def test_seeds_profile_runs_the_grid_three_seeds_and_each_ablation_once(tiny_base):
    from slimpeft.training import load_base

    base, _ = load_base(str(tiny_base))
    prof = fg.PROFILES["seeds"]
    specs = fg.plan(prof, base)
    assert len(specs) == len(fg.METHODS) * (3 + 2) + len(fg.ABLATIONS)  # lr grid on seed 0, seeds 1-2 at the chosen
    assert {s.seed for s in specs if s.setting.startswith("ablation/")} == {0}
    quick = fg.PROFILES["quick"]
    assert (prof.steps, prof.limit) == (quick.steps, quick.limit)  # shares quick's records
    assert {s.key for s in fg.plan(quick, base)} <= {s.key for s in specs}


def test_choose_lr_and_summary_statistics():
    def rec(method, lr, seed, down, ret):
        return {"method": method, "setting": "mds", "seed": seed, "lr": lr, "downstream": {"d/x": down},
                "general": {"g/x": ret}, "downstream_avg": down, "general_avg": ret, "retention": ret,
                "trainable_params": 10, "train_seconds": 1.0}

    records = [rec("lora", 1e-3, 0, 0.4, 0.9), rec("lora", 1e-2, 0, 0.6, 0.5), rec("lora", 1e-2, 1, 0.8, 0.7)]
    best = fg.choose_lr(records)
    assert best == {"lora": 1e-2}
    # over seeds 0 and 1: only lrs run on both compete; the mean decides, not seed 0's luck
    assert fg.choose_lr(records, seeds=(0, 1)) == {"lora": 1e-2}
    lucky = records + [rec("lora", 1e-3, 1, 0.9, 0.9)]  # 1e-3: 0.4, 0.9 (mean 0.65) vs 1e-2: 0.6, 0.8 (0.7)
    assert fg.choose_lr(lucky, seeds=(0, 1)) == {"lora": 1e-2}
    lucky += [rec("lora", 1e-3, 2, 0.95, 0.9), rec("lora", 1e-2, 2, 0.5, 0.9)]
    assert fg.choose_lr(lucky, seeds=(0, 1, 2)) == {"lora": 1e-3}  # 1e-3 wins on the 3-seed mean, loses on seed 0
    tie = [rec("lora", 1e-2, 0, 0.5, 0.9), rec("lora", 1e-3, 0, 0.5, 0.9)]
    assert fg.choose_lr(tie) == {"lora": 1e-3}  # ties: the lower lr
    ablation = [{**rec("lora", lr, 0, d, 0.5), "setting": "ablation/x"} for lr, d in ((1e-3, 0.1), (1e-2, 0.3))]
    groups = fg.summarize(records + ablation, best)["groups"]
    assert groups["lora|ablation/x"]["seeds"] == [0] and groups["lora|ablation/x"]["downstream_avg"]["mean"] == 0.3
    s = fg.summarize(records, best)["groups"]["lora|mds"]
    assert s["seeds"] == [0, 1]
    assert s["downstream_avg"]["mean"] == pytest.approx(0.7) and s["downstream_avg"]["std"] == pytest.approx(0.1414,
                                                                                                         abs=1e-4)
    assert s["retention"]["mean"] == pytest.approx(0.6)


def test_benchmark_writes_records_summary_and_plot_and_resumes(tiny_base, tmp_path, monkeypatch):
    monkeypatch.setattr(fg, "SLIM_BENCH", {**fg.SLIM_BENCH, **SMALL_SLIM})
    out = tmp_path / "fg"
    summary = fg.run_benchmark(TINY, base=str(tiny_base), out=out, methods_=["slim", "lora"], log=lambda s: None)
    files = sorted(p.name for p in (out / "records").iterdir())
    assert len(files) == 3  # slim, lora, slim ablation/no-yield
    required = {"method", "setting", "seed", "downstream", "general", "base_general", "retention",
                "trainable_params", "train_seconds"}
    for name in files:
        r = json.loads((out / "records" / name).read_text())
        assert required <= set(r)
        assert set(r["downstream"]) == {"downstream/foldoc-def", "downstream/jargon-def", "downstream/foldoc-yesno"}
        assert set(r["general"]) == set(r["base_general"]) and len(r["general"]) == 4
        mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
        assert r["retention"] == pytest.approx(mean(r["general"]) / mean(r["base_general"]))
        assert r["trainable_params"] > 0 and r["train_seconds"] > 0
        if r["method"] == "slim":
            assert 0.0 <= r["ood_auroc"] <= 1.0 and r["ood_auroc_level"] == "sequence"
            assert len(r["ood_auroc_layers"]) == 2 * 3  # 2 layers x gate/up/down
    assert {r for r in summary["groups"]} == {"slim|mds", "lora|mds", "slim|ablation/no-yield"}
    assert (out / "summary.json").is_file() and (out / "pareto.png").stat().st_size > 1000
    # resuming: nothing is measured again (the records are untouched)
    before = {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()}
    fg.run_benchmark(TINY, base=str(tiny_base), out=out, methods_=["slim", "lora"], log=lambda s: None)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()} == before
    # a run of one method keeps the others in the folder's summary
    again = fg.run_benchmark(TINY, base=str(tiny_base), out=out, methods_=["lora"], log=lambda s: None)
    assert set(again["groups"]) == set(summary["groups"])
    assert set(json.loads((out / "summary.json").read_text())["groups"]) == set(summary["groups"])
    # records of another budget are never mixed into this folder's summary
    longer = fg.Profile(**{**TINY.__dict__, "name": "longer", "steps": 4})
    with pytest.raises(ValueError, match=r"3 steps and 4 test items .*'longer' uses 4 and 4: choose another --out"):
        fg.run_benchmark(longer, base=str(tiny_base), out=out, methods_=["lora"], log=lambda s: None)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()} == before
    # a changed default configuration: the old SLIM records are refused, named with the differing field, not reused
    monkeypatch.setattr(fg, "SLIM_BENCH", {**fg.SLIM_BENCH, **SMALL_SLIM, "yield_strength": 3.0})
    with pytest.raises(ValueError, match=r"(?s)1 record\(s\) .*slim__mds__seed0__lr0\.005\.json: yield_strength "
                                         r"recorded [0-9.]+, now 3\.0"):
        fg.run_benchmark(TINY, base=str(tiny_base), out=out, methods_=["slim", "lora"], log=lambda s: None)
    assert {p.name: p.stat().st_mtime_ns for p in (out / "records").iterdir()} == before


def test_slim_variant_is_a_method_of_its_own_trained_as_slim(tiny_base, tmp_path, monkeypatch):
    """A SLIM variant gets its own records and summary group under its name, trains SLIM with its overrides on top
    of the benchmark's SLIM configuration, and reports the routing separation like SLIM."""
    from slimpeft.training import load_base

    monkeypatch.setattr(fg, "SLIM_BENCH", {**fg.SLIM_BENCH, **SMALL_SLIM})
    monkeypatch.setitem(fg.SLIM_VARIANTS, "slim-single", {**fg.SLIM_VARIANTS["slim-single"], "r": 8, "alpha": 16.0})
    out = tmp_path / "fg"
    summary = fg.run_benchmark(TINY, base=str(tiny_base), out=out, methods_=["slim-single"], log=lambda s: None)
    (rec_path,) = (out / "records").iterdir()
    assert rec_path.name == "slim-single__mds__seed0__lr0.005.json"  # no ablations: those belong to "slim"
    r = json.loads(rec_path.read_text())
    assert r["method"] == "slim-single" and r["overrides"]["n_lora_experts"] == 1
    assert r["overrides"]["n_clusters"] == 4 and r["overrides"]["mask_mode"] == "none"
    base, _ = load_base(str(tiny_base))
    assert r["trainable_params"] == methods.trainable_budget("slim", base, **r["overrides"])
    assert 0.0 <= r["ood_auroc"] <= 1.0
    assert set(summary["groups"]) == {"slim-single|mds"}
    assert fg.registry_method("slim-single") == "slim" and fg.registry_method("lora") == "lora"


def test_head_methods_adapt_the_output_head_at_one_budget(tiny_base, tmp_path, monkeypatch):
    """slim-single-head adapts the MLP and the LM head; lora-head and dora-head adapt the same targets at its
    trainable budget (the closest rank), and a run of each trains and records them."""
    from slimpeft.layer import base_shape
    from slimpeft.model import linear_layer_names, resolve_targets
    from slimpeft.training import load_base

    monkeypatch.setattr(fg, "SLIM_BENCH", {**fg.SLIM_BENCH, **SMALL_SLIM})
    monkeypatch.setitem(fg.SLIM_VARIANTS, "slim-single-head",
                        {**fg.SLIM_VARIANTS["slim-single-head"], "r": 8, "alpha": 16.0})
    base, _ = load_base(str(tiny_base))
    assert "lm_head" in linear_layer_names(base)
    for name in ("lora-head", "dora-head"):
        ov = fg.method_overrides(name, base)
        assert ov["target_modules"] == fg.HEAD_TARGETS and ov["alpha"] == 2 * ov["r"]
        assert fg.registry_method(name) == name.split("-")[0]
    out = tmp_path / "fg"
    fg.run_benchmark(TINY, base=str(tiny_base), out=out, methods_=["slim-single-head", "lora-head"],
                     log=lambda s: None)
    recs = {r["method"]: r for r in fg.load_records(out)}
    slim, lora = recs["slim-single-head"], recs["lora-head"]
    assert slim["overrides"]["target_modules"] == lora["overrides"]["target_modules"] == fg.HEAD_TARGETS
    # one rank of LoRA on these targets: sum over the adapted layers of (d_in + d_out)
    per_rank = sum(i + o for i, o in (base_shape(base.get_submodule(n))
                                      for n in resolve_targets(base, fg.HEAD_TARGETS)))
    assert "lm_head" in resolve_targets(base, fg.HEAD_TARGETS)
    assert abs(lora["trainable_params"] - slim["trainable_params"]) <= per_rank
    assert slim["trainable_params"] > methods.trainable_budget("slim", base, **{**slim["overrides"],
                                                                                "target_modules": None})


def test_corrupt_record_is_reported_with_its_path(tmp_path):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "x.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"x\.json: not a valid benchmark record"):
        fg.load_records(tmp_path)


def test_cli_dry_run_lists_the_plan(tiny_base):
    res = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["bench", "forgetting", "--profile", "quick", "--base", str(tiny_base), "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = [ln for ln in res.output.splitlines() if "__" in ln]
    quick = fg.PROFILES["quick"]
    assert len(lines) == len(quick.methods) + len(quick.ablations) == len(fg.METHODS) - 2 + 1
    def planned(output: str) -> set[str]:  # the method of each planned run (a progress bar may precede the first)
        return {re.search(r"([a-z][a-z-]*)__(mds|ablation)", ln).group(1) for ln in output.splitlines() if "__" in ln}

    assert planned(res.output) == set(quick.methods) and {"slim-single", "dora-head"}.isdisjoint(quick.methods)
    seeds = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["bench", "forgetting", "--profile", "seeds", "--base", str(tiny_base), "--dry-run"])
    assert planned(seeds.output) == set(fg.METHODS)
    sds = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, ["bench", "forgetting", "--profile", "sds", "--base", str(tiny_base), "--dry-run"])
    sds_runs = [ln for ln in sds.output.splitlines() if "__sds-" in ln]
    assert len(sds_runs) == 3 * len(fg.PROFILES["sds"].methods) and "lora-head" in fg.PROFILES["sds"].methods
    bad = CliRunner().invoke(app, ["bench", "forgetting", "--profile", "huge", "--base", str(tiny_base)])
    assert bad.exit_code != 0 and "--profile 'huge': unknown" in bad.output


def test_a_record_trained_on_another_split_than_it_is_tested_on_is_refused(tmp_path):
    spec = fg.RunSpec("lora", "mds", 1, 5e-3, {"r": 4})
    old = {"method": "lora", "setting": "mds", "seed": 1, "lr": 5e-3, "overrides": {"r": 4}}  # no split_seed
    with pytest.raises(ValueError, match=r"lora__mds__seed1__lr0\.005\.json: trained on task split 1, tested on "
                                         r"split 0"):
        fg.stale_records([old], [spec], tmp_path)
    fg.stale_records([{**old, "split_seed": 0}], [spec], tmp_path)  # trained on the tested split: reused
    fg.stale_records([{**old, "seed": 0}], [fg.RunSpec("lora", "mds", 0, 5e-3, {"r": 4})], tmp_path)


@pytest.mark.parametrize(("seed", "split_seed", "expected"), [(2, None, 2), (2, 0, 0), (0, 1, 1)])
def test_train_draws_the_task_split_from_split_seed(monkeypatch, tmp_path, seed, split_seed, expected):
    from slimpeft import training

    seen = {}

    def capture(data, seed):
        seen["split"] = seed
        raise KeyboardInterrupt  # stop before any model is built

    monkeypatch.setattr(training, "training_examples", capture)
    with pytest.raises(KeyboardInterrupt):
        training.train(training.TrainArgs(out=str(tmp_path / "run"), seed=seed, split_seed=split_seed))
    assert seen["split"] == expected and not (tmp_path / "run").exists()


def test_benchmark_on_a_quantized_base_keeps_its_records_apart(tiny_base, tmp_path, monkeypatch):
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(fg, "SLIM_BENCH", {**fg.SLIM_BENCH, **SMALL_SLIM})
    out, said = tmp_path / "fg-nf4", []
    no_ablation = fg.Profile(**{**TINY.__dict__, "ablations": ()})
    fg.run_benchmark(no_ablation, base=str(tiny_base), out=out, methods_=["slim", "lora", "full"], log=said.append,
                     quantize="nf4")
    assert "--quantize nf4: full fine-tuning cannot train quantized weights; left out" in said
    records = [json.loads(p.read_text()) for p in sorted((out / "records").iterdir())]
    assert sorted(r["method"] for r in records) == ["lora", "slim"] and {r["quantize"] for r in records} == {"nf4"}
    base_gen = json.loads((out / "base_general-nf4.json").read_text())
    assert all(r["base_general"] == base_gen for r in records)  # retention against the quantized base
    with pytest.raises(ValueError, match=r"holds records measured on the base quantized \(nf4\) .*this run is on the "
                                         r"base in float32: choose another --out"):
        fg.run_benchmark(no_ablation, base=str(tiny_base), out=out, methods_=["lora"], log=lambda s: None)
