"""LoRA and DoRA, from the ``peft`` package itself (no re-implementation).

LoRA (Hu et al., 2021): y = W x + b + s B A x, s = alpha / r, A (r x i) kaiming-uniform, B (o x r) = 0.
DoRA (Liu et al., 2024, arXiv 2402.09353): y = m * (W + s B A) x / ||W + s B A||_c + b, with m (o,) the trainable
per-output-channel magnitude initialised to the column norms of W (peft's ``use_dora=True``).

Targets default to the family's MLP projections (slimpeft.model.DEFAULT_TARGETS), as SLIM; GPT-2's Conv1D layers
get ``fan_in_fan_out=True``. Save/load: peft's own ``save_pretrained`` (adapter_config.json with sorted keys +
adapter_model.safetensors), after which the models built or loaded here record ``slimpeft_tensors_sha256`` (the
SHA-256 of the tensors, slimpeft.model.tensors_sha256) in the weights file's safetensors header metadata -- not in
adapter_config.json, which stays exactly peft's (plain peft warns about any key its LoraConfig lacks), and not in a
file beside it (plain peft saving again into the folder would leave that stale; it drops the header's entry) -- and
``PeftModel.from_pretrained`` - called only after ``load_peft_lora`` has read the weights with safetensors, checked
every tensor against the base model's layers and verified the checksum (adapters saved without one, by plain peft,
still load; those of slimpeft before 2026-12-05 kept ``weights_sha256``, the file's SHA-256, in adapter_config.json,
which is still checked), so that a refused load leaves the base model untouched.
"""

from __future__ import annotations

import copy
import inspect
import logging
import os
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, PeftModelForCausalLM, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from safetensors.torch import save_file
from torch import nn

from ..layer import base_shape
from ..model import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    atomic_write,
    is_adaptable,
    misfit_error,
    read_json,
    read_safetensors,
    resolve_targets,
    safetensors_metadata,
    tensors_sha256,
    verify_checksum,
)
from ..modules_to_save import resolve_modules_to_save
from .config import LoraMethodConfig

LEGACY_CHECKSUM_FIELD = "weights_sha256"  # in adapter_config.json, as slimpeft wrote it before (and SLIM does)
CHECKSUM_KEY = "slimpeft_tensors_sha256"  # in the weights file's safetensors header metadata
_PREFIX = "base_model.model."  # peft's state-dict prefix of the wrapped model's module names


# ============================================================================================== saving
def record_checksum(adapter_dir: str | os.PathLike) -> None:
    """Rewrite the weights file peft wrote with the tensors' SHA-256 added to its header metadata (the tensors and
    peft's own metadata unchanged; atomic). No-op where it is missing (``safe_serialization=False``: pickle)."""
    wpath = Path(adapter_dir) / WEIGHTS_NAME
    if not wpath.is_file():
        return
    tensors = read_safetensors(wpath)
    meta = {**safetensors_metadata(wpath), CHECKSUM_KEY: tensors_sha256(tensors)}
    atomic_write(wpath, lambda p: save_file(tensors, p, metadata=meta))


