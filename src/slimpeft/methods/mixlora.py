"""MixLoRA and MixLoRA-Dy: a mixture of LoRA-adapted copies of each frozen FFN block.

Li et al., "MixLoRA: Enhancing Large Language Models Fine-Tuning with LoRA-based Mixture of Experts" (2024,
arXiv 2404.15159; reference implementation TUDB-Labs/MoE-PEFT). MixLoRA-Dy is its dynamic (top-p) variant.

Notation: n tokens, e experts, k routed slots per token, h model width, I FFN width, r rank, s = alpha / r,
m kept slots. For every token x (the FFN input, h):

    z = W_g x                                   router logits (e,), float32, no bias
    MixLoRA:    w = softmax over the top-k of z (renormalised), zero elsewhere
    MixLoRA-Dy: p = softmax(z); sort; keep experts until the cumulative probability first exceeds p_top (that one
                included); w = p on the kept experts, no renormalisation
    E_j(x) = FFN with expert j's LoRA on every FFN linear, e.g. for Llama
             E_j(x) = W_d,j( act(W_gate,j x) * (W_up,j x) ),   W_*,j x = W_* x + s B_*,j A_*,j x
             and for GPT-2  E_j(x) = W_proj,j act(W_fc,j x + b_fc) + b_proj
    y = sum_{kept j} w_j E_j(x)
    L_aux = c * N * sum_i f_i P_i               f_i: share of kept slots routed to i, P_i: mean probability of i

Vectorised (no Python loop over experts or tokens): the frozen up-projections (gate/up, or c_fc) run once per
token; each slot adds its expert's LoRA delta through the shared engine (``LoraExperts`` on per-slot inputs). The
frozen down-projection is linear, so it runs once per token on the weighted mix of the slots' hidden states:
sum_j w_j (W_d h_j + b) = W_d (sum_j w_j h_j) + (sum_j w_j) b; only its LoRA delta runs per slot.

Deviations from the published method (also in ``DEVIATIONS``):
* attention LoRA is off by default (``attention_lora=False``): the SLIM paper adapts the MLP only, so the comparison
  gives every method the same adapted modules; the original MixLoRA adds a plain LoRA to q/k/v/o (option).
* no LoRA dropout (the original uses 0.05), as for every method in this comparison.
* padding tokens are excluded from the load-balance statistics f_i and P_i.
"""

from __future__ import annotations

import torch
from torch import nn

from ..experts import LoraExperts
from ..layer import base_shape
from ..model import resolve_targets, set_module
from ..router import route
from .common import AdapterModule, LoraLinear, MoeModel, freeze, seeded_generator
from .config import MixLoraConfig, MixLoraDyConfig

# FFN structures MixLoRA knows: (kind, the block's linear layers in data-flow order)
FFN_KINDS: dict[str, tuple[str, ...]] = {
    "gated": ("gate_proj", "up_proj", "down_proj"),  # llama, mistral, qwen2/3, gemma, olmo, smollm3: act(gate)*up
    "gpt2": ("c_fc", "c_proj"),  # gpt2: c_proj(act(c_fc x))
}
ATTENTION_TARGETS: dict[str, list[str]] = {
    "gated": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
}


def ffn_kind(module: nn.Module) -> str | None:
    if all(hasattr(module, a) for a in FFN_KINDS["gated"]) and hasattr(module, "act_fn"):
        return "gated"
    if all(hasattr(module, a) for a in FFN_KINDS["gpt2"]) and hasattr(module, "act"):
        return "gpt2"
    return None


