"""Serving hf-prune's exports with vLLM (GPU only): does each format load, does it agree with transformers, how fast.

Needs `vllm` and a CUDA device; without them it prints why and exits with status 2, writing nothing (no result is
ever estimated or faked). The models are the ones `benchmarks/serving.py` makes (offline SmolLM2: dense, LLM-Pruner
target 0.1 with per-layer widths, ShortGPT with 6 layers removed), reused from `--work-dir` when it holds them (run
`serving.py --work-dir DIR` first, or let this script prune them). Each is offered to vLLM twice:

- the Hugging Face export folder (`config.json` + safetensors): the standard `llama` config of dense and ShortGPT
  loads natively; the per-layer `pruned_llama` config has no native vLLM class (vLLM's DeciLM loader varies kv heads
  and MLP widths per layer but not query heads), so it is tried through vLLM's Transformers backend with
  `trust_remote_code=True` (the export carries its modeling files);
- the f16 GGUF file hf-prune writes (`llama` for uniform results, `deci` for per-layer ones), with the folder's
  tokenizer.

A format vLLM refuses is a row with its error, not a number. For each that loads: greedy 32-token equality with
transformers, perplexity of the prompt tokens in both engines (vLLM's prompt_logprobs), and prefill / decode tokens/s
at each batch size as a ratio to the ideal (dense time in the same engine and format x parameter ratio).

    python benchmarks/serving_vllm.py --work-dir /tmp/serving      # on a machine with a GPU and vllm installed
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

MODELS = ("dense", "llm_pruner_0.1", "shortgpt_6")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", required=True, help="folder with (or for) the pruned exports and GGUF files")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--repeats", type=int, default=3, help="timing repeats (best is reported)")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.3)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving_vllm.json"))
    return p.parse_args(argv)


def unavailable() -> str | None:
    """Why this benchmark cannot run here, or None."""
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install vllm, on a machine with a CUDA GPU)"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible (vLLM's GPU engine is what this benchmark measures)"
    return None


def prepare(work: Path) -> dict[str, dict[str, Path]]:
    """{model: {"hf": folder, "gguf": f16 file}}, pruning and writing what the work folder lacks."""
    import serving

    from hf_prune.gguf import to_gguf

    work.mkdir(parents=True, exist_ok=True)
    folders = serving.prune_variants(work, serving.parse_args(["--work-dir", str(work)]))
    out = {}
    for name in MODELS:
        gguf_file = work / f"{name}.f16.gguf"
        if not gguf_file.is_file():
            to_gguf(folders[name], gguf_file, dtype="f16")
        out[name] = {"hf": folders[name], "gguf": gguf_file}
    return out


def open_vllm(fmt: str, files: dict[str, Path], args):
    from vllm import LLM

    common = {"gpu_memory_utilization": args.gpu_memory_utilization, "enforce_eager": True, "seed": 0,
              "max_model_len": args.prompt_len + args.decode_tokens + 8}
    if fmt == "hf":
        config = json.loads((files["hf"] / "config.json").read_text())
        if str(config.get("model_type", "")).startswith("pruned_"):
            return LLM(model=str(files["hf"]), trust_remote_code=True, model_impl="transformers", **common)
        return LLM(model=str(files["hf"]), **common)
    return LLM(model=str(files["gguf"]), tokenizer=str(files["hf"]), **common)


def timing(llm, prompt: list[int], batch: int, n_decode: int) -> tuple[float, float]:
    """(prefill seconds, decode seconds) of `batch` copies of `prompt`: one generated token, then 1 + n_decode."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": list(prompt)} for _ in range(batch)]
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    t1 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1 + n_decode, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    t2 = time.perf_counter()
    return t1 - t0, max((t2 - t1) - (t1 - t0), 1e-9)


