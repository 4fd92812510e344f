"""Full fine-tuning: every weight of the model trains (the forgetting reference of the comparison).

Save: adapter_config.json (``method: full``, sorted keys) + adapter_model.safetensors holding the whole state dict,
written with ``safetensors.torch.save_model`` (tied weights such as GPT-2's lm_head/wte are stored once).
Load: every stored tensor is checked against the base model's names and shapes before any is copied.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import load_model, save_model
from torch import nn

from ..model import CONFIG_NAME, WEIGHTS_NAME, ModelWrapper, atomic_write, file_sha256
from ..quantization import refuse_quantized
from .config import FullConfig


class FullModel(ModelWrapper):
    """The base model, all parameters trainable, with the methods' common save/inspection interface."""

    method = "full"

    def __init__(self, model: nn.Module, config: FullConfig | None = None) -> None:
        super().__init__(model)
        self.method_config = config or FullConfig()

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        raise ValueError("full fine-tuning changes the base weights in place: there is no adapter to disable")
        yield  # pragma: no cover

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        meta = {"method": "full", "config": self.method_config.to_dict(),
                "base_model_type": getattr(getattr(self.base_model, "config", None), "model_type", None)}
        atomic_write(path / WEIGHTS_NAME, lambda p: save_model(self.base_model, p, metadata={"format": "pt"}))
        meta["weights_sha256"] = file_sha256(path / WEIGHTS_NAME)
        atomic_write(path / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)))


def build_full(model: nn.Module, config: FullConfig) -> FullModel:
    refuse_quantized(model, "full fine-tuning")
    for p in model.parameters():
        p.requires_grad_(True)
    return FullModel(model, config)


def load_full(model: nn.Module, adapter_dir: str | os.PathLike, *, is_trainable: bool = False) -> FullModel:
    from ..model import misfit_error, read_method_dir, verify_checksum, warn_other_base_type

    meta, tensors = read_method_dir(adapter_dir, "full")
    cfg = FullConfig.from_dict(meta["config"], where=str(Path(adapter_dir) / CONFIG_NAME))
    state = model.state_dict()
    problems = [f"unexpected tensor {k}" for k in tensors if k not in state]
    problems += [f"{k}: {tuple(v.shape)}, expected {tuple(state[k].shape)}" for k, v in tensors.items()
                 if k in state and v.shape != state[k].shape]
    # keys absent from the file must be tied to a stored one (save_model keeps one name per shared tensor)
    stored_ptrs = {state[k].data_ptr() for k in tensors if k in state}
    problems += [f"missing tensor {k}" for k, v in state.items()
                 if k not in tensors and v.data_ptr() not in stored_ptrs]
    if problems:
        raise misfit_error(adapter_dir, "the saved full model", problems)
    del tensors
    verify_checksum(adapter_dir)
    warn_other_base_type(model, adapter_dir)
    wpath = Path(adapter_dir) / WEIGHTS_NAME
    load_model(model, str(wpath), strict=True)  # raises on missing keys (tied duplicates excepted)
    for p in model.parameters():
        p.requires_grad_(is_trainable)
    wrapped = FullModel(model, cfg)
    wrapped.train(False)
    return wrapped
