"""Speed benchmarks, measured side by side in one run (ratios, never absolute targets in tests).

* layer:     forward + backward of one adapted linear layer at a realistic shape (d_in 2048, d_out 5632, 2048
             tokens): frozen base, SLIM (8 x r16, top-2, 2 identity experts), PEFT LoRA of rank 8 x 16 = 128, and
             the per-linear MoE baselines on the same expert engine (LoRAMoE: dense over 8 x r16; MoLA: top-2).
* masking:   fast row/column masking vs exact DARE masking of ``B A`` for one r=16 expert at 4096 x 11008
             (the physical floor of their ratio is i*o / (r (i + o)) ~ 186).
* training:  tokens/s of a whole training step (forward with the loss, backward, AdamW step) of the shipped base
             model with SLIM, LoRA at SLIM's trainable budget, MixLoRA, LoRAMoE and full fine-tuning, timed
             round-robin in one process; and the peak memory of that step, each method in a fresh process (see
             ``peak_step_memory``).
* inference: greedy generation tokens/s with the KV cache (``model.generate``, eval mode, fixed masks) of the base
             model, LoRA and SLIM at batch 1 and batch 16: on the shipped base (4 layers of width 256, where
             every adapter op costs about as much as the small matmul it adapts), and on a Llama of TinyLlama-1.1B's
             layer shape (width 2048, MLP 5632, 32 heads / 4 KV heads; ``wide_layers`` of its 22 layers, random
             seeded weights built locally: speed does not depend on the values) -- the width of the models users
             adapt. The ``infer_wide_*`` ratios come from the latter.

Every measurement runs on the CPU (the default) or on a CUDA GPU (``--device cuda``: the clock stops after
``torch.cuda.synchronize()``, peak memory is ``torch.cuda.max_memory_allocated``, and the layer benchmark also
times SLIM's dense and sparse expert dispatch, the two paths ``experts.auto_dispatch`` chooses between).

With ``--torch-compile BACKEND`` the training step (SLIM, LoRA) and generation (base, LoRA, SLIM; a static KV cache,
each decoding step compiled by ``generate``) are also timed under torch.compile, eager and compiled side by side.

Run: ``slim bench speed [--quick] [--json] [--device cuda] [--torch-compile inductor]`` (all four) or
``slim bench layer`` (the first two).
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import PRESETS, RECOMMENDED_ROUTING, SlimConfig
from ..layer import SlimLinear
from ..masking import apply_fast_masks, dare_delta, dare_mask, fast_masks
from ..methods.config import LoraMoeConfig, MolaConfig
from ..methods.loramoe import LoraMoeLinear
from ..methods.mola import MolaLinear
from .timing import interleaved_times, medians, round_ratios


def resolve_device(device: str) -> torch.device:
    """``device`` ("cpu", "cuda", "cuda:N") as a torch.device; a CUDA device this machine does not have is refused
    with a ValueError naming it."""
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"--device: {device!r} is not a device name (use cpu, cuda or cuda:N)") from e
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"--device: {device!r}: the speed benchmark runs on cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device: {device!r} asked for, but torch {torch.__version__} sees no CUDA GPU here")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"--device: {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def device_sync(device: torch.device | str):
    """The barrier that makes host-clock timing count a device's queued work (None on the CPU)."""
    dev = torch.device(device)
    return (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else None


def device_name(device: torch.device | str) -> str:
    dev = torch.device(device)
    return f"cuda ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else "cpu"


@dataclass
class LayerShape:
    d_in: int = 2048
    d_out: int = 5632
    n_tokens: int = 2048


class _Holder(nn.Module):
    """A one-layer module so that PEFT can target it by name."""

    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin


def _fwd_bwd(module: nn.Module, x: torch.Tensor, grad: torch.Tensor):
    def run() -> None:
        module(x).backward(grad)
        x.grad = None
        for p in module.parameters():
            p.grad = None

    return run


def op_count(fn) -> int:
    """ATen ops that do work (views and allocations left out) in one call of ``fn``, backward included, as they reach
    the dispatcher (composite ops counted as what they decompose into). On a GPU each is about one kernel launch, a
    fixed host cost of ~10-40 us: the measure behind SLIM's GPU timings (BENCHMARKS.md section 1), the same on every
    device. Counted in this thread: run it on CPU tensors (a GPU's backward runs in another thread)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and func.__name__.split(".")[0] not in ("detach", "empty", "empty_strided"):
                Counter.n += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return Counter.n


def _bench_layers(shape: LayerShape, dtype: torch.dtype, cfg: SlimConfig) -> dict[str, nn.Module]:
    """The layer kinds side by side on one frozen base layer, in training mode: base, SLIM, PEFT LoRA at the
    mixture's whole rank (lora{rank}), LoRAMoE (dense over the same experts) and MoLA (top-2)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    base = nn.Linear(shape.d_in, shape.d_out).to(dtype).requires_grad_(False)
    slim = SlimLinear(base, cfg, "bench").train()
    with torch.no_grad():
        slim.experts.lora_B.normal_(0.0, 0.01)  # a trained-looking adapter, not the zero init
    rank = cfg.n_lora_experts * cfg.r
    holder = _Holder(nn.Linear(shape.d_in, shape.d_out).to(dtype))
    holder.lin.load_state_dict(base.state_dict())
    lora = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["lin"])).train()
    loramoe = LoraMoeLinear(base, "bench", LoraMoeConfig(n_experts=cfg.n_lora_experts, r=cfg.r)).train()
    mola = MolaLinear(base, "bench", MolaConfig(r=cfg.r), n_experts=cfg.n_lora_experts).train()
    for m in (loramoe, mola):
        with torch.no_grad():
            m.experts.lora_B.normal_(0.0, 0.01)
    return {"base": base, "slim": slim, f"lora{rank}": lora.base_model.model.lin, "loramoe": loramoe,
            "mola_top2": mola}


