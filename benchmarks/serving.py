"""Serving the formats hf-prune writes: transformers vs llama.cpp (GGUF), speed against the ideal, logit agreement.

Models (offline SmolLM2-135M-Instruct, fp32): the dense model; an LLM-Pruner result (`llm_pruner`, target 0.1:
per-layer heads and MLP channels, saved as `pruned_llama`, written as GGUF `deci`); a ShortGPT result (`shortgpt`,
n_remove=6: layers removed, standard `llama` config and GGUF). Each is saved as a folder and loaded back from it, then
written with `hf_prune.gguf.to_gguf` in f32 (agreement and speed) and f16 (speed).

Speed: prefill and decode tokens/s at batch 1 and 8 in transformers (fp32, KV cache, greedy), at batch 1 in llama.cpp
(llama-cpp-python; its high-level API serves one sequence), each next to the dense model in the same run. Two ideals,
each as `ratio = ideal time / measured time` (1.0 = ideal):

- parameters: dense time x parameter ratio (parameters counted once when tied);
- per-token cost: dense time x the ratio of what one token costs in that engine's file, counted from the widths that
  engine actually runs (GGUF: MLP widths padded to 32): prefill by multiply-adds (projections, the head, attention
  scores and values over the mean context), decode by bytes moved (every matrix read once per step in its storage
  dtype, the head's matrix included, one embedding row, and the KV cache at the mean context). It differs from the
  parameter ideal where padding, attention or the KV cache weigh, not where parameters are tied.

Best of `--repeats`.

Profile (`--profile`, on by default): llama.cpp's f32 decode per graph op, timed through its eval callback (every
node computed and timed in turn), grouped into weight matmuls per layer, the head, attention and the rest; and an
alignment control: the ShortGPT f32 file written again with GGUF's default 32-byte tensor alignment at a header length
that leaves the tensors at 32 mod 64, timed next to the 64-byte-aligned file hf-prune writes.

Agreement (f32 GGUF vs transformers on the same token ids, windows of the default corpus' evaluation split): max
|logit difference|, top-1 agreement, perplexity in each engine and its relative difference, and whether 32 greedy
tokens are equal.

    nice -n 10 python benchmarks/serving.py --threads 1 --repeats 5     # ~6-10 min on 2 shared cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=128, help="prefill tokens per sequence")
    p.add_argument("--decode-tokens", type=int, default=32, help="decoded tokens per sequence")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="transformers batch sizes")
    p.add_argument("--repeats", type=int, default=3, help="timing repeats, models in turn (best is reported)")
    p.add_argument("--eval-windows", type=int, default=4, help="agreement windows of --eval-len tokens")
    p.add_argument("--eval-len", type=int, default=256)
    p.add_argument("--calib-samples", type=int, default=8)
    p.add_argument("--calib-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2, help="threads for torch and llama.cpp")
    p.add_argument("--no-profile", dest="profile", action="store_false",
                   help="skip llama.cpp's per-op decode profile and the alignment control")
    p.add_argument("--work-dir", default=None,
                   help="keep the pruned folders and GGUF files here and reuse pruned folders already in it "
                        "(default: a temporary folder, removed)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "serving.json"))
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------------


def num_parameters(model: torch.nn.Module) -> int:
    """Parameters, a tied embedding / head counted once (model.parameters() deduplicates shared tensors)."""
    return sum(p.numel() for p in model.parameters())


def prune_variants(folder: Path, args) -> dict[str, Path]:
    """Save dense, LLM-Pruner and ShortGPT results as folders; return {name: folder}."""
    from hf_prune import assets, data, methods, prune

    out = {}
    model, tok = assets.load_smollm2()
    blocks = data.token_blocks(tok, assets.default_corpus("calibration"), args.calib_samples, args.calib_len)
    batches = data.batches(blocks, 4)
    for name, method in (("dense", None), ("llm_pruner_0.1", methods.get("llm_pruner", target=0.1)),
                         ("shortgpt_6", methods.get("shortgpt", n_remove=6))):
        if (folder / name / "config.json").is_file():
            print(f"reusing {folder / name}", flush=True)
            out[name] = folder / name
            continue
        m, _ = assets.load_smollm2()
        if method is not None:
            prune(m, method, batches)  # the one stage runner
        path = folder / name
        m.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
        del m
    del model
    return out


def gguf_parameters(path: Path) -> int:
    """Values stored in a GGUF file (MLP widths padded to a multiple of 32 included)."""
    import gguf

    return int(sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors))


def load_hf(folder: Path):
    from transformers import AutoModelForCausalLM

    import hf_prune  # noqa: F401  (registers the pruned classes)

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


# --------------------------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------------------------


def hf_timing(model, ids: torch.Tensor, n_decode: int) -> tuple[float, float]:
    """Seconds for the prefill of `ids` (batch x prompt) and for `n_decode` greedy steps with the KV cache."""
    with torch.inference_mode():
        t0 = time.perf_counter()
        res = model(ids, use_cache=True, logits_to_keep=1)
        t1 = time.perf_counter()
        past, nxt = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(n_decode):
            res = model(nxt, past_key_values=past, use_cache=True)
            past, nxt = res.past_key_values, res.logits[:, -1].argmax(-1, keepdim=True)
        t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated token. `llm.scores` holds them only with logits_all=True; without it
    llama-cpp-python leaves that array unwritten, so read the context's own output row."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def cpp_timing(llm, ids: list[int], n_decode: int) -> tuple[float, float]:
    """Seconds for the prefill of `ids` and for `n_decode` greedy steps (argmax of the real logits)."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t1 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([int(np.argmax(last_logits(llm)))])
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def open_llama(path: Path, n_ctx: int, logits_all: bool, threads: int, f32_kv_cache: bool = False):
    """llama.cpp on `path`; `f32_kv_cache` replaces its default f16 KV cache (which alone moves logits by ~0.03)."""
    import llama_cpp

    kv = {"type_k": 0, "type_v": 0} if f32_kv_cache else {}  # 0 = GGML_TYPE_F32
    return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, logits_all=logits_all, n_threads=threads,
                           n_threads_batch=threads, verbose=False, **kv)


