"""Quality measurements: windowed perplexity and zero-shot multiple-choice accuracy (BIG-bench-style JSON tasks)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .arch import UnsupportedModelError, get_adapter
from .checks import NonFiniteError, check_int_option, check_optional_int_option
from .data import DOC_SEPARATOR, adds_bos, as_texts, load_mc_task, mc_context, tokenize_stream
from .losses import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, chunked_causal_lm_loss, output_head
from .runtime import eval_mode, model_device, progress

__all__ = ["perplexity", "multiple_choice", "load_mc_task", "mc_requests", "lm_eval", "stream_head"]

PADDING_SIDES = ("right", "left")


def _backbone_and_head(model: torch.nn.Module, chunk_tokens: int | None):
    """(decoder stack, hidden -> logits) of a supported family, or (None, None): the model's own forward and its
    full logits are used (chunk_tokens=None, or a model hf-prune has no adapter for)."""
    if chunk_tokens is None:
        return None, None
    try:
        ad = get_adapter(model)
    except UnsupportedModelError:
        return None, None
    return ad.backbone, output_head(ad)


def _last_hidden(backbone: torch.nn.Module, **inputs) -> torch.Tensor:
    out = backbone(use_cache=False, **inputs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


# --------------------------------------------------------------------------------------------------------------------
# Perplexity
# --------------------------------------------------------------------------------------------------------------------


def stream_head(tokenizer, text: str | Sequence[str], max_tokens: int | None) -> torch.Tensor:
    """The first `max_tokens` tokens of `tokenize_stream(tokenizer, text)` (all of them when None), tokenizing only
    a prefix of the text: a cut at a line break with at least 32 tokens to spare, kept only when a prefix 1.5x as
    long gives the same first `max_tokens` tokens (else the longer prefix is tried, up to the whole text). Scoring
    4,096 tokens of a 9 MB file tokenizes ~60 kB instead of 9 MB."""
    if max_tokens is None:
        return tokenize_stream(tokenizer, text)
    joined = DOC_SEPARATOR.join(d for d in as_texts(text) if d)
    chars = max(4096, 8 * max_tokens)

    def head(n_chars: int) -> torch.Tensor | None:
        cut = joined.rfind("\n", 0, n_chars)
        piece = joined[: cut if cut > 0 else n_chars]
        ids = tokenize_stream(tokenizer, [piece])
        return ids[:max_tokens] if ids.numel() >= max_tokens + 32 else None

    while chars < len(joined):
        first, second = head(chars), head(chars * 3 // 2)
        if first is not None and second is not None and torch.equal(first, second):
            return first
        chars *= 2
    return tokenize_stream(tokenizer, text)[:max_tokens]


def perplexity(
    model: torch.nn.Module,
    tokenizer,
    text: str | Sequence[str],
    window: int = 512,
    batch_size: int = 4,
    max_tokens: int | None = None,
    bos: bool | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> dict[str, float | int | bool]:
    """Perplexity over non-overlapping windows of the token stream.

    Documents are joined with ``"\\n\\n"`` and tokenized once without special tokens (the first ``max_tokens``
    tokens are kept if given), then cut into windows. Without BOS (tokenizers that add none, e.g. SmolLM2's) a
    window holds ``window`` stream tokens and predicts its tokens 2..n; a final shorter window is scored, one shorter
    than 2 tokens is dropped; the mean NLL is over ``tokens = sum(len(w) - 1)`` predictions. With BOS (``bos=None``:
    when ``tokenizer(text)`` adds one, as Llama's and Gemma's do; see `hf_prune.data.adds_bos`) every window is BOS
    followed by ``window - 1`` stream tokens and predicts all of them, so ``tokens`` counts every stream token.
    Returns ``{"perplexity", "nll", "tokens", "window", "bos"}``.

    The log-probs come from the backbone's final hidden states, the head run over ``chunk_tokens`` tokens at a time
    (`hf_prune.losses`), so memory does not grow with vocabulary x batch tokens; ``chunk_tokens=None`` (or a family
    hf-prune has no adapter for) uses the model's own forward and its full (batch, window, vocab) logits.
    """
    window = check_int_option("window", window, minimum=2)
    batch_size = check_int_option("batch_size", batch_size, minimum=1)
    max_tokens = check_optional_int_option("max_tokens", max_tokens, minimum=2)
    chunk_tokens = check_optional_int_option("chunk_tokens", chunk_tokens, minimum=1)
    use_bos = adds_bos(tokenizer) if bos is None else bool(bos)
    stream = stream_head(tokenizer, text, max_tokens)
    if use_bos:
        bos_id = torch.tensor([tokenizer.bos_token_id], dtype=stream.dtype)
        windows = [torch.cat([bos_id, w]) for w in stream.split(window - 1)]
    else:
        windows = [w for w in stream.split(window) if w.numel() >= 2]
    if not windows:
        raise ValueError(f"The text has {stream.numel()} tokens; at least 2 are needed to measure perplexity.")
    # Full windows are batched together; the shorter tail (if any) goes alone in the last batch.
    groups: list[list[torch.Tensor]] = []
    full = [w for w in windows if w.numel() == window]
    for i in range(0, len(full), batch_size):
        groups.append(full[i : i + batch_size])
    if windows[-1].numel() != window:
        groups.append([windows[-1]])

    device = model_device(model)
    backbone, head = _backbone_and_head(model, chunk_tokens)
    total_nll = 0.0
    total_tokens = 0
    with eval_mode(model):
        for group in progress(groups, desc="perplexity"):
            ids = torch.stack(group).to(device)
            if backbone is None:
                logits = model(input_ids=ids).logits[:, :-1].float()
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
                del logits
            else:
                hidden = _last_hidden(backbone, input_ids=ids)
                nll = chunked_causal_lm_loss(hidden, head, ids, chunk_tokens=chunk_tokens, reduction="sum")
                del hidden
            total_nll += nll.item()
            total_tokens += ids[:, 1:].numel()
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        raise NonFiniteError(f"perplexity: the mean NLL over {total_tokens} tokens is {mean}; the model's logits "
                             "hold NaN/inf (check its weights, or evaluate in float32)")
    return {"perplexity": math.exp(mean), "nll": mean, "tokens": total_tokens, "window": window, "bos": use_bos}


# --------------------------------------------------------------------------------------------------------------------
# Multiple choice
# --------------------------------------------------------------------------------------------------------------------


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def mc_requests(tokenizer, context: str, choice: str) -> tuple[list[int], list[int]]:
    """Token ids ``(context_ids, continuation_ids)`` for one choice.

    The continuation is ``" " + choice`` (no space after a context ending in whitespace or an empty context). The
    whole string is tokenized once and the continuation is what follows the context's own tokens, so the ids are
    exactly the tokenization of ``context + continuation``. An empty context becomes the BOS (else EOS) token. When
    the tokenizer adds BOS to a text (`hf_prune.data.adds_bos`), the context ids start with it, as
    ``tokenizer(context)`` does.
    """
    sep = "" if (not context or context[-1].isspace()) else " "
    continuation = sep + choice
    if not context:
        prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix_id is None:
            raise ValueError("An empty context needs a tokenizer with a bos or eos token to condition on.")
        return [prefix_id], _encode(tokenizer, continuation)
    prefix = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    whole = _encode(tokenizer, context + continuation)
    ctx = _encode(tokenizer, context)
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return prefix + ctx, whole[len(ctx) :]
    return prefix + ctx, _encode(tokenizer, continuation)


def _score(
    model: torch.nn.Module,
    requests: list[tuple[list[int], list[int]]],
    batch_size: int,
    pad_id: int,
    padding_side: str,
    max_length: int | None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> list[float]:
    """Sum of continuation-token log-probs for each (context, continuation) request, batched longest first.

    Only the continuation tokens' logits are computed (`chunk_tokens` at a time, from the backbone's hidden states);
    ``chunk_tokens=None`` uses the model's full logits."""
    device = model_device(model)
    backbone, head = _backbone_and_head(model, chunk_tokens)
    seqs = []
    for ctx, cont in requests:
        seq = ctx + cont
        if max_length is not None and len(seq) > max_length:
            seq = seq[-max_length:]  # left-truncate the context; the continuation must fit
            if len(cont) >= max_length:
                raise ValueError(f"A choice has {len(cont)} tokens, more than the model's max length {max_length}.")
        seqs.append((seq, len(cont)))
    order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i][0]))
    scores = [0.0] * len(seqs)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in progress(batches, desc="multiple choice"):
        width = max(len(seqs[i][0]) for i in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = torch.tensor(seqs[i][0], dtype=torch.long)
            if padding_side == "right":
                ids[row, : seq.numel()], mask[row, : seq.numel()] = seq, 1
            else:
                ids[row, width - seq.numel() :], mask[row, width - seq.numel() :] = seq, 1
        inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
        if padding_side == "left":
            inputs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0).to(device)
        if backbone is not None:
            labels = torch.full_like(ids, IGNORE_INDEX)
            for row, i in enumerate(batch):
                seq, n_cont = seqs[i]
                end = len(seq) if padding_side == "right" else width  # one past the last real token
                labels[row, end - n_cont : end] = ids[row, end - n_cont : end]
            hidden = _last_hidden(backbone, **inputs)
            nll = chunked_causal_lm_loss(hidden, head, labels, chunk_tokens=chunk_tokens, reduction="none")
            for i, value in zip(batch, (-nll.sum(-1)).tolist()):
                scores[i] = value
            continue
        logits = model(**inputs).logits
        for row, i in enumerate(batch):
            seq, n_cont = seqs[i]
            end = len(seq) if padding_side == "right" else width  # one past the last real token
            # Logits at positions end-n_cont-1 .. end-2 predict the continuation tokens.
            logp = logits[row, end - n_cont - 1 : end - 1].float().log_softmax(-1)
            target = ids[row, end - n_cont : end].to(logp.device)
            scores[i] = logp.gather(-1, target[:, None]).sum().item()
    return scores


