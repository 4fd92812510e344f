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


def args(out, steps: int):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, save_steps=2,
                             learning_rate=1e-2, report_to=[], use_cpu=True, logging_steps=1, disable_tqdm=True,
                             seed=0)


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
