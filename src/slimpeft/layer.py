"""SlimLinear: a frozen linear layer (``nn.Linear`` or GPT-2's ``Conv1D``) with a SLIM mixture of experts.

For every token x (METHOD.md):

    d(x)  = out-of-domain score from the layer's sliding clusters (no gradient)
    z     = W_r x ;  z'_id = z_id + gamma * d(x)              (weight yielding, identity experts only)
    w     = softmax over top-K of z'                           (zero elsewhere)
    y     = W x + b + s * sum_{i in topK, i LoRA} w_i B'_i A'_i x   (B', A': DARE-masked, "dynamic merging")

Forward contract (as PEFT's tuners): adapter disabled -> exactly the base layer; otherwise base + delta, in the
base output's dtype. Adapter weights and the router are float32 whatever the base dtype.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F
from torch import nn

from .clustering import SlidingClusters
from .config import SlimConfig
from .experts import Dispatch, LoraExperts, auto_dispatch, dense_mix, gated_mix, stack_B
from .masking import apply_fast_masks, dare_delta, dare_mask, fast_masks
from .precision import autocast_off, routing_precision
from .quantization import is_quantized
from .router import apply_yielding, lora_balance_loss, lora_gate_balance_loss, route, route_logits, top_k_gate


@dataclass
class RoutingContext:
    """State shared by all adapted layers of one model during one forward pass."""

    attention_mask: torch.Tensor | None = None  # (b, t_total): marks real tokens; padding is ignored
    # tokens already in the KV cache before this forward pass (0 without a cache), as the cache reported it: an int,
    # or a 0-dim tensor (a static cache), read as an int only where a layer needs it (``past_length``), so that a
    # generation step whose layers do not pool over the sequence neither waits for the device nor breaks a graph
    past: int | torch.Tensor = 0
    # (n,) d carried between layers: the first adapted layer's (ood_source "first") or the running maximum over
    # the layers run so far (ood_source "max"); carried_u is the continuous score behind it
    carried_score: torch.Tensor | None = None
    carried_u: torch.Tensor | None = None
    record: bool = False  # routing_stats(): layers append what they routed to their records
    aux_losses: list[torch.Tensor] = field(default_factory=list)
    # ood_source "prepass": "score" while the scoring pass through the frozen base runs (layers return the base
    # output and carry the running maximum of their own scores), "route" otherwise; fixed_score / fixed_u (n,) are
    # that pass's maximum over all layers, which every layer routes on
    phase: str = "route"
    fixed_score: torch.Tensor | None = None
    fixed_u: torch.Tensor | None = None
    # (b, t) of the scoring pass's call: a layer that sees fewer positions (an output head under logits_to_keep)
    # does not score, and routes on the last positions of the others' score
    score_lead: tuple[int, int] | None = None
    # merged_inference: the scoring pass flagged none of this call's sequences (set by the model, one check per call)
    unflagged: bool = False

    @property
    def past_length(self) -> int:
        """``past`` as an int (one device sync the first time it is read for a tensor)."""
        if torch.is_tensor(self.past):
            self.past = int(self.past)
        return self.past

    def reset(self, attention_mask: torch.Tensor | None, past_length: int | torch.Tensor = 0) -> None:
        self.attention_mask = attention_mask
        self.past = past_length
        self.carried_score = None
        self.carried_u = None
        self.fixed_score = None
        self.fixed_u = None
        self.aux_losses = []
        self.unflagged = False


def valid_token_mask(attention_mask: torch.Tensor | None, lead: torch.Size) -> torch.Tensor | None:
    """(n,) bool mask of real tokens for inputs of leading shape (b, t), from a (b, t_total) attention mask; the last
    t columns, so that it also holds with a KV cache. None when the mask does not fit (every token counts)."""
    m = attention_mask
    if m is None or m.dim() != 2 or len(lead) != 2 or m.shape[0] != lead[0] or m.shape[1] < lead[1]:
        return None
    return (m[:, -lead[1]:] > 0).reshape(-1)


def query_token_mask(attention_mask: torch.Tensor, past: int | torch.Tensor) -> torch.Tensor | None:
    """(b, t) mask (1 = real token) of a call's t query tokens from the 4-D (b, 1, t, k) attention mask transformers
    passes under a static KV cache (bool, or additive: 0 where attended), None for any other shape. A token attends
    to itself exactly when it is real (a padding key is masked for every query), so the mask's diagonal at key
    position ``past + q`` tells. ``past`` may be a 0-dim tensor (a static cache's length): no host read."""
    m = attention_mask
    if m.dim() != 4 or m.shape[1] != 1:
        return None
    b, t, k = m.shape[0], m.shape[2], m.shape[3]
    pos = (torch.arange(t, device=m.device) + past).clamp_max(k - 1)  # (t,) key position of each query token
    diag = m[:, 0].gather(2, pos.view(1, t, 1).expand(b, t, 1)).squeeze(2)  # (b, t)
    return (diag if diag.dtype == torch.bool else diag == 0).long()


def base_shape(layer: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of an nn.Linear or a transformers Conv1D (whose weight is stored transposed, (i, o))."""
    if isinstance(layer, nn.Linear):
        return layer.in_features, layer.out_features
    if type(layer).__name__ == "Conv1D" and hasattr(layer, "nf"):
        return layer.weight.shape[0], layer.weight.shape[1]
    raise TypeError(f"cannot adapt {type(layer).__name__}: only nn.Linear and transformers Conv1D are supported")


def _owns_output(layer: nn.Module) -> bool:
    """Whether ``layer``'s output is a fresh tensor nothing else sees: a plain nn.Linear with no hooks of its own or
    global ones."""
    m = nn.modules.module
    return (type(layer) is nn.Linear and not layer._forward_hooks and not layer._forward_pre_hooks
            and not getattr(m, "_global_forward_hooks", None) and not getattr(m, "_global_forward_pre_hooks", None))


def adapter_tensor_specs(config: SlimConfig, d_in: int, d_out: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor a SlimLinear saves, by state-dict key (checked before loading)."""
    e, r, c, f32 = config.n_lora_experts, config.r, config.n_clusters, torch.float32
    return {
        "router": ((config.n_experts, d_in), f32),
        "experts.lora_A": ((e, r, d_in), f32),
        "experts.lora_B": ((e, d_out, r), f32),
        "clusters.centers": ((c, d_in), f32),
        "clusters.variances": ((c, d_in), f32),
        "clusters.agg_mean": ((c,), f32),
        "clusters.agg_var": ((c,), f32),
        "clusters.pool_mean": ((), f32),
        "clusters.pool_var": ((), f32),
        "clusters.initialized": ((), torch.bool),
        "clusters.n_updates": ((), torch.long),
    }


@dataclass
class EvalWeights:
    """What the eval-mode fast path reuses across forward passes (no gradient), rebuilt when any source changes.

    W stacks, row-wise, the cluster centres (c rows; none when the layer does not score), the router (E rows) and
    the masked down-projections A' (e*r rows), so that one ``addmm`` gives, per token, the nearest-centre criterion,
    the router logits and every expert's down-projection. ``bias`` is -||c||^2 / 2 on the centre columns (0
    elsewhere): argmax_k (x.c_k - ||c_k||^2 / 2) = argmin_k ||x - c_k||^2.
    """

    W: torch.Tensor  # (c + E + e*r, i) float32
    bias: torch.Tensor  # (c + E + e*r,) float32
    n_centers: int  # c, or 0 when no score is needed (no identity expert, no yielding, clusters never trained)
    # (c, 2i + 2) per cluster: centre, 1 / sd per channel, gamma a_k, gamma b_k (clusters.score_affine with the
    # yield strength gamma folded in): gamma d(x) = max(0, gamma a_k agg - gamma b_k) from one row gather per token
    table: torch.Tensor | None
    B_cat: torch.Tensor  # (e*r, o) masked up-projections side by side, times the LoRA scale alpha / r
    A: torch.Tensor  # (e, r, i) masked A (the sparse dispatch's operand)
    B: torch.Tensor  # (e, o, r) masked B


# SlimConfig fields the eval fast path implements (values checked in SlimLinear._fast_eval). A field added later
# must keep its default for the fast path to run: a new routing option falls back to the reference path until the
# fast path is taught it.
_FAST_EVAL_FIELDS = frozenset({
    "r", "alpha", "n_lora_experts", "n_identity_experts", "top_k", "target_modules", "n_clusters",
    "cluster_momentum", "distance", "ood_score", "threshold_std", "ood_pooling", "ood_source", "yield_strength",
    "identity_gate", "mask_rate", "mask_mode", "mask_rescale", "inference_mask", "l1_weight", "balance_coef",
    "router_init_std", "router_lr_scale", "seed", "spread_floor", "yield_in_training", "adapt_output_head",
    "merged_inference", "modules_to_save",
})


@torch.compiler.disable
def _run_eagerly(fn: Callable[[], object]) -> None:
    """``fn()`` outside the compiled graph (a graph break there); a plain call in eager mode would pay for the
    disabling on every call, so only compiled code goes through here."""
    fn()


def _static_address(*tensors: torch.Tensor | None) -> None:
    """Tell torch.compile that the cached inference tensors, like parameters, keep their address between calls:
    CUDA graphs (``mode="reduce-overhead"``) then read them in place instead of copying each into the graph's own
    input buffers before every replay (one copy kernel per tensor and layer and step); a rebuilt cache (new tensors)
    makes them re-record the graph (``torch._dynamo.mark_static_address`` without a guard). No effect eagerly.
    Recent dynamo (torch 2.11 and 2.13 checked) marks tensors held by modules this way by itself; this mark does not
    rely on it."""
    import torch._dynamo  # here, not at import: only a rebuilt cache needs it

    for t in tensors:
        if t is not None:
            torch._dynamo.mark_static_address(t)


def layer_seed(seed: int, name: str) -> int:
    """A stable per-layer seed (same across processes and runs) for init and the fixed inference masks."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31 - 1)


class SlimLinear(nn.Module):
    """A frozen base linear layer plus n_lora LoRA experts, n_identity identity experts and a router."""

    # the expert engine's dispatch ("auto": experts.auto_dispatch, dense everywhere as measured); the speed bench sets
    # it per instance to time both paths -- the math is the same (tests/test_cuda.py)
    dispatch: Dispatch = "auto"

    def __init__(self, base_layer: nn.Module, config: SlimConfig, name: str) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.config = config
        self.name = name
        self.d_in, self.d_out = base_shape(base_layer)
        self.mask_seed = layer_seed(config.seed, name)
        g = torch.Generator().manual_seed(self.mask_seed)
        self.experts = LoraExperts(config.n_lora_experts, self.d_in, self.d_out, config.r, config.alpha, generator=g)
        # small random router init: a zero router would let identity experts win the top-K at step 0 on ties. Stored
        # as V with logits router_lr_scale * V x (config.router_lr_scale): the initial logits do not depend on it
        self.router = nn.Parameter(torch.randn(config.n_experts, self.d_in, generator=g)
                                   * (config.router_init_std / config.router_lr_scale))
        self.clusters = SlidingClusters(self.d_in, config, seed=self.mask_seed)
        self.ctx = RoutingContext()
        self.disabled = False
        self.records: list[dict[str, torch.Tensor]] = []
        self._new_options = [(f.name, f.default) for f in fields(config) if f.name not in _FAST_EVAL_FIELDS]
        self._mask_cache: tuple[tuple, tuple] | None = None
        self._last_u: torch.Tensor | None = None
        # (d, u) of the last training forward: what a gradient-checkpointing recomputation routes on
        self._fwd_score: tuple[torch.Tensor, torch.Tensor | None] | None = None
        # (sum (b,), count (b,), length) of the pooled score over the sequence seen so far, for KV-cache steps
        self._pool_state: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._init_seen: tuple | None = None  # (version, tensor, value) of clusters.initialized
        self.register_load_state_dict_post_hook(SlimLinear._forget_init_flag)
        self._eval_cache: tuple[tuple, EvalWeights] | None = None
        self._merged_cache: tuple[EvalWeights, tuple, torch.Tensor] | None = None  # merged_inference's weight

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        merged = self._merges_base() and self.ctx.phase == "route" and not self.disabled and self._fast_eval()
        if merged and self.ctx.unflagged and not args and not kwargs:
            # every token goes to the one LoRA expert with weight 1: base + (alpha/r) B A x in one matmul
            return F.linear(x, self._merged_weight(), self.base_layer.bias)
        cfg = self.config
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.d_in)  # (n, i)
        # a plain nn.Linear runs on the flattened tokens: its (n, o) output is then a fresh tensor (no view of a
        # (b, t, o) one) that the experts add into in place -- its backward reads x and W, never its output. Not when
        # hooks watch the layer (they could keep its output; DeepSpeed ZeRO-3 gathers weights through them)
        own = _owns_output(self.base_layer) and not args and not kwargs
        result = self.base_layer(xf) if own else self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return self._as_base(result, lead, own)
        if merged and cfg.n_identity_experts >= cfg.top_k and cfg.yield_strength > 0:
            # flagged calls: where every token is flagged (d > 0: its identity logits are the yield, else -inf) and its
            # yield beats the LoRA expert's router logit, the top-K holds identity experts only and the output is the
            # base's, exactly (one small matvec and one check instead of routing)
            d = self._ood_score(xf, lead, None)  # (n,) the scoring pass's score for these tokens
            with autocast_off(xf):  # float32, as the routed path's logits
                logit = xf.float() @ self.router_weight()[0].detach().float()  # (n,) the LoRA expert's router logit
            if bool(((d > 0) & (cfg.yield_strength * d > logit)).all()):
                return self._as_base(result, lead, own)
        if self.ctx.phase == "score":  # the scoring pass of ood_source "prepass": score the base's hidden states
            if self.ctx.score_lead is None or xf.shape[0] == self.ctx.score_lead[0] * self.ctx.score_lead[1]:
                self._ood_score(xf, lead, valid_token_mask(self.ctx.attention_mask, lead))
            return self._as_base(result, lead, own)
        # (n, o): result itself when own (a view, even of the same shape, would make autograd rebase the in-place
        # addition onto result through a copy of the whole gradient)
        base = result if own else result.reshape(-1, self.d_out)
        if self._fast_eval():
            with autocast_off(xf):  # routing in float32 under mixed precision (precision.py)
                return self._eval_forward(xf, base, lead, inplace=own).view(*lead, self.d_out)
        valid = valid_token_mask(self.ctx.attention_mask, lead)  # (n,) bool or None
        d = self._training_score(xf, lead, valid)  # (n,) float32 or None
        gamma = 0.0 if self.training and not cfg.yield_in_training else cfg.yield_strength
        route_kw = dict(top_k=cfg.top_k, d=d, n_lora=cfg.n_lora_experts, yield_strength=gamma,
                        identity_gate=cfg.identity_gate)
        A, B, delta = self._masked_weights()
        ex = self.experts
        dispatch = auto_dispatch(cfg.top_k, ex.n_experts, x.device) if self.dispatch == "auto" else self.dispatch
        gated = None  # (router logits, dense gate) where the compiled dense path routes without topk, else ro
        if delta is None and dispatch == "dense":
            # the router and every expert's down-projection in one matmul: one pass over x forward, and backward one
            # matmul each for x's gradient and for the weights' (autograd splits the latter back through the cat)
            A = ex.lora_A if A is None else A
            e, r, i = A.shape
            # (e*r + E, i) in A's dtype: float32, or bf16 / fp16 where the model was cast (DeepSpeed's bf16 engine)
            W = torch.cat([A.reshape(e * r, i), self.router_weight().to(A.dtype)])
            with routing_precision(xf, self.training):  # autocast's dtype in training, else float32 (precision.py)
                H = xf.to(A.dtype) @ W.T  # (n, e*r + E)
            B = ex.lora_B if B is None else B
            # (n, e*r) down-projections and (n, E) router logits, views of H: split, not two slices, so that backward
            # joins their gradients in one cat (slices: two zero-filled (n, e*r + E) tensors and their sum)
            h, z = H.split([e * r, H.shape[1] - e * r], dim=1)
            if torch.compiler.is_compiling() and not self.ctx.record:
                # the gate from max-reductions the compiler fuses with the routing around it (no topk library call)
                logits = apply_yielding(z.float(), d, cfg.n_lora_experts, gamma, cfg.identity_gate)
                gated = (logits, top_k_gate(logits, cfg.top_k))  # (n, E) each
                y = gated_mix(h, stack_B(B), gated[1][:, :e].to(H.dtype) * ex.scaling, base, inplace=own)
            else:
                ro = route_logits(z.float(), "top_k", **route_kw)
                y = dense_mix(h, stack_B(B), ro.weights, ro.indices, e, ex.scaling, base, inplace=own,
                              width=z.shape[1])  # (n, o) = base + delta
        else:
            with routing_precision(xf, self.training):
                ro = route(xf, self.router_weight(), "top_k", **route_kw)
            y = ex(xf, ro.weights, ro.indices, A=A, B=B, delta=delta, base=base, dispatch=dispatch)
        if self.training and cfg.balance_coef > 0.0 and torch.is_grad_enabled():
            n_lora = cfg.n_lora_experts
            balance = (lora_gate_balance_loss(*gated, n_lora, valid) if gated is not None
                       else lora_balance_loss(ro.logits, ro.indices, ro.weights, n_lora, valid))
            self.ctx.aux_losses.append(cfg.balance_coef * balance)
        if self.ctx.record:
            self._record(ro.weights, ro.indices, d, valid, lead)
        return y.view(*lead, self.d_out)

    def _as_base(self, result: torch.Tensor, lead: torch.Size, own: bool) -> torch.Tensor:
        """The base layer's output in the shape the base layer alone returns (own: it ran on the flat tokens)."""
        return result.view(*lead, self.d_out) if own else result

    def l1_penalty(self) -> torch.Tensor:
        return self.experts.l1_penalty()

    def router_weight(self) -> torch.Tensor:
        """(E, i) the effective router: router_lr_scale * the stored parameter."""
        s = self.config.router_lr_scale
        return self.router if s == 1.0 else self.router * s

    # ------------------------------------------------------------------------------------------ eval fast path
    def _fast_eval(self) -> bool:
        """Inference: eval mode, no gradient, no recording, masks other than exact DARE (every routing level)."""
        cfg = self.config
        return (not self.training and not torch.is_grad_enabled() and not self.ctx.record and cfg.mask_mode != "dare"
                and all(getattr(cfg, name) == default for name, default in self._new_options))

    def _eval_forward(self, xf: torch.Tensor, base: torch.Tensor, lead: torch.Size, inplace: bool = False
                      ) -> torch.Tensor:
        """The reference forward's result in eval mode (same math, checked by tests/test_speed.py) with what does not
        change between calls cached: one addmm for centres, router and down-projections; no mask draw; no copy of B.
        Per-token scores on the layer's own clusters are computed here; pooled or carried scores go through the
        reference path's ``_ood_score`` with the nearest centres and aggregates taken from the fused matmul.
        xf (n, i), base (n, o) -> (n, o); ``inplace``: the result is written into ``base``."""
        cfg, ew = self.config, self._eval_weights()
        x = xf.float()
        H = torch.addmm(ew.bias, x, ew.W.T)  # (n, c + E + e*r)
        c, E, n_lora, i = ew.n_centers, cfg.n_experts, cfg.n_lora_experts, self.d_in
        logits = H[:, c : c + E]  # (n, E) router logits

        def assign() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            k = H[:, :c].max(-1).indices  # (n,) nearest centre (as argmax, faster on a CPU: clustering._assign)
            g = ew.table.index_select(0, k)  # (n, 2i + 2): each token's row of the table
            z = g[:, :i].sub_(x).abs_().mul_(g[:, i : 2 * i])  # (n, i) per-channel z-scores, in g's own rows
            return k, self.clusters.aggregate(z), g

        bump = None  # (n,) gamma d(x): the yield of each token's identity logits
        if cfg.n_identity_experts and cfg.yield_strength != 0.0:
            if cfg.ood_pooling == "token" and cfg.ood_source == "own":
                if c:  # clusters fitted (else d = 0)
                    _, agg, g = assign()
                    bump = (agg * g[:, 2 * i] - g[:, 2 * i + 1]).clamp_min_(0.0)  # the table carries gamma
            else:
                valid = valid_token_mask(self.ctx.attention_mask, lead)
                bump = cfg.yield_strength * self._ood_score(xf, lead, valid, assign=lambda: assign()[:2])
        if cfg.n_identity_experts and cfg.identity_gate == "yield":  # identity only where gamma d > 0
            ident = logits.new_full((logits.shape[0],), float("-inf")) if bump is None else \
                torch.where(bump > 0, bump, float("-inf"))
            logits[:, n_lora:] = ident[:, None]
        elif bump is not None:
            logits[:, n_lora:].add_(bump[:, None])  # in place on the view (`+=` would copy it back onto itself)
        dispatch = auto_dispatch(cfg.top_k, n_lora, x.device) if self.dispatch == "auto" else self.dispatch
        if dispatch == "dense" and torch.compiler.is_compiling():  # max-reductions the compiler fuses, no topk call
            gate = top_k_gate(logits, cfg.top_k)  # (n, E)
        else:
            vals, idx = logits.topk(cfg.top_k, dim=-1)  # (n, k)
            w = vals.softmax(-1)
            if dispatch != "dense":
                return self.experts(x, w, idx, A=ew.A, B=ew.B, base=base, dispatch="sparse")
            gate = logits.new_zeros(logits.shape).scatter_(1, idx, w)  # (n, E)
        # identity columns dropped; B_cat carries the scale
        return gated_mix(H[:, c + E :], ew.B_cat, gate[:, :n_lora], base, inplace=inplace)

    def _eval_weights(self) -> EvalWeights:
        """The cached ``EvalWeights``, rebuilt when any of their sources changed. Under torch.compile the cache is
        used as it is (a compiled graph cannot compare data pointers or version counters without breaking): it is
        dropped on a switch between training and eval mode, ``.to()`` / casts and ``load_state_dict``, and checked
        again by every eager call (the prompt of a compiled ``generate`` is one), so that only adapter weights edited
        in place in eval mode and then run compiled without an eager call in between would be missed."""
        if torch.compiler.is_compiling():
            if self._eval_cache is None:
                _run_eagerly(self._build_eval_cache)  # a graph break, once per dropped cache (see SlimModel.forward)
            return self._eval_cache[1]
        return self._build_eval_cache()

    def _build_eval_cache(self) -> EvalWeights:
        cfg, ex, cl = self.config, self.experts, self.clusters
        # read on every inference call of every layer (flat lists: cheaper than a generator). Through getattr, not the
        # registries: FSDP (use_orig_params=False) swaps parameters for plain tensor attributes
        sources = (ex.lora_A, ex.lora_B, self.router, cl.centers, cl.variances, cl.agg_mean, cl.agg_var,
                   cl.initialized)
        key = (cfg.router_lr_scale, cfg.mask_mode, cfg.mask_rate, cfg.mask_rescale, cfg.inference_mask, cfg.distance,
               cfg.ood_score, cfg.threshold_std, cfg.spread_floor, cfg.yield_strength, cfg.ood_source,
               [id(t) for t in sources], [t._version for t in sources], [t.data_ptr() for t in sources])
        if self._eval_cache is not None and self._eval_cache[0] == key:
            return self._eval_cache[1]
        with torch.no_grad():
            A_m, B_m, _ = self._masked_weights()  # eval: the fixed inference mask (fast mode), or none
            A = (ex.lora_A if A_m is None else A_m).detach().float()
            B = (ex.lora_B if B_m is None else B_m).detach().float()
            e, r, i = A.shape
            scores = (cfg.n_identity_experts > 0 and cfg.yield_strength != 0.0 and cfg.ood_source != "prepass"
                      and self._clusters_initialized())  # prepass: the score comes from the scoring pass
            centers = cl.centers.float() if scores else A.new_zeros(0, i)
            W = torch.cat([centers, self.router_weight().detach().float(), A.reshape(e * r, i)])  # (c + E + e*r, i)
            bias = torch.zeros(W.shape[0], device=W.device)
            bias[: centers.shape[0]] = -0.5 * (centers * centers).sum(-1)
            table = None
            if scores:
                a, b = cl.score_affine()  # (c,) each: d = max(0, a_k agg - b_k)
                gamma = cfg.yield_strength
                table = torch.cat([centers, cl.inv_sd(), (gamma * a)[:, None], (gamma * b)[:, None]], dim=1)
            ew = EvalWeights(W=W, bias=bias, n_centers=centers.shape[0], table=table, B_cat=stack_B(B) * ex.scaling,
                             A=A, B=B)
            _static_address(ew.W, ew.bias, ew.table, ew.B_cat, ew.A, ew.B)
        self._eval_cache = (key, ew)
        return ew

    def _merged_weight(self) -> torch.Tensor:
        """(o, i) W + (alpha/r) B A in the base weight's dtype, cached until the adapter or the base weight change
        (under torch.compile used as it is, as ``_eval_weights``)."""
        if torch.compiler.is_compiling():
            if self._merged_cache is None:
                _run_eagerly(self._build_merged_weight)  # a graph break, once per dropped cache
            return self._merged_cache[2]
        return self._build_merged_weight()

    def _build_merged_weight(self) -> torch.Tensor:
        ew, w = self._eval_weights(), self.base_layer.weight
        key = (w._version, w.data_ptr(), w.dtype)
        if self._merged_cache is None or self._merged_cache[0] is not ew or self._merged_cache[1] != key:
            with torch.no_grad(), autocast_off(w):
                delta = (ew.A.reshape(-1, self.d_in).T @ ew.B_cat).T  # (o, i): sum_e B_e A_e, the scale in B_cat
                self._merged_cache = (ew, key, (w.float() + delta.to(w.device)).to(w.dtype))
                _static_address(self._merged_cache[2])
        return self._merged_cache[2]

    # ------------------------------------------------------------------------------------------ parts
    def _training_score(self, xf: torch.Tensor, lead: torch.Size, valid: torch.Tensor | None) -> torch.Tensor | None:
        """``_ood_score``, except in a gradient-checkpointing recomputation (this forward re-run inside backward):
        there the forward's own score is reused and the clusters are left alone -- they slid once, in the forward;
        scoring again would slide them twice per step and route on statistics the forward did not see. (Reentrant
        checkpointing runs the original forward without gradient: every training forward saves its score.)"""
        if not self.training:
            return self._ood_score(xf, lead, valid)
        if torch.compiler.is_compiling():
            # traced: the score is part of the graph, and a checkpointed region's recomputation replays traced ops,
            # never this Python code (tests/test_compile.py, with and without gradient checkpointing)
            return self._ood_score(xf, lead, valid)
        saved = self._fwd_score
        if torch._C._current_graph_task_id() != -1 and saved is not None and saved[0].shape[0] == xf.shape[0]:
            self._last_u = saved[1]
            return saved[0]
        d = self._ood_score(xf, lead, valid)
        self._fwd_score = None if d is None else (d, self._last_u)
        return d

    @torch.no_grad()
    def _ood_score(self, xf: torch.Tensor, lead: torch.Size, valid: torch.Tensor | None,
                   assign: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor | None:
        """d (n,) of the configured routing level and source (None without identity experts). ``assign`` gives the
        nearest centres and aggregates when the caller has them cheaper than ``clusters.assign`` (eval fast path)."""
        cfg, cl, ctx = self.config, self.clusters, self.ctx
        if cfg.n_identity_experts == 0:  # nothing to yield to: skip the clustering entirely
            return None
        if cfg.ood_source == "prepass" and ctx.phase == "route":
            d, u = ctx.fixed_score, ctx.fixed_u
            if d is not None and d.shape[0] != xf.shape[0] and len(lead) == 2 and lead[0] > 0 \
                    and d.shape[0] % lead[0] == 0 and lead[1] < d.shape[0] // lead[0]:
                # a layer that sees the last positions only (an output head under logits_to_keep): their scores
                d = d.view(lead[0], -1)[:, -lead[1]:].reshape(-1)
                u = None if u is None else u.view(lead[0], -1)[:, -lead[1]:].reshape(-1)
            if d is None or d.shape[0] != xf.shape[0]:
                raise RuntimeError(
                    f"{self.name}: ood_source='prepass' found no scoring-pass score for these {xf.shape[0]} tokens; "
                    "call the adapted model (SlimModel or its base model with the SLIM layers in it), whose forward "
                    "pre-hook runs the scoring pass, not a layer on its own")
            self._last_u = u
            return d
        carried = ctx.carried_score is not None and ctx.carried_score.shape[0] == xf.shape[0]
        if cfg.ood_source == "first" and carried:
            self._last_u = ctx.carried_u
            return ctx.carried_score
        x = xf.detach().float()
        self._last_u = None
        just_initialized = False
        if self.training and not self._clusters_initialized():
            xv = x if valid is None else x[valid]
            if xv.shape[0] > 0:
                cl.initialize(xv)
                just_initialized = True
                # known without reading the flag (torch.compile: _clusters_initialized); version -1: eager mode
                # reads it once more
                self._init_seen = (-1, cl.initialized, True)
        if not self._clusters_initialized():  # never trained: no evidence of anything being out of domain
            d = x.new_zeros(x.shape[0])
        else:
            token = cfg.ood_pooling == "token"
            u, sums = None, None
            if self.training and not just_initialized:  # score and sliding sums in one call
                kind = "u" if not token and cfg.ood_score == "standardized" else cfg.ood_score
                k, agg, u, sums = cl.score_step(x, valid, kind)  # padding weighted out, not copied out
            else:
                k, agg = cl.assign(x) if assign is None else assign()
            if token:
                d = cl.token_score(agg, k) if u is None else u
                if ctx.record:  # the continuous score behind d, for separation (AUROC) reports
                    self._last_u = agg if cfg.ood_score == "paper" else cl.standardize(agg, k)
            else:
                d = self._pooled_score(agg, k, lead, valid, just_initialized, u)
            if sums is not None:
                cl.finish_step(sums)  # after the score: it reads the statistics before this step
        if cfg.ood_source in ("max", "prepass") and carried:  # flagged by any earlier layer -> flagged here too
            d = torch.maximum(d, ctx.carried_score)
            if self._last_u is not None and ctx.carried_u is not None:
                self._last_u = torch.maximum(self._last_u, ctx.carried_u)
        if cfg.ood_source != "own":
            ctx.carried_score, ctx.carried_u = d, self._last_u
        return d

    @staticmethod
    def _forget_init_flag(module: SlimLinear, incompatible_keys: object) -> None:
        """After loading a state dict: ``clusters.initialized`` and the weights may have changed in place; read the
        flag again and rebuild the inference caches."""
        module._init_seen = None
        module.drop_inference_cache()

    def drop_inference_cache(self) -> None:
        """Forget the cached inference weights (``_eval_weights``, merged weight, fixed masks): the next inference call
        rebuilds them. Eager calls notice changed weights themselves; a compiled model needs this after adapter
        weights were edited in place in eval mode (``SlimModel.drop_inference_cache`` does it for every layer)."""
        self._eval_cache = self._merged_cache = self._mask_cache = None

    def train(self, mode: bool = True) -> SlimLinear:
        if mode != self.training:  # training changes the weights the eval caches were built from
            self.drop_inference_cache()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 -- nn.Module's signature
        self.drop_inference_cache()  # .to(device / dtype): the caches hold the old tensors
        return super()._apply(fn, recurse)

    def _clusters_initialized(self) -> bool:
        """``clusters.initialized`` as a Python bool, read from the tensor only when it changed (no per-step sync)."""
        flag = self.clusters.initialized
        seen = self._init_seen
        if torch.compiler.is_compiling() and seen is not None and seen[1] is flag:
            # a compiled graph cannot read the flag (a tensor) without a graph break: the value last read, which the
            # graph is guarded on. It changes only when the clusters are fitted (set below and in _ood_score) or
            # loaded (_forget_init_flag)
            return seen[2]
        if seen is None or seen[0] != flag._version or seen[1] is not flag:
            self._init_seen = seen = (flag._version, flag, bool(flag))
        return seen[2]

    def _needs_eager_prep(self) -> bool:
        """Whether a compiled forward would break inside this layer on what ``_eager_prep`` reads in Python."""
        if self._init_seen is None:
            return True
        if self.training or not self._fast_eval():
            return False
        return self._eval_cache is None or (self._merges_base() and self._merged_cache is None)

    @torch.compiler.disable  # called from compiled code only (SlimModel.forward): a graph break there
    def _eager_prep(self) -> None:
        """Reads the clusters' flag and, in inference, builds the eval caches, outside any compiled graph."""
        self._clusters_initialized()
        if not self.training and self._fast_eval():
            self._build_eval_cache()
            if self._merges_base():
                self._build_merged_weight()

    def _merges_base(self) -> bool:
        """merged_inference on an nn.Linear with float weights (not a quantized one): the layer keeps a merged weight
        (``_merged_weight``)."""
        return (self.config.merged_inference and isinstance(self.base_layer, nn.Linear)
                and not is_quantized(self.base_layer))

    def _pooled_score(self, agg: torch.Tensor, k: torch.Tensor, lead: torch.Size, valid: torch.Tensor | None,
                      just_initialized: bool, u: torch.Tensor | None = None) -> torch.Tensor:
        """d pooled over each sequence ('sequence') or over each prefix ('causal'), broadcast back to tokens; ``u``
        the per-token values to pool when the caller has them (``clusters.score_step``)."""
        cfg, cl = self.config, self.clusters
        b, t = (lead[0], lead[1]) if len(lead) == 2 else (1, agg.shape[0])
        if u is None:
            u = cl.standardize(agg, k) if cfg.ood_score == "standardized" else cl.token_score(agg, k)
        U = u.view(b, t)
        V = torch.ones_like(U) if valid is None else valid.view(b, t).to(U.dtype)
        seq = (U * V).sum(1) / V.sum(1).clamp_min(1.0)  # (b,) mean over real tokens
        if cfg.ood_score == "standardized" and self.training:
            if just_initialized:  # the routing-level spread must exist before the first score is taken
                cl.update_pool_stats(seq, first=True)
        past = self.ctx.past  # tokens in the KV cache before these: an int, or a 0-dim tensor (a static cache)
        total = past + t  # length of the whole sequence so far (KV cache + these t tokens)
        S, N = (U * V).cumsum(1), V.cumsum(1)  # (b, t) running sums and counts of real tokens
        state = self._pool_state
        # a KV-cache step of generation: the new tokens continue the sequence the earlier calls saw, so they pool
        # with it (prefix mean over everything so far) instead of only with themselves
        cont = False  # a Python bool, or a 0-dim tensor with a static cache
        if state is not None and state[0].shape[0] == b and (torch.is_tensor(past) or past > 0):
            cont = (past > 0) & (state[2] == past)
        if torch.is_tensor(cont):  # chosen on the device: no host read (a sync, a graph break under compile)
            fresh = seq[:, None].expand(b, t) if cfg.ood_pooling == "sequence" else S / N.clamp_min(1.0)
            S, N = torch.where(cont, S + state[0][:, None], S), torch.where(cont, N + state[1][:, None], N)
            pooled = torch.where(cont, S / N.clamp_min(1.0), fresh)
        elif cont:
            S, N = S + state[0][:, None], N + state[1][:, None]
            pooled = S / N.clamp_min(1.0)  # (b, t)
        elif cfg.ood_pooling == "sequence":
            pooled = seq[:, None].expand(b, t)  # (b, t)
        else:
            pooled = S / N.clamp_min(1.0)  # (b, t) prefix means
        # what a following KV-cache step continues from (inference only; training never generates)
        self._pool_state = None if self.training else (S[:, -1], N[:, -1], total)
        d = cl.pooled_score(pooled) if cfg.ood_score == "standardized" else pooled
        if self.ctx.record:
            self._last_u = pooled.reshape(-1)
        if cfg.ood_score == "standardized" and self.training and not just_initialized:
            cl.update_pool_stats(seq, first=False)
        return d.reshape(-1)

    def _masked_weights(self) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """(A', B', delta): fresh masks every training step, one fixed mask per expert in eval (or none)."""
        cfg, ex = self.config, self.experts
        if cfg.mask_mode == "none" or cfg.mask_rate == 0.0:
            return None, None, None
        A, B = ex.lora_A, ex.lora_B
        e, dev = ex.n_experts, A.device
        if self.training:
            gen = None  # the global RNG: reproducible under torch.manual_seed, different every step
        elif cfg.inference_mask == "none":
            return None, None, None
        else:
            key = (cfg.mask_mode, dev, A._version, B._version, A.data_ptr(), B.data_ptr())
            if self._mask_cache is not None and self._mask_cache[0] == key:
                return self._mask_cache[1]
            gen = torch.Generator(device="cpu").manual_seed(self.mask_seed)
        if cfg.mask_mode == "fast":
            col, row = fast_masks(e, self.d_in, self.d_out, cfg.mask_rate, rescale=cfg.mask_rescale,
                                  generator=gen, device=dev)
            out = (*apply_fast_masks(A, B, col, row), None)
        else:
            mask = dare_mask(e, self.d_in, self.d_out, cfg.mask_rate, rescale=cfg.mask_rescale, generator=gen,
                             device=dev)
            out = (None, None, dare_delta(A, B, mask))
        if not self.training:
            self._mask_cache = (key, out)
        return out

    @torch.no_grad()
    def _record(self, weights: torch.Tensor, indices: torch.Tensor, d: torch.Tensor | None,
                valid: torch.Tensor | None, lead: torch.Size) -> None:
        """Per-token routing facts for routing_stats / inspect (on CPU, real tokens only)."""
        n_lora = self.config.n_lora_experts
        id_w = (weights * (indices >= n_lora)).sum(-1)  # (n,)
        slots = torch.zeros(indices.shape[0], self.config.n_experts, device=weights.device)
        slots.scatter_add_(1, indices, (weights > 0).float())  # (n, e) slot counts
        d = torch.zeros_like(id_w) if d is None else d
        b = lead[0] if len(lead) == 2 else 1
        seq_id = torch.arange(b, device=weights.device).repeat_interleave(id_w.shape[0] // b)
        u = d if self._last_u is None else self._last_u  # continuous score behind d
        rec = {"identity_weight": id_w, "slots": slots, "d": d.float(), "u": u.float(), "seq": seq_id}
        if valid is not None:
            rec = {k: v[valid] for k, v in rec.items()}
        self.records.append({k: v.cpu() for k, v in rec.items()})
