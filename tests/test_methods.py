"""SLIM and the baselines under one interface: one table run through shared helpers, then method-specific checks."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from slimpeft import SlimConfig, methods
from slimpeft.experts import LoraExperts
from slimpeft.methods.common import MoeModel
from slimpeft.methods.loramoe import LoraMoeLinear
from slimpeft.methods.mixlora import MixLoraFFN
from slimpeft.methods.mola import MolaLinear

H, INTER = 32, 64  # tiny width and FFN width (GPT-2's FFN is 4 * H = 128)


def tiny_llama(n_layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=H, intermediate_size=INTER, num_hidden_layers=n_layers,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(n_layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_embd=H, n_layer=n_layers, n_head=4, n_positions=64, bos_token_id=1,
                     eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    return BertModel(BertConfig(vocab_size=97, hidden_size=H, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=INTER, max_position_embeddings=64)).eval()


FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}
# (d_in, d_out) of the FFN linears of one block, in data-flow order, and the attention linears of one block
FFN = {"llama": [(H, INTER), (H, INTER), (INTER, H)], "gpt2": [(H, 4 * H), (4 * H, H)]}
ATTN = {"llama": [(H, H)] * 4, "gpt2": [(H, 3 * H), (H, H)]}
N_LAYERS = 2


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, 97, (3, 12), generator=torch.Generator().manual_seed(123))


# ------------------------------------------------------------------------------------------ trainable formulas
def expected_trainable(method: str, family: str, ov: dict) -> int:
    """Trainable parameters by hand, per method, from the layer shapes above."""
    ffn = FFN[family]
    s_i = sum(i for i, _ in ffn)  # sum of d_in over the block's FFN linears
    s_io = sum(i + o for i, o in ffn)  # sum of d_in + d_out
    s_o = sum(o for _, o in ffn)
    if method == "slim":
        n_lora, n_id = ov.get("n_lora_experts", 8), ov.get("n_identity_experts", 2)
        return N_LAYERS * ((n_lora + n_id) * s_i + n_lora * ov["r"] * s_io)  # routers + experts
    if method == "lora":
        return N_LAYERS * ov["r"] * s_io
    if method == "dora":
        return N_LAYERS * (ov["r"] * s_io + s_o)  # + magnitude vector per output channel
    if method in ("mixlora", "mixlora-dy"):
        e, r = ov.get("n_experts", 8), ov["r"]
        per_block = e * H + e * r * s_io  # one router on the FFN input + one LoRA per expert per FFN linear
        if ov.get("attention_lora"):
            per_block += r * sum(i + o for i, o in ATTN[family])
        return N_LAYERS * per_block
    if method == "loramoe":
        e, r = ov.get("n_experts", 8), ov["r"]
        return N_LAYERS * (e * s_i + e * r * s_io)
    if method == "mola":
        sched, r = ov["experts_schedule"], ov["r"]
        counts = [sched[layer * len(sched) // N_LAYERS] for layer in range(N_LAYERS)]
        return sum(e * s_i + e * r * s_io for e in counts)
    if method == "full":
        return sum(p.numel() for p in FAMILIES[family]().parameters())
    raise AssertionError(method)


MOE = dict(n_experts=4, r=4, alpha=8.0)
CASES = [
    ("slim", "llama", dict(r=4, alpha=8.0, n_lora_experts=4, n_identity_experts=1)),
    ("slim", "gpt2", dict(r=4, alpha=8.0, n_lora_experts=4, n_identity_experts=1)),
    ("lora", "llama", dict(r=4, alpha=8.0)),
    ("lora", "gpt2", dict(r=4, alpha=8.0)),
    ("dora", "llama", dict(r=4, alpha=8.0)),
    ("dora", "gpt2", dict(r=4, alpha=8.0)),
    ("mixlora", "llama", dict(MOE)),
    ("mixlora", "gpt2", dict(MOE)),
    ("mixlora", "llama", dict(MOE, attention_lora=True)),
    ("mixlora-dy", "llama", dict(MOE)),
    ("mixlora-dy", "gpt2", dict(MOE)),
    ("loramoe", "llama", dict(MOE)),
    ("loramoe", "gpt2", dict(MOE)),
    ("mola", "llama", dict(r=4, alpha=8.0, experts_schedule=[2, 4])),
    ("mola", "gpt2", dict(r=4, alpha=8.0, experts_schedule=[2, 4], balance_coef=0.01)),
    ("full", "llama", {}),
    ("full", "gpt2", {}),
]


def _train(model, ids: torch.Tensor, steps: int, lr: float) -> list[float]:
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for _ in range(steps):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        losses.append(float(out.loss.detach()))
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    return losses


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits


def test_available_lists_every_method():
    assert methods.available() == ["slim", "lora", "dora", "mixlora", "mixlora-dy", "loramoe", "mola", "full"]
    assert set(methods.DEVIATIONS) == set(methods.available())


@pytest.mark.parametrize(("method", "family", "overrides"), CASES, ids=[f"{m}-{f}-{i}" for i, (m, f, _) in
                                                                         enumerate(CASES)])
def test_method_trains_saves_and_loads(method, family, overrides, ids, tmp_path):
    model = methods.build(method, FAMILIES[family](), **overrides)
    # trainable parameters: the hand formula, the analytic budget and the model agree
    trainable = model.get_nb_trainable_parameters()[0]
    assert trainable == expected_trainable(method, family, overrides)
    assert methods.trainable_budget(method, FAMILIES[family](), **overrides) == trainable
    # a few steps lower the loss on a fixed batch
    losses = _train(model, ids, steps=6, lr=1e-3 if method == "full" else 1e-2)
    assert losses[-1] < losses[0] - 0.05, losses
    # save -> load onto a fresh base gives identical outputs
    before = _logits(model, ids)
    model.save_pretrained(tmp_path)
    meta_text = (tmp_path / "adapter_config.json").read_text()
    meta = json.loads(meta_text)
    assert meta_text == json.dumps(meta, indent=2, sort_keys=True)  # sorted keys
    files = {p.name for p in tmp_path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files <= {"adapter_config.json",
                                                                              "adapter_model.safetensors",
                                                                              "README.md"}  # peft's model card
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)  # never pickle
    loaded = methods.load(method, FAMILIES[family](), tmp_path)
    assert not loaded.training
    assert torch.equal(_logits(loaded, ids), before)
    assert loaded.get_nb_trainable_parameters()[0] == 0  # loaded for inference unless is_trainable=True


@pytest.mark.parametrize("method", ["loramoe", "mola", "full"])
def test_tampered_weights_are_refused_and_the_base_left_untouched(method, ids, tmp_path):
    ov = {} if method == "full" else dict(r=4, experts_schedule=[2, 4]) if method == "mola" else dict(MOE)
    model = methods.build(method, tiny_llama(), **ov)
    _train(model, ids, steps=1, lr=1e-3)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["weights_sha256"]
    w = tmp_path / "adapter_model.safetensors"
    b = bytearray(w.read_bytes())
    b[-4] ^= 1  # one mantissa bit of the last float: still a well-formed file with the right shapes
    w.write_bytes(bytes(b))
    base = tiny_llama()
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: SHA-256 differs from `weights_sha256`"):
        methods.load(method, base, tmp_path)
    assert type(base.model.layers[0].mlp.down_proj) is torch.nn.Linear  # no adapter left injected
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in ref.items())


@pytest.mark.parametrize("method", ["mixlora", "mixlora-dy", "loramoe", "mola"])
def test_moe_methods_report_expert_usage(method, ids):
    ov = dict(r=4, experts_schedule=[2, 4]) if method == "mola" else dict(MOE)
    model = methods.build(method, tiny_llama(), **ov)
    assert isinstance(model, MoeModel)
    model.train()
    stats = model.routing_stats(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert model.training  # restored
    assert stats and all(s.n_tokens == ids.numel() for s in stats.values())
    for s in stats.values():
        assert math.isclose(sum(s.expert_load), 1.0, rel_tol=1e-5)
        assert s.identity_weight == 0.0
    if method in ("mixlora", "mixlora-dy"):
        assert sorted(stats) == [f"model.layers.{i}.mlp" for i in range(N_LAYERS)]
        assert all(len(s.expert_load) == 4 for s in stats.values())


# ------------------------------------------------------------------------------------------ MixLoRA
def _ffn_reference(layer: MixLoraFFN, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per token, per expert: sum_j w_j E_j(x) with E_j the FFN with expert j's LoRA on every linear (a loop)."""
    base, out = layer.base_layer, torch.zeros_like(x)

    def lin(path: str, j: int, v: torch.Tensor) -> torch.Tensor:
        mod, ex = layer.linears[path], layer.lora[path.replace(".", "_")]
        return mod(v) + ex.scaling * ex.lora_B[j] @ (ex.lora_A[j] @ v)

    for t in range(x.shape[0]):
        for j in range(weights.shape[1]):
            if weights[t, j] == 0:
                continue
            if layer.kind == "gated":
                h = base.act_fn(lin("gate_proj", j, x[t])) * lin("up_proj", j, x[t])
                out[t] += weights[t, j] * lin("down_proj", j, h)
            elif layer.kind == "gpt2":
                out[t] += weights[t, j] * lin("c_proj", j, base.act(lin("c_fc", j, x[t])))
            else:
                h = base.intermediate_act_fn(lin("intermediate.dense", j, x[t]))
                out[t] += weights[t, j] * lin("output.dense", j, h)
    return out


