"""Peak memory of `hf-prune prune` on Gemma-3-270M, every method with its defaults (issue 18, item 3).

Each method runs in its own process through the CLI:

    hf-prune prune --method M --model <gemma3_path()> --corpus <austen> --n-samples 8 --seq-len 256
                   --text <wiki_en.txt> --max-tokens 4096 -o <tmp>/M -v

(8 x 256 Austen calibration tokens; perplexity on the first 4,096 wiki tokens before and after pruning, the CLI's
default evaluation batch). The child's peak resident set comes from the kernel (`os.wait4`'s ru_maxrss); its
resident set is also sampled every 0.2 s and lined up with the CLI's log lines (`-v`), so the phase that peaks is
named. The goal (issue 18): peak <= 2.5 x the model's fp32 weight size + one layer's activations.

Gemma's licence forbids committing its weights or anything derived from them: the export folders are written to a
temporary folder and deleted after each run; only the figures are kept.

    nice python benchmarks/memory_gemma3.py --label after           # every method (rows of that label replaced)
    python benchmarks/memory_gemma3.py --methods shortgpt --label before --extra=--eval-batch-size=1

Writes benchmarks/results/memory_gemma3.{json,md} (rewritten after every run; rows of other labels are kept).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from scale_cpu import versions  # noqa: E402  (one record of the versions for both benchmarks)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("HF_PRUNE_DATA", REPO.parent / "shared" / "data"))
METHODS = ("shortgpt", "angular_block", "iterabre", "slicegpt", "dynamic_slicing", "pip", "llm_pruner", "magnitude",
           "llm_surgeon")
N_SAMPLES, SEQ_LEN, EVAL_TOKENS, WINDOW, EVAL_BATCH = 8, 256, 4096, 512, 8
GB = 1e9


def _data_dir() -> Path:
    for d in (DATA, Path("/work/shared/data")):
        if (d / "wiki_en.txt").is_file():
            return d
    raise SystemExit(f"no data folder with wiki_en.txt at {DATA} or /work/shared/data; set HF_PRUNE_DATA")


def goal_bytes(config: dict, num_parameters: int) -> dict:
    """2.5 x fp32 weights + one layer's activations (the largest of the calibration pass, which keeps every batch's
    stream, and one evaluation batch): streams in/out, q/k/v/o, MLP gate/up/act, attention scores, all fp32."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config.get("head_dim", 0)
    per_token = 4 * (2 * hidden + (2 * heads + 2 * kv) * hd + 3 * inter)

    def layer(tokens: int, rows: int, seq: int) -> int:
        return tokens * per_token + 4 * rows * heads * seq * seq

    activations = max(layer(N_SAMPLES * SEQ_LEN, N_SAMPLES, SEQ_LEN), layer(EVAL_BATCH * WINDOW, EVAL_BATCH, WINDOW))
    weights = 4 * num_parameters
    return {"weights_fp32_bytes": weights, "one_layer_activations_bytes": activations,
            "goal_bytes": int(2.5 * weights + activations)}


def _model_info(path: str) -> tuple[dict, int]:
    from safetensors import safe_open

    config = json.loads((Path(path) / "config.json").read_text())
    config = config.get("text_config", config)
    n = 0
    with safe_open(str(Path(path) / "model.safetensors"), "pt") as f:
        for k in f.keys():
            n += _prod(f.get_slice(k).get_shape())
    return config, n


def _prod(shape) -> int:
    out = 1
    for s in shape:
        out *= int(s)
    return out


