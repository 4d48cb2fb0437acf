"""PrunePlan: what to remove from a model, as data.

A plan names structures of the model *as it is before the plan is applied*: original layer indices, original head
indices, original MLP channel indices. It is JSON-serialisable, it is validated against a model before any weight
moves, and it is saved next to the pruned weights as the record of what was done.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .arch import ArchAdapter, get_adapter

PLAN_FILENAME = "prune_plan.json"

__all__ = ["PLAN_FILENAME", "PlanError", "PrunePlan", "LayerWidths"]


class PlanError(ValueError):
    """A plan that cannot be applied to the given model."""


@dataclass
class LayerWidths:
    """Widths of one decoder layer after a plan (for counting and for config writing)."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int


def _int_keys(d: dict | None) -> dict[int, list[int]]:
    return {int(k): [int(x) for x in v] for k, v in (d or {}).items()}


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
        provenance: free-form record (method, scores, target, calibration data, ...).
    """

    drop_layers: list[int] = field(default_factory=list)
    heads: dict[int, list[int]] = field(default_factory=dict)
    kv_heads: dict[int, list[int]] = field(default_factory=dict)
    mlp_channels: dict[int, list[int]] = field(default_factory=dict)
    residual_widths: dict[str, Any] | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.drop_layers = [int(i) for i in self.drop_layers]
        self.heads = _int_keys(self.heads)
        self.kv_heads = _int_keys(self.kv_heads)
        self.mlp_channels = _int_keys(self.mlp_channels)

    # ----- serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("heads", "kv_heads", "mlp_channels"):
            d[k] = {str(i): v for i, v in sorted(d[k].items())}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PrunePlan":
        known = {"drop_layers", "heads", "kv_heads", "mlp_channels", "residual_widths", "provenance"}
        unknown = set(d) - known
        if unknown:
            raise PlanError(f"unknown plan fields {sorted(unknown)}; valid fields: {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PrunePlan":
        return cls.from_dict(json.loads(text))

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / PLAN_FILENAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(self.to_json())
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        p = Path(path)
        if p.is_dir():
            p = p / PLAN_FILENAME
        return cls.from_json(p.read_text())

    @property
    def is_empty(self) -> bool:
        return not (self.drop_layers or self.heads or self.kv_heads or self.mlp_channels or self.residual_widths)

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
                         self.residual_widths, dict(self.provenance))

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
        return PrunePlan(drop, tables[0], tables[1], tables[2], None, {"composed": True, "stages": stages})

    def validate(self, model: nn.Module) -> None:
        """Raise PlanError if this plan cannot be applied to `model`. Touches no weights."""
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


def _check_indices(name: str, idx: list[int], size: int, what: str) -> None:
    bad = [i for i in idx if not 0 <= i < size]
    if bad:
        raise PlanError(f"{name}: {what} indices {bad} out of range; valid are 0..{size - 1}")
    if len(set(idx)) != len(idx):
        dup = sorted({i for i in idx if idx.count(i) > 1})
        raise PlanError(f"{name}: repeated {what} indices {dup}")
