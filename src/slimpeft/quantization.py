"""Quantized base models (QLoRA-style): the frozen base in 4-bit or 8-bit through bitsandbytes, the adapter in float32.

Every adapter method of this project wraps the base's layers and calls them as they are, so a bitsandbytes
``Linear4bit`` / ``Linear8bitLt`` base layer runs its own (de)quantizing matmul and the adapter adds its float32
output, as in peft's QLoRA layers. What needs care, and is handled here and where it is used:

- loading: :func:`quantization_config` (``slim train --quantize nf4|fp4|int8``), placed on the process's device;
- code that reads a base layer's weight (SLIM's ``merged_inference``, dtype choices) must not read packed integers
  as float weights (:func:`is_quantized`, :func:`input_dtype`);
- full fine-tuning cannot train packed integer weights: refused (:func:`refuse_quantized`);
- bitsandbytes' CPU inference kernel fails on some layer shapes: turned off for those (:func:`guard_cpu_repacking`).

bitsandbytes is optional (``pip install 'slimpeft[quant]'``); it runs on CPUs too (4-bit through its PyTorch path).
"""

from __future__ import annotations

import os

import torch
from torch import nn

QUANTIZE_CHOICES = ("nf4", "fp4", "int8")
_PACKED = ("Params4bit", "Int8Params")  # bitsandbytes' weight classes


def quantization_config(kind: str, compute_dtype: torch.dtype = torch.float32):
    """transformers' ``BitsAndBytesConfig`` for ``kind`` (nf4 / fp4: 4-bit weights, matmuls in ``compute_dtype``;
    int8: LLM.int8()). ValueError for another kind; ImportError naming the extra when bitsandbytes is missing."""
    if kind not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={kind!r}: unknown; choose from {', '.join(QUANTIZE_CHOICES)}")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(f"quantize={kind!r} needs bitsandbytes: pip install 'slimpeft[quant]'") from None
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind, bnb_4bit_compute_dtype=compute_dtype)


def device_map(device: str | None = None) -> dict[str, int | str]:
    """Where a quantized base is loaded (the Trainer does not move bitsandbytes models): ``device`` when given, else
    this process's GPU under torchrun / accelerate (LOCAL_RANK), else the first GPU, else the CPU."""
    if device is not None:
        return {"": device}
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", "0"))}
    return {"": "cpu"}


def is_quantized(layer: nn.Module) -> bool:
    """Whether ``layer``'s weight is stored quantized (any non-float weight, or bitsandbytes' Params4bit /
    Int8Params, whose packed storage may be a float dtype): its ``weight`` is then not the matrix it multiplies by."""
    w = getattr(layer, "weight", None)
    return isinstance(w, torch.Tensor) and (not w.is_floating_point() or type(w).__name__ in _PACKED)


def input_dtype(layer: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype to feed ``layer``: its weight's for a float layer, ``x``'s for a quantized one (whose forward casts
    to its own compute dtype; its packed weight's dtype, uint8 / int8, is no input dtype)."""
    return x.dtype if is_quantized(layer) else layer.weight.dtype


def guard_cpu_repacking(model: nn.Module) -> list[str]:
    """Turn off bitsandbytes' CPU repacking where it would fail; returns the layers it was turned off for.

    On a CPU with AVX512-BF16, a 4-bit layer repacks its weights for a faster kernel on its first inference call,
    which asserts ``out_features % 32 == 0`` and fails on inputs not a multiple of the quantization block (the
    shipped base's 688-wide MLP, layers narrower than 64). Those layers then dequantize in inference as in training
    (exact, slower); the others keep bitsandbytes' kernel."""
    off = []
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if not (getattr(m, "support_avx512bf16_for_cpu", False) and type(w).__name__ == "Params4bit"
                and w.device.type == "cpu"):
            continue
        block = getattr(w.quant_state, "blocksize", None) or 64
        if m.out_features % 32 or m.in_features % block:
            m.support_avx512bf16_for_cpu = False
            off.append(name)
    return off


def quantized_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_quantized(m)]


def refuse_quantized(model: nn.Module, what: str) -> None:
    """ValueError naming the quantized layers when ``what`` (e.g. full fine-tuning) needs float base weights."""
    names = quantized_layers(model)
    if names:
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        raise ValueError(f"{what} needs the base model's weights in floating point; this base is quantized "
                         f"({type(model.get_submodule(names[0])).__name__}: {shown}). Load it without quantization, "
                         "or train an adapter on it (slim, lora, dora, mixlora, loramoe, mola)")
