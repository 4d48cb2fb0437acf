"""Cost at Llama-3.1-8B width on this CPU (issue 18, item 2, reduced): seconds per layer and peak memory.

Random-weight models with Llama-3.1-8B's layer shapes (hidden 4096, 32 query / 8 kv heads, intermediate 14336,
vocabulary 128,256), 2 and 4 decoder layers, bf16, built in code (no download). For each depth, one worker process
builds the model and runs, one after the other:

- forward:       one plain backbone forward over the calibration tokens (4 x 256), the reference for scoring cost;
- shortgpt:      ShortGPT's block-influence scoring (n_remove=1);
- angular_block: the angular-distance block scoring (n_remove=1);
- llm_pruner:    one LLM-Pruner step (Taylor gradient pass over every layer, selection; chunked loss);
- taylor_full_logits: the same gradient pass with `chunk_tokens=None` (all logits at once: the path before the fix);
- perplexity_full_logits / perplexity: `hf_prune.evaluate.perplexity` over 1,024 tokens (2 windows of 512 in one
  batch) with `chunk_tokens=None` (the model's own forward, full logits: before) and the default chunks (after).

Peak memory per task: the kernel's peak resident set (VmHWM) reset before the task (/proc/self/clear_refs), with
glibc's mmap threshold fixed so that freed large buffers go back to the OS between tasks; "added" is the peak minus
the resident set before the task (the weights and what earlier tasks left).
Writes benchmarks/results/scale_cpu.{json,md}.

    nice python benchmarks/scale_cpu.py                # both depths, every task (~10 minutes on 2 shared cores)
    python benchmarks/scale_cpu.py --layers 2 --tasks perplexity perplexity_full_logits
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
TASKS = ("forward", "shortgpt", "angular_block", "llm_pruner", "taylor_full_logits", "perplexity_full_logits",
         "perplexity")
SHAPES = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
              vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
CALIB_ROWS, CALIB_LEN, PPL_TOKENS, PPL_WINDOW = 4, 256, 1024, 512


# ----- worker ---------------------------------------------------------------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def build_model(layers: int):
    """A random bf16 LlamaForCausalLM at 8B width: built on the meta device, then filled by tiling one random block
    (torch's own init of ~2B parameters takes minutes on this CPU; the values only need a plausible scale)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=layers, **SHAPES)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    block = (torch.randn(1 << 22, generator=g) * 0.02).to(torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            for s in range(0, flat.numel(), block.numel()):
                n = min(block.numel(), flat.numel() - s)
                flat[s : s + n].copy_(block[:n])
        rotary = model.model.rotary_emb
        model.model.rotary_emb = type(rotary)(config=cfg)  # buffers (inv_freq) were left empty by to_empty
    return model.eval()


def worker(layers: int, tasks: list[str]) -> dict:
    import torch

    from hf_prune.arch import get_adapter
    from hf_prune.assets import default_corpus, smollm2_path
    from hf_prune.data import batches as make_batches
    from hf_prune.data import token_blocks
    from hf_prune.evaluate import perplexity
    from hf_prune.losses import DEFAULT_CHUNK_TOKENS
    from hf_prune.methods import get
    from hf_prune.methods.importance import compute_importance
    from transformers import AutoTokenizer

    os.environ.setdefault("HF_PRUNE_NO_PROGRESS", "1")
    t0 = time.perf_counter()
    model = build_model(layers)
    build_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    tok = AutoTokenizer.from_pretrained(smollm2_path())  # any tokenizer: ids < 49,152 fit the 128k vocabulary
    blocks = token_blocks(tok, default_corpus("calibration"), n_samples=CALIB_ROWS, seq_len=CALIB_LEN, seed=0)
    calib = make_batches(blocks, CALIB_ROWS)
    eval_text = default_corpus("evaluation")
    ad = get_adapter(model)

    def forward():
        with torch.no_grad():
            for b in calib:
                ad.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False)

    def llm_pruner():
        return get("llm_pruner", target=0.2, skip_first_layers=0, skip_last_layers=0, progress=False).plan(model, calib)

    def taylor_full():
        return compute_importance(model, calib, list(range(layers)), "taylor", progress=False, chunk_tokens=None)

    def ppl(chunk):
        return lambda: perplexity(model, tok, eval_text, window=PPL_WINDOW, batch_size=2, max_tokens=PPL_TOKENS,
                                  bos=False, chunk_tokens=chunk)

    runs = {
        "forward": forward,
        "shortgpt": lambda: get("shortgpt", n_remove=1, progress=False).plan(model, calib),
        "angular_block": lambda: get("angular_block", n_remove=1, progress=False).plan(model, calib),
        "llm_pruner": llm_pruner,
        "taylor_full_logits": taylor_full,
        "perplexity_full_logits": ppl(None),
        "perplexity": ppl(DEFAULT_CHUNK_TOKENS),
    }
    rows = []
    for task in tasks:
        fn = runs[task]
        before = _status("VmRSS")
        exact = _reset_peak()
        t = time.perf_counter()
        out = fn()
        seconds = time.perf_counter() - t
        peak = _status("VmHWM") if exact else max(_status("VmHWM"), before)
        row = {"layers": layers, "task": task, "seconds": round(seconds, 2),
               "seconds_per_layer": round(seconds / layers, 2),
               "rss_before_gb": round(before / 1e9, 3), "peak_rss_gb": round(peak / 1e9, 3),
               "added_gb": round((peak - before) / 1e9, 3), "peak_exact": exact}
        if isinstance(out, dict) and "perplexity" in out:
            row["nll"] = out["nll"]
            row["tokens"] = out["tokens"]
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        del out
    return {"layers": layers, "build_seconds": round(build_s, 1), "weights_gb": round(weights / 1e9, 3),
            "threads": torch.get_num_threads(), "rows": rows}


