"""Cost at Llama-3.1-8B width on this CPU (issue 18, item 2): seconds per layer, peak memory, utilisation.

Random-weight models with Llama-3.1-8B's layer shapes (hidden 4096, 32 query / 8 kv heads, intermediate 14336,
vocabulary 128,256), 2, 4 and 8 decoder layers, bf16, built in code (no download), one thread, `nice`d. For each
depth, one worker process builds the model (and saves it as a safetensors checkpoint for the streamed worker) and
runs, one after the other:

- forward:       one plain backbone forward over the calibration tokens (4 x 256), the reference for scoring cost;
- shortgpt:      ShortGPT's block-influence scoring (n_remove=1);
- angular_block: the angular-distance block scoring (n_remove=1);
- iterabre:      one IteRABRe selection stage (cosine; L + L(L-1)/2 layer forwards with the prefix cache);
- llm_pruner:    one LLM-Pruner step (Taylor gradient pass over every layer, selection; chunked loss);
- taylor_full_logits: the same gradient pass with `chunk_tokens=None` (all logits at once: the path before the fix);
- perplexity_full_logits / perplexity: `hf_prune.evaluate.perplexity` over 1,024 tokens (2 windows of 512 in one
  batch) with `chunk_tokens=None` (the model's own forward, full logits: before) and the default chunks (after);
- pip, magnitude:  the first of their 4 steps with defaults (PIP: clean and perturbed gradient passes; magnitude:
  weight norms only), every layer scored;
- llm_surgeon:   its first of 5 shots with defaults (structured, K-FAC curvature passes, inverses, costs, update);
- llm_surgeon_seq_24: `sequential=True` 2:4 (mode="2:4", shots=1, target=0.5): per layer, input second moment,
  inverse and the column sweep with the adaptive mask;
- dynamic_slicing, slicegpt: their plan with defaults (PCA bases, rotation of the model in place: run last).
  Their algebra (rotations, inverses, sweeps) is not counted in FLOPs: no utilisation for them, and their
  extrapolation is at 8B width only, from a line through two depths (or seconds per layer x 32 from one depth).

A second worker per depth scores the saved checkpoint through `hf_prune.calibration.streamed_model` (decoder layers
and embeddings read from the checkpoint one at a time): streamed_shortgpt, streamed_angular_block,
streamed_iterabre. Its peak is the whole process's, weights included: it must not grow with depth.

FLOPs per pass are counted from the shapes (2 x linear parameters per token per layer, causal attention 2 x t x
hidden per token per layer, the LM head 2 x hidden x vocab per scored token; a backward pass = 2 forwards) and set
against the machine's matmul throughput measured in the same worker (bf16 and fp32, one thread, a 1024 x 4096 x
14336 GEMM): utilisation = FLOPs / seconds / throughput. Extrapolation to 32 layers (8B) and 80 layers (70B depth;
at 70B width the per-layer cost scales by its FLOPs, 3.92x) from the measured seconds per layer-pass.

Peak memory per task: the kernel's peak resident set (VmHWM) reset before the task (/proc/self/clear_refs), with
glibc's mmap threshold fixed so that freed large buffers go back to the OS between tasks; "added" is the peak minus
the resident set before the task (the weights and what earlier tasks left).
Writes benchmarks/results/scale_cpu.{json,md} after every depth.

    nice python benchmarks/scale_cpu.py                 # 2, 4, 8 layers, every task (long on 2 shared cores)
    nice python benchmarks/scale_cpu.py --merge --layers 4 --tasks forward pip  # add rows to the existing results
    python benchmarks/scale_cpu.py --layers 2 --tasks perplexity perplexity_full_logits
    nice python benchmarks/scale_cpu.py --shortgpt-ratio  # ShortGPT vs plain forwards on SmolLM2, 32 x 1024 tokens
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
TASKS = ("forward", "shortgpt", "angular_block", "iterabre", "perplexity_full_logits", "perplexity", "llm_pruner",
         "taylor_full_logits", "pip", "magnitude", "slicegpt", "dynamic_slicing", "llm_surgeon", "llm_surgeon_seq_24")
#: Tasks whose cost is mostly their own algebra (PCA and rotations, K-FAC inverses and updates, weight norms), which
#: is not counted: no GFLOP, no utilisation (as in scale_gpu.py).
ALGEBRA_TASKS = ("magnitude", "slicegpt", "dynamic_slicing", "llm_surgeon", "llm_surgeon_seq_24")
STREAMED_TASKS = ("streamed_shortgpt", "streamed_angular_block", "streamed_iterabre")
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


def write_checkpoint(layers: int, folder: str) -> float:
    """The same random bf16 model as `build_model`, written shard by shard (embeddings, one shard per decoder
    layer, final norm and head) with a safetensors index, never more than one shard in memory; returns seconds."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    t0 = time.perf_counter()
    cfg = LlamaConfig(num_hidden_layers=layers, **SHAPES)
    cfg.torch_dtype = "bfloat16"
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(out)
    g = torch.Generator().manual_seed(0)
    block = (torch.randn(1 << 22, generator=g) * 0.02).to(torch.bfloat16)
    shards: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, p in skeleton.named_parameters():
        key = f"layer{int(name.split('.')[2]):03d}" if ".layers." in name else (
            "embed" if "embed_tokens" in name else "final")
        shards.setdefault(key, []).append((name, p))
    weight_map = {}
    for key, params in shards.items():
        tensors = {}
        for name, p in params:
            if name.endswith("norm.weight") or "layernorm" in name:
                tensors[name] = torch.ones(p.shape, dtype=torch.bfloat16)
                continue
            flat = torch.empty(p.numel(), dtype=torch.bfloat16)
            for s in range(0, flat.numel(), block.numel()):
                n = min(block.numel(), flat.numel() - s)
                flat[s : s + n].copy_(block[:n])
            tensors[name] = flat.view(p.shape)
        file = f"model-{key}.safetensors"
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
        del tensors
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return time.perf_counter() - t0


