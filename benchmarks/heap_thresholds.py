"""What glibc's heap thresholds cost in time: `hf-prune prune` with the thresholds it sets (mmap and trim at 128 KiB,
`hf_prune.runtime.bound_heap_retention`) against glibc's defaults and two wider settings, on the offline SmolLM2.

Each variant is the same CLI command in a fresh process; the variants run in turn (A B C D, A B C D, ...) so that a
drift in the machine's speed reaches every variant alike. Per run: wall, user and system seconds and the peak
resident set, from the kernel's accounting of that child (os.wait4). The table gives medians and each variant's
median ratio to glibc's defaults. The memory side of the trade (Gemma-3-270M, where the thresholds were needed) is
measured by `benchmarks/memory_gemma3.py` with the same settings in the environment (the CLI leaves a threshold set
there as it is); pass those figures with --gemma-peaks to put them in the same table.

    python benchmarks/heap_thresholds.py --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))

#: name -> (environment additions, whether hf-prune's own thresholds are turned off)
VARIANTS: dict[str, tuple[dict[str, str], bool]] = {
    "glibc defaults (dynamic thresholds)": ({}, True),
    "hf-prune: mmap 128 KiB, trim 128 KiB": ({}, False),
    "mmap 4 MiB, trim 4 MiB": ({"MALLOC_MMAP_THRESHOLD_": str(4 << 20), "MALLOC_TRIM_THRESHOLD_": str(4 << 20)}, False),
    "mmap 32 MiB, trim 128 KiB": ({"MALLOC_MMAP_THRESHOLD_": str(32 << 20),
                                   "MALLOC_TRIM_THRESHOLD_": str(128 << 10)}, False),
}
BASELINE = next(iter(VARIANTS))
#: the CLI with bound_heap_retention turned off: glibc's own thresholds for the whole run
_NO_BOUND = ("import sys, hf_prune.runtime as r; r.bound_heap_retention = lambda *a, **k: False; "
             "from hf_prune.cli import main; sys.exit(main())")


def run_once(prune_args: list[str], env_add: dict[str, str], no_bound: bool) -> dict:
    env = {**os.environ, "HF_PRUNE_NO_PROGRESS": "1", **env_add}
    for key in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"):
        if key not in env_add:
            env.pop(key, None)
    head = [sys.executable, "-c", _NO_BOUND] if no_bound else [sys.executable, "-m", "hf_prune.cli"]
    with tempfile.TemporaryFile("w+") as log:  # a file, not a pipe: a child never blocks on a full pipe
        t0 = time.perf_counter()
        proc = subprocess.Popen([*head, "prune", *prune_args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait for it again
        if proc.returncode != 0:
            log.seek(0)
            cli = "hf-prune (its heap thresholds off)" if no_bound else "hf-prune"
            raise SystemExit(f"{cli} prune {' '.join(prune_args)} failed ({proc.returncode}):\n"
                             f"{log.read()[-2000:]}")
    return {"wall_s": round(wall, 2), "user_s": round(usage.ru_utime, 2), "sys_s": round(usage.ru_stime, 2),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}


def _markdown(res: dict) -> str:
    lines = [
        "# glibc heap thresholds: time of `hf-prune prune` (and the memory they were set for)", "",
        f"Command: `{res['command']}`; each run: `{res['row_command']}`  ",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, {res['machine']['memory_gb']} GB; "
        f"{res['machine']['platform']}; load average {res['load_before']} -> {res['load_after']}  ",
        f"Versions: {res['versions']}  ", "",
        f"{res['repeats']} runs of each variant, in turn; medians; ratio = the variant's median / the median with "
        "glibc's defaults.", "",
        "| variant | wall s | user s | sys s | wall ratio | sys ratio | peak RSS GB (SmolLM2 run) | Gemma-3-270M "
        "Dynamic Slicing peak GB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = res["medians"][BASELINE]
    for name, m in res["medians"].items():
        gem = res.get("gemma_peaks", {}).get(name)
        lines.append(f"| {name} | {m['wall_s']:.1f} | {m['user_s']:.1f} | {m['sys_s']:.1f} | "
                     f"{m['wall_s'] / base['wall_s']:.3f} | {m['sys_s'] / base['sys_s']:.2f} | "
                     f"{m['peak_rss_gb']:.2f} | {'-' if gem is None else f'{gem:.3f}'} |")
    if res.get("notes"):
        lines += ["", *res["notes"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from scale_cpu import _machine, versions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--method", default="slicegpt")
    ap.add_argument("--gemma-peaks", type=json.loads, default={},
                    help='JSON {variant name: GB} from memory_gemma3.py runs with the same environment')
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--out", type=Path, default=RESULTS / "heap_thresholds")
    args = ap.parse_args(argv)
    out_dir = Path(os.environ.get("TMPDIR", "/tmp")) / f"hf_prune_heap_{os.getpid()}"
    prune_args = ["--method", args.method, "--n-samples", "8", "--seq-len", "128", "--max-tokens", "2048",
                  "-o", str(out_dir), "--overwrite"]
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    for i in range(args.repeats):
        for name, (env_add, no_bound) in VARIANTS.items():
            runs[name].append(run_once(prune_args, env_add, no_bound))
            print(f"[{time.strftime('%H:%M:%S')}] {i + 1}/{args.repeats} {name}: {runs[name][-1]}", flush=True)
    medians = {name: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for name, rs in runs.items()}
    res = {"command": "python benchmarks/heap_thresholds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "row_command": "hf-prune prune " + " ".join(prune_args[:-3]) + " -o <tmp> --overwrite",
           "machine": _machine(), "versions": versions(), "repeats": args.repeats, "load_before": load_before,
           "load_after": [round(x, 2) for x in os.getloadavg()], "runs": runs, "medians": medians,
           "gemma_peaks": args.gemma_peaks, "notes": args.note}
    shutil.rmtree(out_dir, ignore_errors=True)  # this run's own output folder
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(res))
    print(_markdown(res))


if __name__ == "__main__":
    main()
