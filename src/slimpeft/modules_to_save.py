"""Modules trained in full next to the adapter (PEFT's ``modules_to_save``), e.g. the freshly initialised task head
of a sequence classifier, which a frozen base would leave random.

Each listed module is replaced by a :class:`ModuleToSave`: the original as ``base_layer`` (frozen, what the model runs
inside ``disable_adapter()`` and gets back from ``unload()``) and a trainable copy ``trained`` (what it runs
otherwise). The copy's tensors are saved with the adapter (``<name>.trained.<key>``) and loaded back with it.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn


class ModuleToSave(nn.Module):
    """A base module and its trainable copy; forward runs the copy unless ``disabled``."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.trained = copy.deepcopy(base_layer)  # same dtype and device as the original
        self.base_layer.requires_grad_(False)
        self.trained.requires_grad_(True)
        self.disabled = False

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.base_layer if self.disabled else self.trained)(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # code that reads a head's attributes (``weight``, ``out_features``) reads the module in use
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "trained"):
                raise
            return getattr(self.base_layer if self.disabled else self.trained, name)


def validate_modules_to_save(value: object) -> list[str]:
    """Problems of a ``modules_to_save`` value (None, or a non-empty list of non-empty names)."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(n, str) and n for n in value):
        return [f"`modules_to_save`={value!r} must be None or a non-empty list of module names (exact names or "
                "dotted suffixes, e.g. ['score'] or ['classifier'])"]
    return []


def resolve_modules_to_save(model: nn.Module, entries: list[str] | None, adapted: list[str]) -> list[str]:
    """Full names of the modules ``entries`` name in ``model`` (a module's full name, or its last dotted components);
    the outermost one where a module and one inside it both match. ValueError naming the entry that matches no module,
    or a match that holds, or lies inside, an adapted layer (``adapted``: their names)."""
    if not entries:
        return []
    modules = [n for n, _ in model.named_modules() if n]
    found: list[str] = []
    problems = []
    for entry in entries:
        hits = [n for n in modules if n == entry or n.endswith("." + entry)]
        if not hits:
            children = [n for n, _ in model.named_children()]
            problems.append(f"`modules_to_save` entry {entry!r} matches no module of this model (its top-level "
                            f"modules: {children})")
        found += [n for n in hits if n not in found]
    found = [n for n in found if not any(n.startswith(o + ".") for o in found)]  # the outermost ones
    for n in found:
        clash = next((a for a in adapted if a == n or a.startswith(n + ".") or n.startswith(a + ".")), None)
        if clash is not None:
            problems.append(f"`modules_to_save`: {n!r} overlaps the adapted layer {clash!r} (a module is either "
                            "adapted or trained in full)")
    if problems:
        raise ValueError("\n".join(problems))
    return found

