"""A tiny base model folder (BPE tokenizer + 2-layer Llama, random weights) and JSONL data, built in well under a
second, for tests that run `slim train` end to end (in process or as subprocesses)."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

WORDS = ("alpha beta gamma delta apple banana cherry river mountain cloud stone fire water light dark north south "
         "east west quick slow red green blue").split()
SLIM_SET = ["--set", "r=4", "--set", "n_clusters=4"]  # small SLIM adapters: seconds per run


def save_tiny_base(path: Path, seed: int = 0, intermediate_size: int = 64, tie_word_embeddings: bool = False,
                   hidden_size: int = 32) -> Path:
    """Tokenizer (byte-level BPE trained on WORDS) + random LlamaForCausalLM saved to ``path``
    (``tie_word_embeddings``: one matrix for the input embedding and the output head, as GPT-2's)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator([" ".join(WORDS)] * 4 + ["Q: A:?"], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>")
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=intermediate_size,
                      num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=tie_word_embeddings)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def write_data(path: Path, n: int = 64, seed: int = 0, long_every: int = 0) -> Path:
    """``n`` prompt/response records of random WORDS; every ``long_every``-th prompt is 60 words long."""
    r = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            k = 60 if long_every and i % long_every == 0 else r.randint(3, 10)
            prompt = " ".join(r.choice(WORDS) for _ in range(k)) + "?"
            f.write(json.dumps({"prompt": prompt, "response": " " + " ".join(r.choice(WORDS) for _ in range(3))})
                    + "\n")
    return path


def slim_cmd(*args: str) -> list[str]:
    """`slim ...` run with this interpreter (the console script of the venv)."""
    return [sys.executable, "-m", "slimpeft.cli", *args]


def env_1thread() -> dict[str, str]:
    """One torch thread per process (the CPU is shared; equal thread counts also make runs bit-reproducible)."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def losses(run_dir: Path) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in json.loads((run_dir / "train_log.json").read_text()) if "loss" in e}


def tiny_train_args(base: Path, data: Path, out: Path, **kw):
    """TrainArgs of a few-step SLIM run (r 4, 4 clusters) on a tiny base and JSONL data; ``kw`` overrides any."""
    from slimpeft.training import TrainArgs

    kw = {"steps": 6, "batch_size": 4, "save_steps": 2, "logging_steps": 1, "progress": False,
          "overrides": {"r": 4, "n_clusters": 4}, **kw}
    return TrainArgs(base=str(base), data=str(data), out=str(out), **kw)
