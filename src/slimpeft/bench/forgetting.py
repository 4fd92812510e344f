"""The forgetting benchmark: how much each method learns of the downstream tasks and how much general ability it
keeps (the SLIM paper's Tables 1-2, in shape, on the shipped base model and its task suite).

    slim bench forgetting --profile quick|full [--out results/forgetting] [--methods slim,lora] [--dry-run]

Protocol (the same for every method):

* **MDS**: fine-tune on the mix of the downstream tasks; **SDS** (full profile): one downstream task at a time.
  Every downstream and every general task is evaluated after training; the base model's general accuracy is
  measured once (``base_general``) and retention = mean general accuracy after / before.
* **Budgets**: the MoE methods use 8 experts of rank 16 (the paper's sizes); LoRA and DoRA take the rank whose
  trainable parameters match SLIM's (``methods.lora_rank_for_budget``). All methods see the same steps, batch, data
  order (seed) and learning-rate grid (:data:`LR_GRID`; full fine-tuning has its own grid one decade lower, as is
  usual for updating every weight). The grid points are all recorded (``lr`` in each record) and traced on the
  Pareto plot; the tables use, per method, the grid point with the best mean downstream accuracy.
* **Seeds**: the seed sets initialisation, data order and masks; the task splits stay those of seed 0 (the split
  the shipped base model was pretrained against), so ``base_general`` is one number per task.
* **Ablations** of SLIM (:data:`ABLATIONS`) run in the MDS setting at SLIM's grid point.
* **SLIM variants** (:data:`SLIM_VARIANTS`, e.g. ``slim-single``: one LoRA expert of the mixture's whole rank) are
  measured as methods of their own: the whole learning-rate grid and every seed. ``slim-single-head`` also adapts
  the output head (:data:`HEAD_TARGETS`); ``lora-head`` and ``dora-head`` (:data:`BASELINE_VARIANTS`) adapt the
  same targets at its trainable budget, so that the head is compared with the head.

One JSON record per (method, setting, seed, lr) is written to ``OUT/records/`` as soon as it is measured (a
rerun skips records that exist, so an interrupted benchmark resumes), then ``OUT/summary.json`` (per method and
setting: means and stds over seeds) and ``OUT/pareto.png``.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import RECOMMENDED_ROUTING, SINGLE_EXPERT
from ..data.tasks import list_tasks

METHODS = ("slim", "slim-single", "slim-single-head", "lora", "lora-head", "dora", "dora-head", "mixlora",
           "mixlora-dy", "loramoe", "mola", "full")

# The SLIM configuration the benchmark measures as "slim": config.RECOMMENDED_ROUTING (every change to the paper's
# routing is an option of SlimConfig; the paper-faithful variant is the ablation row "paper").
SLIM_BENCH: dict[str, Any] = dict(RECOMMENDED_ROUTING)

# Other SLIM configurations measured like a method (own lr search, every seed): name -> overrides on top of SLIM_BENCH.
# Their records carry the variant's name as ``method``; they train with the registry's "slim".
# The MLP (every method's default targets on the Llama-shaped base) and the output head (``lm_head``): what the
# "-head" methods adapt. Full fine-tuning trains the head as well; the adapters of the other methods do not.
HEAD_TARGETS: list[str] = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "lm_head"]

SLIM_VARIANTS: dict[str, dict[str, Any]] = {
    "slim-single": dict(SINGLE_EXPERT),
    "slim-single-head": {**SINGLE_EXPERT, "target_modules": HEAD_TARGETS},
}

# Baselines on other targets: name -> (registry method, the SLIM variant whose targets and trainable budget it takes)
BASELINE_VARIANTS: dict[str, tuple[str, str]] = {
    "lora-head": ("lora", "slim-single-head"),
    "dora-head": ("dora", "slim-single-head"),
}


def registry_method(method: str) -> str:
    """The ``methods`` registry name a benchmark method trains with (a SLIM variant: "slim")."""
    if method in SLIM_VARIANTS:
        return "slim"
    return BASELINE_VARIANTS[method][0] if method in BASELINE_VARIANTS else method


# SLIM ablations: name -> overrides applied on top of SLIM_BENCH
ABLATIONS: dict[str, dict[str, Any]] = {
    # the paper-faithful routing (per-token raw distances, own layer, yield 1, fixed inference mask, plain router)
    "paper": {"ood_pooling": "token", "ood_score": "paper", "ood_source": "own", "yield_strength": 1.0,
              "spread_floor": 0.0, "inference_mask": "fixed", "router_lr_scale": 1.0},
    # the components issue 8 lists
    "no-identity": {"n_identity_experts": 0},
    "no-yield": {"yield_strength": 0.0},
    "no-mask": {"mask_mode": "none"},
    "mask-0.1": {"mask_rate": 0.1},
    "mask-0.4": {"mask_rate": 0.4},
    "mask-0.6": {"mask_rate": 0.6},
    "distance-rms": {"distance": "rms"},
    "mlp+attention": {"target_modules": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj",
                                         "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]},
    # the same total rank split differently; alpha = 2r as everywhere (the LoRA scale alpha / r stays 2)
    "experts-4": {"n_lora_experts": 4, "r": 32, "alpha": 64.0},
    "experts-16": {"n_lora_experts": 16, "r": 8, "alpha": 16.0},
    "no-l1": {"l1_weight": 0.0},
    # the routing recommended before the scoring pass: the running maximum of the layers run so far (layer 0 sees
    # only its own score), yield 8
    "carried-max": {"ood_source": "max", "yield_strength": 8.0},
    "yield-8": {"yield_strength": 8.0},
    "yield-128": {"yield_strength": 128.0},
    # the recommended threshold is 3 in-domain spreads per layer; 2 flagged 19 % of the training sequences (the routed
    # score is a maximum over all layers; `slim bench learning`)
    "threshold-2": {"threshold_std": 2.0},
    "threshold-4": {"threshold_std": 4.0},
    # the paper's router: as fast as the experts (recommended: x 0.1)
    "router-lr-1": {"router_lr_scale": 1.0},
    # identity experts reached by the yield alone (in-domain tokens never take an identity slot)
    "identity-gate-yield": {"identity_gate": "yield"},
    # MixLoRA's load balance, among the LoRA experts
    "balance-0.01": {"balance_coef": 0.01},
    "own-layer-score": {"ood_source": "own"},
    "causal": {"ood_pooling": "causal"},
    "token-calibrated": {"ood_pooling": "token", "ood_score": "calibrated", "ood_source": "own",
                         "yield_strength": 1.0},
    "no-spread-floor": {"spread_floor": 0.0},
    "inference-mask-fixed": {"inference_mask": "fixed"},
}

# The task split every run trains and is tested on, whatever its seed (the base was pretrained on split 0's
# general facts). Records written before this existed have no "split_seed": they trained on split = seed.
SPLIT_SEED = 0

LR_GRID: dict[str, tuple[float, ...]] = {"adapter": (2e-3, 5e-3, 1e-2), "full": (2e-4, 5e-4, 1e-3)}


@dataclass(frozen=True)
class Profile:
    """How much of the protocol to run."""

    name: str = field(metadata={"help": "profile name"})
    seeds: tuple[int, ...] = field(metadata={"help": "training seeds of the headline (MDS/SDS) runs"})
    steps: int = field(metadata={"help": "optimizer steps per run"})
    limit: int | None = field(metadata={"help": "test items per task (None = all)"})
    lr_points: tuple[int, ...] = field(metadata={"help": "indices into each LR_GRID entry searched"})
    sds: bool = field(metadata={"help": "also run each downstream task alone"})
    ablations: tuple[str, ...] = field(metadata={"help": "SLIM ablations (names of ABLATIONS)"})
    batch_size: int = field(default=16, metadata={"help": "sequences per step"})
    ablation_seeds: tuple[int, ...] | None = field(
        default=None, metadata={"help": "seeds of the ablation runs (None: the headline seeds)"})
    lr_search_seeds: tuple[int, ...] | None = field(
        default=None, metadata={"help": "seeds every grid point is run with; the chosen lr has the best downstream "
                                "mean over them (None: the first headline seed alone)"})
    methods: tuple[str, ...] = field(default=METHODS,
                                     metadata={"help": "methods run when none are named (--methods)"})

    @property
    def search_seeds(self) -> tuple[int, ...]:
        return self.lr_search_seeds if self.lr_search_seeds is not None else self.seeds[:1]


PROFILES: dict[str, Profile] = {
    # ~20 minutes on 2 CPU cores: one seed, the middle grid point, MDS only, the paper-faithful ablation
    # (without slim-single and dora-head, which slim-single-head and lora-head stand for there)
    "quick": Profile("quick", seeds=(0,), steps=250, limit=50, lr_points=(1,), sds=False, ablations=("paper",),
                     methods=tuple(m for m in METHODS if m not in ("slim-single", "dora-head"))),
    # quick's setting over the whole LR grid: the (downstream, retention) curve of each method, for the Pareto plot;
    # shares quick's records (same steps and test items), e.g. `--profile pareto --methods slim,lora`
    "pareto": Profile("pareto", seeds=(0,), steps=250, limit=50, lr_points=(0, 1, 2), sds=False, ablations=()),
    # pareto + seeds 1 and 2 at each method's chosen LR (mean +- std) + every ablation once (seed 0); shares the
    # records of quick and pareto; about 2 hours on 2 CPU cores from scratch
    "seeds": Profile("seeds", seeds=(0, 1, 2), steps=250, limit=50, lr_points=(0, 1, 2), sds=False,
                     ablations=tuple(ABLATIONS), ablation_seeds=(0,)),
    # SDS (one downstream task at a time) at each method's lr chosen by the MDS search, seed 0, in the folder of
    # quick/pareto/seeds: the eight methods and the head pair (slim-single-head, lora-head)
    "sds": Profile("sds", seeds=(0,), steps=250, limit=50, lr_points=(0, 1, 2), sds=True, ablations=(),
                   methods=("slim", "slim-single-head", "lora", "lora-head", "dora", "mixlora", "mixlora-dy",
                            "loramoe", "mola", "full")),
    # the real run: every grid point on the 3 seeds, the lr chosen on their mean
    "full": Profile("full", seeds=(0, 1, 2), steps=400, limit=None, lr_points=(0, 1, 2), sds=True,
                    ablations=tuple(ABLATIONS), lr_search_seeds=(0, 1, 2)),
}


@dataclass(frozen=True)
class RunSpec:
    """One training run of the benchmark."""

    method: str
    setting: str  # "mds", "sds/<task>" or "ablation/<name>"
    seed: int
    lr: float
    overrides: dict[str, Any]

    @property
    def data(self) -> str:
        return self.setting[len("sds/"):] if self.setting.startswith("sds/") else "downstream"

    @property
    def key(self) -> str:
        name = f"{self.method}__{self.setting}__seed{self.seed}__lr{self.lr:g}"
        return name.replace("/", "-")


def _grid(method: str, points: Sequence[int]) -> list[float]:
    grid = LR_GRID["full" if method == "full" else "adapter"]
    return [grid[i] for i in points]


def method_overrides(method: str, base_model: Any) -> dict[str, Any]:
    """The benchmark's configuration of ``method`` on ``base_model`` (LoRA/DoRA at SLIM's trainable budget)."""
    from .. import methods

    if method == "slim":
        return dict(SLIM_BENCH)
    if method in SLIM_VARIANTS:
        return {**SLIM_BENCH, **SLIM_VARIANTS[method]}
    if method in ("lora", "dora"):  # the MoE baselines keep their default sizes (8 experts of rank 16)
        return methods.budget_overrides(method, base_model, methods.make_config("slim", **SLIM_BENCH))
    if method in BASELINE_VARIANTS:  # the targets and trainable budget of the SLIM variant it is compared with
        base_method, variant = BASELINE_VARIANTS[method]
        slim = method_overrides(variant, base_model)
        # budget_overrides names the layers in full; the variant's own target list (the same layers, resolved by the
        # same rule) is what the records hold, so it replaces them
        return {**methods.budget_overrides(base_method, base_model, methods.make_config("slim", **slim)),
                "target_modules": list(slim["target_modules"])}
    return {}


def plan(profile: Profile, base_model: Any, methods_: Sequence[str] = METHODS,
         best_lr: dict[str, float] | None = None) -> list[RunSpec]:
    """Every run of ``profile``: the LR search (seed 0, MDS), then the other seeds, SDS and ablations at the chosen
    learning rate (``best_lr[method]``; the middle grid point of the profile until the search has run)."""
    unknown = [m for m in methods_ if m not in METHODS]
    if unknown:
        raise ValueError(f"--methods: unknown {unknown}; the benchmark's methods are {', '.join(METHODS)}")
    best_lr = best_lr or {}
    specs: list[RunSpec] = []
    for m in methods_:
        over = method_overrides(m, base_model)
        for lr in _grid(m, profile.lr_points):
            for seed in profile.search_seeds:
                specs.append(RunSpec(m, "mds", seed, lr, over))
        lr = best_lr.get(m, _grid(m, profile.lr_points)[len(profile.lr_points) // 2])
        for seed in profile.seeds:
            if seed not in profile.search_seeds:
                specs.append(RunSpec(m, "mds", seed, lr, over))
        if profile.sds:
            for task in list_tasks("downstream"):
                for seed in profile.seeds:
                    specs.append(RunSpec(m, f"sds/{task}", seed, lr, over))
    if "slim" in methods_:
        lr = best_lr.get("slim", _grid("slim", profile.lr_points)[len(profile.lr_points) // 2])
        for name in profile.ablations:
            if name not in ABLATIONS:
                raise ValueError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
            for seed in profile.seeds if profile.ablation_seeds is None else profile.ablation_seeds:
                specs.append(RunSpec("slim", f"ablation/{name}", seed, lr, {**SLIM_BENCH, **ABLATIONS[name]}))
    return specs


# ------------------------------------------------------------------------------------------------ one run
def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def base_general(base: str, limit: int | None, quantize: str = "") -> dict[str, float]:
    """General accuracy of the base model (test split of seed 0; ``quantize``: as quantized for the runs), measured
    once per benchmark."""
    from ..evaluation.multiple_choice import evaluate_task
    from ..training import load_base

    model, tok = load_base(base, quantize=quantize)
    model.eval()
    return {n: evaluate_task(model, tok, n, limit=limit, seed=0).accuracy for n in list_tasks("general")}


def ood_separation(model: Any, tokenizer: Any, limit: int | None) -> dict[str, Any]:
    """AUROC of the OOD score between held-out general (positive) and downstream inputs, at the routing level
    (per token or per sequence), per layer and its median; and the mean identity weight on each."""
    from ..report import routing_report, short_name

    report = routing_report(model, tokenizer, limit=limit or 100)
    level = "token" if model.slim_config.ood_pooling == "token" else "sequence"
    per_layer = {short_name(n): (r.auroc_token if level == "token" else r.auroc_sequence) for n, r in report.items()}
    return {
        "ood_auroc": statistics.median(per_layer.values()),
        "ood_auroc_level": level,
        "ood_auroc_layers": per_layer,
        "identity_weight_general": _mean([r.identity_weight_general for r in report.values()]),
        "identity_weight_downstream": _mean([r.identity_weight_downstream for r in report.values()]),
    }


def run_one(spec: RunSpec, profile: Profile, base: str, base_gen: dict[str, float],
            work_dir: Path, quantize: str = "") -> dict[str, Any]:
    """Train ``spec``, evaluate every task, return the record (the run directory is deleted afterwards)."""
    from ..evaluation.multiple_choice import evaluate_task
    from ..training import TrainArgs, load_run, train

    run_dir = work_dir / spec.key
    t0 = time.perf_counter()
    # every seed trains on the facts of the split it is tested on (split 0); the seed varies initialisation, data
    # order and masks only
    train(TrainArgs(base=base, method=registry_method(spec.method), data=spec.data, out=str(run_dir),
                    steps=profile.steps, batch_size=profile.batch_size, lr=spec.lr, seed=spec.seed,
                    split_seed=SPLIT_SEED, overrides=spec.overrides, save_steps=profile.steps, progress=False,
                    quantize=quantize, overwrite=True))  # a killed earlier attempt's run directory is this bench's own
    seconds = time.perf_counter() - t0
    model, tok, cfg = load_run(run_dir)
    acc = {n: evaluate_task(model, tok, n, limit=profile.limit, seed=0).accuracy for n in list_tasks()}
    general = {n: a for n, a in acc.items() if n.startswith("general/")}
    record: dict[str, Any] = {
        "method": spec.method, "setting": spec.setting, "seed": spec.seed, "split_seed": SPLIT_SEED, "lr": spec.lr,
        "steps": profile.steps,
        "limit": profile.limit, "profile": profile.name, "overrides": spec.overrides, "quantize": quantize,
        "downstream": {n: a for n, a in acc.items() if n.startswith("downstream/")},
        "general": general, "base_general": base_gen,
        "retention": _mean(list(general.values())) / _mean(list(base_gen.values())),
        "trainable_params": cfg["trainable_params"], "train_seconds": seconds,
    }
    record["downstream_avg"] = _mean(list(record["downstream"].values()))
    record["general_avg"] = _mean(list(general.values()))
    if registry_method(spec.method) == "slim" and model.slim_config.n_identity_experts > 0:
        record.update(ood_separation(model, tok, profile.limit))
    shutil.rmtree(run_dir, ignore_errors=True)
    return record


# ------------------------------------------------------------------------------------------------ summary
def summarize(records: Sequence[dict[str, Any]], best_lr: dict[str, float]) -> dict[str, Any]:
    """Per (method, setting) at the chosen learning rate: mean and std over seeds of every score (ablations too: a
    SLIM variant run at another learning rate, e.g. before the search, is left out rather than mixed in)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if math.isclose(r["lr"], best_lr.get(r["method"], r["lr"])):
            groups.setdefault((r["method"], r["setting"]), []).append(r)
    out: dict[str, Any] = {}
    for (method, setting), rs in sorted(groups.items()):
        def stat(get: Callable[[dict[str, Any]], float], rs: list[dict[str, Any]] = rs) -> dict[str, float]:
            xs = [get(r) for r in rs]
            return {"mean": _mean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}

        entry: dict[str, Any] = {
            "method": method, "setting": setting, "lr": rs[0]["lr"], "seeds": sorted(r["seed"] for r in rs),
            "downstream": {t: stat(lambda r, t=t: r["downstream"][t]) for t in rs[0]["downstream"]},
            "general": {t: stat(lambda r, t=t: r["general"][t]) for t in rs[0]["general"]},
            "downstream_avg": stat(lambda r: r["downstream_avg"]),
            "general_avg": stat(lambda r: r["general_avg"]),
            "retention": stat(lambda r: r["retention"]),
            "trainable_params": rs[0]["trainable_params"],
            "train_seconds": stat(lambda r: r["train_seconds"]),
        }
        if "ood_auroc" in rs[0]:
            entry["ood_auroc"] = stat(lambda r: r["ood_auroc"])
            entry["identity_weight_general"] = stat(lambda r: r["identity_weight_general"])
            entry["identity_weight_downstream"] = stat(lambda r: r["identity_weight_downstream"])
        out[f"{method}|{setting}"] = entry
    return {"best_lr": best_lr, "groups": out}


