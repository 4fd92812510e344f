"""Mixed precision (``torch.autocast``, as HF Trainer's ``bf16=True`` / ``fp16=True`` and ``accelerate launch
--mixed_precision`` run it): which of the adapters' computations keep float32.

In training under autocast the base model's matmuls and the experts' matmuls -- the router's fused with the
down-projections included -- run in the autocast dtype, as PEFT's LoRA and HF's Mixtral router do; the routing
itself (yield, top-k, softmax) works on the logits cast to float32. Float32 always: the clusters' nearest-centre
distances and sliding sums (sums of squares over thousands of tokens lose the variance in 8 mantissa bits), and in
eval mode all of the routing (the fast path and the reference path that routing records use), so that inference
takes the decisions a float32 model takes.
"""

from __future__ import annotations

import contextlib

import torch


def autocast_off(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context in which ``t``'s device computes in the operands' own dtypes: autocast disabled there when it is
    on, a no-op otherwise (no cost outside mixed precision)."""
    dev = t.device.type
    return torch.autocast(dev, enabled=False) if torch.is_autocast_enabled(dev) else contextlib.nullcontext()


def routing_precision(t: torch.Tensor, training: bool) -> contextlib.AbstractContextManager:
    """Where the router's matmul runs (see above): under autocast in training (speed), float32 otherwise."""
    return contextlib.nullcontext() if training else autocast_off(t)
