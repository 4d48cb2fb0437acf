"""Seeded calibration and recovery data: a token stream from documents, random fixed-length blocks, batches; and
BIG-bench-style multiple-choice tasks (read here, scored by `hf_prune.evaluate` and `hf_prune.lm_eval_bridge`).

Blocks are tokenized the way the model's tokenizer says: when `tokenizer(text)` starts with the BOS token (Llama,
Gemma), every block starts with BOS, as every sequence the model saw in training did; when it adds none (SmolLM2,
GPT-2-style tokenizers) blocks are plain windows of the stream.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .checks import check_int_option

__all__ = [
    "adds_bos", "read_texts", "as_texts", "tokenize_stream", "token_blocks", "blocks_dataset", "batches",
    "load_mc_task", "mc_context",
]

DOC_SEPARATOR = "\n\n"
TEXT_SUFFIXES = (".txt", ".jsonl")


def read_texts(paths: str | Path | Sequence[str | Path], text_field: str = "text") -> list[str]:
    """Read documents from ``.txt`` files (one document each), ``.jsonl`` files (one per line, ``text_field``) or
    directories of such files (searched recursively, in sorted order)."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    texts: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"Directory {p} holds no {' or '.join(TEXT_SUFFIXES)} files.")
            texts.extend(read_texts(files, text_field))
        elif not p.exists():
            raise FileNotFoundError(f"{p} does not exist; pass .txt/.jsonl files or directories of them.")
        elif p.suffix == ".txt":
            texts.append(p.read_text(encoding="utf-8"))
        elif p.suffix == ".jsonl":
            with open(p, encoding="utf-8") as f:
                for i, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    row = json.loads(line)
                    if text_field not in row:
                        raise KeyError(f"{p}:{i} has no field {text_field!r}; its fields are {sorted(row)}.")
                    texts.append(str(row[text_field]))
        else:
            raise ValueError(f"Cannot read {p}: suffix {p.suffix!r} is not one of {TEXT_SUFFIXES}.")
    return texts


def as_texts(texts: Any, text_field: str = "text") -> list[str]:
    """Normalise a string, a sequence of strings or a ``datasets.Dataset`` (column ``text_field``) to a list."""
    if isinstance(texts, str):
        return [texts]
    column_names = getattr(texts, "column_names", None)
    if column_names is not None:  # datasets.Dataset
        if text_field not in column_names:
            raise KeyError(f"Dataset has no column {text_field!r}; its columns are {column_names}.")
        return [str(t) for t in texts[text_field]]
    texts = list(texts)
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise TypeError(f"Expected documents as strings, got {type(bad).__name__}: {bad!r:.80}")
    return texts


