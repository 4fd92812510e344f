"""SlimModel on real HuggingFace families: equivalences, gradients, routing report, save/load and its errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import FAMILIES, model_output, tiny_bert, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

from slimpeft import SlimConfig, SlimLinear, SlimModel, get_slim_model

SMALL = dict(r=4, n_lora_experts=4, n_identity_experts=2, top_k=2, n_clusters=4)


def _randomise_b(model: SlimModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.slim_layers().values():
            layer.experts.lora_B.copy_(torch.randn(layer.experts.lora_B.shape, generator=g) * 0.1)


def _train_steps(model: SlimModel, ids: torch.Tensor, n: int = 3) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(n):
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_initial_outputs_equal_base_and_identity_or_disabled_gives_base(family, dtype, ids):
    base = FAMILIES[family](dtype=dtype)
    ref = model_output(base, ids)
    model = get_slim_model(base, SlimConfig(**SMALL))
    assert model.layer_names and all(isinstance(m, SlimLinear) for m in model.slim_layers().values())
    torch.testing.assert_close(model_output(model, ids), ref, rtol=0, atol=0)  # B = 0: exactly the base
    _randomise_b(model)
    changed = model_output(model, ids)
    assert changed.dtype == dtype and (changed - ref).abs().max() > 0
    with model.disable_adapter():
        assert torch.equal(model_output(model, ids), ref)
    # only identity experts selected: make every token "far" (every centre thousands of spreads away) so that
    # yielding hands all weight to the identity experts
    for layer in model.slim_layers().values():
        layer.clusters.initialized.fill_(True)
        layer.clusters.centers.fill_(1e4)
        layer.config.yield_strength = 1e6
    assert torch.equal(model_output(model, ids), ref)


def test_default_targets_are_the_mlp_projections():
    assert get_slim_model(tiny_llama(), SlimConfig(**SMALL)).layer_names == [
        f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    assert get_slim_model(tiny_gpt2(), SlimConfig(**SMALL)).layer_names == [
        f"transformer.h.{i}.mlp.{p}" for i in range(2) for p in ("c_fc", "c_proj")]
    bert = get_slim_model(FAMILIES["bert"](), SlimConfig(**SMALL)).layer_names
    assert bert == [f"encoder.layer.{i}.{p}.dense" for i in range(2) for p in ("intermediate", "output")]


def test_unmatched_targets_list_existing_linear_layers():
    with pytest.raises(ValueError, match=r"matched no linear layer.*model\.layers\.\*\.mlp\.gate_proj.*lm_head"):
        get_slim_model(tiny_llama(), SlimConfig(target_modules=["nonexistent"]))


def test_degenerate_config_equals_peft_lora(ids):
    from peft import LoraConfig, get_peft_model

    targets = ["mlp.up_proj", "mlp.down_proj"]
    cfg = SlimConfig(r=4, alpha=8, n_lora_experts=1, n_identity_experts=0, top_k=1, mask_mode="none",
                     yield_strength=0.0, l1_weight=0.0, target_modules=targets)
    ours = get_slim_model(tiny_llama(seed=3), cfg)
    _randomise_b(ours, seed=5)
    theirs = get_peft_model(tiny_llama(seed=3), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                            lora_dropout=0.0))
    with torch.no_grad():
        for name, layer in ours.slim_layers().items():
            peft_layer = theirs.base_model.model.get_submodule(name)
            peft_layer.lora_A["default"].weight.copy_(layer.experts.lora_A[0])
            peft_layer.lora_B["default"].weight.copy_(layer.experts.lora_B[0])
    ours.eval()
    theirs.eval()
    a, b = model_output(ours, ids), model_output(theirs, ids)
    assert (a - model_output(tiny_llama(seed=3), ids)).abs().max() > 1e-3  # the adapters do something
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_adapters_and_routers(ids):
    model = get_slim_model(tiny_llama(), SlimConfig(**SMALL))
    _randomise_b(model)
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("experts.lora_A", "experts.lora_B", "router")) for n in trainable)
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        else:
            assert p.grad is None, n
    params = {id(p) for p in model.parameters()}
    for layer in model.slim_layers().values():
        assert all(id(b) not in params for b in layer.clusters.buffers())
    # trainable count: per layer E_lora (r d_in + d_out r) + E d_in; llama: gate/up 32->64, down 64->32
    per = lambda i, o: 4 * 4 * (i + o) + 6 * i  # noqa: E731
    assert model.get_nb_trainable_parameters()[0] == 2 * (2 * per(32, 64) + per(64, 32))


def test_training_loss_includes_l1_and_decreases(ids):
    model = get_slim_model(tiny_llama(), SlimConfig(**SMALL, l1_weight=0.1))
    model.train()
    out = model(input_ids=ids, labels=ids)
    with torch.no_grad():
        model.eval()
        plain = model.base_model(input_ids=ids, labels=ids).loss
    l1 = sum(layer.l1_penalty() for layer in model.slim_layers().values())
    # B = 0 at init, so the task loss equals the base's and the difference is the L1 term alone
    torch.testing.assert_close(out.loss, plain + 0.1 * l1)
    losses = _train_steps(model, ids, n=8)
    assert losses[-1] < losses[0] - 0.05


def test_routing_stats_change_no_state_and_describe_routing(ids):
    model = get_slim_model(tiny_llama(), SlimConfig(**SMALL))
    _train_steps(model, ids, n=2)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    stats = model.routing_stats(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert model.training  # mode restored
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert set(stats) == set(model.layer_names)
    for s in stats.values():
        assert s.n_tokens == ids.numel()
        assert sum(s.expert_load) == pytest.approx(1.0) and len(s.expert_load) == 6
        assert 0.0 <= s.identity_weight <= 1.0 and s.ood_score >= 0.0
    # padding is excluded: a mask with 5 real tokens per row counts 15 tokens
    mask = torch.zeros_like(ids)
    mask[:, -5:] = 1
    assert next(iter(model.routing_stats(input_ids=ids, attention_mask=mask).values())).n_tokens == 15


@pytest.mark.parametrize("mask_mode", ["fast", "dare", "none"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_save_load_round_trip_is_bit_identical(tmp_path, ids, family, mask_mode):
    model = get_slim_model(FAMILIES[family](seed=1), SlimConfig(**SMALL, mask_mode=mask_mode))
    _train_steps(model, ids, n=2)
    out = model_output(model, ids)
    assert torch.equal(out, model_output(model, ids))  # fixed inference masks: deterministic
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["method"] == "slim" and meta["config"]["mask_mode"] == mask_mode
    assert list(meta) == sorted(meta)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("base_layer" in k for k in tensors)  # only adapter tensors and buffers
    assert any(k.endswith("clusters.centers") for k in tensors)
    loaded = SlimModel.from_pretrained(FAMILIES[family](seed=1), tmp_path)
    assert torch.equal(model_output(loaded, ids), out)
    assert loaded.get_nb_trainable_parameters()[0] == 0
    assert SlimModel.from_pretrained(FAMILIES[family](seed=1), tmp_path, is_trainable=True
                                     ).get_nb_trainable_parameters()[0] > 0


def test_saved_adapter_files_get_the_umask_permissions_not_owner_only(tmp_path):
    # atomic saving goes through mkstemp (mode 0600): a teammate on a shared cluster must still read the adapter
    old = os.umask(0o022)
    try:
        get_slim_model(tiny_llama(), SlimConfig(**SMALL)).save_pretrained(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes == {"adapter_config.json": 0o644, "adapter_model.safetensors": 0o644}


@pytest.fixture
def saved(tmp_path, ids):
    model = get_slim_model(tiny_llama(), SlimConfig(**SMALL))
    _train_steps(model, ids, n=1)
    model.save_pretrained(tmp_path)
    return tmp_path


def _untouched(base, ref_state):
    assert not any(isinstance(m, SlimLinear) for m in base.modules())
    assert all(p.requires_grad for p in base.parameters())
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in ref_state.items())


def _corrupt(path, kind):
    w, c = path / "adapter_model.safetensors", path / "adapter_config.json"
    if kind == "missing":
        w.unlink()
    elif kind == "truncated":
        w.write_bytes(w.read_bytes()[:200])
    elif kind == "garbage":
        w.write_bytes(b"\x00" * 64)
    elif kind == "wrong_shape":
        t = load_file(w)
        k = next(k for k in t if k.endswith("lora_A"))
        t[k] = t[k][:, :2].contiguous()
        save_file(t, w)
    elif kind == "nan":
        t = load_file(w)
        k = next(k for k in t if k.endswith("lora_B"))
        t[k][0, 0, 0] = float("nan")
        save_file(t, w)
    elif kind == "unknown_field":
        meta = json.loads(c.read_text())
        meta["config"]["rank"] = 3
        c.write_text(json.dumps(meta))
    elif kind == "invalid_field":
        meta = json.loads(c.read_text())
        meta["config"]["top_k"] = 99
        c.write_text(json.dumps(meta))
    elif kind == "bad_json":
        c.write_text("{not json")


@pytest.mark.parametrize("kind, pattern", [
    ("missing", r"adapter_model.safetensors: missing"),
    ("truncated", r"not a readable safetensors file"),
    ("garbage", r"not a readable safetensors file"),
    ("wrong_shape", r"down_proj.experts.lora_A: \(4, 2, 64\) torch.float32, expected \(4, 4, 64\)"),
    ("nan", r"lora_B: non-finite values"),
    ("unknown_field", r"unknown SlimConfig field\(s\) \['rank'\]"),
    ("invalid_field", r"`top_k`=99 exceeds the number of experts"),
    ("bad_json", r"adapter_config.json: not valid JSON"),
])
def test_bad_adapter_files_fail_clearly_and_leave_model_untouched(saved, kind, pattern):
    _corrupt(saved, kind)
    base = tiny_llama()
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(ValueError, match=pattern):
        SlimModel.from_pretrained(base, saved)
    _untouched(base, ref)


def test_adapter_on_base_of_other_shapes_fails_and_leaves_model_untouched(saved):
    from transformers import LlamaConfig, LlamaForCausalLM

    other = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=4))
    ref = {k: v.clone() for k, v in other.state_dict().items()}
    pattern = r"gate_proj: adapter expects \(d_in, d_out\)=\(32, 64\), base has \(32, 48\)"
    with pytest.raises(ValueError, match=pattern):
        SlimModel.from_pretrained(other, saved)
    _untouched(other, ref)
    with pytest.raises(ValueError, match=r"not in the base model"):
        SlimModel.from_pretrained(tiny_gpt2(), saved)


def test_generate_with_kv_cache_runs_through_the_adapter(ids):
    model = get_slim_model(tiny_llama(), SlimConfig(**SMALL, ood_pooling="causal", ood_score="standardized"))
    _train_steps(model, ids, n=2)
    _randomise_b(model)
    kw = dict(input_ids=ids[:1, :5], attention_mask=torch.ones(1, 5, dtype=torch.long), max_new_tokens=4,
              min_new_tokens=4, do_sample=False)
    out = model.generate(**kw)
    with model.disable_adapter():
        base_out = model.generate(**kw)
    assert out.shape == (1, 9) and base_out.shape == (1, 9)
    assert torch.equal(out, model.generate(**kw))
    # causal pooling with a KV cache routes every new token as recomputing the whole sequence does
    assert torch.equal(out, model.generate(**kw, use_cache=False))
    # a static cache reports its length as a tensor: the steps pool on the device, with the same tokens
    assert torch.equal(out, model.generate(**kw, cache_implementation="static"))


@pytest.mark.parametrize("pooling", ["causal", "sequence"])
def test_kv_cache_steps_pool_with_the_sequence_seen_so_far(ids, pooling):
    cfg = SlimConfig(**SMALL, ood_pooling=pooling, ood_score="standardized", threshold_std=0.0, yield_strength=4.0)
    model = get_slim_model(tiny_llama(), cfg)
    _train_steps(model, ids, n=2)
    ids = ids + 0
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (b, t, v)
        pre = model(input_ids=ids[:, :-1], attention_mask=torch.ones_like(ids[:, :-1]), use_cache=True)
        step = model(input_ids=ids[:, -1:], attention_mask=torch.ones_like(ids), past_key_values=pre.past_key_values,
                     use_cache=True).logits[:, -1]
        pre = model(input_ids=ids[:, :-1], attention_mask=torch.ones_like(ids[:, :-1]), use_cache=True)
        for lyr in model.slim_layers().values():
            lyr._pool_state = None  # forget the prompt: the step pools its own token only (the old behaviour)
        alone = model(input_ids=ids[:, -1:], attention_mask=torch.ones_like(ids), past_key_values=pre.past_key_values,
                      use_cache=True).logits[:, -1]
    if pooling == "causal":  # prefix means are the same with and without the cache: the step equals the full pass
        torch.testing.assert_close(step, full[:, -1], atol=1e-5, rtol=1e-4)
    assert (alone - full[:, -1]).abs().max() > 1e-3  # pooling the new token alone routes it differently


def test_max_source_carries_the_running_maximum(ids):
    # yield_strength 0: d does not change the routing, so both models see identical layer inputs
    cfg = dict(**SMALL, ood_pooling="sequence", ood_score="standardized", threshold_std=0.0, yield_strength=0.0)
    own = get_slim_model(tiny_llama(), SlimConfig(**cfg))
    carried = get_slim_model(tiny_llama(), SlimConfig(**cfg, ood_source="max"))
    for m in (own, carried):
        torch.manual_seed(0)  # the same training masks
        _train_steps(m, ids, n=2)
    rec_own = own.routing_records(input_ids=ids + 0, attention_mask=torch.ones_like(ids))
    rec_max = carried.routing_records(input_ids=ids + 0, attention_mask=torch.ones_like(ids))
    running = None
    for name in rec_own:  # forward order
        d_own, d_max = rec_own[name]["d"], rec_max[name]["d"]
        running = d_own if running is None else torch.maximum(running, d_own)
        torch.testing.assert_close(d_max, running)
    assert (running > rec_own[next(iter(rec_own))]["d"]).any()  # the maximum did carry something


def test_first_layer_score_is_shared(ids):
    model = get_slim_model(tiny_llama(), SlimConfig(**SMALL, ood_source="first", ood_pooling="sequence",
                                                    ood_score="standardized"))
    _train_steps(model, ids, n=2)
    recs = model.routing_records(input_ids=ids + 0, attention_mask=torch.ones_like(ids))
    ds = [r["d"] for r in recs.values()]
    assert all(torch.equal(d, ds[0]) for d in ds)
    # only the first layer's clusters were fitted
    layers = list(model.slim_layers().values())
    assert bool(layers[0].clusters.initialized) and not bool(layers[-1].clusters.initialized)


PREPASS = dict(**SMALL, ood_pooling="sequence", ood_score="standardized", threshold_std=0.0)


def test_prepass_routes_every_layer_on_the_base_pass_maximum(ids):
    """ood_source 'prepass': every layer, the first included, routes on the maximum over all layers of the scores
    of the frozen base's hidden states; the same scores a model whose adapters are zero computes layer by layer."""
    model = get_slim_model(tiny_llama(), SlimConfig(**PREPASS, ood_source="prepass", yield_strength=8.0))
    _train_steps(model, ids, n=3)
    _randomise_b(model)  # adapters that change the hidden states a lot: the base pass must not see them
    mask = torch.ones_like(ids)
    rec = model.routing_records(input_ids=ids + 0, attention_mask=mask)
    # the same clusters, adapters zero: each layer's own score is its score of the base's hidden states
    own = get_slim_model(tiny_llama(), SlimConfig(**PREPASS, ood_source="own", yield_strength=8.0))
    own.load_state_dict(model.state_dict())
    with torch.no_grad():
        for layer in own.slim_layers().values():
            layer.experts.lora_B.zero_()
    rec_own = own.routing_records(input_ids=ids + 0, attention_mask=mask)
    expected = torch.stack([r["d"] for r in rec_own.values()]).max(0).values
    assert (expected > 0).any() and (expected == 0).any()  # some sequences flagged, some not
    for name, r in rec.items():
        torch.testing.assert_close(r["d"], expected, msg=name)
    first = next(iter(rec_own))
    assert (expected > rec_own[first]["d"]).any()  # the first layer routes on more than its own score