@pytest.mark.parametrize("method", ["mixlora", "mixlora-dy"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_mixlora_block_equals_per_expert_loop(method, family):
    model = methods.build(method, {**FAMILIES, "bert": tiny_bert}[family](), **MOE)
    layer = next(m for m in model.modules() if isinstance(m, MixLoraFFN))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for ex in layer.lora.values():
            ex.lora_B.copy_(torch.randn(ex.lora_B.shape, generator=g) * 0.1)
        layer.router.copy_(torch.randn(layer.router.shape, generator=g))
    model.eval()
    x = torch.randn(9, H, generator=g)
    layer.ctx.record = True
    with torch.no_grad():
        got = layer(x[None])[0]
    layer.ctx.record = False
    weights = layer.records[-1]["weight"]  # (n, e) routing weight of every expert, 0 where not routed
    probs = (x @ layer.router.T).softmax(-1)
    if method == "mixlora":
        top = probs.topk(2, -1)
        ref_w = torch.zeros_like(probs).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    else:
        ref_w = weights  # checked by hand in test_mixlora_dy_keeps_experts_until_p_is_exceeded
    torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, _ffn_reference(layer, x, weights), rtol=1e-4, atol=1e-5)


def test_mixlora_load_balance_loss_equals_hand_computation(ids):
    c = 0.01
    model = methods.build("mixlora", tiny_llama(), **MOE, balance_coef=c)
    captured = {}
    block = model.base_model.model.layers[0].mlp
    block.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0].detach()))
    model.train()
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    x = captured["x"].reshape(-1, H)  # (n, h) FFN input of layer 0
    probs = (x @ block.router.detach().T).softmax(-1)  # (n, e)
    top = probs.topk(2, dim=-1).indices  # (n, 2)
    f = torch.bincount(top.flatten(), minlength=4).float() / top.numel()  # share of the routed slots
    P = probs.mean(0)  # mean router probability
    hand = c * 4 * (f * P).sum()
    aux = model.ctx.aux_losses
    assert len(aux) == N_LAYERS
    torch.testing.assert_close(aux[0], hand, rtol=1e-5, atol=1e-7)
    # out.loss = cross-entropy + the summed balance losses
    ce = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, ce + torch.stack(aux).sum(), rtol=1e-5, atol=1e-6)
    # eval: no auxiliary loss
    model.eval()
    eval_out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    assert model.ctx.aux_losses == []
    torch.testing.assert_close(eval_out.loss, ce, rtol=1e-5, atol=1e-6)