LINEAR_PARAMS = {  # linear parameters of one decoder layer
    "8b": 4096 * (4096 + 2 * 8 * 128) + 4096 * 4096 + 3 * 4096 * 14336,
    "70b": 8192 * (8192 + 2 * 8 * 128) + 8192 * 8192 + 3 * 8192 * 28672,
}


def layer_flops(tokens: int, seq_len: int, width: str = "8b") -> float:
    """Forward FLOPs of one decoder layer over `tokens` tokens in sequences of `seq_len` (causal attention)."""
    hidden = 4096 if width == "8b" else 8192
    return 2.0 * LINEAR_PARAMS[width] * tokens + 2.0 * seq_len * hidden * tokens


def task_flops(task: str, layers: int, tokens: int, seq_len: int) -> float | None:
    """FLOPs of one task's calibration pass at 8B width (the LM head: 2 x hidden x vocab per token); None for
    ALGEBRA_TASKS."""
    per_layer = layer_flops(tokens, seq_len)
    head = 2.0 * SHAPES["hidden_size"] * SHAPES["vocab_size"] * tokens
    name = task.removeprefix("streamed_")
    if name in ALGEBRA_TASKS:
        return None
    if name in ("forward", "shortgpt", "angular_block"):
        return layers * per_layer
    if name == "iterabre":
        return (layers + layers * (layers - 1) / 2) * per_layer
    if name in ("llm_pruner", "taylor_full_logits"):
        return 3 * (layers * per_layer + head)
    if name == "pip":  # the original and the perturbed view
        return 6 * (layers * per_layer + head)
    if name.startswith("perplexity"):
        return layers * layer_flops(PPL_TOKENS, PPL_WINDOW) + 2.0 * SHAPES["hidden_size"] * SHAPES["vocab_size"] * \
            PPL_TOKENS
    raise ValueError(task)


def layer_passes(task: str, layers: int) -> float:
    """Decoder-layer forwards a task runs (a backward counted as two)."""
    name = task.removeprefix("streamed_")
    if name == "iterabre":
        return layers + layers * (layers - 1) / 2
    if name in ("llm_pruner", "taylor_full_logits"):
        return 3 * layers
    if name == "pip":
        return 6 * layers
    return layers


