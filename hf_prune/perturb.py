"""Seeded perturbations of calibration inputs: the "perturbed view" of PIP (Cao et al., arXiv 2501.15278).

Two kinds:

* :class:`CharPerturbation`: character-level edits inside words (the paper's swap, replace and insert:
  "later" -> "alter", "happy" -> "nappy", "host" -> "ghost"). Each letter of each word is edited with probability
  ``rate``; the edit is drawn uniformly from ``ops``. Text outside words (spaces, digits, punctuation) is untouched.
  :func:`add_perturbed_views` applies it to tokenized calibration batches (decode, perturb, re-encode).
* :class:`EmbeddingNoise`: Gaussian noise added to ``inputs_embeds``, scaled by each token's embedding RMS:
  ``e' = e + scale * rms(e) * N(0, I)``. An alternative for models without a tokenizer at hand.

Both are deterministic given their seed (Python's ``random.Random`` and a ``torch.Generator``), so two runs with the
same seed see the same perturbed text. The rates and scales are reconstructions: the paper's values are not public.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch

__all__ = [
    "CHAR_OPS",
    "CharPerturbation",
    "EmbeddingNoise",
    "add_perturbed_views",
    "perturb_texts",
]

CHAR_OPS: tuple[str, ...] = ("swap", "replace", "insert")
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters (any script)


def _document_seed(seed: int, index: int) -> int:
    """A per-document seed that does not depend on Python's hash randomisation."""
    return (int(seed) * 1_000_003 + int(index)) & 0xFFFFFFFF


@dataclass
class CharPerturbation:
    """Character-level edits inside words at a configurable rate (reconstruction of PIP's perturbed view).

    Every letter of every word is edited with probability ``rate``; the edit is one of ``ops``, drawn uniformly:
    ``swap`` exchanges the letter with the next one of its word (with the previous one at the word's end),
    ``replace`` substitutes a different letter of ``alphabet`` (same case), ``insert`` adds a random letter after it.
    One-letter words cannot be swapped: a swap drawn there becomes a replace.
    """

    rate: float = field(default=0.1, metadata={"help": "Probability that a letter inside a word is edited."})
    ops: tuple[str, ...] = field(default=CHAR_OPS, metadata={"help": f"Edits to draw from: {CHAR_OPS}."})
    seed: int = field(default=0, metadata={"help": "Seed; the same seed gives the same edits."})
    alphabet: str = field(default=string.ascii_lowercase, metadata={"help": "Letters used by replace/insert."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate={self.rate} is not valid; it must be in [0, 1].")
        self.ops = tuple(self.ops)
        bad = [op for op in self.ops if op not in CHAR_OPS]
        if bad or not self.ops:
            raise ValueError(f"ops={self.ops!r} is not valid; choose one or more of {CHAR_OPS}.")
        if len(set(self.alphabet.lower())) < 2:
            raise ValueError(f"alphabet={self.alphabet!r} needs at least two distinct letters.")

    def __call__(self, text: str, seed: int | None = None) -> str:
        return self.apply(text, seed)[0]

    def apply(self, text: str, seed: int | None = None) -> tuple[str, int]:
        """(perturbed text, number of edits). ``seed`` overrides the configured seed for this call."""
        rng = random.Random(self.seed if seed is None else seed)
        edits = 0

        def edit_word(match: re.Match) -> str:
            nonlocal edits
            word = match.group(0)
            out: list[str] = []
            i = 0
            while i < len(word):
                c = word[i]
                if rng.random() >= self.rate:
                    out.append(c)
                    i += 1
                    continue
                edits += 1
                op = rng.choice(self.ops)
                if op == "swap" and len(word) < 2:
                    op = "replace"
                if op == "swap":
                    if i + 1 < len(word):
                        out.extend((word[i + 1], c))
                        i += 2
                        continue
                    out.insert(len(out) - 1, c)  # last letter: swap with the previous one
                elif op == "replace":
                    out.append(self._other_letter(rng, c))
                else:  # insert
                    out.extend((c, self._match_case(rng.choice(self.alphabet), c)))
                i += 1
            return "".join(out)

        return _WORD.sub(edit_word, text), edits

    def _other_letter(self, rng: random.Random, c: str) -> str:
        choices = [a for a in self.alphabet if a.lower() != c.lower()]
        return self._match_case(rng.choice(choices), c)

    @staticmethod
    def _match_case(letter: str, like: str) -> str:
        return letter.upper() if like.isupper() else letter.lower()


def perturb_texts(texts: Iterable[str], perturbation: CharPerturbation, seed: int | None = None) -> list[str]:
    """Perturb each document with its own seed derived from (seed, index): the result does not depend on order
    of processing, and document i always gets the same edits."""
    base = perturbation.seed if seed is None else seed
    return [perturbation(t, _document_seed(base, i)) for i, t in enumerate(texts)]


def add_perturbed_views(
    tokenizer,
    batches: Iterable[Mapping[str, torch.Tensor]],
    perturbation: CharPerturbation,
    seed: int | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Copies of ``batches`` with ``perturbed_input_ids`` and ``perturbed_attention_mask`` added.

    Each row's real tokens (``attention_mask == 1``) are decoded, perturbed with :class:`CharPerturbation` and
    re-encoded without special tokens, then cut or right-padded to the row's length (padding gets mask 0), so the
    perturbed view has the clean view's shape. Rows are numbered across batches for their seeds.
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    base = perturbation.seed if seed is None else seed
    out: list[dict[str, torch.Tensor]] = []
    row_index = 0
    for batch in batches:
        ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(ids)
        new_ids = torch.full_like(ids, pad_id)
        new_mask = torch.zeros_like(mask)
        width = ids.shape[1]
        for r in range(ids.shape[0]):
            real = ids[r][mask[r].bool()].tolist()
            text = tokenizer.decode(real, clean_up_tokenization_spaces=False)
            noisy = perturbation(text, _document_seed(base, row_index))
            row_index += 1
            enc = tokenizer(noisy, add_special_tokens=False)["input_ids"][:width]
            if enc:
                new_ids[r, : len(enc)] = torch.tensor(enc, dtype=ids.dtype)
                new_mask[r, : len(enc)] = 1
        copy: dict[str, Any] = dict(batch)
        copy["perturbed_input_ids"] = new_ids
        copy["perturbed_attention_mask"] = new_mask
        out.append(copy)
    return out


@dataclass
class EmbeddingNoise:
    """Gaussian noise on input embeddings: ``e' = e + scale * rms(e) * N(0, I)``, ``rms`` per token.

    The alternative perturbed view (a knob of PIP; reconstruction). Noise is drawn on the CPU from a generator seeded
    with ``seed`` (plus a per-call offset) and moved to the embeddings' device, so results do not depend on it.
    """

    scale: float = field(default=0.1, metadata={"help": "Noise standard deviation relative to each token's RMS."})
    seed: int = field(default=0, metadata={"help": "Seed of the noise."})

    def __post_init__(self) -> None:
        if self.scale < 0:
            raise ValueError(f"scale={self.scale} is not valid; it must be >= 0.")

    def __call__(self, embeds: torch.Tensor, offset: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(_document_seed(self.seed, offset))
        noise = torch.randn(embeds.shape, generator=g, dtype=torch.float32).to(embeds.device, embeds.dtype)
        rms = embeds.detach().float().pow(2).mean(-1, keepdim=True).sqrt().to(embeds.dtype)
        return embeds + self.scale * rms * noise
