"""Dynamic merging: DARE-style masks on the LoRA experts (METHOD.md section 6).

Notation: e experts, r rank, i = d_in, o = d_out, p the drop rate.

*Exact DARE* (the reference) masks the merged delta element-wise: ``M ⊙ (B A)`` with ``M_ij ~ Bernoulli(1 - p)``,
kept entries rescaled by ``1 / (1 - p)``. Building ``B A`` costs O(i·o) per expert.

*Fast masking* (the paper's) never builds ``B A``: it drops output channels (rows of B, rate p_r) and input
channels (columns of A, rate p_c). Entry (i, j) of the effective ``B' A'`` survives with probability
``(1 - p_r)(1 - p_c) = 1 - p`` and, rescaled by ``1 / (1 - p_r)`` and ``1 / (1 - p_c)``, has expectation
``(B A)_ij``. Default split p_r = p_c = 1 - sqrt(1 - p). Cost O(r·(i + o)).
"""

from __future__ import annotations

import math

import torch


def fast_drop_rates(p: float) -> tuple[float, float]:
    """Row and column drop rates with (1 - p_r)(1 - p_c) = 1 - p, split evenly."""
    keep = math.sqrt(1.0 - p)
    return 1.0 - keep, 1.0 - keep


def _keep_scale(shape: tuple[int, ...], p: float, rescale: bool, generator: torch.Generator | None,
                device: torch.device | str) -> torch.Tensor:
    """0 where dropped, 1 (or 1 / (1 - p) with rescale) where kept; float32."""
    if p <= 0.0:
        return torch.ones(shape, device=device)
    u = torch.rand(shape, generator=generator, device=generator.device if generator else device)
    keep = u.ge_(p)  # in place: 1.0 where kept, 0.0 where dropped (float32; no separate cast)
    return (keep.mul_(1.0 / (1.0 - p)) if rescale else keep).to(device)


def fast_masks(
    n_experts: int,
    d_in: int,
    d_out: int,
    p: float,
    *,
    rescale: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Column scales for A, shape (e, i), and row scales for B, shape (e, o)."""
    p_r, p_c = fast_drop_rates(p)
    col = _keep_scale((n_experts, d_in), p_c, rescale, generator, device)  # (e, i)
    row = _keep_scale((n_experts, d_out), p_r, rescale, generator, device)  # (e, o)
    return col, row


def apply_fast_masks(
    A: torch.Tensor, B: torch.Tensor, col: torch.Tensor, row: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A (e, r, i) and B (e, o, r) with dropped input columns / output rows zeroed (and survivors rescaled)."""
    return A * col.to(A.dtype)[:, None, :], B * row.to(B.dtype)[:, :, None]


def dare_mask(
    n_experts: int,
    d_in: int,
    d_out: int,
    p: float,
    *,
    rescale: bool = True,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Element-wise DARE keep-scale of the merged delta, shape (e, o, i)."""
    return _keep_scale((n_experts, d_out, d_in), p, rescale, generator, device)


def dare_delta(A: torch.Tensor, B: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Masked merged delta M ⊙ (B A) of every expert: (e, o, r) @ (e, r, i) -> (e, o, i)."""
    delta = torch.bmm(B, A)  # (e, o, i)
    return delta if mask is None else delta * mask.to(delta.dtype)