def test_prepass_computes_no_vocabulary_logits_it_does_not_need(ids):
    """The scoring pass reads the layers' scores only: the LM head runs on one position per sequence there, on
    every position in the routed pass (whose logits and loss are unchanged)."""
    model = get_slim_model(tiny_llama(), SlimConfig(**PREPASS, ood_source="prepass", yield_strength=8.0))
    head = model.base_model.get_output_embeddings()
    seen: list[tuple[int, ...]] = []
    handle = head.register_forward_hook(lambda m, a, out: seen.append(tuple(a[0].shape)))
    b, t = ids.shape
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)
    handle.remove()
    assert seen[0][:2] == (b, 1) and seen[1][:2] == (b, t)
    assert out.logits.shape[:2] == (b, t) and torch.isfinite(out.loss)


def test_prepass_with_an_adapted_output_head(ids):
    """The LM head as a target (PEFT allows it): it sees one position per sequence in the scoring pass and under
    generate's logits_to_keep, so it scores nothing there and routes on the last positions of the others' score."""
    targets = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "lm_head"]
    model = get_slim_model(tiny_llama(), SlimConfig(**PREPASS, ood_source="prepass", yield_strength=8.0,
                                                    target_modules=targets))
    assert "lm_head" in model.slim_layers()
    _train_steps(model, ids, n=2)
    _randomise_b(model)
    model.ctx.record = True
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=torch.ones_like(ids))  # every position through the head
            gen = model.generate(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2]), do_sample=False,
                                 max_new_tokens=3, min_new_tokens=3, pad_token_id=0)
    finally:
        model.ctx.record = False
    layers = model.slim_layers()
    head, first = layers["lm_head"].records, next(iter(layers.values())).records
    for layer in layers.values():
        layer.records = []
    assert not bool(layers["lm_head"].clusters.initialized)  # never scored: routes on the other layers' maximum
    b, t = ids.shape
    torch.testing.assert_close(head[0]["d"], first[0]["d"])  # full pass: (b*t,) the same score
    assert head[0]["d"].shape == (b * t,) and (first[0]["d"] > 0).any()
    # generate: the prompt pass gives the head the last position only; the KV-cache steps keep the prompt score
    prompt_d = first[1]["d"].view(2, -1)[:, -1]
    assert gen.shape == (2, t + 3) and len(head) == 4
    for step in head[1:]:
        torch.testing.assert_close(step["d"], prompt_d)


