"""QLoRA-style training: every adapter method on a base whose linear layers bitsandbytes quantized (4-bit NF4 / FP4,
int8), on the CPU. The adapter on a quantized base must compute exactly what it computes on the dequantized float
base; the Trainer must accept the model; the quantized weights must not move; saving and loading must round-trip."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from transformers.trainer_utils import validate_quantization_for_training
from typer.testing import CliRunner

from slimpeft import SlimConfig, SlimTrainer, get_slim_model, methods
from slimpeft.cli import app
from slimpeft.quantization import is_quantized, quantized_layers

bnb = pytest.importorskip("bitsandbytes")  # an extra of the project (slimpeft[quant]); `make test` installs it

from test_hf_trainer import args as trainer_args  # noqa: E402

ADAPTERS = ["slim", "mixlora", "loramoe", "mola", "lora", "dora"]
SMALL = {"slim": {"r": 4, "n_clusters": 4, "mask_rate": 0.0}, "mixlora": {"r": 4, "n_experts": 4},
         "loramoe": {"r": 4, "n_experts": 4}, "mola": {"r": 4, "experts_schedule": [2, 4]},
         "lora": {"r": 4}, "dora": {"r": 4}}


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    """A tiny base 64 wide, so that bitsandbytes' CPU inference kernel (weights repacked in blocks of 64 inputs and
    32 outputs) runs on its layers, and JSONL data."""
    from train_helpers import save_tiny_base, write_data

    d = tmp_path_factory.mktemp("qbase")
    return save_tiny_base(d / "base", hidden_size=64, intermediate_size=128), write_data(d / "data.jsonl")


@pytest.fixture(scope="module")
def base_dir(base_and_data):
    return base_and_data[0]


def load(base_dir, quantize: str = "nf4"):
    from slimpeft.training import load_base

    return load_base(str(base_dir), quantize=quantize)[0].eval()


def dequantized(base_dir, quantize: str = "nf4"):
    """The float base whose linear weights are the 4-bit base's, dequantized: what the quantized base computes."""
    q, f = load(base_dir, quantize), load(base_dir, "")
    with torch.no_grad():
        for name in quantized_layers(q):
            w = q.get_submodule(name).weight
            f.get_submodule(name).weight.copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state))
    return f


