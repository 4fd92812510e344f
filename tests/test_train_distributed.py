"""`slim train` under two CPU processes (gloo), started by torchrun and by accelerate launch: every rank holds
identical trainable parameters and buffers (SLIM's cluster statistics included) after every step, and losses and
the final adapter equal a single process trained on the same global batch (4 + 4 sequences vs 8)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import SLIM_SET, env_1thread, losses, save_tiny_base, write_data

from slimpeft.training import TrainArgs, train

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4
# measured: 2 ranks vs 1 process differ by <= 5e-7 in the loss and the adapter (float32 sums in another order)
ATOL = 1e-5
ADAM_ATOL = 1e-4  # adapter weights after a few AdamW steps (see the FSDP2 test)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    base, data = save_tiny_base(d / "base"), write_data(d / "data.jsonl")
    single = train(TrainArgs(base=str(base), data=str(data), out=str(d / "single"), steps=STEPS, batch_size=8,
                             save_steps=2, logging_steps=1, overrides={"r": 4, "n_clusters": 4}, progress=False))
    return d, base, data, single


def _two_process_run(launcher: list[str], setup, name: str, *extra: str) -> Path:
    d, base, data, _ = setup
    out = d / name
    cmd = [*launcher, "-m", "slimpeft.cli", "train", "--base", str(base), "--data", str(data), "--out", str(out),
           "--steps", str(STEPS), "--batch-size", "4", "--save-steps", "2", "--logging-steps", "1",
           "--sync-check-steps", "1", "--no-progress", *SLIM_SET, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env_1thread(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def _check_against_single(out: Path, single: Path) -> None:
    """Two ranks of 4 sequences equal one process of 8: losses, adapter, and identical ranks after every step."""
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["world_size"] == 2
    sync = cfg["rank_sync"]
    # compared after every step, bit for bit: 18 trainable tensors (6 layers x A, B, router) and every buffer,
    # 8 cluster statistics per layer among them (broadcasting buffers is off, so this is the all-reduce at work)
    assert sync["checks"] == STEPS and sync["max_abs_diff"] == 0.0
    assert sync["n_params"] == 18 and sync["n_buffers"] >= 6 * 8
    ckpt = out / "checkpoints" / "checkpoint-2"
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in ckpt.iterdir()}  # two processes ran
    got, ref = losses(out), losses(single)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=ATOL), step
    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(single / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("clusters.centers") for k in a)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=ATOL, msg=k)
    # the adapters really moved (the comparison is not between two untouched initialisations)
    assert max(float(v.abs().max()) for k, v in a.items() if k.endswith("lora_B")) > 1e-3


def test_torchrun_two_processes_equal_one_process_on_the_global_batch(setup):
    out = _two_process_run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                           setup, "torchrun")
    _check_against_single(out, setup[3])


def test_accelerate_launch_two_processes_equal_one_process_on_the_global_batch(setup):
    config = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
    out = _two_process_run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)],
                           setup, "accelerate")
    _check_against_single(out, setup[3])


def test_torchrun_two_processes_on_a_4bit_base_equal_one_process(setup):
    """QLoRA under DDP: each rank loads its own nf4 copy of the base (slimpeft.quantization.device_map); the adapter
    trains as one process on the global batch of the same quantized base."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is the quant extra (pip install -e '.[quant]')")
    d, base, data, _ = setup
    single = train(TrainArgs(base=str(base), data=str(data), out=str(d / "single-nf4"), steps=STEPS, batch_size=8,
                             save_steps=2, logging_steps=1, overrides={"r": 4, "n_clusters": 4}, progress=False,
                             quantize="nf4"))
    out = _two_process_run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
                           setup, "torchrun-nf4", "--quantize", "nf4")
    assert json.loads((out / "run_config.json").read_text())["args"]["quantize"] == "nf4"
    _check_against_single(out, single)


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_deepspeed_zero_two_processes_on_cpu_equal_one_process(setup, stage):
    """DeepSpeed runs on CPU with gloo (its CPU accelerator): ZeRO-2 shards optimizer state and gradients, ZeRO-3 also
    the parameters, base and adapter alike; the adapter is gathered from the shards before it is saved."""
    pytest.importorskip("deepspeed", reason="deepspeed is in the test extra (pip install -e '.[test]')")
    config = ROOT / "configs" / "deepspeed" / f"{stage}.json"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = _two_process_run(launcher, setup, stage, "--deepspeed", str(config))
    _check_against_single(out, setup[3])
    ckpt = out / "checkpoints" / "checkpoint-4"
    assert (ckpt / "global_step4").is_dir()  # DeepSpeed's own sharded state
    # the checkpoint's adapter (under ZeRO-3 taken from the state dict the Trainer gathers) is the run's adapter,
    # and no whole-model weights file is written next to it
    assert not (ckpt / "model.safetensors").exists()
    a, b = load_file(ckpt / "adapter_model.safetensors"), load_file(out / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for CPU-only machines")
def test_fsdp_on_cpu_is_refused_instead_of_silently_running_ddp(setup, tmp_path):
    d, base, data, _ = setup
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "slimpeft.cli", "train", "--base", str(base), "--data", str(data), "--out", str(out),
           "--fsdp-config", str(ROOT / "configs" / "fsdp" / "fsdp2.json")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env_1thread(), cwd=ROOT)
    assert proc.returncode == 2
    assert "FSDP needs GPUs" in proc.stderr and not out.exists()


@pytest.mark.parametrize("routing", ["default", "recommended"])
def test_fsdp2_sharded_base_and_adapter_train_like_one_process(tmp_path, routing):
    """The adapter with sharded base weights: torch FSDP2 (``fully_shard``) on 2 CPU ranks, without the Trainer
    (accelerate enables FSDP only on GPUs). Losses and the adapter gathered from the shards equal one process; with
    the recommended routing too, whose scoring pass calls the sharded model from inside its own forward pre-hook."""
    import fsdp_worker as w

    from slimpeft import SlimConfig
    from slimpeft.config import RECOMMENDED_ROUTING
    from slimpeft.model import get_slim_model

    extra = RECOMMENDED_ROUTING if routing == "recommended" else {}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("fsdp_worker.py")), str(tmp_path), json.dumps(extra)],
                          capture_output=True, text=True, timeout=300, env=env_1thread(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["param_type"] == "DTensor"  # the parameters really were sharded
    from conftest import tiny_llama

    torch.manual_seed(0)
    model = get_slim_model(tiny_llama(), SlimConfig(**w.CONFIG, **extra))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=w.LR)
    torch.manual_seed(1)
    for step, ids in enumerate(w.global_batches()):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert result["losses"][step] == pytest.approx(float(loss), abs=ATOL), step
    got, ref = load_file(tmp_path / "adapter.safetensors"), model.adapter_state_dict()
    assert got.keys() == ref.keys()
    # AdamW divides by sqrt(v): an entry with a near-zero gradient moves by up to lr (1e-2) per step whatever the
    # gradient's size, so the sharded reductions' rounding shows up to ~2e-5 after 3 steps (measured with the
    # recommended routing); a real divergence (a missed reduction, another routing) moves entries by ~lr
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=ADAM_ATOL, msg=k)
    assert max(float(v.abs().max()) for k, v in got.items() if k.endswith("lora_B")) > 1e-3
