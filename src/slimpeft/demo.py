"""``make demo``: the main job on the shipped base model, end to end, in a few minutes on a CPU.

Fine-tunes ``assets/base`` on the mix of downstream tasks with plain LoRA on the MLP (the same trainable budget as
SLIM), with SLIM (the paper's 8 x r16 mixture on the MLP, recommended routing), with slim-single-head (one LoRA expert
of rank 128 on the MLP and the output head, preset ``single-head``) and with LoRA on those same layers at that budget
(lora-head); evaluates each before and after on every general and downstream task, prints the table (downstream
accuracy, general accuracy, retention, trainable parameters, time) and writes a plot.

    python -m slimpeft.demo [--steps 300] [--limit 100] [--out runs/demo] [--quantize nf4]

``--quantize``: the same on the base quantized by bitsandbytes (QLoRA); "before" is then the quantized base.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from .config import PRESETS, RECOMMENDED_ROUTING
from .data.tasks import list_tasks
from .report import compare_accuracy
from .training import TrainArgs, load_base, load_run, train

# The SLIM variant the demo runs: config.RECOMMENDED_ROUTING (a scoring pass through the frozen base, the
# sequence-pooled standardized score, every layer routing on the maximum over all layers, strong yield): the variant
# that kept the most general ability in the forgetting benchmark (BENCHMARKS.md section 4). The per-token default is
# `slim train` with no --set.
SLIM_DEMO = dict(RECOMMENDED_ROUTING)
# slim-single-head: the same routing with one LoRA expert of the mixture's whole rank on the MLP and the output head,
# identity experts through the yield, the yield at inference only, no mask (preset "single-head"; the forgetting
# benchmark's slim-single-head, which learned as much as LoRA on the same layers and kept what SLIM keeps)
SLIM_SINGLE_HEAD_DEMO = dict(PRESETS["single-head"])


def run_demo(base: str = "assets/base", out: str = "runs/demo", steps: int = 400, limit: int | None = 100,
             lr: float = 5e-3, seed: int = 0, quantize: str = "") -> dict:
    from . import methods

    base_model, _ = load_base(base, quantize=quantize)
    def lora_at(slim: dict) -> dict:  # LoRA on SLIM's layers at SLIM's trainable budget
        return methods.budget_overrides("lora", base_model, methods.make_config("slim", **slim))

    plan = {"lora": ("lora", lora_at(SLIM_DEMO)), "slim": ("slim", SLIM_DEMO),
            "lora-head": ("lora", lora_at(SLIM_SINGLE_HEAD_DEMO)),
            "slim-single-head": ("slim", SLIM_SINGLE_HEAD_DEMO)}
    rows = {}
    for name, (method, overrides) in plan.items():
        t0 = time.perf_counter()
        run_dir = train(TrainArgs(base=base, method=method, data="downstream", out=f"{out}/{name}", steps=steps,
                                  lr=lr, seed=seed, overrides=overrides, save_steps=steps, quantize=quantize,
                                  overwrite=True))  # the demo's own folder: a rerun replaces it
        seconds = time.perf_counter() - t0
        model, tok, cfg = load_run(run_dir)
        fresh_base, _ = load_base(base, quantize=quantize)
        summary = compare_accuracy(model, tok, list_tasks(), base_model=fresh_base.eval(), limit=limit)
        rows[name] = {**summary, "trainable_params": cfg["trainable_params"], "train_seconds": seconds,
                        "overrides": overrides}
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "demo.json").write_text(json.dumps(rows, indent=2, sort_keys=True))
    print_demo_table(rows, quantize)
    plot_demo(rows, Path(out) / "demo.png")
    return rows


def print_demo_table(rows: dict, quantize: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="fine-tuned on the downstream mix: learning vs forgetting"
              + (f" (base quantized: {quantize})" if quantize else ""))
    for col in ("method", "downstream before", "downstream after", "general before", "general after", "retention",
                "trainable", "train s"):
        t.add_column(col, justify="left" if col == "method" else "right")
    for m, r in rows.items():
        t.add_row(m, f"{r['downstream_before']:.3f}", f"{r['downstream_after']:.3f}", f"{r['general_before']:.3f}",
                  f"{r['general_after']:.3f}", f"{r['retention']:.3f}", f"{r['trainable_params']:,d}",
                  f"{r['train_seconds']:.0f}")
    Console().print(t)


def plot_demo(rows: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for m, r in rows.items():
        ax.scatter(r["downstream_after"], r["retention"], s=60, label=m)
        ax.annotate(m, (r["downstream_after"], r["retention"]), textcoords="offset points", xytext=(5, 5))
    ax.set_xlabel("downstream accuracy (mean)")
    ax.set_ylabel("general retention (after / before)")
    ax.set_title("learn more (right), forget less (up)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m slimpeft.demo", description=__doc__.split("\n")[0])
    ap.add_argument("--base", default="assets/base", help="base model folder")
    ap.add_argument("--out", default="runs/demo", help="output folder")
    ap.add_argument("--steps", type=int, default=400, help="training steps per method")
    ap.add_argument("--limit", type=int, default=100, help="test items per task (0 = all)")
    ap.add_argument("--lr", type=float, default=5e-3, help="learning rate (every method)")
    ap.add_argument("--quantize", default="", choices=["", "nf4", "fp4", "int8"],
                    help="QLoRA: the base quantized by bitsandbytes (needs slimpeft[quant])")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    run_demo(a.base, a.out, a.steps, a.limit or None, a.lr, quantize=a.quantize)


if __name__ == "__main__":
    main()