def perturb(model) -> None:
    """Non-zero adapter outputs (B = 0 at initialisation), the same values on any base."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad and p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def ids() -> torch.Tensor:
    return torch.randint(4, 300, (4, 12), generator=torch.Generator().manual_seed(3))


def adapter_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def packed_weights(model) -> dict[str, bytes]:
    return {n: model.get_submodule(n).weight.data.numpy().tobytes() for n in quantized_layers(model)}


@pytest.mark.parametrize("method", ADAPTERS)
def test_adapter_on_a_4bit_base_computes_what_it_computes_on_the_dequantized_base(method, base_dir):
    qbase = load(base_dir)
    for name in quantized_layers(qbase):
        # bitsandbytes' CPU inference (on CPUs with AVX512-BF16) repacks the weights with bfloat16 block scales, which
        # moves the bare base's logits by ~3e-3 and can flip SLIM's discrete routing; kept off, inference dequantizes
        # exactly as training does, and what is compared is this project's arithmetic
        qbase.get_submodule(name).support_avx512bf16_for_cpu = False
    q = methods.build(method, qbase, **SMALL[method])
    f = methods.build(method, dequantized(base_dir), **SMALL[method])
    assert quantized_layers(q) and not quantized_layers(f)
    validate_quantization_for_training(q)  # what transformers.Trainer.__init__ checks: an adapter is attached
    perturb(q)
    perturb(f)
    x = ids()
    out = {}
    for name, m in (("q", q), ("f", f)):
        m.train()  # SLIM fits its clusters here; the same seed: the same dropout draws in both
        torch.manual_seed(0)
        loss = m(input_ids=x, labels=x).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}
        m.eval()
        with torch.no_grad():
            out[name] = (loss.detach(), grads, m(input_ids=x).logits)
            with m.disable_adapter():
                out[name + "-base"] = m(input_ids=x).logits
    (lq, gq, oq), (lf, gf, of) = out["q"], out["f"]
    # training: bitsandbytes dequantizes the 4-bit weights exactly, so loss and gradients are the float base's
    assert torch.isfinite(lq) and abs(lq.item() - lf.item()) < 1e-5, (lq.item(), lf.item())
    assert gq.keys() == gf.keys() and all(torch.allclose(gq[n], gf[n], rtol=1e-4, atol=1e-6) for n in gq)
    assert (oq - of).abs().max().item() < 1e-4
    assert (out["q-base"] - out["f-base"]).abs().max().item() < 1e-4
    assert (oq - out["q-base"]).abs().max().item() > 5e-2  # the adapter does change the outputs


@pytest.mark.parametrize("method", ["slim", "mixlora", "lora"])
def test_the_trainer_trains_an_adapter_on_a_4bit_base_and_it_reloads(method, base_dir, tmp_path):
    model = methods.build(method, load(base_dir), **SMALL[method])
    packed, before = packed_weights(model), adapter_tensors(model)
    x = ids()
    ds = [{"input_ids": r, "labels": r} for r in x.repeat(4, 1)]
    trainer = SlimTrainer(model=model, args=trainer_args(tmp_path / "ckpt", steps=4), train_dataset=ds)
    trainer.train()  # transformers refuses "purely quantized models" without trainable adapters: accepted here
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(map(lambda v: v == v, losses)) and losses[-1] < losses[0]
    assert packed_weights(model) == packed  # the quantized base did not move
    after = adapter_tensors(model)
    assert all(not torch.equal(before[n], after[n]) for n in after if "lora_B" in n or "experts" in n)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=x).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = methods.load(method, load(base_dir), tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=x).logits, want)
    if method != "lora":
        assert not (tmp_path / "ckpt" / "checkpoint-2" / "model.safetensors").exists()  # adapter-only checkpoints


@pytest.mark.parametrize("quantize", ["fp4", "int8"])
def test_slim_on_fp4_and_int8_bases_trains_and_leaves_the_base_exact(quantize, base_dir):
    model = get_slim_model(load(base_dir, quantize), SlimConfig(**SMALL["slim"]))
    assert {type(model.get_submodule(n)).__name__ for n in quantized_layers(model)} == (
        {"Linear8bitLt"} if quantize == "int8" else {"Linear4bit"})
    x = ids()
    with torch.no_grad():
        ref = load(base_dir, quantize)(input_ids=x).logits
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=x).logits, ref)  # exactly the quantized base


def test_merged_inference_on_a_quantized_base_runs_the_routed_path(base_dir, caplog):
    from slimpeft import RECOMMENDED_ROUTING, SINGLE_EXPERT

    cfg = {**RECOMMENDED_ROUTING, **SINGLE_EXPERT, "r": 4, "n_clusters": 4}
    with caplog.at_level(logging.WARNING, logger="slimpeft"):
        merged = get_slim_model(load(base_dir), SlimConfig(**cfg, merged_inference=True))
    assert "quantized weights cannot be merged" in caplog.text
    routed = get_slim_model(load(base_dir), SlimConfig(**cfg))
    x = ids()
    for m in (merged, routed):
        perturb(m)
        m.train()
        m(input_ids=x)  # fit the clusters
        m.eval()
    with torch.no_grad():
        assert torch.equal(merged(input_ids=x).logits, routed(input_ids=x).logits)


def test_full_fine_tuning_of_a_quantized_base_is_refused_naming_the_layers(base_dir):
    q = load(base_dir)
    flags = {n: p.requires_grad for n, p in q.named_parameters()}
    with pytest.raises(ValueError, match=r"full fine-tuning needs the base model's weights in floating point; this "
                                         r"base is quantized \(Linear4bit: model\.layers\.0\.self_attn\.q_proj"):
        methods.build("full", q)
    assert {n: p.requires_grad for n, p in q.named_parameters()} == flags  # refused before touching the model
    assert is_quantized(q.model.layers[0].mlp.down_proj) and not is_quantized(q.lm_head)  # bitsandbytes keeps the head


def test_cli_trains_evaluates_and_resumes_with_a_quantized_base(base_and_data, tmp_path):
    base, data = base_and_data
    out = tmp_path / "run"
    common = ["train", "--base", str(base), "--data", str(data), "--out", str(out), "--steps", "2",
              "--batch-size", "4", "--save-steps", "1", "--logging-steps", "1", "--set", "r=4", "--set",
              "n_clusters=4", "--no-progress"]
    runner = CliRunner()
    res = runner.invoke(app, [*common, "--quantize", "nf4"], terminal_width=300)
    assert res.exit_code == 0, res.output
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["args"]["quantize"] == "nf4"
    assert json.loads((out / "train_args.json").read_text())["quantize"] == "nf4"
    from slimpeft.training import load_run

    model, _, _ = load_run(out)
    assert quantized_layers(model)  # eval / inspect load the base as it was trained
    res = runner.invoke(app, ["eval", str(out), "--limit", "2", "--tasks", "general/wordnet-def"],
                        terminal_width=300)
    assert res.exit_code == 0, res.output
    # --resume without --quantize would continue a 4-bit run on a float base: refused, naming it
    res = runner.invoke(app, [*common, "--resume"], terminal_width=300)
    assert res.exit_code == 2 and "quantize='nf4' (now '')" in " ".join(res.output.split()), res.output


@pytest.mark.parametrize("extra, message", [
    (["--quantize", "int4"], "--quantize 'int4': unknown; choose from nf4, fp4, int8"),
    (["--quantize", "nf4", "--method", "full"], "--quantize: full fine-tuning cannot train quantized weights"),
    (["--quantize", "nf4", "--deepspeed", str(Path(__file__).parents[1] / "configs" / "deepspeed" / "zero2.json")],
     "--quantize with --deepspeed: not supported"),
])
def test_cli_refuses_quantize_values_it_cannot_honour(base_and_data, tmp_path, extra, message):
    base, data = base_and_data
    res = CliRunner().invoke(app, ["train", "--base", str(base), "--data", str(data), "--out", str(tmp_path / "r"),
                                     "--steps", "1", *extra], terminal_width=300)
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert not (tmp_path / "r").exists()


def test_quantized_bench_records_footprints_peaks_and_ratios(tmp_path):
    from slimpeft.bench.quantized import QuantBenchArgs, run_quantized_bench

    shape = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 4}
    out = tmp_path / "quantized.json"
    res = run_quantized_bench(out=out, args=QuantBenchArgs(layers=2, batch_size=2, seq_len=16, reps=1, shape=shape))
    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    rec = res["models"]
    assert set(rec) == {"slim-fp32", "lora-fp32", "slim-nf4", "lora-nf4"}
    # 2 layers of 4 x 256^2 + 3 x 256 x 512 linear weights = 1.31 M parameters: 5.0 MiB in float32, ~0.7 MiB in
    # 4 bits (half a byte each, plus block scales); embeddings, head and adapter stay float32 in both
    saved = rec["slim-fp32"]["footprint_mib"] - rec["slim-nf4"]["footprint_mib"]
    assert 4.0 < saved < 4.6, saved
    for m in ("slim", "lora"):
        assert rec[f"{m}-fp32"]["trainable_params"] == rec[f"{m}-nf4"]["trainable_params"] > 0
        assert res[f"{m}_nf4_over_fp32_footprint"] < 1
        assert all(r["train_memory_mib"] > r["footprint_mib"] > 0 and r["step_s"] > 0 for r in rec.values())
    assert res["slim_over_lora_tokens_per_s_nf4"] > 0 and res["meta"]["bitsandbytes"] == bnb.__version__


def test_gradient_checkpointing_on_a_4bit_base_trains_exactly_as_without(base_and_data, tmp_path):
    from train_helpers import losses, tiny_train_args

    from slimpeft.training import train

    base, data = base_and_data
    runs = {gc: train(tiny_train_args(base, data, tmp_path / f"gc{int(gc)}", steps=3, quantize="nf4",
                                      gradient_checkpointing=gc)) for gc in (False, True)}
    plain, checkpointed = losses(runs[False]), losses(runs[True])
    assert len(plain) == 3 and plain == checkpointed


def test_peft_prepare_model_for_kbit_training_then_slim(base_dir):
    from peft import prepare_model_for_kbit_training

    model = get_slim_model(prepare_model_for_kbit_training(load(base_dir)), SlimConfig(**SMALL["slim"]))
    assert model.base_model.is_gradient_checkpointing  # what peft's helper turns on for QLoRA
    model.train()
    x = ids()
    model(input_ids=x, labels=x).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_layers_bitsandbytes_cpu_kernel_cannot_take_fall_back_to_exact_dequantization(tmp_path):
    """An MLP 80 wide (the shipped base's is 688): bitsandbytes' CPU repacking asserts out_features % 32 == 0 and
    fails on inputs that are no multiple of 64. Loaded by slimpeft or adapted by it, such layers keep the exact
    dequantization in inference; the others keep bitsandbytes' kernel."""
    from train_helpers import save_tiny_base
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from slimpeft.quantization import guard_cpu_repacking

    path = save_tiny_base(tmp_path / "base", hidden_size=64, intermediate_size=80)
    x = ids()
    cpu_kernel = load(path).model.layers[0].self_attn.q_proj.support_avx512bf16_for_cpu  # 64 x 64: kept
    mlp = {f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")}
    # what a user loads with transformers alone
    raw = AutoModelForCausalLM.from_pretrained(path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), device_map={"": "cpu"})
    if cpu_kernel:  # this CPU has the kernel: bare bitsandbytes fails on the 80-wide layers
        with pytest.raises((AssertionError, RuntimeError)), torch.no_grad():
            raw.eval()(input_ids=x)
    for model in (load(path), get_slim_model(AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
            device_map={"": "cpu"}), SlimConfig(**SMALL["slim"]))):
        assert guard_cpu_repacking(model) == []  # done already, by load_base / get_slim_model
        off = {n.removeprefix("base_model.").removesuffix(".base_layer")
               for n, m in model.named_modules() if getattr(m, "support_avx512bf16_for_cpu", True) is False}
        assert off == (mlp if cpu_kernel else set())
        model.train()
        with torch.no_grad():
            train_logits = model(input_ids=x).logits
        model.eval()
        with torch.no_grad():
            assert (model(input_ids=x).logits - train_logits).abs().max().item() < 2e-2  # runs, near training's


