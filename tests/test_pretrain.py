"""Tests of the pretraining recipe (a tiny smoke run) and of the shipped base model in ``assets/base``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from slimpeft.data.tasks import build_task, list_tasks
from slimpeft.evaluation.multiple_choice import evaluate_task
from slimpeft.pretrain import PretrainArgs, _parse_args, general_corpus, model_card, pretrain

BASE = Path(__file__).resolve().parents[1] / "assets" / "base"


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread: on a shared 2-core machine two threads per process are ~10x slower (oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_args_validation_and_cli_parsing():
    with pytest.raises(ValueError, match=r"PretrainArgs.hidden_size \(30\) must be divisible by num_heads \(4\)"):
        PretrainArgs(hidden_size=30)
    with pytest.raises(ValueError, match="PretrainArgs.steps must be positive, got 0"):
        PretrainArgs(steps=0)
    args = _parse_args(["--out", "x", "--steps", "7", "--lr", "0.01", "--no-progress"])
    assert (args.out, args.steps, args.lr, args.progress) == ("x", 7, 0.01, False)


def test_corpus_holds_train_qa_only():
    corpus = general_corpus(seed=0, extra_nouns=0, elements_repeat=1)
    assert len(corpus["general/wordnet-def"]) == 2800
    assert len(corpus["general/arithmetic"]) == 9800
    assert len(corpus["statements"]) == 4 * 3000 + 2 * 116
    assert len(general_corpus(seed=0, extra_nouns=0, arithmetic_repeat=2)["general/arithmetic"]) == 2 * 9800
    qa = set(corpus["general/arithmetic"])
    from slimpeft.data.tasks import format_training_text

    assert not qa & {format_training_text(ex) for ex in build_task("general/arithmetic").test}
    text = "\n".join(t for texts in corpus.values() for t in texts)
    assert "FOLDOC" not in text and "Q: Does '" not in text


def test_tiny_pretraining_smoke(tmp_path):
    args = PretrainArgs(
        out=str(tmp_path / "base"), vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
        steps=40, batch_size=16, lr=1e-2, warmup_steps=5, extra_nouns=0, elements_repeat=1, eval_limit=4,
        log_every=10, progress=False,
    )
    out = pretrain(args)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
            "pretrain_log.json"} <= names
    log = json.loads((out / "pretrain_log.json").read_text())
    losses = [entry["loss"] for entry in log["log"]]
    assert [entry["step"] for entry in log["log"]] == [1, 10, 20, 30, 40]
    assert losses[-1] < losses[0] - 1.0, losses
    assert set(log["accuracy"]) == set(list_tasks()) and all(r["n"] == 4 for r in log["accuracy"].values())
    card = (out / "README.md").read_text()
    assert "40 steps" in card and "`general/wordnet-def`" in card and f"{log['parameters']:,} parameters" in card

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == log["parameters"]
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<s>", "</s>")
    assert tok("Q: 12", add_special_tokens=True)["input_ids"] == tok("Q: 12", add_special_tokens=False)["input_ids"]
    assert model_card(log) == card


@pytest.fixture(scope="module")
def shipped():
    if not (BASE / "model.safetensors").is_file():
        pytest.fail(f"{BASE} has no model.safetensors: run `python -m slimpeft.pretrain --out assets/base`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(BASE, local_files_only=True).eval()
    tok = AutoTokenizer.from_pretrained(BASE, local_files_only=True)
    return model, tok


def test_shipped_base_size_and_card(shipped):
    model, _ = shipped
    n_params = sum(p.numel() for p in model.parameters())
    assert 3_000_000 <= n_params <= 10_000_000
    assert (BASE / "model.safetensors").stat().st_size <= 50 * 2**20
    log = json.loads((BASE / "pretrain_log.json").read_text())
    assert log["parameters"] == n_params and log["wall_seconds"] <= 60 * 60
    card = (BASE / "README.md").read_text()
    assert "python -m slimpeft.pretrain" in card
    for name in list_tasks():
        assert f"`{name}`" in card


@pytest.mark.parametrize("name", list_tasks("general"))
def test_shipped_base_knows_general_tasks(shipped, name):
    model, tok = shipped
    result = evaluate_task(model, tok, name)  # the whole test split
    assert result.n == len(build_task(name).test)
    assert result.accuracy >= 2 * result.chance, (name, result.accuracy)
    # The model card reports what the evaluator measures.
    card = json.loads((BASE / "pretrain_log.json").read_text())["accuracy"][name]
    assert result.accuracy == pytest.approx(card["accuracy"], abs=0.011)


@pytest.mark.parametrize("name", list_tasks("downstream"))
def test_shipped_base_is_near_chance_on_downstream(shipped, name):
    model, tok = shipped
    result = evaluate_task(model, tok, name, limit=100)
    assert result.accuracy <= result.chance + 0.15, (name, result.accuracy)