def run_one(method: str, model_path: str, extra: list[str], workdir: Path) -> dict:
    """One `hf-prune prune` process: exit status, seconds, kernel peak RSS, sampled RSS and the phase at the peak."""
    import psutil

    data = _data_dir()
    out = workdir / method
    cmd = [sys.executable, "-m", "hf_prune.cli", "-v", "prune", "--method", method, "--model", model_path,
           "--corpus", str(data / "austen"), "--n-samples", str(N_SAMPLES), "--seq-len", str(SEQ_LEN),
           "--text", str(data / "wiki_en.txt"), "--max-tokens", str(EVAL_TOKENS), "-o", str(out), "--overwrite",
           *extra]
    env = {**os.environ, "HF_PRUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[tuple[float, str]] = []
    samples: list[tuple[float, int]] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append((time.time() - start, line.rstrip()))

    def sample() -> None:
        try:
            p = psutil.Process(proc.pid)
            while proc.returncode is None:
                samples.append((time.time() - start, p.memory_info().rss))
                time.sleep(0.2)
        except psutil.Error:
            pass

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=sample, daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - start
    threads[0].join(timeout=10)
    evaluations = _evaluations(out)
    shutil.rmtree(out, ignore_errors=True)  # Gemma outputs are never kept (the figures in hf_prune.json are read first)
    peak_t, peak_sampled = max(samples, key=lambda s: s[1]) if samples else (0.0, 0)
    logs = [ln for t, ln in lines if "hf_prune" in ln or "saved" in ln or "error" in ln.lower()]
    logged = [(t, ln) for t, ln in ((_log_time(ln, start), ln) for _, ln in lines) if t is not None]
    phase = next((ln for t, ln in reversed(logged) if t <= peak_t), "(before the first log line)")
    step = max(1, len(samples) // 60)
    return {
        "method": method, "command": "hf-prune " + " ".join(cmd[4:]), "exit": proc.returncode,
        "seconds": round(seconds, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / GB, 3),
        "peak_sampled_gb": round(peak_sampled / GB, 3), "peak_at_s": round(peak_t, 1), "phase_at_peak": phase[-200:],
        "rss_timeline_gb": [[round(t, 1), round(r / GB, 3)] for t, r in samples[::step]],
        "evaluations": evaluations,
        "log_tail": [ln[-300:] for ln in logs[-12:]] if proc.returncode == 0 else [ln[-300:] for _, ln in lines[-25:]],
    }


def _evaluations(out: Path) -> list[dict]:
    """The evaluation records (stage, metric, value, tokens) of the export's hf_prune.json; [] when there is none."""
    try:
        meta = json.loads((out / "hf_prune.json").read_text())
    except (OSError, ValueError):
        return []
    keep = ("stage", "metric", "task", "value", "tokens")
    return [{k: e.get(k) for k in keep if k in e} for e in meta.get("evaluations") or [] if isinstance(e, dict)]


def _perplexity(row: dict) -> str:
    """'base -> pruned' perplexity of a row ('-' where the run recorded none)."""
    ppl = {e.get("stage"): e.get("value") for e in row.get("evaluations") or [] if e.get("metric") == "perplexity"}
    fmt = lambda v: "-" if not isinstance(v, (int, float)) else f"{v:.2f}"  # noqa: E731
    return "-" if not ppl else f"{fmt(ppl.get('base'))} -> {fmt(ppl.get('pruned'))}"


def _log_time(line: str, start: float) -> float | None:
    """Seconds since `start` at which a `-v` log line ('2026-12-01 03:34:23,914 hf_prune...') was written."""
    import datetime

    try:
        stamp = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f")
    except ValueError:
        return None
    return stamp.timestamp() - start


def _machine() -> dict:
    import psutil

    cpu = platform.processor()
    with open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / GB, 1)}


