"""slimpeft: SLIM (Soft LoRA and Identity Mixture) for HuggingFace models - learn more, forget less."""

from __future__ import annotations

from .config import PRESETS, RECOMMENDED_ROUTING, SINGLE_EXPERT, SlimConfig
from .layer import SlimLinear
from .model import RoutingStats, SlimModel, get_slim_model

__all__ = ["SlimConfig", "SlimLinear", "SlimModel", "RoutingStats", "get_slim_model", "PRESETS", "RECOMMENDED_ROUTING",
           "SINGLE_EXPERT", "SlimTrainer"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """``SlimTrainer`` on first use: importing transformers' Trainer takes seconds that the rest of the API does not
    need."""
    if name == "SlimTrainer":
        from .trainer import SlimTrainer

        return SlimTrainer
    raise AttributeError(f"module 'slimpeft' has no attribute {name!r}")
