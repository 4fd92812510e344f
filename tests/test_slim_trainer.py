"""``SlimTrainer`` (``from slimpeft import SlimTrainer``): the Trainer's checkpoints and ``save_model()`` hold the
adapter only, and resuming from them continues exactly where the run was; ``load_best_model_at_end`` loads the
best adapter; a checkpoint of another configuration or a damaged one is refused before anything is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file
from test_hf_trainer import Records
from test_hf_trainer import args as targs

from slimpeft import SlimTrainer, methods

ADAPTED = ["slim", "mixlora", "loramoe", "mola"]


def build(name: str, **overrides):
    kw = {"r": 4, "n_clusters": 4} if name == "slim" else {}
    return methods.build(name, tiny_llama(), **{**kw, **overrides})


@pytest.mark.parametrize("name", ADAPTED)
def test_checkpoints_hold_the_adapter_and_resuming_continues_the_run(name, tmp_path):
    model = build(name)
    SlimTrainer(model=model, args=targs(tmp_path / "a"), train_dataset=Records()).train()
    after = model.state_dict()
    ckpt = tmp_path / "a" / "checkpoint-2"
    files = {p.name for p in ckpt.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= files
    assert "model.safetensors" not in files  # no frozen base weights in a checkpoint
    saved = load_file(ckpt / "adapter_model.safetensors")
    assert saved.keys() == model.adapter_state_dict().keys()  # the adapter's tensors, no base weight
    assert all(".base_layer." not in k and "embed_tokens" not in k for k in saved)
    if name == "slim":  # the cluster statistics travel with the adapter
        assert any(k.endswith("clusters.centers") for k in saved)
    # resumed at step 2 in a fresh model on the same base, trained to step 4: the uninterrupted run's every
    # parameter and buffer, bit for bit (adapter, cluster statistics, AdamW moments, data order, RNG)
    fresh = build(name)
    SlimTrainer(model=fresh, args=targs(tmp_path / "a"), train_dataset=Records()).train(
        resume_from_checkpoint=str(ckpt))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, after[k]), k


@pytest.mark.parametrize("name", ["slim", "mixlora"])
def test_save_model_writes_an_adapter_that_methods_load_reads(name, tmp_path):
    model = build(name)
    trainer = SlimTrainer(model=model, args=targs(tmp_path / "run", steps=2), train_dataset=Records())
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final" / "model.safetensors").exists()
    loaded = methods.load(name, tiny_llama(), tmp_path / "final")
    want = model.adapter_state_dict()
    got = loaded.adapter_state_dict()
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    model.eval()
    ids = torch.randint(3, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)


def test_peft_lora_and_full_fine_tuning_keep_the_trainers_own_saving(tmp_path):
    for name, expected in (("lora", "adapter_model.safetensors"), ("full", "model.safetensors")):
        model = methods.build(name, tiny_llama())
        SlimTrainer(model=model, args=targs(tmp_path / name, steps=2), train_dataset=Records()).train()
        files = {p.name for p in (tmp_path / name / "checkpoint-2").iterdir()}
        assert expected in files, (name, files)
        fresh = methods.build(name, tiny_llama(seed=1 if name == "full" else 0))  # LoRA: same base, adapter only
        SlimTrainer(model=fresh, args=targs(tmp_path / name, steps=2), train_dataset=Records()).train(
            resume_from_checkpoint=True)
        after = model.state_dict()
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, after[k]), (name, k)


@pytest.mark.parametrize("greater_is_better", [False, True])
def test_load_best_model_at_end_loads_the_best_adapter(tmp_path, greater_is_better):
    """The eval loss falls at every evaluation: the best checkpoint is the last one (lower is better) or the first
    (greater is better, here as a way to make an earlier checkpoint the best), which the rotation must keep."""
    model = build("slim")
    trainer = SlimTrainer(model=model, args=targs(tmp_path, steps=6, eval_strategy="steps", eval_steps=2,
                                                  load_best_model_at_end=True, metric_for_best_model="loss",
                                                  greater_is_better=greater_is_better, save_total_limit=1),
                          train_dataset=Records(), eval_dataset=Records())
    trainer.train()
    best = trainer.state.best_model_checkpoint
    evals = {r["step"]: r["eval_loss"] for r in trainer.state.log_history if "eval_loss" in r}
    assert list(evals) == [2, 4, 6] and evals[2] > evals[4] > evals[6]
    step = 2 if greater_is_better else 6
    assert best == str(tmp_path / f"checkpoint-{step}")
    # the rotation kept the best (save_total_limit=1 keeps it and the latest), and at the end the Trainer removes
    # every other one; its trainer_state.json names its final place, not the staging folder it was written in
    assert [p.name for p in tmp_path.iterdir()] == [f"checkpoint-{step}"]
    assert json.loads((tmp_path / f"checkpoint-{step}" / "trainer_state.json").read_text())["best_model_checkpoint"] \
        == best
    saved = load_file(f"{best}/adapter_model.safetensors")
    now = model.adapter_state_dict()
    assert saved.keys() == now.keys()
    for k in saved:
        assert torch.equal(saved[k], now[k]), k


def test_a_checkpoint_of_another_config_or_damaged_is_refused_before_loading(tmp_path):
    model = build("slim")
    SlimTrainer(model=model, args=targs(tmp_path / "a", steps=2), train_dataset=Records()).train()
    ckpt = tmp_path / "a" / "checkpoint-2"

    other = build("slim", yield_strength=4.0)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match=r"checkpoint-2: the saved 'slim' adapter does not fit this adapted model "
                                         r"\(nothing was changed\):\n  config field 'yield_strength': saved 1.0, "
                                         r"this model 4.0$"):
        SlimTrainer(model=other, args=targs(tmp_path / "b", steps=4), train_dataset=Records()).train(
            resume_from_checkpoint=str(ckpt))
    assert all(torch.equal(v, before[k]) for k, v in other.state_dict().items())  # nothing was loaded

    wider = build("slim", r=8)
    with pytest.raises(ValueError, match=r"config field 'r': saved 4, this model 8\n.*gate_proj.experts.lora_A: "
                                         r"\(8, 4, 32\) torch.float32, expected \(8, 8, 32\)"):
        wider.load_adapter_checkpoint(ckpt)
    with pytest.raises(ValueError, match=r"`method` is 'slim'; expected 'mixlora'"):
        build("mixlora").load_adapter_checkpoint(ckpt)

    w = ckpt / "adapter_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1  # one flipped bit in the last tensor's bytes: still a well-formed file
    w.write_bytes(bytes(data))
    same = build("slim")
    before = {k: v.clone() for k, v in same.state_dict().items()}
    with pytest.raises(ValueError, match=r"SHA-256 differs"):
        same.load_adapter_checkpoint(ckpt)
    assert all(torch.equal(v, before[k]) for k, v in same.state_dict().items())


def test_parameters_trained_outside_the_adapter_are_checkpointed_with_the_whole_model(tmp_path, caplog):
    """A base weight set trainable by hand (a task head) is not in the adapter files: an adapter-only checkpoint would
    lose it on resume, so the whole model is checkpointed, with a warning; save_pretrained warns that it leaves it
    out."""
    def with_head():
        model = build("slim")
        model.base_model.lm_head.weight.requires_grad_(True)
        return model

    model = with_head()
    assert model.trainable_outside_adapter() == ["base_model.lm_head.weight"]
    with caplog.at_level("WARNING", logger="slimpeft"):
        SlimTrainer(model=model, args=targs(tmp_path / "a"), train_dataset=Records()).train()
    assert "1 trainable parameter(s) outside the adapter (e.g. ['base_model.lm_head.weight'])" in caplog.text
    files = {p.name for p in (tmp_path / "a" / "checkpoint-2").iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files
    after = model.state_dict()
    assert not torch.equal(after["base_model.lm_head.weight"], tiny_llama().lm_head.weight)  # the head trained
    fresh = with_head()
    SlimTrainer(model=fresh, args=targs(tmp_path / "a"), train_dataset=Records()).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, after[k]), k
    caplog.clear()
    with caplog.at_level("WARNING", logger="slimpeft"):
        model.save_pretrained(tmp_path / "adapter")
    assert "1 trainable parameter(s) outside the adapter are not saved with it" in caplog.text


def test_resuming_an_adapter_checkpoint_with_a_parameter_set_trainable_since(tmp_path, caplog):
    """The checkpoint holds the adapter only (nothing else trained when it was written); a model that now also trains
    a base weight resumes the adapter from it, the other weight from its current values, with a warning."""
    model = build("slim")
    SlimTrainer(model=model, args=targs(tmp_path / "a", steps=2), train_dataset=Records()).train()
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert (ckpt / "adapter_config.json").is_file()
    fresh = build("slim")
    fresh.base_model.lm_head.weight.requires_grad_(True)
    with caplog.at_level("WARNING", logger="slimpeft"):
        SlimTrainer(model=fresh, args=targs(tmp_path / "b", steps=2), train_dataset=Records())._load_from_checkpoint(
            str(ckpt))
    assert "holds the adapter only: 1 trainable parameter(s) outside it (e.g. ['base_model.lm_head.weight'])" \
        in caplog.text
    want = model.adapter_state_dict()
    for k, v in fresh.adapter_state_dict().items():
        assert torch.equal(v, want[k]), k