# ----- driver ---------------------------------------------------------------------------------------------------------


def _versions() -> dict:
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "hf_prune"], cwd=REPO, capture_output=True,
                                text=True).stdout.strip())
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "hf_prune_commit": commit + ("+dirty" if dirty else "")}


def _machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    mem = 0
    try:
        import psutil

        mem = psutil.virtual_memory().total
    except ImportError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(), "memory_gb": round(mem / 1e9, 1)}


def _markdown(result: dict) -> str:
    m, v = result["machine"], result["versions"]
    lines = [
        "# Cost at Llama-3.1-8B width on this CPU (issue 18, item 2, reduced)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['platform']}  ",
        f"Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, hf-prune "
        f"{v['hf_prune_commit']}  ",
        f"Load average before / after: {result['load_before']} / {result['load_after']}. **The CPU is shared by "
        "several engineers' jobs**: seconds are indicative (other processes competed for the 2 cores); memory "
        "figures are per process and not affected.",
        "",
        "Random bf16 weights with Llama-3.1-8B's shapes (hidden 4096, 32/8 heads, intermediate 14336, vocabulary "
        f"128,256). Calibration: {CALIB_ROWS} x {CALIB_LEN} tokens in one batch. Perplexity: {PPL_TOKENS} tokens in "
        f"windows of {PPL_WINDOW}, one batch of 2. Peak = the process's peak resident set during the task "
        "(VmHWM reset before it); added = peak minus the resident set before the task.",
        "",
        "| layers | task | seconds | s / layer | RSS before (GB) | peak RSS (GB) | added (GB) |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for depth in result["depths"]:
        for r in depth["rows"]:
            lines.append(f"| {r['layers']} | {r['task']} | {r['seconds']:.1f} | {r['seconds_per_layer']:.1f} | "
                         f"{r['rss_before_gb']:.2f} | {r['peak_rss_gb']:.2f} | {r['added_gb']:.2f} |")
    lines += ["", "Weights: " + ", ".join(f"{d['layers']} layers {d['weights_gb']:.2f} GB (built in "
                                          f"{d['build_seconds']:.0f} s)" for d in result["depths"]) + "."]
    notes = []
    for depth in result["depths"]:
        by = {r["task"]: r for r in depth["rows"]}
        if "perplexity" in by and "perplexity_full_logits" in by:
            a, b = by["perplexity_full_logits"], by["perplexity"]
            notes.append(f"- {depth['layers']} layers, perplexity: added memory {a['added_gb']:.2f} GB with full "
                         f"logits -> {b['added_gb']:.2f} GB chunked; {a['seconds']:.1f} s -> {b['seconds']:.1f} s; "
                         f"NLL {a['nll']:.6f} vs {b['nll']:.6f}.")
        if "llm_pruner" in by and "taylor_full_logits" in by:
            a, b = by["taylor_full_logits"], by["llm_pruner"]
            notes.append(f"- {depth['layers']} layers, Taylor gradient pass: added memory {a['added_gb']:.2f} GB with "
                         f"full logits -> {b['added_gb']:.2f} GB chunked (LLM-Pruner step, selection included); "
                         f"{a['seconds']:.1f} s -> {b['seconds']:.1f} s.")
        if "forward" in by:
            for k in ("shortgpt", "angular_block"):
                if k in by:
                    notes.append(f"- {depth['layers']} layers, {k}: {by[k]['seconds'] / by['forward']['seconds']:.2f}"
                                 " plain backbone forwards.")
    if notes:
        lines += ["", "Before / after the chunked losses (hf_prune.losses):", "", *notes]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.layers[0], args.tasks)))
        return
    load_before = [round(x, 2) for x in os.getloadavg()]
    depths = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "HF_PRUNE_NO_PROGRESS": "1"}
    for layers in args.layers:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--layers", str(layers), "--tasks",
               *args.tasks]
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"worker for {layers} layers failed (exit {proc.returncode})")
        depths.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    result = {
        "command": "python " + " ".join(["benchmarks/scale_cpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": _machine(), "versions": _versions(), "load_before": load_before,
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "note": "CPU shared with other engineers' jobs: seconds are indicative; memory is per process.",
        "depths": depths,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "scale_cpu.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
