"""Bad days: a training job killed with SIGKILL, a loss that turns non-finite, malformed data, damaged adapters.

Each hostile case must give a clear error that names what and where, a non-zero exit through the CLI, and leave
nothing written (or lost); a killed run resumes to exactly the adapter of an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file
from train_helpers import SLIM_SET, env_1thread, losses, save_tiny_base, slim_cmd, tiny_train_args, write_data
from transformers import TrainerCallback
from typer.testing import CliRunner

from slimpeft import SlimConfig, SlimLinear
from slimpeft.model import SlimModel, get_slim_model
from slimpeft.training import last_complete_checkpoint, train

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner(env={"COLUMNS": "200"})


_args = tiny_train_args


# ------------------------------------------------------------------------------------------------ crash safety
def test_sigkill_after_a_checkpoint_then_resume_equals_uninterrupted_run(base_and_data, tmp_path):
    """Both runs are subprocesses with one torch thread each: same seed, same float arithmetic. The Trainer restores
    weights, cluster buffers, AdamW moments, the LR schedule, the data position and the RNG (DARE masks) from the
    checkpoint, so the resumed adapter is bit-identical to the uninterrupted one."""
    base, data = base_and_data
    common = ["train", "--base", str(base), "--data", str(data), "--steps", "40", "--save-steps", "5",
              "--batch-size", "4", "--logging-steps", "1", "--no-progress", *SLIM_SET]
    full = subprocess.run(slim_cmd(*common, "--out", str(tmp_path / "full")), capture_output=True, text=True,
                          env=env_1thread(), timeout=300, cwd=ROOT)
    assert full.returncode == 0, full.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(slim_cmd(*common, "--out", str(run)), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env_1thread(), cwd=ROOT)
    t0 = time.monotonic()
    while not (run / "checkpoints" / "checkpoint-10").is_dir():
        assert proc.poll() is None and time.monotonic() - t0 < 240, "the run ended before its second checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run / "adapter").exists() and not (run / "run_config.json").exists()  # it really died mid-run
    last = last_complete_checkpoint(run / "checkpoints")
    assert last is not None and int(last.name.split("-")[1]) in range(10, 40, 5)
    # what a non-atomic writer killed mid-checkpoint leaves: a newer checkpoint dir without trainer_state.json,
    # and a staging dir of ours; --resume must skip both
    junk = run / "checkpoints" / "checkpoint-37"
    shutil.copytree(last, junk)
    (junk / "trainer_state.json").unlink()
    (junk / "adapter_model.safetensors").write_bytes((junk / "adapter_model.safetensors").read_bytes()[:1000])
    (run / "checkpoints" / ".incomplete" / "checkpoint-38").mkdir(parents=True)

    resumed = subprocess.run(slim_cmd(*common, "--out", str(run), "--resume"), capture_output=True, text=True,
                             env=env_1thread(), timeout=300, cwd=ROOT)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    cfg = json.loads((run / "run_config.json").read_text())
    assert cfg["resumed_from"] == str(last)
    assert not (run / "checkpoints" / ".incomplete").exists()
    a = load_file(tmp_path / "full" / "adapter" / "adapter_model.safetensors")
    b = load_file(run / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit-identical, cluster buffers included
    after = {s: v for s, v in losses(run).items() if s > int(last.name.split("-")[1])}
    assert after and all(losses(tmp_path / "full")[s] == v for s, v in after.items())


class PoisonAt(TrainerCallback):
    """Writes inf into one LoRA B tensor after optimizer step ``step`` (as an overflowing update would)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, model=None, **kw):
        if state.global_step == self.step:
            with torch.no_grad():
                next(p for n, p in model.named_parameters() if n.endswith("lora_B")).fill_(float("inf"))


