"""SlimConfig: every knob of a SLIM adapter, validated.

SLIM (Han et al., "SLIM: Let LLM Learn More and Forget Less with Soft LoRA and Identity Mixture",
NAACL 2025, arXiv 2410.07739) mixes LoRA experts with parameter-free identity experts in every adapted
linear layer. Field names are part of the public contract and are stored verbatim in
``adapter_config.json``.

Defaults and why:

* ``n_lora_experts=8, n_identity_experts=2, top_k=2``: the paper's setting.
* ``r=16, alpha=32``: rank 16 per expert is the paper's MoE comparison (8 x r16 ~ LoRA r128); alpha = 2r is
  the common LoRA scale.
* ``target_modules=None``: the MLP projections of the model family (the paper adapts the MLP; adapting
  attention raised forgetting in its ablation).
* ``n_clusters=16``: more clusters separated general from downstream inputs slightly better than 4 in a
  measured tiny setting (FINDINGS.md); 16 keeps the cost negligible.
* ``cluster_momentum=0.95``: centres follow the data within a few dozen steps, short runs included.
* ``ood_score="calibrated"``: a fixed threshold of 1 (the paper's literal form, ``"paper"``) flags nearly every
  in-domain token, which turns yielding against the data the adapters must learn; the threshold is instead the
  running in-domain mean + ``threshold_std`` standard deviations of the score.
* ``mask_rate=0.2``: DARE drop rate of the dynamic merging, inside the paper's ablation range; the fast
  row/column implementation (``mask_mode="fast"``) is the paper's.
* ``l1_weight=1e-3``: the L1 term is a *mean* absolute weight per expert (size-normalised), so it is O(1e-2);
  1e-3 keeps it a mild prior next to a cross-entropy of O(1).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, get_args, get_type_hints

from .modules_to_save import validate_modules_to_save

Distance = Literal["max", "rms"]
MaskMode = Literal["fast", "dare", "none"]
InferenceMask = Literal["fixed", "none"]
OodScore = Literal["paper", "calibrated", "standardized"]
OodPooling = Literal["token", "sequence", "causal"]
OodSource = Literal["own", "first", "max", "prepass"]
IdentityGate = Literal["router", "yield"]


# The routing this project measured to tell general from downstream inputs apart best on its shipped base, and to
# learn the downstream data (BENCHMARKS.md sections 2 and 4): a scoring pass through the frozen base first, each
# layer's standardized score pooled over the sequence, every layer routing on the maximum over all layers, and a
# yield strong enough to send a flagged sequence to the identity experts outright. Threshold 3 (not 2): the routed
# score is a maximum over every adapted layer, and 2 in-domain spreads per layer flagged 19 % of the training
# sequences (which then teach the adapters nothing) where 3 flags 5 %. Router learning rate x 0.1: a router as
# fast as the experts reshuffles the top-2 every step (final training loss 4.45 -> 4.03; `slim bench learning`).
# `SlimConfig(**RECOMMENDED_ROUTING)`; `make demo` and `slim bench forgetting` use it. The defaults stay the paper's.
RECOMMENDED_ROUTING: dict[str, Any] = {"ood_pooling": "sequence", "ood_score": "standardized",
                                      "ood_source": "prepass", "yield_strength": 32.0, "threshold_std": 3.0,
                                      "router_lr_scale": 0.1}

# SLIM with one LoRA expert holding the whole rank of the paper's 8 x r16 mixture (the same trainable budget), the
# identity experts reached through the yield alone, the yield acting at inference only and no dynamic-merging mask:
# every training token trains the whole adapter; at inference, inputs the clusters flag get the frozen base.
# Measured on the shipped base (BENCHMARKS.md section 4, `slim bench learning`): the paper-sized mixture trained with
# the mask fits the downstream data far less than LoRA (final training loss 4.03 vs 2.70: the mask costs 0.6 nats,
# eight top-2 experts of rank 16 instead of one of rank 128 0.4, the yield in training 0.36; this reaches 2.67) while
# retention comes from the identity experts and the yield at inference, which this keeps. (With one LoRA expert the
# router's rows get no gradient: the yield alone decides.) Use on top of RECOMMENDED_ROUTING:
# `SlimConfig(**RECOMMENDED_ROUTING, **SINGLE_EXPERT)`; scale r (alpha = 2r) with the budget you want.
SINGLE_EXPERT: dict[str, Any] = {"n_lora_experts": 1, "r": 128, "alpha": 256.0, "identity_gate": "yield",
                                 "mask_mode": "none", "yield_in_training": False}

# Named starting points (`slim train --preset NAME`; explicit overrides apply on top): the paper's defaults, the
# recommended routing, the recommended routing with one LoRA expert, and that expert on the output head as well
# (the forgetting benchmark's slim-single-head).
PRESETS: dict[str, dict[str, Any]] = {"paper": {}, "recommended": dict(RECOMMENDED_ROUTING),
                                      "single": {**RECOMMENDED_ROUTING, **SINGLE_EXPERT},
                                      "single-head": {**RECOMMENDED_ROUTING, **SINGLE_EXPERT,
                                                      "adapt_output_head": True}}


@dataclass
class SlimConfig:
    """Configuration of a SLIM adapter (Soft LoRA + Identity Mixture). See the module docstring for defaults."""

    r: int = field(default=16, metadata={"help": "Rank of every LoRA expert."})
    alpha: float = field(default=32.0, metadata={"help": "LoRA scale numerator: the delta is scaled by alpha / r."})
    n_lora_experts: int = field(default=8, metadata={"help": "Number of LoRA experts per adapted layer."})
    n_identity_experts: int = field(
        default=2, metadata={"help": "Number of parameter-free identity experts (zero delta) per adapted layer."}
    )
    top_k: int = field(default=2, metadata={"help": "Experts kept per token after yielding; softmax over those."})
    target_modules: str | list[str] | None = field(
        default=None,
        metadata={
            "help": "Layers to adapt: a string is a regex that must fullmatch the module name; a list holds exact "
            "names or dotted suffixes. None: the MLP projections of the model family."
        },
    )
    adapt_output_head: bool = field(
        default=False,
        metadata={"help": "Also adapt the model's output head (get_output_embeddings(), e.g. lm_head), whatever "
                  "target_modules says. With ood_source='prepass' the head routes on the other layers' score (it sees "
                  "one position per sequence under logits_to_keep, so it scores nothing itself)."},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Modules besides the adapted layers to train in full and save with the adapter (PEFT's "
                  "modules_to_save), e.g. ['score'] or ['classifier']: a sequence classifier's new head, which a "
                  "frozen base would leave random. Exact names or dotted suffixes; each gets a trainable copy, the "
                  "original stays for disable_adapter()."},
    )
    n_clusters: int = field(default=16, metadata={"help": "Sliding-clustering centres per adapted layer."})
    cluster_momentum: float = field(
        default=0.95, metadata={"help": "EMA momentum m of the sliding clusters: c <- m c + (1 - m) batch mean."}
    )
    distance: Distance = field(
        default="max",
        metadata={"help": "Aggregate of per-channel z-scores to the nearest centre: 'max' (paper) or 'rms'."},
    )
    ood_score: OodScore = field(
        default="calibrated",
        metadata={
            "help": "Out-of-domain score d. 'paper': max(0, agg - 1). 'calibrated': max(0, agg - (mu_k + "
            "threshold_std sd_k)) with running in-domain statistics of cluster k. 'standardized': the same "
            "in units of the in-domain spread, max(0, (agg - mu_k) / sd_k - threshold_std), so yield_strength "
            "has a meaningful scale."
        },
    )
    threshold_std: float = field(
        default=2.0, metadata={"help": "Threshold of the calibrated/standardized score, in in-domain std units."}
    )
    spread_floor: float = field(
        default=0.1,
        metadata={"help": "Floor of every cluster's spread, as a fraction of the layer's mean spread (channel "
                  "variances and aggregate-score variances alike): var_k <- max(var_k, spread_floor * mean_k var). "
                  "A cluster fitted on near-constant tokens (e.g. the first position, whose activations barely vary) "
                  "otherwise has ~0 variance and scores every other token thousands of spreads away. 0 = off "
                  "(the paper's literal form)."},
    )
    ood_pooling: OodPooling = field(
        default="token",
        metadata={
            "help": "Level at which d routes: 'token' (paper), 'sequence' (mean over each sequence's real "
            "tokens), or 'causal' (mean over the prefix up to each token; usable for generation)."
        },
    )
    ood_source: OodSource = field(
        default="own",
        metadata={"help": "'own': each layer uses its own clusters' score; 'first': every layer uses the score "
                  "of the first adapted layer that runs; 'max': each layer uses the maximum of its own score and "
                  "the scores of the adapted layers that ran before it in the same forward pass (an input flagged "
                  "out-of-domain once stays on the identity experts in every later layer); 'prepass': a scoring "
                  "pass through the frozen base (adapters off, no gradient) runs first, every layer scores the "
                  "base's hidden states on its clusters (and, in training, updates them there), and every layer "
                  "then routes on the maximum over all layers, the first included. Costs one base forward more "
                  "per call (generation: the prompt only; new tokens keep the prompt's score). Needs a pooled "
                  "ood_pooling."},
    )
    yield_strength: float = field(
        default=1.0,
        metadata={"help": "gamma of weight yielding: identity logits are raised by gamma * d(x) before top-K."},
    )
    yield_in_training: bool = field(
        default=True,
        metadata={"help": "Apply the yield in training too (paper). False: every training token reaches the LoRA "
                  "experts (the clusters still fit and the score is still computed); the yield acts at inference "
                  "only. The training data is in-domain by definition, and a training sequence the clusters flag "
                  "would otherwise teach the adapters nothing."},
    )
    merged_inference: bool = field(
        default=False,
        metadata={"help": "Inference only (eval mode, no gradient), for one LoRA expert with identity_gate='yield' "
                  "and ood_source='prepass': a call whose sequences the scoring pass flags none of runs each "
                  "adapted layer as one matmul with a cached merged weight W + (alpha/r) B A (the base model's "
                  "cost; the same output up to float rounding); in a flagged call, a layer where every token's "
                  "yield beats the LoRA expert's router logit (with n_identity_experts >= top_k) returns the base "
                  "output, exactly; other calls take the routed path. Costs one extra copy of every adapted weight "
                  "in memory while the model is used for inference."},
    )
    identity_gate: IdentityGate = field(
        default="router",
        metadata={"help": "How identity experts enter the top-K. 'router' (paper): their router logits plus "
                  "gamma * d(x), so in-domain tokens may take an identity slot too (which halves their adapter "
                  "weight). 'yield': their logit is gamma * d(x) where that is > 0 and -inf elsewhere (the router's "
                  "identity rows are not used): in-domain tokens always route to LoRA experts, out-of-domain ones "
                  "to the identity experts by the yield alone."},
    )
    mask_rate: float = field(default=0.2, metadata={"help": "DARE drop rate p of dynamic merging, in [0, 1)."})
    mask_mode: MaskMode = field(
        default="fast",
        metadata={"help": "'fast': drop rows of B and columns of A (paper); 'dare': exact element-wise mask of "
                  "B A (reference, slow); 'none': no masking."},
    )
    mask_rescale: bool = field(default=True, metadata={"help": "Rescale kept entries by 1 / (1 - p) (DARE)."})
    inference_mask: InferenceMask = field(
        default="none",
        metadata={"help": "Eval-mode masking: 'none' (the unmasked adapters, which the rescaled training masks "
                  "equal in expectation) or 'fixed' (one mask per expert from the stored seed). A fixed mask is one "
                  "draw: it shifts every token's activations the same way, which moved in-domain inputs ~3 "
                  "in-domain spreads out of their clusters and flagged 73 % of downstream test inputs as "
                  "out-of-domain in a measured run (BENCHMARKS.md section 2)."},
    )
    l1_weight: float = field(
        default=1e-3, metadata={"help": "lambda of the size-normalised L1 penalty on A and B, added in training."}
    )
    balance_coef: float = field(
        default=0.0,
        metadata={"help": "c of a load-balance loss c * N * sum_i f_i P_i among the LoRA experts (identity slots "
                  "excluded), added in training as MixLoRA's. 0 = off (the paper names none)."},
    )
    router_init_std: float = field(
        default=0.02,
        metadata={"help": "Std of the router's random init: small, non-zero, so no dead start of the experts."},
    )
    router_lr_scale: float = field(
        default=1.0,
        metadata={"help": "Learning-rate multiplier of the router, built into its parameterization so that it holds "
                  "with any trainer and optimizer: the stored router V gives logits router_lr_scale * V x (V starts "
                  "at router_init_std / router_lr_scale, so the initial logits are unchanged). Under Adam-type "
                  "optimizers (per-parameter normalised steps) V moves as fast as before, so the logits move "
                  "router_lr_scale times as fast; under plain SGD the factor is router_lr_scale squared. 1 = the "
                  "paper's plain router."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of adapter initialisation and of the fixed inference masks."})

    def __post_init__(self) -> None:
        errors = self.validate()
        if errors:
            raise ValueError("invalid SlimConfig:\n  " + "\n  ".join(errors))

    def validate(self) -> list[str]:
        """Return every problem of this config at once (empty when valid)."""
        errs: list[str] = []
        hints = get_type_hints(SlimConfig)
        for f in fields(self):
            allowed = get_args(hints[f.name])
            if allowed and all(isinstance(a, str) for a in allowed) and getattr(self, f.name) not in allowed:
                errs.append(f"`{f.name}`={getattr(self, f.name)!r}; allowed: {', '.join(map(repr, allowed))}")

        def _int(name: str, lo: int) -> None:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                errs.append(f"`{name}`={v!r} must be an integer >= {lo}")
            elif v < lo:
                errs.append(f"`{name}`={v} must be >= {lo}")

        _int("r", 1)
        _int("n_lora_experts", 1)
        _int("n_identity_experts", 0)
        _int("top_k", 1)
        _int("n_clusters", 1)
        _int("seed", 0)
        n_experts = self.n_experts if not errs else None
        if n_experts is not None and self.top_k > n_experts:
            errs.append(
                f"`top_k`={self.top_k} exceeds the number of experts "
                f"(n_lora_experts + n_identity_experts = {n_experts}); allowed: 1..{n_experts}"
            )
        for name, lo, hi, hi_open in (
            ("mask_rate", 0.0, 1.0, True),
            ("cluster_momentum", 0.0, 1.0, True),
        ):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not (lo <= v < hi if hi_open else v <= hi):
                errs.append(f"`{name}`={v!r} must lie in [{lo}, {hi})")
        for name in ("alpha", "yield_strength", "l1_weight", "balance_coef", "router_init_std",
                     "threshold_std", "spread_floor"):
            v = getattr(self, name)
            try:
                ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) and v >= 0
            except OverflowError:  # an int beyond the float range (JSON allows any size): alpha / r would overflow
                ok = False
            if not ok:
                errs.append(f"`{name}`={v!r} must be a finite number >= 0")
        v = self.router_lr_scale
        try:  # an int beyond the float range passes `v < inf` but overflows where the router is scaled
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < float(v) < math.inf
        except OverflowError:
            ok = False
        if not ok:
            errs.append(f"`router_lr_scale`={v!r} must be a finite number > 0")
        if self.ood_source == "prepass" and self.ood_pooling == "token":
            errs.append("`ood_source`='prepass' needs `ood_pooling` 'sequence' or 'causal' (tokens generated with a "
                        "KV cache keep the prompt's score; a per-token score would need the base model's own cache)")
        if self.merged_inference is True and (self.n_lora_experts != 1 or self.identity_gate != "yield"
                                              or self.ood_source != "prepass"):
            errs.append(f"`merged_inference`=True needs n_lora_experts=1, identity_gate='yield' and "
                        f"ood_source='prepass' (got {self.n_lora_experts}, {self.identity_gate!r}, "
                        f"{self.ood_source!r}): only then is an unflagged token's output base + B A x")
        for name in ("mask_rescale", "yield_in_training", "adapt_output_head", "merged_inference"):
            if not isinstance(getattr(self, name), bool):
                errs.append(f"`{name}`={getattr(self, name)!r} must be true or false")
        errs += validate_modules_to_save(self.modules_to_save)
        tm = self.target_modules
        if tm is not None and not isinstance(tm, str):
            if not isinstance(tm, (list, tuple)) or not tm or not all(isinstance(t, str) and t for t in tm):
                errs.append(f"`target_modules`={tm!r} must be a regex string, a non-empty list of names, or None")
        return errs

    @property
    def n_experts(self) -> int:
        return self.n_lora_experts + self.n_identity_experts

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("target_modules", "modules_to_save"):
            if isinstance(d[name], tuple):
                d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "config") -> SlimConfig:
        """Build from a dict, rejecting unknown fields with the list of known ones."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            raise ValueError(f"{where}: unknown SlimConfig field(s) {unknown}; known fields: {sorted(known)}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        except TypeError as e:  # pragma: no cover - defensive: wrong arity etc.
            raise ValueError(f"{where}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
