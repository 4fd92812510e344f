"""Injection of SLIM layers into a HuggingFace model, and the SlimModel wrapper (PEFT-style API).

    model = get_slim_model(hf_model, SlimConfig())      # base frozen, SlimLinear layers injected
    out = model(input_ids=..., labels=...)               # training: out.loss includes l1_weight * L1
    model.routing_stats(input_ids=...)                   # {layer: RoutingStats}, eval mode, no state change
    with model.disable_adapter(): ...                    # exactly the base model
    model.save_pretrained("out/")                        # adapter_config.json + adapter_model.safetensors
    model = SlimModel.from_pretrained(hf_model, "out/")  # checked against the base before anything changes

Target matching has one rule (as PEFT): a string is a regex that must fullmatch the module name; a list holds
exact names or dotted suffixes.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import logging
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import SlimConfig
from .layer import RoutingContext, SlimLinear, adapter_tensor_specs, base_shape, query_token_mask
from .modules_to_save import ModuleToSave, resolve_modules_to_save
from .quantization import guard_cpu_repacking, is_quantized

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"

# The MLP projections of each model family (the paper adapts the MLP).
DEFAULT_TARGETS: dict[str, str | list[str]] = {
    **{t: ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
       for t in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "olmo", "olmo2", "smollm3")},
    "phi3": ["mlp.gate_up_proj", "mlp.down_proj"],
    "gpt2": ["mlp.c_fc", "mlp.c_proj"],
    "gpt_neox": ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "phi": ["mlp.fc1", "mlp.fc2"],
    "opt": ["fc1", "fc2"],
    # BERT-like encoders: intermediate.dense and the block's output.dense, not attention.output.dense
    **{t: r"(.*\.)?layer\.\d+\.(intermediate|output)\.dense" for t in ("bert", "roberta", "xlm-roberta", "electra")},
}


def is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and hasattr(module, "nf"))


def _matches(name: str, targets: str | list[str]) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def linear_layer_names(model: nn.Module) -> list[str]:
    """Names of the adaptable layers, with layer indices folded to '*' (for error messages)."""
    seen: dict[str, None] = {}
    for name, mod in model.named_modules():
        if is_adaptable(mod) and not isinstance(mod, SlimLinear):
            seen[re.sub(r"\.\d+\.", ".*.", name)] = None
    return list(seen)


def check_not_adapted(model: nn.Module) -> None:
    """ValueError when ``model`` holds adapter layers already (a module wrapping a ``base_layer``: SLIM's, the MoE
    baselines', peft's LoRA): a second method's layers around the first's base layers would fight over them."""
    adapted = [(n, type(m).__name__) for n, m in model.named_modules()
               if not is_adaptable(m) and isinstance(getattr(m, "base_layer", None), nn.Module)]
    if adapted:
        raise ValueError(f"the model already holds adapter layers ({len(adapted)}, e.g. {adapted[0][0]!r}: "
                         f"{adapted[0][1]}); adapt the original base model, or call unload() on the adapted one first")


def resolve_targets(model: nn.Module, target_modules: str | list[str] | None) -> list[str]:
    """Full names of the layers to adapt; ValueError listing the existing linear layers when none match."""
    if target_modules is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"`target_modules`=None but model type {model_type!r} has no default MLP targets; pass "
                f"target_modules explicitly. Linear layers in this model: {linear_layer_names(model)}"
            )
        target_modules = DEFAULT_TARGETS[model_type]
    names = [n for n, m in model.named_modules() if is_adaptable(m) and _matches(n, target_modules)]
    if not names:
        raise ValueError(
            f"`target_modules`={target_modules!r} matched no linear layer. Linear layers in this model: "
            f"{linear_layer_names(model)}"
        )
    return names


def output_head_name(model: nn.Module) -> str:
    """Name of the model's output head (``get_output_embeddings()``); ValueError when it has no linear head."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    name = next((n for n, m in model.named_modules() if m is head), None) if head is not None else None
    if name is None or not is_adaptable(head):
        raise ValueError(f"`adapt_output_head`=True but the model ({type(model).__name__}) has no linear output head "
                         f"(get_output_embeddings() gives {type(head).__name__})")
    return name


def slim_targets(model: nn.Module, config: SlimConfig) -> list[str]:
    """Full names of the layers SLIM adapts: ``target_modules``, and the output head with ``adapt_output_head``."""
    names = resolve_targets(model, config.target_modules)
    if config.adapt_output_head:
        head = output_head_name(model)
        names = names if head in names else [*names, head]
    return names


def set_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


@dataclass
class RoutingStats:
    """Routing of one adapted layer over the tokens given (padding excluded)."""

    identity_weight: float  # mean routing weight on identity experts per token
    expert_load: list[float]  # share of the top-K slots per expert (LoRA experts first, then identity)
    ood_score: float  # mean out-of-domain score d
    ood_flagged: float  # share of tokens with d > 0
    n_tokens: int