def test_mixlora_dy_keeps_experts_until_p_is_exceeded():
    model = methods.build("mixlora-dy", tiny_llama(), **MOE)  # top_p = 0.8
    layer = next(m for m in model.modules() if isinstance(m, MixLoraFFN))
    target = torch.tensor([
        [0.50, 0.25, 0.15, 0.10],  # cumulative 0.50, 0.75, 0.90 -> the first 3 (the 3rd exceeds 0.8)
        [0.85, 0.05, 0.05, 0.05],  # 0.85 -> only the first
        [0.10, 0.30, 0.35, 0.25],  # sorted 0.35, 0.30, 0.25 -> 0.35, 0.65, 0.90 -> experts 2, 1, 3
        [0.45, 0.30, 0.20, 0.05],  # 0.45, 0.75, 0.95 -> 3 experts
    ])
    keep = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool)
    # token t is the unit vector e_t, so its logits are the router's column t: set them to log(target)
    x = torch.zeros(4, H)
    x[torch.arange(4), torch.arange(4)] = 1.0
    with torch.no_grad():
        layer.router.zero_()
        layer.router[:, :4] = target.log().T
    model.eval()
    layer.ctx.record = True
    with torch.no_grad():
        layer(x[None])
    layer.ctx.record = False
    rec = layer.records[-1]
    assert torch.equal(rec["slots"] > 0, keep)
    # no renormalisation: kept experts carry their softmax probability
    torch.testing.assert_close(rec["weight"], target * keep, rtol=1e-5, atol=1e-6)


