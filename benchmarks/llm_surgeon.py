"""LLM Surgeon vs K-OBD vs magnitude on SmolLM2-135M-Instruct (offline): structured, 2:4 and unstructured pruning.

For every criterion, structured pruning runs one multi-shot trajectory to the largest structured target
(T = --structured-shots shots, target t * alpha / T after shot t) and is evaluated after each shot whose target is one
of --structured-targets; after every shot the plan's dead channels and heads are removed by surgery, so the next
shot's curvature is computed on the smaller model. 2:4 and unstructured run --sparse-shots shots to 50%. Each pruned
model is scored by perplexity on wiki_en.txt (first --ppl-max-tokens tokens, non-overlapping --window windows) and
zero-shot accuracy on the BIG-bench tasks in <data-dir>/mc (first --mc-limit examples each), and measured by parameter
count, zero count and safetensors file size after compaction. Calibration text: Jane Austen (<data-dir>/austen),
--calib-samples blocks of --calib-len tokens. JSON (machine, versions, command, wall times) and Markdown go to
benchmarks/results/ after every result.

    python benchmarks/llm_surgeon.py                                  # reduced CPU configuration (defaults)
    python benchmarks/llm_surgeon.py --calib-samples 128 --calib-len 2048 --structured-shots 40 \
        --sparse-shots 40 --chunk-size 2000 --compute-dtype float64 --mc-limit 0    # paper-like, on a GPU
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/work/shared/data", help="folder holding wiki_en.txt, mc/ and austen/")
    p.add_argument("--wiki", default=None, help="perplexity text (default: <data-dir>/wiki_en.txt)")
    p.add_argument("--mc-dir", default=None, help="folder of BIG-bench JSON tasks (default: <data-dir>/mc)")
    p.add_argument("--calib", default=None, help="calibration text files/folder (default: <data-dir>/austen)")
    p.add_argument("--calib-samples", type=int, default=16, help="calibration blocks")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration block")
    p.add_argument("--batch-size", type=int, default=2, help="calibration batch size")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    p.add_argument("--ppl-max-tokens", type=int, default=8192, help="score the first N tokens (0 = all)")
    p.add_argument("--mc-limit", type=int, default=40, help="first N examples of each task (0 = all)")
    p.add_argument("--criteria", default="surgeon,kobd,magnitude")
    p.add_argument("--modes", default="structured,2:4,unstructured")
    p.add_argument("--structured-targets", default="0.1,0.2,0.3", help="fractions of the decoder's linear parameters")
    p.add_argument("--structured-shots", type=int, default=3, help="shots of the structured trajectory")
    p.add_argument("--sparse-target", type=float, default=0.5)
    p.add_argument("--sparse-shots", type=int, default=2, help="shots for 2:4 and unstructured")
    p.add_argument("--chunk-size", type=int, default=256, help="weights solved jointly in element/2:4 updates")
    p.add_argument("--compute-dtype", default="float32", choices=["float32", "float64"],
                   help="curvature algebra dtype (the method's default is float64; float32 halves CPU time)")
    p.add_argument("--damping-g", type=float, default=None, help="G damping (default: the method's, 0.01 structured)")
    p.add_argument("--damping-a", type=float, default=0.01, help="A damping relative to the mean diagonal")
    p.add_argument("--weight-update", choices=["auto", "on", "off"], default="auto",
                   help="correlated OBS update: auto (surgeon only), on or off (ablations; use a separate --out)")
    p.add_argument("--model", default=None, help="checkpoint dir (default: the offline SmolLM2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "llm_surgeon.json"))
    p.add_argument("--resume", action="store_true",
                   help="keep the dense row and the runs already in --out when its settings match (modes and criteria "
                        "may differ), and skip trajectories whose rows are all there")
    return p.parse_args(argv)


def environment() -> dict:
    import torch
    import transformers

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_start": os.getloadavg(),
        },
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "hf_prune_git": rev or None},
    }


def evaluate(model, tok, args, wiki_text: str, mc_tasks: list[Path]) -> dict:
    from hf_prune.evaluate import multiple_choice, perplexity

    t = time.perf_counter()
    ppl = perplexity(model, tok, wiki_text, window=args.window, max_tokens=args.ppl_max_tokens or None)
    out = {"perplexity": ppl["perplexity"], "ppl_tokens": ppl["tokens"], "mc": {}}
    for task in mc_tasks:
        r = multiple_choice(model, tok, task, limit=args.mc_limit or None)
        out["mc"][task.stem] = {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"]}
    out["mc_mean_acc"] = sum(v["acc"] for v in out["mc"].values()) / max(len(out["mc"]), 1)
    out["seconds_eval"] = time.perf_counter() - t
    return out


def measure(model) -> dict:
    """Parameters, zeros in the decoder's linear layers, and the safetensors size of save_pretrained."""
    from hf_prune.kfac import decoder_linears

    lin = decoder_linears(model)
    n_lin = sum(l.weight.numel() + (l.bias.numel() if l.bias is not None else 0) for l in lin.values())
    zeros = sum(int((l.weight == 0).sum()) + (int((l.bias == 0).sum()) if l.bias is not None else 0)
                for l in lin.values())
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        size = sum(f.stat().st_size for f in Path(d).glob("*.safetensors"))
    return {"parameters": model.num_parameters(), "linear_parameters": n_lin, "linear_zeros": zeros,
            "safetensors_bytes": size}


