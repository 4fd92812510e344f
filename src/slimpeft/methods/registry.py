"""One interface over SLIM and its baselines: ``available()``, ``build()``, ``load()``, budgets and deviations.

    from slimpeft import methods
    methods.available()                                   # ["slim", "lora", "dora", "mixlora", ...]
    model = methods.build("mixlora", hf_model, r=8)       # trainable; out.loss includes the auxiliary losses
    model.save_pretrained("out/")
    model = methods.load("mixlora", fresh_hf_model, "out/")
    methods.trainable_budget("mola", hf_model)            # trainable parameters, computed without building
    methods.lora_rank_for_budget(hf_model)                # LoRA rank with SLIM's default trainable budget
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import SlimConfig
from ..layer import base_shape
from ..model import SlimModel, check_not_adapted, get_slim_model, resolve_targets, slim_targets
from ..modules_to_save import resolve_modules_to_save
from ..quantization import guard_cpu_repacking
from .common import load_moe
from .config import (
    DoraMethodConfig,
    FullConfig,
    LoraMethodConfig,
    LoraMoeConfig,
    MethodConfig,
    MixLoraConfig,
    MixLoraDyConfig,
    MolaConfig,
)
from .full import build_full, load_full
from .loramoe import build_loramoe, loramoe_trainable
from .mixlora import build_mixlora, mixlora_trainable
from .mola import build_mola, mola_trainable
from .peft_lora import build_peft_lora, load_peft_lora, peft_lora_trainable

# Where this project's implementation differs from the published method (cited by BENCHMARKS.md).
DEVIATIONS: dict[str, list[str]] = {
    "slim": ["see METHOD.md: the [ours] choices (calibrated OOD threshold, fast DARE masks, yielding form)"],
    "lora": ["targets the family's MLP projections (as SLIM), not attention; no LoRA dropout by default"],
    "dora": ["targets the family's MLP projections (as SLIM), not attention; no LoRA dropout by default"],
    "mixlora": [
        "attention LoRA off by default (`attention_lora=False`): the SLIM paper adapts the MLP only, so every method "
        "adapts the same modules; the original gives q/k/v/o a plain LoRA",
        "no LoRA dropout (original: 0.05)",
        "padding tokens excluded from the load-balance statistics",
        "supported FFNs: blocks named `mlp` with gate/up/down (Llama family) or c_fc/c_proj (GPT-2), and BERT-style "
        "encoder layers (intermediate.dense -> output.dense; the mixture replaces `intermediate`, `output.dense` "
        "passes it on, `output` keeps its dropout and residual LayerNorm)",
    ],
    "mixlora-dy": [
        "as mixlora (attention LoRA off by default, no dropout, padding excluded from the balance loss)",
        "top-p weights are not renormalised (as published), so the FFN output is scaled by sum of kept probabilities",
    ],
    "loramoe": [
        "sample types: training data carries no type, so every sample is one type (`default_sample_type=0`: group 0 "
        "weighted 1 + delta); a `sample_type` (b,) tensor can be passed to forward; type t -> group t (the original "
        "maps task_type 1 -> first group)",
        "padding tokens excluded from the importance Q",
        "r = 16 (SLIM paper's comparison; LoRAMoE's scripts use r = 4), no LoRA dropout, beta = delta = 0.1 (paper)",
    ],
    "mola": [
        "targets the MLP projections by default (MoLA adapts attention too); schedule 2/4/6/8 per quarter of depth",
        "no LoRA dropout; balance loss off by default (optional, `balance_coef`)",
    ],
    "full": ["none: all weights train; saved with safetensors (tied weights stored once)"],
}


@dataclass(frozen=True)
class _Method:
    config: type | None
    build: Callable[[nn.Module, Any], nn.Module]
    load: Callable[..., nn.Module]
    trainable: Callable[[nn.Module, Any], int]


def _slim_trainable(model: nn.Module, cfg: SlimConfig) -> int:
    """Per adapted linear (i -> o): router (n_lora + n_identity)*i + experts n_lora*r*(i + o)."""
    total = 0
    for n in slim_targets(model, cfg):
        i, o = base_shape(model.get_submodule(n))
        total += cfg.n_experts * i + cfg.n_lora_experts * cfg.r * (i + o)
    return total


def _full_trainable(model: nn.Module, cfg: FullConfig) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once


_METHODS: dict[str, _Method] = {
    "slim": _Method(SlimConfig, get_slim_model,
                    lambda m, d, is_trainable=False: SlimModel.from_pretrained(m, d, is_trainable=is_trainable),
                    _slim_trainable),
    "lora": _Method(LoraMethodConfig, lambda m, c: build_peft_lora(m, c, use_dora=False),
                    lambda m, d, is_trainable=False: load_peft_lora(m, d, use_dora=False, is_trainable=is_trainable),
                    lambda m, c: peft_lora_trainable(m, c, use_dora=False)),
    "dora": _Method(DoraMethodConfig, lambda m, c: build_peft_lora(m, c, use_dora=True),
                    lambda m, d, is_trainable=False: load_peft_lora(m, d, use_dora=True, is_trainable=is_trainable),
                    lambda m, c: peft_lora_trainable(m, c, use_dora=True)),
    "mixlora": _Method(MixLoraConfig, build_mixlora,
                       lambda m, d, is_trainable=False: load_moe(m, d, "mixlora", MixLoraConfig, build_mixlora,
                                                                 is_trainable=is_trainable),
                       mixlora_trainable),
    "mixlora-dy": _Method(MixLoraDyConfig, build_mixlora,
                          lambda m, d, is_trainable=False: load_moe(m, d, "mixlora-dy", MixLoraDyConfig,
                                                                    build_mixlora, is_trainable=is_trainable),
                          mixlora_trainable),
    "loramoe": _Method(LoraMoeConfig, build_loramoe,
                       lambda m, d, is_trainable=False: load_moe(m, d, "loramoe", LoraMoeConfig, build_loramoe,
                                                                 is_trainable=is_trainable),
                       loramoe_trainable),
    "mola": _Method(MolaConfig, build_mola,
                    lambda m, d, is_trainable=False: load_moe(m, d, "mola", MolaConfig, build_mola,
                                                              is_trainable=is_trainable),
                    mola_trainable),
    "full": _Method(FullConfig, build_full, load_full, _full_trainable),
}


def available() -> list[str]:
    """Names accepted by build/load, SLIM first."""
    return list(_METHODS)


def _method(name: str) -> _Method:
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; available: {available()}")
    return _METHODS[name]


def make_config(name: str, **overrides: Any) -> SlimConfig | MethodConfig:
    """The method's config with ``overrides`` applied; ValueError naming unknown fields or invalid values."""
    cls = _method(name).config
    where = f"methods.build({name!r}) overrides"
    if cls is SlimConfig:
        return SlimConfig.from_dict(dict(overrides), where=where)
    return cls.from_dict(dict(overrides), where=where)