def test_mixlora_rejects_unsupported_family():
    from transformers import DistilBertConfig, DistilBertModel

    distil = DistilBertModel(DistilBertConfig(vocab_size=97, dim=H, n_layers=1, n_heads=4, hidden_dim=INTER))
    with pytest.raises(ValueError, match="MixLoRA cannot adapt model type 'distilbert'"):
        methods.build("mixlora", distil)


def test_mixlora_on_bert_trains_saves_loads_and_disables_to_the_base(tmp_path):
    """BERT's FFN spans `intermediate` and `output`: the mixture replaces `intermediate`, `output.dense` passes it on,
    `output` keeps its dropout and residual LayerNorm; disabled or unloaded it is exactly the base again."""
    ids = torch.randint(0, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    base_out = tiny_bert()(input_ids=ids, attention_mask=mask).last_hidden_state
    model = methods.build("mixlora", tiny_bert(), **MOE)
    s_io = H + INTER + INTER + H  # intermediate.dense (H -> INTER) and output.dense (INTER -> H)
    trainable = N_LAYERS * (4 * H + 4 * 4 * s_io)
    assert model.get_nb_trainable_parameters()[0] == trainable == methods.trainable_budget("mixlora", tiny_bert(),
                                                                                           **MOE)
    assert sorted(model.routing_stats(input_ids=ids, attention_mask=mask)) == [
        f"encoder.layer.{i}.intermediate" for i in range(N_LAYERS)]
    # the embedding moves towards a target: the loss falls
    target = torch.randn(H, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = (model(input_ids=ids, attention_mask=mask).last_hidden_state.mean((0, 1)) - target).square().mean()
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < losses[0] - 0.01, losses
    model.eval()
    with torch.no_grad():
        tuned = model(input_ids=ids, attention_mask=mask).last_hidden_state
        with model.disable_adapter():
            torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).last_hidden_state, base_out,
                                       rtol=0, atol=0)
    assert not torch.allclose(tuned, base_out, atol=1e-4)
    model.save_pretrained(tmp_path)
    loaded = methods.load("mixlora", tiny_bert(), tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).last_hidden_state, tuned)
    bert = model.unload()
    assert type(bert.encoder.layer[0].intermediate).__name__ == "BertIntermediate"
    assert type(bert.encoder.layer[0].output.dense) is torch.nn.Linear
    with torch.no_grad():
        assert torch.equal(bert(input_ids=ids, attention_mask=mask).last_hidden_state, base_out)


