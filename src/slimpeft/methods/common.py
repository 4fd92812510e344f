"""What the MoE-LoRA baselines share: the adapter-module base class, a plain LoRA layer, and the MoeModel wrapper.

MoeModel gives every method SLIM's interface (slimpeft.model.SlimModel):

    out = model(input_ids=..., labels=...)        # training: out.loss includes the method's auxiliary losses
    model.routing_stats(input_ids=...)            # {layer: RoutingStats}, eval mode, no state change
    model.save_pretrained("out/")                 # adapter_config.json (sorted keys) + adapter_model.safetensors
    methods.load(name, hf_model, "out/")          # checked before the loaded tensors are used

Notation: b batch, t tokens per sequence, n = b*t tokens, e experts, k routed slots per token, i = d_in,
o = d_out, r rank.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..experts import LoraExperts
from ..layer import RoutingContext, base_shape, layer_seed, valid_token_mask
from ..model import (
    CONFIG_NAME,
    AdaptedModel,
    RoutingStats,
    load_layer_tensors,
    misfit_error,
    read_method_dir,
    saved_specs,
    tensor_problems,
    verify_checksum,
    warn_other_base_type,
)
from ..router import RouterOutput
from .config import MethodConfig


@dataclass
class MoeContext(RoutingContext):
    """RoutingContext plus LoRAMoE's per-sample type (b,), set from ``model(..., sample_type=...)``."""

    sample_type: torch.Tensor | None = None


def layer_index(name: str) -> int | None:
    """Depth of a module from its name: the first integer component (``model.layers.3.mlp`` -> 3)."""
    m = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
    return int(m.group(1)) if m else None


def seeded_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(layer_seed(seed, name))


def kaiming_router(n_experts: int, d_in: int, g: torch.Generator) -> torch.Tensor:
    """nn.Linear's default init, U(-1/sqrt(i), 1/sqrt(i)), as LoRAMoE's and MoLA's routers. (e, i)"""
    bound = 1.0 / d_in**0.5
    return (torch.rand(n_experts, d_in, generator=g) * 2.0 - 1.0) * bound


class AdapterModule(nn.Module):
    """A frozen ``base_layer`` (a linear layer or a whole FFN block) plus trainable adapter tensors.

    Contract (as PEFT's tuners): disabled -> exactly the base; otherwise base + adapter, in the base output's dtype.
    Adapter tensors and routers are float32 whatever the base dtype. ``routes`` marks modules with a router.
    """

    routes = False

    def __init__(self, base_layer: nn.Module, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.name = name
        self.ctx: MoeContext = MoeContext()
        self.disabled = False
        self.records: list[dict[str, torch.Tensor]] = []

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("base_layer.")}

    # ------------------------------------------------------------------ helpers for routed subclasses
    def valid_mask(self, lead: torch.Size) -> torch.Tensor | None:
        """(n,) bool real-token mask from the captured attention mask, or None (same rule as SlimLinear)."""
        return valid_token_mask(self.ctx.attention_mask, lead)

    @torch.no_grad()
    def record(self, weights: torch.Tensor, indices: torch.Tensor, n_experts: int, valid: torch.Tensor | None) -> None:
        """Per-token slot counts and routing weights per expert, for routing_stats (real tokens only, on CPU)."""
        n = indices.shape[0]
        slots = torch.zeros(n, n_experts, device=weights.device).scatter_add_(
            1, indices, (weights > 0).float())  # (n, e)
        mass = torch.zeros(n, n_experts, device=weights.device).scatter_add_(1, indices, weights.float())  # (n, e)
        rec = {"slots": slots, "weight": mass}
        if valid is not None:
            rec = {k: v[valid] for k, v in rec.items()}
        self.records.append({k: v.cpu() for k, v in rec.items()})


class RoutedLinear(AdapterModule):
    """A frozen linear layer plus e LoRA experts and its own router (LoRAMoE, MoLA).

    Subclasses choose the routing in ``route`` (which also appends their auxiliary loss in training) and the
    expert dispatch in ``dispatch``; construction, masking of padding, recording and the output contract are here.
    """

    routes = True
    dispatch = "auto"

    def __init__(self, base_layer: nn.Module, name: str, config: MethodConfig, n_experts: int) -> None:
        super().__init__(base_layer, name)
        self.config = config
        self.n_experts = n_experts
        self.d_in, self.d_out = base_shape(base_layer)
        g = seeded_generator(config.seed, name)
        self.experts = LoraExperts(n_experts, self.d_in, self.d_out, config.r, config.alpha, generator=g)
        self.router = nn.Parameter(kaiming_router(n_experts, self.d_in, g))  # (e, i), as nn.Linear's init

    def route(self, xf: torch.Tensor, lead: torch.Size, valid: torch.Tensor | None) -> RouterOutput:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.d_in)  # (n, i)
        valid = self.valid_mask(lead)
        ro = self.route(xf, lead, valid)  # weights / indices (n, k)
        y = self.experts(xf, ro.weights, ro.indices, dispatch=self.dispatch)  # (n, o)
        if self.ctx.record:
            self.record(ro.weights, ro.indices, self.n_experts, valid)
        return result + y.view(*lead, self.d_out).to(result.dtype)