# --------------------------------------------------------------------------------------------------------------------
# Per-token cost (the second ideal)
# --------------------------------------------------------------------------------------------------------------------


def token_cost(model, pad_ffn_to: int, context: float, value_bytes: int, kv_bytes: int,
               batch: int = 1) -> dict[str, float]:
    """What one token costs at `context` past tokens, from the widths the engine runs (`pad_ffn_to`: GGUF's MLP
    padding): multiply-adds per token (projections, the head, attention scores and values) and bytes read in one
    decode step of `batch` sequences (every matrix once in `value_bytes` per value, one embedding row and the KV cache
    in `kv_bytes` per sequence)."""
    from hf_prune.gguf import choose_architecture

    arch = choose_architecture(model, pad_ffn_to=pad_ffn_to)
    hidden = int(model.config.hidden_size)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    d = arch.head_dim
    weights = vocab * hidden  # the head's matrix: read and multiplied every step, tied or not
    attention = kv = 0.0
    for q, k, f in zip(arch.heads, arch.kv_heads, arch.ffn):
        weights += hidden * d * (2 * q + 2 * k) + 3 * hidden * f
        attention += 2 * q * d * context
        kv += 2 * k * d * context
    return {"macs": weights + attention,
            "bytes": weights * value_bytes + batch * (hidden * value_bytes + kv * kv_bytes)}


def cost_ratios(model, dense_model, engine: str, batch: int, args) -> dict[str, float]:
    """(pruned / dense) prefill multiply-adds per token and decode bytes per token in `engine`."""
    gguf_file = engine.startswith("llama.cpp")
    value_bytes = 2 if engine.endswith("f16") else 4
    kv_bytes = 2 if gguf_file else 4  # llama.cpp's default f16 KV cache; transformers keeps fp32
    pad = 32 if gguf_file else 1
    prefill_ctx, decode_ctx = (args.prompt_len + 1) / 2, args.prompt_len + args.decode_tokens / 2
    out = {}
    for key, ctx, what in (("prefill", prefill_ctx, "macs"), ("decode", decode_ctx, "bytes")):
        mine = token_cost(model, pad, ctx, value_bytes, kv_bytes, batch)[what]
        dense = token_cost(dense_model, pad, ctx, value_bytes, kv_bytes, batch)[what]
        out[key] = mine / dense
    return out


