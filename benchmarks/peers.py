"""hf-prune's methods beside the peers the pip registry provides, in one run (issue 18, item 1).

Same model (the offline SmolLM2-135M), same calibration token ids (written once to `<work>/calibration.safetensors`
and read by every row, in our process or a peer's venv), same evaluation (`hf_prune.evaluate.perplexity` on the same
wiki slice; `multiple_choice` on the BIG-bench tasks for the rows named by --mc_rows), wall time and peak memory.

Groups (every peer row has the hf-prune rows it is compared with):
- sparse, 50% of every decoder linear, unstructured and 2:4: llm-compressor's SparseGPT and Wanda (own venv, pinned
  transformers; benchmarks/peer_env.py) beside hf-prune's LLM Surgeon, K-OBD and magnitude (`llm_surgeon` criteria);
- width, 20% of all parameters: Torch-Pruning's head + MLP-channel pruning (Taylor and magnitude importance) beside
  PIP, LLM-Pruner and hf-prune's magnitude; parameter counts are recorded and matched;
- NVIDIA ModelOpt's pruning of the HF Llama on the CPU (or its exact error);
- depth, 4 of 30 layers: angular_block, ShortGPT and IteRABRe without recovery, and with the same recovery tokens
  (recipes/recipe_utils.run_prune_recover: LoRA + distillation from the dense model; one-shot methods prune first and
  recover on all tokens, IteRABRe recovers an equal share after each of its stages).

A peer runs in its venv (benchmarks/peer_worker.py) and writes its pruned weights back; this process loads them into
the same model class and evaluates them with the same code, so evaluation is identical for every row. Each row runs
in its own process (`--row`), torch.set_num_threads(--threads), so its peak RSS (getrusage) is its own; a peer row's
pruning peak is the worker's. Results are rewritten after every row (`--out`.json/.md); `--resume` keeps finished
rows.

    nohup nice python benchmarks/peers.py > peers.log 2>&1 &
    python benchmarks/peers.py --rows dense,llmc_sparsegpt_unstructured --eval_tokens 2048 --out /tmp/try
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "recipes"))
sys.path.insert(0, str(ROOT / "benchmarks"))
SHARED = ROOT.parent / "shared" / "data"
MC_TASKS = ("goal_step_wikihow_step_inference.json", "social_iqa.json", "cause_and_effect_one_sentence.json")


def _rows() -> dict[str, dict]:
    rows: dict[str, dict] = {"dense": {"group": "dense", "label": "dense", "by": "-"}}
    for mask in ("unstructured", "2:4"):
        for algo, name in (("sparsegpt", "SparseGPT"), ("wanda", "Wanda")):
            rows[f"llmc_{algo}_{mask}"] = {"group": f"sparse {mask}", "label": f"{name} {mask}", "by": "peer",
                                           "peer": "llmcompressor", "algo": algo, "mask": mask}
        for crit, name in (("surgeon", "LLM Surgeon"), ("kobd", "K-OBD"), ("magnitude", "magnitude")):
            rows[f"{crit}_{mask}"] = {"group": f"sparse {mask}", "label": f"{name} {mask}", "by": "hf-prune",
                                      "method": "llm_surgeon", "config": {"mode": mask, "criterion": crit}}
    # ablation for the 2:4 gap: K-OBD's selection with SparseGPT's kind of weight update (llm_surgeon update_rule)
    rows["kobd_cols_2:4"] = {"group": "sparse 2:4", "label": "K-OBD + column update 2:4", "by": "hf-prune",
                             "method": "llm_surgeon", "config": {"mode": "2:4", "criterion": "kobd",
                                                                 "weight_update": True, "update_rule": "columns"}}
    # ... and with the mask chosen inside the sweep (SparseGPT's rule), in the default shots and in one shot
    rows["kobd_adaptive_2:4"] = {"group": "sparse 2:4", "label": "K-OBD + column update, adaptive mask 2:4",
                                 "by": "hf-prune", "method": "llm_surgeon",
                                 "config": {"mode": "2:4", "criterion": "kobd", "weight_update": True,
                                            "update_rule": "columns", "mask_24": "adaptive"}}
    rows["kobd_adaptive_1shot_2:4"] = {"group": "sparse 2:4", "label": "K-OBD + column update, adaptive mask, 1 shot 2:4",
                                       "by": "hf-prune", "method": "llm_surgeon",
                                       "config": {"mode": "2:4", "criterion": "kobd", "weight_update": True,
                                                  "update_rule": "columns", "mask_24": "adaptive", "shots": 1}}
    # ... and calibrated layer by layer on the pruned layers' outputs, as SparseGPT is (llm_surgeon sequential=True)
    rows["kobd_seq_2:4"] = {"group": "sparse 2:4", "label": "LLM Surgeon sequential 2:4 (column update, adaptive mask)",
                            "by": "hf-prune", "method": "llm_surgeon",
                            "config": {"mode": "2:4", "criterion": "kobd", "sequential": True, "shots": 1}}
    for algo in ("taylor", "magnitude"):
        rows[f"tp_{algo}"] = {"group": "width 20%", "label": f"Torch-Pruning ({algo} importance)", "by": "peer",
                              "peer": "torch-pruning", "algo": algo}
    for m, name in (("pip", "PIP"), ("llm_pruner", "LLM-Pruner"), ("magnitude", "magnitude (structured)")):
        rows[f"width_{m}"] = {"group": "width 20%", "label": name, "by": "hf-prune", "method": m, "config": {}}
    # its LLM mode needs Megatron-Core; its generic FastNAS search is given --modelopt_timeout seconds
    # the same method after the fix of its per-parameter score (sum of squares); width_magnitude may predate it
    rows["width_magnitude_fixed"] = {"group": "width 20%", "label": "magnitude (structured), mean-square score",
                                     "by": "hf-prune", "method": "magnitude", "config": {}}
    rows["modelopt"] = {"group": "width 20%", "label": "ModelOpt prune", "by": "peer", "peer": "modelopt",
                        "timeout_arg": "modelopt_timeout"}
    for m, name in (("angular_block", "angular block"), ("shortgpt", "ShortGPT"), ("iterabre", "IteRABRe")):
        rows[f"depth_{m}"] = {"group": "depth", "label": f"{name}, no recovery", "by": "hf-prune", "method": m,
                              "depth": True}
        rows[f"depth_{m}_rec"] = {"group": "depth", "label": f"{name} + recovery", "by": "hf-prune", "method": m,
                                  "depth": True, "recover": True}
    return rows


ROWS = _rows()
PEER_DIST = {"llmcompressor": "llmcompressor", "torch-pruning": "torch-pruning", "modelopt": "nvidia-modelopt"}
# perplexity for every row first (cheap rows of every group early), then the multiple-choice passes on the rows
# that decide the depth question, then the slowest rows
DEFAULT_ORDER = (
    "dense,llmc_sparsegpt_unstructured,kobd_unstructured,magnitude_unstructured,llmc_wanda_unstructured,"
    "llmc_sparsegpt_2:4,llmc_wanda_2:4,kobd_2:4,magnitude_2:4,"
    "tp_taylor,tp_magnitude,width_llm_pruner,width_magnitude,modelopt,"
    "depth_angular_block,depth_shortgpt,depth_angular_block_rec,depth_iterabre_rec,depth_shortgpt_rec,"
    "depth_iterabre,mc:dense,mc:depth_angular_block_rec,mc:depth_iterabre_rec,"
    "width_pip,surgeon_unstructured,surgeon_2:4"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default=DEFAULT_ORDER, help=f"comma list, run in this order; any of {', '.join(ROWS)}")
    p.add_argument("--mc_rows", default="",
                   help="rows that get the multiple-choice evaluation right after their perplexity ('all' for every "
                        "row); an entry 'mc:ROW' in --rows instead scores ROW's saved model later in the queue")
    p.add_argument("--calibration_text", default=str(SHARED / "austen"))
    p.add_argument("--calibration_samples", type=int, default=16)
    p.add_argument("--seq_len", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--sparsity", type=float, default=0.5, help="sparse rows: fraction of each decoder linear")
    p.add_argument("--width_target", type=float, default=0.2, help="structured rows: fraction of all parameters")
    p.add_argument("--surgeon_shots", type=int, default=2, help="llm_surgeon shots (all three criteria)")
    p.add_argument("--surgeon_chunk", type=int, default=2000, help="llm_surgeon chunk_size (surgeon criterion)")
    p.add_argument("--n_remove", type=int, default=4, help="depth rows: layers removed")
    p.add_argument("--recovery_tokens", type=int, default=8192,
                   help="depth rows with recovery: total recovery tokens (recipes/configs/iterabre_smollm2.yaml)")
    p.add_argument("--recovery_seq_len", type=int, default=128)
    p.add_argument("--iterabre_samples", type=int, default=2,
                   help="IteRABRe selects on the first N calibration blocks (its selection re-runs the suffix of "
                        "the network for every candidate layer)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--eval_text", default=str(SHARED / "wiki_en.txt"))
    p.add_argument("--eval_tokens", type=int, default=8192)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--mc_limit", type=int, default=500)
    p.add_argument("--peer_timeout", type=int, default=900, help="seconds a peer's worker may run")
    p.add_argument("--modelopt_timeout", type=int, default=300, help="seconds the ModelOpt worker may run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(Path.home() / ".cache" / "hf_prune" / "peers_work"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "peers"))
    p.add_argument("--resume", action="store_true", help="keep rows already in --out.json without an error")
    p.add_argument("--layer_error", action="store_true",
                   help="instead of rows: add the per-layer reconstruction error of the sparse rows to --out")
    p.add_argument("--report", action="store_true", help="instead of rows: rewrite --out.md from --out.json")
    p.add_argument("--layer_error_samples", type=int, default=4, help="calibration blocks for --layer_error")
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad = [r for r in args.rows.split(",") if r and r.removeprefix("mc:") not in ROWS]
    if bad:
        p.error(f"--rows: unknown {bad}; valid: {', '.join(ROWS)}")
    return args


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def calibration_file(args) -> Path:
    """Write the calibration token ids once (safetensors `input_ids`, shape (samples, seq_len))."""
    from safetensors.torch import save_file

    from hf_prune.assets import load_smollm2  # noqa: F401  (tokenizer via the same asset)
    from hf_prune.data import read_texts, token_blocks

    path = Path(args.work) / f"calibration_{args.calibration_samples}x{args.seq_len}_s{args.seed}.safetensors"
    if not path.is_file():
        from transformers import AutoTokenizer

        from hf_prune.assets import smollm2_path

        tok = AutoTokenizer.from_pretrained(smollm2_path())
        blocks = token_blocks(tok, read_texts(args.calibration_text), args.calibration_samples, args.seq_len,
                              seed=args.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"input_ids": blocks.contiguous()}, str(path))
    return path


def mc_wanted(args, row: str) -> bool:
    return args.mc_rows == "all" or row in args.mc_rows.split(",") or f"mc:{row}" in args.rows.split(",")


def saved_model_path(args, row: str) -> Path:
    return Path(args.work) / "models" / f"{row.replace(':', '-')}.pt"


def multiple_choice_all(model, tok, args, out: dict) -> None:
    from hf_prune.evaluate import multiple_choice

    t0 = time.perf_counter()
    out["mc"] = {Path(t).stem: multiple_choice(model, tok, str(SHARED / "mc" / t), limit=args.mc_limit)
                 for t in MC_TASKS}
    out["mc_seconds"] = time.perf_counter() - t0


def evaluate(model, tok, args, row: str, out: dict) -> None:
    from hf_prune.evaluate import perplexity

    text = Path(args.eval_text).read_text(encoding="utf-8")[: 16 * args.eval_tokens]
    t0 = time.perf_counter()
    out["perplexity"] = perplexity(model, tok, text, window=args.window, max_tokens=args.eval_tokens)
    out["ppl_seconds"] = time.perf_counter() - t0
    if args.mc_rows == "all" or row in args.mc_rows.split(","):
        multiple_choice_all(model, tok, args, out)
    elif mc_wanted(args, row):  # scored later by the 'mc:ROW' entry, from this copy
        import torch

        path = saved_model_path(args, row)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model, path)


def load_row_model(args, target: str, dense):
    """ROW's pruned model for 'mc:ROW', from what its row left under --work: the copy saved for this purpose
    (models/ROW.pt), else the pruned decoder weights (rows/ROW/layers.safetensors: peer sparse rows and hf-prune's
    llm_surgeon rows, loaded into the dense model), else a peer's saved model (rows/ROW/model). None if none exists.
    Returns (model, source description)."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_prune.assets import smollm2_path

    saved = saved_model_path(args, target)
    work = Path(args.work) / "rows" / target.replace(":", "-")
    if saved.is_file():
        return torch.load(saved, weights_only=False), f"{saved} ({time.ctime(saved.stat().st_mtime)})"
    if (work / "layers.safetensors").is_file():
        f = work / "layers.safetensors"
        missing = dense.load_state_dict(load_file(str(f)), strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"unexpected keys in {f}: {missing.unexpected_keys[:5]}")
        return dense, f"{f} ({time.ctime(f.stat().st_mtime)})"
    if (work / "model").is_dir():
        return (AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32),
                f"{work / 'model'} ({time.ctime((work / 'model').stat().st_mtime)})")
    return None, None


