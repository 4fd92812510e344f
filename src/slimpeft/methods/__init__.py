"""SLIM and its baselines under one interface (LoRA, DoRA, MixLoRA, MixLoRA-Dy, LoRAMoE, MoLA, full fine-tuning).

    from slimpeft import methods
    methods.available()   # ["slim", "lora", "dora", "mixlora", "mixlora-dy", "loramoe", "mola", "full"]
    model = methods.build("mixlora", hf_model, **overrides)
    model.save_pretrained("out/")
    model = methods.load("mixlora", hf_model, "out/")

Each method's module docstring states its equations and deviations; ``DEVIATIONS`` lists the deviations by name.
"""

from __future__ import annotations

from .common import LoraLinear, MoeModel
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
from .full import FullModel
from .loramoe import LoraMoeLinear
from .mixlora import MixLoraFFN
from .mola import MolaLinear
from .registry import (
    DEVIATIONS,
    available,
    budget_overrides,
    build,
    load,
    lora_rank_for_budget,
    make_config,
    trainable_budget,
)

__all__ = [
    "DEVIATIONS",
    "DoraMethodConfig",
    "FullConfig",
    "FullModel",
    "LoraLinear",
    "LoraMethodConfig",
    "LoraMoeConfig",
    "LoraMoeLinear",
    "MethodConfig",
    "MixLoraConfig",
    "MixLoraDyConfig",
    "MixLoraFFN",
    "MoeModel",
    "MolaConfig",
    "MolaLinear",
    "available",
    "budget_overrides",
    "build",
    "load",
    "lora_rank_for_budget",
    "make_config",
    "trainable_budget",
]
