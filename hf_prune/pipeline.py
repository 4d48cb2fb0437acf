"""The one stage runner: every caller (CLI, PruneCallback, recipes, benchmarks) prunes through it.

A stage is: the method's `plan(model, batches, stage)` (scores; a slicing method rotates the model there, which
leaves its function unchanged; a compensating method attaches its weight update to the plan), then
`hf_prune.apply(model, plan)` (the attached weight update, then slicing or structured surgery). After the last stage
(and after the last recovery training, when there is one) the method's `finalize(model)` restores what training must
not change (LLM Surgeon's zeros).

    import hf_prune
    from hf_prune.methods import get

    result = hf_prune.prune(model, get("shortgpt", n_remove=4), batches)          # every stage, no recovery
    result = hf_prune.prune(model, get("iterabre", n_remove=2), batches,
                            recover=lambda model, stage: train_a_bit(model))      # recovery between stages
    result.plan          # one plan in the original model's indices (what the card reports)
    result.stages        # per stage: its plan, parameters before/after, seconds
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from torch import nn

from .arch import unwrap_model
from .methods import Batch, PruningMethod
from .plan import PrunePlan
from .runtime import release_freed_memory, unpin_checkpoint_maps
from .surgery import apply
from .surgery.peft import refuse_peft

__all__ = ["PruneResult", "StageResult", "compose", "finalize", "prune", "run_stage"]

logger = logging.getLogger(__name__)

Calibration = Sequence[Batch] | Callable[[int], Sequence[Batch]]
Planner = Callable[[nn.Module, Sequence[Batch], int], PrunePlan]
Recover = Callable[[nn.Module, int], Any]


@dataclass
class StageResult:
    """One stage: its plan (in the indices of the model it was applied to), the same plan with both head lists
    explicit (None for slicing plans), parameter counts and the seconds spent scoring and in surgery."""

    stage: int
    plan: PrunePlan
    resolved: PrunePlan | None
    parameters_before: int
    parameters_after: int
    plan_seconds: float
    apply_seconds: float


@dataclass
class PruneResult:
    """What `prune` did: every stage, and one plan for the whole run in the original model's indices."""

    stages: list[StageResult] = field(default_factory=list)
    plan: PrunePlan | None = None

    @property
    def plans(self) -> list[PrunePlan]:
        return [s.plan for s in self.stages]


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _stage_batches(calibration: Calibration, stage: int) -> Sequence[Batch]:
    return calibration(stage) if callable(calibration) else calibration


def run_stage(
    model: nn.Module,
    method: PruningMethod,
    calibration: Calibration,
    stage: int,
    planner: Planner | None = None,
) -> StageResult:
    """Prune `model` in place by stage `stage` of `method`: plan, then apply (the plan's weight update, then its
    surgery). `planner(model, batches, stage)` replaces `method.plan` where the plan is computed elsewhere (the
    callback broadcasts the main process's plan to the other ranks); it must return the method's plan."""
    if method.runs_on_every_rank:  # its plan changes weights (rotation, compensating update): no adapter survives
        refuse_peft(model, f"{method.name} (its plan changes the weights)")
    model = unwrap_model(model)
    if not 0 <= stage < method.stages:
        raise ValueError(f"stage={stage}; {method.name} runs stages 0..{method.stages - 1}")
    batches = _stage_batches(calibration, stage)
    before = _num_parameters(model)
    t0 = time.perf_counter()
    plan = planner(model, batches, stage) if planner is not None else method.plan(model, batches, stage)
    plan_seconds = time.perf_counter() - t0
    plan.provenance.setdefault("method", method.name)
    plan.provenance.setdefault("stage", stage)
    resolved = None if plan.residual_widths else plan.resolve(model)
    t1 = time.perf_counter()
    apply(model, plan)
    unpin_checkpoint_maps(model)  # a checkpoint map held by a few surviving tensors (norm scales) is released
    release_freed_memory()  # the weights the surgery replaced are garbage: give the heap back before what comes next
    after = _num_parameters(model)
    logger.info("%s stage %d/%d: %d -> %d parameters (%.1f s scoring)", method.name, stage + 1, method.stages,
                before, after, plan_seconds)
    return StageResult(stage, plan, resolved, before, after, plan_seconds, time.perf_counter() - t1)


def compose(done: PrunePlan | None, stage: StageResult) -> PrunePlan:
    """The plan of every stage so far in the original indices: `done` (None before the first stage) then `stage`.
    Slicing stages do not compose index by index; the result then records the last stage's widths and every
    stage's provenance."""
    if done is None:
        return stage.resolved if stage.resolved is not None else stage.plan
    if stage.resolved is not None and not done.residual_widths:
        return done.then(stage.resolved)
    stages = list(done.provenance["stages"]) if done.provenance.get("composed") else [done.provenance]
    return PrunePlan(residual_widths=stage.plan.residual_widths,
                     provenance={"composed": True, "stages": [*stages, stage.plan.provenance]})


def finalize(model: nn.Module, method: PruningMethod) -> None:
    """After the last stage and the last recovery training (a LoRA adapter merged first): the method's invariant
    restored (LLM Surgeon writes back its zeros; a no-op for most methods)."""
    method.finalize(unwrap_model(model))


def prune(
    model: nn.Module,
    method: PruningMethod,
    calibration: Calibration,
    *,
    stages: Iterable[int] | None = None,
    recover: Recover | None = None,
    finalize_model: bool = True,
) -> PruneResult:
    """Run `method` on `model` in place, stage by stage, and return what was done.

    Args:
        calibration: batches (dicts with `input_ids`, optionally `attention_mask`) reused at every stage, or a
            function stage -> batches.
        stages: which stages to run (default: all, `range(method.stages)`); a resumed run passes the rest.
        recover: called as `recover(model, stage)` after each stage's surgery (recovery training); the model it
            leaves is pruned by the next stage.
        finalize_model: run `method.finalize(model)` after the last stage (and its recovery).
    """
    todo = list(range(method.stages)) if stages is None else [int(s) for s in stages]
    result = PruneResult()
    for stage in todo:
        record = run_stage(model, method, calibration, stage)
        result.stages.append(record)
        result.plan = compose(result.plan, record)
        if recover is not None:
            recover(unwrap_model(model), stage)
    if finalize_model:
        finalize(model, method)
    return result
