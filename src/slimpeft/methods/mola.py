"""MoLA: a top-k mixture of LoRA experts per linear layer, with more experts in higher layers.

Gao et al., "Higher Layers Need More LoRA Experts" (2024, arXiv 2402.08562; reference implementation GCYZSL/MoLA).

Notation: L transformer layers, G depth groups (len of the schedule), e_l experts of layer l, k top-k, i = d_in,
o = d_out, s = alpha / r. For an adapted linear y = W x + b in layer l and token x:

    e_l = schedule[floor(l * G / L)]                  e.g. 2/4/6/8 experts per quarter of the depth ("MoLA-triangle")
    z   = W_r x                                        (e_l,), own router per linear, float32, no bias
    w   = softmax over the top-k of z (renormalised), zero elsewhere
    y   = W x + b + s * sum_{j in top-k} w_j B_j A_j x
    L_aux = c * N * sum_j f_j P_j                      optional (c = balance_coef, default 0 = off)

Deviations from the published method (also in ``DEVIATIONS``):
* targets default to the MLP projections (the SLIM comparison adapts the MLP); MoLA adapts q/k/v/o and the MLP
  (pass ``target_modules`` to do so);
* no LoRA dropout (the original uses 0.05);
* the layer of a module is the first integer in its name; L is ``config.num_hidden_layers`` of the base model
  (or the largest index + 1).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layer import base_shape
from ..model import resolve_targets, set_module
from ..router import RouterOutput, route
from .common import MoeModel, RoutedLinear, freeze, layer_index
from .config import MolaConfig


def experts_per_layer(model: nn.Module, names: list[str], schedule: list[int]) -> dict[str, int]:
    """e_l of every adapted linear from its layer index: schedule[floor(l * G / L)]."""
    idx = {n: layer_index(n) for n in names}
    missing = [n for n, i in idx.items() if i is None]
    if missing:
        raise ValueError(f"MoLA needs a layer index in every adapted module name to apply `experts_schedule`; "
                         f"none in {missing[:3]}")
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None) or max(idx.values()) + 1
    n_layers = max(n_layers, max(idx.values()) + 1)
    G = len(schedule)
    return {n: schedule[min(i * G // n_layers, G - 1)] for n, i in idx.items()}


class MolaLinear(RoutedLinear):
    """A frozen linear layer plus e_l LoRA experts and an own top-k router."""

    dense_routing = False

    def __init__(self, base_layer: nn.Module, name: str, config: MolaConfig, n_experts: int) -> None:
        super().__init__(base_layer, name, config, n_experts)

    def route(self, xf: torch.Tensor, lead: torch.Size, valid: torch.Tensor | None) -> RouterOutput:
        cfg = self.config
        coef = cfg.balance_coef if self.training else 0.0
        ro = route(xf, self.router, "top_k", top_k=cfg.top_k, balance_coef=coef, valid=valid)  # (n, k) each
        if coef > 0:
            self.ctx.aux_losses.append(ro.aux_loss)
        return ro


def build_mola(model: nn.Module, config: MolaConfig) -> MoeModel:
    names = resolve_targets(model, config.target_modules)
    counts = experts_per_layer(model, names, list(config.experts_schedule))
    freeze(model)
    for name in names:
        base = model.get_submodule(name)
        set_module(model, name, MolaLinear(base, name, config, counts[name]).to(base.weight.device))
    return MoeModel(model, config.method, config, names)


def mola_trainable(model: nn.Module, config: MolaConfig) -> int:
    """Per adapted linear (i -> o) in layer l: router e_l*i + experts e_l*r*(i + o)."""
    names = resolve_targets(model, config.target_modules)
    counts = experts_per_layer(model, names, list(config.experts_schedule))
    total = 0
    for n in names:
        i, o = base_shape(model.get_submodule(n))
        total += counts[n] * i + counts[n] * config.r * (i + o)
    return total