@pytest.mark.parametrize("method", ["slim", "mixlora"])
def test_bfloat16_compute_dtype_trains_with_float32_adapters(method, base_dir):
    """QLoRA's usual setting on GPUs: 4-bit weights, bfloat16 matmuls; the adapter stays float32."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    def base():
        return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16), device_map={"": "cpu"})

    model = methods.build(method, base(), **SMALL[method])
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    x = ids()
    model.train()
    loss = model(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None and torch.isfinite(p.grad).all()
                                        for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad(), model.disable_adapter():
        assert torch.equal(model(input_ids=x).logits, base().eval()(input_ids=x).logits)


def test_without_bitsandbytes_quantize_is_refused_naming_the_extra(monkeypatch):
    import sys

    from slimpeft.quantization import quantization_config
    from slimpeft.training import TrainArgs

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` now raises ImportError
    with pytest.raises(ImportError, match=r"quantize='nf4' needs bitsandbytes: pip install 'slimpeft\[quant\]'"):
        quantization_config("nf4")
    errs = TrainArgs(quantize="nf4", data="downstream").validate()
    assert "--quantize: quantize='nf4' needs bitsandbytes: pip install 'slimpeft[quant]'" in errs


@pytest.mark.parametrize("method", ["slim", "mixlora", "lora"])
def test_gpt2_conv1d_layers_quantized_train_as_their_dequantized_float_version(method, tmp_path):
    """transformers turns GPT-2's Conv1D layers (weights stored transposed) into 4-bit Linear layers; the adapter on
    them computes what it computes on the float Conv1D model holding the dequantized weights."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
                               eos_token_id=2)).save_pretrained(tmp_path)
    q = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32), device_map={"": "cpu"})
    f = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(q.transformer.h[0].mlp.c_fc).__name__ == "Linear4bit"
    assert type(f.transformer.h[0].mlp.c_fc).__name__ == "Conv1D"
    with torch.no_grad():
        for name in quantized_layers(q):
            w = q.get_submodule(name).weight
            f.get_submodule(name).weight.copy_(bnb.functional.dequantize_4bit(w.data, w.quant_state).T)  # (i, o)
    mq, mf = methods.build(method, q, **SMALL[method]), methods.build(method, f, **SMALL[method])
    x = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(0))
    out = []
    for m in (mq, mf):
        perturb(m)
        m.train()
        torch.manual_seed(0)
        out.append(m(input_ids=x, labels=x).loss.item())
    assert abs(out[0] - out[1]) < 1e-5, out