def layer_op_counts(config: SlimConfig | None = None) -> dict[str, int]:
    """``op_count`` of one forward + backward of each layer kind of ``layer_benchmark``, on small CPU layers: which
    ops run depends on neither the size nor the device (every path is the same code)."""
    shape = LayerShape(64, 96, 32)
    layers = _bench_layers(shape, torch.float32, config or SlimConfig())
    x = torch.randn(shape.n_tokens, shape.d_in, requires_grad=True)
    g = torch.randn(shape.n_tokens, shape.d_out)
    counts = {}
    for name, m in layers.items():
        _fwd_bwd(m, x, g)()  # the first call fits SLIM's clusters: count a later one, as in training
        counts[name] = op_count(_fwd_bwd(m, x, g))
    return counts


def layer_benchmark(shape: LayerShape, *, dtype: torch.dtype = torch.float32, reps: int = 5,
                    config: SlimConfig | None = None, device: torch.device | str = "cpu") -> dict:
    """Median seconds of forward+backward per layer kind, timed round-robin, plus the ratios to the base and every
    round's seconds (``rounds_s``, per kind). On a GPU, SLIM is also timed with each expert dispatch forced
    (``slim_dense``, ``slim_sparse``); ``slim`` is the automatic choice."""
    dev = torch.device(device)
    cfg = config or SlimConfig()
    layers = {k: m.to(dev) for k, m in _bench_layers(shape, dtype, cfg).items()}
    base, rank = layers["base"], cfg.n_lora_experts * cfg.r
    x = torch.randn(shape.n_tokens, shape.d_in, dtype=dtype, device=dev, requires_grad=True)
    g = torch.randn(shape.n_tokens, shape.d_out, dtype=dtype, device=dev)
    fns = {k: _fwd_bwd(m, x, g) for k, m in layers.items()}
    if dev.type == "cuda":
        for mode in ("dense", "sparse"):
            forced = SlimLinear(base, cfg, "bench").train().to(dev)
            forced.load_state_dict(layers["slim"].state_dict())
            forced.dispatch = mode
            fns[f"slim_{mode}"] = _fwd_bwd(forced, x, g)
    rounds = interleaved_times(fns, reps=reps, warmup=_warmup(str(dev)), sync=device_sync(dev))
    t = medians(rounds)
    forced_ratios = {f"{k}_over_base": t[k] / t["base"] for k in ("slim_dense", "slim_sparse") if k in t}
    return {**{f"{k}_s": v for k, v in t.items()}, **forced_ratios,
            "slim_over_base": t["slim"] / t["base"], f"slim_over_lora{rank}": t["slim"] / t[f"lora{rank}"],
            f"lora{rank}_over_base": t[f"lora{rank}"] / t["base"], "loramoe_over_base": t["loramoe"] / t["base"],
            "mola_top2_over_base": t["mola_top2"] / t["base"], "rounds_s": rounds}


