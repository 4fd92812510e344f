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
             and for BERT   E_j(x) = W_out,j act(W_in,j x + b_in) + b_out   (intermediate.dense -> output.dense)
    y = sum_{kept j} w_j E_j(x)
    L_aux = c * N * sum_i f_i P_i               f_i: share of kept slots routed to i, P_i: mean probability of i

Vectorised (no Python loop over experts or tokens): the frozen up-projections (gate/up, or c_fc) run once per
token; each slot adds its expert's LoRA delta through the shared engine (``LoraExperts`` on per-slot inputs). The
frozen down-projection is linear, so it runs once per token on the weighted mix of the slots' hidden states:
sum_j w_j (W_d h_j + b) = W_d (sum_j w_j h_j) + (sum_j w_j) b; only its LoRA delta runs per slot.

BERT-style encoders (BERT, RoBERTa, ...) split the FFN across two modules: ``intermediate`` (dense + activation)
and ``output`` (dense, dropout, then the residual LayerNorm). The mixture goes where the FFN starts: a MixLoraFFN
replaces ``intermediate`` and returns sum_j w_j E_j(x) (width h, the FFN's output), and ``output.dense`` is replaced
by a ``MixLoraTail`` that passes it on, so ``output`` still applies its dropout and LayerNorm(. + residual). Disabled,
the two are exactly the base modules again.

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
from ..quantization import input_dtype
from ..router import route
from .common import AdapterModule, LoraLinear, MoeModel, freeze, seeded_generator
from .config import MixLoraConfig, MixLoraDyConfig

# FFN structures MixLoRA knows: kind -> the block's linear layers (paths inside the block), in data-flow order
FFN_KINDS: dict[str, tuple[str, ...]] = {
    "gated": ("gate_proj", "up_proj", "down_proj"),  # llama, mistral, qwen2/3, gemma, olmo, smollm3: act(gate)*up
    "gpt2": ("c_fc", "c_proj"),  # gpt2: c_proj(act(c_fc x))
    "bert": ("intermediate.dense", "output.dense"),  # bert, roberta: block = the encoder layer
}
ATTENTION_TARGETS: dict[str, list[str]] = {
    "gated": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
    "gpt2": ["attn.c_attn", "attn.c_proj"],
    "bert": ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"],
}


def ffn_kind(module: nn.Module) -> str | None:
    if all(hasattr(module, a) for a in FFN_KINDS["gated"]) and hasattr(module, "act_fn"):
        return "gated"
    if all(hasattr(module, a) for a in FFN_KINDS["gpt2"]) and hasattr(module, "act"):
        return "gpt2"
    inter, out = getattr(module, "intermediate", None), getattr(module, "output", None)
    if (hasattr(inter, "dense") and hasattr(inter, "intermediate_act_fn") and hasattr(out, "dense")
            and hasattr(out, "LayerNorm")):
        return "bert"
    return None


def _key(path: str) -> str:
    """ModuleDict key of an FFN linear (no dots): 'intermediate.dense' -> 'intermediate_dense'."""
    return path.replace(".", "_")


class MixLoraFFN(AdapterModule):
    """A frozen FFN block (``base_layer``) turned into e LoRA-adapted experts behind one router."""

    routes = True
    dense_routing = False

    def __init__(self, base_layer: nn.Module, name: str, config: MixLoraConfig | MixLoraDyConfig,
                 block: nn.Module | None = None) -> None:
        """``base_layer``: the module this one replaces; ``block``: the whole FFN block when that is larger (BERT's
        encoder layer, whose ``intermediate`` is replaced), else ``base_layer`` itself."""
        super().__init__(base_layer, name)
        self.config = config
        block = base_layer if block is None else block
        self.kind = ffn_kind(block)
        if self.kind is None:
            raise ValueError(f"{name}: {type(block).__name__} is not an FFN block MixLoRA supports "
                             f"(needs {FFN_KINDS['gated']} + act_fn, {FFN_KINDS['gpt2']} + act, or BERT's "
                             "intermediate.dense + intermediate_act_fn and output.dense + LayerNorm)")
        # the frozen FFN linears by path; a plain dict (not registered here): they are registered where they live
        self.linears: dict[str, nn.Module] = {path: block.get_submodule(path) for path in FFN_KINDS[self.kind]}
        g = seeded_generator(config.seed, name)
        e, r, a = config.n_experts, config.r, config.alpha
        # one stacked expert set per FFN linear: lora.<linear>.lora_A (e, r, i), .lora_B (e, o, r)
        self.lora = nn.ModuleDict({_key(path): LoraExperts(e, *base_shape(lin), r, a, generator=g)
                                   for path, lin in self.linears.items()})
        self.d_model = base_shape(self.linears[FFN_KINDS[self.kind][0]])[0]
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

        def up(path: str) -> torch.Tensor:  # (m, I) W x + b with expert j's LoRA, per slot
            return self.linears[path](xf).float()[tok] + self.lora[_key(path)](xs, one, idx)

        if self.kind == "gated":
            hs = base.act_fn(up("gate_proj")) * up("up_proj")  # (m, I) expert-specific input of the down-projection
        elif self.kind == "gpt2":
            hs = base.act(up("c_fc"))  # (m, I)
        else:
            hs = base.intermediate_act_fn(up("intermediate.dense"))  # (m, I)
        down_path = FFN_KINDS[self.kind][-1]
        down = self.linears[down_path]

        wf = w.float()
        hmix = hs.new_zeros(n, hs.shape[1]).index_add(0, tok, hs * wf[:, None])  # (n, I) sum_j w_j h_j
        y = down(hmix.to(input_dtype(down, hmix))).float()  # (n, h) W_d sum_j w_j h_j + b
        if getattr(down, "bias", None) is not None:  # the bias enters sum_j w_j times, not once (top-p: sum < 1)
            wsum = wf.new_zeros(n).index_add(0, tok, wf)  # (n,)
            y = y + (wsum - 1.0)[:, None] * down.bias.float()
        delta = self.lora[_key(down_path)](hs, wf[:, None], idx)  # (m, h) w_j s B_d,j A_d,j h_j
        y = y.index_add(0, tok, delta.to(y.dtype))  # (n, h); delta in autocast's dtype under mixed precision
        if self.kind == "gpt2":
            y = base.dropout(y)
        return y.view(*lead, -1).to(x.dtype)


class MixLoraTail(AdapterModule):
    """BERT's ``output.dense`` under MixLoRA: the mixture before it already applied it (per expert), so it passes its
    input on; when the mixture is disabled it is the base linear again. No tensors of its own."""

    def __init__(self, base_layer: nn.Module, name: str, head: MixLoraFFN) -> None:
        super().__init__(base_layer, name)
        self.__dict__["head"] = head  # not registered: the head is a module of the model in its own right

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.base_layer(h) if self.disabled or self.head.disabled else h


def ffn_blocks(model: nn.Module) -> list[str]:
    """Names of the FFN blocks with a structure MixLoRA supports (modules named ``mlp``, or BERT-style encoder
    layers); ValueError otherwise."""
    def is_block(name: str, module: nn.Module) -> bool:
        kind = ffn_kind(module)
        return kind == "bert" or (kind is not None and (name == "mlp" or name.endswith(".mlp")))

    names = [n for n, m in model.named_modules() if is_block(n, m)]
    if not names:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        raise ValueError(
            f"MixLoRA cannot adapt model type {model_type!r}: it needs FFN blocks named `mlp` with gate_proj/up_proj/"
            "down_proj + act_fn (llama, mistral, qwen2, qwen3, gemma, olmo, smollm3) or c_fc/c_proj + act (gpt2), or "
            "encoder layers with intermediate.dense/intermediate_act_fn and output.dense/LayerNorm (bert, roberta); "
            "use loramoe/mola/lora for other models."
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
    names: list[str] = []
    for name in blocks:
        block = model.get_submodule(name)
        dev = next(block.parameters()).device
        if ffn_kind(block) == "bert":  # the mixture replaces `intermediate`, a pass-through `output.dense`
            head = MixLoraFFN(block.intermediate, f"{name}.intermediate", config, block=block).to(dev)
            tail = MixLoraTail(block.output.dense, f"{name}.output.dense", head)
            set_module(model, head.name, head)
            set_module(model, tail.name, tail)
            names += [head.name, tail.name]
        else:
            set_module(model, name, MixLoraFFN(block, name, config).to(dev))
            names.append(name)
    for name in attn:
        base = model.get_submodule(name)
        set_module(model, name, LoraLinear(base, name, config.r, config.alpha, config.seed).to(base.weight.device))
    return MoeModel(model, config.method, config, names + attn)


def mixlora_trainable(model: nn.Module, config: MixLoraConfig | MixLoraDyConfig) -> int:
    """Per FFN block: router e*h + sum over its linears of e*r*(i + o); plus r*(i + o) per attention linear."""
    total = 0
    for name in ffn_blocks(model):
        block = model.get_submodule(name)
        lins = [block.get_submodule(path) for path in FFN_KINDS[ffn_kind(block)]]
        h = base_shape(lins[0])[0]
        total += config.n_experts * h + sum(config.n_experts * config.r * sum(base_shape(lin)) for lin in lins)
    if config.attention_lora:
        kind = ffn_kind(model.get_submodule(ffn_blocks(model)[0]))
        total += sum(config.r * sum(base_shape(model.get_submodule(n)))
                     for n in resolve_targets(model, ATTENTION_TARGETS[kind]))
    return total


__all__ = ["MixLoraFFN", "MixLoraTail", "build_mixlora", "ffn_blocks", "mixlora_trainable"]