def choose_lr(records: Sequence[dict[str, Any]], seeds: Sequence[int] = (0,)) -> dict[str, float]:
    """Per method, the learning rate whose MDS runs on ``seeds`` have the best downstream average, averaged over
    those seeds (ties: the lower lr). A learning rate not yet run on every seed competes only when none is."""
    runs: dict[str, dict[float, dict[int, float]]] = {}
    for r in records:
        if r["setting"] == "mds" and r["seed"] in seeds:
            runs.setdefault(r["method"], {}).setdefault(r["lr"], {})[r["seed"]] = r["downstream_avg"]
    best = {}
    for method, by_lr in runs.items():
        complete = {lr: xs for lr, xs in by_lr.items() if set(xs) == set(seeds)}
        pool = complete or by_lr
        best[method] = max(sorted(pool), key=lambda lr: _mean(list(pool[lr].values())))  # ties: the first (lowest)
    return best


def plot_pareto(records: Sequence[dict[str, Any]], summary: dict[str, Any], path: Path) -> Path:
    """Downstream average vs retention: one point per method (mean over seeds, std as error bars) and, per method,
    the curve traced by its learning-rate grid (seed 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    colors = plt.get_cmap("tab20" if len(METHODS) > 10 else "tab10")
    seeds = summary.get("profile", {}).get("lr_search_seeds") or [0]
    for i, method in enumerate(METHODS):
        by_lr: dict[float, list[tuple[float, float]]] = {}
        for r in records:
            if r["method"] == method and r["setting"] == "mds" and r["seed"] in seeds:
                by_lr.setdefault(r["lr"], []).append((r["downstream_avg"], r["retention"]))
        grid = [(lr, _mean([p[0] for p in ps]), _mean([p[1] for p in ps])) for lr, ps in sorted(by_lr.items())]
        if not grid:
            continue
        c = colors(i % colors.N)
        if len(grid) > 1:
            ax.plot([g[1] for g in grid], [g[2] for g in grid], "--", marker=".", ms=5, color=c, alpha=0.5, lw=1)
        entry = summary["groups"].get(f"{method}|mds")
        if entry:
            x, y = entry["downstream_avg"], entry["retention"]
            ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], fmt="o", color=c, ms=7, capsize=3,
                        label=method)
    ax.set_xlabel("downstream accuracy (mean over tasks)")
    ax.set_ylabel("general retention (after / before)")
    ax.set_title("MDS: learn more (right), forget less (up)\npoints: mean ± std over seeds at the chosen lr; "
                 f"dashed: lr grid (mean over seeds {', '.join(map(str, seeds))}), low to high", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="forgetting benchmark (mean +- std over seeds)")
    for col in ("method", "setting", "lr", "downstream", "general", "retention", "ood auroc", "trainable", "train s"):
        t.add_column(col, justify="left" if col in ("method", "setting") else "right")
    pm = lambda s: f"{s['mean']:.3f}+-{s['std']:.3f}"  # noqa: E731
    for e in summary["groups"].values():
        t.add_row(e["method"], e["setting"], f"{e['lr']:g}", pm(e["downstream_avg"]), pm(e["general_avg"]),
                  pm(e["retention"]), pm(e["ood_auroc"]) if "ood_auroc" in e else "-", f"{e['trainable_params']:,d}",
                  f"{e['train_seconds']['mean']:.0f}")
    Console().print(t)


# ------------------------------------------------------------------------------------------------ driver
def _write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as sorted JSON through a temporary file and a rename (never a half-written record)."""
    from ..model import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2, sort_keys=True)))


