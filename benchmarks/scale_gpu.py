"""Cost at Llama-3.1-8B's full shape on a GPU (issue 18, item 4): every method's calibration pass, 32 layers.

A random bf16 LlamaForCausalLM with Llama-3.1-8B's shapes (32 layers, hidden 4096, 32 / 8 heads, intermediate
14336, vocabulary 128,256) is built directly on the GPU (weights' values do not matter for cost). Calibration: 8 x
2048 random token ids in batches of 4. Then, one after the other, each method's first stage (`method.plan(model,
batches, stage=0)`: its calibration pass and scoring, no surgery): forward (reference), shortgpt, angular_block,
iterabre (one selection: L + L(L-1)/2 layer forwards), magnitude, llm_pruner, pip, llm_surgeon, slicegpt,
dynamic_slicing (slicing methods last: their plan rotates the model in place), and perplexity over 8,192 tokens.

Per method: seconds, peak CUDA memory (`torch.cuda.max_memory_allocated`, reset before), FLOPs counted from the shapes
where the pass is a plain forward/backward (as in scale_cpu.py) against the measured bf16 GEMM throughput
(utilisation), or the error. A method is skipped once 7 minutes have passed, so the whole run stays under 8 minutes.
Writes benchmarks/results/scale_gpu.{json,md} after every method. Without CUDA it prints why and exits with status 2;
nothing is written.

    python benchmarks/scale_gpu.py                     # on a machine with a CUDA GPU
    python benchmarks/scale_gpu.py --methods shortgpt iterabre --layers 8
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHAPES = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
              vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False)
LINEAR_PARAMS = 4096 * (4096 + 2 * 8 * 128) + 4096 * 4096 + 3 * 4096 * 14336  # one decoder layer
METHODS = ("forward", "shortgpt", "angular_block", "iterabre", "magnitude", "llm_pruner", "pip", "llm_surgeon",
           "perplexity", "slicegpt", "dynamic_slicing")
BUDGET_S = 7 * 60


def layer_flops(tokens: int, seq_len: int) -> float:
    return 2.0 * LINEAR_PARAMS * tokens + 2.0 * seq_len * SHAPES["hidden_size"] * tokens


def counted_flops(method: str, layers: int, tokens: int, seq_len: int) -> float | None:
    """FLOPs of the pass where it is a plain forward (backward = 2 forwards); None where the method's own algebra
    (K-FAC, PCA, rotations) dominates and is not counted."""
    per = layer_flops(tokens, seq_len)
    head = 2.0 * SHAPES["hidden_size"] * SHAPES["vocab_size"] * tokens
    if method in ("forward", "shortgpt", "angular_block"):
        return layers * per
    if method == "iterabre":
        return (layers + layers * (layers - 1) / 2) * per
    if method == "llm_pruner":
        return 3 * (layers * per + head)
    if method == "pip":
        return 2 * 3 * (layers * per + head)  # clean and perturbed gradient passes
    if method == "perplexity":
        return layers * per + head
    return None


def build_model(layers: int):
    """Random bf16 Llama at 8B shapes, built on the meta device and filled on the GPU."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(num_hidden_layers=layers, **SHAPES)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=g)
        model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg, device="cuda")
    return model.eval()


def matmul_tflops(dtype_name: str, n: int = 8192, reps: int = 10) -> float:
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n, device="cuda", dtype=dtype), torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    torch.cuda.synchronize()
    return 2.0 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def _versions() -> dict:
    import torch
    import transformers

    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "cuda": torch.version.cuda, "hf_prune_commit": commit}