def test_mixlora_attention_lora_on_bert_adds_the_attention_projections():
    model = methods.build("mixlora", tiny_bert(), **MOE, attention_lora=True)
    extra = N_LAYERS * 4 * 4 * (H + H)  # r * (i + o) on query, key, value, attention.output.dense
    assert model.get_nb_trainable_parameters()[0] == N_LAYERS * (4 * H + 4 * 4 * 2 * (H + INTER)) + extra


# ------------------------------------------------------------------------------------------ LoRAMoE
def test_loramoe_routes_densely_and_balances_locally(ids):
    beta, delta = 0.1, 0.1
    model = methods.build("loramoe", tiny_llama(), **MOE, balance_coef=beta, balance_delta=delta)
    stats = model.routing_records(input_ids=ids)
    for rec in stats.values():
        assert (rec["weight"] > 0).all()  # every expert has non-zero weight for every token
        assert (rec["slots"] == 1).all()
        torch.testing.assert_close(rec["weight"].sum(-1), torch.ones(ids.numel()))
    layer = model.base_model.model.layers[0].mlp.gate_proj
    assert isinstance(layer, LoraMoeLinear)
    captured = {}
    layer.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0].detach()))
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # padding must not count in the importance
    sample_type = torch.tensor([0, 1, -1])
    model.train()
    model(input_ids=ids, attention_mask=mask, labels=ids, sample_type=sample_type)
    x = captured["x"]  # (b, t, h)
    w = (x @ layer.router.detach().T).softmax(-1) * mask[..., None]  # (b, t, e)
    Q = w.sum(1)  # (b, e) importance per sample
    Z = torch.tensor([[1 + delta] * 2 + [1 - delta] * 2, [1 - delta] * 2 + [1 + delta] * 2, [1.0] * 4])
    q = (Q * Z).flatten()
    hand = beta * q.var() / q.mean() ** 2
    torch.testing.assert_close(model.ctx.aux_losses[0], hand, rtol=1e-5, atol=1e-8)
    assert len(model.ctx.aux_losses) == 3 * N_LAYERS  # one per adapted FFN linear
    # no sample_type given: every sample is type `default_sample_type` (0)
    model(input_ids=ids, attention_mask=mask, labels=ids)
    q0 = (Q * Z[0]).flatten()
    torch.testing.assert_close(model.ctx.aux_losses[0], beta * q0.var() / q0.mean() ** 2, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="`sample_type` has 2 entries"):
        model(input_ids=ids, labels=ids, sample_type=torch.tensor([0, 1]))


# ------------------------------------------------------------------------------------------ MoLA
def test_mola_expert_counts_follow_the_schedule(ids):
    model = methods.build("mola", tiny_llama(n_layers=4), r=4)  # default schedule 2/4/6/8 per quarter
    layers = {n: m for n, m in model.base_model.named_modules() if isinstance(m, MolaLinear)}
    assert len(layers) == 4 * 3
    for name, layer in layers.items():
        depth = int(name.split("layers.")[1].split(".")[0])
        e = [2, 4, 6, 8][depth]
        assert layer.n_experts == e
        assert layer.experts.lora_A.shape == (e, 4, layer.d_in)
        assert layer.router.shape == (e, layer.d_in)
    stats = model.routing_stats(input_ids=ids)
    assert {n: len(s.expert_load) for n, s in stats.items()} == {n: m.n_experts for n, m in layers.items()}
    # 8 layers in 4 groups: 2 layers per quarter
    counts = {n: m.n_experts for n, m in methods.build("mola", tiny_llama(n_layers=8), r=2).named_modules()
              if isinstance(m, MolaLinear) and n.endswith("down_proj")}
    assert list(counts.values()) == [2, 2, 4, 4, 6, 6, 8, 8]
    with pytest.raises(ValueError, match="`top_k`=3 exceeds the smallest expert count"):
        methods.build("mola", tiny_llama(), top_k=3)