def test_adapt_output_head_adds_the_head_whatever_the_targets(ids):
    from slimpeft.model import slim_targets

    llama = tiny_llama()
    names = slim_targets(llama, SlimConfig(adapt_output_head=True))
    assert names == slim_targets(llama, SlimConfig(target_modules=["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
                                                                    "lm_head"]))
    assert names[-1] == "lm_head" and len(names) == 7
    assert slim_targets(llama, SlimConfig(target_modules=["lm_head"], adapt_output_head=True)) == ["lm_head"]
    gpt2 = get_slim_model(tiny_gpt2(), SlimConfig(**SMALL, adapt_output_head=True))
    assert "lm_head" in gpt2.slim_layers()
    with pytest.raises(ValueError, match=r"adapt_output_head.*BertModel.*no linear output head"):
        slim_targets(tiny_bert(), SlimConfig(adapt_output_head=True))
    # without the scoring pass the head scores what it sees (the last position under generate's logits_to_keep)
    model = get_slim_model(tiny_llama(), SlimConfig(**SMALL, adapt_output_head=True, ood_source="max",
                                                    ood_pooling="sequence", ood_score="standardized"))
    _train_steps(model, ids, n=2)
    with torch.no_grad():
        gen = model.generate(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2]), do_sample=False,
                             max_new_tokens=3, min_new_tokens=3, pad_token_id=0)
    assert gen.shape == (2, ids.shape[1] + 3)


