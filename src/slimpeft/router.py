"""Routing: router logits, weight yielding, expert selection and auxiliary losses.

Notation: n tokens, e experts, k experts kept per token.

Selections (all return routing weights per kept expert and the expert ids, (n, k) each):

* ``top_k``  -- keep the k largest logits, softmax over those (SLIM, MixLoRA, MoLA);
* ``top_p``  -- softmax over all experts, sort, keep experts until the cumulative probability first exceeds p
  (that expert included), no renormalisation (MixLoRA-Dy); dropped slots carry weight 0;
* ``dense``  -- softmax over all experts, every expert kept (LoRAMoE).

Top-k over logits of which some are -inf (identity experts of an in-domain token under ``identity_gate="yield"``)
gives those slots weight 0 as long as one kept logit is finite.

Weight yielding (SLIM, METHOD.md section 5): identity-expert logits are raised by ``gamma * d(x)`` before the
selection, so LoRA experts yield weight to identity experts as the out-of-domain score d grows. Routers have no
bias and compute in float32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F

Selection = Literal["top_k", "top_p", "dense"]


@dataclass
class RouterOutput:
    """Result of a routing step. ``aux_loss`` is the weighted total to optimise; ``aux_parts`` its unweighted parts."""

    weights: torch.Tensor  # (n, k) float32
    indices: torch.Tensor  # (n, k) long
    probs: torch.Tensor | None  # (n, e) float32 softmax over all experts (after yielding); None when not needed
    aux_loss: torch.Tensor  # () float32, zero when no auxiliary loss applies
    logits: torch.Tensor | None = None  # (n, e) float32 router logits after yielding
    aux_parts: dict[str, torch.Tensor] = field(default_factory=dict)


def apply_yielding(logits: torch.Tensor, d: torch.Tensor | None, n_lora: int, strength: float,
                   identity_gate: str = "router") -> torch.Tensor:
    """Weight yielding on the identity experts (ids >= n_lora); LoRA logits unchanged. (n, e) -> (n, e).

    ``identity_gate`` 'router' (paper): z'_i = z_i + gamma d. 'yield': z'_i = gamma d where gamma d > 0, -inf
    elsewhere (the router's identity rows are not used): in-domain tokens never take an identity slot."""
    if logits.shape[-1] == n_lora:
        return logits
    if identity_gate == "yield":
        bump = logits.new_zeros(logits.shape[0]) if d is None else strength * d.to(logits.dtype)  # (n,)
        ident = torch.where(bump > 0, bump, torch.full_like(bump, float("-inf")))  # (n,)
        return torch.cat([logits[:, :n_lora], ident[:, None].expand(-1, logits.shape[-1] - n_lora)], dim=1)
    if d is None or strength == 0.0:
        return logits
    bump = torch.zeros_like(logits)
    bump[:, n_lora:] = strength * d.to(logits.dtype)[:, None]
    return logits + bump


def select(logits: torch.Tensor, how: Selection, *, top_k: int = 2, top_p: float = 0.8, need_probs: bool = True
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Expert selection: returns (weights (n, k), indices (n, k), probs (n, e)); top-k with ``need_probs=False``
    skips the full softmax (probs None), which only the balance loss reads."""
    if how == "top_k":
        vals, idx = logits.topk(top_k, dim=-1)  # (n, k)
        return vals.softmax(-1), idx, logits.softmax(-1) if need_probs else None
    probs = logits.softmax(-1)  # (n, e)
    if how == "dense":
        idx = torch.arange(logits.shape[-1], device=logits.device).expand_as(logits)  # (n, e)
        return probs, idx, probs
    if how == "top_p":
        sorted_p, idx = probs.sort(-1, descending=True)  # (n, e)
        before = sorted_p.cumsum(-1) - sorted_p  # cumulative probability of the experts ranked above
        keep = before < top_p  # keeps up to and including the expert that first exceeds p
        return sorted_p * keep, idx, probs
    raise ValueError(f"unknown selection {how!r}; allowed: 'top_k', 'top_p', 'dense'")


def top_k_gate(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """(n, e) dense gate: the softmax over each row's ``top_k`` largest logits at their columns, 0 elsewhere -- what
    ``select(logits, "top_k")`` scattered into the (n, e) columns gives. Built from ``top_k`` max-reductions and
    pointwise ops, which torch.compile fuses into the routing's other kernels (``topk`` stays a library call there);
    eagerly it is more ops than ``topk`` (used under compile only: ``SlimLinear``'s dense training path and
    ``_eval_forward``). Ties pick the first
    column, where ``topk``'s choice is unspecified: equal logits get equal weights either way."""
    cols = torch.arange(logits.shape[-1], device=logits.device)  # (e,)
    top, first = logits.max(-1, keepdim=True)  # (n, 1) the largest logit and its column
    chosen = cols == first  # (n, e)
    for _ in range(top_k - 1):
        nxt = logits.masked_fill(chosen, float("-inf")).argmax(-1, keepdim=True)  # (n, 1)
        chosen = chosen | (cols == nxt)
    w = torch.where(chosen, (logits - top).exp(), 0.0)  # (n, e) softmax numerators of the chosen logits
    return w / w.sum(-1, keepdim=True)


def load_balance_loss(probs: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, n_experts: int,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """Switch-style balance N * sum_i f_i * P_i (unweighted; multiply by c).

    f_i: share of the routed slots (weight > 0) that go to expert i; P_i: mean router probability of expert i.
    ``valid`` (n,) bool: only those tokens count. They are weighted, not selected (a boolean index is a host sync
    on a GPU); with no valid token the loss is 0.
    """
    v = probs.new_ones(probs.shape[0]) if valid is None else valid.to(probs.dtype)  # (n,)
    routed = (weights > 0).to(probs.dtype) * v[:, None]  # (n, k)
    slots = torch.zeros(n_experts, device=probs.device, dtype=probs.dtype).index_add_(
        0, indices.reshape(-1), routed.reshape(-1)
    )  # (e,)
    return _switch_balance(slots, routed.sum(), probs, v)


def _switch_balance(slots: torch.Tensor, n_routed: torch.Tensor, probs: torch.Tensor, v: torch.Tensor
                    ) -> torch.Tensor:
    """N * sum_i f_i P_i from the routed slots per expert (e,), their total (), the router probabilities (n, e)
    and the token weights v (n,)."""
    f = slots / n_routed.clamp_min(1.0)
    P = (probs * v[:, None]).sum(0) / v.sum().clamp_min(1.0)  # (e,) mean over the valid tokens
    return slots.shape[0] * (f * P).sum()


def lora_gate_balance_loss(logits: torch.Tensor, gate: torch.Tensor, n_lora: int,
                           valid: torch.Tensor | None = None) -> torch.Tensor:
    """``lora_balance_loss`` from a dense gate (n, e) (``top_k_gate``) instead of slots: a LoRA expert's slot is
    routed where its gate is > 0 (its weight > 0), so f_i and P_i, and the loss, are the same."""
    probs = logits[:, :n_lora].softmax(-1)  # (n, n_lora)
    v = probs.new_ones(probs.shape[0]) if valid is None else valid.to(probs.dtype)  # (n,)
    routed = (gate[:, :n_lora] > 0).to(probs.dtype) * v[:, None]  # (n, n_lora)
    return _switch_balance(routed.sum(0), routed.sum(), probs, v)


def route(x: torch.Tensor, router_weight: torch.Tensor, how: Selection, **options: Any) -> RouterOutput:
    """Router logits (float32, no bias) -> yielding -> selection -> auxiliary loss. x (n, i), router (e, i);
    ``options``: those of ``route_logits``. Under autocast the matmul runs in its dtype, the routing in float32."""
    return route_logits(F.linear(x.float(), router_weight.float()).float(), how, **options)


def route_logits(
    logits: torch.Tensor,
    how: Selection,
    *,
    top_k: int = 2,
    top_p: float = 0.8,
    d: torch.Tensor | None = None,
    n_lora: int | None = None,
    yield_strength: float = 0.0,
    identity_gate: str = "router",
    balance_coef: float = 0.0,
    valid: torch.Tensor | None = None,
) -> RouterOutput:
    """Yielding -> selection -> auxiliary loss from router logits (n, e) float32: those ``route`` computes, or the
    caller's, e.g. from one matmul with the experts' down-projections (SlimLinear's training path)."""
    if n_lora is not None:
        logits = apply_yielding(logits, d, n_lora, yield_strength, identity_gate)
    weights, idx, probs = select(logits, how, top_k=top_k, top_p=top_p, need_probs=balance_coef > 0.0)
    parts: dict[str, torch.Tensor] = {}
    aux = logits.new_zeros(())
    if balance_coef > 0.0:  # callers pass 0 in eval: auxiliary losses are zero there
        lb = load_balance_loss(probs, idx, weights, logits.shape[-1], valid)
        parts["load_balance"] = lb.detach()
        aux = aux + balance_coef * lb
    return RouterOutput(weights=weights, indices=idx, probs=probs, aux_loss=aux, logits=logits, aux_parts=parts)


def lora_balance_loss(logits: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, n_lora: int,
                      valid: torch.Tensor | None = None) -> torch.Tensor:
    """The balance loss N * sum_i f_i P_i among the LoRA experts only (ids < n_lora), unweighted: P_i from a
    softmax over the LoRA logits, f_i the share of the slots routed to a LoRA expert that go to i. Identity slots
    count for neither side: how much goes to the identity experts is the yielding's business, which a balance over
    all experts would fight (it would push in-domain tokens to the identity experts). logits (n, e), indices and
    weights (n, k) -> ()."""
    keep = (indices < n_lora) & (weights > 0)  # (n, k) LoRA slots
    return load_balance_loss(logits[:, :n_lora].softmax(-1), torch.where(keep, indices, 0),
                             weights * keep, n_lora, valid)