def _label(run: dict) -> str:
    """The criterion, marked where the weight update departs from the default (surgeon updates, baselines not)."""
    c, upd = run["criterion"], run.get("weight_update")
    if upd is None or upd == (c == "surgeon"):
        return c
    return f"{c} + update" if upd else f"{c} costs, no update"


def markdown(res: dict) -> str:
    dense = res.get("dense")
    lines = [
        "# LLM Surgeon on SmolLM2-135M-Instruct (CPU, reduced configuration)",
        "",
        f"Command: `{res['command']}`  ",
        f"Machine: {res['environment']['machine']['processor']}, {res['environment']['machine']['cpu_count']} cores "
        f"(shared), torch {res['environment']['versions']['torch']}, transformers "
        f"{res['environment']['versions']['transformers']}  ",
        f"Calibration: {res['config']['calib_samples']} x {res['config']['calib_len']} tokens of Austen; perplexity: "
        f"first {res['config']['ppl_max_tokens']} tokens of wiki_en.txt, window {res['config']['window']}; "
        f"multiple choice: first {res['config']['mc_limit']} examples per task.",
        "",
        "`removed` is the fraction of the decoder's linear parameters that are removed or zero (the schedule's "
        "target); `size` is the physical parameter count after compaction relative to dense; `ppl ratio` is "
        "pruned / dense perplexity.",
        "",
        "| mode | criterion | target | removed | params (M) | size | nonzero size | file (MB) | ppl | ppl ratio | "
        "mc acc | shots | s/shot |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    if dense:
        d = dense
        lines.append(f"| dense | - | 0 | 0 | {d['parameters'] / 1e6:.2f} | 1.000 | 1.000 | "
                     f"{d['safetensors_bytes'] / 1e6:.1f} | {d['perplexity']:.2f} | 1.000 | "
                     f"{d['mc_mean_acc']:.3f} | - | - |")
    for r in res["runs"]:
        r = {**r, "criterion": _label(r)}
        size = r["parameters"] / dense["parameters"] if dense else float("nan")
        nz = (r["parameters"] - r["linear_zeros"]) / dense["parameters"] if dense else float("nan")
        ratio = r["perplexity"] / dense["perplexity"] if dense else float("nan")
        spt = sum(r["seconds_per_shot"]) / max(len(r["seconds_per_shot"]), 1)
        lines.append(f"| {r['mode']} | {r['criterion']} | {r['target']:.2f} | {r['removed_fraction']:.3f} | "
                     f"{r['parameters'] / 1e6:.2f} | {size:.3f} | {nz:.3f} | {r['safetensors_bytes'] / 1e6:.1f} | "
                     f"{r['perplexity']:.2f} | {ratio:.3f} | {r['mc_mean_acc']:.3f} | {r['shots']} | {spt:.0f} |")
    lines.append("")
    if res["runs"]:
        tasks = sorted(next(iter(res["runs"]))["mc"])
        lines += ["Per-task accuracy (acc / acc_norm):", "",
                  "| mode | criterion | target | " + " | ".join(tasks) + " |",
                  "|---|---|---|" + "---|" * len(tasks)]
        for r in ([{"mode": "dense", "criterion": "-", "target": 0.0, **dense}] if dense else []) + [
                {**r, "criterion": _label(r)} for r in res["runs"]]:
            lines.append(f"| {r['mode']} | {r['criterion']} | {r['target']:.2f} | " + " | ".join(
                f"{r['mc'][t]['acc']:.3f} / {r['mc'][t]['acc_norm']:.3f}" for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune.pipeline import run_stage
    from hf_prune.assets import load_smollm2
    from hf_prune.data import batches, read_texts, token_blocks
    from hf_prune.methods.llm_surgeon import LLMSurgeon

    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data_dir)
    wiki = Path(args.wiki or data / "wiki_en.txt")
    mc_tasks = sorted(Path(args.mc_dir or data / "mc").glob("*.json"))
    calib_path = Path(args.calib or data / "austen")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def load():
        if args.model:
            return (AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval(),
                    AutoTokenizer.from_pretrained(args.model))
        return load_smollm2()

    res = {
        "command": "python " + " ".join(shlex.quote(a) for a in [str(Path(sys.argv[0]))] + sys.argv[1:]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(),
        "config": vars(args),
        "dense": None,
        "runs": [],
    }

    def save():
        out.write_text(json.dumps(res, indent=2))
        out.with_suffix(".md").write_text(markdown(res))

    volatile = ("modes", "criteria", "out", "threads", "resume", "damping_g", "damping_a")
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        same = {k: v for k, v in old.get("config", {}).items() if k not in volatile}
        if same == {k: v for k, v in vars(args).items() if k not in volatile}:
            res["dense"], res["runs"] = old.get("dense"), old.get("runs", [])
            res["command"] = old.get("command", res["command"]) + "; then " + res["command"]
        else:
            print(f"--resume: settings differ from {out}; starting afresh", flush=True)
    done = {(r["mode"], r["criterion"], round(r["target"], 6)) for r in res["runs"]}

    model, tok = load()
    wiki_text = wiki.read_text(encoding="utf-8")
    if args.ppl_max_tokens:  # tokenizing 9 MB per evaluation is slow; 16 characters a token is ample margin
        wiki_text = wiki_text[: 16 * args.ppl_max_tokens]
    blocks = token_blocks(tok, read_texts(calib_path), args.calib_samples, args.calib_len, seed=args.seed)
    calib = batches(blocks, args.batch_size)
    if res["dense"] is None:
        res["dense"] = {**measure(model), **evaluate(model, tok, args, wiki_text, mc_tasks)}
        print(f"dense: {res['dense']}", flush=True)
        save()

    criteria = args.criteria.split(",")
    targets = [float(x) for x in args.structured_targets.split(",")]
    for mode in args.modes.split(","):
        for criterion in criteria:
            if mode == "structured":
                alpha, shots, evals = max(targets), args.structured_shots, targets
            else:
                alpha, shots, evals = args.sparse_target, args.sparse_shots, [args.sparse_target]
            if all((mode, criterion, round(x, 6)) in done for x in evals):
                print(f"[skip] {mode} {criterion}: in {out}", flush=True)
                continue
            model, tok = load()
            method = LLMSurgeon(target=alpha, target_of="linears", shots=shots, mode=mode, criterion=criterion,
                                chunk_size=args.chunk_size, compute_dtype=args.compute_dtype, seed=args.seed,
                                damping_g=args.damping_g, damping_a=args.damping_a,
                                weight_update={"auto": None, "on": True, "off": False}[args.weight_update])
            seconds = []
            for stage in range(shots):
                t = time.perf_counter()
                plan = run_stage(model, method, calib, stage).plan  # scores, the plan's weight update, surgery
                seconds.append(time.perf_counter() - t)
                reached = (stage + 1) * alpha / shots
                hit = [x for x in evals if math.isclose(x, reached, abs_tol=1e-9)]
                if not hit or (mode, criterion, round(hit[0], 6)) in done:
                    continue
                run = {"mode": mode, "criterion": criterion, "weight_update": method.updates_weights,
                       "damping": list(method.damping), "target": hit[0], "shots": stage + 1,
                       "seconds_per_shot": list(seconds), "removed_fraction": plan.provenance["removed_fraction"],
                       "plan_heads_layers": len(plan.heads), "plan_mlp_layers": len(plan.mlp_channels),
                       **measure(model), **evaluate(model, tok, args, wiki_text, mc_tasks)}
                res["runs"].append(run)
                print(f"{mode} {criterion} {hit[0]}: ppl {run['perplexity']:.2f}, params {run['parameters']:,}, "
                      f"mc {run['mc_mean_acc']:.3f}", flush=True)
                save()
            del model, method
    return res


if __name__ == "__main__":
    main()