def matmul_throughput(dtype_name: str, m: int = 1024, k: int = 4096, n: int = 14336, reps: int = 3) -> float:
    """Best-of-`reps` FLOP/s of an (m x k) @ (k x n) GEMM in this process (its thread setting)."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * m * k * n / best


def _measure_task(layers: int, task: str, fn) -> dict:
    """Run `fn` once: seconds, peak RSS (VmHWM reset first), FLOPs; a task that raises gives a row with its error."""
    before = _status("VmRSS")
    exact = _reset_peak()
    t = time.perf_counter()
    try:
        out = fn()
    except Exception as e:  # noqa: BLE001 - the row records the exact error; the other tasks still run
        row = {"layers": layers, "task": task, "error": f"{type(e).__name__}: {e}"[:1000],
               "seconds": round(time.perf_counter() - t, 2)}
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row
    seconds = time.perf_counter() - t
    peak = _status("VmHWM") if exact else max(_status("VmHWM"), before)
    flops = task_flops(task, layers, CALIB_ROWS * CALIB_LEN, CALIB_LEN)
    row = {"layers": layers, "task": task, "seconds": round(seconds, 2), "seconds_per_layer": round(seconds / layers, 2),
           "layer_passes": layer_passes(task, layers),
           "seconds_per_layer_pass": round(seconds / layer_passes(task, layers), 3),
           "rss_before_gb": round(before / 1e9, 3), "peak_rss_gb": round(peak / 1e9, 3),
           "added_gb": round((peak - before) / 1e9, 3), "peak_exact": exact,
           "gflop": None if flops is None else round(flops / 1e9, 1)}
    if isinstance(out, dict) and "perplexity" in out:
        row["nll"] = out["nll"]
        row["tokens"] = out["tokens"]
    prov = getattr(out, "provenance", None)
    if isinstance(prov, dict):
        if "cost" in prov:
            row["provenance_cost"] = prov["cost"]
        for key in ("block_influence", "angular_distance", "scores"):
            if key in prov:
                row["scores"] = [None if x is None else round(float(x), 6) for x in prov[key]]
        row["drop_layers"] = list(getattr(out, "drop_layers", []))
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def streamed_worker(layers: int, checkpoint: str, tasks: list[str]) -> dict:
    """Score the saved checkpoint with its weights streamed one layer at a time (hf_prune.calibration)."""
    import torch

    from hf_prune.assets import default_corpus, smollm2_path
    from hf_prune.calibration import streamed_model
    from hf_prune.data import batches as make_batches
    from hf_prune.data import token_blocks
    from hf_prune.methods import get
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    throughput = {d: matmul_throughput(d) for d in ("bfloat16", "float32")}
    write_s = write_checkpoint(layers, checkpoint)
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    blocks = token_blocks(tok, default_corpus("calibration"), n_samples=CALIB_ROWS, seq_len=CALIB_LEN, seed=0)
    calib = make_batches(blocks, CALIB_ROWS)
    t0 = time.perf_counter()
    model = streamed_model(checkpoint, dtype=torch.bfloat16)
    build_s = time.perf_counter() - t0
    runs = {
        "streamed_shortgpt": lambda: get("shortgpt", n_remove=1, progress=False).plan(model, calib),
        "streamed_angular_block": lambda: get("angular_block", n_remove=1, progress=False).plan(model, calib),
        "streamed_iterabre": lambda: get("iterabre", n_remove=1).plan(model, calib),
    }
    rows = [dict(_measure_task(layers, task, runs[task]), matmul_bf16_gflops=round(throughput["bfloat16"] / 1e9, 1))
            for task in tasks]
    return {"layers": layers, "streamed_build_seconds": round(build_s, 1), "checkpoint_write_seconds":
            round(write_s, 1), "matmul_flops": {k: round(v / 1e9, 1) for k, v in throughput.items()}, "rows": rows}


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
    torch.set_num_threads(1)
    throughput = {d: matmul_throughput(d) for d in ("bfloat16", "float32")}
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

    every_layer = dict(skip_first_layers=0, skip_last_layers=0, progress=False)  # 2-4 layers: none kept aside
    runs = {
        "forward": forward,
        # one stage of each method with its defaults (pip, magnitude: step 1 of 4; llm_surgeon: shot 1 of 5)
        "pip": lambda: get("pip", tokenizer=tok, **every_layer).plan(model, calib),
        "magnitude": lambda: get("magnitude", **every_layer).plan(model, calib),
        "slicegpt": lambda: get("slicegpt", progress=False).plan(model, calib),
        "dynamic_slicing": lambda: get("dynamic_slicing", progress=False).plan(model, calib),
        "llm_surgeon": lambda: get("llm_surgeon", verbose=False).plan(model, calib),
        "llm_surgeon_seq_24": lambda: get("llm_surgeon", mode="2:4", shots=1, target=0.5, sequential=True,
                                          verbose=False).plan(model, calib),
        "shortgpt": lambda: get("shortgpt", n_remove=1, progress=False).plan(model, calib),
        "angular_block": lambda: get("angular_block", n_remove=1, progress=False).plan(model, calib),
        "iterabre": lambda: get("iterabre", n_remove=1).plan(model, calib),
        "llm_pruner": llm_pruner,
        "taylor_full_logits": taylor_full,
        "perplexity_full_logits": ppl(None),
        "perplexity": ppl(DEFAULT_CHUNK_TOKENS),
    }
    rows = [dict(_measure_task(layers, task, runs[task]), matmul_bf16_gflops=round(throughput["bfloat16"] / 1e9, 1))
            for task in tasks]
    return {"layers": layers, "build_seconds": round(build_s, 1), "weights_gb": round(weights / 1e9, 3),
            "threads": torch.get_num_threads(), "matmul_flops": {k: round(v / 1e9, 1) for k, v in throughput.items()},
            "rows": rows}


def shortgpt_ratio(rows: int = 32, seq_len: int = 1024, batch_size: int = 4, repeats: int = 1) -> dict:
    """ShortGPT's block-influence scoring against plain forwards on SmolLM2, in one process (issue 18: at most 1.2).

    Over the same `rows` x `seq_len` Austen tokens in batches of `batch_size`: (a) the backbone's forward with
    `output_hidden_states=True`; (b) the same forward followed by the block-influence statistics from its hidden
    states (what an output_hidden_states implementation of ShortGPT does); (c) `block_influence` (the layer-by-layer
    runner). The runs alternate `repeats` times so the shared CPU's load hits both alike; the ratio is
    sum(c) / sum(a)."""
    import torch

    from hf_prune.arch import get_adapter
    from hf_prune.assets import load_smollm2
    from hf_prune.calibration import token_cosines
    from hf_prune.data import batches as make_batches
    from hf_prune.data import read_texts, token_blocks
    from hf_prune.methods.shortgpt import block_influence

    model, tok = load_smollm2()
    ad = get_adapter(model)
    texts = read_texts(sorted((REPO.parent / "shared" / "data" / "austen").glob("*.txt")))
    blocks = token_blocks(tok, texts, n_samples=rows, seq_len=seq_len, seed=0)
    calib = make_batches(blocks, batch_size)

    def forward(stats: bool) -> list[float] | None:
        sums = None
        with torch.no_grad():
            for b in calib:
                hs = ad.backbone(input_ids=b["input_ids"], attention_mask=b["attention_mask"], use_cache=False,
                                 output_hidden_states=True).hidden_states
                if stats:
                    cos = [float(token_cosines(hs[i], hs[i + 1], b["attention_mask"]).double().sum())
                           for i in range(len(hs) - 1)]
                    sums = cos if sums is None else [x + y for x, y in zip(sums, cos)]
        return sums

    timing: dict[str, list[float]] = {"forward": [], "block_influence": []}
    scores = None
    for _ in range(repeats):
        for name, fn in (("forward", lambda: forward(False)),
                         ("block_influence", lambda: block_influence(model, calib, progress=False))):
            t = time.perf_counter()
            out = fn()
            timing[name].append(round(time.perf_counter() - t, 2))
            if name == "block_influence":
                scores = out[0]
    fwd = sum(timing["forward"])
    return {"model": "SmolLM2-135M-Instruct (fp32)", "tokens": rows * seq_len, "rows": rows, "seq_len": seq_len,
            "batch_size": batch_size, "threads": torch.get_num_threads(), "seconds": timing,
            "ratio_block_influence_to_forward": round(sum(timing["block_influence"]) / fwd, 3),
            "block_influence": [round(x, 6) for x in scores]}


# ----- driver ---------------------------------------------------------------------------------------------------------


def versions() -> dict:
    """Python, torch, transformers and the hf-prune commit (+dirty when hf_prune/ has uncommitted changes)."""
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


def _utilisation(row: dict, depth: dict) -> float | None:
    """Counted FLOPs / seconds / the bf16 GEMM throughput measured by the worker that ran the row."""
    if row.get("gflop") is None or row["seconds"] <= 0:
        return None
    return row["gflop"] / row["seconds"] / row.get("matmul_bf16_gflops", depth["matmul_flops"]["bfloat16"])


def _num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def extrapolate(depths: list[dict]) -> list[dict]:
    """Seconds and memory at 32 layers (8B) and 80 layers at 70B width, from each task's deepest depth: seconds
    scale with layer passes (x3.92 per pass at 70B width), streamed memory stays flat (one layer: x3.92 at 70B),
    in-memory weights grow with depth. ALGEBRA_TASKS, at 8B width only (their inverses and eigendecompositions grow
    with width cubed, which the 70B factor for passes does not describe): measured at two depths or more, a line
    through the two deepest (fixed cost + cost per layer, for seconds and peak); at one depth, seconds per layer x 32
    (an upper bound) and the peak plus the added layers' weights."""
    by: dict[str, dict] = {}  # each task at the deepest depth it was measured at
    below: dict[str, dict] = {}  # and at the depth before that
    for d in sorted(depths, key=lambda d: d["layers"]):
        for r in d["rows"]:
            if "error" in r:
                continue
            if r["task"] in by:
                below[r["task"]] = by[r["task"]]
            by[r["task"]] = r
    ratio70 = LINEAR_PARAMS["70b"] / LINEAR_PARAMS["8b"]
    layer_gb = LINEAR_PARAMS["8b"] * 2 / 1e9
    out = []
    for task, r in by.items():
        if task.startswith("perplexity") or task == "taylor_full_logits":
            continue  # the LM head's fixed cost dominates at these depths: seconds do not scale with layers
        if task in ALGEBRA_TASKS:
            if task in below:  # a line through the two deepest depths: fixed cost + cost per layer
                a, span = below[task], r["layers"] - below[task]["layers"]
                per_s, per_gb = (r["seconds"] - a["seconds"]) / span, (r["peak_rss_gb"] - a["peak_rss_gb"]) / span
                fit = f"{r['layers']} and {a['layers']} layers: {per_s:.1f} s and {per_gb:.2f} GB per layer"
            else:  # one depth: its fixed costs counted per layer, an upper bound in seconds
                per_s, per_gb = r["seconds_per_layer"], layer_gb
                fit = f"{r['layers']} layers only: s / layer x 32 (an upper bound); peak + the added layers' weights"
            seconds = r["seconds"] + per_s * (32 - r["layers"])
            out.append({"task": task, "layers": 32, "width": "8b", "seconds": round(seconds, 0),
                        "hours": round(seconds / 3600, 2),
                        "peak_rss_gb": round(r["peak_rss_gb"] + per_gb * (32 - r["layers"]), 1), "fit": fit})
            continue
        per_pass = r["seconds_per_layer_pass"]
        grow = 2.0 if task in ("llm_pruner", "pip") else 1.0  # weights, plus the gradients of every scored layer
        for target, width, scale in ((32, "8b", 1.0), (80, "70b", ratio70)):
            seconds = per_pass * layer_passes(task, target) * scale
            if task.startswith("streamed_"):
                memory = r["peak_rss_gb"] + (scale - 1.0) * layer_gb
            else:
                memory = r["peak_rss_gb"] + grow * (target * scale - r["layers"]) * layer_gb
            out.append({"task": task, "layers": target, "width": width, "seconds": round(seconds, 0),
                        "hours": round(seconds / 3600, 2), "peak_rss_gb": round(memory, 1)})
    return out


