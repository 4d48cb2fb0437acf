"""One table over several `benchmarks/llm_surgeon.py` result files (damping, calibration text, weight-update ablations).

    python benchmarks/llm_surgeon_summary.py                      # the default files below, if present
    python benchmarks/llm_surgeon_summary.py a.json b.json --out benchmarks/results/x.md

Each row: the file's calibration text and damping, the run's criterion (marked when the weight update departs from
the default), target, perplexity (and ratio to that file's dense model) and mean multiple-choice accuracy.
Nothing is re-measured: the numbers are those the benchmark wrote.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llm_surgeon import _label  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT = ["llm_surgeon.json", "llm_surgeon_damping_0.1.json", "llm_surgeon_damping_1.0.json", "llm_surgeon_damping_10.json",
           "llm_surgeon_damping_1.0_unstructured.json", "llm_surgeon_damping_1.0_24.json",
           "llm_surgeon_wiki_calibration.json", "llm_surgeon_ablation_no_update.json",
           "llm_surgeon_ablation_kobd_update.json"]


def rows(path: Path) -> list[dict]:
    res = json.loads(path.read_text())
    cfg, dense = res["config"], res["dense"]
    calib = Path(cfg.get("calib") or "austen").name
    out = []
    for r in res["runs"]:
        damping = r.get("damping")
        if damping is None:  # runs written before the damping was recorded: the method's defaults
            g = cfg.get("damping_g")
            damping = [g if g is not None else (0.01 if r["mode"] == "structured" else 0.1), cfg.get("damping_a", 0.01)]
        out.append({"file": path.name, "calib": calib, "damping": damping, "mode": r["mode"],
                    "criterion": _label(r), "target": r["target"], "ppl": r["perplexity"],
                    "ratio": r["perplexity"] / dense["perplexity"], "acc": r["mc_mean_acc"],
                    "dense_ppl": dense["perplexity"]})
    return out


def main(argv=None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="*", help="result JSON files (default: the LLM Surgeon diagnostics in results/)")
    p.add_argument("--out", default=str(RESULTS / "llm_surgeon_diagnostics.md"))
    args = p.parse_args(argv)
    files = [Path(f) for f in args.files] or [RESULTS / f for f in DEFAULT if (RESULTS / f).is_file()]
    all_rows = [r for f in files for r in rows(f)]
    all_rows.sort(key=lambda r: (r["mode"], r["target"], r["criterion"], r["calib"], r["damping"]))
    lines = ["# LLM Surgeon diagnostics: damping, calibration text, weight-update ablations", "",
             f"Command: `python benchmarks/llm_surgeon_summary.py` over {', '.join(f.name for f in files)} "
             "(each written by `benchmarks/llm_surgeon.py`; commands inside each JSON).", "",
             "| mode | target | criterion | calibration | damping G / A | ppl | ppl ratio | mc acc | file |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in all_rows:
        lines.append(f"| {r['mode']} | {r['target']:.2f} | {r['criterion']} | {r['calib']} | "
                     f"{r['damping'][0]:g} / {r['damping'][1]:g} | {r['ppl']:.2f} | {r['ratio']:.3f} | "
                     f"{r['acc']:.3f} | {r['file']} |")
    text = "\n".join(lines) + "\n"
    Path(args.out).write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
