"""slimpeft: SLIM (Soft LoRA and Identity Mixture) for HuggingFace models - learn more, forget less."""

from __future__ import annotations

from .config import PRESETS, RECOMMENDED_ROUTING, SINGLE_EXPERT, SlimConfig
from .layer import SlimLinear
from .model import RoutingStats, SlimModel, get_slim_model

__all__ = ["SlimConfig", "SlimLinear", "SlimModel", "RoutingStats", "get_slim_model", "PRESETS", "RECOMMENDED_ROUTING",
           "SINGLE_EXPERT"]
__version__ = "0.1.0"
