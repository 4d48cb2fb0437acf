"""PrunePlan: what to remove from a model, as data.

A plan names structures of the model *as it is before the plan is applied*: original layer indices, original head
indices, original MLP channel indices. It is JSON-serialisable, it is validated against a model before any weight
moves, and it is saved next to the pruned weights as the record of what was done.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .arch import ArchAdapter, base_model_type, get_adapter, unwrap_model

PLAN_FILENAME = "prune_plan.json"

__all__ = ["PLAN_FILENAME", "PlanError", "PrunePlan", "LayerWidths", "architecture_of", "architecture_difference"]


class PlanError(ValueError):
    """A plan that cannot be applied to the given model."""


@dataclass
class LayerWidths:
    """Widths of one decoder layer after a plan (for counting and for config writing)."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int


# ----- strict field conversion ----------------------------------------------------------------------------------------
# A plan is read from hand-editable JSON: every field is converted strictly. Integers must be integers (a bool, a
# float or a string is refused, never coerced: "12" does not become [1, 2], 1.7 does not become 1).


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or isinstance(value, (float, str, bytes)):
        raise PlanError(f"{where}: {value!r} is a {type(value).__name__}; an integer is needed")
    try:
        return operator.index(value)
    except TypeError:
        raise PlanError(f"{where}: {value!r:.60} is a {type(value).__name__}; an integer is needed") from None


def _int_list(value: Any, where: str) -> list[int]:
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise PlanError(f"{where}: {value!r:.60} is a {type(value).__name__}; a list of integers is needed")
    return [_int(x, f"{where}[{i}]") for i, x in enumerate(value)]


def _layer_key(key: Any, where: str) -> int:
    if isinstance(key, str):
        if not re.fullmatch(r"-?[0-9]+", key.strip()):
            raise PlanError(f"{where}: key {key!r} is not a layer index; keys are layer numbers such as \"3\"")
        return int(key)
    return _int(key, f"{where} key")


def _int_keys(d: Any, where: str) -> dict[int, list[int]]:
    if d is None:
        return {}
    if not isinstance(d, Mapping):
        raise PlanError(f"{where}: {d!r:.60} is a {type(d).__name__}; an object {{layer: [indices]}} is needed")
    out: dict[int, list[int]] = {}
    for k, v in d.items():
        layer = _layer_key(k, where)
        if layer in out:
            raise PlanError(f"{where}: layer {layer} is given twice")
        out[layer] = _int_list(v, f"{where}[{k!r}]")
    return out


def _dict_or_none(value: Any, where: str) -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise PlanError(f"{where}: {value!r:.60} is a {type(value).__name__}; an object (dict) or null is needed")
    return dict(value)


def _non_json(obj: Any, where: str) -> str | None:
    """The first place under `obj` that strict JSON cannot hold (NaN, inf, a non-JSON type), or None."""
    if obj is None or isinstance(obj, (bool, int, str)):
        return None
    if isinstance(obj, float):
        return None if math.isfinite(obj) else f"{where} is {obj}"
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                return f"{where} has key {k!r} of type {type(k).__name__}"
            bad = _non_json(v, f"{where}.{k}")
            if bad:
                return bad
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            bad = _non_json(v, f"{where}[{i}]")
            if bad:
                return bad
        return None
    return f"{where} is a {type(obj).__name__} ({obj!r:.40})"


# ----- the architecture a plan was made for --------------------------------------------------------------------------

ARCHITECTURE_KEYS = ("model_type", "num_layers", "hidden_size", "vocab_size", "layers", "residual_dims")


def architecture_of(model: nn.Module) -> dict[str, Any]:
    """What a plan made for `model` records about it: the family (`model_type`, the base family for pruned and
    sliced classes), `num_layers`, `hidden_size`, `vocab_size`, per layer `[query heads, kv heads, MLP channels]`
    (`layers`), and `residual_dims` (the 2L + 1 residual slot widths of a sliced model; None when every slot has the
    full width)."""
    model = unwrap_model(model)
    ad = get_adapter(model)
    hidden = int(getattr(ad.config, "hidden_size", None) or ad.hidden_size)
    layers = []
    for i in range(ad.num_layers):
        a = ad.attention(i)
        layers.append([int(a.num_heads), int(a.num_kv_heads), int(ad.mlp(i).intermediate_size)])
    dims = getattr(ad.config, "residual_dims", None)
    dims = [int(d) for d in dims] if dims and any(int(d) != hidden for d in dims) else None
    return {
        "model_type": str(base_model_type(ad.config)),
        "num_layers": int(ad.num_layers),
        "hidden_size": hidden,
        "vocab_size": int(ad.embed_tokens.weight.shape[0]),
        "layers": layers,
        "residual_dims": dims,
    }


