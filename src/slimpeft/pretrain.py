"""Pretrain the project's own small base model from scratch on the general corpus (CPU, seeded).

The recipe, runnable as ``python -m slimpeft.pretrain --out assets/base``:

1. build the general corpus: the Q/A text (:func:`slimpeft.data.format_training_text`) of the TRAIN items of every
   general task (seed 0), plus plain statements of all general facts and extra WordNet definitions
   (:func:`slimpeft.data.general_statements`); no downstream text is used, not even for the tokenizer;
2. train a byte-level BPE tokenizer on that corpus with ``tokenizers`` (digits split one by one), wrapped in a
   ``PreTrainedTokenizerFast`` with ``<pad>``, ``<s>`` and ``</s>``;
3. train a ``LlamaForCausalLM`` (~5 M parameters) on one example per sequence (+ EOS), AdamW, warm-up + cosine;
4. save it with ``save_pretrained(safe_serialization=True)``, the tokenizer, ``pretrain_log.json`` and a model card
   ``README.md`` that records the command, corpus sizes, steps, wall time and the accuracy on every task.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from slimpeft.data.tasks import build_task, format_training_text, general_statements, list_tasks

SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}


@dataclass
class PretrainArgs:
    """Settings of the base-model pretraining recipe (defaults = the shipped ``assets/base``)."""

    out: str = field(default="assets/base", metadata={"help": "output folder for model, tokenizer and model card"})
    seed: int = field(default=0, metadata={"help": "seed of the task splits, data order and initialisation"})
    vocab_size: int = field(default=4096, metadata={"help": "BPE vocabulary size (special tokens included)"})
    hidden_size: int = field(default=256, metadata={"help": "Llama hidden size"})
    intermediate_size: int = field(default=688, metadata={"help": "Llama MLP size"})
    num_layers: int = field(default=4, metadata={"help": "Llama decoder layers"})
    num_heads: int = field(default=4, metadata={"help": "attention heads"})
    max_length: int = field(default=128, metadata={"help": "longest training sequence in tokens (longer cut)"})
    steps: int = field(default=5000, metadata={"help": "optimizer steps"})
    batch_size: int = field(default=64, metadata={"help": "sequences (examples) per step"})
    lr: float = field(default=2e-3, metadata={"help": "peak learning rate (AdamW)"})
    min_lr_ratio: float = field(default=0.05, metadata={"help": "final learning rate as a fraction of the peak"})
    warmup_steps: int = field(default=300, metadata={"help": "linear warm-up steps"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    extra_nouns: int = field(default=2000, metadata={"help": "extra WordNet definition statements in the corpus"})
    elements_repeat: int = field(default=4, metadata={"help": "times the (small) periodic-table text is repeated"})
    arithmetic_repeat: int = field(default=1, metadata={"help": "times the addition Q/A text is repeated"})
    threads: int = field(
        default=1, metadata={"help": "torch CPU threads (1 avoids oversubscribing a shared CPU; 0 = torch default)"}
    )
    eval_limit: int = field(default=0, metadata={"help": "test items per task for the model card (0 = all)"})
    log_every: int = field(default=100, metadata={"help": "steps between loss log entries"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "max_length",
                     "steps", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"PretrainArgs.{name} must be positive, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"PretrainArgs.hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})"
            )
        if not 0 < self.lr < 1:
            raise ValueError(f"PretrainArgs.lr must be in (0, 1), got {self.lr}")


def general_corpus(
    seed: int = 0, extra_nouns: int = 2000, elements_repeat: int = 4, arithmetic_repeat: int = 1
) -> dict[str, list[str]]:
    """The pretraining texts by source: Q/A of each general task's train split, and the plain statements."""
    corpus: dict[str, list[str]] = {}
    repeats = {"general/elements": elements_repeat, "general/arithmetic": arithmetic_repeat}
    for name in list_tasks("general"):
        texts = [format_training_text(ex) for ex in build_task(name, seed=seed).train]
        corpus[name] = texts * repeats.get(name, 1)
    statements = general_statements(extra_nouns=extra_nouns)
    element_statements = [s for s in statements if "symbol" in s]
    corpus["statements"] = statements + element_statements * (elements_repeat - 1)
    return corpus