# --------------------------------------------------------------------------------------------------------------------
# Profile: llama.cpp's decode per graph op, and the tensor-alignment control
# --------------------------------------------------------------------------------------------------------------------

_PROFILE: dict[str, Any] = {"acc": None, "t": None}


def _op_groups(name: str, op: str) -> str:
    if op == "MUL_MAT":
        return "head matmul" if name.startswith("result_output") else "layer matmuls (q, k, v, o, gate, up, down)"
    if op in ("FLASH_ATTN_EXT", "SOFT_MAX") or name.startswith(("kq", "kqv")):
        return "attention over the KV cache"
    return "other ops (norms, RoPE, SwiGLU, adds, copies, views)"


def _eval_callback():
    """llama.cpp's eval callback (cb_eval): asked for every node, so the scheduler computes the graph node by node and
    the time between two calls is one node's."""
    import ctypes

    import llama_cpp

    base = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    for fn in (base.ggml_get_name, base.ggml_op_desc):
        fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p]

    @llama_cpp.ggml_backend_sched_eval_callback
    def callback(tensor, ask, _user_data):
        if ask:
            return True
        now = time.perf_counter()
        if _PROFILE["acc"] is not None and _PROFILE["t"] is not None:
            group = _op_groups(base.ggml_get_name(tensor).decode(), base.ggml_op_desc(tensor).decode())
            _PROFILE["acc"][group] = _PROFILE["acc"].get(group, 0.0) + now - _PROFILE["t"]
        _PROFILE["t"] = time.perf_counter()
        return True

    return callback


def op_profile(files: dict[str, Path], prompt: list[int], args) -> dict[str, dict[str, float]]:
    """{model: {op group: ms per decoded token, ..., "sum of ops", "wall"}} of llama.cpp's decode (best of the repeats
    by wall time), the models in turn."""
    import ctypes

    import llama_cpp as L

    callback = _eval_callback()
    ctxs = {}
    for name, path in files.items():
        model = L.llama_model_load_from_file(str(path).encode(), L.llama_model_default_params())
        cp = L.llama_context_default_params()
        cp.n_ctx = cp.n_batch = args.prompt_len + args.decode_tokens + 8
        cp.n_threads = cp.n_threads_batch = args.threads
        cp.cb_eval = callback
        ctxs[name] = (model, L.llama_init_from_model(model, cp))

    def check(rc: int) -> None:
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} in the op profile")

    def decode(model, ctx) -> tuple[dict[str, float], float]:
        n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        L.llama_memory_clear(L.llama_get_memory(ctx), True)
        _PROFILE["acc"] = None
        ids = (ctypes.c_int32 * len(prompt))(*prompt)  # kept alive: the batch only points at it
        check(L.llama_decode(ctx, L.llama_batch_get_one(ids, len(prompt))))
        acc: dict[str, float] = {}
        wall = 0.0
        for _ in range(args.decode_tokens):
            logits = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
            token = (ctypes.c_int32 * 1)(int(logits.argmax()))
            _PROFILE["acc"], _PROFILE["t"] = acc, None
            t0 = time.perf_counter()
            rc = L.llama_decode(ctx, L.llama_batch_get_one(token, 1))
            wall += time.perf_counter() - t0
            check(rc)
        _PROFILE["acc"] = None
        return acc, wall

    best: dict[str, tuple[dict[str, float], float]] = {}
    try:
        for _ in range(args.repeats):
            for name, (model, ctx) in ctxs.items():
                acc, wall = decode(model, ctx)
                if name not in best or wall < best[name][1]:
                    best[name] = (acc, wall)
    finally:
        for model, ctx in ctxs.values():
            L.llama_free(ctx)
            L.llama_model_free(model)
    out = {}
    for name, (acc, wall) in best.items():
        row = {k: 1000 * v / args.decode_tokens for k, v in sorted(acc.items())}
        row["sum of ops"] = sum(row.values())
        row["wall"] = 1000 * wall / args.decode_tokens
        out[name] = row
    return out