def _strict_architecture(value: Any, where: str = "architecture") -> dict[str, Any] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise PlanError(f"{where}: {value!r:.60} is a {type(value).__name__}; an object or null is needed")
    unknown = sorted(set(map(str, value)) - set(ARCHITECTURE_KEYS))
    missing = [k for k in ARCHITECTURE_KEYS if k not in value]
    if unknown or missing:
        raise PlanError(f"{where}: unknown keys {unknown}, missing keys {missing}; valid keys: "
                        f"{list(ARCHITECTURE_KEYS)}")
    if not isinstance(value["model_type"], str):
        raise PlanError(f"{where}.model_type: {value['model_type']!r} is not a string")
    layers = value["layers"]
    if isinstance(layers, (str, bytes, Mapping)) or not isinstance(layers, Iterable):
        raise PlanError(f"{where}.layers: {layers!r:.60} is not a list of [heads, kv heads, MLP channels]")
    rows = [_int_list(r, f"{where}.layers[{i}]") for i, r in enumerate(layers)]
    bad = [i for i, r in enumerate(rows) if len(r) != 3]
    if bad:
        raise PlanError(f"{where}.layers[{bad[0]}]: {rows[bad[0]]} must be [heads, kv heads, MLP channels]")
    out = {
        "model_type": value["model_type"],
        "num_layers": _int(value["num_layers"], f"{where}.num_layers"),
        "hidden_size": _int(value["hidden_size"], f"{where}.hidden_size"),
        "vocab_size": _int(value["vocab_size"], f"{where}.vocab_size"),
        "layers": rows,
        "residual_dims": None if value["residual_dims"] is None
        else _int_list(value["residual_dims"], f"{where}.residual_dims"),
    }
    if len(rows) != out["num_layers"]:
        raise PlanError(f"{where}: num_layers={out['num_layers']} but layers lists {len(rows)} layers")
    return out


def architecture_difference(planned: dict[str, Any], actual: dict[str, Any]) -> str | None:
    """A sentence naming how the architecture a plan was made for (`planned`) differs from a model's (`actual`,
    both as `architecture_of` gives them), or None when they agree."""
    again = ": was the plan applied already, or made for another model?"
    if planned["model_type"] != actual["model_type"]:
        return f"plan was made for model_type {planned['model_type']!r}, model is {actual['model_type']!r}"
    if planned["num_layers"] != actual["num_layers"]:
        return f"plan was made for {planned['num_layers']} layers, model has {actual['num_layers']}{again}"
    for key, what in (("hidden_size", "hidden_size"), ("vocab_size", "vocab_size")):
        if planned[key] != actual[key]:
            return f"plan was made for {what}={planned[key]}, model has {what}={actual[key]}"
    for i, (p, a) in enumerate(zip(planned["layers"], actual["layers"])):
        if list(p) != list(a):
            return (f"layer {i}: plan was made for (query heads, kv heads, MLP channels) = {tuple(p)}, model has "
                    f"{tuple(a)}{again}")
    if planned.get("residual_dims") != actual.get("residual_dims"):
        return (f"plan was made for residual widths {planned.get('residual_dims') or 'full'}, model has "
                f"{actual.get('residual_dims') or 'full'}{again}")
    return None


