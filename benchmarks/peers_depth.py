"""Depth pruning against its simple peer, in one run: ShortGPT vs the angular-distance block (Gromov et al. 2024,
`angular_block`) vs IteRABRe's selection without recovery, on the offline SmolLM2-135M (n of 30 layers removed).

Every row prunes a fresh copy with `hf_prune.prune` on the same calibration tokens (IteRABRe on the first
--iterabre_samples of them: its selection re-runs the network suffix for every candidate) and is scored by the same
perplexity (`hf_prune.evaluate.perplexity`, first --eval_tokens tokens of --eval_text, non-overlapping --window
windows). Each row runs in its own process, so its peak resident memory (getrusage ru_maxrss, read right after
pruning, before the evaluation) is its own. JSON and Markdown (machine, versions, command, load average) go to
--out.{json,md} after every row.

    nice python benchmarks/peers_depth.py                                    # the issue's setup (slow on a CPU)
    nice python benchmarks/peers_depth.py --calibration_text ../shared/data/austen --calibration_samples 8 \
        --seq_len 256 --eval_tokens 8192 --rows shortgpt,angular_block
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
SHARED = ROOT.parent / "shared" / "data"
ROWS = ("dense", "shortgpt", "angular_block", "iterabre")
LABELS = {"dense": "dense", "shortgpt": "ShortGPT (hf-prune)", "angular_block": "angular block (Gromov et al.)",
          "iterabre": "IteRABRe selection, no recovery"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n_remove", type=int, default=6, help="layers removed by every method")
    p.add_argument("--rows", default=",".join(ROWS[1:]), help=f"comma list of {ROWS[1:]} (dense always runs)")
    p.add_argument("--calibration_text", default=None,
                   help="calibration files/folder (default: the KJV corpus' calibration split, hf_prune.assets)")
    p.add_argument("--calibration_samples", type=int, default=32, help="calibration blocks")
    p.add_argument("--seq_len", type=int, default=1024, help="tokens per calibration block")
    p.add_argument("--batch_size", type=int, default=4, help="calibration batch rows")
    p.add_argument("--iterabre_samples", type=int, default=8, help="first N calibration blocks used by IteRABRe")
    default_eval = SHARED / "wiki_en.txt"
    p.add_argument("--eval_text", default=str(default_eval) if default_eval.is_file() else None,
                   help="perplexity text (default: ../shared/data/wiki_en.txt if present, else the KJV evaluation "
                        "split)")
    p.add_argument("--eval_tokens", type=int, default=32768, help="first N tokens of --eval_text")
    p.add_argument("--window", type=int, default=512, help="perplexity window")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads in every row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers_depth"))
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: run one row, print its JSON
    args = p.parse_args(argv)
    bad = [r for r in args.rows.split(",") if r and r not in ROWS[1:]]
    if bad:
        p.error(f"--rows: unknown {bad}; valid: {', '.join(ROWS[1:])}")
    return args


def peak_rss_gb() -> float:
    """This process's peak resident memory so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def calibration(tok, args: argparse.Namespace) -> list[dict]:
    from hf_prune.assets import default_corpus
    from hf_prune.data import batches, read_texts, token_blocks

    texts = read_texts(args.calibration_text) if args.calibration_text else default_corpus("calibration")
    blocks = token_blocks(tok, texts, args.calibration_samples, args.seq_len, seed=args.seed)
    return batches(blocks, args.batch_size)


def eval_text(args: argparse.Namespace) -> str | list[str]:
    from hf_prune.assets import default_corpus

    if not args.eval_text:
        return default_corpus("evaluation")
    # tokenizing a 9 MB file for each row is slow; 16 characters a token is ample margin
    return Path(args.eval_text).read_text(encoding="utf-8")[: 16 * args.eval_tokens]


def method_for(row: str, n_remove: int):
    from hf_prune.methods import get

    if row == "iterabre":
        return get("iterabre", n_remove=n_remove)  # one layer per stage, re-selected; no recovery between stages
    return get(row, n_remove=n_remove, progress=False)


