"""LLM Surgeon (structured, 2:4 or unstructured) on a causal LM, optionally with recovery training between shots.

    python recipes/llm_surgeon.py --config recipes/configs/llm_surgeon_smollm2.yaml
    python recipes/llm_surgeon.py --config recipes/configs/llm_surgeon_smollm2.yaml --mode 2:4 --target 0.5

Defaults: the offline SmolLM2-135M-Instruct and the KJV corpus (recipes/recipe_utils.py). The method flags are
LLMSurgeon's config fields (`hf_prune.methods.config_fields`, the same names and help as `hf-prune prune --method
llm_surgeon`). With `recovery_tokens: 0` (the paper's setting) the shots run back to back through the stage runner
`hf_prune.prune` (per shot: plan -> the plan's weight update -> surgery; finalize at the end). With recovery tokens
the run is a Trainer with hf_prune.callbacks.PruneCallback (the same runner, one shot per stage) with LoRA recovery
in between, on a dataset of `recovery_tokens` fresh tokens (epochs, batch size, learning rate: TrainingArguments);
LoRA is merged before every shot and at the end, and after each merge the zeros that surgery could not remove (all of
them in 2:4 and unstructured mode) are written back, so the sparsity stays exact. Under `accelerate launch` /
`torchrun` every process computes the shot's curvature and update itself on the same calibration batches and the
callback checks that the ranks agree. In structured mode the zeros that head / channel surgery cannot remove are
then dropped from storage (`compact_zeros`; same outputs, fewer parameters). Writes what every recipe writes:
`<output_dir>/model` (an hf-prune export: weights, tokenizer, prune_plan.json with all shots composed in the dense
model's indices, hf_prune.json, model card), `eval.json` (run info, arguments, dense and pruned evaluation, each
shot's plan) and `train_log.json` (with recovery). `--resume_from_checkpoint` resumes a run with recovery.
Keys of the YAML that belong to none of the dataclasses below are `transformers.TrainingArguments`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_utils import (  # noqa: E402
    calibration_blocks,
    evaluate_model,
    method_arguments,
    recovery_dataset,
    save_outputs,
    start_recipe,
)

from hf_prune.methods.llm_surgeon import LLMSurgeon  # noqa: E402


@dataclass
class SurgeonRecipeArguments:
    """What the recipe adds to LLMSurgeon's own config."""

    calibration_batch_size: int = field(default=2, metadata={"help": "Sequences per K-FAC forward/backward."})
    compact_zeros: bool | None = field(default=None, metadata={
        "help": "At the end, store the projections without their zero rows and columns (hf_prune.compact_zeros: "
                "same outputs, fewer parameters, Pruned* class). None: yes in structured mode, no otherwise."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the recovery between shots."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})


SurgeonArguments = method_arguments(LLMSurgeon)


def main(argv: list[str] | None = None) -> dict:
    from hf_prune import compact_zeros, prune
    from hf_prune.data import batches
    from hf_prune.methods import get
    from hf_prune.pipeline import finalize

    run = start_recipe((SurgeonArguments, SurgeonRecipeArguments), argv)
    margs, rargs = run.args
    model, tok, data, targs = run.model, run.tok, run.data, run.targs
    recover = data.recovery_tokens > 0
    results = run.report
    method = get("llm_surgeon", seed=targs.seed, **dataclasses.asdict(margs))
    results.update({"method": method.to_dict(), "recipe": vars(rargs), "data": vars(data)})
    calib = batches(calibration_blocks(tok, data, targs.seed), rargs.calibration_batch_size)

    trainer = None
    if not recover:
        result = prune(model, method, calib)
        plans, whole = result.plans, result.plan
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
        model = get_peft_model(model, LoraConfig(r=rargs.lora_r, lora_alpha=rargs.lora_alpha, task_type="CAUSAL_LM",
                                                 target_modules="all-linear"))
        callback = PruneCallback(method, calibration=calib,
                                 schedule=PruneSchedule(every_n_steps=total // method.stages))
        trainer = Trainer(model=model, args=targs, train_dataset=train_ds, data_collator=default_data_collator,
                          processing_class=tok, callbacks=[callback])
        prune_and_train(trainer, resume_from_checkpoint=targs.resume_from_checkpoint)
        model = trainer.model.merge_and_unload()
        finalize(model, method)  # the merge filled the zeros surgery could not remove: write them back
        plans, whole = callback.stage_plans, callback.plan

    compact = rargs.compact_zeros if rargs.compact_zeros is not None else method.mode == "structured"
    if compact:
        results["compact_zeros"] = compact_zeros(model)
    results["plans"] = [p.to_dict() for p in plans]  # shot k names structures of the model after shot k - 1
    if targs.should_save:  # the main process
        results["pruned"] = evaluate_model(model.eval(), tok, data, run.ev)
        folder = save_outputs(run, model, whole, method, results,
                              trainer.state.log_history if trainer is not None else None,
                              data.recovery_tokens if recover else 0)
        print({k: results[k] for k in ("dense", "pruned") if k in results}, f"-> {folder}")
    return results


if __name__ == "__main__":
    main()