def multiple_choice(
    model: torch.nn.Module,
    tokenizer,
    task_path: str | Path | dict | Sequence[dict],
    limit: int | None = None,
    batch_size: int = 8,
    padding_side: str = "right",
    return_loglikelihoods: bool = False,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> dict[str, Any]:
    """Zero-shot accuracy on a BIG-bench-style multiple-choice task by log-likelihood of each choice.

    The context is the example's ``input`` (wrapped in ``task_prefix``/``example_input_prefix``/
    ``example_output_prefix`` where the task defines them; ``append_choices_to_input`` is ignored); each choice is
    scored as the summed log-prob of ``" " + choice`` given the context. A prediction is correct when the chosen
    choice has the highest target score. ``acc_norm`` divides each log-likelihood by the choice's length in
    characters (as lm-eval does). ``limit`` keeps the first ``limit`` examples. Returns ``{"acc", "acc_norm", "n"}``
    plus ``"loglikelihoods"`` (per example, per choice, in the task's order) if ``return_loglikelihoods``.
    Only the continuation tokens' logits are computed, ``chunk_tokens`` at a time (None: the model's full logits).
    """
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side={padding_side!r} is not valid; use one of {PADDING_SIDES}.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} is not valid; it must be >= 1.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} is not valid; it must be >= 1 or None.")
    chunk_tokens = check_optional_int_option("chunk_tokens", chunk_tokens, minimum=1)
    task = load_mc_task(task_path)
    examples = task["examples"][:limit] if limit is not None else task["examples"]
    if not examples:
        raise ValueError("The task has no examples to score.")

    requests, spans = [], []
    for ex in examples:
        context = mc_context(task, ex)
        start = len(requests)
        requests.extend(mc_requests(tokenizer, context, str(choice)) for choice in ex["target_scores"])
        spans.append((start, len(requests)))

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    with eval_mode(model):
        scores = _score(model, requests, batch_size, pad_id, padding_side, max_length, chunk_tokens)

    correct = correct_norm = 0
    lls = []
    for ex, (start, stop) in zip(examples, spans):
        choices = [str(c) for c in ex["target_scores"]]
        targets = [float(v) for v in ex["target_scores"].values()]
        ll = scores[start:stop]
        norm = [s / max(len(c), 1) for s, c in zip(ll, choices)]
        best = max(targets)
        correct += targets[max(range(len(ll)), key=ll.__getitem__)] == best
        correct_norm += targets[max(range(len(norm)), key=norm.__getitem__)] == best
        lls.append(ll)
    n = len(examples)
    out: dict[str, Any] = {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}
    if return_loglikelihoods:
        out["loglikelihoods"] = lls
    return out


def lm_eval(model: torch.nn.Module, tokenizer, tasks, **kwargs: Any) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness on the in-memory model; see `hf_prune.lm_eval_bridge.lm_eval` (imported on first use, so
    `hf_prune.evaluate` stays importable without lm_eval installed)."""
    from .lm_eval_bridge import lm_eval as _lm_eval

    return _lm_eval(model, tokenizer, tasks, **kwargs)