def _markdown(result: dict) -> str:
    g = result["goal"]
    lines = [
        "# Peak memory of `hf-prune prune` on Gemma-3-270M (issue 18, item 3)",
        "",
        "Command: `" + result["command"] + "`; each row is one process: `" + result["row_command"] + "`  ",
        f"Machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, {result['machine']['memory_gb']} "
        f"GB; {result['machine']['platform']}; OMP_NUM_THREADS=1, shared with other engineers' jobs (seconds are "
        "indicative; memory is per process)  ",
        "",
        f"Model: Gemma-3-270M, {result['num_parameters']:,} parameters = {g['weights_fp32_bytes'] / GB:.2f} GB in "
        f"fp32 (262,144-token vocabulary, tied head). Goal: peak RSS <= 2.5 x {g['weights_fp32_bytes'] / GB:.2f} + "
        f"one layer's activations ({g['one_layer_activations_bytes'] / GB:.2f} GB) = **{g['goal_bytes'] / GB:.2f} "
        "GB**. Calibration 8 x 256 Austen tokens, perplexity over the first 4,096 wiki_en tokens (windows of 512) "
        "before and after pruning, every method with its defaults.",
        "",
        "| label | method | extra flags | exit | seconds | peak RSS (GB) | x fp32 weights | within goal | phase at peak "
        "| perplexity base -> pruned |",
        "|---|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in result["rows"]:
        ratio = r["peak_rss_gb"] * GB / g["weights_fp32_bytes"]
        ok = "yes" if r["peak_rss_gb"] * GB <= g["goal_bytes"] else "**no**"
        phase = r["phase_at_peak"].split(": ", 1)[-1].replace("|", "/")[:90]
        lines.append(f"| {r['label']} | {r['method']} | {' '.join(r['extra']) or '-'} | {r['exit']} | {r['seconds']} "
                     f"| {r['peak_rss_gb']:.2f} | {ratio:.2f} | {ok} | {phase} | {_perplexity(r)} |")
    lines += ["", "Versions per label: " + "; ".join(f"{k}: {v}" for k, v in result["versions_by_label"].items())]
    if result.get("notes"):
        lines += ["", *result["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--label", default="after", help="row label, e.g. before / after (rows of this label and "
                                                     "method are replaced)")
    ap.add_argument("--extra", action="append", default=[], help="extra CLI flag(s), e.g. --extra=--eval-batch-size=1")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from hf_prune.assets import gemma3_path

    model_path = gemma3_path()
    config, n_params = _model_info(model_path)
    path = args.out / "memory_gemma3.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    rows = old.get("rows", [])
    versions_by_label = old.get("versions_by_label", {})
    versions_by_label[args.label] = versions()
    extra = [e for x in args.extra for e in x.split("=", 1)] if args.extra else []
    workdir = Path(tempfile.mkdtemp(prefix="hf_prune_mem_"))
    try:
        for method in args.methods:
            row = {"label": args.label, "extra": extra, **run_one(method, model_path, extra, workdir)}
            if path.is_file():  # another run may have added rows, notes or labels meanwhile: merge with what is there now
                now = json.loads(path.read_text())
                rows = now.get("rows", rows)
                old["notes"] = now.get("notes", old.get("notes", []))
                versions_by_label = {**now.get("versions_by_label", {}), args.label: versions_by_label[args.label]}
            rows = [r for r in rows if not (r["label"] == args.label and r["method"] == method
                                            and r["extra"] == extra)] + [row]
            rows.sort(key=lambda r: (r["label"], " ".join(r["extra"]), METHODS.index(r["method"])))
            result = {
                "command": "python benchmarks/memory_gemma3.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                "row_command": "hf-prune -v prune --method M --model <gemma3_path()> --corpus austen --n-samples 8 "
                               "--seq-len 256 --text wiki_en.txt --max-tokens 4096 -o <tmp> --overwrite",
                "machine": _machine(), "versions_by_label": versions_by_label, "num_parameters": n_params,
                "goal": goal_bytes(config, n_params), "notes": old.get("notes", []), "rows": rows,
            }
            args.out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(result, indent=2) + "\n")
            (args.out / "memory_gemma3.md").write_text(_markdown(result))
            print(f"{args.label} {method}: exit {row['exit']}, {row['seconds']} s, peak {row['peak_rss_gb']} GB "
                  f"({row['phase_at_peak'][-100:]})", flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