def build(name: str, model: nn.Module, **overrides: Any) -> nn.Module:
    """Freeze ``model`` (except for ``full``) and attach method ``name``; returns a trainable model.

    Every returned model has ``save_pretrained(dir)`` and ``get_nb_trainable_parameters()``; the MoE methods (and
    SLIM) also ``routing_stats(**inputs)``. In training mode ``out.loss`` includes the method's auxiliary losses.
    """
    m = _method(name)
    cfg = make_config(name, **overrides)  # validated before the model is touched
    check_not_adapted(model)  # every method, also those that find their layers without resolve_targets
    guard_cpu_repacking(model)  # a quantized base: bitsandbytes' CPU inference must not fail on its shapes
    return m.build(model, cfg)


def load(name: str, model: nn.Module, adapter_dir: str | os.PathLike, *, is_trainable: bool = False) -> nn.Module:
    """Load what ``build(name, ...).save_pretrained(adapter_dir)`` wrote onto a fresh ``model`` (eval mode)."""
    loaded = _method(name).load(model, adapter_dir, is_trainable=is_trainable)
    guard_cpu_repacking(loaded)  # after the checks: a refused load leaves the base model as it was
    return loaded


def trainable_budget(name: str, model: nn.Module, **overrides: Any) -> int:
    """Trainable parameters ``build(name, model, **overrides)`` would have, computed from layer shapes only (the
    modules to save counted whole: each trains as a copy)."""
    cfg = make_config(name, **overrides)
    saved = resolve_modules_to_save(model, getattr(cfg, "modules_to_save", None), [])
    return _method(name).trainable(model, cfg) + sum(p.numel() for n in saved
                                                     for p in model.get_submodule(n).parameters())


def budget_overrides(name: str, model: nn.Module, slim_config: SlimConfig | None = None) -> dict[str, Any]:
    """``r`` and ``alpha`` (= 2r, the scale SLIM uses) giving method ``name`` the trainable budget of SLIM with
    ``slim_config`` (default SlimConfig()) on ``model``: LoRA/DoRA the closest rank (``lora_rank_for_budget``), the
    MoE baselines (default expert counts) the expert rank whose budget comes closest; {} for slim and full.
    LoRA/DoRA also get SLIM's ``target_modules`` (the full layer names) when SLIM's are not the family default or
    include the output head (``adapt_output_head``), so that they adapt the same layers."""
    if name in ("slim", "full"):
        _method(name)
        return {}
    slim_config = slim_config or SlimConfig()
    if name in ("lora", "dora"):
        r = lora_rank_for_budget(model, slim_config=slim_config, dora=name == "dora")
        if slim_config.target_modules is not None or slim_config.adapt_output_head:
            return {"r": r, "alpha": 2.0 * r, "target_modules": slim_targets(model, slim_config)}
    else:
        budget = _slim_trainable(model, slim_config)
        r = min(range(1, 257), key=lambda r: abs(trainable_budget(name, model, r=r) - budget))
    return {"r": r, "alpha": 2.0 * r}


def lora_rank_for_budget(model: nn.Module, budget: int | None = None, *, slim_config: SlimConfig | None = None,
                         dora: bool = False, target_modules: str | list[str] | None = None) -> int:
    """The LoRA (or DoRA) rank whose trainable parameters come closest to ``budget``.

    ``budget`` defaults to the trainable parameters of SLIM with ``slim_config`` (default SlimConfig()) on ``model``.
    LoRA has sum_layers r*(i + o) (+ o per layer for DoRA), so r = round((budget - dora_extra) / sum_layers (i + o)).
    """
    slim_config = slim_config or SlimConfig()
    if budget is None:
        budget = _slim_trainable(model, slim_config)
    names = resolve_targets(model, target_modules) if target_modules is not None else slim_targets(model, slim_config)
    shapes = [base_shape(model.get_submodule(n)) for n in names]
    extra = sum(o for _, o in shapes) if dora else 0
    return max(1, round((budget - extra) / sum(i + o for i, o in shapes)))
