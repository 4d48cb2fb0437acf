"""Pruning methods: each turns a model and calibration batches into a PrunePlan.

Every method is a dataclass config (fields with help text) that is also the method object:

    method = hf_prune.methods.get("shortgpt", n_remove=6)
    result = hf_prune.prune(model, method, batches)   # every stage: plan, the plan's weight update, surgery, finalize

or, one stage by hand: `plan = method.plan(model, batches); hf_prune.apply(model, plan)` (`apply` writes the weight
update a method attached to its plan before the surgery). A config saves and loads on its own, as peft's do:
`method.to_dict()`, `hf_prune.methods.from_dict(d)`, `method.save(dir)`, `hf_prune.methods.load(dir)`.

Methods register themselves by name with `@register("name")`; `get(name, **kwargs)` builds one and
`available()` lists the names.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from ..plan import PrunePlan

__all__ = [
    "CONFIG_FILENAME", "ConfigField", "PruningMethod", "available", "config_fields", "from_dict", "get", "load",
    "method_class", "register",
    "AngularBlock", "DynamicSlicing", "IteRABRe", "LLMPruner", "LLMSurgeon", "MagnitudePruning", "PIP", "ShortGPT",
    "SliceGPT",
]

# method classes importable from here (`from hf_prune.methods import IteRABRe`), loaded on first access
_CLASSES = {
    "AngularBlock": "angular_block",
    "DynamicSlicing": "slicegpt", "IteRABRe": "iterabre", "LLMPruner": "pip", "LLMSurgeon": "llm_surgeon",
    "MagnitudePruning": "pip", "PIP": "pip", "ShortGPT": "shortgpt", "SliceGPT": "slicegpt",
}


def __getattr__(name: str) -> Any:
    if name in _CLASSES:
        return getattr(importlib.import_module(f"{__name__}.{_CLASSES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

_REGISTRY: dict[str, type["PruningMethod"]] = {}

CONFIG_FILENAME = "prune_method.json"

# modules imported lazily by get()/available() so that registering a method is just writing its module
_BUILTIN_MODULES = (
    "shortgpt",
    "iterabre",
    "slicegpt",
    "llm_surgeon",
    "pip",
    "angular_block",
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


def method_class(name: str) -> type["PruningMethod"]:
    """The class registered as `name`."""
    _load_builtins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown pruning method {name!r}; available: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def from_dict(d: Mapping[str, Any]) -> "PruningMethod":
    """The method a `PruningMethod.to_dict()` describes (`{"method": name, **config fields}`)."""
    if not isinstance(d, Mapping) or not isinstance(d.get("method"), str):
        raise ValueError(f"a method config needs a 'method' name (one of {available()}); got {d!r:.120}")
    options = {k: v for k, v in d.items() if k != "method"}
    return get(d["method"], **options)


def load(path: str | Path) -> "PruningMethod":
    """The method saved with `method.save(directory)` (a directory holding prune_method.json, or the file)."""
    p = Path(path)
    if p.is_dir():
        p = p / CONFIG_FILENAME
    try:
        d = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    return from_dict(d)


# config fields that hold runtime objects, not config values: never flags, never saved (PIP's tokenizer)
RUNTIME_FIELDS = ("tokenizer",)
_TRUE, _FALSE = ("true", "yes", "1", "on"), ("false", "no", "0", "off")


@dataclass(frozen=True)
class ConfigField:
    """One config field of a method as a typed option: name, type, default, help and a strict text parser."""

    name: str
    type: Any
    default: Any
    help: str

    @property
    def is_list(self) -> bool:
        return typing.get_origin(self.type) in (tuple, list)

    def parse(self, text: str) -> Any:
        """`text` as this field's type; ValueError naming the value and what is valid (no bool for int, no
        truncated float, 'none' only where None is allowed)."""
        kinds = [a for a in typing.get_args(self.type) if a is not type(None)] if typing.get_origin(self.type) in (
            typing.Union, types.UnionType) else [self.type]
        optional = typing.get_origin(self.type) in (typing.Union, types.UnionType) and type(None) in typing.get_args(
            self.type)
        raw = text.strip()
        if optional and raw.lower() in ("none", "null"):
            return None
        kind = kinds[0] if kinds else str
        if self.is_list:
            return tuple(x.strip() for x in raw.split(",") if x.strip())
        if kind is bool:
            if raw.lower() in _TRUE:
                return True
            if raw.lower() in _FALSE:
                return False
            raise ValueError(f"{self.name}={text!r} is not valid; use true or false")
        if kind is int:
            if not raw.lstrip("-").isdigit():
                raise ValueError(f"{self.name}={text!r} is not valid; it must be an integer"
                                 + (" or none" if optional else ""))
            return int(raw)
        if kind is float:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{self.name}={text!r} is not valid; it must be a number"
                                 + (" or none" if optional else "")) from None
            if not math.isfinite(value):
                raise ValueError(f"{self.name}={text!r} is not valid; it must be a finite number")
            return value
        return raw


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def config_fields(cls: type["PruningMethod"], exclude: Iterable[str] = ()) -> list[ConfigField]:
    """The config fields of a method class as typed options (the one source of the CLI's and the recipes' method
    flags), without runtime fields and `exclude`."""
    hints = typing.get_type_hints(cls)
    skip = set(RUNTIME_FIELDS) | set(exclude)
    return [ConfigField(f.name, hints[f.name], f.default if f.default is not MISSING else None,
                        f.metadata.get("help", "")) for f in fields(cls) if f.name not in skip]


def _checked_plan(plan_fn):
    """Wrap a method's `plan` so that every method checks its inputs the same way before scoring and records the
    architecture the plan was made for."""

    @functools.wraps(plan_fn)
    def plan(self: "PruningMethod", model: nn.Module, batches: Iterable[Batch] = (), stage: int = 0) -> PrunePlan:
        from ..checks import check_batches
        from ..plan import architecture_of

        if getattr(self, "_in_plan", False):  # a subclass's plan calling super().plan(): checked once
            return plan_fn(self, model, batches, stage)
        if isinstance(stage, bool) or not isinstance(stage, int) or not 0 <= stage < self.stages:
            raise ValueError(f"{self.name}: stage={stage!r}; valid stages are 0..{self.stages - 1}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.name}: model must be a torch.nn.Module (a causal LM), got {type(model).__name__}")
        batches = check_batches(batches, model, method=self.name, required=self.needs_calibration)
        self._in_plan = True
        try:
            result = plan_fn(self, model, batches, stage)
        finally:
            self._in_plan = False
        if not isinstance(result, PrunePlan):
            raise TypeError(f"{self.name}.plan returned {type(result).__name__}, not a PrunePlan")
        if getattr(result, "architecture", None) is None and not result.residual_widths:
            result.architecture = architecture_of(model)
        result.provenance.setdefault("method", self.name)
        result.provenance.setdefault("method_config", self.to_dict())
        return result

    plan.hf_prune_checked = True
    return plan


Batch = Mapping[str, torch.Tensor]


@dataclass
class PruningMethod:
    """Base of every method. Subclasses are dataclasses whose fields carry `metadata={"help": ...}`.

    Contract:
      - `plan(model, batches, stage)` scores the model on calibration batches (dicts with `input_ids` and optionally
        `attention_mask`) and returns a PrunePlan for one stage. It must not change the model's shapes or its
        function (a rotation that leaves the function unchanged may happen inside `plan`). A method whose algorithm
        updates weights attaches the update to the plan (`hf_prune.surgery.attach_weight_update`); `apply` writes
        it before the surgery. Such methods set `runs_on_every_rank`. Every subclass's `plan` is wrapped so that
        its inputs are checked (`hf_prune.checks.check_batches`) and the plan records the architecture and the
        method config it was made for.
      - `stages` is how many times a schedule should call `plan` to reach the method's target (1 for one-shot).
      - The dataclass fields are the config (plain values: `to_dict` / `from_dict` / `save` / `load`); what a run
        accumulates between stages (`state_dict`) is not config.
    """

    seed: int = field(default=0, metadata={"help": "Seed for anything random in scoring."})

    name = "base"
    # True when `plan`/`update` change weights (a rotation, a compensating update): in a multi-process run every
    # process must then run them itself (deterministically, on the same batches) instead of receiving the plan.
    runs_on_every_rank = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("plan")
        if own is not None and not getattr(own, "hf_prune_checked", False):
            cls.plan = _checked_plan(own)

    @property
    def stages(self) -> int:
        return 1

    @property
    def needs_calibration(self) -> bool:
        """False for data-free methods (magnitude): they accept no calibration batches."""
        return True

    def plan(self, model: nn.Module, batches: Iterable[Batch], stage: int = 0) -> PrunePlan:
        raise NotImplementedError

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

    # ----- config ----------------------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        """The config fields and their values."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in RUNTIME_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        """`{"method": name, **config}`: plain JSON values; `hf_prune.methods.from_dict` rebuilds the method."""
        return {"method": self.name, **{f.name: _plain(getattr(self, f.name)) for f in fields(self)
                                        if f.name not in RUNTIME_FIELDS}}

    def save(self, directory: str | Path) -> Path:
        """Write the config as `<directory>/prune_method.json` (strict JSON)."""
        path = Path(directory) / CONFIG_FILENAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False), encoding="utf-8")
        return path

    @classmethod
    def field_defaults(cls) -> dict[str, Any]:
        return {f.name: f.default for f in fields(cls) if f.default is not MISSING}
