"""``modules_to_save``: a sequence classifier's new head trains in full next to the adapter, is saved and loaded
with it, and stays the original inside ``disable_adapter()`` and after ``unload()`` (SLIM, the MoE baselines and
peft's LoRA)."""

from __future__ import annotations

import copy

import pytest
import torch

from slimpeft import SlimConfig, SlimModel, SlimTrainer, get_slim_model, methods
from slimpeft.modules_to_save import ModuleToSave

IDS = torch.randint(3, 97, (16, 10), generator=torch.Generator().manual_seed(2))
LABELS = torch.arange(16) % 3


def classifier(seed: int = 0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=64, pad_token_id=0, num_labels=3)
    return LlamaForSequenceClassification(cfg).eval()


class Labelled(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return IDS.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": IDS[i], "attention_mask": torch.ones_like(IDS[i]), "labels": LABELS[i]}


def train(model, out, steps: int = 4, **kw):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, save_steps=2,
                             learning_rate=5e-2, report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    SlimTrainer(model=model, args=args, train_dataset=Labelled()).train(**kw)


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def test_slim_trains_the_head_saves_it_and_disable_adapter_gives_the_original(tmp_path):
    base = classifier()
    original = copy.deepcopy(base)
    model = get_slim_model(base, SlimConfig(r=4, n_clusters=4, modules_to_save=["score"]))
    head = model.base_model.score
    assert isinstance(head, ModuleToSave) and list(model.saved_modules()) == ["score"]
    assert head.trained.weight.requires_grad and not head.base_layer.weight.requires_grad
    assert model.trainable_outside_adapter() == []  # the head's copy is part of the adapter
    assert head.weight is head.trained.weight  # attribute reads go to the module in use
    train(model, tmp_path / "run")
    assert not torch.equal(head.trained.weight, original.score.weight)  # the head trained ...
    assert torch.equal(head.base_layer.weight, original.score.weight)  # ... the original did not
    with model.disable_adapter():
        assert torch.equal(logits(model), logits(original))  # exactly the base model, head included
    # the checkpoint and the saved adapter hold the head's copy; loading gives the same classifier
    ckpt = tmp_path / "run" / "checkpoint-4"
    from safetensors.torch import load_file

    assert "score.trained.weight" in load_file(ckpt / "adapter_model.safetensors")
    model.save_pretrained(tmp_path / "adapter")
    loaded = SlimModel.from_pretrained(classifier(), tmp_path / "adapter")
    assert torch.equal(logits(loaded), logits(model))
    # resumed from step 2 on a fresh model: the uninterrupted run's head and adapter, bit for bit
    fresh = get_slim_model(classifier(), SlimConfig(r=4, n_clusters=4, modules_to_save=["score"]))
    train(fresh, tmp_path / "run", resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    after = model.state_dict()
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, after[k]), k
    # unload: the original head module back in place
    unloaded = model.unload()
    assert unloaded.score is head.base_layer and torch.equal(logits(unloaded), logits(original))


def test_without_modules_to_save_the_head_stays_frozen(tmp_path):
    model = get_slim_model(classifier(), SlimConfig(r=4, n_clusters=4))
    assert not model.base_model.score.weight.requires_grad and model.saved_modules() == {}


@pytest.mark.parametrize("name", ["mixlora", "loramoe", "mola", "lora"])
def test_baselines_train_save_and_load_the_head(name, tmp_path):
    original = classifier()
    model = methods.build(name, classifier(), modules_to_save=["score"])
    train(model, tmp_path / "run", steps=2)
    assert "score" in "".join(n for n, p in model.named_parameters() if p.requires_grad)
    model.save_pretrained(tmp_path / "adapter")
    loaded = methods.load(name, classifier(), tmp_path / "adapter")
    got, want = logits(loaded), logits(model)
    assert torch.equal(got, want)
    assert not torch.allclose(got, logits(original))  # the head (and adapter) moved


def test_bad_modules_to_save_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ValueError, match=r"`modules_to_save`='score' must be None or a non-empty list of module"):
        SlimConfig(modules_to_save="score")
    with pytest.raises(ValueError, match=r"`modules_to_save`=\[\] must be None"):
        methods.make_config("mixlora", modules_to_save=[])
    with pytest.raises(ValueError, match=r"entry 'classifier' matches no module of this model \(its top-level "
                                         r"modules: \['model', 'score'\]\)"):
        get_slim_model(classifier(), SlimConfig(modules_to_save=["classifier"]))
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp' overlaps the adapted layer "
                                         r"'model.layers.0.mlp.gate_proj'"):
        get_slim_model(classifier(), SlimConfig(modules_to_save=["mlp"]))
    # an adapter saved with a head, loaded onto a model without that module: refused, the model unchanged
    model = get_slim_model(classifier(), SlimConfig(r=4, n_clusters=4, modules_to_save=["score"]))
    model.save_pretrained(tmp_path / "a")
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=4))
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    with pytest.raises(ValueError, match=r"adapter_config.json: `modules_to_save` entry 'score' matches no module"):
        SlimModel.from_pretrained(lm, tmp_path / "a")
    after = lm.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())
