"""Surgery: the only place in hf_prune that changes shapes.

`apply(model, plan)` applies any PrunePlan in place: first the weight update that travels with the plan (LLM
Surgeon's correlated update, attached by the method with `attach_weight_update`), then the shape change the plan
holds: residual-stream slicing (`plan.residual_widths`, after a slicing method's rotation) or structured removal of
layers, attention heads and MLP channels. An invalid plan raises before any weight moves.

- `structured`: layers, heads (whole GQA groups), MLP channels; writes the family's standard or `Pruned*` config;
- `slicing`: the rotation-invariant form, residual slots, `apply_slicing`;
- `compact`: `compact_zeros`, projections stored without their zero rows and columns;
- `common`: row/column selection shared by the three.
"""

from __future__ import annotations

import weakref
from typing import Callable

from torch import nn

from ..arch import unwrap_model
from ..plan import PlanError, PrunePlan
from .common import refuse_compacted
from .compact import compact_zeros
from .peft import refuse_unsupported_peft_plan
from .slicing import (
    NotRotationInvariantError,
    apply_slicing,
    masked_slicing,
    is_rotation_invariant,
    make_rotation_invariant,
    sliced_num_parameters,
)
from .structured import (
    apply_structured,
    is_uniform,
    layer_widths,
    predicted_num_parameters,
    set_layer_widths_config,
)

__all__ = [
    "NotRotationInvariantError",
    "apply",
    "apply_slicing",
    "masked_slicing",
    "apply_structured",
    "attach_weight_update",
    "compact_zeros",
    "weight_update_of",
    "is_rotation_invariant",
    "is_uniform",
    "layer_widths",
    "make_rotation_invariant",
    "predicted_num_parameters",
    "set_layer_widths_config",
    "sliced_num_parameters",
]

WeightUpdate = Callable[[nn.Module], None]

# plan -> the weight update that must be written into the model before the plan's surgery. Keyed by id with a weak
# reference, so a plan that is dropped takes its update with it (PrunePlan is a mutable dataclass, not hashable).
_UPDATES: dict[int, tuple[weakref.ref, WeightUpdate]] = {}


def attach_weight_update(plan: PrunePlan, update: WeightUpdate) -> None:
    """Make `apply(model, plan)` call `update(model)` before the surgery (once). A method whose algorithm
    compensates weights (LLM Surgeon) calls this from `plan()`, so no caller can skip the update."""
    key = id(plan)
    _UPDATES[key] = (weakref.ref(plan, lambda _ref, k=key, updates=_UPDATES: updates.pop(k, None)), update)


def weight_update_of(plan: PrunePlan) -> WeightUpdate | None:
    """The weight update attached to `plan` that `apply` has not written yet (None if there is none). Calling it
    on a copy of the model shows the model between the update and the surgery (tests, diagnostics)."""
    entry = _UPDATES.get(id(plan))
    return entry[1] if entry is not None and entry[0]() is plan else None


def _take_weight_update(plan: PrunePlan) -> WeightUpdate | None:
    entry = _UPDATES.get(id(plan))
    if entry is None or entry[0]() is not plan:
        return None
    del _UPDATES[id(plan)]
    return entry[1]


def apply(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Apply `plan` to `model` in place: the plan's weight update (if its method attached one), then slicing
    (`plan.residual_widths`) or structured surgery. Validates first: an invalid plan raises and leaves every weight
    untouched. A PEFT model (PeftModel, or LoRA layers injected) keeps its LoRA adapters, pruned with the base
    weights, so the result equals "merge, then prune"; what cannot be pruned exactly (slicing plans, a weight update,
    DoRA, other adapters on pruned projections) is refused before anything changes. Returns the (unwrapped) model."""
    if not isinstance(plan, PrunePlan):
        raise TypeError(f"apply(model, plan) needs a hf_prune.PrunePlan, got {type(plan).__name__}")
    refuse_unsupported_peft_plan(model, plan, has_weight_update=weight_update_of(plan) is not None)
    model = unwrap_model(model)
    refuse_compacted(model, "surgery")
    if plan.residual_widths:
        plan.check_architecture(model)  # a slicing plan made for another width (or applied twice) is refused
        if not is_rotation_invariant(model):
            raise PlanError(
                "the plan slices the residual stream (residual_widths) but the model is not in rotation-invariant "
                "form: a slicing plan applies only to the model its method rotated (run the method's plan() on "
                "this model, or hf_prune.prune(model, method, batches))"
            )
    else:
        plan.validate(model)
    update = _take_weight_update(plan)
    if update is not None:
        update(model)
    if plan.residual_widths:
        return apply_slicing(model, plan)
    return apply_structured(model, plan)
