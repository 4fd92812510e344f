"""``modules_to_save``: a sequence classifier's new head trains in full next to the adapter, is saved and loaded
with it (SLIM, the MoE baselines and peft's LoRA, the same modules matched), is the original inside
``disable_adapter()`` and ``restore_base()``, and stays trained after ``unload()`` (as PEFT's)."""

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
    # unload (as PEFT's): the adapter goes, the trained head stays; restore_base: the model before adaptation
    trained_logits = logits(model)
    unloaded = model.unload()
    assert unloaded.score is head.trained
    assert not torch.equal(logits(unloaded), trained_logits)  # the adapter is gone ...
    with torch.no_grad():  # ... and the head is the trained one: the original's hidden states through it
        hidden = original.model(input_ids=IDS).last_hidden_state[:, -1]
    torch.testing.assert_close(logits(unloaded), head.trained(hidden), rtol=0, atol=0)
    again = get_slim_model(classifier(), SlimConfig(r=4, n_clusters=4, modules_to_save=["score"]))
    restored = again.restore_base()
    assert isinstance(restored.score, torch.nn.Linear) and torch.equal(logits(restored), logits(original))


def test_without_modules_to_save_the_head_stays_frozen(tmp_path):
    model = get_slim_model(classifier(), SlimConfig(r=4, n_clusters=4))
    assert not model.base_model.score.weight.requires_grad and model.saved_modules() == {}


@pytest.mark.parametrize("name", ["mixlora", "loramoe", "mola", "lora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_baselines_train_save_and_load_the_head(name, dtype, tmp_path):
    """Saved as float32 whatever the head's dtype, loaded back into a bf16 base's copy as well."""
    original = classifier().to(dtype)
    model = methods.build(name, classifier().to(dtype), modules_to_save=["score"])
    assert model.get_nb_trainable_parameters()[0] == methods.trainable_budget(name, classifier(),
                                                                              modules_to_save=["score"])
    if dtype == torch.float32:
        train(model, tmp_path / "run", steps=2)
    else:  # a moved head without training (the Trainer refuses bf16 on this CPU-only setup's defaults)
        with torch.no_grad():
            next(p for n, p in model.named_parameters() if "score" in n and p.requires_grad).add_(0.5)
    assert "score" in "".join(n for n, p in model.named_parameters() if p.requires_grad)
    model.save_pretrained(tmp_path / "adapter")
    loaded = methods.load(name, classifier().to(dtype), tmp_path / "adapter")
    got, want = logits(loaded), logits(model)
    assert torch.equal(got, want)
    assert not torch.allclose(got.float(), logits(original).float())  # the head (and adapter) moved


@pytest.mark.parametrize("name", ["slim", "mixlora", "lora"])
def test_every_method_matches_the_same_modules(name):
    """Dotted suffixes, as target_modules: 'norm' is the final norm only, never 'input_layernorm' (peft alone
    matches any string suffix)."""
    model = methods.build(name, classifier(), modules_to_save=["norm"])
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad and "norm" in n)
    assert len(trained) == 1 and "layernorm" not in trained[0] and trained[0].endswith("weight")


def test_the_scoring_pass_reads_the_base_modules_not_their_trained_copies():
    """ood_source='prepass' scores the frozen base's hidden states: a trained copy of a module in front of the
    adapted layers (here the embedding) does not move the score, as the adapter's weights do not."""
    from slimpeft import RECOMMENDED_ROUTING

    model = get_slim_model(classifier(), SlimConfig(r=4, n_clusters=4, modules_to_save=["embed_tokens"],
                                                    **RECOMMENDED_ROUTING))
    model.train()
    model(input_ids=IDS)  # fits the clusters on the base's hidden states
    model.eval()

    def score():
        return {n: s.ood_score for n, s in model.routing_stats(input_ids=IDS).items()}

    before = score()
    with torch.no_grad():
        model.base_model.model.embed_tokens.trained.weight.mul_(3.0)
    assert score() == before


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
    five = classifier()
    five.score = torch.nn.Linear(32, 5, bias=False)  # another number of labels: the base does not fit the file
    with pytest.raises(ValueError, match=r"a: the saved modules_to_save does not fit this base model \(nothing was "
                                         r"changed\):\n  score.trained.weight: \(3, 32\) in the adapter, this base "
                                         r"model's module has \(5, 32\)"):
        SlimModel.from_pretrained(five, tmp_path / "a")
    after = lm.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(v, before[k]) for k, v in after.items())


def test_peft_lora_says_which_modules_its_suffix_matching_adds(caplog):
    """peft matches modules_to_save by plain string suffix: DistilBERT's top-level 'classifier' also takes its
    'pre_classifier', which no name given to peft avoids; the build says so (the other methods train 'classifier'
    only)."""
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    def distilbert():
        torch.manual_seed(0)
        return DistilBertForSequenceClassification(DistilBertConfig(vocab_size=97, dim=32, n_layers=1, n_heads=4,
                                                                    hidden_dim=64, num_labels=3))

    with caplog.at_level("WARNING", logger="slimpeft"):
        lora = methods.build("lora", distilbert(), modules_to_save=["classifier"], target_modules=["lin1", "lin2"])
    assert "besides ['classifier'] it also trains ['pre_classifier'] in full" in caplog.text
    assert any("pre_classifier" in n for n, p in lora.named_parameters() if p.requires_grad)
    slim = methods.build("slim", distilbert(), modules_to_save=["classifier"], target_modules=["lin1", "lin2"])
    assert [n for n, p in slim.named_parameters() if p.requires_grad and "classifier" in n] == \
        ["base_model.classifier.trained.weight", "base_model.classifier.trained.bias"]
