"""LoRA and DoRA, from the ``peft`` package itself (no re-implementation).

LoRA (Hu et al., 2021): y = W x + b + s B A x, s = alpha / r, A (r x i) kaiming-uniform, B (o x r) = 0.
DoRA (Liu et al., 2024, arXiv 2402.09353): y = m * (W + s B A) x / ||W + s B A||_c + b, with m (o,) the trainable
per-output-channel magnitude initialised to the column norms of W (peft's ``use_dora=True``).

Targets default to the family's MLP projections (slimpeft.model.DEFAULT_TARGETS), as SLIM; GPT-2's Conv1D layers
get ``fan_in_fan_out=True``. Save/load: peft's own ``save_pretrained`` (adapter_config.json with sorted keys +
adapter_model.safetensors) and ``PeftModel.from_pretrained``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from ..layer import base_shape
from ..model import CONFIG_NAME, read_json, resolve_targets
from .config import LoraMethodConfig


def build_peft_lora(model: nn.Module, config: LoraMethodConfig, *, use_dora: bool) -> PeftModel:
    names = resolve_targets(model, config.target_modules)
    conv1d = any(type(model.get_submodule(n)).__name__ == "Conv1D" for n in names)
    lcfg = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names,
                      use_dora=use_dora, fan_in_fan_out=conv1d, bias="none")
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(config.seed)
        return get_peft_model(model, lcfg)


def load_peft_lora(model: nn.Module, adapter_dir: str | os.PathLike, *, use_dora: bool,
                   is_trainable: bool = False) -> PeftModel:
    """PeftModel.from_pretrained, after checking that the directory holds a LoRA (or DoRA) adapter."""
    method = "dora" if use_dora else "lora"
    cpath = Path(adapter_dir) / CONFIG_NAME
    if not cpath.is_file():
        raise ValueError(f"{cpath}: missing; a saved {method!r} directory holds peft's {CONFIG_NAME}")
    meta = read_json(cpath)
    if not isinstance(meta, dict) or meta.get("peft_type") != "LORA" or bool(meta.get("use_dora")) != use_dora:
        got = meta.get("method") if isinstance(meta, dict) and "method" in meta else (
            ("dora" if meta.get("use_dora") else "lora") if isinstance(meta, dict) and meta.get("peft_type") == "LORA"
            else "not a peft LoRA adapter")
        raise ValueError(f"{cpath}: holds {got!r}; expected {method!r}")
    pm = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
    pm.train(False)
    return pm


def peft_lora_trainable(model: nn.Module, config: LoraMethodConfig, *, use_dora: bool) -> int:
    """Per adapted linear (i -> o): r*(i + o), plus the magnitude vector o for DoRA."""
    total = 0
    for n in resolve_targets(model, config.target_modules):
        i, o = base_shape(model.get_submodule(n))
        total += config.r * (i + o) + (o if use_dora else 0)
    return total