def _markdown(result: dict) -> str:
    m = result["machine"]
    v = result["versions"]
    lines = [
        "# Cost at Llama-3.1-8B width on this CPU (issue 18, item 2)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB; {m['platform']}  ",
        f"Versions: Python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, hf-prune "
        f"{v['hf_prune_commit']}  ",
        f"Load average before / after: {result['load_before']} / {result['load_after']} (2 cores, shared with other "
        "jobs: seconds and utilisation are indicative; memory figures are per process and not affected). One thread "
        "per worker." + (f" {result['history']}" if result.get("history") else ""),
        "",
        "Random bf16 weights with Llama-3.1-8B's shapes (hidden 4096, 32/8 heads, intermediate 14336, vocabulary "
        f"128,256). Calibration: {result.get('calibration', {}).get('rows', CALIB_ROWS)} x {CALIB_LEN} tokens in one "
        f"batch. Perplexity: {PPL_TOKENS} tokens in "
        f"windows of {PPL_WINDOW}, one batch of 2. Peak = the process's peak resident set during the task "
        "(VmHWM reset before it); added = peak minus the resident set before the task. streamed_* rows: a separate "
        "process scoring the saved checkpoint through `hf_prune.calibration.streamed_model` (one layer's weights "
        "resident at a time); their peak is the whole process's. Utilisation = counted FLOPs / seconds / the "
        "worker's measured bf16 GEMM throughput (1 thread).",
        "",
        "| layers | task | seconds | s / layer | layer passes | s / layer pass | GFLOP | utilisation | RSS before (GB) "
        "| peak RSS (GB) | added (GB) |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for depth in result["depths"]:
        for r in depth["rows"]:
            if "error" in r:
                lines.append(f"| {r['layers']} | {r['task']} | error after {r['seconds']:.1f} s: "
                             f"{r['error'][:300].replace('|', '/')} | | | | | | | | |")
                continue
            lines.append(f"| {r['layers']} | {r['task']} | {r['seconds']:.1f} | {r['seconds_per_layer']:.1f} | "
                         f"{r.get('layer_passes', r['layers']):g} | {r.get('seconds_per_layer_pass', 0):.2f} | "
                         f"{_num(r.get('gflop'), '.0f')} | {_num(_utilisation(r, depth), '.2f')} | "
                         f"{r['rss_before_gb']:.2f} | "
                         f"{r['peak_rss_gb']:.2f} | {r['added_gb']:.2f} |")
    lines += ["", "Matmul throughput (1 thread, GFLOP/s): " + "; ".join(
        f"{d['layers']} layers: bf16 {d['matmul_flops']['bfloat16']}, fp32 {d['matmul_flops']['float32']}"
        for d in result["depths"] if "matmul_flops" in d) + ".",
        "", "Weights: " + ", ".join(f"{d['layers']} layers {d['weights_gb']:.2f} GB (built in "
                                    f"{d['build_seconds']:.0f} s)" for d in result["depths"] if "weights_gb" in d)
        + " (in memory)" + ("; streamed depths: checkpoint written shard by shard in " + ", ".join(
            f"{d['layers']} layers {d['checkpoint_write_seconds']:.0f} s" for d in result["depths"]
            if "checkpoint_write_seconds" in d) if any("checkpoint_write_seconds" in d for d in result["depths"])
            else "") + "."]
    streamed = [(d["layers"], r) for d in result["depths"] for r in d["rows"]
                if r["task"].startswith("streamed_") and "error" not in r]
    if streamed:
        lines += ["", "Streamed scoring, whole-process peak by depth (flat = weights streamed): " + "; ".join(
            f"{t}: " + ", ".join(f"{L} layers {r['peak_rss_gb']:.2f} GB" for L, r in streamed if r["task"] == t)
            for t in STREAMED_TASKS if any(r["task"] == t for _, r in streamed)) + "."]
    notes = []
    for depth in result["depths"]:
        by = {r["task"]: r for r in depth["rows"] if "error" not in r}
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
            for k in ("shortgpt", "angular_block", "streamed_shortgpt", "streamed_angular_block"):
                if k in by:
                    notes.append(f"- {depth['layers']} layers, {k}: {by[k]['seconds'] / by['forward']['seconds']:.2f}"
                                 " plain backbone forwards.")
    if notes:
        lines += ["", "Ratios to the plain forward, and before / after the chunked losses where both were run:", "",
                  *notes]
    ext = extrapolate(result["depths"])
    if ext:
        lines += ["", "Extrapolation from the deepest measured depth (same CPU, same load, one thread; 80 layers at "
                  "70B width: per-layer cost x3.92): seconds scale with layer passes (IteRABRe: L + L(L-1)/2 per "
                  "stage), in-memory peaks grow by the added layers' bf16 weights (LLM-Pruner: and their gradients), streamed "
                  "peaks by one layer only. Perplexity is left out (its LM head's fixed cost dominates at 2-4 layers). "
                  "The GEMM throughput is measured once per worker, so utilisation above 1 means the task ran while "
                  "the other jobs' load was lighter than when the GEMM was timed.",
                  "", "| task | layers | width | seconds | hours | peak RSS (GB) | from |",
                  "|---|---:|---|---:|---:|---:|---|"]
        lines += [f"| {e['task']} | {e['layers']} | {e['width']} | {e['seconds']:.0f} | {e['hours']:.2f} | "
                  f"{e['peak_rss_gb']:.1f} | {e.get('fit', 'layer passes')} |" for e in ext]
    sg = result.get("shortgpt_smollm2")
    if sg:
        lines += ["", f"ShortGPT vs plain forwards on {sg['model']}, {sg['rows']} x {sg['seq_len']} Austen tokens in "
                  f"batches of {sg['batch_size']}, {sg['threads']} thread, one process (`{sg['command']}`): forward "
                  f"{sg['seconds']['forward']} s, block influence {sg['seconds']['block_influence']} s: **ratio "
                  f"{sg['ratio_block_influence_to_forward']}** (goal <= 1.2); load {sg['load_before']} -> "
                  f"{sg['load_after']}."]
        for e in result.get("shortgpt_smollm2_earlier", []):
            lines += ["", f"Earlier: {e['rows']} x {e['seq_len']} tokens (`{e['command']}`): forward "
                      f"{e['seconds']['forward']} s, block influence {e['seconds']['block_influence']} s: ratio "
                      f"{e['ratio_block_influence_to_forward']}; load {e['load_before']} -> {e['load_after']}."]
    return "\n".join(lines) + "\n"


def _run_worker(args: list[str], env: dict) -> dict:
    cmd = ["nice", "-n", "5", sys.executable, str(Path(__file__).resolve()), *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"worker {args} failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    global CALIB_ROWS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="*", default=[2, 4],
                    help="depths built in memory (every task); 8 layers need ~6 GB plus the tasks' memory")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--streamed-tasks", nargs="*", default=list(STREAMED_TASKS), choices=STREAMED_TASKS)
    ap.add_argument("--streamed-layers", type=int, nargs="*", default=[2, 4, 8],
                    help="depths scored from a checkpoint written shard by shard (flat memory)")
    ap.add_argument("--iterabre-max-layers", type=int, default=8, help="deepest depth for streamed_iterabre")
    ap.add_argument("--calib-rows", type=int, default=4,
                    help=f"calibration sequences of {CALIB_LEN} tokens (default 4; 1 on a crowded CPU)")
    ap.add_argument("--ratio-rows", type=int, default=32, help="sequences of 1,024 tokens for --shortgpt-ratio")
    ap.add_argument("--ratio-repeats", type=int, default=1,
                    help="--shortgpt-ratio: alternate forward and scoring this many times (the ratio uses the sums)")
    ap.add_argument("--tmp", default=None, help="folder for the temporary checkpoints (default: the system's)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--merge", action="store_true",
                    help="keep the rows already in --out of (depth, task) pairs this run does not measure")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--streamed", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--shortgpt-ratio", action="store_true",
                    help="only ShortGPT's scoring vs plain forwards on SmolLM2 (32 x 1024 tokens), merged into the "
                         "existing results")
    args = ap.parse_args(argv)
    CALIB_ROWS = args.calib_rows
    if args.worker:
        print(json.dumps(worker(args.layers[0], args.tasks)))
        return
    if args.streamed:
        print(json.dumps(streamed_worker(args.layers[0], args.checkpoint, args.streamed_tasks)))
        return
    path = args.out / "scale_cpu.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    if args.shortgpt_ratio:
        import torch

        torch.set_num_threads(1)
        load = [round(x, 2) for x in os.getloadavg()]
        ratio = shortgpt_ratio(rows=args.ratio_rows, repeats=args.ratio_repeats)
        env = " ".join(f"{k}={os.environ[k]}" for k in ("OMP_NUM_THREADS",) if k in os.environ)
        nice = f"nice -n {os.nice(0)} " if os.nice(0) else ""
        ratio.update(command=f"{env + ' ' if env else ''}{nice}python benchmarks/scale_cpu.py "
                             + " ".join(argv if argv is not None else sys.argv[1:]),
                     versions=versions(), load_before=load, load_after=[round(x, 2) for x in os.getloadavg()],
                     finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
        print(json.dumps(ratio, indent=1), flush=True)
        if "shortgpt_smollm2" in old:  # earlier measurements stay in the record
            old.setdefault("shortgpt_smollm2_earlier", []).append(old["shortgpt_smollm2"])
        old["shortgpt_smollm2"] = ratio
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(old, indent=2) + "\n")
        if "depths" in old:
            (args.out / "scale_cpu.md").write_text(_markdown(old))
        print(json.dumps(ratio, indent=1))
        return
    import tempfile

    load_before = [round(x, 2) for x in os.getloadavg()]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20), "HF_PRUNE_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    by_depth: dict[int, dict] = {}
    commands = []
    if args.merge and "depths" in old:
        by_depth = {d["layers"]: d for d in old["depths"]}
        commands = old.get("commands") or [old["command"]]
    # streamed depths first (about 2 GB whatever the depth), then the in-memory ones (weights + task memory)
    jobs = [("streamed", L) for L in sorted(args.streamed_layers) if args.streamed_tasks]
    jobs += [("memory", L) for L in sorted(args.layers)]
    for kind, layers in jobs:
        depth = by_depth.setdefault(layers, {"layers": layers, "rows": []})
        if kind == "memory":
            found = _run_worker(["--worker", "--layers", str(layers), "--tasks", *args.tasks,
                                 "--calib-rows", str(CALIB_ROWS)], env)
        else:
            tasks = [t for t in args.streamed_tasks if t != "streamed_iterabre" or layers <= args.iterabre_max_layers]
            with tempfile.TemporaryDirectory(prefix="scale_cpu_", dir=args.tmp) as tmp:
                found = _run_worker(["--streamed", "--layers", str(layers), "--checkpoint", str(Path(tmp) / "m"),
                                     "--streamed-tasks", *tasks, "--calib-rows", str(CALIB_ROWS)], env)
        rows = found.pop("rows")
        depth.update(found)
        measured = {r["task"] for r in rows}
        kept = [r for r in depth["rows"] if r["task"] not in measured]
        depth["rows"] = rows + kept if kind == "memory" else kept + rows
        depths = [by_depth[k] for k in sorted(by_depth)]
        command = "nice python " + " ".join(["benchmarks/scale_cpu.py", *(argv if argv is not None else sys.argv[1:])])
        result = {
            "command": "; ".join([*commands, command]), "commands": [*commands, command],
            "machine": _machine(), "versions": versions(), "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()],
            "note": "CPU shared with other engineers' jobs: seconds are indicative; memory is per process.",
            "calibration": {"rows": CALIB_ROWS, "seq_len": CALIB_LEN}, "depths": depths,
            "extrapolation": extrapolate(depths),
        }
        for key in ("shortgpt_smollm2", "shortgpt_smollm2_earlier", "history"):
            if key in old:
                result[key] = old[key]
        args.out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "scale_cpu.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
