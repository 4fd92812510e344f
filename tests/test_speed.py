"""The optimised paths equal the straightforward computation, and ``slim bench speed`` records what it claims."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from slimpeft import SlimConfig, SlimLinear
from slimpeft.bench.speed import TARGETS, LayerShape, ModelBenchArgs, peak_step_memory, run_speed_bench
from slimpeft.clustering import SlidingClusters
from slimpeft.experts import _dense_gate
from slimpeft.masking import apply_fast_masks, fast_masks

BASE = Path(__file__).resolve().parents[1] / "assets" / "base"


def _trained_layer(cfg: SlimConfig, d_in: int = 24, d_out: int = 20, seed: int = 0) -> SlimLinear:
    """A SlimLinear whose clusters were fitted by a few training-mode passes and whose B is non-zero, in eval mode."""
    from conftest import fitted_slim_layer

    return fitted_slim_layer(cfg, d_in, d_out, seed).eval()


def _reference_eval(layer: SlimLinear, x: torch.Tensor) -> torch.Tensor:
    """METHOD.md's eval-mode layer, token by token, written out with no reuse of the layer's code paths."""
    cfg, cl, ex = layer.config, layer.clusters, layer.experts
    A, B = ex.lora_A.detach(), ex.lora_B.detach()
    if cfg.mask_mode == "fast" and cfg.mask_rate > 0 and cfg.inference_mask == "fixed":
        gen = torch.Generator().manual_seed(layer.mask_seed)
        col, row = fast_masks(ex.n_experts, layer.d_in, layer.d_out, cfg.mask_rate, rescale=cfg.mask_rescale,
                              generator=gen)
        A, B = apply_fast_masks(A, B, col, row)
    inv_sd, tau = cl.inv_sd(), cl.calibrated_tau()
    out = torch.empty(x.shape[0], layer.d_out)
    for t in range(x.shape[0]):
        xt = x[t]
        logits = layer.router_weight().detach() @ xt  # (E,)
        if cfg.n_identity_experts and bool(cl.initialized):
            k = int(((xt - cl.centers) ** 2).sum(-1).argmin())
            z = (xt - cl.centers[k]).abs() * inv_sd[k]
            agg = z.max() if cfg.distance == "max" else z.square().mean().sqrt()
            if cfg.ood_score == "paper":
                d = (agg - 1.0).clamp_min(0.0)
            elif cfg.ood_score == "calibrated":
                d = (agg - tau[k]).clamp_min(0.0)
            else:
                d = ((agg - cl.agg_mean[k]) / cl.agg_sd()[k] - cfg.threshold_std).clamp_min(0.0)
            if cfg.identity_gate == "yield":  # identity experts only where the yield is positive
                logits[cfg.n_lora_experts:] = cfg.yield_strength * d if cfg.yield_strength * d > 0 else -math.inf
            else:
                logits[cfg.n_lora_experts:] += cfg.yield_strength * d
        elif cfg.n_identity_experts and cfg.identity_gate == "yield":
            logits[cfg.n_lora_experts:] = -math.inf
        top = logits.topk(cfg.top_k)
        w = top.values.softmax(-1)
        y = layer.base_layer(xt)
        for wi, e in zip(w, top.indices.tolist()):
            if e < cfg.n_lora_experts:
                y = y + wi * ex.scaling * (B[e] @ (A[e] @ xt))
        out[t] = y
    return out


FAST_VARIANTS = [
    {},
    {"distance": "rms"},
    {"ood_score": "paper"},
    {"ood_score": "standardized", "yield_strength": 4.0},
    {"inference_mask": "fixed"},
    {"inference_mask": "none"},
    {"mask_mode": "none"},
    {"n_identity_experts": 0},
    {"yield_strength": 0.0},
    {"spread_floor": 0.0},
    # pooled / carried routing: the fast path hands its nearest centres and aggregates to the reference scoring
    {"ood_pooling": "sequence", "ood_score": "standardized", "ood_source": "max"},
    {"ood_pooling": "causal", "ood_score": "standardized", "ood_source": "first"},
    {"ood_pooling": "sequence", "ood_score": "calibrated"},
    {"ood_source": "max", "distance": "rms"},
    {"identity_gate": "yield"},
    {"router_lr_scale": 0.1},
    {"identity_gate": "yield", "yield_strength": 0.0},
    {"identity_gate": "yield", "ood_pooling": "sequence", "ood_score": "standardized", "ood_source": "max"},
]


def _variant_id(o: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in o.items()) or "default"


@pytest.mark.parametrize("overrides", FAST_VARIANTS, ids=_variant_id)
def test_eval_fast_path_equals_reference_and_token_loop(overrides):
    cfg = SlimConfig(**{"n_lora_experts": 4, "r": 3, "top_k": 2, "n_clusters": 5, "yield_strength": 8.0,
                        **overrides})
    layer = _trained_layer(cfg)
    g = torch.Generator().manual_seed(7)
    # in-domain tokens and tokens far from every centre, so that yielding sends some to identity experts
    x = torch.cat([torch.randn(2, 10, 24, generator=g), 6.0 * torch.randn(1, 10, 24, generator=g)])
    with torch.no_grad():
        layer.ctx.reset(None)  # a new forward pass: nothing carried over from an earlier call
        layer.ctx.record = True  # recording forces the reference (general) path ...
        ref = layer(x)
        layer.ctx.record = False
        layer.records = []
        assert layer._eval_cache is None
        layer.ctx.reset(None)
        fast = layer(x)  # ... and without it the cached fast path runs
        assert layer._eval_cache is not None
        layer.ctx.reset(None)
        again = layer(x)  # from the cache
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast, again)
    if cfg.ood_pooling == "token" and cfg.ood_source == "own":  # the per-token loop knows only this routing level
        loop = _reference_eval(layer, x.reshape(-1, 24)).view_as(ref)
        torch.testing.assert_close(fast, loop, rtol=1e-4, atol=1e-4)
    if cfg.n_identity_experts and cfg.yield_strength > 0 and cfg.ood_score != "paper":
        layer.ctx.reset(None)
        layer.ctx.record = True
        with torch.no_grad():
            layer(x)
        layer.ctx.record = False
        rec = layer.records[-1]
        assert 0 < float((rec["identity_weight"] > 0).float().mean()) < 1  # yielding really acted on some tokens


def test_eval_fast_path_cache_follows_weight_changes_and_train_mode():
    layer = _trained_layer(SlimConfig(n_lora_experts=4, r=3, n_clusters=5))
    x = torch.randn(9, 24)
    with torch.no_grad():
        before = layer(x)
        layer.experts.lora_B.mul_(2.0)  # an in-place change (as an optimizer step) must invalidate the cache
        after = layer(x)
        layer.ctx.record = True
        ref = layer(x)
        layer.ctx.record = False
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-5)
    # with gradients enabled the reference path runs, so gradients reach the adapters even in eval mode
    layer(x).sum().backward()
    assert layer.experts.lora_A.grad is not None and layer.experts.lora_A.grad.abs().sum() > 0


def test_unknown_config_option_falls_back_to_reference_path():
    layer = _trained_layer(SlimConfig(n_lora_experts=4, r=3, n_clusters=5))
    layer._new_options = [("some_future_option", "default")]
    layer.config.some_future_option = "changed"  # a routing option the fast path was never taught
    with torch.no_grad():
        layer(torch.randn(5, 24))
    assert layer._eval_cache is None


@pytest.mark.parametrize("overrides", [{}, {"mask_mode": "none", "router_lr_scale": 0.1},
                                       {"balance_coef": 0.05, "identity_gate": "yield", "yield_in_training": True}],
                         ids=_variant_id)
def test_training_path_in_one_matmul_equals_the_unfused_path(overrides):
    """The training forward puts the router and every down-projection in one matmul and adds the mix into the
    nn.Linear's own output in place; the unfused path (router, then the experts, then a new output tensor: the
    sparse dispatch) gives the same outputs, auxiliary losses, gradients (input, A, B, router) and cluster updates,
    over two steps with fresh masks."""
    import copy

    from conftest import fitted_slim_layer

    fused = fitted_slim_layer(SlimConfig(**overrides))
    plain = copy.deepcopy(fused)
    plain.dispatch = "sparse"
    g = torch.Generator().manual_seed(11)
    runs = {}
    for name, layer in (("fused", fused), ("plain", plain)):
        got = []
        for step in range(2):
            torch.manual_seed(100 + step)  # the same mask draw in both
            x = torch.randn(3, 8, 24, generator=torch.Generator().manual_seed(step)).requires_grad_(True)
            layer.ctx.reset(None)
            y = layer(x)
            aux = sum(layer.ctx.aux_losses, torch.zeros(()))
            ((y * torch.randn(y.shape, generator=g)).sum() + aux).backward()
            got.append({"y": y.detach(), "aux": aux.detach(), "dx": x.grad,
                        **{f"d_{n}": p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}})
            layer.zero_grad(set_to_none=True)
        got.append({f"buf_{n}": b.clone() for n, b in layer.named_buffers()})
        runs[name] = got
        g = torch.Generator().manual_seed(11)  # the same output gradients for the second layer
    assert runs["fused"][0]["y"].shape == (3, 8, 20) and runs["fused"][0]["dx"].shape == (3, 8, 24)
    for a, b in zip(runs["fused"], runs["plain"]):
        assert a.keys() == b.keys()
        for k in a:
            tol = 1e-6 * (1.0 + b[k].float().abs().max())  # float32 sums in another order: relative to the scale
            assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-5, atol=tol), (k, (a[k] - b[k]).abs().max())
    assert runs["fused"][0]["d_router"].abs().sum() > 0 and runs["fused"][0]["d_experts.lora_A"].abs().sum() > 0


def test_dense_gate_without_sync_equals_scatter_of_lora_slots():
    g = torch.Generator().manual_seed(3)
    idx = torch.stack([torch.randperm(7, generator=g)[:3] for _ in range(50)])  # 5 LoRA + 2 identity experts
    w = torch.rand(50, 3, generator=g)
    ref = torch.zeros(50, 5)
    for t in range(50):
        for j in range(3):
            if idx[t, j] < 5:
                ref[t, idx[t, j]] += w[t, j]
    assert torch.equal(_dense_gate(w, idx, 5), ref)
    assert torch.equal(_dense_gate(w, idx, 5, width=7), ref)  # the router's width known: LoRA columns of a wider gate
    wg = w.clone().requires_grad_(True)  # and the same gradient for the slot weights (0 for identity slots)
    (_dense_gate(wg, idx, 5, width=7) * torch.arange(1.0, 6.0)).sum().backward()
    assert torch.equal(wg.grad, torch.where(idx < 5, idx + 1.0, 0.0))


def test_in_place_mix_leaves_a_hooked_base_output_alone():
    """The expert mix is added into the base layer's output in place only where nothing else can hold that output:
    a forward hook on the base layer keeps what the base computed, and the layer's result is the same with or
    without the hook."""
    import copy

    from conftest import fitted_slim_layer

    layer = fitted_slim_layer(SlimConfig())
    hooked = copy.deepcopy(layer)
    kept = []
    hooked.base_layer.register_forward_hook(lambda mod, inp, out: kept.append(out))
    x = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(4))
    torch.manual_seed(9)  # the same mask draw in both
    y = layer(x)
    torch.manual_seed(9)
    y_hooked = hooked(x)
    base_out = torch.nn.functional.linear(x, hooked.base_layer.weight, hooked.base_layer.bias)
    assert len(kept) == 1 and torch.equal(kept[0].reshape(base_out.shape), base_out)  # not modified in place
    assert torch.allclose(y, y_hooked, atol=1e-6) and not torch.allclose(y, base_out)


@pytest.mark.parametrize("distance", ["max", "rms"])
def test_cpu_blocked_z_scores_and_scattered_sums_equal_the_one_pass_forms(monkeypatch, distance):
    """On a CPU the z-scores are taken by blocks of rows and the sliding sums by row scatter-adds (fewer fresh
    pages, BENCHMARKS.md section 1): the aggregates equal one pass bit for bit, the sums equal the one-hot matmul
    (padding rows weighted out)."""
    import slimpeft.clustering as C

    g = torch.Generator().manual_seed(2)
    x, centers = torch.randn(53, 12, generator=g), torch.randn(5, 12, generator=g)
    inv_sd = torch.rand(5, 12, generator=g) + 0.5
    k1, agg1 = C._assign(x, centers, inv_sd, distance)  # 53 x 12 < one block
    monkeypatch.setattr(C, "_CPU_BLOCK_ELEMENTS", 12 * 7)  # blocks of 7 rows, the last one short
    assert C._block_rows(x) == 7
    k2, agg2 = C._assign(x, centers, inv_sd, distance)
    assert torch.equal(k1, k2) and torch.equal(agg1, agg2)
    for t in range(53):  # token by token
        z = (x[t] - centers[k1[t]]).abs() * inv_sd[k1[t]]
        want = z.max() if distance == "max" else z.square().mean().sqrt()
        assert torch.allclose(agg2[t], want, rtol=1e-6)
    w = (torch.rand(53, generator=g) > 0.3).float()  # padding: 0
    scat = C._local_sums(x, k1, agg1, w, 5, scatter=True)
    mm = C._local_sums(x, k1, agg1, w, 5, scatter=False)
    assert scat.shape == mm.shape == (5, 27) and torch.allclose(scat, mm, rtol=1e-5, atol=1e-5)
    real = w > 0
    for j in range(5):  # count, sums of [x, agg], sums of their squares
        sel = real & (k1 == j)
        xa = torch.cat([x[sel], agg1[sel, None]], dim=1)  # (n_j, 13)
        assert scat[j, 0] == sel.sum() and mm[j, 0] == sel.sum()
        for got in (scat, mm):
            assert torch.allclose(got[j, 1:14], xa.sum(0), atol=1e-5)
            assert torch.allclose(got[j, 14:], (xa * xa).sum(0), atol=1e-5)


def test_cluster_update_with_padding_weights_equals_update_on_real_tokens():
    cfg = SlimConfig(n_clusters=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, 6, generator=g)
    valid = torch.rand(40, generator=g) > 0.3
    a, b = SlidingClusters(6, cfg, seed=1), SlidingClusters(6, cfg, seed=1)
    a.initialize(x[:20])
    b.load_state_dict(a.state_dict())
    k, agg = a.assign(x)
    a.update(x, k, agg, valid)  # weighted: no copy of the real tokens
    b.update(x[valid], k[valid], agg[valid])  # the straightforward selection
    for name, t in a.state_dict().items():
        torch.testing.assert_close(t, b.state_dict()[name], rtol=1e-5, atol=1e-6, msg=name)
    assert int(a.n_updates) == 1
    before = {n: t.clone() for n, t in a.state_dict().items()}
    a.update(x, k, agg, torch.zeros(40, dtype=torch.bool))  # only padding: nothing changes
    for name, t in a.state_dict().items():
        assert torch.equal(t, before[name]), name


def test_speed_bench_records_every_ratio_and_target(tmp_path):
    margs = ModelBenchArgs(base=str(BASE), batch_size=2, seq_len=16, prompt_len=4, new_tokens=3,
                           infer_batches=(1, 2), reps=1, wide_layers=1)
    out = tmp_path / "speed.json"
    result = run_speed_bench(quick=True, out=out, layer_shape=LayerShape(64, 96, 32), mask_shape=(64, 96),
                             model_args=margs)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    for key in TARGETS:
        assert result[key] > 0 and result["targets"][key]["value"] == result[key]
        assert result["targets"][key]["met"] == (result[key] <= TARGETS[key][0] if TARGETS[key][1] == "<="
                                                 else result[key] >= TARGETS[key][0])
    for key in ("layer_slim_over_base", "layer_slim_over_lora128", "mask_fast_speedup",
                "train_slim_over_lora_tokens_per_s", "infer_slim_over_base_tokens_per_s",
                "infer_wide_slim_over_base_tokens_per_s"):
        spread = result["targets"][key]["rounds"]
        assert 0 < spread["min"] <= spread["median"] <= spread["max"], key
        if key != "mask_fast_speedup":  # one or two rounds: the ratio of the medians lies between the rounds' ratios
            assert spread["min"] * (1 - 1e-9) <= result[key] <= spread["max"] * (1 + 1e-9), key
    assert "rounds" not in result["targets"]["train_slim_over_lora_peak_mem"]  # one measurement, no rounds
    amp = result["train_bf16"]  # the bf16-autocast step of SLIM and LoRA, ratio at the top level
    assert set(amp) == {"slim", "lora"} and all(r["tokens_per_s"] > 0 for r in amp.values())
    assert result["train_bf16_slim_over_lora_tokens_per_s"] == pytest.approx(
        amp["slim"]["tokens_per_s"] / amp["lora"]["tokens_per_s"])
    tr = result["train"]
    assert set(tr) == {"slim", "slim-recommended", "slim-single", "lora", "mixlora", "loramoe", "full"}
    assert tr["slim-single"]["trainable_params"] < tr["slim"]["trainable_params"]  # the same experts, 3 router rows
    assert result["infer_slim_single_over_base_tokens_per_s"] > 0
    assert result["infer_slim_single_merged_over_base_tokens_per_s"] > 0
    for n in ("slim-recommended", "slim-single", "slim-single-merged"):  # prompts the scoring pass flags, counted
        assert 0 <= result["infer"][n]["batch2_flagged"] <= 2
    assert "batch2_flagged" not in result["infer"]["slim"]  # per-token routing: no scoring pass
    assert result["train_slim_recommended_over_lora_tokens_per_s"] == pytest.approx(
        tr["slim-recommended"]["tokens_per_s"] / tr["lora"]["tokens_per_s"])
    # LoRA runs at SLIM's trainable budget (within one rank's worth of parameters)
    slim_params = tr["slim"]["trainable_params"]
    assert abs(tr["lora"]["trainable_params"] - slim_params) < 0.01 * slim_params
    assert tr["slim"]["peak_mib"] > 0 and tr["lora"]["peak_mib"] > 0
    assert result["train_slim_over_lora_peak_mem"] == pytest.approx(tr["slim"]["peak_mib"] / tr["lora"]["peak_mib"])
    assert result["infer_slim_over_base_tokens_per_s"] == pytest.approx(min(
        result["infer_slim_over_base_tokens_per_s_batch1"], result["infer_slim_over_base_tokens_per_s_batch2"]))
    for n in ("base", "lora", "slim"):
        assert result["infer"][n]["batch2_tokens_per_s"] > 0
        assert result["infer_wide"][n]["batch2_tokens_per_s"] > 0
    assert result["infer_wide_slim_over_base_tokens_per_s"] == pytest.approx(min(
        result["infer_wide_slim_over_base_tokens_per_s_batch1"],
        result["infer_wide_slim_over_base_tokens_per_s_batch2"]))
    assert result["meta"]["wide_shape"]["hidden_size"] == 2048
    ops = result["layer_ops"]  # ATen ops per fwd+bwd: the GPU's kernel launches
    assert ops["slim"] > ops["loramoe"] > ops["lora128"] > ops["base"] >= 2
    assert result["layer_ops_slim_over_lora128"] == pytest.approx(ops["slim"] / ops["lora128"])
    assert tr["slim"]["ops_per_step"] > tr["lora"]["ops_per_step"] > 0  # a whole training step, on the CPU
    assert result["train_ops_slim_over_lora"] == pytest.approx(tr["slim"]["ops_per_step"] / tr["lora"]["ops_per_step"])
    assert 0 < result["infer_slim_recommended_over_base_tokens_per_s"] <= result[
        "infer_slim_recommended_over_base_tokens_per_s_batch1"]


def test_wide_base_has_tinyllama_layer_shape_and_slim_adapts_its_mlp():
    from slimpeft.bench.speed import build_method

    model = build_method("slim", str(BASE), wide_layers=1)
    up = model.base_model.model.layers[0].mlp.up_proj
    assert (up.d_in, up.d_out) == (2048, 5632)
    assert len(model.adapter_layers()) == 3  # gate, up, down of the one layer


def test_peak_memory_grows_with_the_batch():
    small = peak_step_memory("lora", ModelBenchArgs(base=str(BASE), batch_size=1, seq_len=16))
    large = peak_step_memory("lora", ModelBenchArgs(base=str(BASE), batch_size=16, seq_len=128))
    # 16 x 128 tokens: the (b, t, vocab 4096) logits alone and their gradient are 2 x 32 MiB
    assert large["peak_mib"] > small["peak_mib"] + 32


@pytest.mark.parametrize("routing", [
    {"ood_pooling": "sequence", "ood_score": "standardized", "ood_source": "max", "yield_strength": 8.0},
    {"ood_pooling": "causal", "ood_score": "standardized", "ood_source": "first", "yield_strength": 8.0},
    {"ood_pooling": "sequence", "ood_score": "standardized", "ood_source": "prepass", "yield_strength": 8.0},
], ids=["sequence-max", "causal-first", "sequence-prepass"])
def test_fast_path_with_carried_scores_equals_reference_in_a_whole_model(routing):
    """Scores carried across layers (max / first) and pooled over the sequence, in a forward pass and in KV-cache
    generation: the eval fast path gives the reference path's logits and tokens."""
    from conftest import tiny_llama

    from slimpeft import methods

    model = methods.build("slim", tiny_llama(), r=4, n_lora_experts=4, n_clusters=4, **routing)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.adapter_layers().values():
            layer.experts.lora_B.normal_(0.0, 0.5, generator=g)
            layer.router.normal_(0.0, 0.5, generator=g)
        model.train()
        for _ in range(20):
            ids = torch.randint(3, 40, (8, 12), generator=g)  # in-domain: the lower part of the vocabulary
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    model.eval()
    ids = torch.cat([torch.randint(3, 40, (2, 12), generator=g), torch.randint(60, 97, (2, 12), generator=g)])
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding in one sequence

    def run(record: bool):
        model.ctx.record = record
        try:
            with torch.no_grad():
                logits = model(input_ids=ids, attention_mask=mask).logits
                gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=5,
                                     min_new_tokens=5, pad_token_id=0)
        finally:
            model.ctx.record = False
            for layer in model.adapter_layers().values():
                layer.records = []
        return logits, gen

    ref_logits, ref_gen = run(record=True)  # recording forces the reference path in every layer
    layer = next(iter(model.adapter_layers().values()))
    assert layer._eval_cache is None
    fast_logits, fast_gen = run(record=False)
    assert layer._eval_cache is not None  # the fast path ran
    torch.testing.assert_close(fast_logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert torch.equal(fast_gen, ref_gen)
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(fast_logits, base_logits, atol=1e-3)  # the adapters act
    recs = model.routing_records(input_ids=ids, attention_mask=mask)
    flagged = torch.stack([r["d"] > 0 for r in recs.values()]).any(0)  # (real tokens,) flagged in some layer
    assert 0 < float(flagged.float().mean()) < 1  # the scores really route some inputs to the identity experts


def test_record_path_keeps_quick_and_gpu_records_apart():
    from slimpeft.bench.speed import record_path

    names = {record_path(Path("out"), q, d).name for q in (False, True) for d in ("cpu", "cuda", "cuda:1")}
    assert names == {"speed.json", "speed-quick.json", "speed-cuda.json", "speed-cuda-quick.json"}
    assert record_path(Path("out"), True, "cpu", stem="layer") == Path("out/layer-quick.json")


def test_op_count_counts_work_not_views_and_sees_the_backward():
    from slimpeft.bench.speed import op_count

    a, b = torch.randn(4, 3), torch.randn(4, 3)
    assert op_count(lambda: (a * b).sum()) == 2
    assert op_count(lambda: a.view(3, 4).t().unsqueeze(0)) == 0  # views launch nothing
    w = torch.randn(3, 5, requires_grad=True)
    fwd = op_count(lambda: (a @ w).sum())
    assert fwd == 2 and op_count(lambda: (a @ w).sum().backward()) > fwd  # backward ops counted too


def test_slim_layer_kernel_launches_do_not_grow():
    """ATen ops per training forward + backward (about the kernel launches on a GPU, where SLIM is launch-bound:
    BENCHMARKS.md section 1). 136 before the fused cluster update, 119 after; a change that adds launches to the
    training path shows here (a new torch version that decomposes ops differently may move the count: re-measure).
    Counted on the CPU, whose sliding sums are two row scatter-adds (a GPU runs the one-hot matmul: 2 ops fewer); 119
    since the nearest-centre distances are one addmm."""
    from slimpeft.bench.speed import layer_op_counts

    counts = layer_op_counts()
    assert counts["base"] == 2 and counts["lora128"] == 12  # the yardsticks: a matmul fwd+bwd, PEFT's LoRA
    assert counts["slim"] <= 119


def test_round_ratios_pairs_the_rounds():
    from slimpeft.bench.timing import interleaved_times, round_ratios

    assert round_ratios([2.0, 3.0, 8.0], [1.0, 1.0, 2.0]) == {"min": 2.0, "median": 3.0, "max": 4.0}
    with pytest.raises(ValueError, match="equally long"):
        round_ratios([1.0], [1.0, 2.0])
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=1, reps=3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up, then round-robin
    assert [len(v) for v in times.values()] == [3, 3] and all(t >= 0 for v in times.values() for t in v)
