"""Run directories and arguments a user gets wrong: training afresh into a folder that holds a run, resuming with
other arguments, a max length with no room for an answer, bad --limit / --harness values, the default base outside
the repository root, and `slim data` with a missing source. Each is refused with a message that names what to do,
before anything is written or lost."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from train_helpers import env_1thread, save_tiny_base, slim_cmd, tiny_train_args, write_data
from typer.testing import CliRunner

from slimpeft import cli
from slimpeft.training import TRAIN_ARGS, TrainArgs, last_complete_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner(env={"COLUMNS": "200"})


def _args(base, data, out, **kw) -> TrainArgs:
    return tiny_train_args(base, data, out, **{"steps": 4, **kw})


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_training_afresh_into_a_run_is_refused_and_overwrite_replaces_it(base_and_data, tmp_path):
    base, data = base_and_data
    run = train(_args(base, data, tmp_path / "run"))
    before = _files(run)
    assert json.loads((run / TRAIN_ARGS).read_text())["method"] == "slim"
    with pytest.raises(ValueError, match=r"holds an earlier run .*--resume.*--overwrite"):
        train(_args(base, data, run, method="lora", overrides={}, steps=2, save_steps=1))
    assert _files(run) == before  # refused before anything was written or removed
    # --overwrite: the earlier run's files go, the new run's checkpoints are the only ones (none of slim's steps)
    train(_args(base, data, run, method="lora", overrides={}, steps=3, save_steps=1, overwrite=True))
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("checkpoint-"))
    assert steps == ["checkpoint-2", "checkpoint-3"]
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["args"]["method"] == "lora" and json.loads((run / TRAIN_ARGS).read_text())["method"] == "lora"


def test_resume_with_other_arguments_is_refused_naming_them(base_and_data, tmp_path):
    base, data = base_and_data
    run = train(_args(base, data, tmp_path / "run", steps=4))
    ckpt = last_complete_checkpoint(run / "checkpoints")
    before = _files(run)
    with pytest.raises(ValueError, match=r"lr=0\.002 \(now 0\.001\)"):
        train(_args(base, data, run, lr=1e-3, resume=True))
    with pytest.raises(ValueError, match=r"method_config\.r=4 \(now 8\)"):
        train(_args(base, data, run, overrides={"r": 8, "n_clusters": 4}, resume=True))
    with pytest.raises(ValueError, match=r"method='slim' \(now 'lora'\)"):
        train(_args(base, data, run, method="lora", overrides={}, resume=True))
    assert _files(run) == before
    # the same arguments resume (logging and checkpoint cadence may change)
    train(_args(base, data, run, resume=True, logging_steps=2))
    assert json.loads((run / "run_config.json").read_text())["resumed_from"] == str(ckpt)


def test_argument_checks_name_the_bad_value(base_and_data, tmp_path):
    base, data = base_and_data
    assert any("--max-length must be >= 2" in e for e in _args(base, data, tmp_path / "r", max_length=1).validate())
    assert _args(base, data, tmp_path / "r", max_length=2).validate() == []
    errs = _args(base, data, tmp_path / "r", resume=True, overwrite=True).validate()
    assert any("exclude each other" in e for e in errs)


def test_eval_and_inspect_refuse_a_bad_limit_or_harness_task_before_running(tmp_path):
    for argv, needle in ((["eval", str(tmp_path), "--limit", "0"], "--limit must be > 0"),
                         (["eval", str(tmp_path), "--limit", "-1"], "--limit must be > 0"),
                         (["inspect", str(tmp_path), "--limit", "0"], "--limit must be > 0"),
                         (["eval", str(tmp_path), "--harness", "hellaswag"],
                          "--harness: unknown task(s) ['hellaswag']")):
        res = runner.invoke(cli.app, argv)
        assert res.exit_code == 2, (argv, res.output)
        assert needle in res.output, (argv, res.output)
    # the harness names of our tasks are accepted: the run directory is what fails next
    res = runner.invoke(cli.app, ["eval", str(tmp_path), "--harness", "slim_downstream_foldoc_def"])
    assert res.exit_code == 2 and "neither a run directory" in res.output, res.output
    assert list(tmp_path.iterdir()) == []


def test_default_base_outside_the_repository_root_is_the_shipped_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(cli._resolve_base("assets/base")) == ROOT / "assets" / "base"
    assert cli._resolve_base("org/some-model") == "org/some-model"  # anything else is left to load_base


def test_slim_data_with_a_missing_source_writes_nothing(tmp_path):
    empty = tmp_path / "dictd"
    empty.mkdir()
    env = {**env_1thread(), "SLIM_DICTD_DIR": str(empty)}
    res = subprocess.run(slim_cmd("data", "--out", str(tmp_path / "data")), capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "not found" in res.stderr
    assert not (tmp_path / "data").exists()
    assert os.listdir(tmp_path) == ["dictd"]


def test_eval_of_downstream_tasks_only_writes_strict_json_without_nan(tmp_path):
    """`slim eval --tasks` with no general task: no general mean or retention (null, and no row in the table), never
    a nan in the table or a bare NaN in eval.json."""
    run = train(TrainArgs(base=str(ROOT / "assets" / "base"), method="lora", out=str(tmp_path / "run"), steps=1,
                          batch_size=2, progress=False))
    res = runner.invoke(cli.app, ["eval", str(run), "--tasks", "downstream/foldoc-def", "--limit", "2"])
    assert res.exit_code == 0, res.output
    assert "nan" not in res.output.lower() and "downstream (mean)" in res.output
    summary = json.loads((run / "eval.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert summary["general_after"] is None and summary["retention"] is None
    assert 0.0 <= summary["downstream_after"] <= 1.0
    assert cli._json({"a": float("nan"), "b": [float("inf"), 1.5]}) == '{"a": null, "b": [null, 1.5]}'


@pytest.mark.parametrize("method", ["slim", "lora"])
def test_slim_train_checkpoints_and_resumes_on_a_tied_base(tmp_path, method):
    """`slim train` on a base whose embedding and output head share one matrix: its checkpoints save (they failed
    with safetensors' shared-tensor error) and --resume continues from them."""
    base = save_tiny_base(tmp_path / "tied", tie_word_embeddings=True)
    data = write_data(tmp_path / "data.jsonl")
    kw = {} if method == "slim" else {"method": "lora", "overrides": {}}
    run = train(_args(base, data, tmp_path / "run", steps=3, save_steps=1, **kw))
    ckpt = last_complete_checkpoint(run / "checkpoints")
    assert ckpt is not None and ckpt.name == "checkpoint-3" and (run / "adapter" / "adapter_config.json").is_file()
    train(_args(base, data, run, steps=3, save_steps=1, resume=True, **kw))
    assert json.loads((run / "run_config.json").read_text())["resumed_from"] == str(ckpt)