class _Forward:
    """A wrapper's bound ``forward`` that reports the wrapped model's signature (input_ids, attention_mask, labels,
    ...) plus the wrapper's own keyword arguments (LoRAMoE's sample_type): HF Trainer keeps only the dataset columns
    the model's forward names (``remove_unused_columns``, on by default) and would drop every column of a
    ``forward(*args, **kwargs)``."""

    def __init__(self, owner: ModelWrapper) -> None:
        self.owner = owner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return type(self.owner).forward(self.owner, *args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        base = inspect.signature(self.owner.base_model.forward)
        own = [p for p in inspect.signature(type(self.owner).forward).parameters.values()
               if p.kind is p.KEYWORD_ONLY and p.name not in base.parameters]
        params = [p for p in base.parameters.values() if p.kind is not p.VAR_KEYWORD]
        var_kw = [p for p in base.parameters.values() if p.kind is p.VAR_KEYWORD]
        return base.replace(parameters=params + own + var_kw)


def _unshare_tied(module: nn.Module, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """State-dict post-hook of the wrappers: an entry whose memory another entry already holds (tied weights: a
    model whose input embedding and output head share one matrix, as GPT-2's) becomes a copy. safetensors refuses
    shared tensors, and the HF ``Trainer`` saves a model that is not a ``PreTrainedModel`` with
    ``safetensors.save_file(model.state_dict())`` -- every checkpoint of a tied base failed. Loading the copy
    writes the same values into the one shared parameter. Parameters (``keep_vars=True``), sharded or empty tensors
    are left as they are."""
    seen: set[int] = set()
    for k in [k for k in state_dict if k.startswith(prefix)]:
        v = state_dict[k]
        if type(v) is not torch.Tensor or v.numel() == 0 or v.device.type == "meta":
            continue
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:
            state_dict[k] = v.clone()
        else:
            seen.add(ptr)


class ModelWrapper(nn.Module):
    """A wrapped HuggingFace model: attributes the wrapper lacks are looked up on ``base_model``; forward and
    generate go to it; parameter counts as PEFT reports them. Base of every method's model."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.base_model = model
        self.forward = _Forward(self)  # type(self).forward, with the base model's signature
        # tied bases: checkpoints through the HF Trainer (the public registration where torch has it, else the private)
        getattr(self, "register_state_dict_post_hook", self._register_state_dict_hook)(_unshare_tied)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        # ``labels`` named: HF Trainer finds a model's label columns in its class's forward signature (eval loss)
        if labels is not None:
            kwargs["labels"] = labels
        return self.base_model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        return self.base_model.generate(*args, **kwargs)

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)  # tied weights counted once
        return trainable, sum(p.numel() for p in self.parameters())

    def print_trainable_parameters(self) -> None:
        t, a = self.get_nb_trainable_parameters()
        print(f"trainable params: {t:,d} || all params: {a:,d} || trainable%: {100 * t / a:.4f}")


class AdaptedModel(ModelWrapper):
    """What every adapted model shares (SLIM and the MoE baselines): the wrapped base, the routing context captured
    by a forward pre-hook, parameter counts, ``disable_adapter``, routing records and atomic saving.

    Subclasses set ``layer_type`` (the injected module class) and define ``_meta`` (what their saves record).
    """

    layer_type: type[nn.Module] = nn.Module
    # what transformers' Trainer reads to tell a quantized base with trainable adapters (QLoRA: trained) from a
    # purely quantized one (refused); its own PeftAdapterMixin sets it when an adapter is attached
    _hf_peft_config_loaded = True

    def __init__(self, model: nn.Module, layer_names: list[str], ctx: RoutingContext,
                 modules_to_save: list[str] | None = None) -> None:
        super().__init__(model)
        self.layer_names = list(layer_names)
        self.ctx = ctx
        for name in resolve_modules_to_save(model, modules_to_save, self.layer_names):
            set_module(model, name, ModuleToSave(model.get_submodule(name)))
        self._last_aux: dict[str, torch.Tensor] = {}  # detached; read through last_aux (no host sync per step)
        for layer in self.adapter_layers().values():
            layer.ctx = self.ctx
        # a pre-hook, not forward, captures the attention mask: generate() calls the base model directly
        self._hook = model.register_forward_pre_hook(self._capture_context, with_kwargs=True)

    def _capture_context(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        # the KV cache is ``past_key_values`` up to transformers 5.23 and ``cache`` from 5.24 on
        cache = next((c for c in (kwargs.get("past_key_values"), kwargs.get("cache")) if hasattr(c, "get_seq_length")),
                     None)
        # an int, or a 0-dim tensor for a static cache: converted only where a layer reads ctx.past_length. Copied:
        # a static cache's counter grows in place while the attention layers of this very pass write to the cache
        past = cache.get_seq_length() if cache is not None else 0
        past = past.clone() if torch.is_tensor(past) else past
        mask = kwargs.get("attention_mask")
        if torch.is_tensor(mask) and mask.dim() == 4:  # a static cache's 4-D mask: the real tokens of this call
            mask = query_token_mask(mask, past)
        self.ctx.reset(mask, past_length=past)

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        out = super().forward(*args, labels=labels, **kwargs)
        if self.training and getattr(out, "loss", None) is not None:
            aux = self.aux_loss()
            if kwargs.get("num_items_in_batch") is not None:
                # transformers' Trainer divides the task loss by the token count of all ranks and multiplies it by the
                # number of processes (DDP then averages gradients); the aux loss, one term per model, is divided by
                # the same factor so that its gradient and the logged loss equal a single process's
                aux = aux / _num_processes()
            out.loss = out.loss + aux
        return out

    def aux_loss(self) -> torch.Tensor:
        """The routing losses of the last forward pass (already weighted by their coefficients)."""
        dev = next(self.parameters()).device
        if not self.ctx.aux_losses:
            self._last_aux = {}
            return torch.zeros((), device=dev)
        total = torch.stack([a.to(dev) for a in self.ctx.aux_losses]).sum()
        self._last_aux = {"routing": total.detach()}
        return total

    @property
    def last_aux(self) -> dict[str, float]:
        """The auxiliary losses of the last forward pass as floats ("routing", and "l1" for SLIM); kept as tensors
        until read, so that a training step on a GPU does not wait for them."""
        return {k: float(v) for k, v in self._last_aux.items()}

    # ------------------------------------------------------------------------------------------ inspection
    def adapter_layers(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, self.layer_type)}

    def saved_modules(self) -> dict[str, ModuleToSave]:
        """The ``modules_to_save``: base modules trained in full (a trainable copy each), saved with the adapter."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, ModuleToSave)}

    def adapter_parts(self) -> dict[str, nn.Module]:
        """Every module whose tensors the adapter files hold, by name: the adapter layers and the modules to save
        (each wraps a frozen ``base_layer``, which the files leave out)."""
        return {**self.adapter_layers(), **self.saved_modules()}

    def routed_layers(self) -> dict[str, nn.Module]:
        return {n: m for n, m in self.adapter_layers().items() if getattr(m, "routes", True)}

    @contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Inside the block the model is exactly the base model."""
        layers = list(self.adapter_parts().values())
        before = [layer.disabled for layer in layers]
        for layer in layers:
            layer.disabled = True
        try:
            yield
        finally:
            for layer, b in zip(layers, before):
                layer.disabled = b

    @torch.no_grad()
    def routing_records(self, **inputs: Any) -> dict[str, dict[str, torch.Tensor]]:
        """Per-token routing facts of every routed layer for these inputs, in eval mode, with no state change."""
        was_training = self.training
        layers = self.routed_layers()
        self.eval()
        self.ctx.record = True
        for layer in layers.values():
            layer.records = []
        try:
            self(**inputs)
        finally:
            self.ctx.record = False
            self.train(was_training)
        out = {}
        for name, layer in layers.items():
            recs, layer.records = layer.records, []
            out[name] = {k: torch.cat([r[k] for r in recs]) for k in recs[0]} if recs else {}
        return out

    # ------------------------------------------------------------------------------------------ saving
    def adapter_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Adapter tensors only (experts, routers, cluster buffers), no base weights. Under FSDP2 the parameters are
        DTensor shards: they are gathered whole (a collective: every rank must call this). ``state_dict``: take them
        from this state dict of the wrapper instead (one gathered from shards, as DeepSpeed ZeRO-3 hands it to the
        Trainer's save); KeyError naming the first missing entry."""
        if state_dict is not None:
            return {f"{name}.{k}": state_dict[f"base_model.{name}.{k}"].detach().contiguous().cpu()
                    for name, layer in self.adapter_parts().items()
                    for k in layer.state_dict(keep_vars=True) if not k.startswith("base_layer.")}
        return {f"{name}.{k}": (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().contiguous().cpu()
                for name, layer in self.adapter_parts().items()
                for k, v in layer.state_dict().items() if not k.startswith("base_layer.")}

    def trainable_outside_adapter(self) -> list[str]:
        """Names of the trainable parameters that the adapter files do not hold (a base weight set trainable by
        hand, e.g. a task head): ``save_pretrained`` leaves them out, and ``SlimTrainer`` then checkpoints the whole
        model instead of the adapter."""
        inside = {f"base_model.{name}.{k}" for name, layer in self.adapter_parts().items()
                  for k, _ in layer.named_parameters() if not k.startswith("base_layer.")}
        return [n for n, p in self.named_parameters() if p.requires_grad and n not in inside]

    def _meta(self) -> dict[str, Any]:
        """What adapter_config.json records besides the checksum and the base model's type: ``method``, ``config``
        (the method's config fields) and ``layers``."""
        raise NotImplementedError

    def save_pretrained(self, save_directory: str | os.PathLike,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write adapter_config.json (sorted keys) and adapter_model.safetensors, each atomically; ``state_dict``: the
        wrapper's state dict to take the adapter tensors from (``adapter_state_dict``). Trainable parameters outside
        the adapter are not saved: a warning names them."""
        outside = self.trainable_outside_adapter()
        if outside:
            logging.getLogger("slimpeft").warning(
                "%s: %d trainable parameter(s) outside the adapter are not saved with it (e.g. %s); save them "
                "separately", save_directory, len(outside), outside[:3])
        path = Path(save_directory)
        path.mkdir(parents=True, exist_ok=True)
        base_type = getattr(getattr(self.base_model, "config", None), "model_type", None)
        meta = {**self._meta(), "base_model_type": base_type}
        # float32 files whatever the adapter was cast to (a model cast to bf16, DeepSpeed's bf16 engine): lossless, and
        # loading casts them to the parameters' dtype
        tensors = {k: v.float() if v.is_floating_point() else v
                   for k, v in self.adapter_state_dict(state_dict).items()}
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:  # loading refuses them: an adapter that cannot be loaded back is not written
            raise ValueError(f"{path}: not saved: non-finite values (nan or inf) in {len(bad)} adapter tensor(s), "
                             f"e.g. {bad[0]!r}; training diverged (lower the learning rate, or train in float32 / "
                             "bf16 rather than pure fp16)")
        atomic_write(path / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        meta["weights_sha256"] = file_sha256(path / WEIGHTS_NAME)  # checked last on loading: tampered bytes show
        atomic_write(path / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2, sort_keys=True)))

    def load_adapter_checkpoint(self, adapter_dir: str | os.PathLike) -> None:
        """Load, in place, an adapter directory that a model of this very structure saved (``save_pretrained``; a
        ``SlimTrainer`` checkpoint): same method, config and layers, every tensor of the same shape and dtype, the
        weights file matching its checksum -- all checked before anything is written; ValueError naming each
        difference. The base weights are not touched."""
        now = json.loads(json.dumps(self._meta()))  # as read back from the file
        meta, tensors = read_method_dir(adapter_dir, now["method"])
        saved_cfg, cfg = meta["config"], now["config"]
        problems = [f"config field {k!r}: saved {saved_cfg.get(k)!r}, this model {cfg.get(k)!r}"
                    for k in sorted(set(saved_cfg) | set(cfg)) if saved_cfg.get(k) != cfg.get(k)]
        saved = meta.get("layers") if isinstance(meta.get("layers"), dict) else {}
        differ = sorted(k for k in set(saved) | set(now["layers"]) if saved.get(k) != now["layers"].get(k))
        if differ:
            problems.append(f"{len(differ)} adapted layer(s) differ from the saved `layers` (e.g. {differ[:3]})")
        problems += tensor_problems(saved_specs(self.adapter_state_dict()), tensors)
        if problems:
            raise misfit_error(adapter_dir, f"the saved {now['method']!r} adapter", problems, "adapted model")
        verify_checksum(adapter_dir)
        load_layer_tensors(self.adapter_parts(), tensors)

    def unload(self) -> nn.Module:
        """Put the base layers back, dropping the adapter, and return the base model; as PEFT's ``unload``, a module
        to save keeps its trained copy (a classifier keeps its trained head). ``restore_base`` puts the originals
        back instead."""
        return self._remove(trained=True)

    def merge_and_unload(self, *args: Any, **kwargs: Any) -> nn.Module:
        """PEFT's call for LoRA; refused here: a routed adapter has no single weight to merge."""
        method = self._meta()["method"]
        raise ValueError(
            f"merge_and_unload: a {method!r} adapter cannot be merged into the base weights -- each token is routed "
            "to its own experts" + (" and, on inputs unlike the training data, to the identity experts that keep "
                                    "the base model's behaviour" if method == "slim" else "")
            + ", so no single weight matrix equals an adapted layer. unload() gives the base model back (keeping "
            "trained modules_to_save; restore_base() puts the originals back)"
            + ("; for inference near the base's cost, SlimConfig(merged_inference=True) with a single-expert preset "
               "merges in place for the calls whose every token reaches the LoRA expert" if method == "slim" else ""))

    def restore_base(self) -> nn.Module:
        """Put every original module back -- the adapted layers' base layers and the modules to save's originals --
        and return the base model as it was before adaptation."""
        return self._remove(trained=False)

    def _remove(self, trained: bool) -> nn.Module:
        for name, part in self.adapter_parts().items():
            keep = part.trained if trained and isinstance(part, ModuleToSave) else part.base_layer
            set_module(self.base_model, name, keep)
        self._hook.remove()
        return self.base_model


@functools.cache
def _forward_params(cls: type) -> frozenset[str]:
    """Parameter names of ``cls.forward`` (HF causal LMs take ``logits_to_keep``), read once per class: the scoring
    pass asks on every training step."""
    try:
        return frozenset(inspect.signature(cls.forward).parameters)
    except (TypeError, ValueError):  # a forward without an inspectable signature
        return frozenset()


class SlimModel(AdaptedModel):
    """A HuggingFace model with SLIM layers injected."""

    layer_type = SlimLinear

    def __init__(self, model: nn.Module, config: SlimConfig, layer_names: list[str]) -> None:
        super().__init__(model, layer_names, RoutingContext(), config.modules_to_save)
        self.slim_config = config
        # ood_source "prepass": each sequence's score from the prompt's scoring pass, for the KV-cache steps after it
        # (d (b,), u (b,) or None, unflagged: merged_inference may merge)
        self._prompt_score: tuple[torch.Tensor, torch.Tensor | None, bool] | None = None
        self._layers_cache: list[SlimLinear] | None = None  # _layer_objects()

    def _capture_context(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.ctx.phase == "score":  # the scoring pass's own call of the base model: the context is set already
            return
        super()._capture_context(module, args, kwargs)
        cfg = self.slim_config
        if cfg.ood_source != "prepass" or cfg.n_identity_experts == 0:  # without identity experts no layer scores
            return
        layers = self._layer_objects()
        if not any(layer.disabled for layer in layers):
            self._scoring_pass(module, args, kwargs, layers)

    def forward(self, *args: Any, labels: Any = None, **kwargs: Any) -> Any:
        if torch.compiler.is_compiling() and any(layer._needs_eager_prep() for layer in self._layer_objects()):
            # torch.compile, while some layer's "clusters fitted" flag is not known in Python (a fresh or just loaded
            # model), or, in inference, its cached eval weights are missing (a fresh model, or just switched to eval
            # mode): reading the flag reads a tensor's value and the cache is built from keys a graph cannot
            # compare, both graph breaks. Broken inside the layers, this frame and every frame under it would be
            # split at their calls, and that fragmented code would keep running every call after. Checked here
            # instead, they guard this frame: the next call recompiles it whole, as one graph
            torch._dynamo.graph_break()
            for layer in self._layer_objects():
                layer._eager_prep()
        return super().forward(*args, labels=labels, **kwargs)

    def _layer_objects(self) -> list[SlimLinear]:
        """The SLIM layers, found once (walking every module on every forward costs host time a GPU waits for).
        Objects, not names: FSDP renames modules but keeps them, and a deep copy maps the list to its own layers."""
        if self._layers_cache is None:
            self._layers_cache = list(self.slim_layers().values())
        return self._layers_cache

    def _scoring_pass(self, module: nn.Module, args: tuple, kwargs: dict, layers: list[SlimLinear]) -> None:
        """ood_source "prepass": run the frozen base over the inputs (adapters off, no gradient, no cache) so that
        every layer scores the base's hidden states, then let every layer route on the maximum over all layers.
        A KV-cache step (generation after the prompt) reuses the prompt's score: the new tokens are not rescored."""
        ctx = self.ctx
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            raise ValueError("ood_source='prepass': the forward pass got neither input_ids nor inputs_embeds")
        b, t = ids.shape[0], (ids.shape[1] if ids.dim() > 1 else 1)
        if ctx.past_length > 0:
            if self._prompt_score is None or self._prompt_score[0].shape[0] != b:
                raise RuntimeError(
                    f"ood_source='prepass': a KV-cache step for {b} sequence(s) arrived without their prompt's score; "
                    "run the prompt through this model first (generate() does) instead of passing an outside cache")
            d, u, unflagged = self._prompt_score
            ctx.fixed_score = d.repeat_interleave(t)
            ctx.fixed_u = None if u is None else u.repeat_interleave(t)
            # the prompt's flag (no device sync per generated token), where the merge applies in this step too
            ctx.unflagged = unflagged and self._merge_flag(None)
            return
        kw = {k: v for k, v in kwargs.items() if k not in ("labels", "past_key_values", "cache", "num_items_in_batch")}
        kw["use_cache"] = False
        if torch.is_tensor(kw.get("attention_mask")) and kw["attention_mask"].dim() == 4:
            # a static cache's mask spans the cache's length: without the cache, the (b, t) padding mask instead
            # (the base builds its causal mask from it)
            kw["attention_mask"] = ctx.attention_mask
        if "logits_to_keep" in _forward_params(type(module)):  # the pass reads scores, not vocabulary logits
            kw["logits_to_keep"] = 1
        # the frozen base as it is at inference: dropout off; the SLIM layers keep their mode (in training they
        # fit their clusters on the base's hidden states during this pass)
        modes = [(m, m.training) for m in module.modules()]
        layer_modes = [(layer, layer.training) for layer in layers]
        module.eval()
        for layer, mode in layer_modes:
            layer.train(mode)
        ctx.phase, ctx.carried_score, ctx.carried_u, ctx.score_lead = "score", None, None, (b, t)
        saved = [(m, m.disabled) for m in self.saved_modules().values()]  # the base's own modules, not the copies
        for m, _ in saved:
            m.disabled = True
        try:
            with torch.no_grad():
                module(*args, **kw)
            d, u = ctx.carried_score, ctx.carried_u  # (b*t,) the maximum over all layers
        finally:
            ctx.phase, ctx.score_lead = "route", None
            for m, mode in modes:
                m.training = mode
            for m, disabled in saved:
                m.disabled = disabled
        ctx.reset(ctx.attention_mask, ctx.past)
        if d is None:  # no layer scored (no identity experts): nothing to yield
            d = torch.zeros(b * t, device=ids.device)
        ctx.fixed_score, ctx.fixed_u = d, u
        ctx.unflagged = self._merge_flag(d)
        # the last position's score is the whole prompt's (sequence pooling: every position's; causal: the mean
        # over all real tokens, padding weighted out); the KV-cache steps that follow route on it
        d_last = d.view(b, t)[:, -1]
        # the KV-cache steps route on d_last: they may merge when it flags nothing (decided once, here)
        self._prompt_score = (d_last, None if u is None else u.view(b, t)[:, -1],
                              ctx.unflagged or self._merge_flag(d_last))

    def _merge_flag(self, d: torch.Tensor | None) -> bool:
        """merged_inference: True when no sequence of this call is flagged (one device sync per prompt, inference
        only; the layers then run their merged weights). ``d`` None: whether merging applies at all now."""
        if not self.slim_config.merged_inference or self.training or torch.is_grad_enabled():
            return False
        return d is None or not bool((d > 0).any())

    def aux_loss(self) -> torch.Tensor:
        """l1_weight * sum of the layers' size-normalised L1 penalties (+ any routing losses of this pass)."""
        total = super().aux_loss()
        if self.slim_config.l1_weight > 0:
            l1 = sum(layer.l1_penalty() for layer in self._layer_objects())
            total = total + self.slim_config.l1_weight * l1
            self._last_aux["l1"] = l1.detach()
        return total

    def drop_inference_cache(self) -> None:
        """Make every SLIM layer rebuild its cached inference weights on its next call. Needed only when adapter
        weights were edited in place in eval mode and the model then runs under torch.compile with no eager call in
        between: eager calls notice such edits themselves, and switching between train and eval mode, ``.to()``
        and ``load_state_dict`` drop the caches already."""
        for layer in self._layer_objects():
            layer.drop_inference_cache()

    def slim_layers(self) -> dict[str, SlimLinear]:
        return self.adapter_layers()

    def routing_stats(self, **inputs: Any) -> dict[str, RoutingStats]:
        """Routing of every adapted layer over the given inputs (same arguments as forward)."""
        stats = {}
        for name, rec in self.routing_records(**inputs).items():
            if not rec:
                continue
            slots = rec["slots"].sum(0)
            stats[name] = RoutingStats(
                identity_weight=float(rec["identity_weight"].mean()),
                expert_load=(slots / slots.sum().clamp_min(1.0)).tolist(),
                ood_score=float(rec["d"].mean()),
                ood_flagged=float((rec["d"] > 0).float().mean()),
                n_tokens=int(rec["d"].numel()),
            )
        return stats

    # ------------------------------------------------------------------------------------------ save / load
    def _meta(self) -> dict[str, Any]:
        layers = self.slim_layers()
        return {"method": "slim", "config": self.slim_config.to_dict(),
                "layers": {n: list(base_shape(layer.base_layer)) for n, layer in layers.items()},
                "mask_seeds": {n: layer.mask_seed for n, layer in layers.items()}}

    @classmethod
    def from_pretrained(cls, model: nn.Module, adapter_dir: str | os.PathLike, *, is_trainable: bool = False
                        ) -> SlimModel:
        """Load an adapter onto ``model``. Everything is checked before the model is touched."""
        cfg, layers, tensors = read_adapter(adapter_dir)
        check_compatible(model, layers, adapter_dir)
        _check_tensors(model, cfg, layers, tensors, adapter_dir)
        verify_checksum(adapter_dir)
        warn_other_base_type(model, adapter_dir)
        slim = inject(model, cfg, list(layers))
        load_layer_tensors(slim.adapter_parts(), tensors)
        slim.train(False)
        if not is_trainable:
            for p in slim.parameters():
                p.requires_grad_(False)
        return slim


def _num_processes() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: the same for the same tensors whatever
    the file's layout or header metadata (a checksum that can live inside the file it checks)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous().reshape(-1)
        h.update(json.dumps([name, str(t.dtype), list(tensors[name].shape)]).encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def safetensors_metadata(wpath: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's header ({} when it has none); ValueError naming the file when it
    is unreadable."""
    return _read_safetensors_file(wpath, lambda f: dict(f.metadata() or {}))


def _default_file_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it onto ``path``: a reader never sees a
    half-written file. The file gets the permissions of a plain ``open(path, "w")`` (mkstemp's are owner-only)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_json(path: Path) -> Any:
    """A JSON file's content; ValueError naming the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def read_method_dir(adapter_dir: str | os.PathLike, method: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """adapter_config.json and adapter_model.safetensors of ``method``, read with JSON + safetensors only."""
    d = Path(adapter_dir)
    cpath, wpath = d / CONFIG_NAME, d / WEIGHTS_NAME
    for p in (cpath, wpath):
        if not p.is_file():
            raise ValueError(f"{p}: missing; a saved {method!r} directory holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    meta = read_json(cpath)
    if not isinstance(meta, dict) or meta.get("method") != method:
        got = meta.get("method") if isinstance(meta, dict) else None
        raise ValueError(f"{cpath}: `method` is {got!r}; expected {method!r} "
                         f"(load it with methods.load({got!r}, ...))")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{cpath}: `config` must be an object of config fields")
    return meta, read_safetensors(wpath)


def read_safetensors(wpath: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a weights file, read with safetensors only (never pickle); ValueError naming the file when it
    is truncated or corrupt."""
    return _read_safetensors_file(wpath, lambda f: {k: f.get_tensor(k) for k in f.keys()})


def _read_safetensors_file(wpath: Path, read: Any) -> Any:
    """``read(f)`` of the opened file (safetensors only, never pickle); ValueError naming the file when it is
    truncated or corrupt."""
    try:
        with safe_open(str(wpath), framework="pt", device="cpu") as f:
            return read(f)
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise ValueError(f"{wpath}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def warn_other_base_type(model: nn.Module, adapter_dir: str | os.PathLike) -> None:
    """Log a warning when the adapter was saved on another model family (``base_model_type``) than ``model``'s: the
    shapes fitted (checked before), but weights trained on one family mean little on another."""
    saved = read_json(Path(adapter_dir) / CONFIG_NAME).get("base_model_type")
    now = getattr(getattr(model, "config", None), "model_type", None)
    if saved is not None and now is not None and saved != now:
        logging.getLogger("slimpeft").warning(
            "%s: the adapter was saved on a %r model, this base model is a %r one (the shapes fit; loading anyway)",
            Path(adapter_dir) / CONFIG_NAME, saved, now)


def verify_checksum(adapter_dir: str | os.PathLike) -> None:
    """The weights file must hash to the ``weights_sha256`` its config records (adapters saved before checksums were
    recorded have none and pass). Called after the structural checks, whose messages are more specific."""
    d = Path(adapter_dir)
    expected = read_json(d / CONFIG_NAME).get("weights_sha256")
    if expected is not None and expected != file_sha256(d / WEIGHTS_NAME):
        raise ValueError(f"{d / WEIGHTS_NAME}: SHA-256 differs from `weights_sha256` in {CONFIG_NAME}: the weights "
                         "file was changed or damaged after saving (nothing was loaded); save the adapter again")


def read_adapter(adapter_dir: str | os.PathLike) -> tuple[SlimConfig, dict[str, list[int]], dict[str, torch.Tensor]]:
    """Read and validate a SLIM adapter directory with JSON + safetensors only (never pickle)."""
    meta, tensors = read_method_dir(adapter_dir, "slim")
    cpath = Path(adapter_dir) / CONFIG_NAME
    unknown = sorted(set(meta) - {"method", "config", "layers", "mask_seeds", "base_model_type", "weights_sha256"})
    if unknown:
        raise ValueError(f"{cpath}: unknown top-level field(s) {unknown}")
    cfg = SlimConfig.from_dict(meta["config"], where=str(cpath))
    layers = meta.get("layers")
    if (not isinstance(layers, dict) or not layers
            or not all(isinstance(v, list) and len(v) == 2 and all(isinstance(i, int) for i in v)
                       for v in layers.values())):
        raise ValueError(f"{cpath}: `layers` must map layer names to [d_in, d_out]")
    return cfg, layers, tensors


def _saved_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype ``save_pretrained`` writes a tensor in: float32 for every floating dtype (lossless, and loading
    casts back to the parameter's), else its own."""
    return torch.float32 if t.is_floating_point() else t.dtype


Spec = tuple[tuple[int, ...], torch.dtype]  # (shape, dtype) of a tensor in an adapter file


def saved_specs(state: dict[str, torch.Tensor]) -> dict[str, Spec]:
    """(shape, dtype) of each tensor as ``save_pretrained`` writes it (an ``adapter_state_dict`` in whatever dtype
    the model holds it)."""
    return {k: (tuple(v.shape), _saved_dtype(v)) for k, v in state.items()}


def saved_tensor_specs(model: nn.Module, names: list[str]) -> dict[str, Spec]:
    """Specs of every tensor the adapter file holds for the modules to save ``names`` of the unwrapped ``model``:
    their state dict under ``<name>.trained.``."""
    return {f"{name}.trained.{k}": spec for name in names
            for k, spec in saved_specs(model.get_submodule(name).state_dict()).items()}


def tensor_problems(expected: dict[str, Spec], got: dict[str, torch.Tensor]) -> list[str]:
    """What keeps the saved tensors ``got`` from replacing tensors of specs ``expected``: missing and unexpected
    names, other shapes or dtypes, non-finite values."""
    problems = [f"missing tensor {k}" for k in expected if k not in got]
    problems += [f"unexpected tensor {k}" for k in got if k not in expected]
    problems += [f"{k}: {tuple(got[k].shape)} {got[k].dtype}, expected {shape} {dtype}"
                 for k, (shape, dtype) in expected.items()
                 if k in got and (tuple(got[k].shape) != shape or got[k].dtype != dtype)]
    problems += [f"{k}: non-finite values" for k, v in got.items() if v.is_floating_point() and not v.isfinite().all()]
    return problems


def load_layer_tensors(layers: dict[str, nn.Module], tensors: dict[str, torch.Tensor]) -> None:
    """Copy the saved adapter tensors (named ``<layer>.<key>``, as ``adapter_state_dict``) into the adapter layers;
    their base layers keep their weights (strict=False)."""
    for name, layer in layers.items():
        prefix = name + "."
        layer.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}, strict=False)


def misfit_error(where: str | os.PathLike, what: str, problems: list[str], target: str = "base model") -> ValueError:
    """The error of a saved adapter (``what``) that does not fit the base model (``target``): the first 10 problems,
    then a count of the others. Every loader raises it before the base model is changed."""
    more = f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else ""
    return ValueError(f"{where}: {what} does not fit this {target} (nothing was changed):\n  "
                      + "\n  ".join(problems[:10]) + more)


def check_compatible(model: nn.Module, layers: dict[str, list[int]], where: str | os.PathLike) -> None:
    """The adapter's layers must exist in ``model`` as linear layers of the same shapes."""
    modules = dict(model.named_modules())
    problems = []
    for name, (d_in, d_out) in layers.items():
        mod = modules.get(name)
        if mod is None:
            problems.append(f"{name}: not in the base model")
        elif isinstance(mod, SlimLinear):
            problems.append(f"{name}: already adapted")
        elif not is_adaptable(mod):
            problems.append(f"{name}: is a {type(mod).__name__}, not a linear layer")
        elif base_shape(mod) != (d_in, d_out):
            problems.append(f"{name}: adapter expects (d_in, d_out)=({d_in}, {d_out}), base has {base_shape(mod)}")
    if problems:
        raise misfit_error(where, "adapter", problems)


def _check_tensors(model: nn.Module, cfg: SlimConfig, layers: dict[str, list[int]], got: dict[str, torch.Tensor],
                   where) -> None:
    """The saved tensors must be those of the config's adapter layers and modules to save, shape and dtype."""
    expected = {f"{name}.{key}": spec for name, (d_in, d_out) in layers.items()
                for key, spec in adapter_tensor_specs(cfg, d_in, d_out).items()}
    try:
        saved = saved_tensor_specs(model, resolve_modules_to_save(model, cfg.modules_to_save, list(layers)))
    except ValueError as e:
        raise ValueError(f"{where}/{CONFIG_NAME}: {e}") from None
    misfits = [f"{k}: {tuple(got[k].shape)} in the adapter, this base model's module has {shape}"
               for k, (shape, _) in saved.items() if k in got and tuple(got[k].shape) != shape]
    if misfits:  # the file matches its config; the base model's module does not
        raise misfit_error(where, "the saved modules_to_save", misfits)
    expected.update(saved)
    problems = tensor_problems(expected, got)
    if problems:
        raise ValueError(f"{where}/{WEIGHTS_NAME}: does not match its config (nothing was changed):\n  "
                         + "\n  ".join(problems[:10]) + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10
                                                         else ""))


def inject(model: nn.Module, config: SlimConfig, names: list[str]) -> SlimModel:
    guard_cpu_repacking(model)  # a quantized base: bitsandbytes' CPU inference must not fail on its shapes
    # (inject runs after every check of get_slim_model and from_pretrained: a refused load changes nothing)
    for p in model.parameters():
        p.requires_grad_(False)
    if config.merged_inference and (packed := [n for n in names if is_quantized(model.get_submodule(n))]):
        logging.getLogger("slimpeft").warning(
            "merged_inference: %d adapted layer(s) of this base are quantized (%s, ...): quantized weights cannot be "
            "merged, so those layers run SLIM's routed path (the same outputs, the routed path's cost)",
            len(packed), packed[0])
    for name in names:
        base = model.get_submodule(name)
        layer = SlimLinear(base, config, name)
        weight = base.weight
        layer.to(weight.device)  # adapters stay float32 on the base's device
        set_module(model, name, layer)
    return SlimModel(model, config, names)


def get_slim_model(model: nn.Module, config: SlimConfig | dict[str, Any] | None = None) -> SlimModel:
    """Freeze ``model`` and inject SLIM layers into its target modules (default: the family's MLP projections).
    ``config``: a SlimConfig, or a dict of its fields (validated the same way)."""
    if isinstance(config, dict):
        config = SlimConfig.from_dict(config, where="get_slim_model(config=...)")
    elif config is not None and not isinstance(config, SlimConfig):
        raise TypeError(f"get_slim_model: config must be a SlimConfig or a dict of its fields, got "
                        f"{type(config).__name__}")
    config = config or SlimConfig()
    check_not_adapted(model)
    return inject(model, config, slim_targets(model, config))
