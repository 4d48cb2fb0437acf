"""hf-prune's slicing on the reference SliceGPT protocol (microsoft/TransformerCompression, run on SmolLM2).

The protocol, exactly (issue 16):
- calibration: the six Austen novels (<data-dir>/austen/*.txt, sorted by name) joined with blank lines, tokenized
  once without special tokens (N tokens); 32 start offsets `random.Random(0).randrange(0, N - 1024)` (drawn in turn);
  32 x 1024 tokens, no padding, in batches of --calib-batch;
- evaluation: the first 32,768 tokens of <data-dir>/wiki_en.txt, tokenized once without special tokens, 64
  non-overlapping windows of 512, no BOS: 32,704 scored tokens;
- the reference (SliceGPT's own code, slicing 0.25, PCA, head not sliced): ppl 364.2, 140.65M parameters, 356 s on 2
  cores; dense 21.99.

Rows: method (slicegpt, dynamic_slicing) x slicing x settings, where settings is "defaults" (hf-prune's defaults),
"faithful" (basis sublayer, untied head, unweighted covariance, embedding-only basis for the embedding, no calibration
perplexity check: SliceGPT's own choices) or a basis override ("global", "layer", "sublayer"). Each row loads a fresh
model, times `hf_prune.prune(model, method, batches)` (plan + surgery), counts the parameters and measures the
perplexity. The JSON (a list of rows: model, method, slicing, basis, settings, ppl, params, seconds, ..., the
reference's first; each row's `run` indexes `<out>.runs.json`, which holds every run's machine, versions, load
average and command, and the protocol) and the Markdown table are rewritten after every row.

    nice python benchmarks/slicing_reference_protocol.py                                   # the full grid
    nice python benchmarks/slicing_reference_protocol.py --slicings 0.25 --methods slicegpt \\
        --settings defaults,faithful,global                                               # the 0.25 rows
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_PRUNE_NO_PROGRESS", "1")

REFERENCE = {"model": "SmolLM2-135M-Instruct", "method": "SliceGPT reference (TransformerCompression)",
             "slicing": 0.25, "basis": "sublayer", "settings": "reference", "ppl": 364.2, "params": 140_650_000,
             "seconds": 356.0, "dense_ppl": 21.99}
MODELS = {"smollm2": ("SmolLM2-135M-Instruct", "load_smollm2", False),
          "gemma3": ("Gemma-3-270M", "load_gemma3", True)}  # name, hf_prune.assets loader, BOS by default
FAITHFUL = dict(basis="sublayer", head="untied", token_weighting="none", embedding_basis="embedding", reader_weight=0.0,
                max_ppl_ratio=0, max_size=100.0)  # no size limit, as the reference


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/work/shared/data", help="folder with austen/ and wiki_en.txt")
    p.add_argument("--model", default="smollm2", choices=sorted(MODELS),
                   help="smollm2 (the reference protocol's model) or gemma3 (Gemma-3-270M, hf_prune.assets.load_gemma3; "
                        "its rows are measured with a BOS token, which the model needs)")
    p.add_argument("--bos", default="auto", choices=("auto", "yes", "no"),
                   help="put the BOS token first in every calibration block and evaluation window (auto: gemma3 yes, "
                        "smollm2 no, as the reference protocol)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows already in --out.json and replace only those this run measures again "
                        "(same model, method, slicing, settings); each row records its own command and load")
    p.add_argument("--methods", default="slicegpt,dynamic_slicing", help="comma-separated method names")
    p.add_argument("--slicings", default="0.1,0.2,0.25,0.3", help="slicing fractions (averages for dynamic)")
    p.add_argument("--settings", default="defaults,faithful,global,layer,sublayer",
                   help="defaults, faithful, a basis (global, layer, sublayer) over the defaults, or overrides "
                        "k=v+k=v (e.g. basis=global+reader_weight=0)")
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--calib-len", type=int, default=1024)
    p.add_argument("--calib-batch", type=int, default=8, help="sequences per calibration batch")
    p.add_argument("--eval-tokens", type=int, default=32768)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--no-dense", action="store_true", help="skip the dense row")
    p.add_argument("--merge-from", nargs="+", default=None, metavar="JSON",
                   help="measure nothing: merge the rows (and runs) of these result files into --out (rows with the "
                        "same model, method, slicing and settings are replaced), e.g. parts run in parallel")
    p.add_argument("--mc", default="", help="comma-separated multiple-choice tasks (names of <data-dir>/mc/*.json "
                   "without .json) scored on every row, e.g. goal_step_wikihow,social_iqa,cause_and_effect")
    p.add_argument("--mc-limit", type=int, default=500, help="examples per multiple-choice task (the first ones)")
    p.add_argument("--mc-batch", type=int, default=16, help="requests per multiple-choice batch")
    p.add_argument("--note", default="", help="free text recorded with the results (e.g. 'CPU shared')")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "slicing_reference_protocol"),
                   help="output path stem (.json and .md)")
    return p.parse_args(argv)


def environment(args) -> dict:
    import torch
    import transformers

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": args.threads,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": rev.strip(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "note": args.note,
    }


def calibration_batches(tok, data_dir: Path, args) -> tuple[list[dict], dict]:
    import torch

    files = sorted((data_dir / "austen").glob("*.txt"))
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in files)
    ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    n = ids.numel()
    rng = random.Random(0)
    starts = [rng.randrange(0, n - args.calib_len) for _ in range(args.calib_samples)]
    blocks = torch.stack([ids[s : s + args.calib_len] for s in starts])
    if args.bos_id is not None:  # the block keeps its length: BOS replaces its first token
        blocks[:, 0] = args.bos_id
    batches = [{"input_ids": blocks[i : i + args.calib_batch]} for i in range(0, len(blocks), args.calib_batch)]
    return batches, {"files": [f.name for f in files], "tokens": n, "starts": starts}


def perplexity(model, stream, window: int, bos_id: int | None = None) -> dict:
    import torch
    import torch.nn.functional as F

    if bos_id is not None:  # windows of BOS + (window - 1) stream tokens; BOS itself is never scored
        w = window - 1
        windows = stream[: (stream.numel() // w) * w].view(-1, w)
        windows = torch.cat([torch.full((len(windows), 1), bos_id, dtype=windows.dtype), windows], dim=1)
    else:
        windows = stream[: (stream.numel() // window) * window].view(-1, window)
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(windows), 4):
            ids = windows[i : i + 4]
            logits = model(input_ids=ids).logits[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
            count += ids[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "scored_tokens": count, "windows": len(windows)}


ROW_KEY = ("model", "method", "slicing", "settings")


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """`old` rows, each replaced by the `new` row with the same key; new keys appended in order."""
    fresh = {tuple(r[k] for k in ROW_KEY): r for r in new}
    out = [fresh.pop(tuple(r[k] for k in ROW_KEY), r) for r in old]
    return out + [r for r in new if tuple(r[k] for k in ROW_KEY) in fresh]


def multiple_choice(model, tok, data_dir: Path, args) -> dict | None:
    """{task: {acc, acc_norm, n}} for every --mc task (hf_prune.evaluate.multiple_choice, first --mc-limit examples)."""
    if not args.mc:
        return None
    from hf_prune.evaluate import multiple_choice as score

    out = {}
    for task in args.mc.split(","):
        path = _mc_path(data_dir, task)
        out[task] = score(model, tok, path, limit=args.mc_limit, batch_size=args.mc_batch)
    return out


def _mc_path(data_dir: Path, task: str) -> Path:
    matches = sorted((data_dir / "mc").glob(f"{task}*.json"))
    if not matches:
        valid = sorted(p.stem for p in (data_dir / "mc").glob("*.json"))
        raise SystemExit(f"--mc: no task {task!r} in {data_dir / 'mc'}; valid: {', '.join(valid)}")
    return matches[0]


def _mc_text(r: dict) -> str:
    mc = r.get("mc")
    if not mc:
        return ""
    return ", ".join(f"{t.split('_')[0]} {v['acc']:.3f}/{v['acc_norm']:.3f} (n={v['n']})" for t, v in mc.items())


def read_result(json_path: Path) -> dict:
    """{"runs", "protocol", "rows"} of a result file: `<stem>.json` is the list of rows (the reference's first; each
    row's `run` indexes the runs) and `<stem>.runs.json` holds the runs and the protocol. Files written before that
    (one dict with runs, protocol and rows, or an older one with a single "environment") are read too."""
    if not json_path.exists():
        return {"runs": [], "protocol": None, "rows": []}
    data = json.loads(json_path.read_text(encoding="utf-8"))
    if isinstance(data, list):
        side = json_path.with_suffix(".runs.json")
        meta = json.loads(side.read_text(encoding="utf-8")) if side.exists() else {}
        data = {"runs": meta.get("runs", []), "protocol": meta.get("protocol"), "rows": data}
    if "environment" in data:  # a file from before runs were recorded per row: one run, every row from it
        data["runs"] = [data.pop("environment")]
        for r in data["rows"]:
            r.setdefault("run", 0)
    data["rows"] = [r for r in data.get("rows", []) if r.get("settings") != "reference"]
    return {"runs": list(data.get("runs", [])), "protocol": data.get("protocol"), "rows": list(data["rows"])}


def write(rows: list[dict], runs: list[dict], protocol: dict, stem: Path) -> None:
    """`<stem>.json`: the list of rows, the reference's first; `<stem>.runs.json`: runs and protocol; `<stem>.md`."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps([REFERENCE, *rows], indent=2, allow_nan=False) + "\n",
                                         encoding="utf-8")
    stem.with_suffix(".runs.json").write_text(json.dumps({"runs": runs, "protocol": protocol}, indent=2,
                                                         allow_nan=False) + "\n", encoding="utf-8")
    lines = [
        "# Slicing on the reference SliceGPT protocol",
        "",
        "Runs (each row names its run):",
        "",
    ]
    for i, env in enumerate(runs):
        lines += [
            f"{i}. `{env['command']}`  ",
            f"   {env['platform']}, {env['cpu_count']} CPUs, torch {env['torch']} ({env['torch_threads']} threads), "
            f"transformers {env['transformers']}, commit {env['git_commit'][:10]}, {env['date']}; load average at "
            f"start {', '.join(f'{x:.1f}' for x in env['load_average_at_start'])}."
            + (f" Note: {env['note']}" if env.get("note") else ""),
        ]
    lines += [
        "",
        "Protocol (issue 16): calibration = Austen blocks at offsets from random.Random(0), tokenized once without "
        "special tokens; evaluation = the first wiki_en.txt tokens in non-overlapping windows. SmolLM2 without BOS, "
        "as the reference; Gemma-3 with BOS first in every block and window (BOS replaces a block's first token; a "
        "window is BOS + window - 1 tokens). Each run's budget is in its line below. Seconds = `hf_prune.prune` "
        "(plan + surgery). The reference measured 0.25 only: at the other sparsities the `faithful` row (which "
        "matches it at 0.25) stands in for it.",
        "",
    ]
    for i, env in enumerate(runs):
        b = env.get("budget")
        if b:
            lines.append(f"- run {i}: {b['calib_samples']} x {b['calib_len']} calibration tokens (batches of "
                         f"{b['calib_batch']}), {b['eval_tokens']} evaluation tokens, windows of {b['window']}"
                         + (f", multiple choice: {b['mc']} ({b['mc_limit']} examples each)" if b.get("mc") else ""))
    lines += [
        "",
        "| model | method | slicing | settings | basis (chosen) | ppl | params | seconds | vs reference (ppl / params / s) | run | multiple choice acc / acc_norm |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| {REFERENCE['model']} | {REFERENCE['method']} | 0.25 | reference | sublayer | {REFERENCE['ppl']} | "
        f"140.65M | {REFERENCE['seconds']:.0f} | | |",
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['model']} | {r['method']} | {r['slicing']} | {r['settings']} | {r['basis']} | "
                         f"stopped: {r['error'][:300]} | | {r['seconds']:.0f} | | {r.get('run', '')} |")
            continue
        vs = ""
        ref = _reference_for(r, rows)
        if ref is not None and r["method"] != "dense":
            vs = (f"{r['ppl'] / ref['ppl']:.2f}x / {r['params'] / ref['params']:.2f}x / "
                  f"{r['seconds'] / ref['seconds']:.2f}x" + ("" if ref is REFERENCE else " (vs faithful)"))
        lines.append(f"| {r['model']} | {r['method']} | {r['slicing']} | {r['settings']} | {r['basis']} | "
                     f"{r['ppl']:.2f} | {r['params'] / 1e6:.2f}M | {r['seconds']:.0f} | {vs} | {r.get('run', '')} | {_mc_text(r)} |")
    choices = [r for r in rows if r.get("basis_choice")]
    if choices:
        lines += ["", "basis='auto' evidence (held-out calibration perplexity per candidate):", ""]
        for r in choices:
            cands = ", ".join(
                f"{c['basis']}/{c['head']}" + (f" [{c['schedule']}]" if c.get("schedule") else "") + ": "
                + (f"{c['held_out_ppl']:.2f} ({c['parameters'] / 1e6:.2f}M)"
                   if c.get("held_out_ppl") is not None else "refused (larger)")
                + (" (chosen)" if c.get("chosen") else "")
                for c in r["basis_choice"]["candidates"])
            lines.append(f"- {r['model']} {r['method']} {r['slicing']}: dense {r['basis_choice']['dense_held_out_ppl']:.2f}; "
                         f"{cands}")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _reader_summary(prov: dict) -> dict | None:
    rb = prov.get("reader_basis")
    return None if rb is None else {k: v for k, v in rb.items() if k != "per_basis"}