def adds_bos(tokenizer) -> bool:
    """True when the tokenizer puts its BOS token in front of a text (`tokenizer("a")["input_ids"][0]` is
    `bos_token_id`), as Llama's and Gemma's do; False for tokenizers without BOS or that add none (SmolLM2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def _bos_flag(tokenizer, bos: bool | None) -> bool:
    if bos is None:
        return adds_bos(tokenizer)
    if not isinstance(bos, bool):
        raise TypeError(f"bos={bos!r} is not valid; use True, False or None (None: as the tokenizer does)")
    if bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise ValueError("bos=True but the tokenizer has no bos_token_id; use bos=None or False")
    return bos


def tokenize_stream(tokenizer, texts: Any, text_field: str = "text", chunk_chars: int = 32_000_000) -> torch.Tensor:
    """Join documents with ``"\\n\\n"`` and tokenize once (no special tokens) into a 1-D LongTensor. The stream has no
    BOS; `token_blocks` and `hf_prune.evaluate.perplexity` put one at the start of every block or window where the
    tokenizer adds one (`adds_bos`).

    Corpora longer than ``chunk_chars`` characters are tokenized in chunks cut at document boundaries; the whitespace
    at each cut (separator and trailing whitespace) starts the next chunk, which reproduces the single-pass stream
    for tokenizers whose pre-tokenizer splits before whitespace runs (GPT-2-style byte-level BPE such as SmolLM2's).
    """
    docs = [d for d in as_texts(texts, text_field) if d]
    if not docs:
        raise ValueError("The corpus is empty: no non-empty documents were given.")
    joined = DOC_SEPARATOR.join(docs)
    if len(joined) <= chunk_chars:
        pieces = [joined]
    else:
        pieces, start, pos = [], 0, 0
        for doc in docs[:-1]:
            pos += len(doc) + len(DOC_SEPARATOR)  # start of the next document in `joined`
            if pos - start >= chunk_chars:
                cut = len(joined[:pos].rstrip())  # cut before the whitespace run
                if cut > start:
                    pieces.append(joined[start:cut])
                    start = cut
        pieces.append(joined[start:])
    ids: list[int] = []
    for piece in pieces:
        ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
    return torch.tensor(ids, dtype=torch.long)


def token_blocks(
    tokenizer,
    texts: Any,
    n_samples: int,
    seq_len: int,
    seed: int = 0,
    text_field: str = "text",
    bos: bool | None = None,
) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from the joined corpus, shape ``(n_samples, seq_len)``.

    Window starts are drawn with a ``torch.Generator`` seeded by ``seed``: the same seed and corpus give identical
    blocks. ``texts`` is a sequence of strings or a ``datasets.Dataset`` with column ``text_field``. With BOS
    (``bos=None``: when the tokenizer adds one, see `adds_bos`) every block is the BOS token followed by
    ``seq_len - 1`` tokens of the stream.
    """
    n_samples = check_int_option("n_samples", n_samples, minimum=1)
    seq_len = check_int_option("seq_len", seq_len, minimum=1)
    use_bos = _bos_flag(tokenizer, bos)
    if use_bos and seq_len < 2:
        raise ValueError(f"seq_len={seq_len} is not valid with a BOS token in front; it must be >= 2.")
    stream = tokenize_stream(tokenizer, texts, text_field)
    width = seq_len - 1 if use_bos else seq_len  # stream tokens per block
    if stream.numel() < width + 1:
        raise ValueError(
            f"The corpus has {stream.numel()} tokens, fewer than {width + 1} (seq_len + 1"
            f"{' - 1 for the BOS token' if use_bos else ''}); pass more text or a smaller seq_len."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - width, (n_samples,), generator=generator)
    blocks = torch.stack([stream[s : s + width] for s in starts.tolist()])
    if use_bos:
        blocks = torch.cat([torch.full((n_samples, 1), tokenizer.bos_token_id, dtype=torch.long), blocks], dim=1)
    return blocks


def _check_blocks(blocks: torch.Tensor) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dim() != 2:
        shape = tuple(blocks.shape) if isinstance(blocks, torch.Tensor) else type(blocks).__name__
        raise ValueError(f"blocks must be a 2-D tensor (n_samples, seq_len), got {shape}.")
    return blocks.long()


def blocks_dataset(blocks: torch.Tensor):
    """A ``datasets.Dataset`` with ``input_ids``, ``attention_mask`` and ``labels`` (a copy of the ids) per block,
    ready to be a Trainer ``train_dataset``."""
    import datasets

    ids = _check_blocks(blocks).tolist()
    return datasets.Dataset.from_dict(
        {"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids], "labels": [list(r) for r in ids]}
    )


def batches(blocks: torch.Tensor, batch_size: int, labels: bool = False) -> list[dict[str, torch.Tensor]]:
    """Split blocks into model-input dicts of at most ``batch_size`` rows (``input_ids``, ``attention_mask``, and
    ``labels`` when asked) for calibration loops; order is preserved."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not valid; it must be >= 1.")
    blocks = _check_blocks(blocks)
    out = []
    for i in range(0, blocks.shape[0], batch_size):
        ids = blocks[i : i + batch_size]
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if labels:
            batch["labels"] = ids.clone()
        out.append(batch)
    return out


# --------------------------------------------------------------------------------------------------------------------
# Multiple-choice tasks (BIG-bench style)
# --------------------------------------------------------------------------------------------------------------------


def load_mc_task(task: str | Path | dict | Sequence[dict]) -> dict[str, Any]:
    """A BIG-bench-style task as a dict with an ``examples`` list; accepts a JSON path, a task dict or a list of
    examples (each ``{"input": str, "target_scores": {choice: score}}``)."""
    if isinstance(task, (str, Path)):
        with open(task, encoding="utf-8") as f:
            task = json.load(f)
    if isinstance(task, dict):
        if "examples" not in task:
            raise KeyError(f"The task has no 'examples' list; its keys are {sorted(task)}.")
        data = dict(task)
    else:
        data = {"examples": list(task)}
    for i, ex in enumerate(data["examples"]):
        if not isinstance(ex, dict) or "target_scores" not in ex:
            raise ValueError(f"Example {i} is not a dict with 'input' and 'target_scores': {ex!r:.120}")
        if len(ex["target_scores"]) < 2:
            raise ValueError(f"Example {i} has {len(ex['target_scores'])} choice(s); at least 2 are needed.")
    return data


def mc_context(task: dict[str, Any], example: dict[str, Any]) -> str:
    """``task_prefix + example_input_prefix + input + example_output_prefix`` (the prefixes only where the task
    defines them), with trailing spaces removed (they move to the continuation)."""
    prefix = task.get("task_prefix", "") or ""
    in_prefix = task.get("example_input_prefix", "") or ""
    out_prefix = task.get("example_output_prefix", "") or ""
    return (prefix + in_prefix + str(example.get("input", "")) + out_prefix).rstrip(" ")
