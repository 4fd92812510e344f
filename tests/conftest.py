"""Tiny models built locally from random configs (never the Hub)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_bert(seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    return BertModel(cfg).to(dtype).eval()


FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert": tiny_bert}


def fitted_slim_layer(cfg, d_in: int = 24, d_out: int = 20, seed: int = 0):
    """A SlimLinear (left in training mode) with a non-zero B, a spread router and clusters fitted by a few
    training-mode passes."""
    from torch import nn

    from slimpeft import SlimLinear

    g = torch.Generator().manual_seed(seed)
    layer = SlimLinear(nn.Linear(d_in, d_out).requires_grad_(False), cfg, "blocks.0.mlp")
    with torch.no_grad():
        layer.experts.lora_B.normal_(0.0, 0.5, generator=g)
        layer.router.normal_(0.0, 0.5, generator=g)
        layer.train()
        for _ in range(3):
            layer(torch.randn(4, 16, d_in, generator=g))
    return layer


def model_output(model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids) if mask is None else mask)
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state


@pytest.fixture
def ids() -> torch.Tensor:
    g = torch.Generator().manual_seed(123)
    return torch.randint(3, 97, (3, 12), generator=g)


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny base model pretrained by the project's own recipe (tokenizer included), once per session."""
    from slimpeft.pretrain import PretrainArgs, pretrain

    out = tmp_path_factory.mktemp("tinybase")
    return pretrain(PretrainArgs(out=str(out), vocab_size=400, hidden_size=32, intermediate_size=64, num_layers=2,
                                 num_heads=2, steps=30, batch_size=16, lr=1e-2, warmup_steps=5, extra_nouns=0,
                                 elements_repeat=1, eval_limit=2, log_every=10, progress=False, threads=0))


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    """A tiny saved base model and a JSONL training file (train_helpers), once per test module."""
    from train_helpers import save_tiny_base, write_data

    d = tmp_path_factory.mktemp("base_and_data")
    return save_tiny_base(d / "base"), write_data(d / "data.jsonl")
