"""Seeded calibration and recovery data: a token stream from documents, random fixed-length blocks, batches."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["read_texts", "as_texts", "tokenize_stream", "token_blocks", "blocks_dataset", "batches"]

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


def tokenize_stream(tokenizer, texts: Any, text_field: str = "text", chunk_chars: int = 32_000_000) -> torch.Tensor:
    """Join documents with ``"\\n\\n"`` and tokenize once (no special tokens) into a 1-D LongTensor.

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
) -> torch.Tensor:
    """``n_samples`` random windows of ``seq_len`` tokens from the joined corpus, shape ``(n_samples, seq_len)``.

    Window starts are drawn with a ``torch.Generator`` seeded by ``seed``: the same seed and corpus give identical
    blocks. ``texts`` is a sequence of strings or a ``datasets.Dataset`` with column ``text_field``.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples={n_samples} is not valid; it must be >= 1.")
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} is not valid; it must be >= 1.")
    stream = tokenize_stream(tokenizer, texts, text_field)
    if stream.numel() < seq_len + 1:
        raise ValueError(
            f"The corpus has {stream.numel()} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
            "pass more text or a smaller seq_len."
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, stream.numel() - seq_len, (n_samples,), generator=generator)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


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
