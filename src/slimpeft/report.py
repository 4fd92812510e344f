"""Reports over a trained run: accuracy before/after with retention, and the per-layer routing report.

* :func:`compare_accuracy` -- every task scored for the base and the tuned model side by side; retention =
  mean general accuracy after / before.
* :func:`routing_report` -- per adapted layer: identity weight on general vs downstream inputs, expert load,
  out-of-domain scores, and how well the score separates the two (AUROC, per token and per sequence).

The MoE-LoRA baselines (MixLoRA, MixLoRA-Dy, LoRAMoE, MoLA) route too, but have no identity experts and no
out-of-domain score: their reports carry the expert load, identity weight 0 (there is nothing to route to), and
``None`` (null in JSON, "-" in tables, grey in plots) for the OOD score, the flagged share and the AUROCs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data.tasks import build_task, format_training_text, list_tasks
from .evaluation.multiple_choice import evaluate_task


# --------------------------------------------------------------------------------------------- accuracy
def compare_accuracy(model: Any, tokenizer: Any, tasks: list[str] | None = None, *, base_model: Any = None,
                     limit: int | None = None, seed: int = 0, batch_size: int = 32) -> dict[str, Any]:
    """Accuracy per task for the tuned model and the base model (``base_model``, or the tuned model with its
    adapters disabled), and retention."""
    names = tasks or list_tasks()

    def score(m: Any) -> dict[str, float]:
        return {n: evaluate_task(m, tokenizer, n, limit=limit, seed=seed, batch_size=batch_size).accuracy
                for n in names}

    tuned = score(model)
    if base_model is not None:
        base = score(base_model)
    else:
        with model.disable_adapter():
            base = score(model)
    return summarize(tuned, base)


def summarize(tuned: dict[str, float], base: dict[str, float]) -> dict[str, Any]:
    """Means over the general and the downstream tasks and retention (general after / before); a mean over no task
    (``--tasks`` chose none of that kind) and a retention without general tasks are None (null in JSON)."""
    gen = [n for n in tuned if n.startswith("general/")]
    down = [n for n in tuned if n.startswith("downstream/")]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    g_after, g_before = mean([tuned[n] for n in gen]), mean([base[n] for n in gen])
    return {"tuned": tuned, "base": base, "general_after": g_after, "general_before": g_before,
            "downstream_after": mean([tuned[n] for n in down]), "downstream_before": mean([base[n] for n in down]),
            "retention": g_after / g_before if g_after is not None and g_before else None}


def print_accuracy_table(summary: dict[str, Any], title: str = "accuracy") -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for col in ("task", "base", "tuned", "change"):
        t.add_column(col, justify="left" if col == "task" else "right")
    for n, after in summary["tuned"].items():
        before = summary["base"][n]
        t.add_row(n, _fmt(before, ".3f"), _fmt(after, ".3f"), _fmt(after - before, "+.3f"))
    if summary["general_after"] is not None:
        t.add_row("general (mean)", _fmt(summary["general_before"], ".3f"), _fmt(summary["general_after"], ".3f"),
                  f"retention {_fmt(summary['retention'], '.3f')}")
    if summary["downstream_after"] is not None:
        t.add_row("downstream (mean)", _fmt(summary["downstream_before"], ".3f"),
                  _fmt(summary["downstream_after"], ".3f"),
                  _fmt(summary["downstream_after"] - summary["downstream_before"], "+.3f"))
    Console().print(t)


# --------------------------------------------------------------------------------------------- routing
def auroc(pos: torch.Tensor, neg: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties counting 1/2 (Mann-Whitney U with average ranks)."""
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    scores = torch.cat([pos, neg]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=torch.double)
    # average ranks over ties
    uniq, inverse, counts = scores.unique(return_inverse=True, return_counts=True)
    sums = torch.zeros(uniq.numel(), dtype=torch.double).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = pos.numel(), neg.numel()
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


@dataclass
class LayerRouting:
    """Routing of one layer on general (G) vs downstream (D) inputs.

    The OOD measures (``ood_*``, ``flagged_*``, ``auroc_*``) are ``None`` for a method without an OOD score (the MoE
    baselines); their identity weights are 0 (no identity experts)."""

    identity_weight_general: float
    identity_weight_downstream: float
    ood_general: float | None
    ood_downstream: float | None
    flagged_general: float | None
    flagged_downstream: float | None
    auroc_token: float | None
    auroc_sequence: float | None
    expert_load: list[float] = field(default_factory=list)


def _is_slim(rec: dict[str, torch.Tensor]) -> bool:
    """Whether collected records carry SLIM's identity weights and OOD scores (the MoE baselines' carry only expert
    slots and routing weights)."""
    return "identity_weight" in rec