def _base_kind(quantize: str) -> str:
    return f"quantized ({quantize})" if quantize else "in float32"


def load_records(out: Path) -> list[dict[str, Any]]:
    rec_dir = out / "records"
    records = []
    for p in sorted(rec_dir.glob("*.json")) if rec_dir.is_dir() else []:
        try:
            records.append(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{p}: not a valid benchmark record ({e}); delete it to measure it again") from e
    return records


def stale_records(existing: Sequence[dict[str, Any]], specs: Sequence[RunSpec], out: Path) -> None:
    """A record is reused only when it was measured with the configuration the run would use now: a record of the
    same (method, setting, seed, lr) with other overrides (e.g. measured before a default changed) is refused, with
    the differing fields named, instead of being reported as the new configuration's result."""
    want = {(s.method, s.setting, s.seed, s.lr): s for s in specs}
    problems = []
    for r in existing:
        s = want.get((r["method"], r["setting"], r["seed"], r["lr"]))
        if s is None:
            continue
        got, exp = json.loads(json.dumps(r.get("overrides", {}))), json.loads(json.dumps(s.overrides))
        diff = [f"{k} recorded {got.get(k)!r}, now {exp.get(k)!r}"
                for k in sorted(set(got) | set(exp)) if got.get(k) != exp.get(k)]
        split = r.get("split_seed", r["seed"])
        if split != SPLIT_SEED:
            diff.append(f"trained on task split {split}, tested on split {SPLIT_SEED}")
        if diff:
            problems.append(f"{out / 'records' / (s.key + '.json')}: " + ", ".join(diff))
    if problems:
        raise ValueError(f"{out}: {len(problems)} record(s) were measured with another configuration than this run "
                         "would use; move them out of records/ (or choose another --out) to measure them again:\n  "
                         + "\n  ".join(problems[:10]) + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10
                                                         else ""))