def verify_tensor_checksum(wpath: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` (read from ``wpath``) must hash to the SHA-256 its header records, when it records one."""
    expected = safetensors_metadata(wpath).get(CHECKSUM_KEY)
    if expected is not None and expected != tensors_sha256(tensors):
        raise ValueError(f"{wpath}: SHA-256 of the tensors differs from `{CHECKSUM_KEY}` in the file's header: the "
                         "weights were changed or damaged after saving (nothing was loaded); save the adapter again")


class _ChecksumOnSave:
    """Mixed into peft's model class: ``save_pretrained`` is peft's, then records the tensors' SHA-256 in each saved
    adapter's weights file. Same signature as peft's (the Trainer passes ``state_dict``/``safe_serialization``)."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        peft_save = super().save_pretrained  # type: ignore[misc]
        peft_save(save_directory, *args, **kwargs)
        bound = inspect.signature(peft_save).bind(save_directory, *args, **kwargs)
        bound.apply_defaults()
        a = bound.arguments
        if not a.get("is_main_process", True) or not a.get("safe_serialization", True):
            return
        for name in a.get("selected_adapters") or list(self.peft_config):  # type: ignore[attr-defined]
            # peft's layout: the default adapter in save_directory, any other in a sub-directory of its name
            record_checksum(save_directory if name == "default" else Path(save_directory) / name)


class ChecksumPeftModel(_ChecksumOnSave, PeftModel):
    """peft's PeftModel (what ``build``/``load`` give for lora and dora) whose save records the checksum."""


class ChecksumPeftModelForCausalLM(_ChecksumOnSave, PeftModelForCausalLM):
    """As ChecksumPeftModel, for adapters saved by plain peft with ``task_type="CAUSAL_LM"``."""


_CHECKSUMMED: dict[type, type] = {PeftModel: ChecksumPeftModel, PeftModelForCausalLM: ChecksumPeftModelForCausalLM}


def _with_checksum(pm: PeftModel) -> PeftModel:
    """The same object, its class switched to the subclass that adds the checksum on save (no state changes)."""
    cls = type(pm)
    if not issubclass(cls, _ChecksumOnSave):
        if cls not in _CHECKSUMMED:  # another task type's PeftModel class
            _CHECKSUMMED[cls] = type(f"Checksum{cls.__name__}", (_ChecksumOnSave, cls), {"__module__": __name__})
        pm.__class__ = _CHECKSUMMED[cls]
    return pm


def build_peft_lora(model: nn.Module, config: LoraMethodConfig, *, use_dora: bool) -> PeftModel:
    names = resolve_targets(model, config.target_modules)
    conv1d = any(type(model.get_submodule(n)).__name__ == "Conv1D" for n in names)
    # full names, resolved as for the other methods (peft would match any string suffix: "norm" -> "input_layernorm")
    to_save = resolve_modules_to_save(model, config.modules_to_save, names)
    lcfg = LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=names,
                      use_dora=use_dora, fan_in_fan_out=conv1d, bias="none", modules_to_save=to_save or None)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(config.seed)
        pm = _with_checksum(get_peft_model(model, lcfg))
    # peft matches modules_to_save by plain string suffix: a top-level name ("classifier") also takes any module whose
    # name ends with it ("pre_classifier"), which no name given to peft can avoid -- said, not hidden
    extra = sorted(n[len(_PREFIX):] for n, m in pm.named_modules()
                   if type(m).__name__ == "ModulesToSaveWrapper" and n[len(_PREFIX):] not in to_save)
    if extra:
        logging.getLogger("slimpeft").warning(
            "peft matches modules_to_save by string suffix: besides %s it also trains %s in full", to_save, extra)
    return pm


# ============================================================================================== loading
def _read_config(cpath: Path, method: str, use_dora: bool) -> LoraConfig:
    """peft's LoraConfig from adapter_config.json (without our checksum field, which peft does not know)."""
    if not cpath.is_file():
        raise ValueError(f"{cpath}: missing; a saved {method!r} directory holds peft's {CONFIG_NAME}")
    meta = read_json(cpath)
    if not isinstance(meta, dict) or meta.get("peft_type") != "LORA" or bool(meta.get("use_dora")) != use_dora:
        got = meta.get("method") if isinstance(meta, dict) and "method" in meta else (
            ("dora" if meta.get("use_dora") else "lora") if isinstance(meta, dict) and meta.get("peft_type") == "LORA"
            else "not a peft LoRA adapter")
        raise ValueError(f"{cpath}: holds {got!r}; expected {method!r}")
    checksum = meta.get(LEGACY_CHECKSUM_FIELD)
    if checksum is not None and not isinstance(checksum, str):
        raise ValueError(f"{cpath}: `{LEGACY_CHECKSUM_FIELD}` must be a hex string, got {checksum!r}")
    kwargs = {k: v for k, v in meta.items() if k not in (LEGACY_CHECKSUM_FIELD, "runtime_config")}
    try:
        return LoraConfig.from_peft_type(**LoraConfig.check_kwargs(**kwargs))
    except (TypeError, ValueError) as e:
        raise ValueError(f"{cpath}: not a valid peft LoRA config ({e})") from None


def _read_tensors(wpath: Path, method: str) -> dict[str, torch.Tensor]:
    """Every tensor of the weights file, read with safetensors only (never pickle)."""
    if not wpath.is_file():
        raise ValueError(f"{wpath}: missing; a saved {method!r} directory holds {WEIGHTS_NAME} (peft's pickle format, "
                         "adapter_model.bin, is not loaded: save with safe_serialization=True)")
    return read_safetensors(wpath)


def _adapted_names(model: nn.Module, lcfg: LoraConfig) -> list[str]:
    """The linear/Conv1D/embedding modules of ``model`` that peft would adapt under ``lcfg`` (its own matcher)."""
    cfg = lcfg
    if isinstance(lcfg.target_modules, str) and lcfg.target_modules.lower() == "all-linear":
        try:  # peft's expansion of the shorthand (private; without it the shorthand matches nothing below)
            from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

            cfg = _maybe_include_all_linear_layers(copy.deepcopy(lcfg), model)
        except Exception:  # noqa: BLE001 - an older/newer peft: skip the completeness check for the shorthand
            return []
    if cfg.target_modules is None:
        return []
    return [n for n, m in model.named_modules()
            if n and (is_adaptable(m) or isinstance(m, nn.Embedding)) and check_target_module_exists(cfg, n)]


def _describe(mod: nn.Module) -> str:
    if isinstance(mod, nn.Embedding):
        return f"Embedding, {mod.num_embeddings} x {mod.embedding_dim}"
    d_in, d_out = base_shape(mod)
    return f"{type(mod).__name__}, d_in={d_in}, d_out={d_out}"


def _expected_shapes(mod: nn.Module, lcfg: LoraConfig, r: int | None) -> dict[str, tuple[int | None, ...]]:
    """Adapter tensors (suffix -> shape; None: any) peft saves for one adapted module of the base model."""
    if isinstance(mod, nn.Embedding):
        return {"lora_embedding_A": (r, mod.num_embeddings), "lora_embedding_B": (mod.embedding_dim, r)}
    d_in, d_out = base_shape(mod)
    shapes = {"lora_A.weight": (r, d_in), "lora_B.weight": (d_out, r)}
    if lcfg.use_dora:
        shapes["lora_magnitude_vector"] = (d_out,)
    if getattr(lcfg, "lora_bias", False):
        shapes["lora_B.bias"] = (d_out,)
    return shapes


_LORA_SUFFIXES = ("lora_A.weight", "lora_B.weight", "lora_B.bias", "lora_magnitude_vector", "lora_embedding_A",
                  "lora_embedding_B")


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "(" + ", ".join("?" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


def check_peft_lora_fits(model: nn.Module, lcfg: LoraConfig, tensors: dict[str, torch.Tensor], wpath: Path) -> None:
    """Every LoRA tensor must belong to a linear (or embedding) layer of ``model`` with matching shapes, and every
    layer peft would adapt must have its tensors; ValueError naming ``wpath`` and the keys otherwise."""
    modules = dict(model.named_modules())
    r_fixed = None if getattr(lcfg, "rank_pattern", None) else lcfg.r  # a rank pattern: A and B need only agree
    problems: list[str] = []
    ranks: dict[str, dict[str, int]] = {}
    for key, t in tensors.items():
        if t.is_floating_point() and not t.isfinite().all():
            problems.append(f"{key}: non-finite values")
        if not key.startswith(_PREFIX):
            problems.append(f"unexpected tensor {key} (peft's keys start with {_PREFIX!r})")
            continue
        rest = key[len(_PREFIX):]
        suffix = next((s for s in _LORA_SUFFIXES if rest.endswith("." + s)), None)
        if suffix is None:  # modules_to_save copies, embedding base weights: a parameter of the base model
            pname = rest.replace(".base_layer.", ".")
            mname, _, leaf = pname.rpartition(".")
            mod = modules.get(mname)
            p = getattr(mod, leaf, None) if mod is not None else None
            if not isinstance(p, torch.Tensor):
                problems.append(f"unexpected tensor {key}: the base model has no {pname}")
            elif tuple(p.shape) != tuple(t.shape):
                problems.append(f"{key}: {_fmt(tuple(t.shape))} in the adapter, expected {_fmt(tuple(p.shape))} "
                                f"(the base model's {pname})")
            continue
        name = rest[: -len(suffix) - 1]
        mod = modules.get(name)
        if mod is None:
            problems.append(f"{key}: the base model has no module {name}")
            continue
        if isinstance(mod, BaseTunerLayer):
            problems.append(f"{key}: the base model's {name} already holds a peft adapter")
            continue
        if not (is_adaptable(mod) or isinstance(mod, nn.Embedding)) or (
                isinstance(mod, nn.Embedding) and suffix == "lora_magnitude_vector"):
            continue  # other layer types peft supports (convolutions), DoRA on embeddings: left to peft
        want = _expected_shapes(mod, lcfg, r_fixed).get(suffix)
        if want is None:
            problems.append(f"unexpected tensor {key}: the {type(mod).__name__} {name} takes no {suffix} under "
                            "this config")
            continue
        got = tuple(t.shape)
        if len(got) != len(want) or any(w is not None and w != g for w, g in zip(want, got)):
            problems.append(f"{key}: {_fmt(got)} in the adapter, expected {_fmt(want)} from the base model's {name} "
                            f"({_describe(mod)})")
            continue
        if suffix in ("lora_A.weight", "lora_embedding_A"):
            ranks.setdefault(name, {})["A"] = got[0]
        elif suffix in ("lora_B.weight", "lora_embedding_B"):
            ranks.setdefault(name, {})["B"] = got[1]
    problems += [f"{_PREFIX}{n}: lora_A has rank {rk['A']}, lora_B rank {rk['B']}" for n, rk in ranks.items()
                 if len(rk) == 2 and rk["A"] != rk["B"]]
    for name in _adapted_names(model, lcfg):  # layers peft would adapt: none may be left with random/zero init
        mod = modules[name]
        if isinstance(mod, BaseTunerLayer):
            continue
        missing = [f"{_PREFIX}{name}.{s}" for s in _expected_shapes(mod, lcfg, r_fixed)
                   if f"{_PREFIX}{name}.{s}" not in tensors]
        problems += [f"missing tensor {k}: the base model's {name} matches the adapter's target_modules"
                     for k in missing]
    if problems:
        raise misfit_error(wpath, "the saved adapter", problems)


def load_peft_lora(model: nn.Module, adapter_dir: str | os.PathLike, *, use_dora: bool,
                   is_trainable: bool = False) -> PeftModel:
    """PeftModel.from_pretrained, after checking - with the base model untouched - that the directory holds a
    readable LoRA (or DoRA) adapter whose tensors fit ``model`` layer by layer and whose weights file matches the
    checksum recorded at saving (when there is one). ValueError naming the file otherwise."""
    method = "dora" if use_dora else "lora"
    d = Path(adapter_dir)
    lcfg = _read_config(d / CONFIG_NAME, method, use_dora)
    tensors = _read_tensors(d / WEIGHTS_NAME, method)
    check_peft_lora_fits(model, lcfg, tensors, d / WEIGHTS_NAME)
    # after the structural checks, whose messages are more specific (as SLIM and the MoE methods)
    verify_tensor_checksum(d / WEIGHTS_NAME, tensors)
    verify_checksum(d)  # an older slimpeft's `weights_sha256` in adapter_config.json
    del tensors
    pm = PeftModel.from_pretrained(model, str(d), config=lcfg, is_trainable=is_trainable)
    pm.train(False)
    return _with_checksum(pm)


def peft_lora_trainable(model: nn.Module, config: LoraMethodConfig, *, use_dora: bool) -> int:
    """Per adapted linear (i -> o): r*(i + o), plus the magnitude vector o for DoRA."""
    total = 0
    for n in resolve_targets(model, config.target_modules):
        i, o = base_shape(model.get_submodule(n))
        total += config.r * (i + o) + (o if use_dora else 0)
    return total
