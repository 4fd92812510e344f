"""``slim bench quantized``: what a 4-bit base (QLoRA, ``slim train --quantize nf4``) saves and costs, SLIM and
LoRA side by side.

The base: TinyLlama-1.1B's layer shape (``speed.WIDE_SHAPE``) with ``layers`` decoder layers and random seeded
weights, saved to a temporary folder and loaded from it in float32 and in nf4 (bitsandbytes; matmuls in float32).
On each: SLIM (SlimConfig's defaults) and LoRA at SLIM's trainable budget, as ``slim bench speed`` builds them.
Measured in one run:

- the model's memory footprint (transformers' ``get_memory_footprint``: parameters and buffers as stored, the 4-bit
  weights packed);
- a training step's median time and tokens/s, the four models timed round-robin in one process;
- the peak memory of two training steps beyond the model (the optimizer's state, activations, the dequantized
  weights' temporaries), each model in a fresh process (``speed.peak_step_memory``), and the training memory, the
  footprint plus that peak. (Not the process's own peak: loading a quantized base reads the float checkpoint
  through the page cache, and a float32 base's weights are pages of the mapped checkpoint; neither is the model's.)

Ratios: nf4 / float32 per method (footprint, training memory, step time) and SLIM / LoRA on each base.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .speed import (
    ModelBenchArgs,
    _train_batch,
    _train_step,
    _warmup,
    build_method,
    device_name,
    device_sync,
    peak_step_memory,
    wide_base,
)
from .timing import interleaved_times, medians

METHODS = ("slim", "lora")
BASES = ("", "nf4")  # float32, then 4-bit NormalFloat


@dataclass
class QuantBenchArgs:
    layers: int = 2  # decoder layers of the TinyLlama-shaped base
    batch_size: int = 4
    seq_len: int = 128
    reps: int = 5
    seed: int = 0
    device: str = "cpu"
    shape: dict[str, int] | None = None  # the layers' shape (speed.WIDE_SHAPE's keys); None: TinyLlama's


def _key(method: str, quantize: str) -> str:
    return f"{method}-{quantize or 'fp32'}"


def run_quantized_bench(quick: bool = False, out: Path | None = None, device: str = "cpu",
                        args: QuantBenchArgs | None = None) -> dict:
    """Footprint, training step time and peak memory of SLIM and LoRA on a float32 and an nf4 base (module
    docstring); ``args``: other shapes than the full or ``quick`` run's; writes the record to ``out`` when given."""
    from ..quantization import quantization_config

    quantization_config("nf4")  # bitsandbytes missing: ImportError naming the extra, before any work
    if args is not None:
        a = args
    else:
        a = QuantBenchArgs(layers=1, batch_size=2, seq_len=64, reps=2, device=device) if quick else QuantBenchArgs(
            device=device)
    device = a.device
    t0 = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="slim-qbench-"))
    try:
        wide_base(a.layers, seed=a.seed, shape=a.shape).save_pretrained(folder)
        margs = {q: ModelBenchArgs(base=str(folder), batch_size=a.batch_size, seq_len=a.seq_len, reps=a.reps,
                                   seed=a.seed, device=device, quantize=q) for q in BASES}
        models = {_key(m, q): build_method(m, str(folder), a.seed, device=device, quantize=q)
                  for q in BASES for m in METHODS}
        footprint = {k: m.get_memory_footprint() / 2**20 for k, m in models.items()}
        trainable = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
        batch = _train_batch(margs[""], next(iter(models.values())).config.vocab_size)
        rounds = interleaved_times({k: _train_step(m, batch) for k, m in models.items()}, reps=a.reps,
                                   warmup=_warmup(device), sync=device_sync(device))
        del models
        step = medians(rounds)
        peaks = {_key(m, q): peak_step_memory(m, margs[q]) for q in BASES for m in METHODS}
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    tokens = a.batch_size * a.seq_len
    rec = {k: {"footprint_mib": footprint[k], "trainable_params": trainable[k], "step_s": step[k],
               "tokens_per_s": tokens / step[k], "step_rounds_s": rounds[k],
               "train_memory_mib": footprint[k] + peaks[k]["peak_mib"],
               "step_peak_beyond_model_mib": peaks[k]["peak_mib"]} for k in step}
    ratios = {}
    for m in METHODS:
        f, q = rec[_key(m, "")], rec[_key(m, "nf4")]
        ratios[f"{m}_nf4_over_fp32_footprint"] = q["footprint_mib"] / f["footprint_mib"]
        ratios[f"{m}_nf4_over_fp32_train_memory"] = q["train_memory_mib"] / f["train_memory_mib"]
        ratios[f"{m}_nf4_over_fp32_step_time"] = q["step_s"] / f["step_s"]
    for q in BASES:
        s, lo = rec[_key("slim", q)], rec[_key("lora", q)]
        ratios[f"slim_over_lora_tokens_per_s_{q or 'fp32'}"] = s["tokens_per_s"] / lo["tokens_per_s"]
        ratios[f"slim_over_lora_train_memory_{q or 'fp32'}"] = s["train_memory_mib"] / lo["train_memory_mib"]
    import bitsandbytes

    result = {"meta": {"args": asdict(a), "quick": quick, "device": device_name(device), "torch": torch.__version__,
                       "bitsandbytes": bitsandbytes.__version__, "threads": torch.get_num_threads(),
                       "machine": platform.machine(), "seconds": time.perf_counter() - t0,
                       "base": f"{'TinyLlama-shaped' if a.shape is None else a.shape}, {a.layers} layer(s), "
                               "random weights"},
              "models": rec, **ratios}
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


def print_quantized_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    meta = result["meta"]
    t = Table(title=f"SLIM and LoRA on a float32 and an nf4 base ({meta['base']}, {meta['device']}, "
                    f"{meta['args']['batch_size']} x {meta['args']['seq_len']} tokens per step; medians)")
    for col in ("model", "trainable", "footprint MiB", "step peak MiB", "training MiB", "step s", "tokens/s"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for k, r in result["models"].items():
        t.add_row(k, f"{r['trainable_params']:,}", f"{r['footprint_mib']:.1f}",
                  f"{r['step_peak_beyond_model_mib']:.1f}", f"{r['train_memory_mib']:.1f}", f"{r['step_s']:.3f}",
                  f"{r['tokens_per_s']:.0f}")
    console = Console()
    console.print(t)
    for k, v in sorted(result.items()):
        if isinstance(v, float):
            console.print(f"{k}: {v:.3f}")