class LoraLinear(AdapterModule):
    """Plain LoRA, y = W x + b + s B A x, on the shared expert engine (one expert, weight 1).

    Used for MixLoRA's optional attention LoRA.
    """

    def __init__(self, base_layer: nn.Module, name: str, r: int, alpha: float, seed: int) -> None:
        super().__init__(base_layer, name)
        self.d_in, self.d_out = base_shape(base_layer)
        self.lora = LoraExperts(1, self.d_in, self.d_out, r, alpha, generator=seeded_generator(seed, name))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        xf = x.reshape(-1, self.d_in)  # (n, i)
        ones = xf.new_ones(xf.shape[0], 1, dtype=torch.float32)  # (n, 1) the single expert, weight 1
        zeros = torch.zeros(xf.shape[0], 1, dtype=torch.long, device=x.device)  # (n, 1) expert id 0
        y = self.lora(xf, ones, zeros, dispatch="dense")  # (n, o)
        return result + y.view(*x.shape[:-1], self.d_out).to(result.dtype)


# ============================================================================================== the model wrapper
Injector = Callable[[nn.Module, MethodConfig], list[str]]


class MoeModel(AdaptedModel):
    """A HuggingFace model with one baseline method's adapters injected. Missing attributes come from the base."""

    layer_type = AdapterModule

    def __init__(self, model: nn.Module, method: str, config: MethodConfig, layer_names: list[str]) -> None:
        super().__init__(model, layer_names, MoeContext(), getattr(config, "modules_to_save", None))
        self.method = method
        self.method_config = config
        self._sample_type: torch.Tensor | None = None

    def _capture_context(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        super()._capture_context(module, args, kwargs)
        self.ctx.sample_type = self._sample_type

    def forward(self, *args: Any, sample_type: torch.Tensor | None = None, labels: Any = None, **kwargs: Any) -> Any:
        """The base model's forward. ``sample_type`` (b,) is LoRAMoE's per-sample type (ignored by the others)."""
        self._sample_type = sample_type
        try:
            return super().forward(*args, labels=labels, **kwargs)
        finally:
            self._sample_type = None

    def routing_stats(self, **inputs: Any) -> dict[str, RoutingStats]:
        """Expert usage of every routed layer (same report as SLIM; these methods have no identity experts or OOD
        score, so ``identity_weight``, ``ood_score`` and ``ood_flagged`` are 0).

        ``expert_load``: share of the routed slots per expert for the top-k/top-p methods; for dense routing
        (LoRAMoE, where every expert gets a slot) the share of the routing weight, which is what varies.
        """
        stats = {}
        for name, rec in self.routing_records(**inputs).items():
            if not rec:
                continue
            dense = getattr(self.adapter_layers()[name], "dense_routing", False)
            load = rec["weight" if dense else "slots"].sum(0)  # (e,)
            stats[name] = RoutingStats(identity_weight=0.0, expert_load=(load / load.sum().clamp_min(1e-12)).tolist(),
                                       ood_score=0.0, ood_flagged=0.0, n_tokens=int(rec["slots"].shape[0]))
        return stats

    def _meta(self) -> dict[str, Any]:
        return {"method": self.method, "config": self.method_config.to_dict(),
                "layers": {n: type(m).__name__ for n, m in self.adapter_layers().items()}}


def load_moe(model: nn.Module, adapter_dir: str | os.PathLike, method: str, config_cls: type[MethodConfig],
             build: Callable[[nn.Module, MethodConfig], MoeModel], *, is_trainable: bool = False) -> MoeModel:
    """Rebuild the method's structure from the saved config, check names/shapes, then load the tensors.

    On any mismatch the injected layers are removed again and ValueError lists the problems.
    """
    meta, tensors = read_method_dir(adapter_dir, method)
    cfg = config_cls.from_dict(meta["config"], where=str(Path(adapter_dir) / CONFIG_NAME))
    grad_before = {id(p): p.requires_grad for p in model.parameters()}
    wrapped = build(model, cfg)
    problems = []
    saved_layers, built = meta.get("layers"), wrapped.adapter_layers()
    if isinstance(saved_layers, dict) and sorted(saved_layers) != sorted(built):
        diff = sorted(set(saved_layers) ^ set(built))[:3]
        problems.append(f"adapted layers differ: saved {len(saved_layers)}, this base model gives {len(built)} "
                        f"(e.g. {diff})")
    problems += tensor_problems(saved_specs(wrapped.adapter_state_dict()), tensors)

    def undo() -> None:
        wrapped.restore_base()
        for p in model.parameters():
            p.requires_grad_(grad_before.get(id(p), p.requires_grad))

    if problems:
        undo()
        raise misfit_error(adapter_dir, f"the saved {method!r} adapter", problems)
    try:
        verify_checksum(adapter_dir)  # a tampered file can still be a well-formed one
    except ValueError:
        undo()
        raise
    warn_other_base_type(model, adapter_dir)
    load_layer_tensors(wrapped.adapter_parts(), tensors)
    wrapped.train(False)
    if not is_trainable:
        for p in wrapped.parameters():
            p.requires_grad_(False)
    return wrapped


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
