"""PIP (or its baselines LLM-Pruner / magnitude): prune heads and channels in steps, LoRA recovery in between.

    accelerate launch recipes/pip.py --config recipes/configs/pip_smollm2.yaml
    python recipes/pip.py --config recipes/configs/pip_smollm2.yaml --method llm_pruner --output_dir runs/llmp

`--method` picks pip, llm_pruner or magnitude; the other flags are that method's config fields (with its defaults),
recipes/recipe_utils.py's DataArguments, EvalArguments, RecoveryArguments, and transformers.TrainingArguments
(whose --gradient_checkpointing also turns on activation checkpointing for the scoring passes).
The recovery tokens are split evenly between the method's steps (one prune before each share). Writes
`<output_dir>/model` (merged, pruned model + tokenizer + prune_plan.json: every step composed into the dense model's
indices), `train_log.json` and `eval.json`; the plan of each step alone (in the indices of the model it was applied
to) is in `<output_dir>/prune-stage-<k>/prune_plan.json`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_utils import (  # noqa: E402
    method_name_from_argv,
    RecoveryArguments,
    evaluate_model,
    method_arguments,
    run_prune_recover,
    save_outputs,
    start_recipe,
)

from hf_prune.methods import get  # noqa: E402
from hf_prune.methods.pip import LLMPruner, MagnitudePruning, PIP  # noqa: E402
from hf_prune.surgery import layer_widths  # noqa: E402

METHODS = {"pip": PIP, "llm_pruner": LLMPruner, "magnitude": MagnitudePruning}
# objects, tuples and display switches stay at their defaults; scoring checkpoints activations when training does
# (TrainingArguments owns --gradient_checkpointing)
NOT_FLAGS = ("tokenizer", "perturb_ops", "progress", "gradient_checkpointing")


@dataclasses.dataclass
class MethodChoice:
    method: str = dataclasses.field(default="pip", metadata={"help": f"One of {sorted(METHODS)}."})


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    name = method_name_from_argv(argv, METHODS, "pip")
    recovery_fields = tuple(f.name for f in dataclasses.fields(RecoveryArguments))
    margs_cls = method_arguments(METHODS[name], exclude=recovery_fields + NOT_FLAGS)
    # a shared YAML may carry another method's fields (e.g. PIP's perturbation with --method llm_pruner): skip those
    other = {f.name for cls in METHODS.values() for f in dataclasses.fields(cls)}
    run = start_recipe((MethodChoice, margs_cls, RecoveryArguments), argv, ignore_config_keys=other)
    _, margs, rec = run.args
    data, targs, tok = run.data, run.targs, run.tok

    extra = {"tokenizer": tok} if name == "pip" else {}
    method = get(name, seed=targs.seed, progress=False, gradient_checkpointing=targs.gradient_checkpointing or None,
                 **dataclasses.asdict(margs), **extra)
    report = run.report
    report["method"] = method.config_dict()
    result = run_prune_recover(method, run.model, tok, data, rec, targs, data.recovery_tokens)
    report["pruned_recovered"] = evaluate_model(result["model"].eval(), tok, data, run.ev)
    report["layer_widths"] = layer_widths(result["model"])  # (query heads, kv heads, MLP channels) per layer
    report.update({k: result[k] for k in ("selection_seconds", "recovery_seconds", "recovery_tokens")})
    report["plan"] = result["plan"].to_dict()
    if result["trainer"].accelerator.is_main_process:
        folder = save_outputs(run, result["model"], result["plan"], method, report, result["log_history"],
                              result["recovery_tokens"])
        print(f"pruned model (hf-prune export with plan and card) in {folder}; train_log.json and eval.json in "
              f"{targs.output_dir}")
    result["trainer"].accelerator.wait_for_everyone()
    return report


if __name__ == "__main__":
    main()
