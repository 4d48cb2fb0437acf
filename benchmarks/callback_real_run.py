"""Real run of PruneCallback on the offline SmolLM2-135M-Instruct: ShortGPT removes layers in stages inside a
`transformers.Trainer`, with a short full fine-tuning recovery after every stage.

Perplexity (non-overlapping windows) is measured on the default corpus' evaluation split (and on a second text,
e.g. wiki_en.txt, with --wiki) at these points:
  * dense: the model before pruning;
  * pruned, no recovery: a copy pruned by the same method, stage after stage, with no training in between;
  * before each stage's recovery: inside the run, right after the stage's surgery (default corpus only);
  * recovered: at the end of the run.
Writes JSON (machine, versions, command, config, numbers, wall times) and a Markdown summary next to it.

    nohup python benchmarks/callback_real_run.py > /tmp/callback_real_run.log 2>&1 &
    python benchmarks/callback_real_run.py --wiki /work/shared/data/wiki_en.txt --wiki-tokens 8192
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-remove", type=int, default=2, help="layers removed in total")
    p.add_argument("--per-stage", type=int, default=1, help="layers removed per stage")
    p.add_argument("--steps-per-stage", type=int, default=20, help="recovery optimizer steps after each stage")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training and calibration block")
    p.add_argument("--calib-samples", type=int, default=32, help="calibration blocks used to score the layers")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optim", default="adamw_torch")
    p.add_argument("--kd-alpha", type=float, default=None,
                   help="distil from the dense model with this KD weight (default: plain cross-entropy)")
    p.add_argument("--window", type=int, default=512, help="perplexity window in tokens")
    p.add_argument("--eval-tokens", type=int, default=16384,
                   help="first N tokens of the default corpus' evaluation split (0 = all)")
    p.add_argument("--wiki", default="/work/shared/data/wiki_en.txt",
                   help="a second perplexity text ('' to skip); the default is this project's shared data")
    p.add_argument("--wiki-tokens", type=int, default=8192, help="first N tokens of --wiki")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--output-dir", default=None, help="Trainer output_dir (default: a temporary folder, removed)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "callback_real_run.json"))
    return p.parse_args(argv)


def environment() -> dict:
    import accelerate
    import peft
    import torch
    import transformers
    import trl

    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                     "peft": peft.__version__, "trl": trl.__version__},
        "git_revision": rev,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from hf_prune import prune
    from hf_prune.assets import default_corpus, default_corpus_name, load_smollm2
    from hf_prune.callbacks import PruneCallback, PruneSchedule, prune_and_train
    from hf_prune.data import batches, blocks_dataset, token_blocks
    from hf_prune.distill import DistillationLoss
    from hf_prune.evaluate import perplexity
    from hf_prune.methods.shortgpt import ShortGPT

    result: dict = {"command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *sys.argv[1:]]),
                    "config": vars(args), **environment(), "perplexity": {}, "wall_seconds": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=2))

    t0 = time.perf_counter()
    model, tok = load_smollm2()
    eval_text = default_corpus("evaluation")
    wiki = Path(args.wiki).read_text(encoding="utf-8") if args.wiki else None
    texts = {"default_evaluation": (eval_text, args.eval_tokens or None)}
    if wiki is not None:
        texts["wiki"] = (wiki, args.wiki_tokens or None)
    result["texts"] = {"default_evaluation": f"{default_corpus_name()}, evaluation split",
                       **({"wiki": args.wiki} if wiki is not None else {})}

    def measure(point: str, m, which=None) -> None:
        t = time.perf_counter()
        for name, (text, limit) in texts.items():
            if which is not None and name not in which:
                continue
            r = perplexity(m, tok, text, window=args.window, max_tokens=limit)
            result["perplexity"].setdefault(point, {})[name] = r
            print(f"[{point}] {name}: perplexity {r['perplexity']:.3f} over {r['tokens']} tokens", flush=True)
        result["wall_seconds"][f"eval_{point}"] = round(time.perf_counter() - t, 1)
        save()

    calib_texts = default_corpus("calibration")
    calibration = token_blocks(tok, calib_texts, args.calib_samples, args.seq_len, seed=args.seed)
    n_stages = -(-args.n_remove // args.per_stage)
    steps = args.steps_per_stage * n_stages
    train_blocks = token_blocks(tok, calib_texts, steps * args.batch_size, args.seq_len, seed=args.seed + 1)
    result["data"] = {"calibration_tokens": calibration.numel(), "training_tokens": train_blocks.numel(),
                      "calibration_source": f"{default_corpus_name()}, calibration split"}
    measure("dense", model)

    # pruned with no recovery: the same stages on a copy, nothing trained in between
    method = ShortGPT(n_remove=args.n_remove, per_stage=args.per_stage)
    t = time.perf_counter()
    no_recovery = copy.deepcopy(model)
    pruned = prune(no_recovery, method, batches(calibration, 8))
    result["no_recovery_removed_layers_per_stage"] = [s.plan.drop_layers for s in pruned.stages]
    result["wall_seconds"]["prune_no_recovery"] = round(time.perf_counter() - t, 1)
    measure("pruned_no_recovery", no_recovery)
    del no_recovery

    class StageProbe(TrainerCallback):
        """Perplexity right after each stage's surgery, before its recovery steps."""

        def __init__(self):
            self.trainer = None

        def on_train_begin(self, a, state, control, **kw):
            measure(f"before_recovery_stage_{cb.stages_done}", self.trainer.model,
                    which={"default_evaluation"})

    output_dir = args.output_dir or tempfile.mkdtemp(prefix="callback_real_run_")
    distillation = None
    if args.kd_alpha is not None:
        distillation = DistillationLoss(copy.deepcopy(model), temperature=2.0, alpha=args.kd_alpha)
    cb = PruneCallback(ShortGPT(n_remove=args.n_remove, per_stage=args.per_stage), calibration=calibration,
                       schedule=PruneSchedule(every_n_steps=args.steps_per_stage), distillation=distillation)
    probe = StageProbe()
    targs = TrainingArguments(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr, optim=args.optim, logging_steps=5, save_strategy="no", report_to=[],
        use_cpu=not torch.cuda.is_available(), seed=args.seed, dataloader_num_workers=0, disable_tqdm=True,
    )
    model.train()
    trainer = Trainer(model=model, args=targs, train_dataset=blocks_dataset(train_blocks), callbacks=[cb, probe])
    probe.trainer = trainer
    t = time.perf_counter()
    prune_and_train(trainer)
    result["wall_seconds"]["prune_and_train"] = round(time.perf_counter() - t, 1)
    result["log_history"] = trainer.state.log_history
    result["stages"] = [h for h in trainer.state.log_history if "prune/stage" in h]
    result["final_num_layers"] = trainer.model.config.num_hidden_layers
    result["final_num_parameters"] = sum(p.numel() for p in trainer.model.parameters())
    measure("recovered", trainer.model)
    if args.output_dir is None:
        shutil.rmtree(output_dir, ignore_errors=True)
    result["wall_seconds"]["total"] = round(time.perf_counter() - t0, 1)
    save()
    write_markdown(result, out.with_suffix(".md"))
    return result