class MixLoraFFN(AdapterModule):
    """A frozen FFN block (``base_layer``) turned into e LoRA-adapted experts behind one router."""

    routes = True
    dense_routing = False

    def __init__(self, base_layer: nn.Module, name: str, config: MixLoraConfig | MixLoraDyConfig) -> None:
        super().__init__(base_layer, name)
        self.config = config
        self.kind = ffn_kind(base_layer)
        if self.kind is None:
            raise ValueError(f"{name}: {type(base_layer).__name__} is not an FFN block MixLoRA supports "
                             f"(needs {FFN_KINDS['gated']} + act_fn, or {FFN_KINDS['gpt2']} + act)")
        g = seeded_generator(config.seed, name)
        e, r, a = config.n_experts, config.r, config.alpha
        # one stacked expert set per FFN linear: lora_<linear>.lora_A (e, r, i), .lora_B (e, o, r)
        self.lora = nn.ModuleDict({lin: LoraExperts(e, *base_shape(getattr(base_layer, lin)), r, a, generator=g)
                                   for lin in FFN_KINDS[self.kind]})
        self.d_model = base_shape(getattr(base_layer, FFN_KINDS[self.kind][0]))[0]
        self.router = nn.Parameter(torch.randn(e, self.d_model, generator=g) * config.router_init_std)  # (e, h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if self.disabled:
            return base(x)
        cfg, lead = self.config, x.shape[:-1]
        xf = x.reshape(-1, self.d_model)  # (n, h)
        n = xf.shape[0]
        valid = self.valid_mask(lead)
        coef = cfg.balance_coef if self.training else 0.0  # auxiliary losses are zero in eval
        how = cfg.routing
        ro = route(xf, self.router, how, top_k=getattr(cfg, "top_k", 2), top_p=getattr(cfg, "top_p", 0.8),
                   balance_coef=coef, valid=valid)
        if coef > 0:
            self.ctx.aux_losses.append(ro.aux_loss)
        if self.ctx.record:
            self.record(ro.weights, ro.indices, cfg.n_experts, valid)

        k = ro.indices.shape[1]
        tok = torch.arange(n, device=x.device).repeat_interleave(k)  # (n*k,) token of each slot
        ex, w = ro.indices.reshape(-1), ro.weights.reshape(-1)  # (n*k,)
        if how == "top_p":  # dropped slots (weight 0) cost nothing
            keep = w > 0
            tok, ex, w = tok[keep], ex[keep], w[keep]  # (m,)
        one = torch.ones_like(w)[:, None]  # (m, 1) each slot feeds exactly one expert, weight 1
        idx = ex[:, None]  # (m, 1)
        xs = xf[tok]  # (m, h) the slot's token

        if self.kind == "gated":
            gate = base.gate_proj(xf).float()[tok] + self.lora["gate_proj"](xs, one, idx)  # (m, I)
            up = base.up_proj(xf).float()[tok] + self.lora["up_proj"](xs, one, idx)  # (m, I)
            hs = base.act_fn(gate) * up  # (m, I) expert-specific input of the down-projection
            down, down_name = base.down_proj, "down_proj"
        else:
            fc = base.c_fc(xf).float()[tok] + self.lora["c_fc"](xs, one, idx)  # (m, I)
            hs = base.act(fc)  # (m, I)
            down, down_name = base.c_proj, "c_proj"

        wf = w.float()
        hmix = hs.new_zeros(n, hs.shape[1]).index_add(0, tok, hs * wf[:, None])  # (n, I) sum_j w_j h_j
        wdt = down.weight.dtype
        y = down(hmix.to(wdt)).float()  # (n, h) W_d sum_j w_j h_j + b
        if getattr(down, "bias", None) is not None:  # the bias enters sum_j w_j times, not once (top-p: sum < 1)
            wsum = wf.new_zeros(n).index_add(0, tok, wf)  # (n,)
            y = y + (wsum - 1.0)[:, None] * down.bias.float()
        delta = self.lora[down_name](hs, wf[:, None], idx)  # (m, h) w_j s B_d,j A_d,j h_j
        y = y.index_add(0, tok, delta)  # (n, h)
        if self.kind == "gpt2":
            y = base.dropout(y)
        return y.view(*lead, -1).to(x.dtype)


def ffn_blocks(model: nn.Module) -> list[str]:
    """Names of the FFN blocks (modules named ``mlp``) with a structure MixLoRA supports; ValueError otherwise."""
    names = [n for n, m in model.named_modules() if (n == "mlp" or n.endswith(".mlp")) and ffn_kind(m) is not None]
    if not names:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"MixLoRA cannot adapt model type {model_type!r}: it needs FFN blocks named `mlp` with gate_proj/up_proj/"
            "down_proj + act_fn (llama, mistral, qwen2, qwen3, gemma, olmo, smollm3) or c_fc/c_proj + act (gpt2). "
            "Encoders such as BERT split the FFN across two modules and are not supported; use loramoe/mola/lora."
        )
    return names


def build_mixlora(model: nn.Module, config: MixLoraConfig | MixLoraDyConfig) -> MoeModel:
    """Freeze ``model``, replace every FFN block by a MixLoraFFN (and attention projections by LoRA if asked)."""
    blocks = ffn_blocks(model)
    attn: list[str] = []
    if config.attention_lora:
        kind = ffn_kind(model.get_submodule(blocks[0]))
        attn = resolve_targets(model, ATTENTION_TARGETS[kind])
    freeze(model)
    for name in blocks:
        base = model.get_submodule(name)
        layer = MixLoraFFN(base, name, config).to(next(base.parameters()).device)
        set_module(model, name, layer)
    for name in attn:
        base = model.get_submodule(name)
        set_module(model, name, LoraLinear(base, name, config.r, config.alpha, config.seed).to(base.weight.device))
    return MoeModel(model, config.method, config, blocks + attn)


def mixlora_trainable(model: nn.Module, config: MixLoraConfig | MixLoraDyConfig) -> int:
    """Per FFN block: router e*h + sum over its linears of e*r*(i + o); plus r*(i + o) per attention linear."""
    total = 0
    for name in ffn_blocks(model):
        block = model.get_submodule(name)
        lins = FFN_KINDS[ffn_kind(block)]
        h = base_shape(getattr(block, lins[0]))[0]
        total += config.n_experts * h + sum(config.n_experts * config.r * sum(base_shape(getattr(block, lin)))
                                            for lin in lins)
    if config.attention_lora:
        kind = ffn_kind(model.get_submodule(ffn_blocks(model)[0]))
        total += sum(config.r * sum(base_shape(model.get_submodule(n)))
                     for n in resolve_targets(model, ATTENTION_TARGETS[kind]))
    return total


__all__ = ["MixLoraFFN", "build_mixlora", "ffn_blocks", "mixlora_trainable"]
