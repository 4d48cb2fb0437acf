"""SliceGPT (constant width) vs Dynamic Slicing on SmolLM2-135M-Instruct: quality, size, slicing time, decode speed.

For each average slicing target (default 20, 25, 30%) it slices the offline SmolLM2 with constant SliceGPT and with
Dynamic Slicing at a few base slices SB, then measures perplexity on wiki_en.txt (non-overlapping windows, first
--ppl-max-tokens tokens), zero-shot multiple-choice accuracy on the BIG-bench tasks in <data-dir>/mc, the real
parameter count (shortcut matrices and head included) and safetensors size against the dense model, the slicing wall
time, and greedy decode throughput (tokens/s at batch 1 and 8) of every sliced model against the dense one (measured
in alternation, best of --speed-repeats). Extra rows at 25%: a sweep of SB, the reference layout (untied head),
SliceGPT's unweighted covariance, and the cheaper bases ("layer": one shortcut per layer, "global": none).

    python benchmarks/slicing.py                                   # reduced CPU configuration (the defaults)
    python benchmarks/slicing.py --calib-samples 128 --calib-len 2048 --ppl-max-tokens 0 --mc-limit 0   # paper-size

Calibration text defaults to Jane Austen (<data-dir>/austen); wiki_en.txt is evaluation-only. Writes JSON and
Markdown to --out (.json/.md) after every model.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/work/shared/data", help="folder with wiki_en.txt, mc/ and austen/")
    p.add_argument("--calib", default=None, help="calibration text files/folders (default: <data-dir>/austen)")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration sequences")
    p.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence")
    p.add_argument("--calib-batch", type=int, default=8, help="calibration batch size")
    p.add_argument("--targets", default="0.2,0.25,0.3", help="average slice fractions SP")
    p.add_argument("--base-slicing", default="0.1", help="Dynamic Slicing SB at every target (those < SP are used)")
    p.add_argument("--basis", default="sublayer", help="PCA basis of the main rows: sublayer, layer or global")
    p.add_argument("--extras-target", type=float, default=0.25, help="target of the SB sweep and the extra rows")
    p.add_argument("--sb-sweep", default="0.05,0.15", help="more SB values at --extras-target")
    p.add_argument("--extras", default="untied,raw,global",
                   help="extra constant rows at --extras-target: untied (SliceGPT's untied head), raw (SliceGPT's "
                   "unweighted covariance), layer / global (cheaper bases); empty = none")
    p.add_argument("--window", type=int, default=512, help="perplexity window")
    p.add_argument("--ppl-max-tokens", type=int, default=16384, help="score the first N wiki tokens (0 = all)")
    p.add_argument("--mc-limit", type=int, default=300, help="examples per multiple-choice task (0 = all)")
    p.add_argument("--mc-batch-size", type=int, default=16)
    p.add_argument("--speed-new-tokens", type=int, default=32, help="greedy tokens generated per speed run")
    p.add_argument("--speed-prompt", type=int, default=32, help="prompt tokens per speed run")
    p.add_argument("--speed-repeats", type=int, default=3, help="alternating dense/sliced repeats (best is kept)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep-models", default=None, help="folder to keep the sliced checkpoints in (default: temp)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "slicing"), help="output path stem")
    return p.parse_args(argv)


def environment() -> dict:
    import torch
    import transformers

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_prune_git": rev.strip() or None,
    }


def variants(args) -> list[dict]:
    """The sliced configurations: dicts with name, method, target and method options."""

    def const(sp, suffix="", **kw):
        return dict(name=f"constant-{sp:.2f}{suffix}", method="slicegpt", target=sp,
                    options=dict(slicing=sp, basis=args.basis, **kw))

    def dyn(sp, sb):
        return dict(name=f"dynamic-{sp:.2f}-sb{sb:.2f}", method="dynamic_slicing", target=sp,
                    options=dict(slicing=sp, base_slicing=sb, basis=args.basis))

    out = []
    for sp in (float(x) for x in args.targets.split(",")):
        out.append(const(sp))
        out += [dyn(sp, sb) for sb in (float(x) for x in args.base_slicing.split(",")) if sb < sp]
    sp = args.extras_target
    out += [dyn(sp, sb) for sb in (float(x) for x in args.sb_sweep.split(",") if x) if sb < sp]
    extra = {
        "untied": lambda: const(sp, "-untied-head", head="untied"),
        "raw": lambda: const(sp, "-raw-covariance", token_weighting="none"),
        "layer": lambda: const(sp, "-layer-basis") | {"options": dict(slicing=sp, basis="layer")},
        "global": lambda: const(sp, "-global-basis") | {"options": dict(slicing=sp, basis="global")},
    }
    for name in (x for x in args.extras.split(",") if x):
        if name not in extra:
            raise SystemExit(f"--extras: unknown row {name!r}; valid: {', '.join(extra)}")
        out.append(extra[name]())
    return out


def file_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def quality(model, tok, wiki: str, mc_files: list[Path], args) -> dict:
    from hf_prune.evaluate import multiple_choice, perplexity

    out = {"ppl": perplexity(model, tok, wiki, window=args.window, max_tokens=args.ppl_max_tokens or None)}
    accs = {}
    for f in mc_files:
        accs[f.stem] = multiple_choice(model, tok, f, limit=args.mc_limit or None, batch_size=args.mc_batch_size)
    out["mc"] = accs
    out["mc_mean_acc"] = sum(a["acc"] for a in accs.values()) / max(len(accs), 1)
    out["mc_mean_acc_norm"] = sum(a["acc_norm"] for a in accs.values()) / max(len(accs), 1)
    return out


def decode_seconds(model, prompt, new_tokens: int) -> float:
    import torch

    with torch.no_grad():
        t = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=0)
        s = time.perf_counter() - t
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return s


def speed(dense, sliced, prompts: dict, args) -> dict:
    """tokens/s of dense and sliced at each batch size, measured in alternation; best of the repeats."""
    res = {}
    for b, prompt in prompts.items():
        for m in (dense, sliced):  # warm-up
            decode_seconds(m, prompt, 4)
        best = {"dense": float("inf"), "sliced": float("inf")}
        for _ in range(args.speed_repeats):
            best["dense"] = min(best["dense"], decode_seconds(dense, prompt, args.speed_new_tokens))
            best["sliced"] = min(best["sliced"], decode_seconds(sliced, prompt, args.speed_new_tokens))
        toks = b * args.speed_new_tokens
        res[f"b{b}"] = {"dense_tok_s": toks / best["dense"], "sliced_tok_s": toks / best["sliced"],
                        "speedup": best["dense"] / best["sliced"]}
    return res


def markdown(report: dict) -> str:
    d = report["dense"]
    lines = [
        "# SliceGPT vs Dynamic Slicing on SmolLM2-135M-Instruct",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {report['environment']['processor']}, {report['environment']['cpu_count']} CPUs "
        f"(shared; load average at start {report['environment']['load_average_at_start']}), torch "
        f"{report['environment']['torch']}, transformers {report['environment']['transformers']}, "
        f"{report['environment']['torch_threads']} threads  ",
        f"Calibration: {report['calibration']}  ",
        f"Perplexity: wiki_en.txt, first {d['ppl']['tokens'] + 1 if 'ppl' in d else '?'} tokens, window "
        f"{report['args']['window']}; multiple choice: first {report['args']['mc_limit'] or 'all'} examples per task "
        "(acc; standard error about 0.5/sqrt(n)).  ",
        "Params include the shortcut matrices, head projections and an untied head; 'vs dense' is params / dense "
        "params. Decode: greedy, prompt {p} tokens, {n} new tokens, best of {r} runs alternating with the dense "
        "model.".format(p=report["args"]["speed_prompt"], n=report["args"]["speed_new_tokens"],
                        r=report["args"]["speed_repeats"]),
        "",
    ]
    tasks = list(d.get("mc", {}))
    head = ["model", "avg slice", "params (M)", "vs dense", "shortcuts (M)", "file (MB)", "ppl", "ppl vs const"]
    short = {"cause_and_effect_one_sentence": "cause-effect", "goal_step_wikihow_step_inference": "wikihow",
             "social_iqa": "social-iqa"}
    head += [f"acc {short.get(t, t[:14])}" for t in tasks] + ["mean acc", "slice s", "tok/s b1 (x dense)", "tok/s b8 (x dense)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(name, r, const=None):
        cells = [name, f"{r.get('average_slicing', 0):.3f}", f"{r['params']['total'] / 1e6:.2f}",
                 f"{r['params']['total'] / d['params']['total']:.3f}", f"{r['params'].get('shortcuts', 0) / 1e6:.2f}",
                 f"{r['file_bytes'] / 1e6:.0f}"]
        ppl = r.get("ppl", {}).get("perplexity")
        cells.append(f"{ppl:.2f}" if ppl else "-")
        cp = const.get("ppl", {}).get("perplexity") if const else None
        cells.append(f"{100 * (ppl / cp - 1):+.1f}%" if ppl and cp and const is not r else "")
        for t in tasks:
            a = r.get("mc", {}).get(t)
            cells.append(f"{a['acc']:.3f}" if a else "-")
        cells.append(f"{r['mc_mean_acc']:.3f}" if "mc_mean_acc" in r else "-")
        cells.append(f"{r['slice_seconds']:.0f}" if "slice_seconds" in r else "")
        for b in ("b1", "b8"):
            s = r.get("speed", {}).get(b)
            cells.append(f"{s['sliced_tok_s']:.1f} ({s['speedup']:.2f}x)" if s else "")
        return "| " + " | ".join(cells) + " |"

    lines.append(row("dense", d))
    for r in report["rows"]:
        const = next((c for c in report["rows"] if c["name"] == f"constant-{r['target']:.2f}"), None)
        lines.append(row(r["name"], r, const))
    lines += ["", "Dynamic Slicing widths (residual width per layer) and layer redundancies are in the JSON file."]
    return "\n".join(lines) + "\n"


def write(report: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float))
    out.with_suffix(".md").write_text(markdown(report))


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    import hf_prune  # noqa: F401
    from hf_prune import assets
    from hf_prune.data import batches, read_texts, token_blocks
    from hf_prune.methods import get
    from hf_prune.pipeline import prune
    from hf_prune.surgery import sliced_num_parameters

    data = Path(args.data_dir)
    out = Path(args.out)
    model_dir = Path(args.keep_models) if args.keep_models else Path(tempfile.mkdtemp(prefix="slicing-bench-"))
    model_dir.mkdir(parents=True, exist_ok=True)
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "started": datetime.now(timezone.utc).isoformat(),
        "environment": environment(),
        "args": vars(args),
        "rows": [],
    }
    dense, tok = assets.load_smollm2()
    calib_src = args.calib or str(data / "austen")
    blocks = token_blocks(tok, read_texts(calib_src.split(",")), args.calib_samples, args.calib_len, seed=args.seed)
    calib = batches(blocks, args.calib_batch)
    report["calibration"] = f"{args.calib_samples} x {args.calib_len} tokens from {calib_src} (seed {args.seed})"
    wiki = (data / "wiki_en.txt").read_text(encoding="utf-8")
    mc_files = sorted((data / "mc").glob("*.json"))
    g = torch.Generator().manual_seed(args.seed)
    prompts = {b: torch.randint(100, tok.vocab_size, (b, args.speed_prompt), generator=g) for b in (1, 8)}

    dense_path = model_dir / "dense"
    dense.save_pretrained(dense_path)
    report["dense"] = {"params": {"total": sum(p.numel() for p in dense.parameters())},
                       "file_bytes": file_size(dense_path), **quality(dense, tok, wiki, mc_files, args)}
    write(report, out)
    print("dense", report["dense"]["ppl"], report["dense"]["mc_mean_acc"], flush=True)

    for v in variants(args):
        model = copy.deepcopy(dense)
        t = time.perf_counter()
        plan = prune(model, get(v["method"], progress=False, seed=args.seed, **v["options"]), calib).stages[-1].plan
        seconds = time.perf_counter() - t
        path = model_dir / v["name"]
        model.save_pretrained(path)
        row = {**v, "slice_seconds": seconds, "params": sliced_num_parameters(model), "file_bytes": file_size(path),
               "average_slicing": plan.provenance["average_slicing"],
               "residual_dims": plan.residual_widths["residual_dims"],
               "layer_redundancy": plan.provenance["layer_redundancy"],
               "kept_variance": plan.provenance["kept_variance"]}
        del model
        gc.collect()
        sliced = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # measured as reloaded
        row.update(quality(sliced, tok, wiki, mc_files, args))
        row["speed"] = speed(dense, sliced, prompts, args)
        report["rows"].append(row)
        write(report, out)
        print(v["name"], f"ppl={row['ppl']['perplexity']:.2f}", f"acc={row['mc_mean_acc']:.3f}",
              f"params={row['params']['total']}", row["speed"], flush=True)
        del sliced
        gc.collect()
    report["finished"] = datetime.now(timezone.utc).isoformat()
    write(report, out)
    if not args.keep_models:
        shutil.rmtree(model_dir, ignore_errors=True)
    return report


if __name__ == "__main__":
    main()