def run_mc_row(row: str, args) -> dict:
    """'mc:ROW': the multiple-choice tasks on ROW's pruned model (same code as every other evaluation).

    The model comes from what ROW's run left under --work (load_row_model); its perplexity is measured again on the
    same slice (`mc_ppl_check`, compared with the row's in the report) so a file that changed since cannot pass
    unnoticed. With nothing saved, ROW is pruned again in this process (same seed, same calibration ids) and
    evaluated in full (`mc_rebuilt`)."""
    import torch

    torch.set_num_threads(args.threads)
    from hf_prune.assets import load_smollm2
    from hf_prune.evaluate import perplexity

    target = row.removeprefix("mc:")
    dense, tok = load_smollm2()
    out: dict = {"row": row}
    if target == "dense":
        model, source = dense, "dense SmolLM2"
    else:
        model, source = load_row_model(args, target, dense)
    if model is None:  # prune again; run_row evaluates perplexity and (because mc_rows names it) the MC tasks
        del dense
        args.mc_rows = target
        r = run_row(target, args)
        return {"row": row, "mc": r["mc"], "mc_seconds": r["mc_seconds"], "peak_rss_gb": peak_rss_gb(),
                "mc_model_source": "pruned again in the mc process (nothing saved under --work)",
                "mc_ppl_check": r["perplexity"]["perplexity"], "mc_rebuilt": True,
                "mc_rebuild_prune_seconds": r.get("prune_seconds")}
    model.eval()
    out["mc_model_source"] = source
    if target != "dense":
        text = Path(args.eval_text).read_text(encoding="utf-8")[: 16 * args.eval_tokens]
        out["mc_ppl_check"] = perplexity(model, tok, text, window=args.window, max_tokens=args.eval_tokens)[
            "perplexity"]
    multiple_choice_all(model, tok, args, out)
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def nonzero_fraction(model) -> float:
    import torch

    lin = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    return sum(int((m.weight != 0).sum()) for m in lin) / sum(m.weight.numel() for m in lin)