def run_row(row: str, args: argparse.Namespace) -> dict:
    """Load, prune (unless dense), record time and peak memory, evaluate."""
    import torch

    from hf_prune import prune
    from hf_prune.assets import load_smollm2
    from hf_prune.evaluate import perplexity

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    out: dict = {"row": row, "label": LABELS[row], "layers_before": model.config.num_hidden_layers}
    if row != "dense":
        batches = calibration(tok, args)
        if row == "iterabre":
            batches = batches[: max(1, -(-args.iterabre_samples // args.batch_size))]
        out["calibration_tokens"] = sum(int(b["attention_mask"].sum()) for b in batches)
        t0 = time.perf_counter()
        result = prune(model, method_for(row, args.n_remove), batches)
        out["prune_seconds"] = time.perf_counter() - t0
        out["scoring_seconds"] = sum(s.plan_seconds for s in result.stages)
        out["removed"] = sorted(result.plan.drop_layers)
        out["stages"] = len(result.stages)
        scores = result.stages[0].plan.provenance
        out["scores"] = scores.get("angular_distance") or scores.get("block_influence")
    out["peak_rss_gb"] = peak_rss_gb()
    out["layers_after"] = model.config.num_hidden_layers
    out["parameters"] = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    out["perplexity"] = perplexity(model, tok, eval_text(args), window=args.window, max_tokens=args.eval_tokens)
    out["eval_seconds"] = time.perf_counter() - t0
    return out


def child(row: str, argv: list[str]) -> dict:
    """Run one row in a fresh process (its own peak memory) and return its JSON."""
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--row", row],
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        return {"row": row, "label": LABELS[row], "error": proc.stderr[-3000:], "returncode": proc.returncode}
    return json.loads(lines[-1][4:])


def markdown(res: dict) -> str:
    info, a = res["info"], res["args"]
    dense = next((r for r in res["rows"] if r["row"] == "dense" and "perplexity" in r), None)
    lines = [f"# Depth pruning against its peer: {a['n_remove']} of 30 layers of SmolLM2-135M, no recovery", "",
             f"Command: `{info['command']}`  ",
             f"Machine: {info['machine']}, {info['cpu_count']} CPUs (shared with other jobs: load average "
             f"{res['load_average_start']} at start, {res.get('load_average_end', '-')} at the end; wall times are "
             f"inflated by the load and compare only within this run)  ",
             f"Versions: python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
             f"hf_prune {info['hf_prune']} (git {res['git'][:12]})  ",
             f"Calibration: {a['calibration_samples']} x {a['seq_len']} tokens of "
             f"{a['calibration_text'] or 'the KJV corpus (calibration split)'} (seed {a['seed']}; IteRABRe: the "
             f"first {a['iterabre_samples']} blocks); perplexity: first {a['eval_tokens']} tokens of "
             f"{a['eval_text'] or 'the KJV evaluation split'}, window {a['window']}.", "",
             "| method | removed layers | ppl | x dense | scoring s | peak RSS GB (through pruning) |",
             "|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if "error" in r:
            lines.append(f"| {r['label']} | error (exit {r['returncode']}) | | | | |")
            continue
        ppl = r["perplexity"]["perplexity"]
        ratio = f"{ppl / dense['perplexity']['perplexity']:.2f}" if dense else "-"
        removed = ", ".join(map(str, r.get("removed", []))) or "-"
        scoring = f"{r['scoring_seconds']:.0f}" if "scoring_seconds" in r else "-"
        lines.append(f"| {r['label']} | {removed} | {ppl:.2f} | {ratio} | {scoring} | {r['peak_rss_gb']:.2f} |")
    lines += ["", "Peak RSS is the row's own process (model load, calibration tokens, scoring, surgery), read before "
              "its evaluation.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.row is not None:
        print("ROW " + json.dumps(run_row(args.row, args)), flush=True)
        return None
    from recipe_utils import run_info, write_json

    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    res: dict = {"info": run_info(["benchmarks/peers_depth.py", *argv]), "args": vars(args), "git": git.strip(),
                 "load_average_start": [round(x, 1) for x in os.getloadavg()], "rows": []}
    out = Path(args.out)
    for row in ["dense", *[r for r in args.rows.split(",") if r]]:
        t0 = time.perf_counter()
        r = child(row, argv)
        r["row_wall_seconds"] = time.perf_counter() - t0
        res["rows"].append(r)
        res["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
        write_json(out.with_suffix(".json"), res)
        out.with_suffix(".md").write_text(markdown(res))
        print(f"[{row}] " + (f"ppl {r['perplexity']['perplexity']:.2f}, removed {r.get('removed')}, "
                             f"{r['row_wall_seconds']:.0f} s" if "perplexity" in r else "error: " + r["error"][-500:]),
              flush=True)
    return res


if __name__ == "__main__":
    main()