def _collect(model: Any, tokenizer: Any, texts: list[str], batch_size: int) -> dict[str, dict[str, torch.Tensor]]:
    layers = model.adapter_layers() if hasattr(model, "adapter_layers") else {}
    acc: dict[str, dict[str, list[torch.Tensor]]] = {}
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True)
        recs = model.routing_records(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        for name, rec in recs.items():
            if not rec:
                continue
            if not _is_slim(rec):
                # a MoE baseline: slot counts (n, e) and, as load, what varies between experts -- the slots for
                # top-k / top-p routing, the routing weight for dense routing (LoRAMoE), as its routing_stats
                b = acc.setdefault(name, {"slots": [], "load": []})
                b["slots"].append(rec["slots"])
                dense = getattr(layers.get(name), "dense_routing", False)
                b["load"].append(rec["weight"] if dense else rec["slots"])
                continue
            a = acc.setdefault(name, {"identity_weight": [], "slots": [], "d": [], "u": [], "seq_u": []})
            for k in ("identity_weight", "slots", "d"):
                a[k].append(rec[k])
            u = rec.get("u", rec["d"])
            a["u"].append(u)
            seq = rec["seq"]
            n_seq = int(seq.max()) + 1
            sums = torch.zeros(n_seq).index_add_(0, seq, u)
            counts = torch.zeros(n_seq).index_add_(0, seq, torch.ones_like(u))
            a["seq_u"].append(sums / counts.clamp_min(1))
    return {name: {k: torch.cat(v) for k, v in a.items()} for name, a in acc.items()}


def collect_by_task(model: Any, tokenizer: Any, *, limit: int = 100, seed: int = 0, batch_size: int = 32
                    ) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
    """task -> adapted layer -> routing records over the task's first ``limit`` test items (one pass per task; both
    reports below are computed from it)."""
    if not hasattr(model, "routing_records"):
        raise ValueError(f"{type(model).__name__} has no routing to report (plain LoRA/DoRA/full fine-tuning)")
    return {n: _collect(model, tokenizer, [format_training_text(ex) for ex in build_task(n, seed=seed).test[:limit]],
                        batch_size) for n in list_tasks("general") + list_tasks("downstream")}


def _merge(per: dict[str, dict[str, dict[str, torch.Tensor]]], kind: str) -> dict[str, dict[str, torch.Tensor]]:
    names = [n for n in list_tasks(kind) if n in per]
    return {layer: {k: torch.cat([per[n][layer][k] for n in names]) for k in per[names[0]][layer]}
            for layer in per[names[0]]}


def routing_report(model: Any, tokenizer: Any, *, limit: int = 100, seed: int = 0, batch_size: int = 32,
                   collected: dict[str, dict[str, dict[str, torch.Tensor]]] | None = None) -> dict[str, LayerRouting]:
    """Per-layer routing on held-out general vs downstream inputs (test items of the task suite); ``collected``:
    the output of :func:`collect_by_task`, when the caller has it already."""
    per = collected if collected is not None else collect_by_task(model, tokenizer, limit=limit, seed=seed,
                                                                  batch_size=batch_size)
    g, d = _merge(per, "general"), _merge(per, "downstream")
    out = {}
    for name in g:
        G, D = g[name], d[name]
        if not _is_slim(G):  # a MoE baseline: expert load only, no identity experts, no OOD score
            load = G["load"].sum(0) + D["load"].sum(0)
            out[name] = LayerRouting(
                identity_weight_general=0.0, identity_weight_downstream=0.0, ood_general=None, ood_downstream=None,
                flagged_general=None, flagged_downstream=None, auroc_token=None, auroc_sequence=None,
                expert_load=(load / load.sum().clamp_min(1e-12)).tolist(),
            )
            continue
        slots = G["slots"].sum(0) + D["slots"].sum(0)
        out[name] = LayerRouting(
            identity_weight_general=float(G["identity_weight"].mean()),
            identity_weight_downstream=float(D["identity_weight"].mean()),
            ood_general=float(G["d"].mean()), ood_downstream=float(D["d"].mean()),
            flagged_general=float((G["d"] > 0).float().mean()), flagged_downstream=float((D["d"] > 0).float().mean()),
            auroc_token=auroc(G["u"], D["u"]), auroc_sequence=auroc(G["seq_u"], D["seq_u"]),
            expert_load=(slots / slots.sum().clamp_min(1)).tolist(),
        )
    return out


@dataclass
class TaskRouting:
    """How one adapted layer routes the test inputs of one task."""

    identity_weight: float  # mean weight on identity experts over the task's real tokens (0: a MoE baseline)
    flagged: float | None  # share of tokens with d > 0 (at the routing level: whole sequences when pooling)
    auroc_vs_downstream: float | None  # sequence-mean score of this task (positive) vs every downstream task's
    # (negative); flagged and AUROC are None for a method without an OOD score (the MoE baselines)


def routing_by_task(model: Any, tokenizer: Any, *, limit: int = 100, seed: int = 0, batch_size: int = 32,
                    collected: dict[str, dict[str, dict[str, torch.Tensor]]] | None = None
                    ) -> dict[str, dict[str, TaskRouting]]:
    """task -> adapted layer -> routing of that task's test inputs: which general tasks are told apart from the
    downstream data, in which layer, and how much identity weight they get (where a routed adapter still leaks)."""
    per = collected if collected is not None else collect_by_task(model, tokenizer, limit=limit, seed=seed,
                                                                  batch_size=batch_size)
    down = {layer: r["seq_u"] for layer, r in _merge(per, "downstream").items() if _is_slim(r)}

    def one(layer: str, r: dict[str, torch.Tensor]) -> TaskRouting:
        if not _is_slim(r):  # a MoE baseline: no identity experts, no OOD score
            return TaskRouting(identity_weight=0.0, flagged=None, auroc_vs_downstream=None)
        return TaskRouting(identity_weight=float(r["identity_weight"].mean()),
                           flagged=float((r["d"] > 0).float().mean()),
                           auroc_vs_downstream=auroc(r["seq_u"], down[layer]))

    return {n: {layer: one(layer, r) for layer, r in recs.items()} for n, recs in per.items()}


def _fmt(x: float | None, spec: str) -> str:
    """A table cell: "-" for a measure the method does not have."""
    return "-" if x is None else format(x, spec)


NOT_DEFINED = ("-: not defined for this method (a MoE baseline has no identity experts and no out-of-domain score; "
               "its identity weight is 0)")


def print_task_routing_table(report: dict[str, dict[str, TaskRouting]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="routing per task: identity weight / flagged share / sequence AUROC vs downstream")
    t.add_column("layer")
    tasks = list(report)
    for n in tasks:
        t.add_column(n.split("/", 1)[-1], justify="right")
    for layer in report[tasks[0]] if tasks else {}:
        cells = (report[n][layer] for n in tasks)
        t.add_row(short_name(layer), *(f"{r.identity_weight:.2f}/{_fmt(r.flagged, '.2f')}/"
                                       f"{_fmt(r.auroc_vs_downstream, '.2f')}" for r in cells))
    if any(r.flagged is None or r.auroc_vs_downstream is None for layers in report.values() for r in layers.values()):
        t.caption = NOT_DEFINED
    Console().print(t)


def short_name(name: str) -> str:
    """'model.layers.3.mlp.up_proj' -> 'L3.up_proj' (tables and plots)."""
    return re.sub(r"^.*?(?:layers|layer|h)\.(\d+)\.(?:mlp\.)?", r"L\1.", name)


def print_routing_table(report: dict[str, LayerRouting]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="routing: general (G) vs downstream (D) inputs")
    for col in ("layer", "id-weight G", "id-weight D", "d G", "d D", "flagged G", "flagged D", "AUROC tok",
                "AUROC seq", "max load"):
        t.add_column(col, justify="left" if col == "layer" else "right")
    for name, r in report.items():
        t.add_row(short_name(name), f"{r.identity_weight_general:.3f}", f"{r.identity_weight_downstream:.3f}",
                  _fmt(r.ood_general, ".3f"), _fmt(r.ood_downstream, ".3f"), _fmt(r.flagged_general, ".2f"),
                  _fmt(r.flagged_downstream, ".2f"), _fmt(r.auroc_token, ".3f"), _fmt(r.auroc_sequence, ".3f"),
                  _fmt(max(r.expert_load) if r.expert_load else None, ".2f"))
    if any(None in (r.ood_general, r.ood_downstream, r.flagged_general, r.flagged_downstream, r.auroc_token,
                    r.auroc_sequence) for r in report.values()):
        t.caption = NOT_DEFINED
    Console().print(t)


def plot_routing(report: dict[str, LayerRouting], path: Path) -> Path:
    """Heatmaps: per-layer routing measures, and expert load per layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not names:  # nothing routed: an empty figure that says so, rather than a crash
        fig, ax = plt.subplots(figsize=(6, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no routed layer in the report", ha="center", va="center")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        return path
    short = [short_name(n) for n in names]
    cols = ["id-weight G", "id-weight D", "AUROC tok", "AUROC seq"]
    nan = float("nan")
    m = torch.tensor([[nan if v is None else v for v in (r.identity_weight_general, r.identity_weight_downstream,
                                                         r.auroc_token, r.auroc_sequence)]
                      for r in report.values()])
    width = max(1, *(len(r.expert_load) for r in report.values()))
    load = torch.tensor([r.expert_load + [nan] * (width - len(r.expert_load)) for r in report.values()])
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")  # grey: a measure the method lacks
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.35 * len(names) + 2))
    for ax, data, xlabels, title in ((axes[0], m, cols, "routing by input kind"),
                                     (axes[1], load, [f"e{i}" for i in range(load.shape[1])], "expert load")):
        im = ax.imshow(data.numpy(), aspect="auto", cmap=cmap, vmin=0, vmax=1)
        ax.set_yticks(range(len(short)), short, fontsize=7)
        ax.set_xticks(range(len(xlabels)), xlabels, rotation=45, fontsize=7)
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    if any(r.auroc_token is None or r.auroc_sequence is None for r in report.values()):
        axes[0].set_title("routing by input kind (grey: not defined for this method)")
    if any(len(r.expert_load) < width for r in report.values()):  # MoLA: fewer experts in the lower layers
        axes[1].set_title("expert load (grey: no such expert in this layer)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
