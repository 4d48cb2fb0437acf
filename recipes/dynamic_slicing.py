"""Dynamic Slicing (or constant SliceGPT) on a causal LM, optionally followed by LoRA recovery.

    accelerate launch recipes/dynamic_slicing.py --config recipes/configs/dynamic_slicing_smollm2.yaml
    python recipes/dynamic_slicing.py --config recipes/configs/dynamic_slicing_smollm2.yaml --method slicegpt

Defaults: the offline SmolLM2-135M-Instruct and the KJV corpus (recipes/recipe_utils.py). The model is rotated and
sliced once (hf_prune.methods.slicegpt), then, with `recovery_tokens > 0`, LoRA adapters on every linear are trained
and merged. The sliced model (Sliced* config + code files: loads with hf_prune installed or trust_remote_code=True),
its plan and results.json go to `output_dir`. Slicing rotates the weights on every process identically (same seed,
same calibration blocks), so an `accelerate launch` run slices on each rank and trains with DDP.
YAML keys that belong to none of the dataclasses below are `transformers.TrainingArguments`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_utils import (  # noqa: E402
    DataArguments,
    EvalArguments,
    calibration_blocks,
    evaluate_model,
    load_model_and_tokenizer,
    recovery_dataset,
    run_info,
    write_json,
)


@dataclass
class SlicingArguments:
    method: str = field(default="dynamic_slicing", metadata={"help": "dynamic_slicing or slicegpt (constant)."})
    slicing: float = field(default=0.25, metadata={"help": "Average fraction of the residual width removed (SP)."})
    base_slicing: float = field(default=0.1, metadata={"help": "Dynamic Slicing base fraction SB (<= slicing)."})
    basis: str = field(default="sublayer", metadata={"help": "PCA basis: sublayer (SliceGPT), layer or global."})
    head: str = field(default="auto", metadata={"help": "auto (keep tying), tied or untied (SliceGPT's layout)."})
    round_to: int = field(default=8, metadata={"help": "Round widths down to a multiple of this."})
    calibration_batch_size: int = field(default=8, metadata={"help": "Sequences per calibration batch."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the recovery (recovery_tokens > 0)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser, TrainingArguments
    from trl import TrlParser

    from hf_prune.data import batches
    from hf_prune.methods import get
    from hf_prune.surgery import apply_slicing, sliced_num_parameters

    sargs, data, ev, rest = TrlParser((SlicingArguments, DataArguments, EvalArguments)).parse_args_and_config(
        argv, return_remaining_strings=True
    )
    (targs,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(args=rest)
    targs.seed = data.seed
    model, tok = load_model_and_tokenizer(data.model_name_or_path)
    results = {"run": run_info(argv), "slicing": vars(sargs), "data": vars(data)}
    if ev.eval_dense:
        results["dense"] = evaluate_model(model.eval(), tok, data, ev)

    options = dict(slicing=sargs.slicing, basis=sargs.basis, head=sargs.head, round_to=sargs.round_to, seed=data.seed)
    if sargs.method == "dynamic_slicing":
        options["base_slicing"] = sargs.base_slicing
    calib = batches(calibration_blocks(tok, data), sargs.calibration_batch_size)
    plan = get(sargs.method, **options).plan(model, calib)
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
        trainer = Trainer(model=peft_model, args=targs, train_dataset=recovery_dataset(tok, data),
                          data_collator=default_data_collator, processing_class=tok)
        trainer.train()
        results["log_history"] = trainer.state.log_history
        model = trainer.model.merge_and_unload()
        if not trainer.accelerator.is_main_process:
            return

    out = Path(targs.output_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    plan.save(out)
    results["sliced"] = evaluate_model(model.eval(), tok, data, ev)
    write_json(out / "results.json", results)
    print({k: results[k] for k in ("dense", "sliced", "sliced_parameters") if k in results})


if __name__ == "__main__":
    main()
