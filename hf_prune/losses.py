"""Next-token losses, log-probs, samples and KL divergences from final hidden states, the logits made chunk by chunk.

A causal LM's forward computes the logits of every token at once: (batch, seq, vocab) values, then a float copy, its
log-softmax and, in a backward pass, its gradient. At Llama-3's vocabulary (128,256) 2,048 tokens already need
about 1 GB per fp32 copy, so memory grows with vocabulary x tokens. The helpers here start from the backbone's final
hidden states (`hf_prune.arch.get_adapter(model).backbone(...).last_hidden_state`, the final norm applied) and run
the head over at most `chunk_tokens` tokens at a time (fewer when one call's fp32 logits would exceed
`LOGITS_BUDGET_BYTES`); with autograd on, every chunk runs under non-reentrant
activation checkpointing, so the backward pass also holds one chunk's logits at a time (it recomputes them: one more
head matmul per chunk). `chunk_tokens=None` computes everything at once (the plain path, for comparison).

    head = output_head(model)                       # lm_head, then the config's final-logit softcapping if any
    hidden = get_adapter(model).backbone(input_ids=ids, use_cache=False).last_hidden_state
    loss = chunked_causal_lm_loss(hidden, head, ids)   # == model(ids, labels=ids).loss

Tokens whose label is -100 never reach the head, so scoring a few continuation tokens (multiple choice) costs a few
rows of logits, not a whole batch's.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .arch import ArchAdapter, get_adapter

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "IGNORE_INDEX",
    "LOGITS_BUDGET_BYTES",
    "REDUCTIONS",
    "chunked_causal_lm_loss",
    "chunk_rows",
    "chunked_kl_divergence",
    "output_head",
    "sample_labels",
]

#: Tokens per head call: 256 tokens are 0.13 GB of fp32 logits at Llama-3's 128k vocabulary, 0.27 GB at Gemma-3's
#: 262k (about 3x that with the log-softmax and its gradient), whatever the number of tokens scored; still a large
#: enough GEMM for the head to run at full speed.
DEFAULT_CHUNK_TOKENS = 256
#: ...and never more than this many bytes of fp32 logits per head call: the chunk shrinks below `chunk_tokens` for
#: large vocabularies (64 MiB: 256 tokens at 65k, 128 at Llama-3's 128k, 64 at Gemma-3's 262k), so the log-softmax
#: and gradient copies stay near 0.2 GB whatever the vocabulary.
LOGITS_BUDGET_BYTES = 64 * 2**20
IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")

Head = Callable[[torch.Tensor], torch.Tensor]


class SoftcappedHead(nn.Module):
    """`lm_head` followed by the final-logit softcapping `cap * tanh(logits / cap)` (Gemma 2/3 configs that set
    `final_logit_softcapping`), as the causal LM's own forward applies it."""

    def __init__(self, lm_head: nn.Module, cap: float):
        super().__init__()
        self.lm_head = lm_head
        self.cap = float(cap)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        return torch.tanh(logits / self.cap) * self.cap


def output_head(model: nn.Module | ArchAdapter) -> Head:
    """The map final hidden state -> logits that the model's forward applies after its backbone: the adapter's
    `lm_head`, wrapped in `SoftcappedHead` when the config sets `final_logit_softcapping`."""
    ad = model if isinstance(model, ArchAdapter) else get_adapter(model)
    cap = getattr(ad.config, "final_logit_softcapping", None)
    return SoftcappedHead(ad.lm_head, cap) if cap else ad.lm_head


def _check_chunk(chunk_tokens: int | None) -> None:
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens={chunk_tokens!r} is not valid; it must be an int >= 1 or None (all at once).")


def _vocabulary(head: Head) -> int | None:
    """Logits per token of `head` when it says (an nn.Linear, or SoftcappedHead around one), else None."""
    inner = head.lm_head if isinstance(head, SoftcappedHead) else head
    size = getattr(inner, "out_features", None)
    return int(size) if isinstance(size, int) and size > 0 else None