def tensor_offsets_mod_64(path: Path) -> list[int]:
    import gguf

    return sorted({int(t.data_offset) % 64 for t in gguf.GGUFReader(path).tensors})


def misaligned_control(folder: Path, path: Path) -> Path:
    """The f32 GGUF of `folder` written with GGUF's default 32-byte tensor alignment (what hf-prune wrote before
    DATA_ALIGNMENT = 64), the model named so that the header leaves every tensor at 32 mod 64."""
    import hf_prune.gguf as writer

    model, tokenizer = load_hf(folder), _load_tokenizer(folder)
    saved = writer.DATA_ALIGNMENT
    writer.DATA_ALIGNMENT = 32
    try:
        for n in range(1, 65):
            model.config._name_or_path = f"{folder.name}-{'x' * n}"
            writer.to_gguf(model, path, dtype="f32", tokenizer=tokenizer, overwrite=True)
            if tensor_offsets_mod_64(path) == [32]:
                return path
    finally:
        writer.DATA_ALIGNMENT = saved
    raise RuntimeError("no header length gave tensors at 32 mod 64")


def _load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def alignment_control(folder: Path, aligned: Path, work: Path, prompt: list[int], args) -> dict[str, Any]:
    """Decode seconds of the same model's f32 file at 64-byte (hf-prune) and 32 mod 64 (GGUF default) tensor offsets,
    timed in turn."""
    misaligned = misaligned_control(folder, work / f"{folder.name}.f32.align32.gguf")
    files = {"64-byte aligned": aligned, "32 mod 64": misaligned}
    llms = {n: open_llama(f, args.prompt_len + args.decode_tokens + 8, False, args.threads) for n, f in files.items()}
    try:
        for llm in llms.values():
            cpp_timing(llm, prompt[:16], 2)
        best = interleaved_best({n: (lambda llm=llm: cpp_timing(llm, prompt, args.decode_tokens))
                                 for n, llm in llms.items()}, args.repeats)
    finally:
        for llm in llms.values():
            llm.close()
    return {"model": folder.name, "offsets_mod_64": {n: tensor_offsets_mod_64(f) for n, f in files.items()},
            "decode_ms_per_token": {n: 1000 * b[1] / args.decode_tokens for n, b in best.items()},
            "prefill_ms_per_token": {n: 1000 * b[0] / args.prompt_len for n, b in best.items()}}


# --------------------------------------------------------------------------------------------------------------------
# Agreement
# --------------------------------------------------------------------------------------------------------------------


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def agreement(model, llm, windows: list[list[int]], tokenizer) -> dict[str, Any]:
    """Max |logit diff|, top-1 agreement and perplexity (next-token NLL over the windows) in both engines."""
    max_diff, agree, total, nll_hf, nll_cpp, n_nll = 0.0, 0, 0, 0.0, 0.0, 0
    for ids in windows:
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].float().numpy()
        llm.reset()
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)], dtype=np.float32)
        max_diff = max(max_diff, float(np.abs(got - ref).max()))
        agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
        target = np.array(ids[1:])
        nll_hf -= float(log_softmax(ref[:-1])[np.arange(len(target)), target].sum())
        nll_cpp -= float(log_softmax(got[:-1])[np.arange(len(target)), target].sum())
        n_nll += len(target)
    ppl_hf, ppl_cpp = math.exp(nll_hf / n_nll), math.exp(nll_cpp / n_nll)
    prompt = windows[0][:16]
    hf_gen = greedy_hf(model, prompt, 32)
    cpp_gen = greedy_cpp(llm, prompt, 32)
    return {"max_abs_logit_diff": max_diff, "top1_agreement": agree / total, "positions": total,
            "ppl_transformers": ppl_hf, "ppl_llama_cpp": ppl_cpp, "ppl_rel_diff": abs(ppl_cpp - ppl_hf) / ppl_hf,
            "greedy32_equal": hf_gen == cpp_gen, "greedy32_text": tokenizer.decode(cpp_gen)}


