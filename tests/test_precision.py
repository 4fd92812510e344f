"""Mixed precision (torch.autocast, as HF Trainer's bf16=True runs it): every method trains and generates, and what
precision.py keeps in float32 is computed exactly as without autocast."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import fitted_slim_layer, tiny_llama

from slimpeft import SlimConfig, methods
from slimpeft.clustering import _assign, _local_sums
from slimpeft.config import PRESETS, RECOMMENDED_ROUTING


def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


VARIANTS = [*methods.available(), "slim-recommended", "slim-single", "slim-sparse", "slim-dare"]


def build(name: str):
    model = tiny_llama()
    if name == "slim-recommended":
        return methods.build("slim", model, **RECOMMENDED_ROUTING)
    if name == "slim-single":
        return methods.build("slim", model, **PRESETS["single"])
    if name == "slim-dare":
        return methods.build("slim", model, mask_mode="dare")
    built = methods.build("slim" if name == "slim-sparse" else name, model)
    if name == "slim-sparse":
        for layer in built.slim_layers().values():
            layer.dispatch = "sparse"
    return built


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", VARIANTS)
def test_every_method_trains_and_generates_under_autocast(name, dtype, device, ids):
    """bf16 as HF Trainer's bf16=True runs it, fp16 with its gradient scaler (fp16=True); on a GPU too when there is
    one (a CPU has no fp16 speed-up, but the same autocast rules)."""
    model = build(name).to(device).train()
    ids = ids.to(device)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scaler = torch.amp.GradScaler(device, enabled=dtype == torch.float16)
    mask = torch.ones_like(ids)
    losses = []
    for _ in range(3):
        with torch.autocast(device, dtype=dtype):
            out = model(input_ids=ids, attention_mask=mask, labels=ids)
        scaler.scale(out.loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        losses.append(float(out.loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]  # it learns
    first = float(ref(input_ids=ids, attention_mask=mask, labels=ids).loss.detach())  # float32, step 0 weights
    assert losses[0] == pytest.approx(first, rel=2e-2)
    for p in model.parameters():
        assert p.dtype == torch.float32  # autocast casts operands, never the weights
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=dtype):
        gen = model.generate(input_ids=ids[:2, :6], attention_mask=mask[:2, :6], do_sample=False, max_new_tokens=4,
                             min_new_tokens=4, pad_token_id=0)
    assert gen.shape == (2, 10)


def test_clusters_compute_in_float32_under_autocast():
    g = torch.Generator().manual_seed(0)
    x, centers = torch.randn(512, 64, generator=g), torch.randn(32, 64, generator=g) * 0.3
    inv_sd, w = torch.rand(32, 64, generator=g) + 0.5, torch.ones(512)
    k, agg = _assign(x, centers, inv_sd, "max")
    with bf16():
        k16, agg16 = _assign(x, centers, inv_sd, "max")
    assert torch.equal(k, k16) and torch.equal(agg, agg16)
    for scatter in (True, False):  # the CPU's scatter-adds and the GPU's one-hot matmul
        sums = _local_sums(x, k, agg, w, 32, scatter=scatter)
        with bf16():
            sums16 = _local_sums(x, k, agg, w, 32, scatter=scatter)
        assert sums16.dtype == torch.float32 and torch.equal(sums, sums16), scatter


@pytest.mark.parametrize("hooked", [False, True])
def test_slim_layer_under_autocast_slides_as_in_float32_and_routes_so_in_eval(hooked):
    """Under autocast: training slides the clusters exactly as float32 does and outputs the float32 result to bf16
    rounding (the router's matmul follows autocast there); eval routes as float32 does (the routing records and
    the fast path). ``hooked``: a hook on the base layer (the out-of-place mix)."""
    cfg = SlimConfig(r=4, alpha=8, n_lora_experts=4, n_identity_experts=2, n_clusters=4)
    layer = fitted_slim_layer(cfg)
    if hooked:
        layer.base_layer.register_forward_hook(lambda m, i, o: None)
    twin = copy.deepcopy(layer)
    x = torch.randn(3, 16, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
    x16 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(5)  # the same fresh masks in both
    y = layer(x)
    y.sum().backward()
    torch.manual_seed(5)
    with bf16():
        y16 = twin(x16)
    assert y16.dtype == torch.bfloat16
    y16.float().sum().backward()
    torch.testing.assert_close(y16.float(), y, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(x16.grad, x.grad, rtol=5e-2, atol=5e-2)
    for (name, a), (_, b) in zip(layer.clusters.state_dict().items(), twin.clusters.state_dict().items()):
        assert torch.equal(a, b), name  # sliding statistics from float32 inputs, in float32
    layer.eval(), twin.eval()
    layer.ctx.record = twin.ctx.record = True  # routing records: the reference path's decisions
    with torch.no_grad():
        layer(x)
        with bf16():
            twin(x16)
    a, b = layer.records[-1], twin.records[-1]
    assert torch.equal(a["slots"], b["slots"]) and torch.equal(a["d"], b["d"])
    layer.ctx.record = twin.ctx.record = False  # the eval fast path: routing in float32, so the same outputs
    with torch.no_grad():
        y = layer(x)
        with bf16():
            y16 = twin(x16)
    torch.testing.assert_close(y16.float(), y, rtol=2e-2, atol=2e-2)


def test_train_precision_bf16_runs_autocast_and_fp16_is_refused_on_cpu(tiny_base, tmp_path):
    from typer.testing import CliRunner

    from slimpeft.cli import app

    runner = CliRunner()
    out = tmp_path / "bf16"
    res = runner.invoke(app, ["train", "--base", str(tiny_base), "--out", str(out), "--steps", "2", "--batch-size",
                              "4", "--set", "r=4", "--precision", "bf16", "--no-progress"])
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["args"]["precision"] == "bf16" and cfg["mixed_precision"] == "bf16"
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    if not torch.cuda.is_available():
        res = runner.invoke(app, ["train", "--base", str(tiny_base), "--out", str(tmp_path / "fp16"), "--steps",
                                  "2", "--precision", "fp16"])
        assert res.exit_code != 0 and "--precision fp16 needs a CUDA GPU" in res.output
        assert not (tmp_path / "fp16").exists()  # refused before anything is written
    res = runner.invoke(app, ["train", "--base", str(tiny_base), "--out", str(tmp_path / "x"), "--precision", "fp8"])
    assert res.exit_code != 0 and "--precision 'fp8': unknown" in res.output


@pytest.mark.parametrize("name", VARIANTS)
def test_a_model_cast_to_bf16_trains_generates_and_saves_float32(name, ids, tmp_path):
    """``model.to(torch.bfloat16)`` after adapting (what DeepSpeed's bf16 engine does): adapters in bf16, SLIM's
    cluster statistics kept float32; the saved files are float32 and load back to the same outputs."""
    model = build(name).to(torch.bfloat16).train()
    clusters = [m for m in model.modules() if type(m).__name__ == "SlidingClusters"]
    assert all(b.dtype == torch.float32 for c in clusters for b in c.buffers() if b.is_floating_point())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mask = torch.ones_like(ids)
    losses = []
    for _ in range(3):
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    assert all(c.initialized and int(c.n_updates) > 0 for c in clusters)  # the clusters slid, in float32
    model.eval()
    with torch.no_grad():
        gen = model.generate(input_ids=ids[:2, :6], attention_mask=mask[:2, :6], do_sample=False, max_new_tokens=4,
                             min_new_tokens=4, pad_token_id=0)
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert gen.shape == (2, 10)
    model.save_pretrained(tmp_path)
    if name == "full":
        return  # a whole model, saved by transformers
    method = "slim" if name.startswith("slim") else name
    if method in ("lora", "dora"):
        return  # PEFT's own files
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} <= {torch.float32, torch.int64, torch.bool}
    # loading builds float32 adapters (the default on any base); cast like the trained model, the same outputs
    loaded = methods.load(method, tiny_llama().to(torch.bfloat16), tmp_path).to(torch.bfloat16).eval()
    if name == "slim-sparse":
        for layer in loaded.slim_layers().values():
            layer.dispatch = "sparse"
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids, attention_mask=mask).logits, logits)


def test_casting_a_slim_layer_keeps_its_cluster_statistics_exact_in_float32():
    layer = fitted_slim_layer(SlimConfig(r=4, alpha=8, n_lora_experts=4, n_identity_experts=2, n_clusters=4))
    before = {k: v.clone() for k, v in layer.clusters.state_dict().items()}
    layer.to(torch.bfloat16)
    layer.half()
    assert layer.experts.lora_A.dtype == torch.float16 and layer.router.dtype == torch.float16  # the adapter follows
    for k, v in layer.clusters.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k  # fitted values, not bf16-rounded ones