@pytest.mark.parametrize("poison_step, message", [
    # poisoned after step 3: the loss of step 4 is non-finite -> stop before its optimizer step
    (3, r"training loss became non-finite \(nan/inf\) at step 4: stopped before the optimizer step; the last good "
        r"checkpoint is .*checkpoint-2"),
    # poisoned after step 4, a save step: checkpoint-4 is never written over the good one
    (4, r"step 4: non-finite \(nan/inf\) values in .*lora_B: stopped without writing checkpoint-4; the last good "
        r"checkpoint is .*checkpoint-2"),
])
def test_nonfinite_values_stop_training_and_keep_the_last_good_checkpoint(base_and_data, tmp_path, poison_step,
                                                                         message):
    base, data = base_and_data
    out = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=message):
        train(_args(base, data, out), callbacks=[PoisonAt(poison_step)])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]
    assert last_complete_checkpoint(out / "checkpoints") == out / "checkpoints" / "checkpoint-2"
    weights = load_file(out / "checkpoints" / "checkpoint-2" / "adapter_model.safetensors")
    assert all(v.isfinite().all() for v in weights.values() if v.is_floating_point())
    assert not (out / "adapter").exists() and not (out / "run_config.json").exists()


# ------------------------------------------------------------------------------------------------ hostile JSONL
@pytest.mark.parametrize("content, where, pattern", [
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "c", "response": \n', 2, r"invalid JSON"),
    (b'{"prompt": "a", "response": "b"}\n\n{"prompt": "c"}\n', 3, r"generative record is missing the field "
                                                                  r"'response'"),
    (b'{"question": "q", "choices": ["x", "y"], "answer": "0"}\n', 1, r"field 'answer' must be an integer index, "
                                                                     r"got str"),
    (b'{"prompt": 5, "response": "b"}\n', 1, r"field 'prompt' must be a string, got int"),
    (b'["prompt", "response"]\n', 1, r"expected a JSON object, got list"),
    (b'{"prompt": "a", "response": "b", "answer": 1}\n', 1, r"record mixes generative fields"),
    (b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "b"}\n', 2, r"not UTF-8 text"),
    (b"[" * 100_000 + b"\n", 1, r"JSON nested too deeply"),
    (b"", None, r"file contains no records"),
    (b"\n  \n", None, r"file contains no records"),
])
def test_malformed_jsonl_names_file_and_line_exits_nonzero_writes_nothing(base_and_data, tmp_path, content, where,
                                                                          pattern):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    out = tmp_path / "run"
    res = runner.invoke(app(), ["train", "--base", str(base_and_data[0]), "--out", str(out), "--data", str(data)],
                        terminal_width=200)
    assert res.exit_code == 2, res.output
    assert f"{data}:{where}: " in res.output if where else f"{data}: " in res.output
    assert any(re.search(pattern, line) for line in res.output.splitlines()), res.output
    assert not out.exists()


def app():
    from slimpeft.cli import app

    return app


# ------------------------------------------------------------------------------------------------ over-long inputs
def test_overlong_records_are_cut_with_a_warning_that_counts_them(base_and_data, tmp_path, caplog):
    from transformers import AutoTokenizer

    from slimpeft.data.jsonl import read_jsonl
    from slimpeft.training import SupervisedDataset

    base = base_and_data[0]
    data = write_data(tmp_path / "long.jsonl", n=64, long_every=4)  # records 0, 4, ..., 60: 60-word prompts
    tok = AutoTokenizer.from_pretrained(base)
    records = read_jsonl(data)
    lengths = [len(tok(r.prompt + r.response)["input_ids"]) for r in records]
    assert max(lengths[1::4] + lengths[2::4] + lengths[3::4]) < 60 and min(lengths[0::4]) > 140  # 16 long, by build
    with caplog.at_level(logging.WARNING, logger="slimpeft"):
        run = train(_args(base, data, tmp_path / "run", steps=1, max_length=100))
    assert "16 of 64 training records were longer than max_length=100 tokens and were cut" in caplog.text
    assert json.loads((run / "run_config.json").read_text())["n_truncated"] == 16
    ds = SupervisedDataset(records, tok, 100)
    assert max(len(item["input_ids"]) for item in ds) == 100 and ds.n_truncated == 16
    # the answer survives the cut: the last labelled tokens are the response and EOS
    cut = ds[0]
    assert cut["labels"][-1] == tok.eos_token_id and cut["labels"][0] == -100


