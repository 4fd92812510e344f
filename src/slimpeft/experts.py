"""The one expert engine: stacked LoRA experts and their vectorised, routed mixing.

Shared by SLIM and the MoE-LoRA baselines (MixLoRA, MixLoRA-Dy, LoRAMoE, MoLA): the math of "a routed,
weighted sum of low-rank deltas" lives here once.

Notation: n tokens, e LoRA experts, r rank, i = d_in, o = d_out, k routed slots per token, m kept slots, c the
capacity (largest number of slots routed to one expert).

    delta(x) = s * sum_{slots (e, w) of x, e a LoRA expert} w * B_e A_e x,        s = alpha / r

Expert ids >= e denote identity experts: they contribute a zero delta and cost nothing.

Two dispatch paths with identical math (a test checks them against each other and against a per-token loop):

* ``dense``: every expert's down-projection in one matmul, weights scattered to an (n, e) gate, then one
  matmul with all B's concatenated -- the flops of a LoRA of rank e*r, but the routing weights and the scale are
  applied to the small (n, e*r) activations and the addition to the base output is fused into the matmul.
* ``sparse``: the down-projection stays one dense matmul (it is the cheap half, r*e*i per token), but the
  up-projection runs only for the routed slots: slots are sorted by expert into an (e, c, r) buffer and multiplied
  with a batched matmul -- the cost of k experts instead of e, with no Python loop over experts or tokens.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

Dispatch = Literal["auto", "sparse", "dense"]


class LoraExperts(nn.Module):
    """``n_experts`` LoRA experts of rank r stacked as A (e, r, i) and B (e, o, r); B = 0: the delta starts at 0."""

    def __init__(self, n_experts: int, d_in: int, d_out: int, r: int, alpha: float, *,
                 generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.n_experts, self.d_in, self.d_out, self.r = n_experts, d_in, d_out, r
        self.scaling = alpha / r
        # PEFT's LoRA init: kaiming_uniform(a=sqrt(5)) on A == U(-1/sqrt(i), 1/sqrt(i)); B = 0.
        bound = 1.0 / math.sqrt(d_in)
        A = (torch.rand(n_experts, r, d_in, generator=generator) * 2.0 - 1.0) * bound
        self.lora_A = nn.Parameter(A.to(dtype))
        self.lora_B = nn.Parameter(torch.zeros(n_experts, d_out, r, dtype=dtype))

    def l1_penalty(self) -> torch.Tensor:
        """sum_e ||B_e||_1 / (r o) + ||A_e||_1 / (r i): the size-normalised L1 of METHOD.md section 8."""
        return self.lora_B.abs().sum() / (self.r * self.d_out) + self.lora_A.abs().sum() / (self.r * self.d_in)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, *,
                A: torch.Tensor | None = None, B: torch.Tensor | None = None, delta: torch.Tensor | None = None,
                base: torch.Tensor | None = None, dispatch: Dispatch = "auto") -> torch.Tensor:
        """Routed delta for tokens x (n, i) -> (n, o); with ``base`` (n, o), returns base + delta.

        ``A``/``B`` override the stored weights (masked copies); ``delta`` (e, o, i) replaces B A entirely
        (exact DARE, the reference path). Passing ``base`` lets the dense path fuse the addition into its
        matmul (one pass over the (n, o) output instead of three).
        """
        A = self.lora_A if A is None else A
        B = self.lora_B if B is None else B
        x = x.to(A.dtype)
        if delta is not None:
            y = self.scaling * _grouped_full(x, delta, weights, indices)
        else:
            if dispatch == "auto":
                dispatch = auto_dispatch(indices.shape[-1], self.n_experts, x.device)
            if dispatch == "dense":
                return _dense_lowrank(x, A, B, weights, indices, self.scaling, base)
            y = self.scaling * _sparse_lowrank(x, A, B, weights, indices)
        return y if base is None else base + y.to(base.dtype)


def auto_dispatch(k: int, n_experts: int, device: torch.device) -> Dispatch:
    """The dense path, on every device: it won at every shape measured (``slim bench speed``; on a GPU with
    ``--device cuda``, which times both). Its low-rank matmuls cost less than the sparse path's gathers, extra passes
    over (slots, d_out) tensors and the host sync that sizes its buffer: on a CPU, and on an H100 at the issue's layer
    shape (8 x r16 experts, top-2, 2048 tokens: dense 2.08 x the base layer's fwd+bwd, sparse 2.75 in float32;
    9.3 and 13.0 in bfloat16). ``dispatch="sparse"`` stays available (the same math, tested)."""
    return "dense"


def _dense_gate(weights: torch.Tensor, indices: torch.Tensor, n_experts: int, width: int | None = None
                ) -> torch.Tensor:
    """Scatter per-slot weights into an (n, e) gate; identity slots (id >= e) add nothing.

    ``width``: the number of expert ids (LoRA and identity) when the caller knows it (SLIM: its router's width). The
    slots, distinct per token, are then scattered into an (n, width) gate whose LoRA columns are returned as a view
    (two ops). Without it identity slots are sent to column e - 1 with weight 0 (adding 0 changes nothing) rather
    than to a wider gate: the width would need ``indices.max()`` on the host, a device sync per layer.
    """
    if width is not None:
        return weights.new_zeros(indices.shape[0], width).scatter(1, indices, weights)[:, :n_experts]  # (n, e)
    lora = indices < n_experts  # (n, k)
    return weights.new_zeros(indices.shape[0], n_experts).scatter_add(
        1, indices.clamp_max(n_experts - 1), weights * lora)  # (n, e)


def stack_B(B: torch.Tensor) -> torch.Tensor:
    """B (e, o, r) -> B_cat (e*r, o): every up-projection side by side, the right operand of the dense mix."""
    e, o, r = B.shape
    return B.permute(0, 2, 1).reshape(e * r, o)  # a copy: (e, r, o) is not a view of (e, o, r)


def dense_mix(h: torch.Tensor, B_cat: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, n_experts: int,
              scaling: float, base: torch.Tensor | None, *, inplace: bool = False, width: int | None = None
              ) -> torch.Tensor:
    """Routed up-projection of the down-projections h (n, e*r) (a strided view is fine) -> (n, o), plus ``base``.

    The routing weights and the scale are applied to the small (n, e*r) activations, and the addition of the base
    output is fused into the matmul (one pass over the (n, o) output instead of three). ``inplace``: see gated_mix;
    ``width``: see _dense_gate.
    """
    gate = _dense_gate(weights.to(h.dtype), indices, n_experts, width) * scaling  # (n, e), the scale folded in
    return gated_mix(h, B_cat, gate, base, inplace=inplace)


def gated_mix(h: torch.Tensor, B_cat: torch.Tensor, gate: torch.Tensor, base: torch.Tensor | None, *,
              inplace: bool = False) -> torch.Tensor:
    """base + sum_e gate[:, e] * h_e @ B_e: h (n, e*r) (a strided view is fine), gate (n, e) (scale included; a
    column slice is fine), B_cat (e*r, o) -> (n, o), the base addition fused into the matmul.

    ``inplace``: written into ``base`` (of h's dtype), which saves a copy of the (n, o) output; only for a base
    output that nothing else reads and whose producer's backward does not need it (a plain nn.Linear's)."""
    n, e = gate.shape
    if h.dtype != torch.float32 and h.device.type == "cpu" and not torch.compiler.is_compiling():
        # bf16 / fp16 on a CPU (autocast): the gate expanded to (n, e*r) first. Broadcast over (n, e, r), the CPU runs
        # r-long inner loops, shorter than one vector of 16-bit floats, unvectorised (~3 x slower forward and
        # backward at r = 16); expanded, they are e*r long. Float32 keeps the broadcast (one vector per r = 16, no
        # gate copy), as does a GPU (one launch fewer) and compiled code (fused either way)
        hw = h * gate[:, :, None].expand(n, e, h.shape[1] // e).reshape(n, -1)  # (n, e*r), the same products
    else:
        hw = (h.view(n, e, -1) * gate[:, :, None]).reshape(n, -1)  # (n, e*r)
    if base is not None and base.dtype == hw.dtype:
        if inplace and (B_cat.dtype == base.dtype or torch.is_autocast_enabled(base.device.type)):
            # an in-place op is not cast by autocast: B_cat cast here as autocast would cast it for torch.addmm
            return base.addmm_(hw, B_cat.to(base.dtype))
        return torch.addmm(base, hw, B_cat)  # base + hw @ B_cat, one pass
    y = hw @ B_cat  # (n, o)
    return y if base is None else base + y.to(base.dtype)


def _dense_lowrank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor,
                   indices: torch.Tensor, scaling: float, base: torch.Tensor | None) -> torch.Tensor:
    e, r, i = A.shape
    h = x @ A.reshape(e * r, i).T  # (n, e*r): all down-projections in one matmul
    return dense_mix(h, stack_B(B), weights, indices, e, scaling, base)


def _slots(weights: torch.Tensor, indices: torch.Tensor, n_experts: int):
    """Kept (token, expert, weight) slots sorted by expert, with each slot's position in its expert's group."""
    n, k = indices.shape
    tok = torch.arange(n, device=indices.device).repeat_interleave(k)  # (n*k,)
    ex, w = indices.reshape(-1), weights.reshape(-1)
    keep = (ex < n_experts) & (w != 0)  # identity experts and dropped (top-p) slots cost nothing
    tok, ex, w = tok[keep], ex[keep], w[keep]  # (m,)
    order = ex.argsort(stable=True)
    tok, ex, w = tok[order], ex[order], w[order]
    counts = torch.bincount(ex, minlength=n_experts)  # (e,)
    starts = counts.cumsum(0) - counts
    pos = torch.arange(ex.numel(), device=ex.device) - starts[ex]  # (m,) position inside the expert's group
    cap = int(counts.max()) if ex.numel() else 0
    return tok, ex, w, pos, cap


def _sparse_lowrank(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, weights: torch.Tensor,
                    indices: torch.Tensor) -> torch.Tensor:
    e, r, i = A.shape
    n, o = x.shape[0], B.shape[1]
    out = x.new_zeros(n, o)
    tok, ex, w, pos, cap = _slots(weights, indices, e)
    if cap == 0:
        return out + 0.0 * (A.sum() + B.sum())  # keep the graph connected for DDP
    h = (x @ A.reshape(e * r, i).T).view(n, e, r)  # (n, e, r)
    hs = h[tok, ex] * w.to(h.dtype)[:, None]  # (m, r) routed down-projections, weighted
    buf = hs.new_zeros(e, cap, r).index_put((ex, pos), hs)  # (e, c, r)
    ys = torch.bmm(buf, B.transpose(1, 2))[ex, pos]  # (e, c, o) -> (m, o); autocast's dtype under mixed precision
    return out.index_add(0, tok, ys.to(out.dtype))  # (n, o)


def _grouped_full(x: torch.Tensor, delta: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor
                  ) -> torch.Tensor:
    """Routed full-rank deltas (e, o, i): the exact-DARE reference. (n, i) -> (n, o)."""
    e, o, i = delta.shape
    out = x.new_zeros(x.shape[0], o)
    tok, ex, w, pos, cap = _slots(weights, indices, e)
    if cap == 0:
        return out + 0.0 * delta.sum()
    buf = x.new_zeros(e, cap, i).index_put((ex, pos), x[tok])  # (e, c, i)
    ys = torch.bmm(buf, delta.transpose(1, 2))[ex, pos] * w.to(x.dtype)[:, None]  # (m, o)
    return out.index_add(0, tok, ys.to(out.dtype))
