"""A plain ``transformers.Trainer`` with its default arguments (``remove_unused_columns`` on) trains every method,
checkpoints and resumes -- what a user of the library, not of ``slim train``, does."""

from __future__ import annotations

import inspect

import pytest
import torch
from conftest import tiny_llama

from slimpeft import methods

IDS = torch.randint(3, 97, (16, 12), generator=torch.Generator().manual_seed(1))


class Records(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return IDS.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": IDS[i], "attention_mask": torch.ones_like(IDS[i]), "labels": IDS[i],
                "source": torch.tensor(i)}  # a column no model takes: the Trainer drops it


def args(out, steps: int = 4, **kw):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, save_steps=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
                             seed=0, **kw)


def test_wrapped_forward_reports_the_base_models_signature():
    from transformers.utils.generic import find_labels

    for name in ("slim", "loramoe"):
        model = methods.build(name, tiny_llama())
        params = set(inspect.signature(model.forward).parameters)
        assert {"input_ids", "attention_mask", "labels"} <= params  # the columns the Trainer keeps
        assert ("sample_type" in params) == (name == "loramoe")  # and the wrapper's own (LoRAMoE's sample types)
        assert find_labels(type(model)) == ["labels"]  # the Trainer's label columns: its eval loss
        ids = IDS[:2]
        torch.testing.assert_close(model.forward(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["slim", "mixlora", "loramoe", "mola", "full"])
def test_plain_trainer_trains_checkpoints_and_resumes(name, tmp_path):
    from transformers import Trainer

    model = methods.build(name, tiny_llama())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model=model, args=args(tmp_path, 4), train_dataset=Records(), eval_dataset=Records())
    trainer.train()
    metrics = trainer.evaluate()  # the eval loss: mean over two batches of 8
    model.eval()
    with torch.no_grad():
        want = sum(float(model(input_ids=IDS[i:i + 8], attention_mask=torch.ones_like(IDS[i:i + 8]),
                               labels=IDS[i:i + 8]).loss) for i in (0, 8)) / 2
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-5)
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert trainer.state.global_step == 4 and len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in after)  # it trained
    if name == "slim":
        n_updates = {int(v) for k, v in after.items() if k.endswith("clusters.n_updates")}
        assert n_updates == {3}  # step 1 fits the clusters, steps 2-4 slide them
    # resuming at the last checkpoint restores every parameter and buffer (cluster statistics included)
    fresh = methods.build(name, tiny_llama())
    Trainer(model=fresh, args=args(tmp_path, 4), train_dataset=Records()).train(resume_from_checkpoint=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, after[k]), k


def test_load_base_keeps_transformers_hub_kernels_off(tiny_base):
    """transformers >= 5 with ``kernels`` installed turns Hub kernels on by default and downloads them on the first
    train()/eval() on a GPU (an offline GPU run then fails: seen on an H200); ``load_base`` loads without them."""
    from transformers import AutoModelForCausalLM, PreTrainedModel

    from slimpeft.training import load_base

    if not hasattr(PreTrainedModel, "set_use_kernels"):
        pytest.skip("this transformers has no Hub kernels")
    model, _ = load_base(str(tiny_base))
    assert model.use_kernels is False
    model.train(), model.eval()  # no kernelization: nothing to fetch
    assert model.use_kernels is False and model.kernels_mode is None
    try:
        import kernels  # noqa: F401
    except ImportError:
        return
    assert AutoModelForCausalLM.from_pretrained(str(tiny_base)).use_kernels is True  # the default load_base avoids


def tied_llama(seed: int = 0):
    """A tiny Llama whose input embedding and output head share one matrix (tie_word_embeddings, as GPT-2's)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model


@pytest.mark.parametrize("name", ["slim", "mixlora", "full"])
def test_plain_trainer_checkpoints_and_resumes_a_tied_base(name, tmp_path):
    """safetensors refuses shared tensors and the Trainer saves a wrapper with save_file(model.state_dict()): the
    wrappers' state dict copies the second name of a tied matrix, so checkpoints save, and resuming writes the values
    into the one shared parameter (still tied)."""
    from transformers import Trainer

    model = methods.build(name, tied_llama())
    state = model.state_dict()
    keys = [k for k in state if k.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert len(keys) == 2 and torch.equal(state[keys[0]], state[keys[1]])
    assert state[keys[0]].data_ptr() != state[keys[1]].data_ptr()  # a copy: no shared memory in the state dict
    Trainer(model=model, args=args(tmp_path, 4), train_dataset=Records()).train()
    assert (tmp_path / "checkpoint-4" / "model.safetensors").is_file()
    after = model.state_dict()
    fresh = methods.build(name, tied_llama(seed=1))
    Trainer(model=fresh, args=args(tmp_path, 4), train_dataset=Records()).train(resume_from_checkpoint=True)
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, after[k]), k
    base = fresh.base_model
    assert base.lm_head.weight.data_ptr() == base.model.embed_tokens.weight.data_ptr()  # still one matrix


def test_adapting_an_adapted_model_is_refused_with_a_clear_message():
    from slimpeft import get_slim_model

    model = methods.build("slim", tiny_llama())
    for target in (model, model.base_model):
        with pytest.raises(ValueError, match=r"already holds adapter layers .*SlimLinear.*unload\(\)"):
            methods.build("slim", target)
        with pytest.raises(ValueError, match=r"already holds adapter layers"):
            methods.build("mixlora", target)
        with pytest.raises(ValueError, match=r"already holds adapter layers"):
            get_slim_model(target)  # the public entry outside the registry
    again = methods.build("slim", model.unload())  # after unload: the plain base again
    assert len(again.slim_layers()) == len(model.layer_names)


def test_save_refuses_non_finite_adapter_and_dict_configs_work(tmp_path):
    from slimpeft import SlimConfig, get_slim_model

    model = get_slim_model(tiny_llama(), {"r": 4, "n_clusters": 4})  # a dict of SlimConfig's fields
    assert model.slim_config == SlimConfig(r=4, n_clusters=4)
    with pytest.raises(ValueError, match=r"unknown SlimConfig field"):
        get_slim_model(tiny_llama(), {"rank": 4})
    with pytest.raises(TypeError, match=r"SlimConfig or a dict"):
        get_slim_model(tiny_llama(), 4)
    with torch.no_grad():
        next(iter(model.slim_layers().values())).experts.lora_B[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"not saved: non-finite values"):
        model.save_pretrained(tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()
