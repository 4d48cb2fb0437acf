"""Pruning methods: each turns a model and calibration batches into a PrunePlan.

Every method is a dataclass config (fields with help text) that is also the method object:

    method = hf_prune.methods.get("shortgpt", n_remove=6)
    plan = method.plan(model, batches)      # never edits the model
    hf_prune.apply(model, plan)             # surgery changes the shapes

Methods register themselves by name with `@register("name")`; `get(name, **kwargs)` builds one and
`available()` lists the names.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field, fields
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..plan import PrunePlan

__all__ = [
    "PruningMethod", "available", "get", "register",
    "DynamicSlicing", "IteRABRe", "LLMPruner", "LLMSurgeon", "MagnitudePruning", "PIP", "ShortGPT", "SliceGPT",
]

# method classes importable from here (`from hf_prune.methods import IteRABRe`), loaded on first access
_CLASSES = {
    "DynamicSlicing": "slicegpt", "IteRABRe": "iterabre", "LLMPruner": "pip", "LLMSurgeon": "llm_surgeon",
    "MagnitudePruning": "pip", "PIP": "pip", "ShortGPT": "shortgpt", "SliceGPT": "slicegpt",
}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_REGISTRY: dict[str, type["PruningMethod"]] = {}

# modules imported lazily by get()/available() so that registering a method is just writing its module
_BUILTIN_MODULES = (
    "shortgpt",
    "iterabre",
    "slicegpt",
    "llm_surgeon",
    "pip",
)


def register(name: str):
    """Class decorator: make a PruningMethod subclass reachable as `get(name)`."""

    def deco(cls: type["PruningMethod"]) -> type["PruningMethod"]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def _load_builtins() -> None:
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(f"{__name__}.{mod}")
        except ModuleNotFoundError as e:  # a method module not written yet
            if e.name != f"{__name__}.{mod}":
                raise


def available() -> list[str]:
    _load_builtins()
    return sorted(_REGISTRY)


def get(name: str, **kwargs: Any) -> "PruningMethod":
    """Build the method registered as `name` with config fields `kwargs`."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    cls = _REGISTRY[name]
    valid = {f.name for f in fields(cls)}
    bad = sorted(set(kwargs) - valid)
    if bad:
        raise ValueError(f"{name}: unknown option(s) {bad}; valid options: {sorted(valid)}")
    return cls(**kwargs)


Batch = Mapping[str, torch.Tensor]


@dataclass
class PruningMethod:
    """Base of every method. Subclasses are dataclasses whose fields carry `metadata={"help": ...}`.

    Contract:
      - `plan(model, batches)` scores the model on calibration batches (dicts with `input_ids` and optionally
        `attention_mask`) and returns a PrunePlan for one stage. It must not change the model's shapes; a method
        whose algorithm updates weights does it in `update(model)`, which the caller runs after `plan` and before
        surgery (a rotation that leaves the function unchanged may happen inside `plan`); such methods set
        `runs_on_every_rank`.
      - `stages` is how many times a schedule should call `plan` to reach the method's target (1 for one-shot).
    """

    seed: int = field(default=0, metadata={"help": "Seed for anything random in scoring."})

    name = "base"
    # True when `plan`/`update` change weights (a rotation, a compensating update): in a multi-process run every
    # process must then run them itself (deterministically, on the same batches) instead of receiving the plan.
    runs_on_every_rank = False

    @property
    def stages(self) -> int:
        return 1

    def plan(self, model: nn.Module, batches: Iterable[Batch], stage: int = 0) -> PrunePlan:
        raise NotImplementedError

    def update(self, model: nn.Module) -> None:
        """Write the weight update that goes with the last `plan()` into `model`, before surgery (no-op unless the
        method compensates weights, as LLM Surgeon does). Callers run `plan`, `update`, then surgery."""

    def finalize(self, model: nn.Module) -> None:
        """Run on the bare model after the last recovery training (a LoRA adapter merged first): restore what training
        must not change (no-op unless the method keeps such an invariant, as LLM Surgeon does with its zeros).
        PruneCallback calls it at the end of training and in its export."""

    def state_dict(self) -> dict[str, Any]:
        """What later stages need from earlier ones beyond the model and the config (tensors, numbers, strings,
        None, nested in dicts). PruneCallback saves it in every stage checkpoint and gives it back through
        `load_state_dict` when a run resumes. Empty unless the method keeps such state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take back what `state_dict` returned (no-op unless the method keeps state)."""

    def config_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}