def test_merged_inference_equals_the_routed_path_and_skips_it_when_nothing_is_flagged(ids):
    """merged_inference: a call the scoring pass flags nothing of runs every adapted layer (the output head
    included) as one matmul with W + (alpha/r) B A and gives the routed path's logits and generated tokens; a
    flagged call takes the routed path; training and gradients never merge; a changed adapter is re-merged."""
    cfg = dict(**{**SMALL, "n_lora_experts": 1}, ood_source="prepass", ood_pooling="sequence",
               ood_score="standardized", threshold_std=2.0,
               yield_strength=8.0, identity_gate="yield", mask_mode="none",
               adapt_output_head=True)
    ref = get_slim_model(tiny_llama(), SlimConfig(**cfg))
    _train_steps(ref, ids, n=3)
    _randomise_b(ref)
    merged = get_slim_model(tiny_llama(), SlimConfig(**cfg, merged_inference=True))
    merged.load_state_dict(ref.state_dict())
    merged.eval()
    calls: list[str] = []
    for name, layer in merged.slim_layers().items():
        layer.base_layer.register_forward_hook(lambda m, a, o, name=name: calls.append(name))
    in_domain = ids  # what the clusters were fitted on: not flagged
    far = torch.full_like(ids, 5)  # one token repeated: far from every cluster
    routed: list[str] = []  # layers that ran the routed eval path
    def counted(name: str, f):
        def wrapper(*a, **k):
            routed.append(name)
            return f(*a, **k)
        return wrapper

    for name, layer in merged.slim_layers().items():
        layer._eval_forward = counted(name, layer._eval_forward)
    for batch, expect_merged in ((in_domain, True), (far, False)):
        mask = torch.ones_like(batch)
        calls.clear()
        routed.clear()
        with torch.no_grad():
            got = merged(input_ids=batch, attention_mask=mask).logits
            d = merged.ctx.fixed_score
            want = ref(input_ids=batch, attention_mask=mask).logits
        assert bool((d > 0).any()) != expect_merged
        # merged: the base layers run in the scoring pass only; routed: in both passes
        assert len(calls) == len(merged.slim_layers()) * (1 if expect_merged else 2)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
        # unflagged: merged weights; flagged with the yield above every LoRA logit: the base output, no routing
        assert routed == []
        with torch.no_grad():
            g1 = merged.generate(input_ids=batch[:2], attention_mask=mask[:2], do_sample=False, max_new_tokens=4,
                                 min_new_tokens=4, pad_token_id=0)
            g2 = ref.generate(input_ids=batch[:2], attention_mask=mask[:2], do_sample=False, max_new_tokens=4,
                              min_new_tokens=4, pad_token_id=0)
        assert torch.equal(g1, g2)
    calls.clear()
    merged(input_ids=in_domain, attention_mask=torch.ones_like(in_domain)).logits.sum().backward()  # gradients on
    assert len(calls) == 2 * len(merged.slim_layers())
    with torch.no_grad():  # a yield too weak to beat the LoRA logits: the flagged call is routed, as without merging
        for m in (merged, ref):
            for layer in m.slim_layers().values():
                layer.router.data[0] = 1e6 * layer.router.data[0].sign()
        routed.clear()
        torch.testing.assert_close(merged(input_ids=far).logits, ref(input_ids=far).logits, atol=1e-5, rtol=1e-4)
    assert routed
    # a mixed call (one token unflagged, d = 0; one flagged) whose LoRA logits are all negative: the unflagged token
    # still gets its adapter (0 > logit must not count as the yield winning), the flagged one the base output
    name = next(iter(merged.slim_layers()))
    ml, rl = merged.slim_layers()[name], ref.slim_layers()[name]
    x0 = torch.randn(ml.d_in, generator=torch.Generator().manual_seed(3))
    x = torch.stack([x0, x0])[None]  # (1, 2, i): the same token twice
    with torch.no_grad():
        for layer, m in ((ml, merged), (rl, ref)):
            layer.router.data[0] = -10.0 * x0  # logit = -10 s |x0|^2 < 0 on both tokens
            m.ctx.reset(None)
            m.ctx.fixed_score = torch.tensor([0.0, 5.0])
        got, want, base = ml(x), rl(x), ml.base_layer(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(got[0, 0], base[0, 0]) and torch.equal(got[0, 1], base[0, 1])
    _randomise_b(merged, seed=1)
    _randomise_b(ref, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=in_domain).logits, ref(input_ids=in_domain).logits,
                                   atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match=r"merged_inference.*needs n_lora_experts=1.*got 8"):
        SlimConfig(merged_inference=True, ood_source="prepass", ood_pooling="sequence", identity_gate="yield")


