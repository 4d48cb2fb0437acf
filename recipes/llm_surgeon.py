"""LLM Surgeon (structured, 2:4 or unstructured) on a causal LM, optionally with recovery training between shots.

    python recipes/llm_surgeon.py --config recipes/configs/llm_surgeon_smollm2.yaml
    python recipes/llm_surgeon.py --config recipes/configs/llm_surgeon_smollm2.yaml --mode 2:4 --target 0.5

Defaults: the offline SmolLM2-135M-Instruct and the KJV corpus (recipes/recipe_utils.py). With `recovery_tokens: 0`
(the paper's setting) the shots run back to back: plan -> weight update -> surgery. With recovery tokens the run is a
Trainer with hf_prune.callbacks.PruneCallback: one shot per stage (plan -> weight update -> surgery) with LoRA recovery
in between, on a dataset of `recovery_tokens` fresh tokens (epochs, batch size, learning rate: TrainingArguments);
LoRA is merged before every shot and at the end, and after each merge the zeros that surgery could not remove (all of
them in 2:4 and unstructured mode) are written back, so the sparsity stays exact. Under `accelerate launch` /
`torchrun` every process computes the shot's curvature and update itself on the same calibration batches and the
callback checks that the ranks agree. In structured mode the zeros that head / channel surgery cannot remove are
then dropped from storage (`compact_zeros`; same outputs, fewer parameters). `output_dir` gets the pruned model and
tokenizer,
`prune_plan.json` (all shots composed, in the dense model's indices) and `results.json` (run info, arguments, dense
and pruned evaluation, each shot's plan, training log).
Keys of the YAML that belong to none of the dataclasses below are `transformers.TrainingArguments`.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_utils import (  # noqa: E402
    calibration_blocks,
    evaluate_model,
    recovery_dataset,
    start_recipe,
    write_json,
)

from hf_prune.methods.llm_surgeon import LLMSurgeon  # noqa: E402
from hf_prune.plan import PrunePlan  # noqa: E402


@dataclass
class SurgeonArguments:
    target: float = field(default=0.2, metadata={"help": "Fraction of the decoder's linear parameters removed."})
    shots: int = field(default=5, metadata={"help": "Shots; curvature recomputed each shot (paper: 40)."})
    mode: str = field(default="structured", metadata={"help": "structured, 2:4 or unstructured."})
    criterion: str = field(default="surgeon", metadata={"help": "surgeon, kobd or magnitude."})
    fisher: str = field(default="empirical", metadata={"help": "empirical or sampled labels."})
    chunk_size: int = field(default=2000, metadata={"help": "Joint solve size of element / 2:4 updates."})
    damping_g: float | None = field(default=None, metadata={
        "help": "Damping of G relative to its mean diagonal (None: the paper's 0.01 structured, 0.1 otherwise)."})
    damping_a: float | None = field(default=None, metadata={
        "help": "Damping of A relative to its mean diagonal (None: the paper's 0.01)."})
    calibration_batch_size: int = field(default=2, metadata={"help": "Sequences per K-FAC forward/backward."})
    compact_zeros: bool | None = field(default=None, metadata={
        "help": "At the end, store the projections without their zero rows and columns (hf_prune.compact_zeros: "
                "same outputs, fewer parameters, Pruned* class). None: yes in structured mode, no otherwise."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the recovery between shots."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})


class UpdatingSurgeon(LLMSurgeon):
    """LLMSurgeon that keeps every shot's plan in `shot_plans` (PruneCallback runs `plan`, then `update`, then
    surgery for each shot)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.shot_plans: list[PrunePlan] = []

    def plan(self, model, batches, stage: int = 0) -> PrunePlan:
        plan = super().plan(model, batches, stage)
        self.shot_plans.append(plan)
        return plan


def main(argv: list[str] | None = None) -> dict:
    from hf_prune import apply
    from hf_prune.data import batches

    run = start_recipe((SurgeonArguments,), argv)
    (sargs,) = run.args
    model, tok, data, ev, targs = run.model, run.tok, run.data, run.ev, run.targs
    recover = data.recovery_tokens > 0
    results = run.report
    results.update({"surgeon": vars(sargs), "data": vars(data)})
    method = (UpdatingSurgeon if recover else LLMSurgeon)(
        target=sargs.target, shots=sargs.shots, mode=sargs.mode, criterion=sargs.criterion, fisher=sargs.fisher,
        chunk_size=sargs.chunk_size, seed=targs.seed, damping_g=sargs.damping_g,
        **({} if sargs.damping_a is None else {"damping_a": sargs.damping_a}))
    calib = batches(calibration_blocks(tok, data, targs.seed), sargs.calibration_batch_size)

    trainer, plans, whole = None, [], None
    if not recover:
        for stage in range(method.stages):
            plans.append(method.plan(model, calib, stage))
            method.update(model)  # the weight update goes in before surgery removes the dead structures
            resolved = plans[-1].resolve(model)
            whole = resolved if whole is None else whole.then(resolved)
            apply(model, plans[-1])
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import Trainer, default_data_collator

        from hf_prune.callbacks import PruneCallback, PruneSchedule, prune_and_train

        train_ds = recovery_dataset(tok, data, targs.seed)
        # optimizer steps as the Trainer counts them; stages at step 0, n, 2n, ... all fall inside the run
        rows = targs.per_device_train_batch_size * max(1, targs.world_size)
        per_epoch = max(1, math.ceil(len(train_ds) / rows) // targs.gradient_accumulation_steps)
        total = targs.max_steps if targs.max_steps > 0 else math.ceil(targs.num_train_epochs * per_epoch)
        if total < method.stages:
            raise ValueError(f"recovery has {total} optimizer steps, fewer than the {method.stages} shots; raise "
                             "recovery_tokens or lower shots")
        model = get_peft_model(model, LoraConfig(r=sargs.lora_r, lora_alpha=sargs.lora_alpha, task_type="CAUSAL_LM",
                                                 target_modules="all-linear"))
        callback = PruneCallback(method, calibration=calib,
                                 schedule=PruneSchedule(every_n_steps=total // method.stages))
        trainer = Trainer(model=model, args=targs, train_dataset=train_ds, data_collator=default_data_collator,
                          processing_class=tok, callbacks=[callback])
        prune_and_train(trainer)
        model = trainer.model.merge_and_unload()
        method.finalize(model)  # the merge filled the zeros surgery could not remove: write them back
        plans, whole = method.shot_plans, callback.plan

    compact = sargs.compact_zeros if sargs.compact_zeros is not None else sargs.mode == "structured"
    if compact:
        from hf_prune import compact_zeros

        results["compact_zeros"] = compact_zeros(model)
    results["plans"] = [p.to_dict() for p in plans]  # shot k names structures of the model after shot k - 1
    if trainer is not None:
        results["log_history"] = trainer.state.log_history
    if targs.should_save:  # the main process
        results["pruned"] = evaluate_model(model.eval(), tok, data, ev)
        out = Path(targs.output_dir)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        whole.save(out)
        write_json(out / "results.json", results)
        print({k: results[k] for k in ("dense", "pruned") if k in results})
    return results


if __name__ == "__main__":
    main()