# ------------------------------------------------------------------------------------------------ hostile adapters
@pytest.fixture(scope="module")
def trained_run(base_and_data, tmp_path_factory):
    base, data = base_and_data
    d = tmp_path_factory.mktemp("adapter_run")
    other = save_tiny_base(d / "other_base", intermediate_size=48)
    return train(_args(base, data, d / "run", steps=2)), other


def _damage(run: Path, kind: str, other_base: Path) -> None:
    adapter = run / "adapter"
    w, c = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    if kind == "missing_weights":
        w.unlink()
    elif kind == "truncated_weights":
        w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    elif kind == "tampered_weights":  # one mantissa bit of the last float: still a valid file, different values
        b = bytearray(w.read_bytes())
        b[-4] ^= 1
        w.write_bytes(bytes(b))
    elif kind in ("unknown_field", "invalid_field", "unknown_top_level"):
        meta = json.loads(c.read_text())
        if kind == "unknown_field":
            meta["config"]["rank"] = 4
        elif kind == "invalid_field":
            meta["config"]["mask_rate"] = 1.5
        else:
            meta["extra"] = True
        c.write_text(json.dumps(meta))
    elif kind == "config_not_json":
        c.write_text('{"method": "slim", ')
    elif kind == "shape_mismatch":
        cfg = json.loads((run / "run_config.json").read_text())
        cfg["args"]["base"] = str(other_base)
        (run / "run_config.json").write_text(json.dumps(cfg))
    elif kind == "run_config_not_json":
        (run / "run_config.json").write_text("{")


@pytest.mark.parametrize("kind, pattern", [
    ("missing_weights", r"adapter_model.safetensors: missing"),
    ("truncated_weights", r"adapter_model.safetensors: not a readable safetensors file"),
    ("tampered_weights", r"adapter_model.safetensors: SHA-256 differs from `weights_sha256`"),
    ("unknown_field", r"adapter_config.json: unknown SlimConfig field\(s\) \['rank'\]"),
    ("invalid_field", r"adapter_config.json: .*`mask_rate`=1.5 must lie in \[0.0, 1.0\)"),
    ("unknown_top_level", r"adapter_config.json: unknown top-level field\(s\) \['extra'\]"),
    ("config_not_json", r"adapter_config.json: not valid JSON"),
    ("shape_mismatch", r"adapter does not fit this base model .*gate_proj: adapter expects \(d_in, d_out\)=\(32, "
                       r"64\), base has \(32, 48\)"),
    ("run_config_not_json", r"run_config.json: not valid JSON"),
])
@pytest.mark.parametrize("command", ["eval", "inspect"])
def test_damaged_adapter_fails_through_the_cli_and_writes_nothing(trained_run, tmp_path, kind, pattern, command):
    src, other = trained_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    _damage(run, kind, other)
    before = sorted(p.name for p in run.iterdir())
    args = [command, str(run), "--limit", "2"] + (["--tasks", "general/wordnet-def"] if command == "eval" else [])
    res = runner.invoke(app(), args, terminal_width=400)
    assert res.exit_code == 2, res.output
    flat = " ".join(res.output.split())
    assert re.search(pattern, flat), res.output
    assert sorted(p.name for p in run.iterdir()) == before  # no eval.json / routing.json / routing.png


# ------------------------------------------------------------------------------------------------ loader fuzzing
SMALL = {"r": 2, "n_lora_experts": 3, "n_identity_experts": 1, "n_clusters": 2, "target_modules": ["mlp.up_proj"]}
WEIRD_JSON = [None, True, -1, 0, 3, 2**40, 10**400, 1e308, -0.5, "", "x", "slim", [], [1, 2], [32, 64], {}, {"a": 1}]