def masking_benchmark(d_in: int = 4096, d_out: int = 11008, r: int = 16, p: float = 0.2, reps: int = 5,
                      device: torch.device | str = "cpu") -> dict:
    """Seconds to draw and apply one mask to one expert: fast (rows of B, columns of A) vs exact DARE on B A, and
    every round's seconds (``rounds_s``)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    A, B = torch.randn(1, r, d_in, device=dev), torch.randn(1, d_out, r, device=dev)

    def fast() -> None:
        col, row = fast_masks(1, d_in, d_out, p, device=dev)
        apply_fast_masks(A, B, col, row)

    def dare() -> None:
        dare_delta(A, B, dare_mask(1, d_in, d_out, p, device=dev))

    rounds = interleaved_times({"fast": fast, "dare": dare}, reps=reps, warmup=_warmup(str(dev)),
                               sync=device_sync(dev))
    t = medians(rounds)
    return {"mask_fast_s": t["fast"], "mask_dare_s": t["dare"], "mask_fast_speedup": t["dare"] / t["fast"],
            "mask_floor_ratio": d_in * d_out / (r * (d_in + d_out)), "rounds_s": rounds}


def run_layer_bench(quick: bool = False, out: Path | None = None, device: torch.device | str = "cpu") -> dict:
    shape = LayerShape(n_tokens=512) if quick else LayerShape()
    reps = 3 if quick else 7
    result = {
        "shape": asdict(shape), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "device": device_name(device), "quick": quick,
        "layer_float32": layer_benchmark(shape, reps=reps, device=device),
        "masking": masking_benchmark(reps=reps, device=device),
        "layer_ops": layer_op_counts(),
    }
    if not quick:
        result["layer_bfloat16"] = layer_benchmark(shape, dtype=torch.bfloat16, reps=reps, device=device)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


# the ratios whose per-round spread the layer table shows: name -> (numerator, denominator) of rounds_s
_ROUND_PAIRS = {"layer_float32": {"slim_over_base": ("slim", "base"), "slim_over_lora128": ("slim", "lora128")},
                "masking": {"mask_fast_speedup": ("dare", "fast")}}
_ROUND_PAIRS["layer_bfloat16"] = _ROUND_PAIRS["layer_float32"]


def print_layer_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SLIM layer speed ({result['shape']}, {result['threads']} threads, medians)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for section in ("layer_float32", "layer_bfloat16", "masking", "layer_ops"):
        for k, v in result.get(section, {}).items():
            if k == "rounds_s":  # every round's seconds: in the JSON record; here the spread of the headline ratios
                for name, (num, den) in _ROUND_PAIRS[section].items():
                    spread = round_ratios(v[num], v[den])
                    table.add_row(f"{section}.{name} per round", f"{spread['min']:.3f} - {spread['max']:.3f}")
                continue
            table.add_row(f"{section}.{k}", f"{v:.4f}" if k.endswith("_s") else f"{v:d}" if isinstance(v, int)
                          else f"{v:.3f}")
    Console().print(table)


# ------------------------------------------------------------------------------------------------ model level
# "slim-recommended": SLIM with config.RECOMMENDED_ROUTING (the scoring pass through the frozen base, a
# sequence-pooled score), what `make demo` and the forgetting benchmark use; "slim" is SlimConfig's defaults (the
# paper's per-token routing), the configuration the targets are set for; "slim-single": the recommended
# routing with config.SINGLE_EXPERT (one LoRA expert of the mixture's whole rank), the forgetting benchmark's
# slim-single
TRAIN_METHODS = ("slim", "slim-recommended", "slim-single", "lora", "mixlora", "loramoe", "full")
# "slim-single-merged": slim-single with merged_inference (unflagged calls run merged weights, flagged ones where the
# yield wins everywhere the base output; generation only)
INFER_METHODS = ("base", "lora", "slim", "slim-recommended", "slim-single", "slim-single-merged")


@dataclass
class ModelBenchArgs:
    """Shapes of the model-level measurements."""

    base: str = "assets/base"
    batch_size: int = 16  # training sequences per step
    seq_len: int = 128  # training tokens per sequence
    prompt_len: int = 16  # generation prompt tokens
    new_tokens: int = 32  # generated tokens per sequence
    infer_batches: tuple[int, ...] = (1, 16)
    reps: int = 5
    seed: int = 0
    wide_layers: int = 2  # layers of the TinyLlama-shaped model of the wide inference measurement (0: skip it)
    device: str = "cpu"  # where models, batches and timing run ("cuda", "cuda:N": a GPU)
    quantize: str = ""  # the base's linear layers quantized by bitsandbytes (nf4, fp4, int8; `slim bench quantized`)


# TinyLlama-1.1B's layer shape (the layer benchmark's d_in / d_out), for inference timing at a realistic width
WIDE_SHAPE: dict[str, int] = {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32,
                              "num_key_value_heads": 4}


def wide_base(n_layers: int, vocab_size: int = 4096, seed: int = 0, shape: dict[str, int] | None = None
              ) -> nn.Module:
    """A Llama causal LM of TinyLlama-1.1B's layer shape (or ``shape``'s) with ``n_layers`` layers and random, seeded
    weights (built locally, nothing downloaded)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=n_layers, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=2, **(shape or WIDE_SHAPE))
    return LlamaForCausalLM(cfg).eval()


def build_method(name: str, base: str, seed: int = 0, *, wide_layers: int = 0, device: str = "cpu",
                 quantize: str = "") -> torch.nn.Module:
    """A fresh copy of the base model (``wide_layers`` > 0: of ``wide_base``; ``quantize``: the folder's model
    quantized by bitsandbytes, loaded onto ``device``) with ``name`` applied ("base": none), on ``device``. LoRA gets
    SLIM's trainable budget."""
    from .. import methods
    from ..training import load_causal_lm

    torch.manual_seed(seed)
    if wide_layers > 0:
        model = wide_base(wide_layers, seed=seed)
    else:
        model = load_causal_lm(base, quantize=quantize, device=device if quantize else None)
    if name == "slim-recommended":
        model = methods.build("slim", model, **RECOMMENDED_ROUTING)
    elif name == "slim-single":
        model = methods.build("slim", model, **PRESETS["single"])
    elif name == "slim-single-merged":
        model = methods.build("slim", model, **PRESETS["single"], merged_inference=True)
    elif name != "base":
        model = methods.build(name, model, **(methods.budget_overrides(name, model) if name == "lora" else {}))
    return model if quantize else model.to(device)  # a quantized model sits where it was loaded