def train_tokenizer(texts: list[str], vocab_size: int) -> Any:
    """Byte-level BPE trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast`` (no automatic BOS/EOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **SPECIAL_TOKENS)
    wrapped.padding_side = "right"
    return wrapped


def build_model(args: PretrainArgs, tokenizer: Any) -> Any:
    """A freshly initialised ``LlamaForCausalLM`` sized by ``args``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_heads,
        num_key_value_heads=args.num_heads,
        max_position_embeddings=max(256, args.max_length),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


def _batches(encoded: list[list[int]], batch_size: int, rng: random.Random):
    """Endless batches: shuffle, sort megabatches of 32 batches by length (less padding), shuffle the batches."""
    while True:
        order = list(range(len(encoded)))
        rng.shuffle(order)
        mega = batch_size * 32
        batches = []
        for start in range(0, len(order), mega):
            chunk = sorted(order[start : start + mega], key=lambda i: len(encoded[i]))
            batches.extend(chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size))
        rng.shuffle(batches)
        yield from batches


def _collate(encoded: list[list[int]], batch: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(encoded[i]) for i in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, i in enumerate(batch):
        ids = encoded[i]
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
    labels = input_ids.masked_fill(attention == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def pretrain(args: PretrainArgs) -> Path:
    """Run the recipe; returns the output folder (model, tokenizer, ``pretrain_log.json``, ``README.md``)."""
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _pretrain(args)
    finally:
        torch.set_num_threads(threads_before)


def _pretrain(args: PretrainArgs) -> Path:
    from slimpeft.evaluation.multiple_choice import evaluate_task

    start_time = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    corpus = general_corpus(args.seed, args.extra_nouns, args.elements_repeat, args.arithmetic_repeat)
    texts = [t for source in corpus.values() for t in source]
    tokenizer = train_tokenizer(texts, args.vocab_size)
    eos = tokenizer.eos_token_id
    encoded = [ids[: args.max_length - 1] + [eos] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    n_tokens = sum(len(ids) for ids in encoded)

    model = build_model(args, tokenizer)
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < args.warmup_steps:
            return args.lr * (step + 1) / args.warmup_steps
        progress = (step - args.warmup_steps) / max(1, args.steps - args.warmup_steps)
        return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    batches = _batches(encoded, args.batch_size, random.Random(args.seed))
    model.train()
    log: list[dict[str, float]] = []
    window, tokens_seen = [], 0
    train_start = time.time()
    bar = None
    if args.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=args.steps, desc="pretrain", dynamic_ncols=True, mininterval=2.0)
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        batch = _collate(encoded, next(batches), tokenizer.pad_token_id)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        window.append(loss.item())
        tokens_seen += int(batch["attention_mask"].sum())
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == args.steps:
            entry = {"step": step + 1, "loss": sum(window) / len(window), "lr": lr_at(step),
                     "tokens": tokens_seen, "seconds": round(time.time() - train_start, 1)}
            log.append(entry)
            window = []
            if bar is not None:
                bar.set_postfix(loss=f"{entry['loss']:.3f}", tok_s=f"{tokens_seen / (time.time() - train_start):.0f}")
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    train_seconds = time.time() - train_start

    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    accuracy = {}
    for name in list_tasks():
        result = evaluate_task(model, tokenizer, name, seed=args.seed, limit=args.eval_limit or None)
        accuracy[name] = {"accuracy": result.accuracy, "chance": result.chance, "n": result.n}
    wall_seconds = time.time() - start_time
    summary = {
        "args": dataclasses.asdict(args),
        "command": "python -m slimpeft.pretrain " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("pretrain.py")
        else _command(args),
        "parameters": n_params,
        "corpus": {name: len(texts_) for name, texts_ in corpus.items()},
        "corpus_documents": len(encoded),
        "corpus_tokens": n_tokens,
        "tokens_trained": tokens_seen,
        "epochs": tokens_seen / max(1, n_tokens),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(wall_seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}",
        "accuracy": accuracy,
        "log": log,
    }
    (out / "pretrain_log.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "README.md").write_text(model_card(summary))
    return out


def _command(args: PretrainArgs) -> str:
    defaults = PretrainArgs()
    parts = ["python -m slimpeft.pretrain"]
    for f in dataclasses.fields(args):
        value = getattr(args, f.name)
        if value != getattr(defaults, f.name) or f.name == "out":
            flag = f"--{f.name.replace('_', '-')}"
            parts.append(flag if value is True else (f"--no-{f.name.replace('_', '-')}" if value is False
                                                     else f"{flag} {value}"))
    return " ".join(parts)


def model_card(summary: dict[str, Any]) -> str:
    """Markdown model card from a ``pretrain_log.json`` summary."""
    args = summary["args"]
    rows = "\n".join(
        f"| `{name}` | {r['n']} | {r['chance']:.2f} | {r['accuracy']:.3f} |" for name, r in summary["accuracy"].items()
    )
    corpus_rows = "\n".join(f"| {name} | {n} |" for name, n in summary["corpus"].items())
    first, last = summary["log"][0]["loss"], summary["log"][-1]["loss"]
    return f"""# slimpeft base model

A small `LlamaForCausalLM` pretrained from scratch by `slimpeft.pretrain` on text from Debian packages
(WordNet 3.0 from `wordnet-base`, the periodic table from `dict-elements`) plus two-digit addition. It is the base
model of the project's learning-vs-forgetting experiments: it knows the **general** tasks and has never seen the
**downstream** ones (FOLDOC, Jargon File; not even its tokenizer saw them).

## Reproduce

```
{summary['command']}
```

Seed {args['seed']}; {summary['machine']}, {summary['torch_threads']} torch thread(s).
Wall time {summary['wall_seconds'] / 60:.1f} min (training {summary['train_seconds'] / 60:.1f} min).

## Model

- {summary['parameters']:,} parameters: hidden {args['hidden_size']}, {args['num_layers']} layers,
  {args['num_heads']} heads, MLP {args['intermediate_size']}, untied embeddings, fp32 safetensors.
- Tokenizer: byte-level BPE, {args['vocab_size']} tokens, digits split one by one; `<pad>`, `<s>`, `</s>`;
  no token is added automatically. Prompt format: `Q: <question>\\nA:` followed by ` <answer>`.

## Training

- {args['steps']} steps, batch {args['batch_size']} examples (one example + `</s>` per sequence, up to
  {args['max_length']} tokens), AdamW lr {args['lr']} (warm-up {args['warmup_steps']}, cosine to
  {args['min_lr_ratio']} x), weight decay {args['weight_decay']}.
- Corpus: {summary['corpus_documents']:,} documents, {summary['corpus_tokens']:,} tokens; trained on
  {summary['tokens_trained']:,} tokens ({summary['epochs']:.1f} epochs). Loss {first:.3f} (step 1) ->
  {last:.3f} (last {args['log_every']} steps).

| corpus source | documents |
|---|---|
{corpus_rows}

The Q/A text holds only the TRAIN items (seed {args['seed']}) of the general tasks. The facts behind the test items
of the knowledge tasks (`wordnet-def`, `wordnet-hypernym`, `elements`) appear only as plain statements ("The word
for ... is ...", "A ... is a kind of ..."); the test sums of `general/arithmetic` appear nowhere.

## Accuracy (test split, seed {args['seed']}, answer log-likelihood as lm-evaluation-harness `acc`)

| task | items | chance | accuracy |
|---|---|---|---|
{rows}
"""


def _parse_args(argv: list[str] | None = None) -> PretrainArgs:
    parser = argparse.ArgumentParser(prog="python -m slimpeft.pretrain", description=__doc__.split("\n")[0])
    for f in dataclasses.fields(PretrainArgs):
        flag = f"--{f.name.replace('_', '-')}"
        if f.type in (bool, "bool"):
            action = argparse.BooleanOptionalAction
            parser.add_argument(flag, action=action, default=f.default, help=f.metadata["help"])
        else:
            kind = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            parser.add_argument(flag, type=kind, default=f.default, help=f.metadata["help"])
    return PretrainArgs(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    out = pretrain(_parse_args(argv))
    print(f"saved the base model to {out}")


if __name__ == "__main__":
    main()
