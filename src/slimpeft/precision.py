"""Mixed precision (``torch.autocast``, as HF Trainer's ``bf16=True`` / ``fp16=True`` and ``accelerate launch
--mixed_precision`` run it): which of the adapters' computations keep float32.

Under autocast the base model's matmuls and the experts' up-projections run in the autocast dtype, as PEFT's
LoRA does. Float32 stays where precision decides something discrete or accumulates statistics: the router and the
down-projections it is fused with (top-k picks from these logits; Switch Transformer's "selective precision"),
the clusters' nearest-centre distances and sliding sums (sums of squares over thousands of tokens lose the
variance in 8 mantissa bits), and the whole eval-mode fast path (routing decisions identical to float32).
"""

from __future__ import annotations

import contextlib

import torch


def autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which ``t``'s device computes in the operands' own dtypes: autocast disabled there when it is
    on, a no-op otherwise (no cost outside mixed precision)."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()
