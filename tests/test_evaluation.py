"""Tests of the multiple-choice / exact-match evaluator and of its agreement with lm-evaluation-harness."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from slimpeft.data.tasks import GenExample, MCExample, build_task, format_mc
from slimpeft.evaluation.multiple_choice import (
    encode_pair,
    evaluate_examples,
    evaluate_task,
    evaluate_tasks,
    greedy_generate,
    loglikelihoods,
    predict_mc,
)
from slimpeft.pretrain import train_tokenizer

TEXTS = [
    "Q: What is the word for: a domestic animal that barks?\nA: dog",
    "Q: What is 12 + 30?\nA: 42",
    "Q: Which element has the symbol O?\nA: oxygen",
    "The word for a large body of salt water is sea.",
] * 20


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """One torch thread: on a shared 2-core machine two threads per process are ~10x slower (oversubscription)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
    )
    return LlamaForCausalLM(config).eval()


class UniformLM(torch.nn.Module):
    """A 'model' whose next-token distribution is uniform: every token has log-probability -log(V)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


class ScriptedLM(torch.nn.Module):
    """Greedily emits ``script[k]`` as the k-th new token after a ``prompt_len``-token prompt (wrapper API only)."""

    def __init__(self, vocab: int, prompt_len: int, script: list[int]):
        super().__init__()
        self.vocab, self.prompt_len, self.script = vocab, prompt_len, script

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        k = input_ids.shape[1] - self.prompt_len
        logits[:, -1, self.script[min(k, len(self.script) - 1)]] = 10.0
        return SimpleNamespace(logits=logits)


def test_encode_pair_moves_trailing_space(tokenizer):
    ctx, cont = encode_pair(tokenizer, "Q: What is 12 + 30?\nA: ", "42")
    ctx2, cont2 = encode_pair(tokenizer, "Q: What is 12 + 30?\nA:", " 42")
    assert (ctx, cont) == (ctx2, cont2)
    assert tokenizer.decode(cont) == " 42" and len(cont) == 3  # " ", "4", "2": digits are split one by one


def test_uniform_model_scores_are_minus_n_log_v(tokenizer):
    model = UniformLM(len(tokenizer))
    requests = [("Q: What is 12 + 30?\nA:", " 42"), ("Q: hi\nA:", " oxygen"), ("Q: hi\nA:", " dog barks loudly")]
    scores = loglikelihoods(model, tokenizer, requests, batch_size=2)
    for (ctx, cont), score in zip(requests, scores):
        n = len(encode_pair(tokenizer, ctx, cont)[1])
        assert score == pytest.approx(-n * math.log(len(tokenizer)), rel=1e-6)
    # Uniform model: the choice with the fewest tokens wins.
    ex = MCExample("hi", ("dog barks loudly", "oxygen", "42 42 42 42"), 0)
    assert predict_mc(model, tokenizer, [ex]) == [1]


def test_loglikelihoods_match_a_manual_loop(tokenizer, tiny_llama):
    requests = []
    for ex in build_task("general/elements").test[:6]:
        prompt, conts = format_mc(ex)
        requests += [(prompt, c) for c in conts]
    batched = loglikelihoods(tiny_llama, tokenizer, requests, batch_size=5)
    manual = []
    with torch.no_grad():
        for ctx, cont in requests:
            ctx_ids = tokenizer(ctx, add_special_tokens=False)["input_ids"]
            all_ids = tokenizer(ctx + cont, add_special_tokens=False)["input_ids"]
            logits = tiny_llama(input_ids=torch.tensor([all_ids])).logits[0]
            logprobs = torch.log_softmax(logits, -1)
            manual.append(sum(logprobs[t - 1, all_ids[t]].item() for t in range(len(ctx_ids), len(all_ids))))
    assert len(batched) == 24
    assert batched == pytest.approx(manual, abs=1e-4)
    assert loglikelihoods(tiny_llama, tokenizer, requests, batch_size=1) == pytest.approx(manual, abs=1e-4)


def test_predictions_are_the_argmax_of_scores(tokenizer, tiny_llama):
    examples = build_task("general/wordnet-hypernym").test[:10]
    preds = predict_mc(tiny_llama, tokenizer, examples, batch_size=7)
    for ex, pred in zip(examples, preds):
        prompt, conts = format_mc(ex)
        scores = loglikelihoods(tiny_llama, tokenizer, [(prompt, c) for c in conts])
        assert pred == max(range(len(scores)), key=scores.__getitem__)
    accuracy, _ = evaluate_examples(tiny_llama, tokenizer, examples)
    assert accuracy == sum(p == ex.answer for p, ex in zip(preds, examples)) / 10


def test_exact_match_with_a_scripted_wrapper(tokenizer):
    prompt = "Q: What is 12 + 30?\nA:"
    prompt_len = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    script = tokenizer(" 42", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    model = ScriptedLM(len(tokenizer), prompt_len, script)
    assert greedy_generate(model, tokenizer, [prompt, prompt]) == [" 42", " 42"]
    examples = [GenExample("What is 12 + 30?", "42"), GenExample("What is 12 + 30?", "43")]
    accuracy, predictions = evaluate_examples(model, tokenizer, examples)
    assert accuracy == 0.5 and predictions == [" 42", " 42"]
    # Newline stops generation too.
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    model = ScriptedLM(len(tokenizer), prompt_len, script[:-1] + newline + script[:-1])
    assert greedy_generate(model, tokenizer, [prompt]) == [" 42"]


def test_evaluate_task_limit_and_chance(tokenizer, tiny_llama):
    result = evaluate_task(tiny_llama, tokenizer, "downstream/foldoc-yesno", limit=20)
    assert result.n == 20 and result.chance == 0.5 and len(result.predictions) == 20
    assert 0.0 <= result.accuracy <= 1.0
    assert not tiny_llama.training
    accs = evaluate_tasks(tiny_llama, tokenizer, ["general/elements"], limit=8)
    assert list(accs) == ["general/elements"]
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'dev'"):
        evaluate_task(tiny_llama, tokenizer, "general/elements", split="dev")


def test_harness_agrees_with_our_scorer(tokenizer, tiny_llama, tmp_path):
    from slimpeft.evaluation.harness import harness_name, run_harness, write_harness_tasks

    names = write_harness_tasks(tmp_path / "yaml", ["general/elements"], limit=5)
    assert names == {"general/elements": "slim_general_elements"} == {"general/elements": harness_name(
        "general/elements")}
    assert (tmp_path / "yaml" / "slim_general_elements.jsonl").read_text().count("\n") == 5

    tasks = ["general/elements", "downstream/foldoc-yesno"]
    theirs = run_harness(tiny_llama, tokenizer, tasks, limit=40, batch_size=16)
    ours = {name: evaluate_task(tiny_llama, tokenizer, name, limit=40).accuracy for name in tasks}
    assert theirs == pytest.approx(ours, abs=1e-9)
    # The random model is not trivially right or wrong on everything.
    assert 0.0 < ours["general/elements"] < 1.0
