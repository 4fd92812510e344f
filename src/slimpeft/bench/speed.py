"""Speed benchmarks, measured side by side in one run (ratios, never absolute targets in tests).

* layer:   forward + backward of one adapted linear layer at a realistic shape (d_in 2048, d_out 5632, 2048
           tokens): frozen base, SLIM (8 x r16, top-2, 2 identity experts), PEFT LoRA of rank 8 x 16 = 128, and the
           per-linear MoE baselines on the same expert engine (LoRAMoE: dense over 8 x r16; MoLA: top-2 of 8 x r16).
* masking: fast row/column masking vs exact DARE masking of ``B A`` for one r=16 expert at 4096 x 11008
           (the physical floor of their ratio is i*o / (r (i + o)) ~ 186).

Run: ``python -m slimpeft.bench layer [--quick] [--json]``.
"""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import SlimConfig
from ..layer import SlimLinear
from ..masking import apply_fast_masks, dare_delta, dare_mask, fast_masks
from ..methods.config import LoraMoeConfig, MolaConfig
from ..methods.loramoe import LoraMoeLinear
from ..methods.mola import MolaLinear
from .timing import interleaved_medians


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


def layer_benchmark(shape: LayerShape, *, dtype: torch.dtype = torch.float32, reps: int = 5,
                    config: SlimConfig | None = None) -> dict[str, float]:
    """Median seconds of forward+backward per layer kind, timed round-robin, plus the ratios to the base."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = config or SlimConfig()
    base = nn.Linear(shape.d_in, shape.d_out).to(dtype).requires_grad_(False)
    slim = SlimLinear(base, cfg, "bench").train()
    with torch.no_grad():
        slim.experts.lora_B.normal_(0.0, 0.01)  # a trained-looking adapter, not the zero init
    rank = cfg.n_lora_experts * cfg.r
    holder = _Holder(nn.Linear(shape.d_in, shape.d_out).to(dtype))
    holder.lin.load_state_dict(base.state_dict())
    lora = get_peft_model(holder, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["lin"])).train()
    lora_layer = lora.base_model.model.lin
    loramoe = LoraMoeLinear(base, "bench", LoraMoeConfig(n_experts=cfg.n_lora_experts, r=cfg.r)).train()
    mola = MolaLinear(base, "bench", MolaConfig(r=cfg.r), n_experts=cfg.n_lora_experts).train()
    for m in (loramoe, mola):
        with torch.no_grad():
            m.experts.lora_B.normal_(0.0, 0.01)
    x = torch.randn(shape.n_tokens, shape.d_in, dtype=dtype, requires_grad=True)
    g = torch.randn(shape.n_tokens, shape.d_out, dtype=dtype)
    t = interleaved_medians({"base": _fwd_bwd(base, x, g), "slim": _fwd_bwd(slim, x, g),
                             f"lora{rank}": _fwd_bwd(lora_layer, x, g), "loramoe": _fwd_bwd(loramoe, x, g),
                             "mola_top2": _fwd_bwd(mola, x, g)}, reps=reps)
    return {**{f"{k}_s": v for k, v in t.items()},
            "slim_over_base": t["slim"] / t["base"], f"slim_over_lora{rank}": t["slim"] / t[f"lora{rank}"],
            f"lora{rank}_over_base": t[f"lora{rank}"] / t["base"], "loramoe_over_base": t["loramoe"] / t["base"],
            "mola_top2_over_base": t["mola_top2"] / t["base"]}


def masking_benchmark(d_in: int = 4096, d_out: int = 11008, r: int = 16, p: float = 0.2, reps: int = 5
                      ) -> dict[str, float]:
    """Seconds to draw and apply one mask to one expert: fast (rows of B, columns of A) vs exact DARE on B A."""
    torch.manual_seed(0)
    A, B = torch.randn(1, r, d_in), torch.randn(1, d_out, r)

    def fast() -> None:
        col, row = fast_masks(1, d_in, d_out, p)
        apply_fast_masks(A, B, col, row)

    def dare() -> None:
        dare_delta(A, B, dare_mask(1, d_in, d_out, p))

    t = interleaved_medians({"fast": fast, "dare": dare}, reps=reps)
    return {"mask_fast_s": t["fast"], "mask_dare_s": t["dare"], "mask_fast_speedup": t["dare"] / t["fast"],
            "mask_floor_ratio": d_in * d_out / (r * (d_in + d_out))}


def run_layer_bench(quick: bool = False, out: Path | None = None) -> dict:
    shape = LayerShape(n_tokens=512) if quick else LayerShape()
    reps = 3 if quick else 7
    result = {
        "shape": asdict(shape), "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(), "quick": quick,
        "layer_float32": layer_benchmark(shape, reps=reps),
        "masking": masking_benchmark(reps=reps),
    }
    if not quick:
        result["layer_bfloat16"] = layer_benchmark(shape, dtype=torch.bfloat16, reps=reps)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True))
    return result


def print_layer_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SLIM layer speed ({result['shape']}, {result['threads']} threads, medians)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for section in ("layer_float32", "layer_bfloat16", "masking"):
        for k, v in result.get(section, {}).items():
            table.add_row(f"{section}.{k}", f"{v:.4f}" if k.endswith("_s") else f"{v:.3f}")
    Console().print(table)
