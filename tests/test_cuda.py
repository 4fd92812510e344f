"""SLIM on a CUDA GPU computes what it computes on the CPU (skipped where torch sees no GPU; CI has none).

Run on a GPU machine with ``pytest tests/test_cuda.py``. Besides, on every machine: SLIM's two expert dispatch
paths (the GPU's sparse one, the CPU's dense one) forced on a SlimLinear give the same outputs and gradients, and
``slim bench speed --device cuda`` is refused with a clear message where there is no GPU.
"""

from __future__ import annotations

import copy

import pytest
import torch

from slimpeft import SlimConfig, SlimLinear

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="no CUDA GPU on this machine")


@pytest.fixture(autouse=True)
def _exact_float32():
    """Full float32 matmuls on the GPU (no TF32), so that CPU and GPU agree to float32 rounding."""
    if not CUDA:
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _layer(cfg: SlimConfig) -> SlimLinear:
    """conftest.fitted_slim_layer at 48 -> 40 (left in training mode)."""
    from conftest import fitted_slim_layer

    return fitted_slim_layer(cfg, 48, 40)


def _fwd_bwd(layer: SlimLinear, x: torch.Tensor, dispatch: str) -> tuple[torch.Tensor, ...]:
    layer = copy.deepcopy(layer)
    layer.dispatch = dispatch
    x = x.clone().requires_grad_(True)
    torch.manual_seed(7)  # the same training-mask draw for every call
    y = layer(x)
    y.square().sum().backward()
    return (y.detach(), x.grad, layer.experts.lora_A.grad, layer.experts.lora_B.grad, layer.router.grad)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    """||a - b|| / ||b|| <= tol: float32 sums in another order (elementwise checks trip on terms that cancel)."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    assert a.shape == b.shape
    err = float((a - b).norm() / b.norm().clamp_min(1e-30))
    assert err <= tol, f"relative error {err:.2e} > {tol:.0e}"


DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", [{}, {"mask_mode": "none"}, {"identity_gate": "yield", "yield_strength": 4.0}],
                         ids=["default", "no-mask", "yield-gate"])
def test_forced_dispatch_paths_agree_in_training_and_eval(device, cfg):
    layer = _layer(SlimConfig(r=4, n_lora_experts=8, n_identity_experts=2, n_clusters=4, **cfg)).to(device)
    x = torch.randn(3, 10, layer.d_in, generator=torch.Generator().manual_seed(1)).to(device)
    dense, sparse = _fwd_bwd(layer.train(), x, "dense"), _fwd_bwd(layer.train(), x, "sparse")
    for a, b in zip(dense, sparse):
        _close(a, b)
    assert dense[0].abs().sum() > 0 and dense[2].abs().sum() > 0  # the experts act and learn
    layer.eval()
    with torch.no_grad():
        outs = {}
        for mode in ("dense", "sparse", "auto"):
            layer.dispatch = mode
            outs[mode] = layer(x)
    _close(outs["sparse"], outs["dense"])
    _close(outs["auto"], outs["dense"])


@needs_cuda
@pytest.mark.parametrize("cfg", [{}, {"identity_gate": "yield", "yield_strength": 4.0}], ids=["default", "yield"])
def test_layer_on_cuda_equals_cpu_in_training_and_eval(cfg):
    """The same layer on both devices: training forward/backward (no mask draw, whose streams differ by device)
    and eval with the fixed inference mask."""
    shape = {"r": 4, "n_lora_experts": 8, "n_identity_experts": 2, "n_clusters": 4, **cfg}
    nomask = _layer(SlimConfig(mask_mode="none", **shape))
    x = torch.randn(3, 10, nomask.d_in, generator=torch.Generator().manual_seed(2))
    cpu = _fwd_bwd(nomask.train(), x, "auto")
    gpu = _fwd_bwd(copy.deepcopy(nomask).cuda().train(), x.cuda(), "auto")  # auto: dense, as on the CPU
    for a, b in zip(cpu, gpu):
        _close(b, a)
    layer = _layer(SlimConfig(**shape))
    layer.eval()
    gl = copy.deepcopy(layer).cuda()
    with torch.no_grad():
        _close(gl(x.cuda()), layer(x))


def _tiny_slim(device: str, **overrides):
    from conftest import tiny_llama

    from slimpeft import methods

    torch.manual_seed(0)
    kw = {"r": 4, "n_lora_experts": 4, "n_clusters": 4, **overrides}
    return methods.build("slim", tiny_llama(), **kw).to(device)


def _train_and_generate(device: str, **overrides) -> tuple[list[float], torch.Tensor]:
    model = _tiny_slim(device, **overrides)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(5)
    losses = []
    model.train()
    for _ in range(4):
        ids = torch.randint(3, 40, (4, 12), generator=g).to(device)
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    model.eval()
    prompt = torch.cat([torch.randint(3, 40, (2, 8), generator=g), torch.randint(60, 97, (2, 8), generator=g)])
    prompt = prompt.to(device)
    with torch.no_grad():
        out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
    return losses, out.cpu()


@needs_cuda
@pytest.mark.parametrize("routing", ["paper", "recommended", "single"])
def test_slim_model_trains_and_generates_on_cuda_as_on_cpu(routing):
    from slimpeft.config import PRESETS

    overrides = {**PRESETS[routing], "mask_mode": "none"}  # no mask draw: the devices' random streams differ
    cpu_losses, cpu_tokens = _train_and_generate("cpu", **overrides)
    gpu_losses, gpu_tokens = _train_and_generate("cuda", **overrides)
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-4)
    assert cpu_losses[-1] < cpu_losses[0]  # it learns
    assert torch.equal(gpu_tokens, cpu_tokens)


@needs_cuda
def test_merged_inference_on_cuda_equals_the_routed_model():
    from slimpeft.config import PRESETS

    routed = _tiny_slim("cuda", **PRESETS["single"])
    merged = _tiny_slim("cuda", **PRESETS["single"], merged_inference=True)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in routed.adapter_layers().values():
            B = layer.experts.lora_B
            B.copy_(torch.randn(B.shape, generator=g) * 0.5)  # drawn on the CPU: the same on every machine
        routed.train()
        for _ in range(5):
            ids = torch.randint(3, 40, (8, 12), generator=g).cuda()
            routed(input_ids=ids, attention_mask=torch.ones_like(ids))
    merged.load_state_dict(routed.state_dict())
    routed.eval(), merged.eval()
    for lo, hi in ((3, 40), (60, 97)):  # in-domain (unflagged: merged weights), out-of-domain (flagged)
        prompt = torch.randint(lo, hi, (3, 8), generator=g).cuda()
        with torch.no_grad():
            kw = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
            _close(merged(**kw).logits, routed(**kw).logits)
            gen = {"do_sample": False, "max_new_tokens": 5, "min_new_tokens": 5, "pad_token_id": 0}
            assert torch.equal(merged.generate(**kw, **gen), routed.generate(**kw, **gen))


@needs_cuda
def test_speed_bench_runs_on_cuda(tmp_path):
    from pathlib import Path

    from slimpeft.bench.speed import LayerShape, ModelBenchArgs, run_speed_bench

    base = Path(__file__).resolve().parents[1] / "assets" / "base"
    margs = ModelBenchArgs(base=str(base), batch_size=2, seq_len=16, prompt_len=4, new_tokens=3,
                           infer_batches=(1, 2), reps=1, wide_layers=1, device="cuda")
    result = run_speed_bench(quick=True, out=tmp_path / "speed-cuda.json", layer_shape=LayerShape(64, 96, 32),
                             mask_shape=(64, 96), model_args=margs)
    assert result["meta"]["device"].startswith("cuda (")
    assert result["layer_slim_dense_over_base"] > 0 and result["layer_slim_sparse_over_base"] > 0
    assert result["train"]["slim"]["peak_mib"] > 0 and result["train"]["lora"]["peak_mib"] > 0
    assert result["infer_wide"]["slim"]["batch2_tokens_per_s"] > 0


@pytest.mark.skipif(CUDA, reason="the refusal is for machines without a GPU")
def test_speed_bench_on_a_missing_gpu_is_refused_with_a_clear_error():
    from typer.testing import CliRunner

    from slimpeft.bench.speed import resolve_device
    from slimpeft.cli import app

    for bad, words in (("cuda", "sees no CUDA GPU"), ("meta", "runs on cpu or cuda"), ("nonsense", "not a device")):
        with pytest.raises(ValueError, match=words):
            resolve_device(bad)
    res = CliRunner().invoke(app, ["bench", "speed", "--device", "cuda", "--quick"])
    assert res.exit_code == 2
    assert "--device: 'cuda'" in res.output and "no CUDA GPU" in res.output
