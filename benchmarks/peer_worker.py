"""One peer tool's pruning run, executed by benchmarks/peers.py inside that peer's own venv (benchmarks/peer_env.py).

    <venv>/bin/python benchmarks/peer_worker.py --peer llmcompressor --algo sparsegpt --mask 2:4 \
        --model <smollm2 folder> --calibration calib.safetensors --out <dir>

It imports neither hf_prune nor anything of this repository (the venv may hold other transformers versions): it
loads the saved SmolLM2 checkpoint with transformers, prunes it with the peer's pip package on the calibration token
ids it is given (a safetensors file with `input_ids`, shape (samples, seq_len)), and writes to --out:

- `result.json`: the peer's version, the seconds spent in the peer's pruning call, this process's peak resident
  memory, the parameter count after pruning, and what the peer reported;
- the pruned weights: `layers.safetensors` (every `model.layers.*` tensor: sparse methods keep the shapes), or a
  `model/` folder written by `save_pretrained` with the reduced config (structured methods with uniform widths).

A failure writes `result.json` with the exception's type, message and traceback, and exits 1.
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import json
import resource
import sys
import time
import traceback
from pathlib import Path

import torch


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def load(path: str):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.config.use_cache = False
    return model.eval()


def calibration_ids(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(path)["input_ids"].long()


def save_layers(model, out: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith("model.layers.")}
    save_file(state, str(out / "layers.safetensors"))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------------------------
# llm-compressor: SparseGPT and Wanda through `oneshot`
# ---------------------------------------------------------------------------------------------------------------------


def run_llmcompressor(args, ids: torch.Tensor, out: Path) -> dict:
    import datasets
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    model = load(args.model)
    mask = "0:0" if args.mask == "unstructured" else args.mask
    cls = {"sparsegpt": SparseGPTModifier, "wanda": WandaPruningModifier}[args.algo]
    # every decoder-layer linear; the tied embedding/head is left dense, as hf-prune's modes do
    recipe = cls(sparsity=args.sparsity, mask_structure=mask, targets=["Linear"], ignore=["re:.*lm_head"])
    ds = datasets.Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    t0 = time.perf_counter()
    oneshot(model=model, dataset=ds, recipe=recipe, num_calibration_samples=ids.shape[0],
            max_seq_length=ids.shape[1], shuffle_calibration_samples=False, batch_size=1)
    seconds = time.perf_counter() - t0
    linears = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    zeros = sum(int((m.weight == 0).sum()) for m in linears)
    total = sum(m.weight.numel() for m in linears)
    save_layers(model, out)
    return {"prune_seconds": seconds, "parameters": n_params(model), "linear_sparsity": zeros / total,
            "settings": {"modifier": cls.__name__, "sparsity": args.sparsity, "mask_structure": mask,
                         "targets": ["Linear"], "ignore": ["re:.*lm_head"], "batch_size": 1}}


# ---------------------------------------------------------------------------------------------------------------------
# Torch-Pruning: attention heads (whole kv groups) and MLP channels, uniform per layer
# ---------------------------------------------------------------------------------------------------------------------


def _tp_prune(model, ids, args, heads: bool, importance_name: str, batches: int | None = None) -> tuple[float, dict]:
    """One Torch-Pruning pass (uniform per layer, `global_pruning=False`): MLP channels at the ratio that, with the
    heads' share when `heads`, removes `args.target` of all parameters; the hidden size is kept (as hf-prune's
    width methods keep it). Returns (seconds, settings)."""
    import torch_pruning as tp

    cfg, layers = model.config, model.model.layers
    before = n_params(model)
    attn = sum(p.numel() for l in layers for p in l.self_attn.parameters())
    mlp = sum(p.numel() for l in layers for p in l.mlp.parameters())
    head_ratio = args.head_ratio if heads else 0.0
    mlp_ratio = (args.target * before - head_ratio * attn) / mlp
    if not 0 <= mlp_ratio < 1:
        raise ValueError(f"target {args.target} with head_ratio {head_ratio} needs an MLP ratio {mlp_ratio:.3f}")
    kw: dict = {}
    if heads:
        num_heads = {}
        for l in layers:
            num_heads[l.self_attn.q_proj] = cfg.num_attention_heads
            num_heads[l.self_attn.k_proj] = cfg.num_key_value_heads
            num_heads[l.self_attn.v_proj] = cfg.num_key_value_heads
        kw = {"num_heads": num_heads, "prune_num_heads": True, "prune_head_dims": False,
              "head_pruning_ratio": head_ratio}
    importance = (tp.importance.GroupTaylorImportance() if importance_name == "taylor"
                  else tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"))
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=ids[:1, :16], importance=importance, global_pruning=False, pruning_ratio=0.0,
        pruning_ratio_dict={(l.mlp.gate_proj, l.mlp.up_proj): mlp_ratio for l in layers},
        ignored_layers=[model.lm_head], round_to=4, **kw)
    t0 = time.perf_counter()
    if importance_name == "taylor":  # first-order Taylor: loss gradients on the calibration tokens
        model.zero_grad()
        n = ids.shape[0] if batches is None else min(ids.shape[0], batches * args.batch_size)
        for i in range(0, n, args.batch_size):
            x = ids[i : min(i + args.batch_size, n)]
            (model(input_ids=x, labels=x).loss * x.shape[0] / n).backward()
    for group in pruner.step(interactive=True):
        group.prune()
    seconds = time.perf_counter() - t0
    model.zero_grad(set_to_none=True)
    return seconds, {"importance": type(importance).__name__, "pruner": "MetaPruner", "global_pruning": False,
                     "head_pruning_ratio": head_ratio, "mlp_pruning_ratio": mlp_ratio, "round_to": 4,
                     "target": args.target, "prune_num_heads": heads, "prune_head_dims": False}


def run_torch_pruning(args, ids: torch.Tensor, out: Path) -> dict:
    """Heads (whole kv groups, GQA-aware `num_heads`) + MLP channels as Torch-Pruning's LLM example configures them;
    if its head pruning fails on this model, the exact error is recorded and the row prunes MLP channels only, at
    the ratio that removes the same share of parameters."""
    attempts = []
    model = load(args.model)
    before = n_params(model)
    head_dim = getattr(model.config, "head_dim", None) or model.config.hidden_size // model.config.num_attention_heads
    try:  # gradients of one batch suffice to see whether head pruning runs at all
        _tp_prune(model, ids, args, heads=True, importance_name=args.algo, batches=1)
        attempts.append({"heads": True, "ok": True})
        model = load(args.model)
        seconds, settings = _tp_prune(model, ids, args, heads=True, importance_name=args.algo)
    except Exception as e:  # noqa: BLE001 - recorded exactly
        attempts.append({"heads": True, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]})
        model = load(args.model)
        seconds, settings = _tp_prune(model, ids, args, heads=False, importance_name=args.algo)
    cfg, layers = model.config, model.model.layers
    cfg.num_attention_heads = layers[0].self_attn.q_proj.out_features // head_dim
    cfg.num_key_value_heads = layers[0].self_attn.k_proj.out_features // head_dim
    cfg.head_dim = head_dim
    cfg.intermediate_size = layers[0].mlp.gate_proj.out_features
    widths = {(l.self_attn.q_proj.out_features, l.self_attn.k_proj.out_features, l.mlp.gate_proj.out_features)
              for l in layers}
    if len(widths) != 1:
        raise RuntimeError(f"Torch-Pruning left different widths per layer: {sorted(widths)}")
    for l in layers:
        l.self_attn.num_key_value_groups = cfg.num_attention_heads // cfg.num_key_value_heads
    model.save_pretrained(str(out / "model"))
    return {"prune_seconds": seconds, "parameters": n_params(model), "parameters_before": before,
            "settings": settings, "attempts": attempts,
            "widths": {"num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
                       "intermediate_size": cfg.intermediate_size}}


# ---------------------------------------------------------------------------------------------------------------------
# NVIDIA ModelOpt: its pruning modes on the Hugging Face Llama, on the CPU
# ---------------------------------------------------------------------------------------------------------------------


def run_modelopt(args, ids: torch.Tensor, out: Path) -> dict:
    import modelopt.torch.prune as mtp

    model = load(args.model)
    before = n_params(model)
    attempts = []
    for mode in ("mcore_minitron", "fastnas"):  # the LLM mode first; fastnas is its generic (vision) mode
        m = model if mode == "fastnas" else load(args.model)
        calib = [{"input_ids": ids[i : i + 1]} for i in range(min(4, ids.shape[0]))]

        def score(mm, batches=calib):
            with torch.no_grad():
                return -sum(float(mm(**b, labels=b["input_ids"]).loss) for b in batches)

        t0 = time.perf_counter()
        try:
            pruned, _ = mtp.prune(m, mode=mode, constraints={"params": f"{int(round(100 * (1 - args.target)))}%"},
                                  dummy_input=ids[:1, :64],
                                  config={"data_loader": calib, "score_func": score, "checkpoint": None})
        except Exception as e:  # noqa: BLE001 - the exact error is the result
            attempts.append({"mode": mode, "error": f"{type(e).__name__}: {e}"[:4000],
                             "traceback": traceback.format_exc()[-4000:], "seconds": time.perf_counter() - t0})
            (out / "attempts.json").write_text(json.dumps(attempts, indent=2))  # survives a timeout of the next
            continue
        seconds = time.perf_counter() - t0
        attempts.append({"mode": mode, "seconds": seconds, "parameters": n_params(pruned)})
        pruned.save_pretrained(str(out / "model"))
        return {"prune_seconds": seconds, "parameters": n_params(pruned), "parameters_before": before,
                "attempts": attempts}
    raise RuntimeError("every ModelOpt pruning mode failed: " + json.dumps(attempts))


PEERS = {"llmcompressor": ("llmcompressor", run_llmcompressor), "torch-pruning": ("torch-pruning", run_torch_pruning),
         "modelopt": ("nvidia-modelopt", run_modelopt)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", required=True, choices=sorted(PEERS))
    p.add_argument("--algo", default="")
    p.add_argument("--mask", default="unstructured", help="llmcompressor: 'unstructured' or 'N:M'")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--target", type=float, default=0.2, help="structured peers: fraction of parameters removed")
    p.add_argument("--head_ratio", type=float, default=1 / 3, help="torch-pruning: fraction of heads removed")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--model", required=True)
    p.add_argument("--calibration", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dist, fn = PEERS[args.peer]
    res: dict = {"peer": args.peer, "package": dist, "algo": args.algo}
    try:
        res["version"] = metadata.version(dist)
        res["transformers"] = metadata.version("transformers")
        res["torch"] = torch.__version__
    except metadata.PackageNotFoundError as e:
        res["version"] = None
        res["error"] = f"PackageNotFoundError: {e}"
    t0 = time.perf_counter()
    try:
        if "error" not in res:
            res.update(fn(args, calibration_ids(args.calibration), out))
    except Exception as e:  # noqa: BLE001 - recorded exactly, then a non-zero exit
        res["error"] = f"{type(e).__name__}: {e}"[:4000]
        res["traceback"] = traceback.format_exc()[-6000:]
    res["worker_seconds"] = time.perf_counter() - t0
    res["peak_rss_gb"] = peak_rss_gb()
    (out / "result.json").write_text(json.dumps(res, indent=2, default=str))
    sys.exit(1 if "error" in res else 0)


if __name__ == "__main__":
    main()
