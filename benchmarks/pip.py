"""PIP vs LLM-Pruner (Taylor) vs magnitude on SmolLM2-135M-Instruct at a parameter target, with and without recovery.

For each method: prune a fresh copy of the dense model to the target (no recovery), evaluate; then prune another
fresh copy inside a Trainer with LoRA recovery (PruneCallback + prune_and_train: PIP's and magnitude's steps are
spread over the recovery run, LLM-Pruner prunes once before it; the total recovery budget is the same), merge,
evaluate. Quality: perplexity on wiki_en.txt (first --ppl-max-tokens tokens, non-overlapping --window windows) and
zero-shot accuracy on the BIG-bench multiple-choice tasks in <data-dir>/mc (first --mc-limit examples each). Writes
JSON and Markdown after every run (machine, versions, command, settings, wall times); --resume skips finished runs.

    nohup python benchmarks/pip.py > benchmarks/results/pip.log 2>&1 &          # the reduced CPU configuration
    python benchmarks/pip.py --quick                                               # a minutes-long smoke run
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_PRUNE_NO_PROGRESS", "1")

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default="/work/shared/data", help="folder holding wiki_en.txt, mc/ and austen/")
    p.add_argument("--wiki", default=None, help="perplexity text (default: <data-dir>/wiki_en.txt)")
    p.add_argument("--mc-dir", default=None, help="BIG-bench JSON tasks (default: <data-dir>/mc)")
    p.add_argument("--train-text", default=None,
                   help="calibration + recovery text: files/folders, or 'default' for hf_prune.assets.default_corpus "
                        "(default: <data-dir>/austen)")
    p.add_argument("--methods", default="pip,llm_pruner,taylor_pip_schedule,magnitude",
                   help="comma-separated registered methods, or taylor_pip_schedule (llm_pruner's Taylor score with "
                        "pip's steps, global allocation and layer protection)")
    p.add_argument("--target", type=float, default=0.2, help="fraction of parameters removed")
    p.add_argument("--target-of", default="all", choices=["all", "layers"],
                   help="'all' parameters (embeddings counted once, as the papers) or decoder 'layers' only")
    p.add_argument("--steps", type=int, default=4,
                   help="pruning steps of pip, magnitude and taylor_pip_schedule (llm_pruner: 1)")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=128)
    p.add_argument("--recovery-steps", type=int, default=80, help="optimizer steps of LoRA recovery (0: skip)")
    p.add_argument("--recovery-batch", type=int, default=4)
    p.add_argument("--recovery-seq-len", type=int, default=128)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--window", type=int, default=512, help="perplexity window")
    p.add_argument("--ppl-max-tokens", type=int, default=8192, help="first N tokens of the text (0: all)")
    p.add_argument("--mc-limit", type=int, default=200, help="first N examples per task (0: all)")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="tiny budget smoke run (numbers meaningless)")
    p.add_argument("--resume", action="store_true", help="keep finished runs found in --out")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pip.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.calib_samples, args.calib_seq_len, args.recovery_steps = 2, 32, 4
        args.ppl_max_tokens, args.mc_limit, args.steps = 1024, 8, 2
    return args


# ---------------------------------------------------------------------------------------------------------------------


def environment() -> dict:
    import peft
    import torch
    import transformers

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_start": os.getloadavg(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "hf_prune_git": rev or None,
    }


def chance_level(task_path: Path, limit: int | None) -> float:
    examples = json.loads(task_path.read_text())["examples"]
    examples = examples[:limit] if limit else examples
    return sum(1 / len(e["target_scores"]) for e in examples) / len(examples)


def evaluate(model, tok, args, wiki_text: str, tasks: list[Path]) -> dict:
    from hf_prune.evaluate import multiple_choice, perplexity

    t0 = time.perf_counter()
    out = {"num_parameters": sum(p.numel() for p in model.parameters())}
    out["perplexity"] = perplexity(model, tok, wiki_text, window=args.window,
                                   max_tokens=args.ppl_max_tokens or None)["perplexity"]
    out["mc"] = {t.stem: multiple_choice(model, tok, t, limit=args.mc_limit or None, batch_size=8) for t in tasks}
    out["acc"] = sum(r["acc"] for r in out["mc"].values()) / len(tasks)
    out["acc_norm"] = sum(r["acc_norm"] for r in out["mc"].values()) / len(tasks)
    out["eval_seconds"] = round(time.perf_counter() - t0, 1)
    return out


# Runs beyond the registered names: Taylor scores with PIP's schedule (isolates the perturbation criterion).
VARIANTS = {
    "taylor_pip_schedule": ("llm_pruner", {"allocation": "global", "skip_first_layers": 1, "skip_last_layers": 1}),
}


def make_method(name: str, args, tok):
    from hf_prune.methods import get

    registered, extra = VARIANTS.get(name, (name, {}))
    kw = dict(target=args.target, target_of=args.target_of, progress=False, seed=args.seed, **extra)
    if registered in ("pip", "magnitude") or name in VARIANTS:
        kw["steps"] = args.steps
    if registered == "pip":
        kw["tokenizer"] = tok
    return get(registered, **kw)


def prune_only(name: str, args, tok, calib) -> tuple[object, dict]:
    from hf_prune.assets import load_smollm2
    from hf_prune.pipeline import prune

    model, _ = load_smollm2()
    method = make_method(name, args, tok)
    t0 = time.perf_counter()
    plans = prune(model, method, calib).plans
    info = {"prune_seconds": round(time.perf_counter() - t0, 1), "stages": method.stages,
            "config": method.config_dict(), "plans": [p.provenance for p in plans]}
    return model, info


def prune_and_recover(name: str, args, tok, calib, recovery_ds) -> tuple[object, dict]:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hf_prune.assets import load_smollm2
    from hf_prune.callbacks import PruneCallback, PruneSchedule, prune_and_train

    model, _ = load_smollm2()
    method = make_method(name, args, tok)
    lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.05, target_modules=LORA_TARGETS,
                      task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    every = max(1, math.ceil(args.recovery_steps / method.stages))
    with tempfile.TemporaryDirectory(prefix="pip-bench-") as out_dir:
        targs = TrainingArguments(
            output_dir=out_dir, max_steps=args.recovery_steps, per_device_train_batch_size=args.recovery_batch,
            learning_rate=args.lr, lr_scheduler_type="linear", warmup_steps=min(10, args.recovery_steps // 10),
            optim="adamw_torch", logging_steps=10, save_strategy="no", report_to="none", use_cpu=True,
            seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
        )
        cb = PruneCallback(method, calibration=calib, schedule=PruneSchedule(every_n_steps=every))
        trainer = Trainer(model=model, args=targs, train_dataset=recovery_ds, data_collator=default_data_collator,
                          callbacks=[cb])
        t0 = time.perf_counter()
        prune_and_train(trainer)
        seconds = time.perf_counter() - t0
        history = trainer.state.log_history
        model = trainer.model.merge_and_unload()
    scoring = sum(h.get("prune/scoring_seconds", 0.0) for h in history)
    losses = [h["loss"] for h in history if "loss" in h]
    info = {"prune_and_recover_seconds": round(seconds, 1), "scoring_seconds": round(scoring, 1),
            "stages": method.stages, "prune_every_n_steps": every, "config": method.config_dict(),
            "train_loss_first_last": [losses[0], losses[-1]] if losses else None,
            "stages_done": cb.stages_done}
    return model.eval(), info


# ---------------------------------------------------------------------------------------------------------------------


def retention(run: dict, dense: dict, chance: float, key: str) -> tuple[float, float]:
    """(acc / dense acc, (acc - chance) / (dense acc - chance)) for the task mean of `key`."""
    return run[key] / dense[key], (run[key] - chance) / (dense[key] - chance)


def markdown(result: dict) -> str:
    s, runs = result["settings"], result["runs"]
    dense = runs.get("dense")
    lines = [
        "# PIP vs LLM-Pruner vs magnitude on SmolLM2-135M-Instruct",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['environment']['platform']}, {result['environment']['cpu_count']} CPUs (shared), "
        f"torch {result['environment']['torch']} ({result['environment']['torch_threads']} threads), transformers "
        f"{result['environment']['transformers']}, peft {result['environment']['peft']}.",
        "",
        f"Target: {s['target']:.0%} of {'all parameters' if s['target_of'] == 'all' else 'decoder-layer parameters'}"
        f" (embeddings are tied and counted once). Calibration: {s['calib_samples']} x {s['calib_seq_len']} tokens of "
        f"{s['train_text']}. Recovery: LoRA r={s['lora_r']} on all linear layers, lr {s['lr']}, "
        f"{s['recovery_steps']} steps x {s['recovery_batch']} x {s['recovery_seq_len']} tokens "
        f"({s['recovery_steps'] * s['recovery_batch'] * s['recovery_seq_len']:,} tokens) for every method; the "
        f"{s['steps']} steps of pip, magnitude and taylor_pip_schedule (LLM-Pruner's Taylor score with PIP's steps, "
        "global allocation and first/last layer kept) are spread over it; llm_pruner (one shot, equal share per "
        "layer, layers 3..L-2) prunes once before it. Rows without '+ LoRA' are pruned with no training at all.",
        f"Perplexity: wiki_en.txt, first {s['ppl_max_tokens']} tokens, {s['window']}-token windows. Accuracy: mean "
        f"over the BIG-bench tasks ({', '.join(result['tasks'])}), first {s['mc_limit']} examples each; chance "
        f"{result['chance']:.3f}. Retention = acc / dense acc; above chance = (acc - chance) / (dense - chance).",
        "",
        "| run | params | ppl | acc | acc_norm | acc kept | acc kept above chance | wall s (prune [+ recover]) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        if "perplexity" not in r:
            continue
        kept, kept_c = ("-", "-")
        if dense and name != "dense":
            a, b = retention(r, dense, result["chance"], "acc")
            kept, kept_c = f"{a:.1%}", f"{b:.1%}"
        wall = r.get("prune_and_recover_seconds", r.get("prune_seconds", "-"))
        lines.append(f"| {name} | {r['num_parameters'] / 1e6:.1f}M | {r['perplexity']:.2f} | {r['acc']:.3f} | "
                     f"{r['acc_norm']:.3f} | {kept} | {kept_c} | {wall} |")
    lines += ["", "Per task (acc / acc_norm):", ""]
    for name, r in runs.items():
        if "mc" in r:
            per = ", ".join(f"{t}: {v['acc']:.3f}/{v['acc_norm']:.3f} (n={v['n']})" for t, v in r["mc"].items())
            lines.append(f"- {name}: {per}")
    if result.get("memory"):
        m = result["memory"]
        lines += ["", f"Memory of one PIP gradient pass: estimated {m['estimate']}; process peak RSS after PIP "
                      f"scoring {m['peak_rss_gb']:.2f} GB (includes the Python process, tokenizer and eval buffers)."]
    return "\n".join(lines) + "\n"


def save(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str))
    tmp.replace(out)
    out.with_suffix(".md").write_text(markdown(result))


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from hf_prune.assets import default_corpus, load_smollm2
    from hf_prune.data import batches, blocks_dataset, read_texts, token_blocks
    from hf_prune.methods.importance import estimate_gradient_memory

    data = Path(args.data_dir)
    wiki_text = Path(args.wiki or data / "wiki_en.txt").read_text(encoding="utf-8")
    tasks = sorted(Path(args.mc_dir or data / "mc").glob("*.json"))
    train_spec = args.train_text or str(data / "austen")
    texts = default_corpus("calibration") if train_spec == "default" else read_texts(train_spec.split(","))

    out = Path(args.out)
    settings = {k: v for k, v in vars(args).items() if k not in ("resume", "out", "threads")}
    settings["train_text"] = train_spec
    result = {
        "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
        "environment": environment(),
        "settings": settings,
        "tasks": [t.stem for t in tasks],
        "chance": sum(chance_level(t, args.mc_limit or None) for t in tasks) / len(tasks),
        "runs": {},
    }
    if args.resume and out.is_file():
        old = json.loads(out.read_text())
        if old.get("settings") == settings:
            result["runs"] = old["runs"]
            result["memory"] = old.get("memory")
    dense, tok = load_smollm2()
    calib_blocks = token_blocks(tok, texts, args.calib_samples, args.calib_seq_len, seed=args.seed)
    calib = batches(calib_blocks, 4)
    n_rec = max(1, args.recovery_steps * args.recovery_batch)
    recovery_ds = blocks_dataset(token_blocks(tok, texts, n_rec, args.recovery_seq_len, seed=args.seed + 1))

    def run(name: str, fn) -> None:
        if name in result["runs"] and "perplexity" in result["runs"][name]:
            print(f"[skip] {name} (in {out})", flush=True)
            return
        print(f"[run] {name} ...", flush=True)
        t0 = time.perf_counter()
        model, info = fn()
        info.update(evaluate(model, tok, args, wiki_text, tasks))
        info["total_seconds"] = round(time.perf_counter() - t0, 1)
        result["runs"][name] = info
        save(result, out)
        print(f"[done] {name}: ppl {info['perplexity']:.2f} acc {info['acc']:.3f} acc_norm {info['acc_norm']:.3f} "
              f"params {info['num_parameters']} ({info['total_seconds']} s)", flush=True)
        del model
        gc.collect()

    run("dense", lambda: (dense, {}))
    del dense
    for name in args.methods.split(","):
        def pruned(name=name):
            model, info = prune_only(name, args, tok, calib)
            if name == "pip" and not result.get("memory"):
                from hf_prune.arch import get_adapter
                from hf_prune.methods.importance import scored_parameters

                fresh, _ = load_smollm2()
                ad = get_adapter(fresh)
                est = estimate_gradient_memory(fresh, 4, args.calib_seq_len,
                                               scored_parameters(ad, range(1, ad.num_layers - 1)))
                result["memory"] = {"estimate": str(est), "estimate_total_gb": est.total / 1024**3,
                                    "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2}
                del fresh
            return model, info

        run(f"{name}", pruned)
    for name in args.methods.split(",") if args.recovery_steps > 0 else []:  # recovery runs last: the slow part
        run(f"{name} + LoRA", lambda name=name: prune_and_recover(name, args, tok, calib, recovery_ds))
    print(markdown(result))
    return result


if __name__ == "__main__":
    main()
