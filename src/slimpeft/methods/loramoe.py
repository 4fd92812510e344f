"""LoRAMoE: a dense mixture of LoRA experts on every FFN linear, with a localized balancing constraint.

Dou et al., "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language Models via MoE-Style Plugin"
(ACL 2024, arXiv 2312.09979; reference implementation Ablustrund/LoRAMoE).

Notation: b samples, t tokens per sample, e experts (two groups of e/2), i = d_in, o = d_out, s = alpha / r.
For every adapted linear y = W x + b and token x:

    w = softmax(W_r x)                               dense: every expert, no top-k (W_r: e x i, no bias, float32)
    y = W x + b + s * sum_{j=1..e} w_j B_j A_j x

Localized balancing constraint, per layer, for a batch of b samples:

    Q_{n,j}  = sum_{tokens of sample n} w_j                          importance (b, e)
    Z_{n,j}  = 1 + delta  if expert j is in the group of sample n's type, else 1 - delta
    L_lbc    = beta * Var(Z * Q) / Mean(Z * Q)^2                      over all b*e entries (unbiased variance)

Sample types. Group 0 is experts [0, e/2), group 1 is [e/2, e). Pass ``model(..., sample_type=tensor(b,))`` with
0 or 1 per sample (-1: untyped, Z = 1). Our training data carries no type (the original labels world-knowledge vs.
other tasks), so by default every sample is treated as one type, ``default_sample_type=0``: all samples weight group
0 by 1 + delta and group 1 by 1 - delta. ``default_sample_type=-1`` gives a plain CV^2 balance instead.

Deviations from the published method (also in ``DEVIATIONS``):
* the original labels samples by type (task_types 1 -> first group, 0 -> second); ours uses type t -> group t and,
  without labels, one type for all samples (above);
* padding tokens are excluded from Q (the original sums every position);
* default r = 16 (the SLIM paper's comparison; the LoRAMoE scripts use r = 4, alpha = 32), no LoRA dropout (0.05),
  beta = delta = 0.1 as in the paper (its released script sets both to 0).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layer import base_shape
from ..model import resolve_targets, set_module
from ..router import RouterOutput, route
from .common import MoeModel, RoutedLinear, freeze
from .config import LoraMoeConfig


def cv_squared(q: torch.Tensor) -> torch.Tensor:
    """Var(q) / Mean(q)^2 over all entries (unbiased variance, as the reference implementation)."""
    q = q.float().flatten()
    if q.numel() < 2:
        return q.sum() * 0.0
    return q.var() / (q.mean() ** 2 + 1e-10)


def group_weights(sample_type: torch.Tensor, n_experts: int, delta: float) -> torch.Tensor:
    """Z (b, e): 1 + delta on the group of each sample's type, 1 - delta on the other; 1 everywhere for type -1."""
    half = n_experts // 2
    group = (torch.arange(n_experts, device=sample_type.device) >= half).long()  # (e,) 0 or 1
    st = sample_type.long()[:, None]  # (b, 1)
    z = torch.where(group[None, :] == st, 1.0 + delta, 1.0 - delta)  # (b, e)
    return torch.where(st < 0, torch.ones_like(z), z)


class LoraMoeLinear(RoutedLinear):
    """A frozen linear layer plus e LoRA experts mixed densely by a softmax router."""

    dense_routing = True
    dispatch = "dense"

    def __init__(self, base_layer: nn.Module, name: str, config: LoraMoeConfig) -> None:
        super().__init__(base_layer, name, config, config.n_experts)

    def route(self, xf: torch.Tensor, lead: torch.Size, valid: torch.Tensor | None) -> RouterOutput:
        cfg = self.config
        ro = route(xf, self.router, "dense")  # weights (n, e) = softmax, indices (n, e) = 0..e-1
        if self.training and cfg.balance_coef > 0:
            self.ctx.aux_losses.append(cfg.balance_coef * self.balance_loss(ro.weights, lead, valid))
        return ro

    def balance_loss(self, weights: torch.Tensor, lead: torch.Size, valid: torch.Tensor | None) -> torch.Tensor:
        """Unweighted localized balancing constraint Var(Z Q) / Mean(Z Q)^2 of this layer's routing."""
        cfg = self.config
        b = lead[0] if len(lead) == 2 else 1
        w = weights if valid is None else weights * valid[:, None].to(weights.dtype)  # padding adds nothing to Q
        Q = w.view(b, -1, cfg.n_experts).sum(1)  # (b, e) per-sample importance
        st = self.ctx.sample_type
        if st is None:
            st = torch.full((b,), cfg.default_sample_type, dtype=torch.long, device=w.device)
        else:
            st = torch.as_tensor(st, device=w.device).reshape(-1)
            if st.numel() != b:
                raise ValueError(f"`sample_type` has {st.numel()} entries; the batch has {b} samples")
        return cv_squared(Q * group_weights(st, cfg.n_experts, cfg.balance_delta))


def build_loramoe(model: nn.Module, config: LoraMoeConfig) -> MoeModel:
    names = resolve_targets(model, config.target_modules)
    freeze(model)
    for name in names:
        base = model.get_submodule(name)
        set_module(model, name, LoraMoeLinear(base, name, config).to(base.weight.device))
    return MoeModel(model, config.method, config, names)


def loramoe_trainable(model: nn.Module, config: LoraMoeConfig) -> int:
    """Per adapted linear (i -> o): router e*i + experts e*r*(i + o)."""
    e, r = config.n_experts, config.r
    return sum(e * i + e * r * (i + o) for i, o in
               (base_shape(model.get_submodule(n)) for n in resolve_targets(model, config.target_modules)))