def _mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    op = rng.choice(["flip", "truncate", "header", "length", "insert", "append", "zero"])
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    if op == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif op == "truncate":
        b = b[: rng.randrange(len(b))]
    elif op == "header":  # random bytes inside the JSON header
        i = rng.randrange(8, header_end)
        b[i: i + rng.randint(1, 6)] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 6)))
    elif op == "length":  # the 8-byte header length
        b[:8] = struct.pack("<Q", rng.choice([0, 1, header_end - 9, header_end + 1, len(b), 2**63,
                                              rng.randrange(2**64)]))
    elif op == "insert":
        i = rng.randrange(len(b))
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif op == "append":
        b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    else:
        i = rng.randrange(len(b))
        b[i: i + rng.randint(1, 64)] = bytes(64)[: len(b[i: i + 64])]
    return bytes(b)


def _mutate_config(meta: dict, text: str, rng: random.Random) -> str:
    op = rng.choice(["text", "config_field", "top_field", "layers"])
    if op == "text":
        chars = list(text)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(chars))
            chars[i] = rng.choice(['"', "{", "}", ",", ":", "]", "9", "-", "e", " ", "\\", "\x00", "é"])
        return "".join(chars)
    meta = json.loads(json.dumps(meta))
    value = rng.choice(WEIRD_JSON)
    if op == "config_field":
        meta["config"][rng.choice(sorted(meta["config"]))] = value
    elif op == "top_field":
        meta[rng.choice(["method", "config", "layers", "mask_seeds", "base_model_type"])] = value
    else:
        meta["layers"][rng.choice(sorted(meta["layers"]))] = value
    return json.dumps(meta)


def test_fuzzed_adapter_files_raise_only_the_documented_valueerror(tmp_path, ids):
    """1200 seeded corruptions of a saved adapter (bytes of the safetensors file with the checksum removed so that the
    parser and the structural checks see them, bytes with the checksum kept, and the JSON config): loading either
    succeeds or raises ValueError, and on ValueError the base model is untouched. Nothing else escapes. (It found
    one: alpha=10**400 in the config passed validation, then alpha / r raised OverflowError.)"""
    model = get_slim_model(tiny_llama(), SlimConfig(**SMALL))
    model.train()
    model(input_ids=ids, attention_mask=torch.ones_like(ids))  # fit the clusters: buffers hold real values
    good = tmp_path / "good"
    model.save_pretrained(good)
    weights = (good / "adapter_model.safetensors").read_bytes()
    config_text = (good / "adapter_config.json").read_text()
    meta = json.loads(config_text)
    unchecked = {k: v for k, v in meta.items() if k != "weights_sha256"}
    rng = random.Random(0)
    outcomes: dict[str, int] = {}
    escaped = []
    case_dir = tmp_path / "case"
    base = tiny_llama()
    for case in range(1200):
        mode = ("weights", "weights_checked", "config")[case % 3]
        shutil.rmtree(case_dir, ignore_errors=True)
        case_dir.mkdir()
        if mode == "config":
            (case_dir / "adapter_model.safetensors").write_bytes(weights)
            (case_dir / "adapter_config.json").write_text(_mutate_config(meta, config_text, rng))
        else:
            (case_dir / "adapter_model.safetensors").write_bytes(_mutate_bytes(weights, rng))
            (case_dir / "adapter_config.json").write_text(json.dumps(meta if mode == "weights_checked" else unchecked))
        try:
            loaded = SlimModel.from_pretrained(base, case_dir)
            outcomes[f"{mode}: loaded"] = outcomes.get(f"{mode}: loaded", 0) + 1
            base = tiny_llama()  # the loaded one was adapted in place
            del loaded
        except ValueError:
            outcomes[f"{mode}: ValueError"] = outcomes.get(f"{mode}: ValueError", 0) + 1
            if any(isinstance(m, SlimLinear) for m in base.modules()):
                escaped.append((case, mode, "ValueError but the base model was changed"))
        except Exception as e:  # noqa: BLE001 - the point of the test
            escaped.append((case, mode, f"{type(e).__name__}: {e}"))
    assert not escaped, escaped[:5]
    # the corruptions mostly broke something (the fuzz is not a no-op), and with the checksum every one is caught
    assert outcomes.get("weights_checked: ValueError", 0) == 400 and "weights_checked: loaded" not in outcomes
    assert outcomes.get("weights: ValueError", 0) >= 300 and outcomes.get("config: ValueError", 0) >= 270

