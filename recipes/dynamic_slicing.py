"""Dynamic Slicing (or constant SliceGPT) on a causal LM, optionally followed by LoRA recovery.

    accelerate launch recipes/dynamic_slicing.py --config recipes/configs/dynamic_slicing_smollm2.yaml
    python recipes/dynamic_slicing.py --config recipes/configs/dynamic_slicing_smollm2.yaml --method slicegpt

Defaults: the offline SmolLM2-135M-Instruct and the KJV corpus (recipes/recipe_utils.py). The model is rotated and
sliced once (hf_prune.methods.slicegpt), then, with `recovery_tokens > 0`, LoRA adapters on every linear are trained
on a dataset of `recovery_tokens` fresh tokens (epochs, batch size, learning rate: TrainingArguments) and merged.
`output_dir` gets the sliced model and tokenizer (Sliced* config + code files: loads with hf_prune imported or
trust_remote_code=True), its plan `prune_plan.json` and `results.json` (run info, arguments, dense and sliced
evaluation, parameter counts, training log). Slicing rotates the weights on every process identically (same seed,
same calibration blocks), so an `accelerate launch` run slices on each rank and trains with DDP; the main process
evaluates and writes. YAML keys that belong to none of the dataclasses below are `transformers.TrainingArguments`.
"""

from __future__ import annotations

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


@dataclass
class SlicingArguments:
    method: str = field(default="dynamic_slicing", metadata={"help": "dynamic_slicing or slicegpt (constant)."})
    slicing: float = field(default=0.25, metadata={"help": "Average fraction of the residual width removed (SP)."})
    base_slicing: float = field(default=0.1, metadata={"help": "Dynamic Slicing base fraction SB (<= slicing)."})
    basis: str = field(default="auto", metadata={"help": "PCA basis: auto (sublayer where its shortcut matrices leave "
                                                          "the model <= 0.9x dense, else global), sublayer (SliceGPT), "
                                                          "layer or global."})
    head: str = field(default="auto", metadata={"help": "auto (keep tying), tied or untied (SliceGPT's layout)."})
    round_to: int = field(default=8, metadata={"help": "Round widths down to a multiple of this."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Sequences per calibration batch."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the recovery (recovery_tokens > 0)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})


def main(argv: list[str] | None = None) -> dict:
    from hf_prune.data import batches
    from hf_prune.methods import get
    from hf_prune.surgery import apply_slicing, sliced_num_parameters

    run = start_recipe((SlicingArguments,), argv)
    (sargs,) = run.args
    model, tok, data, ev, targs = run.model, run.tok, run.data, run.ev, run.targs
    results = run.report
    results.update({"slicing": vars(sargs), "data": vars(data)})

    options = dict(slicing=sargs.slicing, basis=sargs.basis, head=sargs.head, round_to=sargs.round_to, seed=targs.seed)
    if sargs.method == "dynamic_slicing":
        options["base_slicing"] = sargs.base_slicing
    calib = batches(calibration_blocks(tok, data, targs.seed), sargs.calibration_batch_size)
    plan = get(sargs.method, **options).plan(model, calib)  # rotates `model` in place
    apply_slicing(model, plan)
    results["plan"] = plan.to_dict()
    results["sliced_parameters"] = sliced_num_parameters(model)

    if data.recovery_tokens > 0:
        from peft import LoraConfig, get_peft_model
        from transformers import Trainer, default_data_collator

        peft_model = get_peft_model(
            model, LoraConfig(r=sargs.lora_r, lora_alpha=sargs.lora_alpha, target_modules="all-linear",
                              task_type="CAUSAL_LM")
        )
        trainer = Trainer(model=peft_model, args=targs, train_dataset=recovery_dataset(tok, data, targs.seed),
                          data_collator=default_data_collator, processing_class=tok)
        trainer.train()
        results["log_history"] = trainer.state.log_history
        model = trainer.model.merge_and_unload()

    if targs.should_save:  # the main process (every rank sliced and trained the same model)
        results["sliced"] = evaluate_model(model.eval(), tok, data, ev)
        out = Path(targs.output_dir)
        model.save_pretrained(out)
        tok.save_pretrained(out)
        plan.save(out)
        write_json(out / "results.json", results)
        print({k: results[k] for k in ("dense", "sliced", "sliced_parameters") if k in results})
    return results


if __name__ == "__main__":
    main()
