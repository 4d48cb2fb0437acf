"""Dynamic Slicing (or constant SliceGPT) on a causal LM, optionally followed by LoRA recovery.

    accelerate launch recipes/dynamic_slicing.py --config recipes/configs/dynamic_slicing_smollm2.yaml
    python recipes/dynamic_slicing.py --config recipes/configs/dynamic_slicing_smollm2.yaml --method slicegpt

Defaults: the offline SmolLM2-135M-Instruct and the KJV corpus (recipes/recipe_utils.py). The method flags are the
method's config fields (`hf_prune.methods.config_fields`: the same names and help as `hf-prune prune`). The model is
rotated and sliced once through the stage runner `hf_prune.prune`, then, with `recovery_tokens > 0`, LoRA adapters on
every linear are trained on a dataset of `recovery_tokens` fresh tokens (epochs, batch size, learning rate:
TrainingArguments) and merged. Writes what every recipe writes: `<output_dir>/model` (an hf-prune export: the sliced
model with its Sliced* config and code files, tokenizer, prune_plan.json, hf_prune.json, model card), `eval.json`
(run info, arguments, dense and sliced evaluation, parameter counts) and `train_log.json` (with recovery). Slicing
rotates the weights on every process identically (same seed, same calibration blocks), so an `accelerate launch`
run slices on each rank and trains with DDP; the main process evaluates and writes. YAML keys that belong to none
of the dataclasses below are `transformers.TrainingArguments`.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_utils import (  # noqa: E402
    method_name_from_argv,
    calibration_blocks,
    evaluate_model,
    method_arguments,
    recovery_dataset,
    save_outputs,
    start_recipe,
)

from hf_prune.methods import method_class  # noqa: E402

METHODS = ("dynamic_slicing", "slicegpt")


@dataclass
class SlicingRecipeArguments:
    """What the recipe adds to the method's own config."""

    method: str = field(default="dynamic_slicing", metadata={"help": f"One of {METHODS} (slicegpt: constant)."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Sequences per calibration batch."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the recovery (recovery_tokens > 0)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})


def main(argv: list[str] | None = None) -> dict:
    from hf_prune import prune
    from hf_prune.data import batches
    from hf_prune.methods import get
    from hf_prune.surgery import sliced_num_parameters

    argv = list(sys.argv[1:] if argv is None else argv)
    name = method_name_from_argv(argv, METHODS, "dynamic_slicing")
    other = {f.name for m in METHODS for f in dataclasses.fields(method_class(m))}  # a shared YAML's other fields
    run = start_recipe((method_arguments(method_class(name)), SlicingRecipeArguments), argv,
                       ignore_config_keys=other)
    margs, rargs = run.args
    model, tok, data, targs = run.model, run.tok, run.data, run.targs
    results = run.report
    method = get(name, seed=targs.seed, **dataclasses.asdict(margs))
    results.update({"method": method.to_dict(), "recipe": vars(rargs), "data": vars(data)})
    calib = batches(calibration_blocks(tok, data, targs.seed), rargs.calibration_batch_size)
    plan = prune(model, method, calib).plan  # rotates and slices `model` in place
    results["plan"] = plan.to_dict()
    results["sliced_parameters"] = sliced_num_parameters(model)

    log_history = None
    if data.recovery_tokens > 0:
        from peft import LoraConfig, get_peft_model
        from transformers import Trainer, default_data_collator

        peft_model = get_peft_model(
            model, LoraConfig(r=rargs.lora_r, lora_alpha=rargs.lora_alpha, target_modules="all-linear",
                              task_type="CAUSAL_LM")
        )
        trainer = Trainer(model=peft_model, args=targs, train_dataset=recovery_dataset(tok, data, targs.seed),
                          data_collator=default_data_collator, processing_class=tok)
        trainer.train(resume_from_checkpoint=targs.resume_from_checkpoint)
        log_history = trainer.state.log_history
        model = trainer.model.merge_and_unload()

    if targs.should_save:  # the main process (every rank sliced and trained the same model)
        results["sliced"] = evaluate_model(model.eval(), tok, data, run.ev)
        results["pruned"] = results["sliced"]
        folder = save_outputs(run, model, plan, method, results, log_history, data.recovery_tokens)
        print({k: results[k] for k in ("dense", "sliced", "sliced_parameters") if k in results}, f"-> {folder}")
    return results


if __name__ == "__main__":
    main()
