"""IteRABRe: remove one layer at a time by output similarity, recovering with LoRA + distillation in between.

    accelerate launch recipes/iterabre.py --config recipes/configs/iterabre_smollm2.yaml
    python recipes/iterabre.py --n_remove 2 --total_tokens 8192 --output_dir runs/try

CLI flags override the YAML. Defaults: the offline SmolLM2-135M-Instruct and the KJV corpus (pip-installable).
Writes `<output_dir>/model` (pruned model, tokenizer, prune_plan.json), `train_log.json` and `eval.json`.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from recipe_utils import (  # noqa: E402
    DataArguments,
    EvalArguments,
    RecoveryArguments,
    evaluate_model,
    load_model_and_tokenizer,
    method_arguments,
    run_info,
    run_prune_recover,
    save_outputs,
)
from transformers import TrainingArguments  # noqa: E402
from trl import TrlParser  # noqa: E402

from hf_prune.methods import get  # noqa: E402
from hf_prune.methods.iterabre import IteRABRe  # noqa: E402

METHOD = "iterabre"
METHOD_CLASS = IteRABRe
RECOVERY_FIELDS = tuple(f.name for f in dataclasses.fields(RecoveryArguments))


def main(method_name: str = METHOD, method_cls: type = METHOD_CLASS, argv: list[str] | None = None) -> dict:
    parser = TrlParser((method_arguments(method_cls, exclude=RECOVERY_FIELDS), DataArguments, EvalArguments, RecoveryArguments,
                        TrainingArguments))
    margs, data, ev, rec, targs = parser.parse_args_and_config(argv)
    mcfg = dataclasses.asdict(margs)
    # a method whose config records its recovery choices (IteRABRe) gets them from RecoveryArguments
    known = {f.name for f in dataclasses.fields(method_cls)}
    mcfg.update({k: getattr(rec, k) for k in RECOVERY_FIELDS if k in known})
    method = get(method_name, seed=targs.seed, **mcfg)
    total = getattr(method, "total_tokens", data.recovery_tokens)

    model, tok = load_model_and_tokenizer(data.model_name_or_path)
    report: dict = {"info": run_info(), "method": method.config_dict(), "recovery_tokens": total}
    if ev.eval_dense:
        report["dense"] = evaluate_model(model, tok, data, ev)
    result = run_prune_recover(method, model, tok, data, rec, targs, total)
    report["pruned_recovered"] = evaluate_model(result["model"], tok, data, ev)
    report.update({k: result[k] for k in ("selection_seconds", "recovery_seconds", "recovery_tokens")})
    report["plan"] = result["plan"].to_dict()
    if result["trainer"].accelerator.is_main_process:
        save_outputs(targs.output_dir, result, tok, report)
        print(f"pruned model, plan, train_log.json and eval.json written to {targs.output_dir}")
    result["trainer"].accelerator.wait_for_everyone()
    return report


if __name__ == "__main__":
    main()
