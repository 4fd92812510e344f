"""Accuracy of a causal LM on the task suite: multiple choice by answer log-likelihood, generative by exact match.

Multiple choice follows lm-evaluation-harness ``acc``: each choice's score is the sum of the log-probabilities of its
continuation tokens given the prompt; the prediction is the highest-scoring choice. Context and continuation are
tokenised the way the harness does it (encode ``context + continuation`` and cut at the length of the encoded
context), so that :mod:`slimpeft.evaluation.harness` and this module agree.

``model`` may be any HF causal LM or a wrapper whose ``__call__(input_ids=..., attention_mask=...)`` returns an
object with ``.logits``; ``tokenizer`` any HF tokenizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from slimpeft.data.tasks import Example, GenExample, MCExample, Task, build_task, format_generative, format_mc


def _device_of(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (AttributeError, StopIteration, TypeError):
        return torch.device("cpu")


def _max_length(model: Any) -> int | None:
    config = getattr(model, "config", None)
    return getattr(config, "max_position_embeddings", None)


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-evaluation-harness builds them (trailing spaces move right)."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    context_ids = tokenizer(context, add_special_tokens=False)["input_ids"]
    return context_ids, whole[len(context_ids) :]


@torch.no_grad()
def loglikelihoods(
    model: Any, tokenizer: Any, requests: Sequence[tuple[str, str]], batch_size: int = 32
) -> list[float]:
    """Sum of continuation-token log-probabilities for each ``(context, continuation)`` request."""
    device = _device_of(model)
    max_len = _max_length(model)
    encoded = []
    for context, continuation in requests:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} of context {context[-40:]!r} encodes to no tokens")
        if not ctx:
            prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            ctx = [prefix]
        ids = (ctx + cont)[:-1]
        if max_len is not None and len(ids) > max_len:
            ids = ids[-max_len:]
        encoded.append((ids, cont))
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(encoded[i][0]) for i in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            ids = encoded[i][0]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, i in enumerate(batch):
            ids, cont = encoded[i]
            end = len(ids)
            positions = torch.arange(end - len(cont), end)
            scores[i] = logprobs[row, positions, torch.tensor(cont)].sum().item()
    return scores


def predict_mc(model: Any, tokenizer: Any, examples: Sequence[MCExample], batch_size: int = 32) -> list[int]:
    """Index of the highest log-likelihood choice for each multiple-choice example."""
    requests, owners = [], []
    for k, ex in enumerate(examples):
        prompt, continuations = format_mc(ex)
        for cont in continuations:
            requests.append((prompt, cont))
            owners.append(k)
    scores = loglikelihoods(model, tokenizer, requests, batch_size=batch_size)
    best: list[tuple[float, int]] = [(-float("inf"), -1)] * len(examples)
    counters = [0] * len(examples)
    for k, score in zip(owners, scores):
        choice = counters[k]
        counters[k] += 1
        if score > best[k][0]:
            best[k] = (score, choice)
    return [choice for _, choice in best]


@torch.no_grad()
def greedy_generate(
    model: Any, tokenizer: Any, prompts: Sequence[str], max_new_tokens: int = 16, stop: str = "\n"
) -> list[str]:
    """Greedy continuations of ``prompts`` (stops at EOS or ``stop``), batched over prompts of equal token length.

    Uses only ``model(input_ids=..., attention_mask=...)`` so that wrappers without ``generate`` work too.
    """
    device = _device_of(model)
    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    by_length: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    outputs = [""] * len(prompts)
    eos = tokenizer.eos_token_id
    for indices in by_length.values():
        ids = torch.tensor([encoded[i] for i in indices], dtype=torch.long, device=device)
        new = [[] for _ in indices]
        done = [False] * len(indices)
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            next_ids = logits[:, -1, :].argmax(dim=-1)
            for row, token in enumerate(next_ids.tolist()):
                if done[row]:
                    continue
                if token == eos:
                    done[row] = True
                    continue
                new[row].append(token)
                if stop and stop in tokenizer.decode(new[row]):
                    done[row] = True
            if all(done):
                break
            ids = torch.cat([ids, next_ids[:, None]], dim=1)
        for row, i in enumerate(indices):
            text = tokenizer.decode(new[row], skip_special_tokens=True)
            outputs[i] = text.split(stop)[0] if stop else text
    return outputs


def exact_match(prediction: str, reference: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()


@dataclass
class TaskResult:
    """Accuracy of one model on one task split."""

    task: str = field(metadata={"help": "task name"})
    accuracy: float = field(metadata={"help": "fraction of examples right (MC acc or generative exact match)"})
    n: int = field(metadata={"help": "number of examples scored"})
    chance: float = field(default=0.0, metadata={"help": "accuracy of a uniform random guess"})
    predictions: list[Any] = field(default_factory=list, metadata={"help": "predicted index or generated text"})


def evaluate_examples(
    model: Any, tokenizer: Any, examples: Sequence[Example], batch_size: int = 32, max_new_tokens: int = 16
) -> tuple[float, list[Any]]:
    """Accuracy over a mixed list of examples and the per-example predictions."""
    if not examples:
        raise ValueError("evaluate_examples got an empty list of examples")
    mc_idx = [i for i, ex in enumerate(examples) if isinstance(ex, MCExample)]
    gen_idx = [i for i, ex in enumerate(examples) if isinstance(ex, GenExample)]
    predictions: list[Any] = [None] * len(examples)
    correct = 0
    if mc_idx:
        mc = [examples[i] for i in mc_idx]
        for i, ex, pred in zip(mc_idx, mc, predict_mc(model, tokenizer, mc, batch_size=batch_size)):
            predictions[i] = pred
            correct += int(pred == ex.answer)
    if gen_idx:
        prompts = [format_generative(examples[i])[0] for i in gen_idx]
        texts = greedy_generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens)
        for i, text in zip(gen_idx, texts):
            predictions[i] = text
            correct += int(exact_match(text, examples[i].response))
    return correct / len(examples), predictions


def _was_training(model: Any) -> bool:
    return bool(getattr(model, "training", False))


def evaluate_task(
    model: Any,
    tokenizer: Any,
    task: Task | str,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> TaskResult:
    """Accuracy of ``model`` on one task's ``split`` ("train" or "test"), optionally on its first ``limit`` items."""
    task = build_task(task, seed=seed) if isinstance(task, str) else task
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    examples = getattr(task, split)[:limit] if limit else getattr(task, split)
    training = _was_training(model)
    if hasattr(model, "eval"):
        model.eval()
    try:
        accuracy, predictions = evaluate_examples(model, tokenizer, examples, batch_size=batch_size)
    finally:
        if training and hasattr(model, "train"):
            model.train()
    return TaskResult(task.name, accuracy, len(examples), task.chance, predictions)


def evaluate_tasks(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] | None = None,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 32,
) -> dict[str, float]:
    """Accuracy per task name (all registered tasks by default)."""
    from slimpeft.data.tasks import list_tasks

    names = list(tasks) if tasks is not None else list_tasks()
    results = {}
    for name in names:
        result = evaluate_task(model, tokenizer, name, split=split, limit=limit, seed=seed, batch_size=batch_size)
        results[name] = result.accuracy
    return results
