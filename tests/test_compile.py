"""torch.compile: a SLIM training step compiles to one graph once the first step has fitted the clusters (no graph
break, no recompilation at a fixed shape), and compiled training computes what eager training does -- every method,
through torch.compile directly and through the HF Trainer (``slim train --torch-compile``)."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
from conftest import tiny_llama
from torch._dynamo.testing import CompileCounter, CompileCounterWithBackend
from torch._dynamo.utils import counters

from slimpeft import methods
from slimpeft.config import PRESETS, RECOMMENDED_ROUTING

IDS = torch.randint(3, 97, (4, 16), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
MASK[0, :5] = 0  # left padding in one sequence: the clusters weight it out
BATCH = dict(input_ids=IDS, attention_mask=MASK, labels=IDS)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
SLIM_CONFIGS = {"paper": {}, "recommended": RECOMMENDED_ROUTING, "single": PRESETS["single"],
                "causal-max": dict(ood_pooling="causal", ood_score="standardized", ood_source="max")}


def _breaks() -> int:
    return sum(counters["graph_break"].values())


def _graphs_per_step(model: torch.nn.Module, batches: list[dict]) -> tuple[list[int], list[int]]:
    """(new graphs, new graph breaks) of each training forward + backward of ``model`` under torch.compile."""
    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounter()
    f = torch.compile(model.train(), backend=cnt)
    graphs, breaks = [], []
    for batch in batches:
        g, b = cnt.frame_count, _breaks()
        f(**batch).loss.backward()
        graphs.append(cnt.frame_count - g)
        breaks.append(_breaks() - b)
    return graphs, breaks


@pytest.mark.parametrize("name", list(SLIM_CONFIGS))
def test_slim_training_step_is_one_graph_after_the_first(name):
    graphs, breaks = _graphs_per_step(methods.build("slim", tiny_llama(), **SLIM_CONFIGS[name]), [BATCH] * 4)
    # step 0 fits the clusters (graph breaks); step 1 recompiles the whole model as one graph; then nothing
    assert breaks[0] > 0 and breaks[1:] == [0, 0, 0]
    assert graphs[1:] == [1, 0, 0]


@needs_cuda
def test_slim_training_step_is_one_graph_on_cuda():
    batch = {k: v.cuda() for k, v in BATCH.items()}
    graphs, breaks = _graphs_per_step(methods.build("slim", tiny_llama()).cuda(), [batch] * 4)
    assert breaks[1:] == [0, 0, 0] and graphs[1:] == [1, 0, 0]


@pytest.mark.parametrize("name", ["lora", "mixlora", "loramoe", "mola", "full"])
def test_baselines_compile_to_one_graph(name):
    graphs, breaks = _graphs_per_step(methods.build(name, tiny_llama()), [BATCH] * 3)
    assert graphs == [1, 0, 0] and breaks == [0, 0, 0]


def test_slim_compiles_without_breaks_when_shapes_change():
    batches = []
    for t in (16, 16, 12, 20, 9, 24):  # the Trainer's padded batches change length from step to step
        ids = torch.randint(3, 97, (4, t), generator=torch.Generator().manual_seed(t))
        mask = torch.ones_like(ids)
        mask[1, : t // 3] = 0
        batches.append(dict(input_ids=ids, attention_mask=mask, labels=ids))
    graphs, breaks = _graphs_per_step(methods.build("slim", tiny_llama()), batches)
    assert breaks[1:] == [0] * 5  # shape changes recompile (once dynamic), never break the graph
    assert graphs[1] == 1 and graphs[-1] == 0 and sum(graphs[1:]) <= 3


def _train(config: dict, backend: str | None, steps: int = 4, model: torch.nn.Module | None = None,
           device: str = "cpu"):
    """Losses and final state (on the CPU) of ``steps`` SGD steps, eagerly (backend None) or compiled."""
    torch.manual_seed(1)
    model = model if model is not None else methods.build("slim", tiny_llama(), mask_rate=0.0, **config)
    model.to(device).train()
    batch = {k: v.to(device) for k, v in BATCH.items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    torch._dynamo.reset()
    f = torch.compile(model, backend=backend) if backend else model
    losses = []
    for _ in range(steps):
        loss = f(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return losses, {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _assert_same_run(a, b, tol: float) -> None:
    (la, sa), (lb, sb) = a, b
    assert la == pytest.approx(lb, rel=tol, abs=tol)
    assert la[-1] < la[0]  # it learned
    for k in sa:  # parameters and every cluster buffer (centres, variances, calibration, fitted flag, updates)
        torch.testing.assert_close(sa[k], sb[k], rtol=tol, atol=tol, msg=k)


@pytest.mark.parametrize("name", ["paper", "recommended"])
def test_compiled_training_equals_eager(name):
    """The traced graph (AOTAutograd, no code generation) against eager mode: the routing, the clusters' fitting and
    sliding (one block and the one-hot sums under compile, blocks and scatter-adds eagerly on a CPU), the scoring
    pass. Masks off: compiled code draws its random numbers differently."""
    _assert_same_run(_train(SLIM_CONFIGS[name], "aot_eager"), _train(SLIM_CONFIGS[name], None), 1e-5)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_inductor_training_matches_eager(device, monkeypatch):
    """The generated code users run (inductor: C++ on a CPU, Triton on a GPU): equal to float rounding."""
    if device == "cuda":  # full float32 matmuls on both sides, restored after the test
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    _assert_same_run(_train({}, "inductor", steps=3, device=device), _train({}, None, steps=3, device=device), 1e-4)


@pytest.mark.parametrize("reentrant", [False, True])
def test_compiled_training_with_gradient_checkpointing_equals_eager(reentrant):
    """Gradient checkpointing under compile trains as eager training without it: the clusters slide once per step
    (fitted at step 1, slid at steps 2-4: three updates). (Dynamo leaves HF's checkpointed decoder layers to eager
    mode, for every method: what is compiled here is the rest of the model.)"""
    model = methods.build("slim", tiny_llama(), mask_rate=0.0)
    model.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    compiled = _train({}, "aot_eager", model=model)
    _assert_same_run(compiled, _train({}, None), 1e-5)
    assert {int(v) for k, v in compiled[1].items() if k.endswith("n_updates")} == {3}


def test_loading_a_state_into_a_compiled_model_refits_unfitted_clusters():
    """Compiled code knows whether the clusters are fitted from a Python flag; loading a state dict resets it, so
    loading never-trained clusters into a trained, compiled model makes the next step fit them again, as eagerly."""
    fresh = methods.build("slim", tiny_llama(), mask_rate=0.0).state_dict()
    model = methods.build("slim", tiny_llama(), mask_rate=0.0)
    _train({}, "aot_eager", steps=2, model=model)
    model.load_state_dict(fresh)
    layer = next(iter(model.slim_layers().values()))
    assert not bool(layer.clusters.initialized)
    compiled = _train({}, "aot_eager", steps=2, model=model)
    eager = methods.build("slim", tiny_llama(), mask_rate=0.0)
    eager.load_state_dict(fresh)
    _assert_same_run(compiled, _train({}, None, steps=2, model=eager), 1e-5)


def test_train_cli_compiles_through_the_trainer(tiny_base, tmp_path):
    """``slim train --torch-compile``: the Trainer compiles the model (accelerate's dynamo plugin); the run trains
    the same as eagerly (traced backend: no code generation, seconds) and says it was compiled."""
    import json

    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from slimpeft.cli import app

    runs, graphs = {}, {}
    for flag in ([], ["--torch-compile", "aot_eager"]):
        out = tmp_path / ("compiled" if flag else "eager")
        torch._dynamo.reset()
        counters.clear()
        res = CliRunner().invoke(app, ["train", "--base", str(tiny_base), "--out", str(out), "--steps", "3",
                                       "--batch-size", "4", "--set", "r=4", "--set", "mask_rate=0", "--no-progress",
                                       *flag])
        assert res.exit_code == 0, res.output
        assert json.loads((out / "run_config.json").read_text())["args"]["torch_compile"] == (flag[1] if flag else "")
        runs[bool(flag)] = load_file(out / "adapter" / "adapter_model.safetensors")
        graphs[bool(flag)] = counters["stats"]["unique_graphs"]
    assert graphs[False] == 0 and graphs[True] > 0  # the Trainer really compiled
    assert runs[True].keys() == runs[False].keys()
    for k, v in runs[False].items():
        torch.testing.assert_close(runs[True][k], v, rtol=1e-5, atol=1e-5, msg=k)
    assert {int(v) for k, v in runs[True].items() if k.endswith("n_updates")} == {2}  # fitted, then slid twice


@pytest.mark.parametrize("argv, message", [
    (["--torch-compile", "tvm"], "--torch-compile 'tvm': unknown backend"),
])
def test_train_cli_refuses_bad_compile_options(tiny_base, tmp_path, argv, message):
    from typer.testing import CliRunner

    from slimpeft.cli import app

    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["train", "--base", str(tiny_base), "--out", str(out), "--steps", "2", *argv])
    assert res.exit_code != 0 and message in res.output
    assert not out.exists()  # refused before anything was written


def test_speed_bench_times_the_compiled_training_step():
    """``slim bench speed --torch-compile``: eager and compiled steps of SLIM and LoRA side by side, the compiled
    ones really compiled (traced backend here: seconds, not minutes)."""
    from pathlib import Path

    from slimpeft.bench.speed import ModelBenchArgs, train_compile_benchmark

    base = Path(__file__).resolve().parents[1] / "assets" / "base"
    torch._dynamo.reset()
    counters.clear()
    rec = train_compile_benchmark(ModelBenchArgs(base=str(base), batch_size=2, seq_len=16, reps=2), "aot_eager")
    assert set(rec) == {"slim", "slim-compiled", "lora", "lora-compiled"}
    for k, r in rec.items():
        assert r["tokens_per_s"] == pytest.approx(2 * 16 / r["step_s"]) and len(r["step_rounds_s"]) == 2
        assert ("first_3_steps_s" in r) == k.endswith("-compiled") and r.get("backend", "aot_eager") == "aot_eager"
    assert counters["stats"]["unique_graphs"] > 2  # both models really compiled


# ---------------------------------------------------------------------------------------------- inference
def _trained(name: str) -> torch.nn.Module:
    """A SLIM model of preset ``name`` after two eager training steps (fitted clusters, non-zero adapters)."""
    model = methods.build("slim", tiny_llama(), **SLIM_CONFIGS[name])
    _train_eager(model, 2)
    return model


def _train_eager(model: torch.nn.Module, steps: int) -> None:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model.train()
    for _ in range(steps):
        model(**BATCH).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _generation_kw(**extra) -> dict:
    """generate()'s arguments of the compiled generation tests: two prompts of 6 tokens, 6 greedy new tokens."""
    prompt = IDS[1:3, :6]
    return dict(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=6,
                min_new_tokens=6, pad_token_id=0, **extra)


def _static_compiled(model: torch.nn.Module, kw: dict, cc) -> torch.Tensor:  # noqa: ANN001 -- a CompileConfig
    """generate() with a static KV cache and the compile config ``cc`` (each decoding step compiled)."""
    with torch.no_grad():
        return model.generate(**kw, cache_implementation="static", compile_config=cc)


@pytest.mark.parametrize("name", list(SLIM_CONFIGS))
def test_compiled_inference_is_one_graph_and_follows_training(name):
    """Eval mode under torch.compile: the first call builds the cached eval weights outside the graph, the second
    compiles the whole model as one graph, and after that nothing recompiles, not even when training in between
    changed the weights -- the compiled model then computes with the new ones (the switch to eval mode dropped the
    cache, which the next call rebuilt)."""
    model = _trained(name)
    torch._dynamo.reset()
    counters.clear()
    cnt = CompileCounterWithBackend("aot_eager")
    f = torch.compile(model, backend=cnt)
    inputs = dict(input_ids=IDS, attention_mask=MASK)
    graphs, breaks = [], []
    for cycle in range(3):
        if cycle:
            _train_eager(model, 1)
        for _ in range(2):
            g, b = cnt.frame_count, _breaks()
            with torch.no_grad():
                out = f(**inputs).logits
            graphs.append(cnt.frame_count - g)
            breaks.append(_breaks() - b)
            with torch.no_grad():
                ref = model(**inputs).logits  # eager, on the same weights
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert breaks[0] > 0 and breaks[1:] == [0] * 5
    assert graphs[1:] == [1, 0, 0, 0, 0]


def test_compiled_inference_sees_loaded_and_dropped_weights():
    """The cached eval weights a compiled model reads are dropped by load_state_dict (and by drop_inference_cache
    after an in-place edit), so that it computes with the new weights, as eager mode does."""
    model = _trained("paper")
    g = torch.Generator().manual_seed(1)
    new_B = {k: torch.randn(v.shape, generator=g) * 0.5 for k, v in model.state_dict().items() if "lora_B" in k}
    f = torch.compile(model, backend="aot_eager")
    inputs = dict(input_ids=IDS, attention_mask=MASK)
    with torch.no_grad():
        before = f(**inputs).logits
        f(**inputs)
        model.load_state_dict(new_B, strict=False)
        after = f(**inputs).logits
        torch.testing.assert_close(after, model(**inputs).logits, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(after, before, atol=1e-4)
        for layer in model.slim_layers().values():
            layer.experts.lora_B.mul_(2.0)
        model.drop_inference_cache()
        torch.testing.assert_close(f(**inputs).logits, model(**inputs).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(SLIM_CONFIGS))
def test_compiled_generate_with_a_static_cache_is_one_graph(name):
    """HF generate with a static KV cache and a compile config (what it does by itself on a GPU) compiles each
    decoding step of SLIM to one graph: no graph break, nothing recompiled by a second generate call, and the same
    tokens as eager generation with the dynamic cache. ood_source "prepass" (recommended, single) breaks once per
    step: whether a call continues a prompt (reuse its score) or is one (run the scoring pass) depends on the
    static cache's length, a tensor."""
    from slimpeft.bench.speed import generation_compile_config

    model, kw, cc = _trained(name), _generation_kw(), generation_compile_config("aot_eager", "cpu")
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        ref = model.generate(**kw)
    out = _static_compiled(model, kw, cc)
    graphs = counters["stats"]["unique_graphs"]
    again = _static_compiled(model, kw, cc)
    assert torch.equal(out, ref) and torch.equal(again, ref)
    assert graphs >= 1
    if SLIM_CONFIGS[name].get("ood_source") == "prepass":  # only the read of the cache's length breaks
        assert 0 < _breaks() <= 2 and all("Tensor.item()" in k for k in counters["graph_break"])
    else:
        assert _breaks() == 0
    assert counters["stats"]["unique_graphs"] == graphs  # the second call reused the compiled step


def test_speed_bench_times_compiled_generation():
    """``slim bench speed --torch-compile``'s generation record: eager and compiled generation of the base, LoRA and
    SLIM per batch size, with tokens/s consistent with the times, the first (compiling) call timed, and the
    compiled decoding steps free of graph breaks."""
    from pathlib import Path

    from slimpeft.bench.speed import ModelBenchArgs, infer_compile_benchmark

    base = Path(__file__).resolve().parents[1] / "assets" / "base"
    torch._dynamo.reset()
    counters.clear()
    args = ModelBenchArgs(base=str(base), prompt_len=4, new_tokens=3, infer_batches=(1, 2), reps=2, seq_len=16)
    rec = infer_compile_benchmark(args, "aot_eager")
    assert set(rec) == {"base", "base-compiled", "lora", "lora-compiled", "slim", "slim-compiled"}
    for k, r in rec.items():
        for b in (1, 2):
            assert r[f"batch{b}_tokens_per_s"] == pytest.approx(b * 3 / r[f"batch{b}_s"])
            assert len(r[f"batch{b}_rounds_s"]) == 2
            assert (f"batch{b}_first_call_s" in r) == k.endswith("-compiled")
            assert r.get(f"batch{b}_new_graphs", 1) >= 1  # each model at each batch size compiled its own step
        assert r.get("backend", "aot_eager") == "aot_eager" and r.get("mode", "default") == "default"
    assert counters["stats"]["unique_graphs"] >= 3 and _breaks() == 0  # every model compiled, none broke


@pytest.mark.parametrize("name", ["lora", "mixlora", "loramoe", "mola"])
def test_baselines_generate_compiled_without_breaks(name):
    """The baselines under the same compiled static-cache generation: no break, eager's tokens."""
    from slimpeft.bench.speed import generation_compile_config

    model, kw = methods.build(name, tiny_llama()).eval(), _generation_kw()
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        ref = model.generate(**kw)
    out = _static_compiled(model, kw, generation_compile_config("aot_eager", "cpu"))
    assert torch.equal(out, ref) and _breaks() == 0 and counters["stats"]["unique_graphs"] >= 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_inductor_generation_matches_eager(device, monkeypatch):
    """The generated code of compiled generation (inductor; on a GPU with CUDA graphs, transformers' default mode):
    the same tokens as eager generation, logits equal to float rounding, no graph break."""
    from slimpeft.bench.speed import generation_compile_config

    if device == "cuda":
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = _trained("paper").to(device)
    kw = {k: v.to(device) if torch.is_tensor(v) else v
          for k, v in _generation_kw(output_logits=True, return_dict_in_generate=True).items()}
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        ref = model.generate(**kw)
    out = _static_compiled(model, kw, generation_compile_config("inductor", device))
    assert torch.equal(out.sequences, ref.sequences) and _breaks() == 0
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)


def _non_static_graph_inputs(model: torch.nn.Module) -> list[tuple[int, ...]]:
    """Shapes of the inputs of ``model``'s compiled eval graph (second call) that are neither parameters, buffers
    nor marked static: what CUDA graphs (``mode="reduce-overhead"``) copy into their own buffers before every
    replay."""
    seen: list[list] = []

    def backend(gm, example_inputs):  # noqa: ANN001, ANN202 -- dynamo's backend signature
        seen.append(list(example_inputs))
        return gm.forward

    torch._dynamo.reset()
    f = torch.compile(model, backend=backend)
    # fresh inputs: dynamo marks a tensor static for good once a module held it, which other tests' models may have
    inputs = dict(input_ids=IDS.clone(), attention_mask=MASK.clone())
    with torch.no_grad():
        for _ in range(2):
            f(**inputs)
    buffers = {id(b) for b in model.buffers()}
    return [tuple(t.shape) for t in seen[-1] if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter)
            and id(t) not in buffers and getattr(t, "_dynamo_static_input_type", None) is None]


def test_cached_inference_tensors_are_static_graph_inputs():
    """SLIM's cached eval tensors enter the compiled graph as static inputs, as parameters do, so that CUDA graphs
    read them in place (on an H200: 50 non-static inputs recorded for every graph of base, LoRA and SLIM together,
    BENCHMARKS.md section 1): the compiled SLIM model's only non-static inputs are the call's own, as the base's.
    (Recent dynamo marks tensors held by modules static by itself; the layer marks them too, ``_static_address``.)"""
    model = _trained("paper")
    slim = _non_static_graph_inputs(model)
    assert slim == _non_static_graph_inputs(tiny_llama()) == [tuple(IDS.shape), tuple(MASK.shape)]
    for layer in model.slim_layers().values():
        ew = layer._eval_cache[1]
        assert all(t._dynamo_static_input_type == "unguarded" for t in (ew.W, ew.bias, ew.table, ew.B_cat))