# ------------------------------------------------------------------------------------------ LoRA / DoRA
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_and_dora_are_real_peft_models(family):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    lora = methods.build("lora", FAMILIES[family](), r=4, alpha=8.0)
    dora = methods.build("dora", FAMILIES[family](), r=4, alpha=8.0)
    assert isinstance(lora, PeftModel) and isinstance(dora, PeftModel)
    assert not lora.peft_config["default"].use_dora and dora.peft_config["default"].use_dora
    adapted = sorted(n for n, m in lora.named_modules() if isinstance(m, LoraLayer))
    assert len(adapted) == N_LAYERS * len(FFN[family]) and all(".mlp." in n for n in adapted)
    # with given A and B, a LoRA layer computes W x + b + s B A x
    layer = next(m for m in lora.modules() if isinstance(m, LoraLayer))
    g = torch.Generator().manual_seed(0)
    A = torch.randn(layer.lora_A["default"].weight.shape, generator=g)
    B = torch.randn(layer.lora_B["default"].weight.shape, generator=g)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)
    base = layer.get_base_layer()
    W = base.weight.T if family == "gpt2" else base.weight  # GPT-2's Conv1D stores (i, o)
    x = torch.randn(5, W.shape[1], generator=g)
    with torch.no_grad():
        bias = 0.0 if base.bias is None else base.bias
        manual = x @ W.T + bias + (8.0 / 4) * (x @ A.T @ B.T)
        torch.testing.assert_close(layer(x), manual, rtol=1e-5, atol=1e-5)


def test_lora_rank_for_budget_matches_slim():
    cfg = SlimConfig(r=4, n_lora_experts=4, n_identity_experts=1)
    model = tiny_llama()
    slim = N_LAYERS * (5 * 128 + 4 * 4 * 288)  # routers + experts on gate/up/down (sum d_in 128, sum d_in+d_out 288)
    assert methods.trainable_budget("slim", model, **cfg.to_dict()) == slim
    r = methods.lora_rank_for_budget(model, slim_config=cfg)
    assert r == round(slim / (N_LAYERS * 288))
    assert methods.lora_rank_for_budget(model, budget=N_LAYERS * 288 * 7) == 7
    assert methods.lora_rank_for_budget(model, budget=N_LAYERS * (288 * 7 + 160), dora=True) == 7


# ------------------------------------------------------------------------------------------ errors
def test_errors_name_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"unknown method 'nope'; available: \['slim', 'lora'"):
        methods.build("nope", tiny_llama())
    with pytest.raises(ValueError, match=r"unknown method 'nope'"):
        methods.load("nope", tiny_llama(), tmp_path)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['n_expert'\] for method 'mixlora'; allowed: .*'n_exp"):
        methods.build("mixlora", tiny_llama(), n_expert=4)
    with pytest.raises(ValueError, match=r"`r`=0 must be an integer >= 1"):
        methods.build("loramoe", tiny_llama(), r=0)
    with pytest.raises(ValueError, match=r"`top_p`=1.5 must lie in \(0, 1\]"):
        methods.build("mixlora-dy", tiny_llama(), top_p=1.5)
    with pytest.raises(ValueError, match=r"`n_experts`=3 must be even"):
        methods.build("loramoe", tiny_llama(), n_experts=3)
    with pytest.raises(ValueError, match=r"unknown SlimConfig field"):
        methods.build("slim", tiny_llama(), n_experts=4)
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['r'\] for method 'full'"):
        methods.build("full", tiny_llama(), r=4)
    # a directory of one method does not load as another
    methods.build("mola", tiny_llama(), r=2).save_pretrained(tmp_path / "mola")
    with pytest.raises(ValueError, match=r"`method` is 'mola'; expected 'mixlora'"):
        methods.load("mixlora", tiny_llama(), tmp_path / "mola")
    methods.build("lora", tiny_llama(), r=2).save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match=r"holds 'lora'; expected 'dora'"):
        methods.load("dora", tiny_llama(), tmp_path / "lora")
    # an adapter whose shapes do not fit leaves the base model unchanged
    methods.build("loramoe", tiny_llama(), **MOE).save_pretrained(tmp_path / "loramoe")
    other = tiny_gpt2()
    names_before = [n for n, _ in other.named_modules()]
    with pytest.raises(ValueError, match="does not fit this base model"):
        methods.load("loramoe", other, tmp_path / "loramoe")
    assert [n for n, _ in other.named_modules()] == names_before
    assert all(p.requires_grad for p in other.parameters())