def run_peer(spec: dict, args, calib: Path, out: dict):
    """Prune in the peer's venv; load what it wrote into our model class."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_prune.assets import smollm2_path
    from peer_env import ensure_venv, package_version

    python = ensure_venv(spec["peer"])
    work = Path(args.work) / "rows" / out["row"].replace(":", "-")
    shutil.rmtree(work, ignore_errors=True)
    cmd = [str(python), str(ROOT / "benchmarks" / "peer_worker.py"), "--peer", spec["peer"],
           "--algo", spec.get("algo", ""), "--mask", spec.get("mask", "unstructured"),
           "--sparsity", str(args.sparsity), "--target", str(args.width_target), "--batch_size", str(args.batch_size),
           "--model", smollm2_path(), "--calibration", str(calib), "--out", str(work), "--threads", str(args.threads)]
    t0 = time.perf_counter()
    try:
        timeout = getattr(args, spec.get("timeout_arg", "peer_timeout"))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out["worker_wall_seconds"] = time.perf_counter() - t0
        out["version"] = package_version(python, PEER_DIST[spec["peer"]])
        out["error"] = f"TimeoutExpired: the peer's pruning call did not return within {timeout} s; killed"
        if (work / "attempts.json").is_file():
            out["peer"] = {"attempts": json.loads((work / "attempts.json").read_text())}
            out["error"] += "; earlier attempts: " + "; ".join(
                f"{a.get('mode')}: {a['error']}" for a in out["peer"]["attempts"] if "error" in a)
        tail = (e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or ""))[-3000:]
        out["traceback"] = tail
        return None
    out["worker_wall_seconds"] = time.perf_counter() - t0
    result_file = work / "result.json"
    res = json.loads(result_file.read_text()) if result_file.is_file() else {}
    out["peer"] = {k: v for k, v in res.items() if k not in ("traceback",)}
    out["version"] = res.get("version")
    if proc.returncode != 0 or "error" in res:
        out["error"] = res.get("error") or f"worker exit {proc.returncode}"
        out["traceback"] = res.get("traceback") or proc.stderr[-4000:]
        return None
    out["prune_seconds"] = res["prune_seconds"]
    out["peak_rss_gb_prune"] = res["peak_rss_gb"]
    if (work / "layers.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(smollm2_path(), dtype=torch.float32)
        missing = model.load_state_dict(load_file(str(work / "layers.safetensors")), strict=False)
        if missing.unexpected_keys:
            raise RuntimeError(f"unexpected keys from the peer: {missing.unexpected_keys[:5]}")
    else:
        model = AutoModelForCausalLM.from_pretrained(str(work / "model"), dtype=torch.float32)
    return model.eval()


def run_depth_recover(spec: dict, args, model, tok, out: dict):
    from recipe_utils import DataArguments, RecoveryArguments, run_prune_recover
    from transformers import TrainingArguments

    from hf_prune.methods import get

    samples = args.iterabre_samples if spec["method"] == "iterabre" else args.calibration_samples
    data = DataArguments(dataset_name=args.calibration_text, calibration_samples=samples,
                         calibration_seq_len=args.seq_len, recovery_seq_len=args.recovery_seq_len)
    kw = {"total_tokens": args.recovery_tokens} if spec["method"] == "iterabre" else {"progress": False}
    method = get(spec["method"], n_remove=args.n_remove, seed=args.seed, **kw)
    targs = TrainingArguments(output_dir=str(Path(args.work) / "trainer" / out["row"]),
                              per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
                              lr_scheduler_type="constant", warmup_steps=0, logging_steps=2, save_strategy="no",
                              report_to="none", seed=args.seed, disable_tqdm=True, use_cpu=True)
    t0 = time.perf_counter()
    r = run_prune_recover(method, model, tok, data, RecoveryArguments(), targs, args.recovery_tokens)
    out["prune_seconds"] = time.perf_counter() - t0
    out["selection_seconds"] = r["selection_seconds"]
    out["recovery_seconds"] = r["recovery_seconds"]
    out["recovery_tokens"] = r["recovery_tokens"]
    out["calibration_tokens"] = samples * args.seq_len
    out["removed"] = sorted(r["plan"].drop_layers)
    out["stages"] = r["plan"].provenance.get("stages")
    out["train_loss"] = [h["loss"] for h in r["log_history"] if "loss" in h]
    return r["model"].eval()


def method_for(spec: dict, args, tok=None):
    from hf_prune.methods import get

    if spec["method"] == "llm_surgeon":
        cfg = {"shots": args.surgeon_shots, **spec["config"], "target": args.sparsity, "seed": args.seed}
        if cfg["criterion"] == "surgeon":
            cfg["chunk_size"] = args.surgeon_chunk
        return get("llm_surgeon", **cfg)
    if spec.get("depth"):
        if spec["method"] == "iterabre":
            return get("iterabre", n_remove=args.n_remove, seed=args.seed)
        return get(spec["method"], n_remove=args.n_remove, seed=args.seed, progress=False)
    if spec["method"] == "pip":  # its default character perturbation re-tokenizes perturbed text
        return get("pip", target=args.width_target, seed=args.seed, progress=False, tokenizer=tok)
    return get(spec["method"], target=args.width_target, seed=args.seed, progress=False)


def dirty_sources() -> list[str]:
    """hf_prune/ files that differ from the commit (the tree is shared: a row records what it ran with)."""
    st = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "hf_prune"], capture_output=True,
                        text=True).stdout
    return [line[3:] for line in st.splitlines()]


def run_row(row: str, args) -> dict:
    if row.startswith("mc:"):
        return dict(run_mc_row(row, args), mc_uncommitted_sources=dirty_sources())
    import torch

    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    import hf_prune
    from hf_prune.assets import load_smollm2
    from hf_prune.data import batches

    spec = ROWS[row]
    out: dict = {"row": row, "label": spec["label"], "group": spec["group"], "by": spec["by"],
                 "uncommitted_sources": dirty_sources()}
    calib = calibration_file(args)
    ids = load_file(str(calib))["input_ids"]
    dense, tok = load_smollm2()
    dense_params = sum(p.numel() for p in dense.parameters())
    out["calibration_tokens"] = int(ids.numel())
    if spec["by"] == "peer":
        model = run_peer(spec, args, calib, out)
        if model is None:
            out["peak_rss_gb"] = peak_rss_gb()
            return out
    else:
        out["version"] = hf_prune.__version__
        model = dense
        if row == "dense":
            pass
        elif spec.get("recover"):
            model = run_depth_recover(spec, args, dense, tok, out)
        else:
            b = batches(ids, args.batch_size)
            if spec["method"] == "iterabre":
                b = batches(ids[: args.iterabre_samples], args.batch_size)
                out["calibration_tokens"] = int(ids[: args.iterabre_samples].numel())
            method = method_for(spec, args, tok)
            t0 = time.perf_counter()
            result = hf_prune.prune(model, method, b)
            out["prune_seconds"] = time.perf_counter() - t0
            out["config"] = method.config_dict() if hasattr(method, "config_dict") else None
            if spec["method"] == "llm_surgeon":  # kept for the per-layer reconstruction comparison with the peers
                from safetensors.torch import save_file

                keep = Path(args.work) / "rows" / row.replace(":", "-")
                keep.mkdir(parents=True, exist_ok=True)
                save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()
                           if k.startswith("model.layers.")}, str(keep / "layers.safetensors"))
            if result.plan is not None and result.plan.drop_layers:
                out["removed"] = sorted(result.plan.drop_layers)
        out["peak_rss_gb_prune"] = peak_rss_gb()
    out["parameters"] = sum(p.numel() for p in model.parameters())
    out["parameters_dense"] = dense_params
    out["layers"] = model.config.num_hidden_layers
    out["nonzero_linear_fraction"] = nonzero_fraction(model)
    evaluate(model, tok, args, row, out)
    out["peak_rss_gb"] = peak_rss_gb()
    return out


def child(row: str, argv: list[str]) -> dict:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--row", row],
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("ROW ")]
    if proc.returncode != 0 or not lines:
        spec = ROWS[row.removeprefix("mc:")]
        return {"row": row, "label": spec["label"], "group": spec["group"], "by": spec["by"],
                "error": f"row process exit {proc.returncode}", "traceback": proc.stderr[-4000:]}
    return json.loads(lines[-1][4:])


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def _ppl(r: dict | None) -> float | None:
    return r["perplexity"]["perplexity"] if r and "perplexity" in r else None


def _mc_mean(r: dict, key: str = "acc_norm") -> float | None:
    mc = r.get("mc")
    return sum(v[key] for v in mc.values()) / len(mc) if mc else None


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


# the comparisons that decide each question: (question, reference row (a peer, or the angular block: the simple
# depth baseline from Gromov et al. 2024 that the issue asked hf-prune to beat), hf-prune row)
COMPARISONS = (
    ("50% unstructured", "llmc_sparsegpt_unstructured", "kobd_unstructured"),
    ("50% unstructured", "llmc_sparsegpt_unstructured", "surgeon_unstructured"),
    ("50% unstructured", "llmc_sparsegpt_unstructured", "magnitude_unstructured"),
    ("50% unstructured", "llmc_wanda_unstructured", "kobd_unstructured"),
    ("50% unstructured", "llmc_wanda_unstructured", "magnitude_unstructured"),
    ("2:4", "llmc_sparsegpt_2:4", "kobd_2:4"),
    ("2:4", "llmc_sparsegpt_2:4", "kobd_cols_2:4"),
    ("2:4", "llmc_sparsegpt_2:4", "surgeon_2:4"),
    ("2:4", "llmc_sparsegpt_2:4", "kobd_seq_2:4"),
    ("2:4", "llmc_sparsegpt_2:4", "magnitude_2:4"),
    ("2:4", "llmc_wanda_2:4", "kobd_2:4"),
    ("2:4", "llmc_wanda_2:4", "magnitude_2:4"),
    ("20% of parameters", "tp_taylor", "width_llm_pruner"),
    ("20% of parameters", "tp_taylor", "width_pip"),
    ("20% of parameters", "tp_magnitude", "width_magnitude_fixed"),
    ("depth 4/30, no recovery", "depth_angular_block", "depth_shortgpt"),
    ("depth 4/30, no recovery", "depth_angular_block", "depth_iterabre"),
    ("depth 4/30, equal recovery", "depth_angular_block_rec", "depth_iterabre_rec"),
    ("depth 4/30, equal recovery", "depth_angular_block_rec", "depth_shortgpt_rec"),
)


def _mc_se(r: dict, key: str = "acc_norm") -> float | None:
    """Binomial standard error of the unweighted task mean (examples independent; the tasks are fixed)."""
    mc = r.get("mc")
    if not mc:
        return None
    return sum(v[key] * (1 - v[key]) / v["n"] for v in mc.values()) ** 0.5 / len(mc)


def _mc_pooled(r: dict, key: str = "acc_norm") -> float | None:
    mc = r.get("mc")
    return sum(v[key] * v["n"] for v in mc.values()) / sum(v["n"] for v in mc.values()) if mc else None


def _verdict(ref: dict, ours: dict) -> str:
    """Who wins, and by how much, on perplexity and (where both were scored) the mean MC acc_norm."""
    parts = []
    pr, po = _ppl(ref), _ppl(ours)
    if pr and po:
        parts.append(f"hf-prune, ppl {(1 - po / pr) * 100:.1f}% lower" if po < pr else
                     f"**reference: hf-prune's ppl {(po / pr - 1) * 100:.1f}% higher**" if po > pr else "tie")
    mr, mo = _mc_mean(ref), _mc_mean(ours)
    if mr is not None and mo is not None:
        se = ((_mc_se(ref) or 0) ** 2 + (_mc_se(ours) or 0) ** 2) ** 0.5
        d = mo - mr
        tag = f"{abs(d):.3f} acc_norm ({abs(d) / se:.1f} SE)" if se else f"{abs(d):.3f} acc_norm"
        parts.append(("MC: hf-prune +" if d > 0 else "MC: **reference +" if d < 0 else "MC: tie ") + tag +
                     ("**" if d < 0 else ""))
    return "; ".join(parts) or "-"


def comparison_lines(rows: dict[str, dict]) -> list[str]:
    """The decisive pairs (COMPARISONS) that both ran: hf-prune / reference for perplexity (< 1: hf-prune better)
    and for the mean MC acc_norm (> 1: hf-prune better), pruning seconds and pruning peak memory."""
    lines = ["| question | reference (version) | hf-prune | ppl ref / hf-prune | ppl ratio | MC acc_norm ref / "
             "hf-prune | MC ratio | prune s ref / hf-prune | peak GB ref / hf-prune | who wins, by how much |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for question, a, b in COMPARISONS:
        ref, ours = rows.get(a), rows.get(b)
        if not ref or not ours or "error" in ref or "error" in ours:
            continue
        pr, po = _ppl(ref), _ppl(ours)
        mr, mo = _mc_mean(ref), _mc_mean(ours)
        ver = ref.get("version") if ref["by"] == "peer" else "hf-prune baseline"

        def pair(key, spec):
            x, y = ref.get(key), ours.get(key)
            return "-" if x is None or y is None else f"{x:{spec}} / {y:{spec}}"

        lines.append(
            f"| {question} | {ref['label']} ({ver}) | {ours['label']} | {_fmt(pr)} / {_fmt(po)} | "
            f"{_fmt(po / pr if pr and po else None, '.3f')} | {_fmt(mr, '.3f')} / {_fmt(mo, '.3f')} | "
            f"{_fmt(mo / mr if mr and mo is not None else None, '.3f')} | {pair('prune_seconds', '.0f')} | "
            f"{pair('peak_rss_gb_prune', '.2f')} | {_verdict(ref, ours)} |")
    return lines


def ratio_lines(rows: dict[str, dict]) -> list[str]:
    """Each peer beside every hf-prune row of its group: perplexity, pruning seconds and pruning peak memory as
    hf-prune / peer (below 1: hf-prune better, faster, smaller)."""
    lines = ["| group | peer (version) | peer ppl | hf-prune method | hf-prune ppl | ppl ratio | prune s peer / hf-prune "
             "(ratio) | peak GB peer / hf-prune (ratio) | params peer / hf-prune (M) |",
             "|---|---|---|---|---|---|---|---|---|"]

    def pair(p: dict, r: dict | None, key: str, spec: str) -> str:
        a, b = p.get(key), (r or {}).get(key)
        if a is None or b is None:
            return "-"
        return f"{a:{spec}} / {b:{spec}} ({b / a:.2f})"

    for p in rows.values():
        if p["by"] != "peer":
            continue
        peer_ppl = _ppl(p)
        peer_cell = p["label"] + f" ({p.get('version') or '?'})"
        ours = [r for r in rows.values() if r["by"] == "hf-prune" and r["group"] == p["group"]] or [None]
        for r in ours:
            ppl = _ppl(r)
            ratio = ppl / peer_ppl if ppl and peer_ppl else None
            params = (f"{p['parameters'] / 1e6:.2f} / {r['parameters'] / 1e6:.2f}"
                      if r and "parameters" in p and "parameters" in r else "-")
            lines.append(f"| {p['group']} | {peer_cell} | {_fmt(peer_ppl) if peer_ppl else 'error'} | "
                         f"{r['label'] if r else '-'} | {_fmt(ppl)} | {_fmt(ratio, '.3f')} | "
                         f"{pair(p, r, 'prune_seconds', '.0f')} | {pair(p, r, 'peak_rss_gb_prune', '.2f')} | {params} |")
    return lines


def winner_lines(rows: dict[str, dict]) -> list[str]:
    """Every decisive comparison a reference wins, with its margin."""
    out = []
    for question, a, b in COMPARISONS:
        ref, ours = rows.get(a), rows.get(b)
        if not ref or not ours or "error" in ref or "error" in ours:
            continue
        pr, po, mr, mo = _ppl(ref), _ppl(ours), _mc_mean(ref), _mc_mean(ours)
        bits = []
        if pr and po and po > pr:
            bits.append(f"perplexity {pr:.2f} vs {po:.2f} (hf-prune {(po / pr - 1) * 100:.1f}% higher)")
        if mr is not None and mo is not None and mo < mr:
            se = (_mc_se(ref) ** 2 + _mc_se(ours) ** 2) ** 0.5
            bits.append(f"MC acc_norm {mr:.3f} vs {mo:.3f} ({mr - mo:.3f}, {(mr - mo) / se:.1f} SE)")
        if bits:
            out.append(f"- {question}: {ref['label']} beats {ours['label']}: " + "; ".join(bits) + ".")
    return (["Where the reference wins (by how much):", "", *out] if out else
            ["No reference wins any of the comparisons above."])


def markdown(res: dict) -> str:
    info, a, rows = res["info"], res["args"], res["rows"]
    dense_ppl = _ppl(rows.get("dense"))
    lines = ["# hf-prune beside the peers: SmolLM2-135M, one run", "",
             "Commands (this file's rows were made by these runs, in order; `--resume` keeps finished rows and every "
             "row is its own process, so a restart changes nothing in a finished row):  ",
             *[f"`{c}`  " for c in res.get("commands") or [info["command"]]],
             f"Machine: {info['machine']}, {info['cpu_count']} CPUs shared with other jobs (load average "
             f"{res['load_average_start']} at start, {res.get('load_average_end', '-')} at the last row); every row "
             f"process uses {a['threads']} thread(s) under `nice`; wall times compare only within this run.  ",
             f"Versions (ours): python {info['python']}, torch {info['torch']}, transformers {info['transformers']}, "
             f"hf_prune {info['hf_prune']} (git {res['git'][:12]}). Each row's peer version is in its row; "
             f"llm-compressor runs in its own venv with its pinned transformers (see the JSON).  ",
             f"Calibration (every row): {a['calibration_samples']} x {a['seq_len']} tokens of "
             f"{Path(a['calibration_text']).name}/ (seed {a['seed']}), the same token ids for every tool "
             f"(IteRABRe selects on the first {a['iterabre_samples']} blocks).  ",
             f"Perplexity: first {a['eval_tokens']} tokens of {Path(a['eval_text']).name}, window {a['window']}. "
             f"Multiple choice (first {a['mc_limit']} examples per task; cause_and_effect has 51): only the rows in "
             f"the MC table below (its last column is the measured cost per row; the whole grid would not have "
             f"finished in the time this shared machine had).  ",
             f"Sparse rows: {a['sparsity']:.0%} of every decoder linear; LLM Surgeon/K-OBD/magnitude with "
             f"{a['surgeon_shots']} shots (surgeon chunk_size {a['surgeon_chunk']}). Width rows: "
             f"{a['width_target']:.0%} of all parameters. Depth rows: {a['n_remove']} of 30 layers; recovery "
             f"{a['recovery_tokens']} tokens ({a['recovery_seq_len']}-token blocks, LoRA r8 + distillation from "
             f"the dense model, lr {a['lr']}).", "",
             "## The comparisons that decide each question", "",
             "Ratios are hf-prune / reference: perplexity ratio < 1 and MC ratio > 1 mean hf-prune is better. MC is "
             "the unweighted mean acc_norm over the three tasks (its binomial standard error is about 0.02-0.03, see "
             "the MC table: differences under ~2 SE are noise). The depth reference is the angular-distance block "
             "(Gromov et al. 2024, `angular_block`), the simple baseline the issue asked hf-prune to beat. "
             "Prune seconds and peak GB are the pruning step's (depth rows with recovery: selection + recovery).", "",
             *comparison_lines(rows), "", *winner_lines(rows), "",
             "## Every peer beside every hf-prune row of its group (perplexity; ratio < 1: hf-prune better)", "",
             *ratio_lines(rows), "",
             "## All rows", "",
             "| group | row | by | version | params (M) | nonzero linear | ppl | x dense | MC acc_norm (mean) | "
             "prune s | peak RSS GB (pruning) | peak RSS GB (row) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows.values():
        if "error" in r:
            lines.append(f"| {r['group']} | {r['label']} | {r['by']} | {r.get('version') or '-'} | error: "
                         f"{r['error'][:300].replace('|', '/')} | | | | | | | |")
            continue
        ppl = _ppl(r)
        lines.append(
            f"| {r['group']} | {r['label']} | {r['by']} | {r.get('version') or '-'} | "
            f"{r['parameters'] / 1e6:.2f} | {_fmt(r.get('nonzero_linear_fraction'), '.3f')} | {_fmt(ppl)} | "
            f"{_fmt(ppl / dense_ppl if ppl and dense_ppl else None)} | {_fmt(_mc_mean(r), '.3f')} | "
            f"{_fmt(r.get('prune_seconds'), '.0f')} | {_fmt(r.get('peak_rss_gb_prune'))} | "
            f"{_fmt(r.get('peak_rss_gb'))} |")
    dirty = [f"{r['label']}: {', '.join(r['uncommitted_sources'])}" for r in rows.values()
             if r.get("uncommitted_sources")]
    if dirty:
        lines += ["", "Rows that ran while hf_prune/ had uncommitted changes in the shared working tree (other "
                  "engineers' work in progress; the git commit above does not fully describe these rows): "
                  + "; ".join(dirty) + "."]
    mc_rows = [r for r in rows.values() if r.get("mc")]
    if mc_rows:
        tasks = list(mc_rows[0]["mc"])
        lines += ["", "## Multiple choice (acc / acc_norm)", "",
                  "Scored on the row's own model, in its row process, or by an 'mc:ROW' entry from what the row left "
                  "under --work (the perplexity column 'ppl check' is measured again on that model; it must equal the "
                  "row's).", "",
                  "| row | " + " | ".join(f"{t} (n={mc_rows[0]['mc'][t]['n']})" for t in tasks) +
                  " | mean acc_norm +/- SE | pooled acc_norm | ppl / ppl check | MC s |",
                  "|---|" + "---|" * (len(tasks) + 4)]
        for r in mc_rows:
            chk = r.get("mc_ppl_check")
            lines.append(f"| {r['label']} | " + " | ".join(
                f"{r['mc'][t]['acc']:.3f} / {r['mc'][t]['acc_norm']:.3f}" for t in tasks) +
                f" | {_mc_mean(r):.3f} +/- {_mc_se(r):.3f} | {_mc_pooled(r):.3f} | {_fmt(_ppl(r))} / {_fmt(chk)} | "
                f"{r['mc_seconds']:.0f} |")
        lines += ["", "Mean: the unweighted mean over the three tasks (used in the comparisons; SE its binomial standard "
                  "error). Pooled: correct answers over all examples (cause_and_effect's 51 weigh less)."]
    depth = [r for r in rows.values() if r["group"] == "depth" and "error" not in r]
    if depth:
        lines += ["", "## Depth", "", "| row | removed | ppl | selection s | recovery s | recovery tokens |",
                  "|---|---|---|---|---|---|"]
        for r in depth:
            lines.append(f"| {r['label']} | {r.get('removed')} | {_fmt(_ppl(r))} | "
                         f"{_fmt(r.get('selection_seconds', r.get('prune_seconds')), '.0f')} | "
                         f"{_fmt(r.get('recovery_seconds'), '.0f')} | {r.get('recovery_tokens', 0)} |")
    errors = [r for r in rows.values() if "error" in r]
    if errors:
        lines += ["", "## Errors (exact)", ""]
        for r in errors:
            lines += [f"### {r['label']}", "", "```", r["error"][:3000], "```", ""]
    failed = [(r, a) for r in rows.values() for a in (r.get("peer") or {}).get("attempts", []) if "error" in a]
    if failed:
        lines += ["", "## Peer attempts that failed inside a row that then ran otherwise (exact errors)", ""]
        for r, a in failed:
            what = {k: v for k, v in a.items() if k not in ("error", "traceback", "seconds")}
            lines += [f"- {r['label']} {json.dumps(what)}: `{a['error'][:600]}`"]
        lines += ["", "Torch-Pruning: when its head pruning fails, the row prunes MLP channels only (uniform per layer), "
                  "at the ratio that removes the same share of parameters; the settings it ran with are in the JSON."]
    if res.get("layer_error"):
        lines += layer_error_markdown(res["layer_error"])
    if res.get("notes"):
        lines += ["", "## Notes", "", *res["notes"]]
    return "\n".join(lines) + "\n"


def layer_error(args) -> dict:
    """Per-linear relative output error of every sparse row's weights on the calibration inputs of the dense model:
    e(W') = tr((W - W') H (W - W')^T) / tr(W H W^T), H = sum_x x x^T over the first --layer_error_samples blocks
    (the objective SparseGPT and Wanda minimise layer by layer; LLM Surgeon weighs errors by the loss curvature G
    instead). Reads the `layers.safetensors` each sparse row left under --work/rows/<row>/."""
    import torch
    from safetensors.torch import load_file

    from hf_prune.arch import get_adapter
    from hf_prune.assets import load_smollm2

    torch.set_num_threads(args.threads)
    ids = load_file(str(calibration_file(args)))["input_ids"][: args.layer_error_samples]
    dense, _ = load_smollm2()
    ad = get_adapter(dense)
    names = {m: n for n, m in dense.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n}
    hess: dict[str, torch.Tensor] = {}

    def hook(mod, inp, _out):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
        n = names[mod]
        hess[n] = hess.get(n, 0) + x.T @ x

    handles = [m.register_forward_hook(hook) for m in names]
    with torch.no_grad():
        for i in range(0, ids.shape[0], args.batch_size):
            ad.backbone(input_ids=ids[i : i + args.batch_size], use_cache=False)
    for h in handles:
        h.remove()
    dense_w = {n + ".weight": m.weight.detach().double() for m, n in names.items()}
    out: dict = {"samples": int(ids.shape[0]), "seq_len": int(ids.shape[1]), "rows": {}}
    for row, spec in ROWS.items():
        f = Path(args.work) / "rows" / row.replace(":", "-") / "layers.safetensors"
        if not spec["group"].startswith("sparse") or not f.is_file():
            continue
        pruned = load_file(str(f))
        per_type: dict[str, list[float]] = {}
        sparsity: dict[str, list[float]] = {}
        num = den = 0.0
        for key, w in dense_w.items():
            sparsity.setdefault(key.split(".")[-2], []).append(float((pruned[key] == 0).double().mean()))
            d = w - pruned[key].double()
            h = hess[key.removesuffix(".weight")]
            e_num, e_den = float(((d @ h) * d).sum()), float(((w @ h) * w).sum())
            per_type.setdefault(key.split(".")[-2], []).append(e_num / e_den)
            num, den = num + e_num, den + e_den
        out["rows"][row] = {"label": spec["label"], "total": num / den,
                            "by_type": {k: sum(v) / len(v) for k, v in per_type.items()},
                            "sparsity_by_type": {k: sum(v) / len(v) for k, v in sparsity.items()},
                            "sparsity_range_by_type": {k: [min(v), max(v)] for k, v in sparsity.items()},
                            "by_layer_mlp_down": per_type.get("down_proj")}
    return out


def layer_error_markdown(le: dict) -> list[str]:
    types = sorted({t for r in le["rows"].values() for t in r["by_type"]})
    lines = ["", f"## Per-layer reconstruction error of the sparse rows (dense inputs, first {le['samples']} x "
             f"{le['seq_len']} calibration tokens)", "",
             "Relative output error tr(dW H dW^T) / tr(W H W^T) per linear, H the dense model's input covariance "
             "(`--layer_error`); 'all' pools every linear of the decoder, the type columns average over the 30 layers.",
             "", "| row | all | " + " | ".join(types) + " |", "|---|---|" + "---|" * len(types)]
    for r in le["rows"].values():
        lines.append(f"| {r['label']} | {r['total']:.4f} | " + " | ".join(f"{r['by_type'][t]:.4f}" for t in types)
                     + " |")
    lines += ["", "Where each row put its zeros: mean sparsity per linear type [min-max over the 30 layers].", "",
              "| row | " + " | ".join(types) + " |", "|---|" + "---|" * len(types)]
    for r in le["rows"].values():
        if "sparsity_by_type" in r:
            lines.append(f"| {r['label']} | " + " | ".join(
                f"{r['sparsity_by_type'][t]:.2f} [{r['sparsity_range_by_type'][t][0]:.2f}-"
                f"{r['sparsity_range_by_type'][t][1]:.2f}]" for t in types) + " |")
    return lines


def main(argv: list[str] | None = None) -> dict | None:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.row is not None:
        print("ROW " + json.dumps(run_row(args.row, args), default=str), flush=True)
        return None
    from recipe_utils import run_info, write_json

    out = Path(args.out)
    if args.layer_error or args.report:  # add the diagnostic to an existing result / rewrite its Markdown
        res = json.loads(out.with_suffix(".json").read_text())
        if args.layer_error:
            res["layer_error"] = layer_error(args)
        write_json(out.with_suffix(".json"), res)
        out.with_suffix(".md").write_text(markdown(res))
        return res
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    res: dict = {"info": run_info(["benchmarks/peers.py", *argv]), "args": vars(args), "git": git.strip(),
                 "load_average_start": [round(x, 1) for x in os.getloadavg()], "rows": {}}
    if args.resume and out.with_suffix(".json").is_file():
        old = json.loads(out.with_suffix(".json").read_text())
        queued = {r.removeprefix("mc:") for r in args.rows.split(",") if r}
        # a failed row is run again only when it is queued; otherwise its exact error stays in the report
        res["rows"] = {k: v for k, v in old["rows"].items() if "error" not in v or k not in queued}
        res["notes"] = old.get("notes", [])
        for key in ("layer_error", "comparison_notes"):
            if key in old:
                res[key] = old[key]
        res["commands"] = old.get("commands") or [old["info"]["command"]]
    res.setdefault("commands", [])
    res["commands"].append(res["info"]["command"])
    calibration_file(args)  # written once, before any row
    child_argv = [a for a in argv if a != "--resume"]
    for row in [r for r in args.rows.split(",") if r]:
        target = row.removeprefix("mc:")
        if row in res["rows"] or (row != target and "mc" in res["rows"].get(target, {})):
            continue
        if row != target and "perplexity" not in res["rows"].get(target, {}):
            continue  # its model was never made
        t0 = time.perf_counter()
        r = child(row, child_argv)
        r["row_wall_seconds"] = time.perf_counter() - t0
        r["finished"] = time.strftime("%H:%M:%S")
        if row != target:  # merge into the row it scores
            if "error" in r:
                res["rows"][target]["mc_error"] = r["error"] + "\n" + r.get("traceback", "")[-2000:]
            else:
                res["rows"][target].update(mc=r["mc"], mc_seconds=r["mc_seconds"], mc_peak_rss_gb=r["peak_rss_gb"],
                                           **{k: v for k, v in r.items() if k.startswith("mc_") and k != "mc_seconds"})
            r = dict(res["rows"][target], row_wall_seconds=r["row_wall_seconds"])
        else:
            res["rows"][row] = r
        res["load_average_end"] = [round(x, 1) for x in os.getloadavg()]
        write_json(out.with_suffix(".json"), res)
        out.with_suffix(".md").write_text(markdown(res))
        print(f"[{time.strftime('%H:%M:%S')}] {row}: " +
              (f"ppl {_ppl(r):.2f}, mc {_fmt(_mc_mean(r), '.3f')}, {r['row_wall_seconds']:.0f} s" if _ppl(r) else
               "error: " + r.get("error", "")[-500:]), flush=True)
    return res


if __name__ == "__main__":
    main()