def _reference_for(row: dict, rows: list[dict]) -> dict | None:
    """The row to compare with: the reference itself at its model and sparsity, else the faithful slicegpt row of the
    same model and sparsity (None where there is neither, and for the faithful rows themselves)."""
    if row["model"] == REFERENCE["model"] and row["slicing"] == REFERENCE["slicing"]:
        return REFERENCE
    if row["settings"] == "faithful" and row["method"] == "slicegpt":
        return None
    for r in rows:
        if (r["model"], r["method"], r["slicing"], r["settings"]) == (row["model"], "slicegpt", row["slicing"],
                                                                       "faithful") and r.get("ppl") is not None:
            return r
    return None


def setting_options(method: str, setting: str) -> dict:
    """The method options of a --settings entry: defaults, faithful, a basis, or overrides `k=v+k=v` (typed by the
    method's own config fields, as the CLI's flags)."""
    from hf_prune.methods import config_fields, method_class

    if setting == "faithful":
        return dict(FAITHFUL)
    if setting in ("global", "layer", "sublayer"):
        return {"basis": setting}
    if setting == "defaults":
        return {}
    fields = {f.name: f for f in config_fields(method_class(method))}
    options = {}
    for part in setting.split("+"):
        key, sep, value = part.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"--settings: {setting!r} is not defaults, faithful, global, layer, sublayer or "
                             f"k=v+k=v with k among {', '.join(sorted(fields))}")
        options[key] = fields[key].parse(value)
    return options


