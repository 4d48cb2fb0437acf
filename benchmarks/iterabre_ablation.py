"""Why IteRABRe wins or loses against ShortGPT: selection and recovery separated.

Rows (all remove `--n-remove` of SmolLM2's 30 layers, no training unless the row says so):
- `iterabre selection`: IteRABRe's output-similarity choice, one layer per stage, re-scored after each removal, with
  no recovery in between (what the selection alone picks);
- `shortgpt iterative`: ShortGPT's block influence, one layer per stage, re-scored after each removal;
- `drop <layers>`: a fixed set of original layers (e.g. the set the recovered IteRABRe run removed), to compare the
  layer sets independent of training.
Evaluation is the same as benchmarks/iterabre_vs_shortgpt.py (its `evaluate`), so the rows line up with its table.

    python benchmarks/iterabre_ablation.py --drop 3,12,13,14,15,17 --eval-tokens 8192 --mc-limit 500
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from iterabre_vs_shortgpt import add_eval_arguments, evaluate, table  # noqa: E402
from recipe_utils import DataArguments, calibration_blocks, run_info, write_json  # noqa: E402

from hf_prune import PrunePlan, apply, prune  # noqa: E402
from hf_prune.assets import load_smollm2  # noqa: E402
from hf_prune.data import batches, read_texts  # noqa: E402
from hf_prune.methods import get  # noqa: E402


def iterative(method, model, calib) -> tuple[list[int], float]:
    """Run every stage of `method` back to back (no training); return the removed original layers and seconds."""
    t0 = time.perf_counter()
    result = prune(model, method, calib)
    return sorted(result.plan.drop_layers), time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-remove", type=int, default=6)
    ap.add_argument("--rows", default="iterabre,shortgpt_iterative", help="comma list: iterabre, shortgpt_iterative")
    ap.add_argument("--drop", action="append", default=[], help="extra row: comma list of original layers to drop")
    ap.add_argument("--calibration-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    add_eval_arguments(ap, eval_tokens=8192)
    ap.add_argument("--corpus", default=None, help="Calibration text (default: the KJV corpus).")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "iterabre_ablation"))
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    res: dict = {"info": run_info(), "args": vars(args), "rows": {}}
    out_json, out_md = Path(args.out + ".json"), Path(args.out + ".md")

    def save() -> None:
        write_json(out_json, res)
        out_md.write_text(f"# IteRABRe ablation: selection without recovery (SmolLM2-135M, {args.n_remove} of 30 "
                          f"layers)\n\nCommand: `{res['info']['command']}`  \nMachine: {res['info']['machine']}, "
                          f"{res['info']['cpu_count']} CPUs, torch {res['info']['torch']}\n\nNo row is trained. "
                          "`removed` lists original layer indices.\n\n" + table(res, args.mc_tasks) + "\n\n"
                          + "\n".join(f"- {k}: removed {r['removed']}" for k, r in res["rows"].items()) + "\n")

    text = read_texts(args.eval_text)
    dense, tok = load_smollm2()
    data = DataArguments(dataset_name=args.corpus, calibration_samples=args.calibration_samples,
                         calibration_seq_len=args.seq_len)
    calib = batches(calibration_blocks(tok, data, seed=0), 8)
    methods = {"iterabre": lambda: get("iterabre", n_remove=args.n_remove),
               "shortgpt_iterative": lambda: get("shortgpt", n_remove=args.n_remove, per_stage=1)}
    for name in (r for r in args.rows.split(",") if r):
        if name not in methods:
            raise SystemExit(f"--rows: unknown row {name!r}; valid: {', '.join(methods)}")
        m = copy.deepcopy(dense)
        removed, sel = iterative(methods[name](), m, calib)
        label = "iterabre selection (no recovery)" if name == "iterabre" else "shortgpt iterative (no recovery)"
        res["rows"][label] = {"layers": 30 - args.n_remove, "removed": removed, "selection_seconds": sel,
                              "eval": evaluate(m, tok, args, text)}
        save()
        del m
    for spec in args.drop:
        layers = sorted(int(x) for x in spec.split(","))
        m = copy.deepcopy(dense)
        apply(m, PrunePlan(drop_layers=layers))
        res["rows"][f"drop {layers}"] = {"layers": 30 - len(layers), "removed": layers,
                                         "eval": evaluate(m, tok, args, text)}
        save()
        del m


if __name__ == "__main__":
    main()