def _train_batch(args: ModelBenchArgs, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(3, vocab, (args.batch_size, args.seq_len), generator=g).to(args.device)  # (b, t)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _warmup(device: str) -> int:
    """Untimed runs before timing: more on a GPU (kernel selection, allocator growth, lazy module loading)."""
    return 3 if torch.device(device).type == "cuda" else 1


def _train_step(model: torch.nn.Module, batch: dict[str, torch.Tensor], amp: bool = False, backend: str = ""):
    """One training step as a callable; ``amp``: the forward under bf16 autocast (the Trainer's bf16=True);
    ``backend``: the model under ``torch.compile`` with that backend (the Trainer's torch_compile)."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    device_type = batch["input_ids"].device.type
    fwd = torch.compile(model, backend=backend) if backend else model

    def step() -> None:
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=amp):
            loss = fwd(**batch).loss  # the loss includes the method's auxiliary losses
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def train_benchmark(args: ModelBenchArgs, names: tuple[str, ...] = TRAIN_METHODS, *, amp: bool = False
                    ) -> dict[str, dict[str, float]]:
    """Median seconds and tokens/s of a training step per method, the methods timed round-robin in one process;
    ``amp``: under bf16 autocast (mixed precision, weights float32)."""
    models = {n: build_method(n, args.base, args.seed, device=args.device) for n in names}
    vocab = next(iter(models.values())).config.vocab_size
    batch = _train_batch(args, vocab)
    rounds = interleaved_times({n: _train_step(m, batch, amp) for n, m in models.items()}, reps=args.reps,
                               warmup=_warmup(args.device), sync=device_sync(args.device))
    t = medians(rounds)
    tokens = args.batch_size * args.seq_len
    out = {n: {"step_s": t[n], "tokens_per_s": tokens / t[n], "step_rounds_s": rounds[n],
               "trainable_params": sum(p.numel() for p in models[n].parameters() if p.requires_grad)}
           for n in names}
    if torch.device(args.device).type == "cpu" and not amp:  # counted where every op runs in this thread (op_count)
        for n, m in models.items():
            out[n]["ops_per_step"] = op_count(_train_step(m, batch))  # forward, backward and optimizer step
    return out


def train_compile_benchmark(args: ModelBenchArgs, backend: str = "inductor", names: tuple[str, ...] = ("slim", "lora")
                            ) -> dict[str, dict[str, float]]:
    """Training steps of each method eager and under ``torch.compile(backend=...)`` (``slim train --torch-compile``),
    the four timed round-robin in one process: ``{name}`` and ``{name}-compiled`` records with the median step,
    tokens/s and, compiled, the seconds of the first three steps (SLIM: the first fits the clusters in fragments, the
    second compiles the whole model as one graph)."""
    import time

    vocab = None
    steps, compile_s = {}, {}
    for n in names:
        for backend_ in ("", backend):
            model = build_method(n, args.base, args.seed, device=args.device)
            vocab = vocab or model.config.vocab_size
            key = f"{n}-compiled" if backend_ else n
            steps[key] = _train_step(model, _train_batch(args, vocab), backend=backend_)
            if backend_:
                t0 = time.perf_counter()
                for _ in range(3):
                    steps[key]()
                if (sync := device_sync(args.device)) is not None:
                    sync()
                compile_s[key] = time.perf_counter() - t0
    rounds = interleaved_times(steps, reps=args.reps, warmup=_warmup(args.device), sync=device_sync(args.device))
    t = medians(rounds)
    tokens = args.batch_size * args.seq_len
    return {k: {"step_s": t[k], "tokens_per_s": tokens / t[k], "step_rounds_s": rounds[k],
                **({"first_3_steps_s": compile_s[k], "backend": backend} if k in compile_s else {})} for k in steps}


def _proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":")
                out[key] = int(val.split()[0]) * 1024
    return out


def _page_in(model: torch.nn.Module) -> None:
    """Read every parameter and buffer once: transformers maps a float32 checkpoint's tensors from the file and the
    pages come into memory on first use, so without this a step's peak would count the base weights it reads."""
    with torch.no_grad():
        for t in itertools.chain(model.parameters(), model.buffers()):
            t.detach().reshape(-1).sum()


def _return_freed_memory() -> None:
    """Hand the heap memory freed so far back to the OS (glibc's ``malloc_trim``), so that the steps measured next
    cannot reuse it unseen: loading a model frees large buffers (a quantized base: the float weights it was
    quantized from), which the allocator would otherwise keep and the steps fill without the RSS growing."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim with
        pass


def peak_step_memory_child(method: str, args_json: str) -> None:
    """In a fresh process: peak memory of two training steps of ``method`` beyond the built model and batch.

    CPU (Linux): the resident-set high-water mark (VmHWM) is reset through /proc/self/clear_refs after the model,
    batch and optimizer exist (the model's weights read once, freed heap memory handed back), two steps run (the
    first allocates AdamW's state), and the HWM minus the RSS before the steps is the peak. tracemalloc would see
    none of it (torch allocates outside Python's allocator). CUDA: torch.cuda.max_memory_allocated minus the memory
    allocated before the steps. Prints one JSON object.
    """
    args = ModelBenchArgs(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args_json).items()})
    dev = torch.device(args.device)
    model = build_method(method, args.base, args.seed, device=args.device, quantize=args.quantize)
    batch = _train_batch(args, model.config.vocab_size)
    step = _train_step(model, batch)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        for _ in range(2):
            step()
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        print(json.dumps({"method": method, "rss_before": before, "hwm": peak, "peak_bytes": peak - before}))
        return
    _page_in(model)
    _return_freed_memory()
    before = _proc_status()["VmRSS"]
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    for _ in range(2):
        step()
    after = _proc_status()
    print(json.dumps({"method": method, "rss_before": before, "hwm": after["VmHWM"],
                      "peak_bytes": after["VmHWM"] - before}))


def peak_step_memory(method: str, args: ModelBenchArgs) -> dict[str, float]:
    """Run ``peak_step_memory_child`` in a fresh interpreter (nothing freed by an earlier method is reused)."""
    code = ("import sys; from slimpeft.bench.speed import peak_step_memory_child; "
            "peak_step_memory_child(sys.argv[1], sys.argv[2])")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.run([sys.executable, "-c", code, method, json.dumps(asdict(args))], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-memory run of {method!r} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
    rec = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"peak_mib": rec["peak_bytes"] / 2**20, "rss_before_mib": rec["rss_before"] / 2**20}


def _warm_clusters(model: torch.nn.Module, args: ModelBenchArgs) -> None:
    """A few training-mode forward passes (no optimizer step) so that SLIM's clusters exist and score, as after
    training; a SLIM model whose clusters were never fitted skips the score and would look cheaper than it is."""
    g = torch.Generator().manual_seed(args.seed + 1)
    vocab = model.config.vocab_size
    model.train()
    with torch.no_grad():
        for _ in range(3):
            ids = torch.randint(3, vocab, (8, args.seq_len), generator=g).to(args.device)
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    model.eval()


def _prompts(args: ModelBenchArgs, b: int, vocab: int) -> torch.Tensor:
    """(b, prompt_len) random token ids of the generation measurements, seeded per batch size."""
    g = torch.Generator().manual_seed(args.seed + b)
    return torch.randint(3, vocab, (b, args.prompt_len), generator=g).to(args.device)


def _generation(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int, **generate_kw: Any
                ) -> Callable[[], None]:
    """Greedy generation of exactly ``new_tokens`` tokens after ``prompt`` (b, t), without gradient, as a callable."""
    def run() -> None:
        with torch.no_grad():
            model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, **generate_kw)
    return run


def generation_compile_config(backend: str, device: str) -> Any:
    """transformers' ``CompileConfig`` of the compiled generation measurement: ``backend``; CUDA graphs
    ("reduce-overhead", transformers' default) on a GPU with inductor, else "default"; allowed on the CPU too
    (transformers compiles by itself only on accelerators)."""
    from transformers.generation.configuration_utils import CompileConfig

    cuda_graphs = torch.device(device).type == "cuda" and backend == "inductor"
    cc = CompileConfig(backend=backend, mode="reduce-overhead" if cuda_graphs else "default")
    cc._compile_all_devices = True
    return cc


def infer_compile_benchmark(args: ModelBenchArgs, backend: str = "inductor",
                            names: tuple[str, ...] = ("base", "lora", "slim"), *, wide: bool = False
                            ) -> dict[str, dict[str, float]]:
    """Greedy generation on the shipped base (``wide``: on ``wide_base(args.wide_layers)``) per method and batch
    size, eager (the dynamic KV cache, as ``infer_benchmark``) and compiled -- a static KV cache and a compile
    config, with which ``generate`` compiles each decoding step (what it does by itself on a GPU; the prompt runs
    eagerly) -- all timed round-robin in one process: ``{name}`` and ``{name}-compiled`` records; compiled ones also
    hold the seconds of their first call per batch size (compilation included), the graphs that call compiled, and
    the compile mode. Every model's compiled call shares one code object (``nn.Module``'s call), whose recompile
    limit (8) the models and batch sizes would exhaust -- dynamo then runs the rest eagerly, silently -- so the limit
    is raised for this measurement."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=max(64, torch._dynamo.config.recompile_limit)):
        return _infer_compile_benchmark(args, backend, names, wide)


def _infer_compile_benchmark(args: ModelBenchArgs, backend: str, names: tuple[str, ...], wide: bool
                             ) -> dict[str, dict[str, float]]:
    import time

    from torch._dynamo.utils import counters

    models = {n: build_method(n, args.base, args.seed, wide_layers=args.wide_layers if wide else 0,
                              device=args.device) for n in names}
    for m in models.values():
        _warm_clusters(m, args)
    cc = generation_compile_config(backend, args.device)
    vocab = next(iter(models.values())).config.vocab_size
    sync = device_sync(args.device)
    out: dict[str, dict[str, Any]] = {}
    for b in args.infer_batches:
        prompt = _prompts(args, b, vocab)  # (b, t)
        runs = {}
        for n, m in models.items():
            runs[n] = _generation(m, prompt, args.new_tokens)
            key = f"{n}-compiled"
            runs[key] = _generation(m, prompt, args.new_tokens, cache_implementation="static", compile_config=cc)
            graphs, t0 = counters["stats"]["unique_graphs"], time.perf_counter()
            runs[key]()
            if sync is not None:
                sync()
            rec = out.setdefault(key, {"backend": backend, "mode": cc.mode})
            rec[f"batch{b}_first_call_s"] = time.perf_counter() - t0
            rec[f"batch{b}_new_graphs"] = counters["stats"]["unique_graphs"] - graphs
        rounds = interleaved_times(runs, reps=args.reps, warmup=_warmup(args.device), sync=sync)
        t = medians(rounds)
        for k in runs:
            rec = out.setdefault(k, {})
            rec[f"batch{b}_s"], rec[f"batch{b}_rounds_s"] = t[k], rounds[k]
            rec[f"batch{b}_tokens_per_s"] = b * args.new_tokens / t[k]
    return out


def infer_benchmark(args: ModelBenchArgs, names: tuple[str, ...] = INFER_METHODS, *, wide: bool = False
                    ) -> dict[str, dict[str, float]]:
    """Greedy generation tokens/s (KV cache, eval mode, no gradient) per method and batch size, round-robin; on the
    shipped base, or (``wide``) on ``wide_base(args.wide_layers)``."""
    models = {n: build_method(n, args.base, args.seed, wide_layers=args.wide_layers if wide else 0,
                              device=args.device) for n in names}
    for m in models.values():
        _warm_clusters(m, args)
    vocab = next(iter(models.values())).config.vocab_size
    out: dict[str, dict[str, float]] = {n: {} for n in names}
    for b in args.infer_batches:
        prompt = _prompts(args, b, vocab)  # (b, t)

        rounds = interleaved_times({n: _generation(m, prompt, args.new_tokens) for n, m in models.items()},
                                   reps=args.reps, warmup=_warmup(args.device), sync=device_sync(args.device))
        t = medians(rounds)
        for n in names:
            out[n][f"batch{b}_s"] = t[n]
            out[n][f"batch{b}_rounds_s"] = rounds[n]
            out[n][f"batch{b}_tokens_per_s"] = b * args.new_tokens / t[n]
            cfg = getattr(models[n], "slim_config", None)
            if cfg is not None and cfg.ood_source == "prepass":  # the prompts the scoring pass flags (routed path)
                with torch.no_grad():
                    models[n](input_ids=prompt, attention_mask=torch.ones_like(prompt))
                out[n][f"batch{b}_flagged"] = int((models[n].ctx.fixed_score.view(b, -1)[:, -1] > 0).sum())
    return out


# Targets of issue 6 (ratios from the same run): name -> (bound, "<=" or ">=")
TARGETS: dict[str, tuple[float, str]] = {
    "layer_slim_over_base": (1.15, "<="),
    "layer_slim_over_lora128": (1.0, "<="),
    "mask_fast_speedup": (50.0, ">="),
    "train_slim_over_lora_tokens_per_s": (0.9, ">="),
    "train_slim_over_lora_peak_mem": (1.2, "<="),
    "infer_slim_over_base_tokens_per_s": (0.85, ">="),
    "infer_wide_slim_over_base_tokens_per_s": (0.85, ">="),  # the same target at TinyLlama's width
}


def run_speed_bench(quick: bool = False, out: Path | None = None, base: str = "assets/base", *,
                    layer_shape: LayerShape | None = None, mask_shape: tuple[int, int] = (4096, 11008),
                    model_args: ModelBenchArgs | None = None, device: str = "cpu", compile_backend: str = "") -> dict:
    """All four measurements in one run on ``device``; returns (and writes to ``out``) one record whose top level
    holds every ratio, the targets met or not, and the measurements behind them. The keyword arguments override the
    shapes (tests use tiny ones); ``model_args.device``, when given, wins over ``device``. ``compile_backend``: also
    SLIM's and LoRA's training step and the base's, LoRA's and SLIM's generation under torch.compile
    (``train_compile_benchmark``, ``infer_compile_benchmark``; minutes of compilation)."""
    import time

    t0 = time.perf_counter()
    dev = resolve_device(model_args.device if model_args is not None else device)
    shape = layer_shape or (LayerShape(n_tokens=512) if quick else LayerShape())
    reps = 2 if quick else 7
    layer = layer_benchmark(shape, reps=reps, device=dev)
    layer_bf16 = None if quick else layer_benchmark(shape, dtype=torch.bfloat16, reps=reps, device=dev)
    masking = masking_benchmark(*mask_shape, reps=3 if quick else reps, device=dev)
    ops = layer_op_counts()  # ATen ops per layer fwd+bwd: about the kernel launches on a GPU
    # quick skips the TinyLlama-shaped generation (building and warming its models alone takes ~30 s here)
    margs = model_args or ModelBenchArgs(base=base, reps=2 if quick else 5, new_tokens=16 if quick else 32,
                                         wide_layers=0 if quick else 2, device=str(dev))
    train = train_benchmark(margs)
    train_bf16 = train_benchmark(margs, ("slim", "lora"), amp=True)  # mixed precision: informative, no target
    train_compiled = train_compile_benchmark(margs, compile_backend) if compile_backend else None
    mem_methods = ("slim", "lora") if quick else TRAIN_METHODS
    for n in mem_methods:
        train[n].update(peak_step_memory(n, margs))
    infer = infer_benchmark(margs)
    infer_wide = infer_benchmark(margs, wide=True) if margs.wide_layers > 0 else None
    infer_compiled = infer_compile_benchmark(margs, compile_backend) if compile_backend else None
    infer_wide_compiled = (infer_compile_benchmark(margs, compile_backend, wide=True)
                           if compile_backend and margs.wide_layers > 0 else None)

    ratios = {
        "layer_slim_over_base": layer["slim_over_base"],
        "layer_slim_over_lora128": layer["slim_over_lora128"],
        "mask_fast_speedup": masking["mask_fast_speedup"],
        "layer_ops_slim_over_lora128": ops["slim"] / ops["lora128"],
    }
    ratios["train_bf16_slim_over_lora_tokens_per_s"] = (train_bf16["slim"]["tokens_per_s"]
                                                         / train_bf16["lora"]["tokens_per_s"])
    if train_compiled is not None:  # informative, no target
        tc = {k: v["tokens_per_s"] for k, v in train_compiled.items()}
        ratios["train_compiled_slim_over_lora_tokens_per_s"] = tc["slim-compiled"] / tc["lora-compiled"]
        ratios["train_compiled_slim_speedup"] = tc["slim-compiled"] / tc["slim"]
        ratios["train_compiled_lora_speedup"] = tc["lora-compiled"] / tc["lora"]
    for prefix, ic in (("infer", infer_compiled), ("infer_wide", infer_wide_compiled)):
        if ic is None:  # compiled generation: informative, no target; the worse batch size, as the eager headline
            continue

        def worst(num: str, den: str, ic: dict = ic) -> float:
            return min(ic[num][f"batch{b}_tokens_per_s"] / ic[den][f"batch{b}_tokens_per_s"]
                       for b in margs.infer_batches)

        ratios[f"{prefix}_compiled_slim_over_base_tokens_per_s"] = worst("slim-compiled", "base-compiled")
        ratios[f"{prefix}_compiled_slim_over_lora_tokens_per_s"] = worst("slim-compiled", "lora-compiled")
        ratios[f"{prefix}_compiled_slim_over_eager_base_tokens_per_s"] = worst("slim-compiled", "base")
        ratios[f"{prefix}_compiled_slim_speedup"] = worst("slim-compiled", "slim")
        ratios[f"{prefix}_compiled_base_speedup"] = worst("base-compiled", "base")
    if "ops_per_step" in train["slim"]:
        ratios["train_ops_slim_over_lora"] = train["slim"]["ops_per_step"] / train["lora"]["ops_per_step"]
    if layer_bf16 is not None:
        ratios["layer_bf16_slim_over_base"] = layer_bf16["slim_over_base"]
        ratios["layer_bf16_slim_over_lora128"] = layer_bf16["slim_over_lora128"]
    for prefix, lay in (("layer", layer), ("layer_bf16", layer_bf16)):  # GPU: each dispatch forced
        for mode in ("dense", "sparse"):
            if lay is not None and f"slim_{mode}_over_base" in lay:
                ratios[f"{prefix}_slim_{mode}_over_base"] = lay[f"slim_{mode}_over_base"]
    for n in TRAIN_METHODS:
        if n != "lora":
            key = n.replace("-", "_")
            ratios[f"train_{key}_over_lora_tokens_per_s"] = train[n]["tokens_per_s"] / train["lora"]["tokens_per_s"]
            if "peak_mib" in train[n]:
                ratios[f"train_{key}_over_lora_peak_mem"] = train[n]["peak_mib"] / train["lora"]["peak_mib"]
    for prefix, inf in (("infer", infer), ("infer_wide", infer_wide)):
        if inf is None:
            continue
        for n in INFER_METHODS:
            if n == "base" or n not in inf:
                continue
            per_batch = [inf[n][f"batch{b}_tokens_per_s"] / inf["base"][f"batch{b}_tokens_per_s"]
                         for b in margs.infer_batches]
            for b, r in zip(margs.infer_batches, per_batch):
                ratios[f"{prefix}_{n.replace('-', '_')}_over_base_tokens_per_s_batch{b}"] = r
            # the worse batch size is the headline
            ratios[f"{prefix}_{n.replace('-', '_')}_over_base_tokens_per_s"] = min(per_batch)
    targets = {k: {"value": ratios[k], "bound": bound, "op": op,
                   "met": bool(ratios[k] <= bound if op == "<=" else ratios[k] >= bound)}
               for k, (bound, op) in TARGETS.items() if k in ratios}
    for k, spread in _round_spreads(layer, masking, train, infer, infer_wide, margs.infer_batches).items():
        if k in targets:
            targets[k]["rounds"] = spread
    result = {
        **ratios,
        "targets": targets,
        "layer_float32": layer, "masking": masking, "layer_ops": ops, "train": train, "train_bf16": train_bf16,
        **({"train_compiled": train_compiled} if train_compiled is not None else {}),
        "infer": infer,
        **({"infer_wide": infer_wide} if infer_wide is not None else {}),
        **({"infer_compiled": infer_compiled} if infer_compiled is not None else {}),
        **({"infer_wide_compiled": infer_wide_compiled} if infer_wide_compiled is not None else {}),
        "meta": {"quick": quick, "layer_shape": asdict(shape), "model": asdict(margs), "wide_shape": WIDE_SHAPE,
                 "threads": torch.get_num_threads(), "torch": torch.__version__,
                 "cpu": platform.processor() or platform.machine(), "device": device_name(dev),
                 "seconds": time.perf_counter() - t0},
    }
    if layer_bf16 is not None:
        result["layer_bfloat16"] = layer_bf16
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


def _round_spreads(layer: dict, masking: dict, train: dict, infer: dict, infer_wide: dict | None,
                   batches: tuple[int, ...]) -> dict[str, dict[str, float]]:
    """Per target ratio, its min / median / max over the timing rounds (``timing.round_ratios``): the two sides of a
    ratio ran in the same rounds, so the spread is what machine noise alone does to it. Generation: the batch size
    of the headline (the worse median ratio)."""
    lay, tr = layer["rounds_s"], {n: rec["step_rounds_s"] for n, rec in train.items()}
    out = {"layer_slim_over_base": round_ratios(lay["slim"], lay["base"]),
           "layer_slim_over_lora128": round_ratios(lay["slim"], lay["lora128"]),
           "mask_fast_speedup": round_ratios(masking["rounds_s"]["dare"], masking["rounds_s"]["fast"]),
           "train_slim_over_lora_tokens_per_s": round_ratios(tr["lora"], tr["slim"])}  # tokens/s: time inverted
    for prefix, inf in (("infer", infer), ("infer_wide", infer_wide)):
        if inf is not None:
            b = min(batches, key=lambda b: inf["base"][f"batch{b}_s"] / inf["slim"][f"batch{b}_s"])
            out[f"{prefix}_slim_over_base_tokens_per_s"] = round_ratios(inf["base"][f"batch{b}_rounds_s"],
                                                                        inf["slim"][f"batch{b}_rounds_s"])
    return out


def record_path(out_dir: Path, quick: bool, device: str = "cpu", stem: str = "speed") -> Path:
    """Where ``slim bench speed`` (stem "speed") and ``slim bench layer`` (stem "layer") write their records:
    OUT/STEM.json, OUT/STEM-quick.json for a quick run (a quick run never overwrites the full record),
    OUT/STEM-cuda.json (-quick) for a run on a GPU (nor a GPU run the CPU's)."""
    gpu = "-cuda" if torch.device(device).type == "cuda" else ""
    return out_dir / f"{stem}{gpu}{'-quick' if quick else ''}.json"


def print_speed_result(result: dict) -> None:
    """Every table of a ``run_speed_bench`` result: layer and masking, then training and generation."""
    print_layer_table({"shape": result["meta"]["layer_shape"], "threads": result["meta"]["threads"],
                       **{k: result[k] for k in ("layer_float32", "layer_bfloat16", "masking", "layer_ops")
                          if k in result}})
    print_speed_tables(result)


def print_speed_tables(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    gpu = result["meta"]["device"].startswith("cuda")
    peak = "torch.cuda peak allocation" if gpu else "RSS growth"
    t = Table(title=f"training step on the shipped base on {result['meta']['device']} (medians; peak = {peak} in "
                    "a fresh process)")
    for col in ("method", "trainable", "step s", "tokens/s", "/ lora", "peak MiB", "/ lora", "ops"):
        t.add_column(col, justify="right" if col != "method" else "left")
    tr = result["train"]
    for n, rec in tr.items():
        peak = rec.get("peak_mib")
        t.add_row(n, f"{rec['trainable_params']:,}", f"{rec['step_s']:.3f}", f"{rec['tokens_per_s']:.0f}",
                  f"{rec['tokens_per_s'] / tr['lora']['tokens_per_s']:.3f}",
                  "-" if peak is None else f"{peak:.1f}",
                  "-" if peak is None else f"{peak / tr['lora']['peak_mib']:.3f}", str(rec.get("ops_per_step", "-")))
    amp = result.get("train_bf16", {})
    for n, rec in amp.items():  # the same step under bf16 autocast, relative to LoRA under it
        t.add_row(f"{n} (bf16 autocast)", f"{rec['trainable_params']:,}", f"{rec['step_s']:.3f}",
                  f"{rec['tokens_per_s']:.0f}", f"{rec['tokens_per_s'] / amp['lora']['tokens_per_s']:.3f}", "-", "-",
                  "-")
    con.print(t)
    if "train_compiled" in result:
        tc = result["train_compiled"]
        t = Table(title="training step, eager and under torch.compile (timed round-robin; first 3 steps: compilation "
                        "included)")
        for col in ("method", "step s", "tokens/s", "/ lora (same mode)", "/ eager", "first 3 steps s"):
            t.add_column(col, justify="right" if col != "method" else "left")
        for k, rec in tc.items():
            n, compiled = k.removesuffix("-compiled"), k.endswith("-compiled")
            lora = tc["lora-compiled" if compiled else "lora"]["tokens_per_s"]
            t.add_row(f"{k} ({rec['backend']})" if compiled else k, f"{rec['step_s']:.3f}",
                      f"{rec['tokens_per_s']:.0f}", f"{rec['tokens_per_s'] / lora:.3f}",
                      f"{rec['tokens_per_s'] / tc[n]['tokens_per_s']:.3f}",
                      f"{rec['first_3_steps_s']:.1f}" if compiled else "-")
        con.print(t)
    batches = result["meta"]["model"]["infer_batches"]
    wide = f"{result['meta']['model']['wide_layers']} layers of TinyLlama-1.1B's shape"
    for key, what in (("infer", "the shipped base"), ("infer_wide", wide)):
        if key not in result:
            continue
        t = Table(title=f"greedy generation with the KV cache on {what} (tokens/s, medians)")
        t.add_column("method")
        for b in batches:
            t.add_column(f"batch {b}", justify="right")
            t.add_column("/ base", justify="right")
        inf = result[key]
        for n, rec in inf.items():
            row = [n]
            for b in batches:
                row += [f"{rec[f'batch{b}_tokens_per_s']:.0f}",
                        f"{rec[f'batch{b}_tokens_per_s'] / inf['base'][f'batch{b}_tokens_per_s']:.3f}"]
            t.add_row(*row)
        con.print(t)
    for key, what in (("infer_compiled", "the shipped base"), ("infer_wide_compiled", wide)):
        if key not in result:
            continue
        ic = result[key]
        cc = next(rec for k, rec in ic.items() if k.endswith("-compiled"))
        t = Table(title=f"greedy generation on {what}, eager (dynamic KV cache) and compiled ({cc['backend']}, mode "
                        f"{cc['mode']}, static KV cache, each decoding step compiled; timed round-robin; tokens/s, "
                        "medians; the first compiled calls' seconds are in the record)")
        t.add_column("method")
        for b in batches:
            for col in (f"batch {b}", "/ base", "/ eager"):
                t.add_column(col, justify="right")
        for k, rec in ic.items():
            n = k.removesuffix("-compiled")
            row, base = [k], ic[k.replace(n, "base", 1)]
            for b in batches:
                tps = rec[f"batch{b}_tokens_per_s"]
                row += [f"{tps:.0f}", f"{tps / base[f'batch{b}_tokens_per_s']:.3f}",
                        f"{tps / ic[n][f'batch{b}_tokens_per_s']:.3f}"]
            t.add_row(*row)
        con.print(t)
    t = Table(title="issue-6 targets (ratios of this run's medians; per round: the ratio within each timing round, "
                    "min - max)")
    for col in ("ratio", "value", "per round", "target", "met"):
        t.add_column(col)
    for k, v in result["targets"].items():
        spread = v.get("rounds")
        t.add_row(k, f"{v['value']:.3f}", "-" if spread is None else f"{spread['min']:.3f} - {spread['max']:.3f}",
                  f"{v['op']} {v['bound']}", "yes" if v["met"] else "no")
    con.print(t)