def test_prepass_fits_the_clusters_on_the_base_hidden_states_once_per_step(ids):
    """With lr 0 and zero adapters the adapted model is the base, so a per-layer model fits the same clusters on the
    same hidden states: the scoring pass must update each layer's clusters exactly as often, on the base's states."""
    models = {src: get_slim_model(tiny_llama(), SlimConfig(**PREPASS, ood_source=src, mask_mode="none"))
              for src in ("prepass", "own")}
    for m in models.values():
        m.train()
        for _ in range(3):
            m(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)  # no optimizer step: B stays 0
    for (name, a), b in zip(models["prepass"].slim_layers().items(), models["own"].slim_layers().values()):
        assert int(a.clusters.n_updates) == int(b.clusters.n_updates) == 2, name  # init + 2 updates
        torch.testing.assert_close(a.clusters.centers, b.clusters.centers, msg=name)
        torch.testing.assert_close(a.clusters.pool_mean, b.clusters.pool_mean, msg=name)


def test_prepass_generation_keeps_the_prompt_score(ids):
    model = get_slim_model(tiny_llama(), SlimConfig(**PREPASS, ood_source="prepass", yield_strength=8.0))
    _train_steps(model, ids, n=2)
    _randomise_b(model)
    model.ctx.record = True
    try:
        with torch.no_grad():
            gen = model.generate(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2]), do_sample=False,
                                 max_new_tokens=3, min_new_tokens=3, pad_token_id=0)
    finally:
        model.ctx.record = False
    recs = next(iter(model.slim_layers().values())).records
    for layer in model.slim_layers().values():
        layer.records = []
    assert gen.shape == (2, ids.shape[1] + 3) and len(recs) == 3  # the prompt, then 2 KV-cache steps of one token
    prompt_d = recs[0]["d"].view(2, -1)[:, -1]
    for step in recs[1:]:
        torch.testing.assert_close(step["d"], prompt_d)
    with torch.no_grad():
        pre = model.base_model(input_ids=ids[:1], use_cache=True)  # a prompt pass: its score is kept
        model._prompt_score = None  # ... and forgotten, as with a cache built outside this model
        with pytest.raises(RuntimeError, match="without their prompt's score"):
            model(input_ids=ids[:1, -1:], past_key_values=pre.past_key_values, use_cache=True)


