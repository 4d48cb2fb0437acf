"""IteRABRe: remove one layer at a time by output similarity, recovering with LoRA + distillation in between.

    accelerate launch recipes/iterabre.py --config recipes/configs/iterabre_smollm2.yaml
    python recipes/iterabre.py --n_remove 2 --total_tokens 8192 --output_dir runs/try

CLI flags override the YAML. Defaults: the offline SmolLM2-135M-Instruct and the KJV corpus (pip-installable).
Writes `<output_dir>/model` (an hf-prune export: pruned model, tokenizer, prune_plan.json, hf_prune.json, model card),
`train_log.json` and `eval.json`. `--resume_from_checkpoint <output_dir>/prune-stage-k` (or a later checkpoint)
resumes an interrupted run.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_utils import (  # noqa: E402
    RecoveryArguments,
    evaluate_model,
    method_arguments,
    run_prune_recover,
    save_outputs,
    start_recipe,
)

from hf_prune.methods import get  # noqa: E402
from hf_prune.methods.iterabre import IteRABRe  # noqa: E402

METHOD = "iterabre"
METHOD_CLASS = IteRABRe
RECOVERY_FIELDS = tuple(f.name for f in dataclasses.fields(RecoveryArguments))


def main(method_name: str = METHOD, method_cls: type = METHOD_CLASS, argv: list[str] | None = None) -> dict:
    run = start_recipe((method_arguments(method_cls, exclude=RECOVERY_FIELDS), RecoveryArguments), argv)
    margs, rec = run.args
    data, targs = run.data, run.targs
    mcfg = dataclasses.asdict(margs)
    # a method whose config records its recovery choices (IteRABRe) gets them from RecoveryArguments
    known = {f.name for f in dataclasses.fields(method_cls)}
    mcfg.update({k: getattr(rec, k) for k in RECOVERY_FIELDS if k in known})
    method = get(method_name, seed=targs.seed, **mcfg)
    total = getattr(method, "total_tokens", data.recovery_tokens)

    report = run.report
    report.update({"method": method.config_dict(), "recovery_tokens": total})
    result = run_prune_recover(method, run.model, run.tok, data, rec, targs, total)
    report["pruned_recovered"] = evaluate_model(result["model"].eval(), run.tok, data, run.ev)
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