@dataclass
class PrunePlan:
    """What to remove.

    Attributes:
        drop_layers: original indices of decoder layers removed whole.
        heads: per original layer index, the query heads to keep (original head indices).
        kv_heads: per original layer index, the kv heads to keep. May be left out when `heads` implies it
            (every kept query head's group is kept) or vice versa (all query heads of a kept group are kept).
        mlp_channels: per original layer index, the MLP intermediate channels to keep.
        residual_widths: reserved for residual-stream slicing (per-layer widths); filled by slicing methods.
        provenance: free-form record (method, scores, target, calibration data, ...); finite numbers only (the plan
            is written as strict JSON: `to_json` refuses NaN/inf and names the key).
        architecture: what the plan was made for (`architecture_of(model)`); `validate` refuses a model that differs
            (a plan applied twice, a stale plan, another model). None (hand-written plans): not checked.

    Fields are converted strictly (from_dict / from_json / load and the constructor alike): indices must be
    integers, never bools, floats or strings; unknown keys are refused. Errors are PlanError naming the field.
    """

    drop_layers: list[int] = field(default_factory=list)
    heads: dict[int, list[int]] = field(default_factory=dict)
    kv_heads: dict[int, list[int]] = field(default_factory=dict)
    mlp_channels: dict[int, list[int]] = field(default_factory=dict)
    residual_widths: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    architecture: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.drop_layers = _int_list(self.drop_layers, "drop_layers")
        self.heads = _int_keys(self.heads, "heads")
        self.kv_heads = _int_keys(self.kv_heads, "kv_heads")
        self.mlp_channels = _int_keys(self.mlp_channels, "mlp_channels")
        self.residual_widths = _dict_or_none(self.residual_widths, "residual_widths")
        if self.residual_widths and "residual_dims" in self.residual_widths:
            self.residual_widths["residual_dims"] = _int_list(self.residual_widths["residual_dims"],
                                                              "residual_widths.residual_dims")
        self.provenance = _dict_or_none(self.provenance, "provenance") or {}
        self.architecture = _strict_architecture(self.architecture)

    # ----- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("heads", "kv_heads", "mlp_channels"):
            d[k] = {str(i): v for i, v in sorted(d[k].items())}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrunePlan":
        """A plan from its dict form, strictly: unknown keys and wrong types raise PlanError naming the field."""
        if not isinstance(d, Mapping):
            raise PlanError(f"a plan must be a JSON object with fields {sorted(PLAN_FIELDS)}; got a "
                            f"{type(d).__name__}")
        unknown = set(map(str, d)) - PLAN_FIELDS
        if unknown:
            raise PlanError(f"unknown plan fields {sorted(unknown)}; valid fields: {sorted(PLAN_FIELDS)}")
        return cls(**d)

    def to_json(self) -> str:
        """Strict JSON (no NaN/inf: PlanError naming the key, e.g. `provenance.block_influence[0] is nan`)."""
        d = self.to_dict()
        bad = _non_json(d, "plan")
        if bad:
            raise PlanError(f"the plan cannot be written as strict JSON: {bad}; plans hold finite numbers only "
                            "(a method that produced it should have stopped with NonFiniteError)")
        return json.dumps(d, indent=2, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str, source: str | Path | None = None) -> "PrunePlan":
        """A plan from JSON text, strictly; errors name `source` (a file name) when given."""
        prefix = f"{source}: " if source is not None else ""
        try:
            d = json.loads(text, parse_constant=_refuse_constant)
        except json.JSONDecodeError as e:
            raise PlanError(f"{prefix}not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); is the file "
                            "truncated or hand-edited?") from None
        except PlanError as e:
            raise PlanError(f"{prefix}{e}") from None
        try:
            return cls.from_dict(d)
        except PlanError as e:
            raise PlanError(f"{prefix}{e}") from None

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PLAN_FILENAME
        text = self.to_json()  # raises before anything is written
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(text)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        p = Path(path)
        if p.is_dir():
            p = p / PLAN_FILENAME
        if not p.is_file():
            raise FileNotFoundError(f"no plan file at {p}")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise PlanError(f"{p}: not a text (UTF-8) file: {e.reason}") from None
        return cls.from_json(text, source=p)

    @property
    def is_empty(self) -> bool:
        return not (self.drop_layers or self.heads or self.kv_heads or self.mlp_channels or self.residual_widths)

    def check_architecture(self, model: nn.Module) -> None:
        """Raise PlanError when the plan records an architecture (`architecture`) that `model` does not have: the
        plan was applied already, or made for another model. Plans without a record pass."""
        if self.architecture is None:
            return
        diff = architecture_difference(self.architecture, architecture_of(model))
        if diff:
            raise PlanError(f"the plan does not fit this model: {diff}")

    # ----- resolution against a model -----------------------------------------------------------
    def resolved_heads(self, adapter: ArchAdapter, layer: int) -> tuple[list[int], list[int]]:
        """(kept query heads, kept kv heads) of an original layer, filling whichever side was left out."""
        a = adapter.attention(layer)
        nq, nkv = a.num_heads, a.num_kv_heads
        g = a.group_size
        q = self.heads.get(layer)
        kv = self.kv_heads.get(layer)
        if q is None and kv is None:
            return list(range(nq)), list(range(nkv))
        if q is None:
            kv_sorted = sorted(kv)
            return [k * g + j for k in kv_sorted for j in range(g)], kv_sorted
        q_sorted = sorted(q)
        if kv is None:
            return q_sorted, sorted({h // g for h in q_sorted if 0 <= h < nq and g})
        return q_sorted, sorted(kv)

    def layer_widths(self, model: nn.Module) -> dict[int, LayerWidths]:
        """Widths of every surviving layer, keyed by original layer index."""
        ad = get_adapter(model)
        out: dict[int, LayerWidths] = {}
        dropped = set(self.drop_layers)
        for i in range(ad.num_layers):
            if i in dropped:
                continue
            q, kv = self.resolved_heads(ad, i)
            ch = self.mlp_channels.get(i)
            out[i] = LayerWidths(len(q), len(kv), len(ch) if ch is not None else ad.mlp(i).intermediate_size)
        return out

    def resolve(self, model: nn.Module) -> "PrunePlan":
        """This plan with both head lists explicit (query and kv) for every layer that changes attention, so it can be
        composed without the model. `model` is the model the plan applies to."""
        ad = get_adapter(model)
        heads, kv_heads = {}, {}
        for layer in sorted(set(self.heads) | set(self.kv_heads)):
            heads[layer], kv_heads[layer] = self.resolved_heads(ad, layer)
        return PrunePlan(list(self.drop_layers), heads, kv_heads, {k: list(v) for k, v in self.mlp_channels.items()},
                         self.residual_widths, dict(self.provenance), self.architecture)

    def then(self, second: "PrunePlan") -> "PrunePlan":
        """One plan that does this plan and then `second` (whose indices refer to the model this plan produces), in
        this plan's (original) indices. Both must be resolved (`resolve`) where they change attention heads; slicing
        plans (residual_widths) do not compose. Applying the result equals applying the two in turn."""
        for name, p in (("first", self), ("second", second)):
            if p.residual_widths:
                raise PlanError(f"the {name} plan slices the residual stream (residual_widths); slicing plans "
                                "cannot be composed, save each stage's plan instead")
            if set(p.heads) != set(p.kv_heads):
                raise PlanError(f"the {name} plan leaves query or kv heads implicit in layers "
                                f"{sorted(set(p.heads) ^ set(p.kv_heads))}; call plan.resolve(model) first")
        dropped = set(self.drop_layers)
        n_first = max([*dropped, *self.heads, *self.mlp_channels], default=-1) + 1
        n_second = max([*second.drop_layers, *second.heads, *second.mlp_channels], default=-1) + 1
        # original index of every layer the first plan keeps, long enough to cover the second plan's indices
        kept = [i for i in range(n_first + n_second + len(dropped)) if i not in dropped]
        orig = kept.__getitem__

        def compose(a: list[int] | None, b: list[int]) -> list[int]:
            return list(b) if a is None else [sorted(a)[j] for j in b]

        tables = []
        for first_t, second_t in ((self.heads, second.heads), (self.kv_heads, second.kv_heads),
                                  (self.mlp_channels, second.mlp_channels)):
            out = {k: list(v) for k, v in first_t.items()}
            for layer, idx in second_t.items():
                o = orig(layer)
                try:
                    out[o] = compose(first_t.get(o), sorted(idx))
                except IndexError as e:
                    raise PlanError(f"the second plan's layer {layer} (original {o}) keeps indices {sorted(idx)} "
                                    f"beyond the {len(first_t[o])} the first plan keeps") from e
            tables.append(dict(sorted(out.items())))
        drop = sorted(dropped | {orig(i) for i in second.drop_layers})
        for t in tables:
            for layer in [k for k in t if k in drop]:
                del t[layer]
        stages = list(self.provenance["stages"]) if self.provenance.get("composed") else [self.provenance]
        stages.append(second.provenance)
        return PrunePlan(drop, tables[0], tables[1], tables[2], None, {"composed": True, "stages": stages},
                         self.architecture)

    def validate(self, model: nn.Module) -> None:
        """Raise PlanError if this plan cannot be applied to `model` (its recorded architecture differs, or an index
        is out of range or inconsistent). Touches no weights."""
        self.check_architecture(model)
        ad = get_adapter(model)
        n = ad.num_layers
        _check_indices("drop_layers", self.drop_layers, n, "layer")
        if len(set(self.drop_layers)) >= n:
            raise PlanError(f"drop_layers={sorted(self.drop_layers)} removes all {n} layers; keep at least one")
        dropped = set(self.drop_layers)
        for name, table in (("heads", self.heads), ("kv_heads", self.kv_heads), ("mlp_channels", self.mlp_channels)):
            for layer in table:
                if not 0 <= layer < n:
                    raise PlanError(f"{name} names layer {layer}; valid layers are 0..{n - 1}")
                if layer in dropped:
                    raise PlanError(f"{name} gives widths for layer {layer}, which drop_layers removes")
        for layer in sorted(set(self.heads) | set(self.kv_heads)):
            self._validate_heads(ad, layer)
        for layer, ch in self.mlp_channels.items():
            size = ad.mlp(layer).intermediate_size
            _check_indices(f"mlp_channels[{layer}]", ch, size, "channel")
            if not ch:
                raise PlanError(f"mlp_channels[{layer}] keeps no channel; keep at least one of {size}")
        if self.residual_widths:
            raise PlanError(
                "residual_widths (slicing) cannot be applied by plain surgery on "
                f"model_type={ad.config.model_type!r}; use a slicing method that rotates the model first"
            )

    def _validate_heads(self, ad: ArchAdapter, layer: int) -> None:
        a = ad.attention(layer)
        nq, nkv, g = a.num_heads, a.num_kv_heads, a.group_size
        if layer in self.heads:
            _check_indices(f"heads[{layer}]", self.heads[layer], nq, "query head")
        if layer in self.kv_heads:
            _check_indices(f"kv_heads[{layer}]", self.kv_heads[layer], nkv, "kv head")
        q, kv = self.resolved_heads(ad, layer)
        if not q or not kv:
            raise PlanError(f"layer {layer}: the plan keeps no attention head; keep at least one kv group")
        kv_set = set(kv)
        per_group: dict[int, int] = {k: 0 for k in kv}
        for h in q:
            grp = h // g
            if grp not in kv_set:
                raise PlanError(
                    f"layer {layer}: query head {h} belongs to kv head {grp}, which the plan removes; "
                    f"kept kv heads are {kv}"
                )
            per_group[grp] += 1
        counts = set(per_group.values())
        if len(counts) != 1 or 0 in counts:
            raise PlanError(
                f"layer {layer}: grouped-query attention needs the same number of query heads in every kept kv "
                f"group, got {per_group} (kv head -> kept query heads); keep {len(q) // len(kv) or 1} per group "
                f"or a multiple of {len(kv)} query heads in total"
            )


PLAN_FIELDS = frozenset(
    {"drop_layers", "heads", "kv_heads", "mlp_channels", "residual_widths", "provenance", "architecture"}
)


def _refuse_constant(name: str) -> Any:
    raise PlanError(f"the JSON holds {name}, which strict JSON does not allow; write a number or null")


def _check_indices(name: str, idx: list[int], size: int, what: str) -> None:
    bad = [i for i in idx if not 0 <= i < size]
    if bad:
        raise PlanError(f"{name}: {what} indices {bad} out of range; valid are 0..{size - 1}")
    if len(set(idx)) != len(idx):
        dup = sorted({i for i in idx if idx.count(i) > 1})
        raise PlanError(f"{name}: repeated {what} indices {dup}")
