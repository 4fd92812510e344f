"""How well SLIM's out-of-domain score tells general from downstream inputs, per configuration.

The score depends only on the sliding clusters, and the clusters only on the inputs seen in training mode, not on
the gradient steps: so each configuration is fitted by forward passes over the downstream training data (as
training would do), then scored on held-out general (positive) and downstream (negative) test inputs. The AUROC
is reported per layer, per token and per sequence, and at the level the configuration routes at.

    python -m slimpeft.bench separation [--base assets/base] [--batches 40] [--out results/separation.json]
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from ..config import SlimConfig
from ..model import get_slim_model
from ..report import routing_report, short_name
from ..training import PadCollator, SupervisedDataset, load_base, training_examples

# name -> SlimConfig overrides; "paper" is the literal per-token form
VARIANTS: dict[str, dict[str, Any]] = {
    "paper (token, max, tau=1, no floor)": {"ood_score": "paper", "spread_floor": 0.0},
    "calibrated token max": {},
    "calibrated token rms": {"distance": "rms"},
    "standardized sequence max, no floor": {"ood_score": "standardized", "ood_pooling": "sequence",
                                            "spread_floor": 0.0},
    "standardized sequence max": {"ood_score": "standardized", "ood_pooling": "sequence"},
    "standardized sequence max, carried max": {"ood_score": "standardized", "ood_pooling": "sequence",
                                               "ood_source": "max"},
    "standardized sequence rms": {"ood_score": "standardized", "ood_pooling": "sequence", "distance": "rms"},
    "standardized sequence max, 64 clusters": {"ood_score": "standardized", "ood_pooling": "sequence",
                                               "n_clusters": 64},
    "standardized causal max, carried max": {"ood_score": "standardized", "ood_pooling": "causal",
                                             "ood_source": "max"},
    "standardized sequence max, scoring pass (recommended)": {"ood_score": "standardized", "ood_pooling": "sequence",
                                                              "ood_source": "prepass"},
}


@torch.no_grad()
def fit_clusters(model, tokenizer, data: str = "downstream", batches: int = 40, batch_size: int = 16,
                 seed: int = 0) -> None:
    """Forward passes in training mode over the training data: the clusters slide exactly as in training."""
    examples, _ = training_examples(data, seed=seed)
    ds = SupervisedDataset(examples, tokenizer, 128)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(ds), generator=g)[: batches * batch_size].tolist()
    collate = PadCollator(tokenizer.pad_token_id)
    model.train()
    for start in range(0, len(order), batch_size):
        batch = collate([ds[i] for i in order[start:start + batch_size]])
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    model.eval()


def separation(base: str = "assets/base", variants: dict[str, dict[str, Any]] | None = None, batches: int = 40,
               limit: int = 100) -> dict[str, Any]:
    out = {}
    for name, overrides in (variants or VARIANTS).items():
        t0 = time.perf_counter()
        model, tok = load_base(base)
        cfg = SlimConfig(**overrides)
        slim = get_slim_model(model, cfg)
        fit_clusters(slim, tok, batches=batches)
        report = routing_report(slim, tok, limit=limit)
        tok_auc = [r.auroc_token for r in report.values()]
        seq_auc = [r.auroc_sequence for r in report.values()]
        routing = seq_auc if cfg.ood_pooling == "sequence" else tok_auc
        out[name] = {
            "overrides": overrides,
            "auroc_routing_best": max(routing), "auroc_routing_median": float(torch.tensor(routing).median()),
            "auroc_token_best": max(tok_auc), "auroc_sequence_best": max(seq_auc),
            "best_layer": short_name(list(report)[routing.index(max(routing))]),
            "flagged_general_first": next(iter(report.values())).flagged_general,
            "flagged_downstream_first": next(iter(report.values())).flagged_downstream,
            "flagged_general_mean": sum(r.flagged_general for r in report.values()) / len(report),
            "flagged_downstream_mean": sum(r.flagged_downstream for r in report.values()) / len(report),
            "per_layer": {k: {"auroc_token": v.auroc_token, "auroc_sequence": v.auroc_sequence} for k, v in
                          report.items()},
            "seconds": time.perf_counter() - t0,
        }
    return out


def print_separation(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="AUROC of the OOD score, general (positive) vs downstream (negative) held-out inputs")
    for col in ("variant", "routing best", "routing median", "token best", "sequence best", "best layer",
                "flagged G / D (first layer)", "flagged G / D (mean over layers)"):
        t.add_column(col, justify="left" if col in ("variant", "best layer") else "right")
    for name, r in result.items():
        t.add_row(name, f"{r['auroc_routing_best']:.3f}", f"{r['auroc_routing_median']:.3f}",
                  f"{r['auroc_token_best']:.3f}", f"{r['auroc_sequence_best']:.3f}", r["best_layer"],
                  f"{r['flagged_general_first']:.2f} / {r['flagged_downstream_first']:.2f}",
                  f"{r['flagged_general_mean']:.2f} / {r['flagged_downstream_mean']:.2f}")
    Console().print(t)


def run(base: str, batches: int, limit: int, out: Path | None) -> dict[str, Any]:
    result = separation(base, batches=batches, limit=limit)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2, sort_keys=True))
    print_separation(result)
    return result