def agreement(llm, hf_model, prompt: list[int]) -> dict[str, Any]:
    """Greedy 32 tokens and prompt perplexity in vLLM vs transformers (fp32 on the GPU)."""
    import torch
    from vllm import SamplingParams

    out = llm.generate([{"prompt_token_ids": prompt}],
                       SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, prompt_logprobs=0),
                       use_tqdm=False)[0]
    got = list(out.outputs[0].token_ids)
    # prompt_logprobs=0: each position's entry holds the prompt token's own logprob (the first position has none)
    nll_vllm = -sum(lp[tok].logprob for tok, lp in zip(prompt[1:], out.prompt_logprobs[1:]))
    ids = torch.tensor([prompt], device="cuda")
    with torch.no_grad():
        logits = hf_model(ids).logits[0].float()
        nll_hf = float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
        ref, past, inp = [], None, ids
        for _ in range(32):  # greedy with the KV cache, not stopping at EOS (as ignore_eos above)
            res = hf_model(inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            ref.append(int(res.logits[0, -1].argmax()))
            inp = torch.tensor([[ref[-1]]], device="cuda")
    n = len(prompt) - 1
    return {"greedy32_equal": got == ref, "ppl_transformers": math.exp(nll_hf / n),
            "ppl_vllm": math.exp(nll_vllm / n)}


def run(args) -> dict[str, Any]:
    import torch
    import vllm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_prune  # noqa: F401  (registers the pruned classes for the transformers reference)
    from hf_prune import assets

    files = prepare(Path(args.work_dir))
    tok = AutoTokenizer.from_pretrained(files["dense"]["hf"])
    stream = tok("\n\n".join(assets.default_corpus("evaluation"))).input_ids
    prompt = stream[-args.prompt_len:]
    rows = []
    for fmt in ("hf", "gguf"):
        for name in MODELS:
            row: dict[str, Any] = {"model": name, "format": fmt, "file": str(files[name][fmt])}
            hf_model = AutoModelForCausalLM.from_pretrained(files[name]["hf"], dtype=torch.float32).cuda().eval()
            row["parameters"] = sum(p.numel() for p in hf_model.parameters())
            try:
                llm = open_vllm(fmt, files[name], args)
            except Exception as e:  # noqa: BLE001  (a refusal is a result: recorded, not hidden)
                llm = None
                row.update(loaded=False, error=f"{type(e).__name__}: {e}"[:2000])
            if llm is not None:
                row["loaded"] = True
                row["agreement"] = agreement(llm, hf_model, prompt[:128])
            del hf_model
            if llm is None:
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            row["speed"] = []
            for b in args.batch_sizes:
                timing(llm, prompt[:16], b, 2)  # warm-up
                best = min((timing(llm, prompt, b, args.decode_tokens) for _ in range(args.repeats)),
                           key=lambda t: t[0] + t[1])
                row["speed"].append({"batch": b, "prefill_s": best[0], "decode_s": best[1],
                                     "prefill_tok_s": b * len(prompt) / best[0],
                                     "decode_tok_s": b * args.decode_tokens / best[1]})
            rows.append(row)
            print(json.dumps(row), flush=True)
            del llm
            torch.cuda.empty_cache()
    add_ratios(rows)
    return {"command": "python " + " ".join([str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]]),
            "device": torch.cuda.get_device_name(0), "versions": {"vllm": vllm.__version__,
                                                                 "torch": torch.__version__},
            "prompt_len": len(prompt), "decode_tokens": args.decode_tokens, "rows": rows}


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """Ratio to the ideal (dense time in the same format x parameter ratio); only where dense loaded too."""
    dense = {r["format"]: r for r in rows if r["model"] == "dense" and r.get("loaded")}
    for r in rows:
        d = dense.get(r["format"])
        if not r.get("loaded") or d is None:
            continue
        ratio = r["parameters"] / d["parameters"]
        by_batch = {s["batch"]: s for s in d["speed"]}
        for s in r["speed"]:
            ds = by_batch[s["batch"]]
            s["prefill_ratio"] = ds["prefill_s"] * ratio / s["prefill_s"]
            s["decode_ratio"] = ds["decode_s"] * ratio / s["decode_s"]


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Serving hf-prune's exports with vLLM", "", f"Command: `{result['command']}`  ",
             f"Device: {result['device']}; versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items())
             + ".", "", "| model | format | loads | greedy 32 equal | ppl transformers | ppl vLLM | batch | "
             "prefill tok/s | prefill ratio | decode tok/s | decode ratio |", "|---|---|---|---|---:|---:|---:|---:|"
             "---:|---:|---:|"]
    for r in result["rows"]:
        if not r.get("loaded"):
            lines.append(f"| {r['model']} | {r['format']} | no: {r['error'][:200]} | | | | | | | | |")
            continue
        a = r["agreement"]
        for s in r["speed"]:
            lines.append(f"| {r['model']} | {r['format']} | yes | {a['greedy32_equal']} | {a['ppl_transformers']:.3f} "
                         f"| {a['ppl_vllm']:.3f} | {s['batch']} | {s['prefill_tok_s']:.0f} | "
                         f"{s.get('prefill_ratio', float('nan')):.2f} | {s['decode_tok_s']:.1f} | "
                         f"{s.get('decode_ratio', float('nan')):.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse_args(argv)
    why = unavailable()
    if why is not None:
        print(f"serving_vllm.py: not run: {why}. Nothing was measured and no result file was written.",
              file=sys.stderr)
        return 2
    result = run(args)
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=2, allow_nan=False))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