def merge_files(stem: Path, files: list[str]) -> None:
    """--merge-from: fold other runs' result files into `stem`'s, keeping each row's run."""
    data = read_result(stem.with_suffix(".json"))
    runs, rows, protocol = data["runs"], data["rows"], data["protocol"]
    for f in files:
        part = read_result(Path(f))
        offset = len(runs)
        runs += part["runs"]
        new = [dict(r, run=r.get("run", 0) + offset) for r in part["rows"]]
        rows = merge(rows, new)
        protocol = protocol or part.get("protocol")
    defaults = vars(parse_args([]))
    for env in runs:  # runs recorded before budgets were: their command used the default budget
        if "budget" not in env and not any(flag in env["command"] for flag in ("--calib", "--eval-tokens", "--window",
                                                                                "--mc")):
            env["budget"] = {k: defaults[k] for k in ("calib_samples", "calib_len", "calib_batch", "eval_tokens",
                                                      "window", "mc", "mc_limit")}
    write(rows, runs, protocol or {}, stem)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge_from:
        merge_files(Path(args.out), args.merge_from)
        return
    import torch

    torch.set_num_threads(args.threads)
    import hf_prune
    import hf_prune.assets as assets
    from hf_prune.methods import get

    data_dir = Path(args.data_dir)
    stem = Path(args.out)
    env = environment(args)
    name, loader, bos_default = MODELS[args.model]
    load = getattr(assets, loader)
    model, tok = load()
    use_bos = bos_default if args.bos == "auto" else args.bos == "yes"
    args.bos_id = tok.bos_token_id if use_bos else None
    if use_bos and args.bos_id is None:
        raise SystemExit(f"--bos: {name}'s tokenizer has no BOS token")
    batches, calib = calibration_batches(tok, data_dir, args)
    wiki = (data_dir / "wiki_en.txt").read_text(encoding="utf-8")
    stream = torch.tensor(tok(wiki, add_special_tokens=False)["input_ids"][: args.eval_tokens], dtype=torch.long)
    protocol = {"calibration": {k: v for k, v in calib.items() if k != "tokens"}, "calibration_batch": args.calib_batch,
                "eval_tokens": int(stream.numel()), "window": args.window, "faithful": FAITHFUL}
    old = read_result(stem.with_suffix(".json")) if args.append else {"runs": [], "rows": []}
    runs = list(old["runs"]) + [env]
    run = len(runs) - 1
    env["model"], env["bos"], env["calibration_tokens_in_corpus"] = name, use_bos, calib["tokens"]
    env["budget"] = {k: getattr(args, k) for k in ("calib_samples", "calib_len", "calib_batch", "eval_tokens", "window",
                                                   "mc", "mc_limit")}
    new: list[dict] = []

    def record(row: dict) -> None:
        row["run"] = run
        new.append(row)
        write(merge(old.get("rows", []), new), runs, protocol, stem)

    if not args.no_dense:
        ev = perplexity(model, stream, args.window, args.bos_id)
        record({"model": name, "method": "dense", "slicing": 0.0, "basis": None, "settings": "dense",
                "ppl": ev["ppl"], "params": sum(p.numel() for p in model.parameters()), "seconds": 0.0, **ev,
                "mc": multiple_choice(model, tok, data_dir, args)})
    del model
    for method in args.methods.split(","):
        for sp in (float(x) for x in args.slicings.split(",")):
            for setting in args.settings.split(","):
                options = setting_options(method, setting)
                m = get(method, slicing=sp, progress=False, **options)
                model, _ = load()
                t0 = time.perf_counter()
                error = None
                try:
                    result = hf_prune.prune(model, m, batches)
                except ValueError as e:  # a refused plan or a failed perplexity check: recorded, not fatal
                    error = f"{type(e).__name__}: {e}"
                seconds = time.perf_counter() - t0
                row = {"model": name, "method": method, "slicing": sp, "settings": setting, "overrides": options,
                       "seconds": seconds}
                if error:
                    row.update(basis=options.get("basis", "auto"), ppl=None, params=None, error=error)
                    print(json.dumps(row), flush=True)
                    record(row)
                    continue
                prov = result.plan.provenance
                ev = perplexity(model, stream, args.window, args.bos_id)
                row.update(basis=result.plan.residual_widths["basis"], ppl=ev["ppl"],
                           params=sum(p.numel() for p in model.parameters()), scored_tokens=ev["scored_tokens"],
                           head=prov.get("head"), calibration_check=prov.get("calibration_check"),
                           basis_choice=prov.get("basis_choice"), schedule_note=prov.get("schedule_note"),
                           average_slicing=prov.get("average_slicing"), reader_basis=_reader_summary(prov),
                           mc=multiple_choice(model, tok, data_dir, args))
                print(json.dumps({k: row[k] for k in ("method", "slicing", "settings", "basis", "ppl", "params",
                                                       "seconds")}), flush=True)
                record(row)
                del model


if __name__ == "__main__":
    main()
