"""LLM Surgeon (structured, 2:4 or unstructured) on a causal LM, optionally with recovery training between shots.

    python recipes/llm_surgeon.py --config recipes/configs/llm_surgeon_smollm2.yaml
    python recipes/llm_surgeon.py --config recipes/configs/llm_surgeon_smollm2.yaml --mode 2:4 --target 0.5

Defaults: the offline SmolLM2-135M-Instruct and the KJV corpus (recipes/recipe_utils.py). With `recovery_tokens: 0`
(the paper's setting) the shots run back to back: plan -> weight update -> surgery. With recovery tokens the run
is a Trainer with hf_prune.callbacks.PruneCallback, one shot per stage and LoRA recovery in between (LoRA is merged
before every shot). The pruned model, its plan and results.json go to `output_dir`.
Keys of the YAML that belong to none of the dataclasses below are `transformers.TrainingArguments`.
"""

from __future__ import annotations

import math
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
class SurgeonArguments:
    target: float = field(default=0.2, metadata={"help": "Fraction of the decoder's linear parameters removed."})
    shots: int = field(default=5, metadata={"help": "Shots; curvature recomputed each shot (paper: 40)."})
    mode: str = field(default="structured", metadata={"help": "structured, 2:4 or unstructured."})
    criterion: str = field(default="surgeon", metadata={"help": "surgeon, kobd or magnitude."})
    fisher: str = field(default="empirical", metadata={"help": "empirical or sampled labels."})
    chunk_size: int = field(default=2000, metadata={"help": "Joint solve size of element / 2:4 updates."})
    calibration_batch_size: int = field(default=2, metadata={"help": "Sequences per K-FAC forward/backward."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the recovery between shots."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})


def main(argv: list[str] | None = None) -> None:
    from transformers import HfArgumentParser, TrainingArguments
    from trl import TrlParser

    from hf_prune import apply
    from hf_prune.data import batches
    from hf_prune.methods.llm_surgeon import LLMSurgeon

    sargs, data, ev, rest = TrlParser((SurgeonArguments, DataArguments, EvalArguments)).parse_args_and_config(
        argv, return_remaining_strings=True
    )
    (targs,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(args=rest)
    targs.seed = data.seed
    model, tok = load_model_and_tokenizer(data.model_name_or_path)
    results = {"run": run_info(argv), "surgeon": vars(sargs), "data": vars(data)}
    if ev.eval_dense:
        results["dense"] = evaluate_model(model.eval(), tok, data, ev)
    method = LLMSurgeon(target=sargs.target, shots=sargs.shots, mode=sargs.mode, criterion=sargs.criterion,
                        fisher=sargs.fisher, chunk_size=sargs.chunk_size, seed=data.seed)
    calib = batches(calibration_blocks(tok, data), sargs.calibration_batch_size)

    trainer, plans = None, []
    if data.recovery_tokens <= 0:
        for stage in range(method.stages):
            plans.append(method.plan(model, calib, stage))
            method.update(model)  # the weight update goes in before surgery removes the dead structures
            apply(model, plans[-1])
    else:
        from peft import LoraConfig, get_peft_model
        from transformers import Trainer, default_data_collator

        from hf_prune.callbacks import PruneCallback, PruneSchedule, prune_and_train

        train_ds = recovery_dataset(tok, data)
        model = get_peft_model(model, LoraConfig(r=sargs.lora_r, lora_alpha=sargs.lora_alpha, task_type="CAUSAL_LM",
                                                 target_modules="all-linear"))
        per_step = targs.per_device_train_batch_size * targs.gradient_accumulation_steps * max(1, targs.world_size)
        total = targs.max_steps if targs.max_steps > 0 else math.ceil(len(train_ds) / per_step) * targs.num_train_epochs
        callback = PruneCallback(method, calibration=calib,
                                 schedule=PruneSchedule(every_n_steps=max(1, math.ceil(total / method.stages))))
        trainer = Trainer(model=model, args=targs, train_dataset=train_ds, data_collator=default_data_collator,
                          processing_class=tok, callbacks=[callback])
        prune_and_train(trainer)
        model = trainer.model.merge_and_unload()

    out = Path(targs.output_dir)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    results["plans"] = [p.to_dict() for p in plans]  # stage k names structures of the model after stage k - 1
    results["pruned"] = evaluate_model(model.eval(), tok, data, ev)
    if trainer is not None:
        results["log_history"] = trainer.state.log_history
    write_json(out / "results.json", results)
    print({k: results[k] for k in ("dense", "pruned") if k in results})


if __name__ == "__main__":
    main()