def test_disable_adapter_gives_the_base_model(ids):
    base_logits = _logits(tiny_llama(), ids)
    for method, ov in (("mixlora", MOE), ("loramoe", MOE), ("mola", dict(r=4, experts_schedule=[2, 4]))):
        model = methods.build(method, tiny_llama(), **ov)
        for m in model.modules():
            if isinstance(m, LoraExperts):
                torch.nn.init.normal_(m.lora_B)
        assert not torch.allclose(_logits(model, ids), base_logits)
        with model.disable_adapter():
            assert torch.equal(_logits(model, ids), base_logits)


def test_budget_overrides_give_every_method_slims_budget():
    model, slim = tiny_llama(), SlimConfig(r=4, n_lora_experts=4, n_identity_experts=1)
    budget = methods.trainable_budget("slim", tiny_llama(), **slim.to_dict())
    assert methods.budget_overrides("slim", model, slim) == {} == methods.budget_overrides("full", model, slim)
    for name in ("lora", "dora", "mixlora", "loramoe", "mola"):
        ov = methods.budget_overrides(name, model, slim)
        assert ov["alpha"] == 2 * ov["r"]
        gap = abs(methods.trainable_budget(name, model, **ov) - budget)
        for r in (ov["r"] - 1, ov["r"] + 1):  # the closest rank: one more or one less is farther away
            assert r < 1 or abs(methods.trainable_budget(name, model, **{**ov, "r": r}) - budget) >= gap, (name, r)
    with pytest.raises(ValueError, match="unknown method"):
        methods.budget_overrides("nope", model)


def test_budget_overrides_give_lora_slims_targets_with_the_output_head():
    """SLIM adapting the output head: LoRA/DoRA adapt the same layers (head included) at the same budget."""
    model = tiny_llama()
    slim = SlimConfig(r=4, n_lora_experts=1, adapt_output_head=True)
    budget = methods.trainable_budget("slim", model, **slim.to_dict())
    plain = methods.trainable_budget("slim", model, **{**slim.to_dict(), "adapt_output_head": False})
    assert budget - plain == 3 * 32 + 4 * (32 + 97)  # the head's router rows (3 x d_in) and its LoRA expert
    for name in ("lora", "dora"):
        ov = methods.budget_overrides(name, model, slim)
        assert ov["target_modules"][-1] == "lm_head" and len(ov["target_modules"]) == 2 * 3 + 1
        built = methods.build(name, tiny_llama(), **ov)
        n = sum(p.numel() for p in built.parameters() if p.requires_grad)
        assert n == methods.trainable_budget(name, model, **ov) and abs(n - budget) < 32 + 97 + 2 * (32 + 64)
    assert "target_modules" not in methods.budget_overrides("lora", model, SlimConfig(r=4))


@pytest.mark.parametrize("method", ["slim", "mixlora", "loramoe", "mola"])
def test_merge_and_unload_is_refused_with_the_reason_and_changes_nothing(method):
    model = methods.build(method, tiny_llama(), **({"r": 4, "experts_schedule": [2, 4]} if method == "mola" else {}))
    layer_types = {n: type(m) for n, m in model.named_modules()}
    with pytest.raises(ValueError, match=rf"merge_and_unload: a '{method}' adapter cannot be merged into the base "
                                         r"weights -- each token is routed to its own experts.* unload\(\) gives"):
        model.merge_and_unload()
    assert {n: type(m) for n, m in model.named_modules()} == layer_types
    model.unload()  # what the message points to