def test_prepass_is_off_with_the_adapters_and_needs_pooling(ids):
    model = get_slim_model(tiny_llama(), SlimConfig(**PREPASS, ood_source="prepass", yield_strength=8.0))
    _randomise_b(model)
    with torch.no_grad(), model.disable_adapter():
        out = model(input_ids=ids).logits
    torch.testing.assert_close(out, tiny_llama()(input_ids=ids).logits)
    with pytest.raises(ValueError, match="'prepass' needs `ood_pooling`"):
        SlimConfig(ood_source="prepass", ood_pooling="token")
    # one forward = two passes of the base model with identity experts, one without (nothing would use a score)
    for n_identity, passes in ((2, 2), (0, 1)):
        m = get_slim_model(tiny_llama(), SlimConfig(**{**PREPASS, "n_identity_experts": n_identity},
                                                    ood_source="prepass"))
        calls = []
        m.base_model.register_forward_hook(lambda *a, calls=calls: calls.append(1))
        with torch.no_grad():
            m(input_ids=ids)
        assert len(calls) == passes


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("source", ["own", "max"])
def test_gradient_checkpointing_trains_exactly_as_without_it(reentrant, source, ids):
    """HF gradient checkpointing re-runs each decoder layer's forward inside backward; SLIM must route the
    recomputation on the forward's own scores and slide its clusters once per step, not twice."""
    import copy

    plain = get_slim_model(tiny_llama(), SlimConfig(r=4, alpha=8, n_clusters=4, ood_source=source)).train()
    with torch.no_grad():
        for layer in plain.slim_layers().values():  # a trained-looking adapter: the routing shapes the gradients
            layer.experts.lora_B.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
    ckpt = copy.deepcopy(plain)
    ckpt.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    runs = []
    for model in (plain, ckpt):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for step in range(3):
            torch.manual_seed(step)  # the same fresh masks in both runs
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), model.state_dict()))
    (l1, s1), (l2, s2) = runs
    torch.testing.assert_close(l2, l1, rtol=1e-6, atol=1e-6)
    for k in s1:
        if "clusters" in k:
            assert torch.equal(s1[k], s2[k]), k  # one slide per step (n_updates included)
        else:
            torch.testing.assert_close(s2[k], s1[k], rtol=1e-5, atol=1e-6)


