"""IteRABRe vs ShortGPT on SmolLM2-135M: n of 30 layers removed, the same recovery tokens for both.

Rows: dense; ShortGPT one-shot before recovery; ShortGPT after recovery; IteRABRe (one layer per stage, recovery
between stages). Both recover with the same LoRA + distillation settings on the same number of fresh tokens of the
same corpus. Reports perplexity on an evaluation text, multiple-choice accuracy, the wall time of selection and of
recovery, and the tokens used. Results are rewritten after every measurement, so a partial run still reports.

    python benchmarks/iterabre_vs_shortgpt.py                       # CPU-sized defaults (say so in any report)
    python benchmarks/iterabre_vs_shortgpt.py --total-tokens 2500000 --calibration-samples 32   # the paper's budget
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))

from recipe_utils import (  # noqa: E402
    DataArguments,
    RecoveryArguments,
    calibration_blocks,
    run_info,
    run_prune_recover,
    write_json,
)
from transformers import TrainingArguments  # noqa: E402

from hf_prune import prune  # noqa: E402
from hf_prune.assets import load_smollm2  # noqa: E402
from hf_prune.data import batches, read_texts  # noqa: E402
from hf_prune.evaluate import multiple_choice, perplexity  # noqa: E402
from hf_prune.methods import get  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"


def evaluate(model, tok, args, text) -> dict:
    out = {"params": sum(p.numel() for p in model.parameters())}
    t0 = time.perf_counter()
    out["perplexity"] = perplexity(model, tok, text, window=args.window, max_tokens=args.eval_tokens)
    for task in args.mc_tasks:
        out[Path(task).stem] = multiple_choice(model, tok, task, limit=args.mc_limit)
    out["eval_seconds"] = time.perf_counter() - t0
    accs = [v["acc"] for k, v in out.items() if isinstance(v, dict) and "acc" in v]
    accn = [v["acc_norm"] for k, v in out.items() if isinstance(v, dict) and "acc_norm" in v]
    if accs:
        out["mean_acc"], out["mean_acc_norm"] = sum(accs) / len(accs), sum(accn) / len(accn)
    return out


def add_eval_arguments(ap: argparse.ArgumentParser, eval_tokens: int) -> None:
    """The evaluation flags (text, tokens, window, multiple-choice tasks and limit) shared with iterabre_ablation."""
    ap.add_argument("--eval-text", default=str(SHARED / "wiki_en.txt"))
    ap.add_argument("--eval-tokens", type=int, default=eval_tokens)
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--mc-tasks", nargs="*", default=[str(SHARED / "mc" / f) for f in (
        "goal_step_wikihow_step_inference.json", "social_iqa.json", "cause_and_effect_one_sentence.json")])
    ap.add_argument("--mc-limit", type=int, default=500)


def table(res: dict, tasks: list[str]) -> str:
    names = [Path(t).stem for t in tasks]
    head = "| model | layers | params | ppl | " + " | ".join(f"{n} acc / acc_norm" for n in names) + \
        " | mean acc_norm | selection s | recovery s | recovery tokens |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row, r in res["rows"].items():
        if "eval" not in r:
            continue
        e = r["eval"]
        cells = [row, str(r.get("layers", "")), f"{e['params'] / 1e6:.1f}M", f"{e['perplexity']['perplexity']:.2f}"]
        cells += [f"{e[n]['acc']:.3f} / {e[n]['acc_norm']:.3f}" if n in e else "" for n in names]
        cells += [f"{e.get('mean_acc_norm', float('nan')):.3f}", f"{r.get('selection_seconds', 0):.0f}",
                  f"{r.get('recovery_seconds', 0):.0f}", str(r.get("recovery_tokens", 0))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-remove", type=int, default=6)
    ap.add_argument("--total-tokens", type=int, default=24576, help="Recovery tokens per method (paper: 2.5M).")
    ap.add_argument("--calibration-samples", type=int, default=8, help="Selection batch rows (x seq-len tokens).")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    add_eval_arguments(ap, eval_tokens=16384)
    ap.add_argument("--corpus", default=None, help="Calibration/recovery text (default: the KJV corpus).")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "iterabre_vs_shortgpt"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    res: dict = {"info": run_info(), "args": vars(args), "rows": {}}
    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")

    def save() -> None:
        write_json(out_json, res)
        out_md.write_text(f"# IteRABRe vs ShortGPT (SmolLM2-135M, {args.n_remove} of 30 layers)\n\n"
                          f"Command: `{res['info']['command']}`  \nMachine: {res['info']['machine']}, "
                          f"{res['info']['cpu_count']} CPUs, torch {res['info']['torch']}\n\n"
                          + table(res, args.mc_tasks) + "\n")

    text = read_texts(args.eval_text)
    dense, tok = load_smollm2()
    data = DataArguments(dataset_name=args.corpus, calibration_samples=args.calibration_samples,
                         calibration_seq_len=args.seq_len, recovery_seq_len=args.seq_len)
    rec = RecoveryArguments()

    def targs(name: str) -> TrainingArguments:
        return TrainingArguments(output_dir=f"/tmp/iterabre_bench/{name}", per_device_train_batch_size=args.batch_size,
                                 learning_rate=args.lr, lr_scheduler_type="constant", logging_steps=8,
                                 save_strategy="no", report_to="none", seed=0, disable_tqdm=True)

    res["rows"]["dense"] = {"layers": 30, "eval": evaluate(dense, tok, args, text)}
    save()

    # ShortGPT one-shot, no recovery
    calib = batches(calibration_blocks(tok, data, seed=0), 8)
    m = copy.deepcopy(dense)
    pruned = prune(m, get("shortgpt", n_remove=args.n_remove), calib)
    sel = sum(s.plan_seconds for s in pruned.stages)
    res["rows"]["shortgpt (no recovery)"] = {"layers": 30 - args.n_remove, "removed": pruned.plan.drop_layers,
                                            "selection_seconds": sel, "eval": evaluate(m, tok, args, text)}
    save()
    del m

    for name, method in (("shortgpt + recovery", get("shortgpt", n_remove=args.n_remove)),
                         ("iterabre", get("iterabre", n_remove=args.n_remove, total_tokens=args.total_tokens))):
        m = copy.deepcopy(dense)
        r = run_prune_recover(method, m, tok, data, rec, targs(name.split()[0]), args.total_tokens)
        row = {"layers": 30 - args.n_remove, "removed": r["plan"].drop_layers,
               "stages": r["plan"].provenance["stages"], "selection_seconds": r["selection_seconds"],
               "recovery_seconds": r["recovery_seconds"], "recovery_tokens": r["recovery_tokens"],
               "train_loss": [h["loss"] for h in r["log_history"] if "loss" in h]}
        row["eval"] = evaluate(r["model"], tok, args, text)
        res["rows"][name] = row
        save()
        del m, r
    print(out_md.read_text())


if __name__ == "__main__":
    main()