def _markdown(result: dict) -> str:
    lines = [
        "# Cost at Llama-3.1-8B's full shape on a GPU (issue 18, item 4)",
        "",
        f"Command: `{result['command']}`  ",
        f"Device: {result['device']}; versions: {result['versions']}  ",
        f"Model: random bf16, {result['layers']} layers at 8B shapes ({result['weights_gb']:.1f} GB, built in "
        f"{result['build_seconds']:.0f} s). Calibration: {result['rows']} x {result['seq_len']} tokens in batches of "
        f"{result['batch_size']}. Measured GEMM throughput: bf16 {result['tflops']['bfloat16']:.0f} TFLOP/s, fp32 "
        f"{result['tflops']['float32']:.0f} TFLOP/s. Total {result['total_seconds']:.0f} s.",
        "",
        "| method | status | seconds | peak CUDA memory (GB) | counted TFLOP | utilisation (bf16) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in result["methods"]:
        tf = r.get("tflop")
        util = f"{tf / r['seconds'] / result['tflops']['bfloat16']:.2f}" if tf and r.get("seconds") else "-"
        lines.append(f"| {r['method']} | {r['status']} | {r.get('seconds', 0):.1f} | {r.get('peak_gb', 0):.1f} | "
                     f"{tf if tf is not None else '-'} | {util} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("scale_gpu.py: no CUDA device on this machine (torch.cuda.is_available() is False); nothing was "
              "measured and no result was written. Run it where a GPU is lent.", file=sys.stderr)
        return 2
    from hf_prune.evaluate import perplexity
    from hf_prune.methods import get
    from hf_prune.methods.iterabre import layer_removal_scores
    from hf_prune.runtime import eval_mode

    start = time.perf_counter()
    tflops = {d: matmul_tflops(d) for d in ("bfloat16", "float32")}
    t = time.perf_counter()
    model = build_model(args.layers)
    torch.cuda.synchronize()
    build_s = time.perf_counter() - t
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, SHAPES["vocab_size"], (args.rows, args.seq_len), generator=g)
    batches = [{"input_ids": ids[i : i + args.batch_size].cuda(),
                "attention_mask": torch.ones_like(ids[i : i + args.batch_size]).cuda()}
               for i in range(0, args.rows, args.batch_size)]
    tokens = args.rows * args.seq_len

    class _Tok:  # perplexity needs a tokenizer only for its stream; feed ids through a pass-through
        bos_token_id = 1

        def __call__(self, text, add_special_tokens=False, verbose=False):
            return {"input_ids": [int(x) for x in text.split()]}

    ppl_text = " ".join(str(int(x)) for x in ids.reshape(-1)[:8192])

    def forward():
        with eval_mode(model):
            for b in batches:
                model.model(**b, use_cache=False)

    runs = {
        "forward": forward,
        "shortgpt": lambda: get("shortgpt", n_remove=8, progress=False).plan(model, batches),
        "angular_block": lambda: get("angular_block", n_remove=8, progress=False).plan(model, batches),
        "iterabre": lambda: layer_removal_scores(model, batches, progress=False),
        "magnitude": lambda: get("magnitude").plan(model, batches, stage=0),
        "llm_pruner": lambda: get("llm_pruner").plan(model, batches, stage=0),
        "pip": lambda: get("pip").plan(model, batches, stage=0),
        "llm_surgeon": lambda: get("llm_surgeon").plan(model, batches, stage=0),
        "perplexity": lambda: perplexity(model, _Tok(), ppl_text, window=2048, batch_size=4, bos=False),
        "slicegpt": lambda: get("slicegpt").plan(model, batches, stage=0),
        "dynamic_slicing": lambda: get("dynamic_slicing").plan(model, batches, stage=0),
    }
    result = {
        "command": "python " + " ".join(["benchmarks/scale_gpu.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": torch.cuda.get_device_name(0), "versions": _versions(), "layers": args.layers, "rows": args.rows,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "tflops": {k: round(v, 1) for k, v in tflops.items()},
        "build_seconds": round(build_s, 1),
        "weights_gb": round(sum(p.numel() * p.element_size() for p in model.parameters()) / 1e9, 2),
        "methods": [], "total_seconds": 0.0,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.methods:
        row: dict = {"method": name}
        if time.perf_counter() - start > BUDGET_S:
            row["status"] = f"skipped: the {BUDGET_S // 60}-minute budget was spent"
        else:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            t = time.perf_counter()
            try:
                runs[name]()
                torch.cuda.synchronize()
                row["status"] = "ok"
            except Exception as e:  # noqa: BLE001 - one method's failure is recorded, the others still run
                row["status"] = f"error: {type(e).__name__}: {str(e)[:300]}"
                row["traceback"] = traceback.format_exc()[-2000:]
            row["seconds"] = round(time.perf_counter() - t, 2)
            row["peak_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            flops = counted_flops(name, args.layers, tokens if name != "perplexity" else 8192, args.seq_len)
            row["tflop"] = round(flops / 1e12, 1) if flops is not None and row["status"] == "ok" else None
            torch.cuda.empty_cache()
        result["methods"].append(row)
        result["total_seconds"] = round(time.perf_counter() - start, 1)
        (args.out / "scale_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "scale_gpu.md").write_text(_markdown(result))
        print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