def run_benchmark(profile: str | Profile = "quick", base: str = "assets/base", out: str | Path = "results/forgetting",
                  methods_: Sequence[str] | None = None, dry_run: bool = False,
                  log: Callable[[str], None] = print, quantize: str = "") -> dict[str, Any]:
    """Run (or resume) the benchmark; returns the summary. ``methods_`` None: the profile's methods. ``dry_run``
    only lists the planned runs. ``quantize`` (nf4, fp4, int8): every run on the base quantized by bitsandbytes
    (full fine-tuning, which cannot train quantized weights, left out); a folder holds one setting only."""
    from ..training import load_base

    if isinstance(profile, str) and profile not in PROFILES:
        raise ValueError(f"--profile {profile!r}: unknown; choose from {', '.join(PROFILES)}")
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    methods_ = prof.methods if methods_ is None else methods_
    if quantize and "full" in methods_:
        log(f"--quantize {quantize}: full fine-tuning cannot train quantized weights; left out")
        methods_ = tuple(m for m in methods_ if m != "full")
    out = Path(out)
    base_model, _ = load_base(base, quantize=quantize)
    search = [s for s in plan(prof, base_model, methods_) if s.setting == "mds" and s.seed in prof.search_seeds]
    if dry_run:
        for s in plan(prof, base_model, methods_):
            log(f"{s.key}  data={s.data}  overrides={json.dumps(s.overrides, sort_keys=True)}")
        return {}
    existing = load_records(out)
    alien = [r for r in existing if (r.get("steps"), r.get("limit")) != (prof.steps, prof.limit)]
    if alien:
        r = alien[0]
        raise ValueError(f"{out}: holds records measured with {r.get('steps')} steps and {r.get('limit')} test items "
                         f"per task (profile {r.get('profile')!r}, e.g. {r['method']} {r['setting']}); profile "
                         f"{prof.name!r} uses {prof.steps} and {prof.limit}: choose another --out")
    other_base = [r for r in existing if (r.get("quantize") or "") != quantize]
    if other_base:
        r = other_base[0]
        raise ValueError(f"{out}: holds records measured on the base {_base_kind(r.get('quantize') or '')} (e.g. "
                         f"{r['method']} {r['setting']}); this run is on the base {_base_kind(quantize)}: choose "
                         "another --out")
    stale_records(existing, plan(prof, base_model, methods_, choose_lr(existing, prof.search_seeds)), out)
    done = {(r["method"], r["setting"], r["seed"], r["lr"]) for r in existing}
    base_path = out / (f"base_general-{quantize}.json" if quantize else "base_general.json")
    if base_path.is_file():
        base_gen = json.loads(base_path.read_text())
    else:
        base_gen = base_general(base, prof.limit, quantize)
        _write_json(base_path, base_gen)
    work = Path(tempfile.mkdtemp(prefix="slim-forgetting-"))
    try:
        def execute(specs: Sequence[RunSpec]) -> None:
            for s in specs:
                if (s.method, s.setting, s.seed, s.lr) in done:
                    continue
                log(f"[{time.strftime('%H:%M:%S')}] {s.key}")
                rec = run_one(s, prof, base, base_gen, work, quantize)
                _write_json(out / "records" / f"{s.key}.json", rec)
                done.add((s.method, s.setting, s.seed, s.lr))
                log(f"    downstream {rec['downstream_avg']:.3f}  retention {rec['retention']:.3f}  "
                    f"{rec['train_seconds']:.0f} s" + (f"  ood_auroc {rec['ood_auroc']:.3f}" if "ood_auroc" in rec
                                                       else ""))

        execute(search)  # phase 1: the learning-rate search (seed 0, MDS)
        best_lr = choose_lr(load_records(out), prof.search_seeds)
        execute([s for s in plan(prof, base_model, methods_, best_lr) if s not in search])  # phase 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # the summary covers every record in the folder: a run of some methods adds to it, never drops the others
    records = [r for r in load_records(out) if r["method"] in METHODS]
    best_lr = choose_lr(records, prof.search_seeds)
    summary = summarize(records, best_lr)
    summary["profile"] = asdict(prof)
    _write_json(out / "summary.json", summary)
    plot_pareto(records, summary, out / "pareto.png")
    print_summary(summary)
    return summary