def test_loading_onto_another_model_family_of_the_same_shapes_warns(tmp_path, caplog):
    """The shapes are what must fit (checked, refused otherwise); an adapter saved on a Llama and loaded onto a
    Mistral of the same shapes loads, with a warning naming both families."""
    import logging

    from transformers import MistralConfig, MistralForCausalLM

    model = get_slim_model(tiny_llama(), SlimConfig(r=4, n_clusters=4))
    model.save_pretrained(tmp_path)
    cfg = MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    with caplog.at_level(logging.WARNING, logger="slimpeft"):
        SlimModel.from_pretrained(MistralForCausalLM(cfg), tmp_path)
    assert any("saved on a 'llama' model" in r.message and "'mistral'" in r.message for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="slimpeft"):
        SlimModel.from_pretrained(tiny_llama(), tmp_path)
    assert not any("saved on a" in r.message for r in caplog.records)


def _trained_for_padding(cfg: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128))
    m = get_slim_model(base, SlimConfig(**{"n_lora_experts": 4, "r": 8, "alpha": 16, "n_clusters": 4, **cfg}))
    m.train()
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(4):
        ids = torch.randint(0, 64, (4, 16))
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for layer in m.slim_layers().values():
            layer.experts.lora_B.normal_(0.0, 0.3)
    return m.eval()


