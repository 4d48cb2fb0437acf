"""Prune between recovery stages of an existing `transformers.Trainer` or `trl.SFTTrainer`.

    from hf_prune.callbacks import PruneCallback, PruneSchedule, prune_and_train
    from hf_prune.methods.shortgpt import ShortGPT

    cb = PruneCallback(ShortGPT(n_remove=6, per_stage=2), calibration=blocks, schedule=PruneSchedule(every_n_epochs=1))
    trainer = Trainer(model=model, args=args, train_dataset=recovery_data, callbacks=[cb])
    prune_and_train(trainer)            # prune -> recover -> prune -> recover -> prune -> recover
    trainer.save_model("out")           # config.json describes the reduced architecture

Design: one train() call per recovery stage.
    Inside `Trainer._inner_training_loop` the wrapped model (DDP, compiled, accelerate-prepared) is a local variable
    (../shared/HF_NOTES.md §1.2-1.4): a callback can mutate the module but cannot replace its wrapper, so a model
    pruned inside the loop keeps training through a DDP reducer built for parameters that no longer exist (an error,
    or silent rank divergence). The callback therefore never changes shapes inside the loop. At a stage boundary it
    only asks the loop to stop (`control.should_training_stop`, and `should_save = False` so no checkpoint of the
    unpruned model is written at that step). `prune_and_train` then, between two `train()` calls:

    1. merges PEFT adapters into the weights (`merge_and_unload`),
    2. runs the stage through `hf_prune.pipeline.run_stage` (the one stage runner): the plan is scored on the main
       process and broadcast (`broadcast_object_list`); every rank applies the same plan with `hf_prune.apply`, and
       the resulting architecture and a weight checksum are compared across ranks (methods whose plan changes
       weights, `runs_on_every_rank` -- SliceGPT's rotation, LLM Surgeon's correlated update attached to its plan --
       score on every rank instead),
    3. re-attaches a fresh adapter with the same LoraConfig (its `base_model_name_or_path` pointing at the saved,
       merged and pruned base) and sets `trainer.model`,
    4. rebuilds the optimizer with `trainer.create_optimizer()` (same class, fused/foreach flags, weight-decay groups),
       carrying over the state of every parameter that survived unchanged and dropping every reference to removed
       ones; clears accelerate's prepared-object lists (`accelerator.free_memory()`); resets `model_wrapped` to the
       bare model and the LR scheduler to None, so the next `train()` wraps the new model in a new DDP reducer,
    5. logs what was removed and the parameter count with `trainer.log` (console, reporters, `state.log_history`),
    6. writes a stage checkpoint `<output_dir>/prune-stage-<k>` (pruned weights + trainer_state.json + the plan) and
       calls `trainer.train(resume_from_checkpoint=...)` on it: the Trainer's own resume logic restores the global
       step, epoch and log history and skips the data already seen; the callback fast-forwards the new LR scheduler
       to the global step (same schedule position), and activation checkpointing is re-enabled by `train()` itself.
    A stage due before any training (epoch 0 / step 0) is run before the first `train()` call.

    The same code path serves `Trainer` and `SFTTrainer`, full fine-tuning and LoRA, one process and DDP; FSDP2 runs
    take the gather -> prune -> re-shard route below.

Plain `trainer.train()` (one process, full fine-tuning): `trainer.add_callback(PruneCallback(...)); trainer.train()`
    also works. The callback finds its Trainer (callbacks are not handed one) and prunes inside the loop at the same
    boundaries (HF_NOTES 1.4 A): the loop's model is the pruned module itself, and it re-reads the optimizer and the
    LR scheduler from the Trainer at every step, so the callback rebuilds both (state carried, schedule position
    kept) and logs the stage. Where the loop holds something that cannot be rebuilt from inside it (a DDP or compile
    wrapper, a PEFT model whose adapter must be merged and re-attached) `train()` raises and names the reason; use
    `prune_and_train` there.

Resuming: a stage checkpoint and every regular checkpoint written after a stage hold the reduced architecture. Build
the model with `load_for_resume(ckpt)` (a LoRA checkpoint is loaded onto the merged, pruned base it names), build
the Trainer with the same PruneCallback, and call `prune_and_train(trainer, resume_from_checkpoint=ckpt)`: the
number of stages already done is read from the checkpoint's log history.

Knowledge distillation: pass `distillation=DistillationLoss(teacher, ...)`; the callback installs it as the
Trainer's `compute_loss_func` and attaches its input hook to the student (see hf_prune.distill).

Sharded runs (FSDP2 through accelerate, `fsdp_version: 2`; recipes/configs/accelerate_fsdp2.yaml): shapes never change
inside a sharded step. At a stage boundary `prune_and_train` calls `run_sharded_stage`, which calls
`prune_sharded_model` (hf_prune.sharded.prune_sharded): the full weights and optimizer state are gathered to the main
process's CPU (LoRA merged), the stage is scored and applied there once by `run_stage` (a layer-by-layer method with
one decoder layer at a time on the shards' device, any other method on the host copy; the memory each step needs is
logged before it starts and recorded as `prune/memory_gib/<step>`), the other ranks build the pruned architecture from
the broadcast config (checked name by name), and the optimizer state of every surviving parameter is kept by name.
The Trainer gets the plain pruned model; the next `train()` shards it (with `fsdp_cpu_ram_efficient_loading` the main
process's weights are broadcast into the shards) and `on_train_begin` scatters the carried optimizer state into the
new optimizer. A hand-written FSDP2 loop calls the same `prune_sharded_model`, then `hf_prune.sharded.shard_pruned`
and `load_optimizer_state` (tests/fsdp2_prune_script.py). FSDP1, `fsdp_state_dict_type` other than FULL_STATE_DICT,
methods with a `finalize` step (LLM Surgeon) and distillation are refused under FSDP with the reason; DeepSpeed is
refused (`DEEPSPEED_REFUSAL`: ZeRO's optimizer state is flat per-partition, and resuming needs a ZeRO checkpoint of
the pruned model).

Limits: `load_best_model_at_end` is refused; the Trainer must create its own optimizer and scheduler (use
`optim`/`optimizer_cls_and_kwargs`, not `optimizers=(...)`); multi-node runs need an `output_dir` that every node can
read (stage checkpoints are written by the main process and read by all). While the main process scores, the other ranks wait in a collective, bounded by
`TrainingArguments.ddp_timeout`.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import json
import logging
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM, Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

import hf_prune  # noqa: F401  (registers the pruned model classes with the Auto classes)
from hf_prune.arch import get_adapter, unwrap_model
from hf_prune.data import batches as make_batches
from hf_prune.distill import DistillationLoss
from hf_prune.methods import PruningMethod
from hf_prune.plan import PrunePlan
from hf_prune.pipeline import StageResult, compose, finalize, run_stage
from hf_prune.sharded import (ShardedStage, gather_to_main, is_fsdp2, is_layerwise, load_optimizer_state,
                              prune_sharded, scoring_memory, scoring_placement)
from hf_prune.surgery import layer_widths

__all__ = ["PruneCallback", "PruneSchedule", "load_for_resume", "prune_and_train", "STAGE_PREFIX"]

logger = logging.getLogger(__name__)

STAGE_PREFIX = "prune-stage-"
BASE_MODEL_DIR = "base_model"
STAGE_KEY = "prune/stage"
COMPOSED_PLAN = "prune_plan_all_stages.json"
METHOD_STATE = "prune_method_state.pt"  # the method's state_dict() after the stage (LLM Surgeon: zero patterns)


# ---------------------------------------------------------------------------------------------------------------------
# schedule
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class PruneSchedule:
    """When the pruning stages happen. Give exactly one of `epochs`, `every_n_epochs`, `every_n_steps` (default:
    every epoch). Stages run at the first boundaries until the method's `stages` are done."""

    epochs: list[int] | None = field(
        default=None,
        metadata={"help": "Prune before each of these epochs (0 = before any training), e.g. [0, 2, 4]."},
    )
    every_n_epochs: int | None = field(
        default=None, metadata={"help": "Prune before every N-th epoch (epochs 0, N, 2N, ... with at_start)."}
    )
    every_n_steps: int | None = field(
        default=None,
        metadata={"help": "Prune every N optimizer steps (steps 0, N, 2N, ... with at_start), mid-epoch if needed."},
    )
    at_start: bool = field(
        default=True,
        metadata={"help": "With every_n_epochs/every_n_steps: also prune before the first step, so that every "
                          "stage is followed by recovery."},
    )

    def __post_init__(self) -> None:
        given = [n for n in ("epochs", "every_n_epochs", "every_n_steps") if getattr(self, n) is not None]
        if not given:
            self.every_n_epochs = 1
        elif len(given) > 1:
            raise ValueError(f"PruneSchedule takes one of epochs, every_n_epochs, every_n_steps; got {given}")
        if self.epochs is not None:
            if not self.epochs or any((not isinstance(e, int)) or e < 0 for e in self.epochs):
                raise ValueError(f"epochs={self.epochs!r} is not valid; give epoch indices >= 0, e.g. [0, 2]")
            self.epochs = sorted(set(self.epochs))
        for name in ("every_n_epochs", "every_n_steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"{name}={v!r} is not valid; use a positive integer")

    @property
    def prunes_at_start(self) -> bool:
        if self.epochs is not None:
            return 0 in self.epochs
        return self.at_start

    def before_epoch(self, epoch: int) -> bool:
        """True if a stage is due before epoch `epoch` (> 0)."""
        if self.epochs is not None:
            return epoch in self.epochs
        return self.every_n_epochs is not None and epoch % self.every_n_epochs == 0

    def at_step(self, step: int) -> bool:
        """True if a stage is due after optimizer step `step` (> 0)."""
        return self.every_n_steps is not None and step % self.every_n_steps == 0

    def boundaries(self, max_steps: int, steps_per_epoch: int, from_step: int = 0) -> int:
        """How many stage boundaries a run of `max_steps` optimizer steps (`steps_per_epoch` per epoch) reaches from
        step `from_step` on (the start counts when `from_step` is 0 and the schedule prunes at the start)."""
        n = 1 if from_step == 0 and self.prunes_at_start else 0
        if self.every_n_steps is not None:
            return n + sum(1 for s in range(self.every_n_steps, max_steps, self.every_n_steps) if s > from_step)
        per_epoch = max(1, steps_per_epoch)
        epochs = range(1, -(-max_steps // per_epoch))  # boundaries before epochs 1 .. last, all inside the run
        return n + sum(1 for e in epochs if e * per_epoch > from_step and self.before_epoch(e))


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _raw_optimizer(opt: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer under accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    while opt is not None and hasattr(opt, "optimizer") and not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() and \
        torch.distributed.get_world_size() > 1


def _is_main() -> bool:
    return not _distributed() or torch.distributed.get_rank() == 0


def carry_optimizer_state(old_state: Mapping[nn.Parameter, dict], optimizer: torch.optim.Optimizer) -> int:
    """Give `optimizer` the state of every parameter it holds that `old_state` knows with matching shapes.

    Parameters are matched by identity (surgery keeps the objects of everything it does not cut), and a state is only
    taken when each of its non-scalar tensors has the parameter's shape. Returns the number of parameters carried."""
    carried = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = old_state.get(p)
            if not st:
                continue
            if all(not torch.is_tensor(v) or v.dim() == 0 or v.shape == p.shape for v in st.values()):
                optimizer.state[p] = st
                carried += 1
    return carried


DEEPSPEED_REFUSAL = (
    "DeepSpeed is not supported: ZeRO keeps the optimizer state in the engine's flat fp32 partitions, not per "
    "parameter, so the state of the parameters that survive a stage cannot be carried by name; and resuming from the "
    "stage checkpoint goes through deepspeed_load_checkpoint, which needs a ZeRO checkpoint (global_step*/ "
    "partitions) of the pruned model that only a new engine could write. Shard with FSDP2 instead (accelerate config "
    "fsdp_version: 2, e.g. recipes/configs/accelerate_fsdp2.yaml), or use DDP / a single process"
)


def _fsdp_plugin(trainer: Trainer) -> Any:
    return getattr(trainer.accelerator.state, "fsdp_plugin", None) if getattr(trainer, "is_fsdp_enabled", False) \
        else None


def _fsdp2_run(trainer: Trainer) -> bool:
    plugin = _fsdp_plugin(trainer)
    return is_fsdp2(trainer.model) or (plugin is not None and getattr(plugin, "fsdp_version", 1) == 2)


def sharding_problem(trainer: Trainer, method: PruningMethod, distillation: Any = None) -> str | None:
    """Why a sharded (FSDP / DeepSpeed) run cannot be pruned between its stages (None when it can, or is not
    sharded)."""
    if getattr(trainer, "is_deepspeed_enabled", False):
        return DEEPSPEED_REFUSAL
    plugin = _fsdp_plugin(trainer)
    if plugin is None:
        return None
    version = getattr(plugin, "fsdp_version", 1)
    if version != 2:
        return (f"fsdp_version={version}: FSDP1 flattens the parameters into FlatParameters whose optimizer state "
                "cannot be carried across a shape change; set fsdp_version: 2 (recipes/configs/accelerate_fsdp2.yaml)")
    kind = getattr(getattr(plugin, "state_dict_type", None), "name", str(getattr(plugin, "state_dict_type", None)))
    if kind != "FULL_STATE_DICT":
        return (f"fsdp_state_dict_type={kind}: the stage checkpoint of the pruned model is written from the gathered "
                "copy as a full state dict, which the next train() can only load with "
                "fsdp_state_dict_type: FULL_STATE_DICT")
    if type(method).finalize is not PruningMethod.finalize:
        return (f"{method.name} restores an invariant after training (finalize), which needs the whole model; under "
                "FSDP2 prune it with DDP or a single process, or run hf_prune.pipeline.finalize on the gathered "
                "model yourself")
    if distillation is not None:
        return ("distillation under FSDP: the teacher is a full, unsharded copy on every GPU, and with "
                "fsdp_cpu_ram_efficient_loading the other ranks' copies hold no weights (transformers loads them on "
                "the meta device); recover without distillation (recipes: --kd_alpha 0) or with DDP")
    return None


def _fingerprint(model: nn.Module) -> dict[str, Any]:
    params = list(model.parameters())
    return {
        "widths": layer_widths(model),
        "num_parameters": sum(p.numel() for p in params),
        "checksum": float(sum(p.detach().double().sum() for p in params)),
    }


def _read_records(checkpoint: str | os.PathLike) -> list[dict]:
    path = Path(checkpoint) / "trainer_state.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; resume from a Trainer checkpoint or a {STAGE_PREFIX}* dir")
    history = json.loads(path.read_text()).get("log_history", [])
    return [h for h in history if STAGE_KEY in h]


def load_for_resume(checkpoint: str | os.PathLike, **from_pretrained_kwargs: Any) -> nn.Module:
    """The model a checkpoint written during pruning was trained as, ready for `resume_from_checkpoint`.

    Full fine-tuning: `AutoModelForCausalLM.from_pretrained(checkpoint)` (its config has the reduced architecture).
    LoRA: the merged, pruned base named by the adapter's `base_model_name_or_path`, with the adapter loaded trainable.
    """
    ckpt = Path(checkpoint)
    if (ckpt / "adapter_config.json").is_file():
        from peft import PeftConfig, PeftModel

        peft_cfg = PeftConfig.from_pretrained(str(ckpt))
        base_path = peft_cfg.base_model_name_or_path
        if not base_path or not Path(base_path).is_dir():
            raise FileNotFoundError(
                f"{ckpt} is a LoRA checkpoint whose base model {base_path!r} is not a local directory; the merged, "
                f"pruned base is written to <output_dir>/{STAGE_PREFIX}<k>/{BASE_MODEL_DIR}"
            )
        base = AutoModelForCausalLM.from_pretrained(base_path, **from_pretrained_kwargs)
        return PeftModel.from_pretrained(base, str(ckpt), is_trainable=True)
    if not (ckpt / "config.json").is_file():
        raise FileNotFoundError(f"{ckpt} holds neither config.json nor adapter_config.json")
    return AutoModelForCausalLM.from_pretrained(str(ckpt), **from_pretrained_kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# the callback
# ---------------------------------------------------------------------------------------------------------------------


class PruneCallback(TrainerCallback):
    """Stops the Trainer at each stage boundary of `schedule`; `prune_and_train` prunes and resumes.

    Args:
        method: a hf_prune.methods PruningMethod; its `stages` stages are run, stage k at the k-th boundary.
        calibration: token blocks, a (n_samples, seq_len) LongTensor, or a list of batch dicts with `input_ids` (and
            optionally `attention_mask`), used to score the model at every stage.
        schedule: when to prune (default: before every epoch, starting before the first).
        calibration_batch_size: rows per scoring batch when `calibration` is a tensor.
        distillation: a DistillationLoss to install as the Trainer's `compute_loss_func`.
        export_dir: when set (or when `push_to_hub` is), `prune_and_train` ends by writing the final model with
            `hf_prune.export.save` into this folder (default `<output_dir>/export`): weights in the reduced format,
            tokenizer, the plan of all stages composed into original indices, `hf_prune.json` and the model card.
            A LoRA model is merged first (afterwards `trainer.model` is the merged model).
        push_to_hub: a Hub repo id; after the local export, the folder is uploaded with `hf_prune.export.push`
            (create repo, upload folder; the token comes from the login / HF_TOKEN and is written nowhere).
        hub_private, hub_revision: the repo's visibility when it is created, and the branch to push to.
        metadata: an `ExportMetadata` (or dict) with what the card should say beyond what the callback records
            (base model id and licence, recovery data, evaluations, the command); EvalCallback records are added
            when an EvalCallback is among the trainer's callbacks.
        compact_zeros: in the export, after the merge and `method.finalize`, store the projections without their
            zero rows and columns (`hf_prune.compact_zeros`: same outputs, fewer parameters; for LLM Surgeon's
            q/k rows and residual-stream columns). Afterwards `trainer.model` is the compacted model, which PEFT no
            longer wraps.
    """

    def __init__(
        self,
        method: PruningMethod,
        calibration: torch.Tensor | Sequence[Mapping[str, torch.Tensor]],
        schedule: PruneSchedule | None = None,
        *,
        calibration_batch_size: int = 8,
        distillation: DistillationLoss | None = None,
        export_dir: str | os.PathLike | None = None,
        push_to_hub: str | None = None,
        hub_private: bool = False,
        hub_revision: str | None = None,
        metadata: Any = None,
        compact_zeros: bool = False,
        strict: bool = False,
    ):
        if not isinstance(method, PruningMethod):
            raise TypeError(f"method must be a hf_prune PruningMethod (e.g. ShortGPT(n_remove=2)), got {type(method)}")
        if isinstance(calibration, torch.Tensor):
            self.calibration = make_batches(calibration, calibration_batch_size)
        else:
            self.calibration = list(calibration)
            if not self.calibration or not all(isinstance(b, Mapping) and "input_ids" in b for b in self.calibration):
                raise ValueError("calibration must be a (n, seq_len) tensor or a non-empty list of dicts with input_ids")
        self.method = method
        self.schedule = schedule or PruneSchedule()
        self.distillation = distillation
        self.trainer: Trainer | None = None
        self.stages_done = 0
        self.kept_original: list[int] | None = None  # original index of every current decoder layer
        self._driver_active = False
        self._in_loop = False  # pruning inside a direct trainer.train() call (single process)
        self._stop_requested = False
        self._fast_forward_scheduler = False
        self._pending_logs: list[dict] = []
        self._pending_optimizer_state: list[Any] | None = None  # sharded runs: carried state for the next train()
        self._scoring_device: torch.device | None = None  # sharded runs: where layer-by-layer scoring runs
        self.export_dir = export_dir
        self.push_to_hub = push_to_hub
        self.hub_private = hub_private
        self.hub_revision = hub_revision
        self.metadata = metadata
        self.compact_zeros = compact_zeros
        self.strict = strict
        self.plan: PrunePlan | None = None  # every stage so far, composed, in the original model's indices
        self.stage_plans: list[PrunePlan] = []  # each stage's plan (in this process; not restored on resume)
        self.before = None  # ModelStats of the model before the first stage

    # ----- state ---------------------------------------------------------------------------------------------------
    @property
    def stages_left(self) -> int:
        return self.method.stages - self.stages_done

    def check_schedule(self, max_steps: int, steps_per_epoch: int, from_step: int = 0) -> None:
        """Refuse, before any training or pruning, a schedule whose boundaries cannot hold the method's stages."""
        if max_steps <= 0 or self.stages_left <= 0:
            return
        reachable = self.schedule.boundaries(max_steps, steps_per_epoch, from_step)
        if reachable < self.stages_left:
            raise ValueError(
                f"{self.method.name} needs {self.stages_left} more pruning stage(s) but {self.schedule} reaches only "
                f"{reachable} boundary(ies) in this run ({max_steps} optimizer steps, {steps_per_epoch} per epoch, "
                f"from step {from_step}); train longer, prune more often (e.g. PruneSchedule(every_n_steps="
                f"{max(1, max_steps // max(1, self.stages_left))})) or configure fewer stages"
            )

    def report_missing_stages(self, trainer: Trainer) -> None:
        """At the real end of training: fewer stages than configured is said loudly (log, Trainer logs and state;
        an error with strict=True)."""
        if self.stages_left <= 0:
            return
        msg = (f"training ended after {self.stages_done} of {self.method.stages} pruning stages of "
               f"{self.method.name}: the model is pruned less than configured")
        logger.warning(msg)
        trainer.state.prune_stages_missing = self.stages_left  # saved with trainer_state.json
        if _is_main():
            trainer.log({"prune/stages_done": self.stages_done, "prune/stages_missing": self.stages_left})
        if self.strict:
            raise RuntimeError(msg + " (strict=True)")

    def bind(self, trainer: Trainer, own_optimizer_check: bool = True) -> None:
        """Check that `trainer` can be pruned between stages, and install the distillation loss."""
        problem = sharding_problem(trainer, self.method, self.distillation)
        if problem is not None:
            raise ValueError(f"PruneCallback cannot prune this run: {problem}")
        if trainer.args.load_best_model_at_end:
            raise ValueError(
                "load_best_model_at_end=True cannot be used with PruneCallback: the best checkpoint may hold an "
                "architecture from before a pruning stage; evaluate and select after training instead"
            )
        if own_optimizer_check and self.trainer is not trainer and (
            trainer.optimizer is not None or trainer.lr_scheduler is not None
        ):
            raise ValueError(
                "PruneCallback rebuilds the optimizer and LR scheduler after every stage with trainer.create_optimizer()"
                "; pass the optimizer through TrainingArguments(optim=...) or optimizer_cls_and_kwargs instead of "
                "optimizers=(optimizer, scheduler)"
            )
        self.trainer = trainer
        if self.before is None and self.stages_done == 0:
            from hf_prune.export import ModelStats

            self.before = ModelStats.of(trainer.model)
        if self.kept_original is None:
            self.kept_original = list(range(get_adapter(trainer.model).num_layers))
        if self.distillation is not None:
            trainer.compute_loss_func = self.distillation
            self.distillation.attach(trainer.model)

    def restore(self, checkpoint: str | os.PathLike) -> None:
        """Read how many stages a checkpoint's run had done (from its log history)."""
        records = _read_records(checkpoint)
        self.stages_done = len(records)
        if records and "prune/kept_original_layers" in records[-1]:
            self.kept_original = json.loads(records[-1]["prune/kept_original_layers"])
        n = get_adapter(self.trainer.model).num_layers
        if self.kept_original is not None and len(self.kept_original) != n:
            raise ValueError(
                f"checkpoint {checkpoint} was written with {len(self.kept_original)} decoder layers but the trainer's "
                f"model has {n}; build the model with hf_prune.callbacks.load_for_resume({str(checkpoint)!r})"
            )
        composed = [Path(checkpoint) / COMPOSED_PLAN, *sorted(Path(checkpoint).parent.glob(f"{STAGE_PREFIX}*/{COMPOSED_PLAN}"))]
        for path in composed:  # the checkpoint's own, else the newest stage directory's that matches the stage count
            if path.is_file():
                plan = PrunePlan.from_json(path.read_text(encoding="utf-8"))
                if len(plan.provenance.get("stages", [])) == self.stages_done or path == composed[0]:
                    self.plan = plan
                    break
        for path in (Path(checkpoint) / METHOD_STATE,
                     Path(checkpoint).parent / f"{STAGE_PREFIX}{self.stages_done}" / METHOD_STATE):
            if self.stages_done and path.is_file():  # the method's state after the checkpoint's last stage
                self.method.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
                break
        if not (Path(checkpoint) / "scheduler.pt").is_file():
            self._fast_forward_scheduler = True

    # ----- Trainer events ------------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if not self._driver_active:
            self._begin_in_loop(state)
            return
        self._in_loop = False
        self._stop_requested = False
        if self._pending_optimizer_state is not None:  # a sharded stage: the optimizer now holds the new shards
            carried = load_optimizer_state(self.trainer.model, _raw_optimizer(self.trainer.optimizer),
                                           self._pending_optimizer_state[0])
            self._pending_optimizer_state = None
            if _is_main():
                logger.info("sharded prune: optimizer state of %d parameter(s) re-sharded into the new optimizer",
                            carried)
        plateau = isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)  # steps on metrics only
        if self._fast_forward_scheduler and lr_scheduler is not None and not plateau:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
                for _ in range(state.global_step):
                    lr_scheduler.step()
        self._fast_forward_scheduler = False
        while self._pending_logs:
            self.trainer.log(self._pending_logs.pop(0))

    def on_train_end(self, args, state, control, **kwargs):
        if self._stop_requested or self.trainer is None:
            return  # a stage boundary: the next stage's plan() sees the model as training left it
        model = self.trainer.model
        if _is_peft(model):  # the adapter still has to be merged: export() or the user calls finalize afterwards
            if self.stages_done and type(self.method).finalize is not PruningMethod.finalize and _is_main():
                logger.info("after merging the LoRA adapter, call `hf_prune.pipeline.finalize(model, "
                            "callback.method)` (%s restores what training must not change, e.g. pruned zeros); "
                            "export() does it", self.method.name)
        else:
            finalize(model, self.method)
        if self._in_loop:
            self.report_missing_stages(self.trainer)
        if self._in_loop and (self.export_dir is not None or self.push_to_hub):
            self.export(self.trainer)

    def _request_stage(self, state, control) -> None:
        if self.stages_left <= 0 or state.global_step >= state.max_steps:
            return
        if self._in_loop:
            self.run_stage_in_loop(self.trainer, state)
            return
        control.should_training_stop = True
        control.should_save = False  # the stage checkpoint, written after pruning, replaces this one
        self._stop_requested = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.schedule.at_step(state.global_step):
            self._request_stage(state, control)

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self._in_loop and self._stop_requested:
            control.should_save = False
            return
        # a whole epoch ended (not a loop stopped mid-epoch, e.g. by early stopping) and a stage is due before the next
        epoch = round(state.epoch) if state.epoch is not None else 0
        if epoch >= 1 and abs(state.epoch - epoch) < 1e-6 and self.schedule.before_epoch(epoch):
            self._request_stage(state, control)

    # ----- export ------------------------------------------------------------------------------------------------
    def export(self, trainer: Trainer) -> Path | None:
        """Save the final model with hf_prune.export.save (main process) and push it when `push_to_hub` is set.
        Returns the export folder (None on other ranks)."""
        from hf_prune import export as hf_export

        model = trainer.model
        if is_fsdp2(model):  # the export is written from the gathered model (main process; LoRA merged)
            model = gather_to_main(model).model
            if model is None:
                trainer.accelerator.wait_for_everyone()
                return None
        if _is_peft(model):
            model = trainer.model = model.merge_and_unload()
        finalize(model, self.method)
        if self.compact_zeros:
            from hf_prune.surgery import compact_zeros

            stats = compact_zeros(model)
            if _is_main():
                logger.info("compact_zeros: %d projections, %d parameters removed", stats["linears"],
                            stats["parameters_removed"])
        folder = Path(self.export_dir or os.path.join(trainer.args.output_dir, "export"))
        if not _is_main():
            trainer.accelerator.wait_for_everyone()
            return None
        meta = hf_export.as_metadata(self.metadata)
        meta.method = meta.method or self.method.name
        if not meta.method_config:
            from dataclasses import asdict, is_dataclass

            raw = asdict(self.method) if is_dataclass(self.method) else {}
            meta.method_config = {k: v if _jsonable(v) else repr(v) for k, v in raw.items()}
        meta.before = meta.before or self.before
        if meta.calibration is None:
            ids = [b["input_ids"] for b in self.calibration]
            meta.calibration = hf_export.DataRecord(
                name="calibration blocks given to PruneCallback", tokens=int(sum(t.numel() for t in ids)),
                samples=int(sum(t.shape[0] for t in ids)), seq_len=int(ids[0].shape[-1]))
        for cb in trainer.callback_handler.callbacks:
            if hasattr(cb, "records") and hasattr(cb, "add_to"):
                cb.add_to(meta)
        base_model = meta.base_model or getattr(getattr(model, "config", None), "_name_or_path", None)
        plan = self.plan
        if plan is None or plan.is_empty:
            plan = PrunePlan(provenance={"method": self.method.name, "note": "per-stage plans are in the stage "
                                         "checkpoints (slicing plans do not compose)"})
        meta.base_model = base_model if base_model and not os.path.isdir(str(base_model)) else meta.base_model
        hf_export.save(model, trainer.processing_class, folder, plan, meta, repo_id=self.push_to_hub)
        if self.push_to_hub:
            hf_export.push(folder, self.push_to_hub, private=self.hub_private, revision=self.hub_revision)
        trainer.accelerator.wait_for_everyone()
        return folder

    # ----- one stage -----------------------------------------------------------------------------------------------
    def _planner(self, model: nn.Module, batches: Sequence[Mapping[str, torch.Tensor]], stage: int) -> PrunePlan:
        """The plan for `stage`, computed on the main process and broadcast to every rank (`run_stage`'s planner)."""
        if self.method.runs_on_every_rank or not _distributed():
            # the plan comes with weight changes every rank must make itself (or there is one process)
            return self.method.plan(model, batches, stage)
        payload: list[Any] = [None]
        if _is_main():
            try:
                payload = [self.method.plan(model, batches, stage).to_json()]
            except Exception as e:  # tell the other ranks instead of leaving them in the collective
                if not _distributed():
                    raise
                payload = [{"error": f"{type(e).__name__}: {e}"}]
                torch.distributed.broadcast_object_list(payload, src=0)
                raise
        if _distributed():
            torch.distributed.broadcast_object_list(payload, src=0)
        if isinstance(payload[0], dict):
            raise RuntimeError(f"scoring failed on the main process: {payload[0]['error']}")
        return PrunePlan.from_json(payload[0])

    def _verify_ranks(self, model: nn.Module) -> None:
        if not _distributed():
            return
        mine = _fingerprint(model)
        everyone: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, mine)
        if any(f["widths"] != mine["widths"] or f["num_parameters"] != mine["num_parameters"] for f in everyone):
            raise RuntimeError(f"ranks disagree on the pruned architecture: {everyone}")
        if any(f["checksum"] != mine["checksum"] for f in everyone):
            logger.warning("weights differ across ranks after pruning (checksums %s)", [f["checksum"] for f in everyone])

    # ----- single process: pruning inside trainer.train() -------------------------------------------------------
    def _in_loop_problem(self, trainer: Trainer | None) -> str | None:
        """Why pruning inside this train() call cannot work (None when it can)."""
        if trainer is None:
            return "the Trainer running this callback was not found (call callback.bind(trainer) before train())"
        if trainer.args.world_size > 1 or _distributed():
            return (f"the run has {trainer.args.world_size} processes: the DDP wrapper is a local variable of the "
                    "training loop and cannot be rebuilt inside it")
        if _is_peft(trainer.model):
            return "the model is a PEFT model: the LoRA adapter must be merged, and a new one attached, between train() calls"
        if trainer.model_wrapped is not trainer.model:
            return (f"the model is wrapped ({type(trainer.model_wrapped).__name__}, e.g. torch.compile or "
                    "DataParallel) and the wrapper cannot be rebuilt inside the loop")
        return None

    def _begin_in_loop(self, state) -> None:
        """`trainer.train()` was called directly: prune inside this loop (one process, full fine-tuning)."""
        trainer = self.trainer or _calling_trainer()
        problem = self._in_loop_problem(trainer)
        if problem is not None:
            raise RuntimeError(
                f"PruneCallback cannot prune inside trainer.train() here: {problem}. Run training with "
                "hf_prune.callbacks.prune_and_train(trainer), which prunes between train() calls and handles DDP and "
                "LoRA."
            )
        if trainer.args.resume_from_checkpoint or state.global_step > 0:
            logger.warning("PruneCallback inside trainer.train(): resuming a pruned run needs load_for_resume and "
                           "prune_and_train(trainer, resume_from_checkpoint=...)")
        self._in_loop = True
        self.bind(trainer, own_optimizer_check=False)
        epochs = max(1, math.ceil(trainer.args.num_train_epochs))
        self.check_schedule(state.max_steps, max(1, state.max_steps // epochs), state.global_step)
        if self.schedule.prunes_at_start and self.stages_done == 0 and self.stages_left > 0:
            self.run_stage_in_loop(trainer, state)

    def run_stage_in_loop(self, trainer: Trainer, state) -> None:
        """Prune `trainer.model` in place during `train()` (one process, no wrapper, no PEFT; HF_NOTES 1.4 A): the
        optimizer is rebuilt with `create_optimizer` (state carried for surviving parameters) and prepared by
        accelerate, the LR scheduler is rebuilt and moved to the global step; the training loop reads both from the
        Trainer at every step, and its local model is the pruned module itself."""
        model = trainer.model
        old_opt = _raw_optimizer(trainer.optimizer)
        old_state = dict(old_opt.state) if old_opt is not None else {}
        plan, record = self._apply_stage(model)
        acc = trainer.accelerator
        acc._optimizers = [o for o in getattr(acc, "_optimizers", []) if o is not trainer.optimizer]
        acc._schedulers = [o for o in getattr(acc, "_schedulers", []) if o is not trainer.lr_scheduler]
        trainer.optimizer, trainer.lr_scheduler = None, None
        trainer.create_optimizer()
        carried = carry_optimizer_state(old_state, _raw_optimizer(trainer.optimizer)) if old_opt is not None else 0
        del old_opt, old_state
        trainer.optimizer = acc.prepare_optimizer(trainer.optimizer)
        trainer.create_scheduler(num_training_steps=state.max_steps)
        plateau = isinstance(trainer.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        if not plateau:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
                for _ in range(state.global_step):
                    trainer.lr_scheduler.step()
        trainer.callback_handler.optimizer = trainer.optimizer
        trainer.callback_handler.lr_scheduler = trainer.lr_scheduler
        if self.distillation is not None:
            self.distillation.attach(model)
        record["prune/optimizer_states_kept"] = carried
        should_log = trainer.control.should_log  # Trainer.log clears it; the step's own loss log must still happen
        trainer.log(record)
        trainer.control.should_log = should_log

    def _apply_stage(self, base: nn.Module) -> tuple[PrunePlan, dict[str, Any]]:
        """Score and prune the bare model `base` by one stage (`hf_prune.pipeline.run_stage`: plan, the plan's
        weight update, surgery); update the stage count, the original-layer map and the composed plan. Returns the
        stage's plan and its log record."""
        record = run_stage(base, self.method, self.calibration, self.stages_done, planner=self._planner)
        self._verify_ranks(base)
        return self._book_stage(record)

    def _book_stage(self, record: StageResult) -> tuple[PrunePlan, dict[str, Any]]:
        """Record a stage that was applied (here, or on the main process of a sharded run): stage count, composed
        plan, original-layer map. Returns the stage's plan and its log record."""
        plan, seconds, before = record.plan, record.plan_seconds, record.parameters_before
        self.stage_plans.append(plan)
        if self.stages_done == 0 or self.plan is not None:
            self.plan = compose(self.plan, record)
        after = record.parameters_after
        dropped = set(plan.drop_layers)
        removed_original = [self.kept_original[i] for i in plan.drop_layers]
        self.kept_original = [j for i, j in enumerate(self.kept_original) if i not in dropped]
        self.stages_done += 1
        if _is_main():
            logger.info(
                "prune stage %d/%d (%s): removed layers %s (original %s), %d -> %d parameters",
                self.stages_done, self.method.stages, self.method.name, plan.drop_layers, removed_original,
                before, after,
            )
        return plan, {
            STAGE_KEY: self.stages_done,
            "prune/method": self.method.name,
            "prune/removed_layers": json.dumps(plan.drop_layers),
            "prune/removed_original_layers": json.dumps(removed_original),
            "prune/kept_original_layers": json.dumps(self.kept_original),
            "prune/num_layers": len(self.kept_original),
            "prune/num_parameters": after,
            "prune/removed_parameters": before - after,
            "prune/scoring_seconds": round(seconds, 3),
        }

    # ----- sharded runs (FSDP2): gather -> prune on the main process -> re-shard -------------------------------
    def _score_gathered(self, gathered) -> dict[str, Any]:
        """On the main process of a sharded run: one stage on the gathered host copy (`hf_prune.pipeline.run_stage`,
        the plan computed here, nothing broadcast inside). A layer-by-layer method runs with everything but the
        decoder layers on the shards' device and moves one layer at a time there; any other method scores on the
        host copy. Returns what the other ranks need to record the stage."""
        model = gathered.model
        batches = self.calibration
        device = self._scoring_device or gathered.device
        need = scoring_memory(model, self.method, batches, device)
        logger.info(need.message())
        place = (scoring_placement(model, device) if is_layerwise(self.method) and device.type != "cpu"
                 else contextlib.nullcontext(model))
        with place:
            record = run_stage(model, self.method, batches, self.stages_done, planner=None)
        return {
            "plan": record.plan.to_json(),
            "resolved": None if record.resolved is None else record.resolved.to_json(),
            "numbers": (record.stage, record.parameters_before, record.parameters_after, record.plan_seconds,
                        record.apply_seconds),
            "method_state": self.method.state_dict(),
            "memory": need,
        }

    def prune_sharded_model(self, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                            full_copies: bool = False, max_host_bytes: int | None = None,
                            scoring_device: torch.device | str | None = None,
                            ) -> tuple[ShardedStage, dict[str, Any]]:
        """Collective (every rank): the next stage of this callback's method on an FSDP2-sharded `model` (or a plain
        one before its first sharding) through `hf_prune.sharded.prune_sharded`: gathered to the main process's
        CPU, scored and pruned there by `run_stage`, the pruned architecture (weights on the main process, or on
        every rank with `full_copies`) and the surviving optimizer state handed back. The Trainer route
        (`prune_and_train` under accelerate's FSDP2) and a hand-written loop call this same function; the caller
        re-shards `stage.model` (the next `train()`, or `hf_prune.sharded.shard_pruned`) and loads
        `stage.optimizer_state` with `hf_prune.sharded.load_optimizer_state`. The optimizer state is dropped, with
        the reason logged, when it does not fit next to the weights in `max_host_bytes` (default: the main
        process's free host memory). `scoring_device`: where a layer-by-layer method runs its one layer at a time
        (default: the device of the model's shards). Returns (stage, log record)."""
        if self.kept_original is None:
            self.kept_original = list(range(get_adapter(model).num_layers))
        self._scoring_device = torch.device(scoring_device) if scoring_device is not None else None
        try:
            stage = prune_sharded(model, optimizer, self._score_gathered, full_copies=full_copies,
                                  max_host_bytes=max_host_bytes, log=logger.info)
        finally:
            self._scoring_device = None
        out = stage.outcome
        resolved = None if out["resolved"] is None else PrunePlan.from_json(out["resolved"])
        record = StageResult(out["numbers"][0], PrunePlan.from_json(out["plan"]), resolved, *out["numbers"][1:])
        if not _is_main() and out["method_state"]:
            self.method.load_state_dict(out["method_state"])
        plan, log_record = self._book_stage(record)
        for step in [*stage.memory, out["memory"]]:
            log_record.update(step.record())
        log_record["prune/optimizer_states_kept"] = stage.carried
        log_record["prune/optimizer_states_dropped"] = sum(stage.dropped.values())
        if stage.optimizer_dropped is not None:
            log_record["prune/optimizer_state_dropped_because"] = stage.optimizer_dropped
        return stage, log_record

    def run_sharded_stage(self, trainer: Trainer, initial: bool = False) -> str | None:
        """`run_stage` for a run under accelerate's FSDP2 plugin: `prune_sharded_model`, then the Trainer gets the
        pruned plain model (a fresh LoRA adapter attached when the run trains one) and no optimizer or scheduler:
        the next `train()` builds the optimizer and shards the smaller model (with `cpu_ram_efficient_loading` the
        main process's weights are broadcast into the shards), and `on_train_begin` loads the carried optimizer
        state into it. The stage checkpoint holds the pruned model as safetensors and as the full state dict
        (`pytorch_model_fsdp.bin`) that the Trainer's FSDP resume loads."""
        plugin = _fsdp_plugin(trainer)
        full_copies = not bool(getattr(plugin, "cpu_ram_efficient_loading", False))
        if full_copies and _is_main():
            logger.warning("fsdp_cpu_ram_efficient_loading is off: every rank receives a full host copy of the pruned "
                           "model before the next train() shards it (set it to true to keep one copy)")
        stage, record = self.prune_sharded_model(trainer.model, _raw_optimizer(trainer.optimizer), full_copies,
                                                 scoring_device=trainer.args.device)
        base = stage.model
        stage_dir = os.path.join(trainer.args.output_dir, f"{STAGE_PREFIX}{self.stages_done}")
        if trainer.args.should_save:
            os.makedirs(stage_dir, exist_ok=True)
            self.stage_plans[-1].save(stage_dir)
            if self.plan is not None:
                Path(stage_dir, COMPOSED_PLAN).write_text(self.plan.to_json(), encoding="utf-8")
            method_state = self.method.state_dict()
            if method_state:
                torch.save(method_state, os.path.join(stage_dir, METHOD_STATE))
        model: nn.Module = base
        if stage.peft_config is not None:
            from peft import get_peft_model

            base_dir = os.path.abspath(os.path.join(stage_dir, BASE_MODEL_DIR))
            if _is_main() and trainer.args.should_save:
                base.save_pretrained(base_dir)
            base.name_or_path = stage.peft_config.base_model_name_or_path = base_dir
            torch.manual_seed(trainer.args.seed + self.stages_done)  # the same fresh adapter on every rank
            model = get_peft_model(base, stage.peft_config)
        trainer.model = trainer.model_wrapped = model
        trainer.accelerator.free_memory()
        trainer.optimizer, trainer.lr_scheduler = None, None
        trainer.callback_handler.model = model
        trainer.callback_handler.optimizer = trainer.callback_handler.lr_scheduler = None
        self._pending_optimizer_state = [stage.optimizer_state]
        if self.distillation is not None:
            self.distillation.attach(model)
        if initial:
            self._pending_logs.append(record)
            trainer.accelerator.wait_for_everyone()
            return None
        trainer.log(record)
        if _is_main() and trainer.args.should_save:
            from accelerate.utils.constants import FSDP_MODEL_NAME

            model.save_pretrained(stage_dir)
            if trainer.processing_class is not None:
                trainer.processing_class.save_pretrained(stage_dir)
            torch.save(model.state_dict(), os.path.join(stage_dir, f"{FSDP_MODEL_NAME}.bin"))
            trainer.state.save_to_json(os.path.join(stage_dir, "trainer_state.json"))
        trainer.accelerator.wait_for_everyone()
        self._fast_forward_scheduler = True
        return stage_dir

    def run_stage(self, trainer: Trainer, initial: bool = False) -> str | None:
        """Prune `trainer.model` by one stage and rebuild what the change invalidated (module docstring, steps 1-6).

        Returns the stage checkpoint to resume from, or None for a stage before any training."""
        model = trainer.model
        if _fsdp2_run(trainer):
            return self.run_sharded_stage(trainer, initial)
        peft_config = None
        if _is_peft(model):
            peft_config = copy.deepcopy(model.peft_config[model.active_adapter])
            base = model.merge_and_unload()
        else:
            base = unwrap_model(model)
        checkpointing = bool(getattr(base, "is_activation_checkpointing", False))
        old_opt = _raw_optimizer(trainer.optimizer)
        old_state = dict(old_opt.state) if old_opt is not None else {}

        plan, record = self._apply_stage(base)

        stage_dir = os.path.join(trainer.args.output_dir, f"{STAGE_PREFIX}{self.stages_done}")
        if trainer.args.should_save:
            os.makedirs(stage_dir, exist_ok=True)
            plan.save(stage_dir)
            if self.plan is not None:
                Path(stage_dir, COMPOSED_PLAN).write_text(self.plan.to_json(), encoding="utf-8")
            state = self.method.state_dict()
            if state:
                torch.save(state, os.path.join(stage_dir, METHOD_STATE))
        if peft_config is not None:
            base_dir = os.path.abspath(os.path.join(stage_dir, BASE_MODEL_DIR))
            if trainer.args.should_save:
                base.save_pretrained(base_dir)
            from peft import get_peft_model

            base.name_or_path = peft_config.base_model_name_or_path = base_dir  # what the adapter is trained on
            trainer.model = get_peft_model(base, peft_config)
        if checkpointing and not getattr(base, "is_activation_checkpointing", True):
            base.activation_checkpointing_enable()
        trainer.model_wrapped = trainer.model

        # optimizer and scheduler: rebuilt over the new parameters, state carried for the survivors
        trainer.accelerator.free_memory()
        trainer.optimizer, trainer.lr_scheduler = None, None
        carried = 0
        if old_opt is not None:
            trainer.create_optimizer()
            carried = carry_optimizer_state(old_state, _raw_optimizer(trainer.optimizer))
        del old_opt, old_state
        trainer.callback_handler.model = trainer.model
        trainer.callback_handler.optimizer = trainer.optimizer
        trainer.callback_handler.lr_scheduler = None
        if self.distillation is not None:
            self.distillation.attach(trainer.model)

        record["prune/optimizer_states_kept"] = carried
        if initial:  # the first train() call creates a fresh TrainerState: log into that one
            self._pending_logs.append(record)
            trainer.accelerator.wait_for_everyone()
            return None
        trainer.log(record)
        trainer.save_model(stage_dir, _internal_call=True)
        if trainer.args.should_save:
            trainer.state.save_to_json(os.path.join(stage_dir, "trainer_state.json"))
        trainer.accelerator.wait_for_everyone()
        self._fast_forward_scheduler = True
        return stage_dir


# ---------------------------------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------------------------------


def _calling_trainer() -> Trainer | None:
    """The Trainer whose training loop is calling this callback: callbacks are not given the Trainer
    (HF_NOTES 1.1), and `trainer.add_callback(PruneCallback(...))` leaves no other way to reach it."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            owner = frame.f_locals.get("self")
            if isinstance(owner, Trainer):
                return owner
            frame = frame.f_back
    finally:
        del frame
    return None


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


def _find_callback(trainer: Trainer) -> PruneCallback:
    found = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, PruneCallback)]
    if len(found) != 1:
        raise ValueError(f"prune_and_train needs exactly one PruneCallback among the trainer's callbacks, found "
                         f"{len(found)}; add it with Trainer(callbacks=[...]) or trainer.add_callback(...)")
    return found[0]


def prune_and_train(trainer: Trainer, resume_from_checkpoint: str | bool | None = None, **train_kwargs: Any):
    """Train with the trainer's PruneCallback: one `trainer.train()` call per recovery stage, pruning in between.

    `resume_from_checkpoint`: a checkpoint written during a pruning run (or True for the last one in output_dir);
    the trainer's model must have been built from it with `load_for_resume`. Returns the last TrainOutput.
    """
    cb = _find_callback(trainer)
    cb.bind(trainer)
    resume = resume_from_checkpoint
    if resume is True:
        resume = get_last_checkpoint(trainer.args.output_dir)
        if resume is None:
            raise ValueError(f"resume_from_checkpoint=True but {trainer.args.output_dir} holds no checkpoint")
    if resume:
        cb.restore(resume)
    else:
        cb.check_schedule(*_training_length(trainer))
        if cb.schedule.prunes_at_start and cb.stages_left > 0:
            cb.run_stage(trainer, initial=True)
    while True:
        cb._driver_active = True
        try:
            output = trainer.train(resume_from_checkpoint=resume or None, **train_kwargs)
        finally:
            cb._driver_active = False
        if not cb._stop_requested:
            break
        cb._stop_requested = False
        resume = cb.run_stage(trainer)
    cb.report_missing_stages(trainer)
    if cb.export_dir is not None or cb.push_to_hub:
        cb.export(trainer)
    return output


def _training_length(trainer: Trainer) -> tuple[int, int]:
    """(optimizer steps of the whole run, optimizer steps per epoch), as `Trainer.train` will count them."""
    args = trainer.args
    per_epoch = max(1, len(trainer.get_train_dataloader()) // max(1, args.gradient_accumulation_steps))
    if args.max_steps and args.max_steps > 0:
        return args.max_steps, per_epoch
    return max(1, math.ceil(args.num_train_epochs * per_epoch)), per_epoch