def write_markdown(result: dict, path: Path) -> None:
    ppl = result["perplexity"]
    names = list(result["texts"])
    lines = [
        "# PruneCallback real run: ShortGPT on SmolLM2-135M-Instruct", "",
        f"Command: `{result['command']}`  ",
        f"Date: {result['date']}, git {result['git_revision'][:12]}  ",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpu_count']} CPUs, "
        f"torch threads {result['machine']['torch_threads']}  ",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()), "",
        f"Removed {result['config']['n_remove']} layers, {result['config']['per_stage']} per stage, "
        f"{result['config']['steps_per_stage']} recovery steps per stage (batch {result['config']['batch_size']} x "
        f"{result['config']['seq_len']} tokens, lr {result['config']['lr']}, {result['config']['optim']}). "
        f"Perplexity window {result['config']['window']}.", "",
        "| point | " + " | ".join(f"{n} ({result['texts'][n]})" for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for point, vals in ppl.items():
        cells = [f"{vals[n]['perplexity']:.3f} ({vals[n]['tokens']} tok)" if n in vals else "" for n in names]
        lines.append(f"| {point} | " + " | ".join(cells) + " |")
    lines += ["", "Stages: " + "; ".join(
        f"stage {s['prune/stage']} at step {s['step']}: removed original layers {s['prune/removed_original_layers']}, "
        f"{s['prune/num_parameters']:,} parameters" for s in result.get("stages", [])), ""]
    path.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
