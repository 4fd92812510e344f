"""Where does SLIM's learning go? Training loss of SLIM variants next to LoRA and MixLoRA, side by side.

    slim bench learning [--variants slim,lora,...] [--steps 250] [--lr 5e-3] [--seed 0] [--out results/learning]

The forgetting benchmark's downstream accuracy is measured on 50 questions per task, so one run's average moves by
about 0.04 from noise alone; the training loss on the same data, steps, learning rate and seed is a far steadier
measure of how much a configuration learns. Each variant trains exactly as one run of ``slim bench forgetting``
(MDS data, split 0, batch 16, cosine schedule) and records:

* ``final_loss``: the mean logged training loss over the last 50 steps (the curve is kept too);
* ``flagged_train`` (SLIM with identity experts and a yield): the share of the training sequences that the trained
  model's routing sends to the identity experts in at least one layer (eval mode, after training) -- data that
  teaches the adapters nothing while it is flagged (unless ``yield_in_training`` is off: then it is trained on and
  yielded at inference only).

Results go to ``OUT/learning.json`` (one entry per variant, written after each; a rerun skips variants already
measured with the same configuration) and the curves to ``OUT/learning.png``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .forgetting import SPLIT_SEED, _write_json, method_overrides, registry_method

# name -> (benchmark method, overrides on top of the forgetting benchmark's configuration of that method)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {}),
    "mixlora": ("mixlora", {}),
    "slim": ("slim", {}),
    "slim-single": ("slim-single", {}),
    # the single expert with the paper's dynamic-merging mask; with the yield in training (the paper)
    "slim-single/mask": ("slim-single", {"mask_mode": "fast"}),
    "slim-single/yield-in-training": ("slim-single", {"yield_in_training": True}),
    # the paper-sized mixture without the mask, identity experts through the yield alone
    "slim/no-mask+identity-gate-yield": ("slim", {"mask_mode": "none", "identity_gate": "yield"}),
    # the recommended routing before the fix of 2026-11-25: threshold 2 per layer, the paper's router speed
    "slim/stop-12": ("slim", {"threshold_std": 2.0, "router_lr_scale": 1.0}),
    "slim/threshold-2": ("slim", {"threshold_std": 2.0}),
    "slim/router-lr-1": ("slim", {"router_lr_scale": 1.0}),
    "slim/no-yield": ("slim", {"yield_strength": 0.0}),
    "slim/identity-gate-yield": ("slim", {"identity_gate": "yield"}),
    "slim/no-mask": ("slim", {"mask_mode": "none"}),
    "slim/no-identity": ("slim", {"n_identity_experts": 0}),
    "slim/no-identity+no-mask": ("slim", {"n_identity_experts": 0, "mask_mode": "none"}),
    # a router 10^4 times slower than the experts: the top-2 stays (almost) the initial random assignment
    "slim/no-identity+no-mask+router-lr-1e-4": ("slim", {"n_identity_experts": 0, "mask_mode": "none",
                                                         "router_lr_scale": 1e-4}),
}
LAST_STEPS = 50  # final_loss: mean logged loss over the last LAST_STEPS steps


def variant_config(name: str, base_model: Any) -> tuple[str, dict[str, Any]]:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {', '.join(VARIANTS)}")
    method, extra = VARIANTS[name]
    return method, {**method_overrides(method, base_model), **extra}


def flagged_share(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int = 32) -> float | None:
    """Share of ``examples`` (training texts) routed to the identity experts by the yield (d > 0) in at least one
    adapted layer, in eval mode; None for a model without yielding."""
    import torch

    from ..training import PadCollator, SupervisedDataset, TrainArgs

    cfg = getattr(model, "slim_config", None)
    if cfg is None or cfg.n_identity_experts == 0 or cfg.yield_strength == 0:
        return None
    ds = SupervisedDataset(list(examples), tokenizer, TrainArgs.max_length)  # the sequences training saw
    collate = PadCollator(tokenizer.pad_token_id)
    flags = []
    for start in range(0, len(ds), batch_size):
        batch = collate([ds[i] for i in range(start, min(start + batch_size, len(ds)))])
        recs = model.routing_records(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        n_seq = batch["input_ids"].shape[0]
        hit = torch.zeros(n_seq, dtype=torch.bool)
        for rec in recs.values():
            if rec:  # (tokens,) d and the sequence of each real token: count the flagged tokens per sequence
                hit |= torch.zeros(n_seq).index_add_(0, rec["seq"], (rec["d"] > 0).float()) > 0
        flags.append(hit)
    return float(torch.cat(flags).float().mean())


def run_variant(name: str, method: str, overrides: dict[str, Any], *, base: str, steps: int, lr: float, seed: int,
                work: Path) -> dict[str, Any]:
    from ..training import TrainArgs, load_run, train, training_examples

    run_dir = work / name.replace("/", "-")
    t0 = time.perf_counter()
    train(TrainArgs(base=base, method=registry_method(method), data="downstream", out=str(run_dir), steps=steps,
                    lr=lr, seed=seed, split_seed=SPLIT_SEED, overrides=overrides, save_steps=steps,
                    logging_steps=min(10, steps), progress=False, overwrite=True))  # this bench's own folder
    seconds = time.perf_counter() - t0
    history = json.loads((run_dir / "train_log.json").read_text())  # the Trainer's log history, written by train()
    losses = [(h["step"], float(h["loss"])) for h in history if "loss" in h]
    last = [loss for step, loss in losses if step > steps - LAST_STEPS] or [losses[-1][1]]
    model, tok, _ = load_run(run_dir)
    examples, _ = training_examples("downstream", seed=SPLIT_SEED)
    record = {"variant": name, "method": method, "overrides": overrides, "steps": steps, "lr": lr, "seed": seed,
              "split_seed": SPLIT_SEED, "final_loss": statistics.fmean(last), "curve": losses,
              "train_seconds": seconds, "flagged_train": flagged_share(model, tok, examples)}
    shutil.rmtree(run_dir, ignore_errors=True)
    return record


def plot(results: dict[str, dict[str, Any]], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, r in results.items():
        steps, losses = zip(*r["curve"], strict=True)
        ax.plot(steps, losses, label=f"{name} ({r['final_loss']:.2f})", lw=2 if "/" not in name else 1,
                ls="-" if "/" not in name else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss on the downstream mix (same data, steps, lr, seed)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(variants: Sequence[str] | None = None, *, base: str = "assets/base", steps: int = 250, lr: float = 5e-3,
        seed: int = 0, out: str | Path = "results/learning", log: Callable[[str], None] = print
        ) -> dict[str, dict[str, Any]]:
    """Measure ``variants`` (default: all) and return {variant: record}; resumes from ``OUT/learning.json``."""
    from ..training import load_base

    names = list(variants or VARIANTS)
    base_model = load_base(base)[0]
    configs = {n: variant_config(n, base_model) for n in names}  # unknown names fail before anything runs
    out = Path(out)
    path = out / "learning.json"
    results: dict[str, dict[str, Any]] = {}
    if path.is_file():
        try:
            results = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid results file ({e}); move it away to measure again") from e
    work = Path(tempfile.mkdtemp(prefix="slim-learning-"))
    try:
        for n, (method, overrides) in configs.items():
            old = results.get(n)
            if old and json.loads(json.dumps(old["overrides"])) == json.loads(json.dumps(overrides)) and \
                    (old["steps"], old["lr"], old["seed"]) == (steps, lr, seed):
                continue
            log(f"[{time.strftime('%H:%M:%S')}] {n}")
            results[n] = run_variant(n, method, overrides, base=base, steps=steps, lr=lr, seed=seed, work=work)
            r = results[n]
            log(f"    final loss {r['final_loss']:.3f}"
                + (f"  flagged training sequences {r['flagged_train']:.3f}" if r["flagged_train"] is not None
                   else ""))
            _write_json(path, results)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    shown = {n: results[n] for n in names}
    plot(shown, out / "learning.png")
    print_table(shown)
    return shown


def print_table(results: dict[str, dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="training loss on the downstream mix (mean of the last 50 steps)")
    for col in ("variant", "final loss", "flagged training seqs", "train s"):
        t.add_column(col, justify="left" if col == "variant" else "right")
    for n, r in results.items():
        flagged = "-" if r["flagged_train"] is None else f"{r['flagged_train']:.3f}"
        t.add_row(n, f"{r['final_loss']:.3f}", flagged, f"{r['train_seconds']:.0f}")
    Console().print(t)