def chunk_rows(head: Head, rows: int, chunk_tokens: int | None) -> int:
    """Tokens per head call: all `rows` for None, else `chunk_tokens` capped so that one call's fp32 logits stay
    within LOGITS_BUDGET_BYTES (at least 1)."""
    if chunk_tokens is None:
        return max(rows, 1)
    vocab = _vocabulary(head)
    if vocab is None:
        return chunk_tokens
    return max(1, min(chunk_tokens, LOGITS_BUDGET_BYTES // (4 * vocab)))


def _needs_grad(head: Head, *tensors: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    if any(t.requires_grad for t in tensors):
        return True
    params = head.parameters() if isinstance(head, nn.Module) else ()
    return any(p.requires_grad for p in params)


def _chunked(fn: Callable[..., torch.Tensor], head: Head, tensors: tuple[torch.Tensor, ...], chunk_tokens: int | None,
             ) -> list[torch.Tensor]:
    """`fn(head, *chunk)` over the first dimension of `tensors` in chunks, checkpointed when autograd needs it."""
    n = tensors[0].shape[0]
    step = chunk_rows(head, n, chunk_tokens)
    grad = _needs_grad(head, *tensors)
    out = []
    for s in range(0, max(n, 1), max(step, 1)):
        chunk = tuple(t[s : s + step] for t in tensors)
        if grad and chunk_tokens is not None:
            out.append(checkpoint(fn, head, *chunk, use_reentrant=False))
        else:
            out.append(fn(head, *chunk))
    return out


def _nll(head: Head, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, target.to(logits.device), reduction="none")


def chunked_causal_lm_loss(
    hidden: torch.Tensor,
    lm_head: Head,
    labels: torch.Tensor,
    *,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
    reduction: str = "mean",
    shift: bool = True,
) -> torch.Tensor:
    """Next-token cross entropy from final hidden states (batch, seq, d) against `labels` (batch, seq).

    With `shift` (default) position i predicts `labels[:, i + 1]`, as transformers' causal-LM loss does; without, the
    labels are already aligned with the hidden states. Labels equal to -100 are ignored and never reach the head.
    Logits are computed `chunk_tokens` tokens at a time in fp32 (None: all at once), gradients flow to `hidden` and
    to the head's parameters. `reduction`: "mean" over the counted tokens (NaN when there are none, as
    `F.cross_entropy`), "sum", or "none": the per-position NLL, (batch, seq - 1) with `shift` else (batch, seq),
    0 at ignored positions.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not valid; use one of {REDUCTIONS}.")
    _check_chunk(chunk_tokens)
    if shift:
        hidden, labels = hidden[..., :-1, :], labels[..., 1:]
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} and labels {tuple(labels.shape)} do not line up")
    flat_labels = labels.reshape(-1).to(hidden.device)
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)
    h = hidden.reshape(-1, hidden.shape[-1]).index_select(0, keep)
    y = flat_labels.index_select(0, keep)
    parts = _chunked(_nll, lm_head, (h, y), chunk_tokens)
    nll = torch.cat(parts) if parts else h.new_zeros(0, dtype=torch.float32)
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.sum() / keep.numel() if keep.numel() else nll.sum() / 0.0
    out = nll.new_zeros(flat_labels.shape).index_put((keep.to(nll.device),), nll)
    return out.view(labels.shape)


@torch.no_grad()
def sample_labels(
    hidden: torch.Tensor,
    lm_head: Head,
    *,
    generator: torch.Generator | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Labels drawn from the model's own predictive distribution (the true Fisher's targets), chunk by chunk.

    Returns a (batch, seq) long tensor aligned like input ids: position i + 1 holds a sample from softmax(head(hidden
    at i)), position 0 holds -100. Pass it as `labels` to `chunked_causal_lm_loss` (mask padding yourself).
    """
    _check_chunk(chunk_tokens)
    lead = hidden.shape[:-1]
    h = hidden[..., :-1, :].reshape(-1, hidden.shape[-1])
    step = chunk_rows(lm_head, h.shape[0], chunk_tokens)
    samples = []
    for s in range(0, h.shape[0], max(step, 1)):
        probs = torch.softmax(lm_head(h[s : s + step]).float(), dim=-1)
        samples.append(torch.multinomial(probs, 1, generator=generator).squeeze(-1))
        del probs
    out = torch.full(lead, IGNORE_INDEX, dtype=torch.long, device=hidden.device)
    if samples:
        out[..., 1:] = torch.cat(samples).view(*lead[:-1], lead[-1] - 1)
    return out


def _kl(head: Head, ref: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    lp = F.log_softmax(head(hidden).float(), dim=-1)
    lq = F.log_softmax(head(ref).float(), dim=-1).to(lp.device)
    return (lq.exp() * (lq - lp)).sum(-1)


def chunked_kl_divergence(
    ref_hidden: torch.Tensor,
    hidden: torch.Tensor,
    lm_head: Head,
    *,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Per-token KL( softmax(head(ref_hidden)) || softmax(head(hidden)) ), shape `hidden.shape[:-1]`, fp32.

    Both distributions come from the same head, `chunk_tokens` tokens at a time (None: all at once); gradients flow
    as in `chunked_causal_lm_loss`.
    """
    _check_chunk(chunk_tokens)
    if ref_hidden.shape != hidden.shape:
        raise ValueError(f"reference {tuple(ref_hidden.shape)} and hidden states {tuple(hidden.shape)} differ")
    lead = hidden.shape[:-1]
    d = hidden.shape[-1]
    ref = ref_hidden.reshape(-1, d).to(hidden.device)
    parts = _chunked(_kl, lm_head, (ref, hidden.reshape(-1, d)), chunk_tokens)
    return torch.cat(parts).view(lead) if parts else hidden.new_zeros(lead, dtype=torch.float32)
