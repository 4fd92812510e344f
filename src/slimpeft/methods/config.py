"""Configurations of the baseline methods, validated the same way as SlimConfig.

Defaults follow the SLIM paper's comparison (Tables 1-2): MoE-LoRA methods use 8 experts of rank 16 (alpha = 2r),
LoRA and DoRA use rank 128 (alpha = 256): the same 2r ratio as SLIM's default, and about the trainable budget of
8 x rank 16. Every field can be overridden through ``methods.build(name, model, **overrides)``; an unknown name or
an invalid value raises ValueError naming the field and what is allowed.

Validation is driven by each field's metadata: ``kind`` (int, number, bool, targets, modules, schedule,
sample_type) and ``min`` (the least allowed value; numbers are finite).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar

from ..modules_to_save import validate_modules_to_save


def _f(default: Any, help: str, kind: str, lo: float | None = None, **kw: Any) -> Any:
    meta = {"help": help, "kind": kind}
    if lo is not None:
        meta["min"] = lo
    if "default_factory" in kw:
        return field(default_factory=kw["default_factory"], metadata=meta)
    return field(default=default, metadata=meta)


_MODULES_TO_SAVE_HELP = ("Modules besides the adapted layers to train in full and save with the adapter (PEFT's "
                         "modules_to_save), e.g. ['score'] for a sequence classifier's new head: exact names or "
                         "dotted suffixes.")
_TARGETS_HELP = ("Layers to adapt: a string is a regex that must fullmatch the module name; a list holds exact names "
                 "or dotted suffixes. None: the MLP projections of the model family (slimpeft.model.DEFAULT_TARGETS).")


@dataclass
class MethodConfig:
    """Base class: validation, dict/JSON round trip. Subclasses are plain dataclasses of validated fields."""

    method: ClassVar[str] = ""

    def __post_init__(self) -> None:
        errors = self.validate()
        if errors:
            raise ValueError(f"invalid {type(self).__name__} (method {self.method!r}):\n  " + "\n  ".join(errors))

    def validate(self) -> list[str]:
        """Every problem of this config at once (empty when valid)."""
        errs: list[str] = []
        for f in fields(self):
            kind, lo, v = f.metadata.get("kind"), f.metadata.get("min"), getattr(self, f.name)
            if kind == "int":
                if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                    errs.append(f"`{f.name}`={v!r} must be an integer >= {lo}")
            elif kind == "number":
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < lo:
                    errs.append(f"`{f.name}`={v!r} must be a finite number >= {lo}")
            elif kind == "bool":
                if not isinstance(v, bool):
                    errs.append(f"`{f.name}`={v!r} must be true or false")
            elif kind == "targets":
                if v is not None and not isinstance(v, str) and (
                        not isinstance(v, (list, tuple)) or not v or not all(isinstance(t, str) and t for t in v)):
                    errs.append(f"`{f.name}`={v!r} must be a regex string, a non-empty list of names, or None")
            elif kind == "schedule":
                if (not isinstance(v, (list, tuple)) or not v
                        or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in v)):
                    errs.append(f"`{f.name}`={v!r} must be a non-empty list of integers >= 1 "
                                "(experts per depth group)")
            elif kind == "modules":
                errs += validate_modules_to_save(v)
            elif kind == "sample_type":
                if v not in (-1, 0, 1) or isinstance(v, bool):
                    errs.append(f"`{f.name}`={v!r}; allowed: -1 (untyped), 0, 1")
        errs += self._extra_checks() if not errs else []
        return errs

    def _extra_checks(self) -> list[str]:
        return []

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def field_names(cls) -> list[str]:
        return sorted(f.name for f in fields(cls))

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, where: str = "overrides") -> MethodConfig:
        """Build from a dict, rejecting unknown fields with the list of allowed ones."""
        unknown = sorted(set(d) - set(cls.field_names()))
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {unknown} for method {cls.method!r}; "
                             f"allowed: {cls.field_names()}")
        try:
            return cls(**d)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ---------------------------------------------------------------------------------------------- LoRA / DoRA
@dataclass
class LoraMethodConfig(MethodConfig):
    """Plain LoRA through the ``peft`` package (``use_dora`` is set by the method name, not a field)."""

    method: ClassVar[str] = "lora"

    r: int = _f(128, "LoRA rank (paper: 128, about the budget of 8 experts of rank 16).", "int", 1)
    alpha: float = _f(256.0, "LoRA scale numerator: the delta is scaled by alpha / r (2r, as SLIM).", "number", 0)
    dropout: float = _f(0.0, "Dropout on the LoRA input (peft's lora_dropout).", "number", 0)
    target_modules: str | list[str] | None = _f(None, _TARGETS_HELP, "targets")
    modules_to_save: list[str] | None = _f(None, _MODULES_TO_SAVE_HELP, "modules")
    seed: int = _f(0, "Seed of the adapter initialisation (the global RNG is left untouched).", "int", 0)

    def _extra_checks(self) -> list[str]:
        return [f"`dropout`={self.dropout!r} must lie in [0, 1)"] if self.dropout >= 1 else []


@dataclass
class DoraMethodConfig(LoraMethodConfig):
    method: ClassVar[str] = "dora"


# ---------------------------------------------------------------------------------------------- MoE-LoRA
@dataclass
class MoeBaseConfig(MethodConfig):
    n_experts: int = _f(8, "LoRA experts per adapted block/layer (paper comparison: 8).", "int", 1)
    r: int = _f(16, "Rank of every LoRA expert (paper comparison: 16).", "int", 1)
    alpha: float = _f(32.0, "LoRA scale numerator: each expert's delta is scaled by alpha / r.", "number", 0)
    modules_to_save: list[str] | None = _f(None, _MODULES_TO_SAVE_HELP, "modules")
    seed: int = _f(0, "Seed of adapter and router initialisation (per layer, stable across runs).", "int", 0)


@dataclass
class MixLoraConfig(MoeBaseConfig):
    """MixLoRA: one top-k router per FFN block; each expert is the frozen FFN with its own LoRA on every FFN linear."""

    method: ClassVar[str] = "mixlora"
    routing: ClassVar[str] = "top_k"

    top_k: int = _f(2, "Experts per token; softmax renormalised over the kept ones (paper: 2).", "int", 1)
    balance_coef: float = _f(0.01, "c of the load-balance loss c * N * sum_i f_i P_i (paper: 0.001-0.01).",
                             "number", 0)
    attention_lora: bool = _f(False, "Also give the attention projections a plain LoRA of rank r, as the original "
                              "MixLoRA does. Off in the SLIM comparison, which adapts the MLP only.", "bool")
    router_init_std: float = _f(0.02, "Std of the router's normal init (MoE-PEFT's router_init_range).",
                                "number", 0)

    def _extra_checks(self) -> list[str]:
        if self.top_k > self.n_experts:
            return [f"`top_k`={self.top_k} exceeds `n_experts`={self.n_experts}; allowed: 1..{self.n_experts}"]
        return []


@dataclass
class MixLoraDyConfig(MoeBaseConfig):
    """MixLoRA-Dy: MixLoRA with top-p routing (no renormalisation)."""

    method: ClassVar[str] = "mixlora-dy"
    routing: ClassVar[str] = "top_p"

    top_p: float = _f(0.8, "Keep experts until the cumulative probability first exceeds p (that one included).",
                      "number", 0)
    balance_coef: float = _f(0.01, "c of the load-balance loss c * N * sum_i f_i P_i.", "number", 0)
    attention_lora: bool = _f(False, "Also give the attention projections a plain LoRA of rank r (original "
                              "MixLoRA); off in the SLIM comparison.", "bool")
    router_init_std: float = _f(0.02, "Std of the router's normal init.", "number", 0)

    def _extra_checks(self) -> list[str]:
        return [] if 0 < self.top_p <= 1 else [f"`top_p`={self.top_p!r} must lie in (0, 1]"]


@dataclass
class LoraMoeConfig(MoeBaseConfig):
    """LoRAMoE: dense softmax over all experts on every FFN linear, with the localized balancing constraint."""

    method: ClassVar[str] = "loramoe"

    target_modules: str | list[str] | None = _f(None, _TARGETS_HELP, "targets")
    balance_coef: float = _f(0.1, "beta of the localized balancing constraint beta * Var(Q')/Mean(Q')^2 "
                             "(paper: 0.1; 0 disables it).", "number", 0)
    balance_delta: float = _f(0.1, "delta: importance of the experts of a sample's own group is weighted 1 + delta, "
                              "the other group's 1 - delta (paper: 0.1).", "number", 0)
    default_sample_type: int = _f(
        0, "Type of samples given no `sample_type` tensor: 0 or 1 (the group whose importance is weighted "
        "1 + delta), or -1 (untyped: every weight 1, plain CV^2 balance). Default 0: the training data is one task, "
        "so every sample is treated as the same type.", "sample_type")

    def _extra_checks(self) -> list[str]:
        errs = []
        if self.n_experts % 2 or self.n_experts < 2:
            errs.append(f"`n_experts`={self.n_experts} must be even and >= 2: LoRAMoE splits experts in two groups")
        if self.balance_delta >= 1:
            errs.append(f"`balance_delta`={self.balance_delta!r} must lie in [0, 1)")
        return errs


@dataclass
class MolaConfig(MethodConfig):
    """MoLA: top-k router per adapted linear, more experts in higher layers."""

    method: ClassVar[str] = "mola"

    experts_schedule: list[int] = _f(None, "Experts per linear in each depth group, lowest layers first; the depth "
                                     "is split into len(schedule) equal groups (default 2/4/6/8 per quarter).",
                                     "schedule", default_factory=lambda: [2, 4, 6, 8])
    r: int = _f(16, "Rank of every LoRA expert.", "int", 1)
    alpha: float = _f(32.0, "LoRA scale numerator: each expert's delta is scaled by alpha / r.", "number", 0)
    top_k: int = _f(2, "Experts per token; softmax renormalised over the kept ones (paper: 2).", "int", 1)
    target_modules: str | list[str] | None = _f(None, _TARGETS_HELP, "targets")
    balance_coef: float = _f(0.0, "c of the optional load-balance loss c * N * sum_i f_i P_i (0: off, as MoLA).",
                             "number", 0)
    modules_to_save: list[str] | None = _f(None, _MODULES_TO_SAVE_HELP, "modules")
    seed: int = _f(0, "Seed of adapter and router initialisation (per layer, stable across runs).", "int", 0)

    def _extra_checks(self) -> list[str]:
        if self.top_k > min(self.experts_schedule):
            return [f"`top_k`={self.top_k} exceeds the smallest expert count of `experts_schedule`="
                    f"{list(self.experts_schedule)}; allowed: 1..{min(self.experts_schedule)}"]
        return []


# ---------------------------------------------------------------------------------------------- full
@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning: every weight trains. No options."""

    method: ClassVar[str] = "full"