def greedy_hf(model, ids: list[int], n: int) -> list[int]:
    out, past, inp = [], None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            res = model(inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            out.append(int(res.logits[0, -1].argmax()))
            inp = torch.tensor([[out[-1]]])
    return out


def greedy_cpp(llm, ids: list[int], n: int) -> list[int]:
    out = []
    for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


# --------------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "load_avg_at_start": load,
            "python": platform.python_version()}


def versions() -> dict[str, str]:
    import gguf
    import llama_cpp
    import transformers

    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {"torch": torch.__version__, "transformers": transformers.__version__, "gguf": gguf.__version__
            if hasattr(gguf, "__version__") else _dist_version("gguf"), "llama_cpp_python": llama_cpp.__version__,
            "hf_prune_commit": commit}


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Serving: transformers vs llama.cpp (GGUF written by hf-prune)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']['cpu']} ({result['machine']['cpus']} CPUs, load average at start "
        f"{_load(result['machine']['load_avg_at_start'])}, at the end {_load(result.get('load_avg_at_end'))}); "
        f"{result['threads']} threads per engine.  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ".  ",
        f"Date: {result['date']}; wall time {result['wall_seconds']:.0f} s.",
        "",
        "**The CPU is shared with other jobs (2 cores, several engineers) and this ran under `nice`: absolute "
        "tokens/s are noisy; each figure is the best of "
        f"{result['repeats']} repeats and every ratio compares with the dense model measured in the same run.**",
        "",
        "## Logit agreement (f32 GGUF in llama.cpp vs transformers fp32, same token ids)",
        "",
        f"{result['eval_windows']} windows x {result['eval_len']} tokens of the default corpus' evaluation split; "
        "llama.cpp with an f32 KV cache (its default f16 cache: second table).",
        "",
        "| model | GGUF arch | max abs logit diff | top-1 agreement | ppl transformers | ppl llama.cpp | ppl rel. diff "
        "| greedy 32 equal |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in result["models"].items():
        a = r["agreement"]
        lines.append(f"| {name} | {r['gguf_arch']} | {a['max_abs_logit_diff']:.4f} | {a['top1_agreement']:.4f} | "
                     f"{a['ppl_transformers']:.3f} | {a['ppl_llama_cpp']:.3f} | {100 * a['ppl_rel_diff']:.3f}% | "
                     f"{a['greedy32_equal']} |")
    lines += ["", "With llama.cpp's default f16 KV cache (what a user gets without `type_k`/`type_v`):", "",
              "| model | max abs logit diff | top-1 agreement | ppl rel. diff | greedy 32 equal |",
              "|---|---:|---:|---:|---|"]
    for name, r in result["models"].items():
        a = r["agreement_f16_kv_cache"]
        lines.append(f"| {name} | {a['max_abs_logit_diff']:.4f} | {a['top1_agreement']:.4f} | "
                     f"{100 * a['ppl_rel_diff']:.3f}% | {a['greedy32_equal']} |")
    lines += [
        "",
        "## Speed (tokens/s) and ratio to the ideal (1.0 = ideal)",
        "",
        f"Prefill: {result['prompt_len']} tokens per sequence; decode: {result['decode_tokens']} greedy tokens with "
        "the KV cache. Two ideals: **params** = dense time x parameter ratio; **cost** = dense time x the ratio of "
        "per-token cost in that engine's file (prefill: multiply-adds incl. the head and attention at the mean "
        "context; decode: bytes read per step incl. the head's matrix and the KV cache; GGUF widths as written, MLP "
        "padded to 32).",
        "",
        "| model | params | param ratio | engine | batch | prefill tok/s | prefill ratio (params / cost) | "
        "decode tok/s | decode ratio (params / cost) | cost ratio (prefill / decode) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in result["models"].items():
        for s in r["speed"]:
            c = s["cost_ratio"]
            lines.append(f"| {name} | {r['parameters']:,} | {r['param_ratio']:.3f} | {s['engine']} | {s['batch']} | "
                         f"{s['prefill_tok_s']:.0f} | {s['prefill_ratio']:.2f} / {s['prefill_ratio_cost']:.2f} | "
                         f"{s['decode_tok_s']:.1f} | {s['decode_ratio']:.2f} / {s['decode_ratio_cost']:.2f} | "
                         f"{c['prefill']:.3f} / {c['decode']:.3f} |")
    prof = result.get("decode_profile_f32")
    if prof:
        groups = [k for k in next(iter(prof.values())) if k not in ("sum of ops", "wall")]
        n_layers = {name: r.get("num_layers") for name, r in result["models"].items()}
        lines += [
            "",
            "## Where llama.cpp's f32 decode time goes (ms per decoded token, best of the repeats)",
            "",
            "llama.cpp's eval callback asks for every graph node, so its scheduler computes and hands back one node at "
            "a time and the time between two callbacks is that node's (this adds a small per-node overhead, so the sum "
            "is above the plain decode time in the table above).",
            "",
            "| op group | " + " | ".join(prof) + " |",
            "|---|" + "---:|" * len(prof),
        ]
        for g in groups + ["sum of ops", "wall"]:
            lines.append(f"| {g} | " + " | ".join(f"{prof[m].get(g, 0.0):.2f}" for m in prof) + " |")
        layer_key = next((g for g in groups if g.startswith("layer matmuls")), None)
        if layer_key:
            lines += ["", "Layer matmuls per layer (ms): " + ", ".join(
                f"{m} {prof[m][layer_key] / n_layers[m]:.3f}" for m in prof if n_layers.get(m)) + "."]
    ctrl = result.get("alignment_control")
    if ctrl:
        dec, pre = ctrl["decode_ms_per_token"], ctrl["prefill_ms_per_token"]
        a, b = "64-byte aligned", "32 mod 64"
        lines += [
            "",
            f"## Alignment control ({ctrl['model']}, f32, same weights)",
            "",
            "| tensor offsets in the file | decode ms/token | prefill ms/token |",
            "|---|---:|---:|",
            f"| {a} (hf-prune, `general.alignment` = 64) | {dec[a]:.2f} | {pre[a]:.3f} |",
            f"| {b} (GGUF's default 32-byte alignment, header of that length) | {dec[b]:.2f} | {pre[b]:.3f} |",
            "",
            f"Misaligned / aligned decode time: {dec[b] / dec[a]:.2f}x.",
        ]
    lines += ["", "## Notes", ""] + [f"- {n}" for n in result["notes"]] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------------


def notes(result: dict[str, Any]) -> list[str]:
    """The notes under the tables: how to read them, and what the profile and the alignment control found."""
    out = [
        "Ratios compare each model with the dense one in the same engine, dtype and batch; the models are timed in "
        "turn (dense, pruned, pruned, dense, ...) and the best of the repeats is kept, so the shared CPU affects all "
        "alike; absolute tokens/s vary with the other jobs on the machine "
        f"(load average at start {_load(result['machine'].get('load_avg_at_start'))}, at the end "
        f"{_load(result.get('load_avg_at_end'))}, on {result['machine']['cpus']} CPUs). When other jobs hold the "
        "cores for longer than a repeat, a best-of-repeats can still fall on a lucky moment for one model and not "
        "another: a single row far from 1.0 next to rows of the same file near 1.0 is that, not the format.",
        "llama.cpp pads its KV cache to the widest layer for `deci` files (per-layer kv heads); with 2 query / 1 kv "
        "heads removed in few layers the padding is small.",
        "to_gguf pads MLP widths to a multiple of 32 with zero channels (exact; see gguf_parameters in the JSON): "
        "without it the LLM-Pruner file (widths 1228-1536) ran f16 prefill at about 0.6 of the ideal, because ggml's "
        "fast matmul paths need rows that are multiples of 32; padded it runs at about the ideal.",
        "The earlier open item, ShortGPT's llama.cpp f32 decode at 0.80 of the ideal, was the file's tensor "
        "alignment, not the model. GGUF's default 32-byte alignment puts the tensor data at 0 or 32 mod 64 depending "
        "on the header's length (the model's name is in it), and llama.cpp multiplies the mapped weights in place, "
        "so at 32 mod 64 every 64-byte AVX-512 load of its f32 matmuls straddles two cache lines (f16 matmuls load "
        "32 bytes at a time and were unaffected). The per-op profile located it: the whole gap was in the layer "
        "matmuls, none in the head, attention or the KV cache, and a file of the same shape (dense's first 24 "
        "layers) at 0 mod 64 ran 20-30% faster than ShortGPT's at 32 mod 64; a copy of a file kept its speed, a "
        "rewrite at 64-byte alignment took it. to_gguf now writes `general.alignment` = 64.",
        "Parameter counts include the tied embedding / head once; the embedding lookup reads one row but the head "
        "matmul costs as much as its parameters, so the parameter ideal is close to the per-token cost ideal; they "
        "differ by the GGUF MLP padding, attention over the context and the KV cache (the cost ratio column).",
        "Python's share of a llama.cpp decode step (llama-cpp-python's eval, reading the logits, argmax) was "
        "0.1-0.3 ms per token against llama.cpp's own perf counters (llama_perf_context); the profile's wall minus "
        "its sum of ops adds the eval callback's own overhead.",
    ]
    ctrl = result.get("alignment_control")
    if ctrl:
        dec, pre = ctrl["decode_ms_per_token"], ctrl["prefill_ms_per_token"]
        a, b = "64-byte aligned", "32 mod 64"
        out.append(f"In this run the alignment control measured the misaligned file at {dec[b] / dec[a]:.2f}x the "
                   f"aligned one's decode time and {pre[b] / pre[a]:.2f}x its prefill time. The probe that found it "
                   "(same two ShortGPT files, 7 interleaved repeats of 32 decoded tokens, load average about 7) "
                   "measured 29.1 vs 24.0 ms per token at best (1.21x) and 33.2 vs 25.5 at the median (1.30x); how "
                   "large the gap is depends on what else holds the memory bus at the time.")
    return out


def _load(value) -> str:
    return "unknown" if not value else ", ".join(f"{v:.1f}" for v in value)


def interleaved_best(timers: dict[str, Callable[[], tuple[float, float]]], repeats: int) -> dict[str, tuple]:
    """Best (prefill s, decode s) of each timer, the timers run in turn `repeats` times (dense, pruned, ..., dense,
    pruned, ...) so that load from other jobs on the machine falls on all models alike."""
    runs: dict[str, list[tuple[float, float]]] = {name: [] for name in timers}
    for _ in range(repeats):
        for name, timer in timers.items():
            runs[name].append(timer())
    return {name: (min(r[0] for r in rs), min(r[1] for r in rs)) for name, rs in runs.items()}


def speed_rows(hf_models: dict[str, Any], gguf_files: dict[str, dict[str, Path]], args,
               prompt: list[int]) -> dict[str, list[dict[str, Any]]]:
    """{model name: rows of (engine, batch, prefill s, decode s, tokens/s)}, every model timed in the same loop."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in hf_models}
    for b in args.batch_sizes:
        ids = torch.tensor([prompt] * b)
        for m in hf_models.values():
            hf_timing(m, ids[:, :16], 2)  # warm-up
        best = interleaved_best({n: (lambda m=m: hf_timing(m, ids, args.decode_tokens))
                                 for n, m in hf_models.items()}, args.repeats)
        for n, (pre, dec) in best.items():
            rows[n].append({"engine": "transformers fp32", "batch": b, "prefill_s": pre, "decode_s": dec})
    for dtype in ("f32", "f16"):
        llms = {n: open_llama(f[dtype], args.prompt_len + args.decode_tokens + 8, False, args.threads)
                for n, f in gguf_files.items()}
        for llm in llms.values():
            cpp_timing(llm, prompt[:16], 2)  # warm-up
        best = interleaved_best({n: (lambda llm=llm: cpp_timing(llm, prompt, args.decode_tokens))
                                 for n, llm in llms.items()}, args.repeats)
        for n, (pre, dec) in best.items():
            rows[n].append({"engine": f"llama.cpp {dtype}", "batch": 1, "prefill_s": pre, "decode_s": dec})
        for llm in llms.values():
            llm.close()
    for rs in rows.values():
        for r in rs:
            r["prefill_tok_s"] = r["batch"] * args.prompt_len / r["prefill_s"]
            r["decode_tok_s"] = r["batch"] * args.decode_tokens / r["decode_s"]
    return rows


def add_ratios(models: dict[str, dict[str, Any]], hf_models: dict[str, Any], args) -> None:
    """Each speed row's ratio to both ideals: dense time x parameter ratio (`*_ratio`) and dense time x per-token
    cost ratio (`*_ratio_cost`; prefill by multiply-adds, decode by bytes moved)."""
    dense = {(s["engine"], s["batch"]): s for s in models["dense"]["speed"]}
    for name, r in models.items():
        for s in r["speed"]:
            d = dense[(s["engine"], s["batch"])]
            s["prefill_ratio"] = d["prefill_s"] * r["param_ratio"] / s["prefill_s"]
            s["decode_ratio"] = d["decode_s"] * r["param_ratio"] / s["decode_s"]
            cost = cost_ratios(hf_models[name], hf_models["dense"], s["engine"], s["batch"], args)
            s["cost_ratio"] = cost
            s["prefill_ratio_cost"] = d["prefill_s"] * cost["prefill"] / s["prefill_s"]
            s["decode_ratio_cost"] = d["decode_s"] * cost["decode"] / s["decode_s"]


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    from hf_prune import assets
    from hf_prune.gguf import choose_architecture, to_gguf

    start = time.time()
    result: dict[str, Any] = {
        "command": "python " + shlex.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
        "versions": versions(), "threads": args.threads, "repeats": args.repeats, "prompt_len": args.prompt_len,
        "decode_tokens": args.decode_tokens, "eval_windows": args.eval_windows, "eval_len": args.eval_len,
        "models": {},
    }
    _, tok = assets.load_smollm2()
    stream = tok("\n\n".join(assets.default_corpus("evaluation")), return_tensors="pt").input_ids[0].tolist()
    windows = [stream[i * args.eval_len:(i + 1) * args.eval_len] for i in range(args.eval_windows)]
    prompt = stream[-args.prompt_len:]
    with tempfile.TemporaryDirectory(prefix="hf_prune_serving-") as tmp:
        if args.work_dir:
            tmp = args.work_dir
            Path(tmp).mkdir(parents=True, exist_ok=True)
        folders = prune_variants(Path(tmp), args)
        dense_params = None
        hf_models, gguf_files = {}, {}
        for name, folder in folders.items():
            model = load_hf(folder)
            params = num_parameters(model)
            dense_params = dense_params or params
            files = {d: to_gguf(folder, Path(tmp) / f"{name}.{d}.gguf", dtype=d, overwrite=True)
                     for d in ("f32", "f16")}
            entry = {"gguf_arch": choose_architecture(model).name, "parameters": params,
                     "num_layers": int(model.config.num_hidden_layers),
                     "param_ratio": params / dense_params, "config_model_type": model.config.model_type,
                     "gguf_mib": {d: p.stat().st_size / 2**20 for d, p in files.items()},
                     "gguf_parameters": gguf_parameters(files["f32"])}
            for key, f32_kv in (("agreement", True), ("agreement_f16_kv_cache", False)):
                llm = open_llama(files["f32"], args.eval_len + 64, True, args.threads, f32_kv_cache=f32_kv)
                entry[key] = agreement(model, llm, windows, tok)
                llm.close()
            result["models"][name] = entry
            hf_models[name], gguf_files[name] = model, files
            print(name, json.dumps(entry), flush=True)
        for name, rows in speed_rows(hf_models, gguf_files, args, prompt).items():
            result["models"][name]["speed"] = rows
        add_ratios(result["models"], hf_models, args)
        if args.profile:
            result["decode_profile_f32"] = op_profile({n: f["f32"] for n, f in gguf_files.items()}, prompt, args)
            print("profile", json.dumps(result["decode_profile_f32"]), flush=True)
            result["alignment_control"] = alignment_control(folders["shortgpt_6"], gguf_files["shortgpt_6"]["f32"],
                                                            Path(tmp), prompt, args)
            print("alignment", json.dumps(result["alignment_control"]), flush=True)
    result["wall_seconds"] = time.time() - start
    result["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["notes"] = notes(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, allow_nan=False))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