@pytest.mark.parametrize("cfg", [{"ood_pooling": "causal", "ood_score": "standardized", "yield_strength": 8.0},
                                 {"ood_pooling": "sequence", "ood_score": "standardized", "yield_strength": 8.0},
                                 "recommended"])
def test_static_cache_generation_of_a_left_padded_batch_equals_the_dynamic_cache(cfg):
    """Under a static KV cache transformers passes a 4-D (b, 1, t, k) attention mask: the layers read the call's real
    tokens from its diagonal (padding was counted in pooled scores: other tokens than the dynamic cache's), and the
    scoring pass of the prepass presets runs on the (b, t) padding mask (it crashed on the cache-long mask)."""
    from slimpeft import PRESETS

    m = _trained_for_padding(PRESETS[cfg] if isinstance(cfg, str) else cfg)
    torch.manual_seed(3)
    a = torch.cat([torch.randint(0, 64, (1, 5)), torch.randint(64, 128, (1, 5))], 1)
    b = torch.randint(64, 128, (1, 6))
    x = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    am = torch.ones_like(x)
    am[1, :4] = 0
    kw = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        dynamic = m.generate(input_ids=x, attention_mask=am, **kw)
        static = m.generate(input_ids=x, attention_mask=am, cache_implementation="static", **kw)
        alone = m.generate(input_ids=b, **kw)
    assert torch.equal(static, dynamic)
    assert torch.equal(dynamic[1, 4:], alone[0])  # the padded row is the unpadded sequence's generation
