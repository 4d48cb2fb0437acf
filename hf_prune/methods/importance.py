"""Importance of coupled structures (attention head groups, MLP channels) for structured pruning.

A *group* is everything that goes away together, read through the arch adapter:

* attention, ``head_grouping="kv"``: one kv head with its query heads: the q rows of its query heads, its k and v
  rows (and their biases), the o columns of its query heads. Removing it keeps grouped-query attention valid.
* attention, ``head_grouping="query"``: one query head *per kv group* (q rows + o columns), so every kv group keeps
  the same number of query heads; kv heads are never removed. Within a layer the unit of rank r takes the r-th least
  important query head of every kv group; a layer down to one query head per kv head has nothing left to remove
  in this mode (multi-head attention models should use "kv", where each kv head has one query head).
* attention, ``head_grouping="auto"`` (the methods' default): "query" when every scored layer has a single kv head
  shared by several query heads (Gemma-3-270M: "kv" could remove nothing there), else "kv" (grouped-query models
  with >= 2 kv heads, multi-head attention); :func:`resolve_head_grouping`.
* MLP: one intermediate channel: its gate and up rows (and biases) and its down column.

Scores (summed over every weight w of the group):

* ``"pip"``    I = sum |w * (dL/dw(x) - dL/dw(x~))|, x~ the perturbed view (PIP, Cao et al., arXiv 2501.15278;
  a reconstruction: no public code);
* ``"taylor"`` I = sum |w * dL/dw(x)|, first-order Taylor (LLM-Pruner, Ma et al., NeurIPS 2023, "param_first");
* ``"magnitude"`` I = ||w||_2^2 over the group (data-free): a sum over weights like the others, so ranking by score
  per parameter (``normalize="per_parameter"``) compares mean squares. (Ranked raw, it orders groups as ||w||_2 does;
  ||w||_2 per parameter would be rms / sqrt(n), which favours removing the largest groups: an attention head group of
  SmolLM2 has ~170x the parameters of an MLP channel.)

L is the mean next-token cross-entropy over all calibration tokens. Gradients are accumulated in the parameters'
``.grad`` across batches and micro-batches (for "pip" the perturbed loss is back-propagated with a minus sign, so
``.grad`` holds the difference directly and no second buffer is needed). Gradients accumulate in the parameters'
dtype: score bf16/fp16 models in fp32 where the difference of two nearly equal gradients matters. Before any backward
pass the memory it needs is estimated, logged (INFO) and checked against a budget (:func:`estimate_gradient_memory`,
:func:`check_memory`). ``micro_batch_size="auto"`` sizes the micro-batch from that estimate
(:func:`auto_micro_batch_size`): the sum over micro-batches is the same sum, so the scores do not depend on it
(up to float rounding); ``gradient_checkpointing=None`` turns per-layer activation checkpointing on where one row's
activations would be large (:func:`auto_gradient_checkpointing`). The pass runs in eval mode, checkpointing included.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..arch import ArchAdapter, get_adapter, unwrap_model
from ..checks import check_optional_int_option, require_finite
from ..losses import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, chunk_rows, chunked_causal_lm_loss, output_head
from ..perturb import EmbeddingNoise
from ..runtime import available_memory, progress as progress_bar, release_freed_memory

__all__ = [
    "AUTO_ACTIVATION_FRACTION",
    "AUTO_ACTIVATION_FLOOR_BYTES",
    "CRITERIA",
    "HEAD_GROUPINGS",
    "HEAD_GROUPING_OPTIONS",
    "Group",
    "InsufficientMemoryError",
    "LayerImportance",
    "MemoryEstimate",
    "auto_gradient_checkpointing",
    "auto_micro_batch_size",
    "build_groups",
    "check_memory",
    "check_removable",
    "compute_importance",
    "estimate_gradient_memory",
    "gradient_pass",
    "resolve_head_grouping",
    "scored_parameters",
]

logger = logging.getLogger(__name__)

CRITERIA: tuple[str, ...] = ("pip", "taylor", "magnitude")
HEAD_GROUPINGS: tuple[str, ...] = ("kv", "query")
#: What a method's ``head_grouping`` may be set to: a grouping, or "auto" (resolved per model).
HEAD_GROUPING_OPTIONS: tuple[str, ...] = ("auto",) + HEAD_GROUPINGS
#: ``micro_batch_size="auto"`` / ``gradient_checkpointing=None``: the activations and logits of one micro-batch may
#: take at most this fraction of the model's weight bytes (weights 1x + gradients of the scored linears <= 1x + this
#: 0.25x, leaving 0.25x of the 2.5x of issue 18 for the runtime, tokenizer and evaluation leftovers)...
AUTO_ACTIVATION_FRACTION = 0.25
#: ...or this many bytes when that is more (small models: a micro-batch of at least this size keeps the GEMMs large).
AUTO_ACTIVATION_FLOOR_BYTES = 256 * 2**20

Batch = Mapping[str, torch.Tensor]


class InsufficientMemoryError(MemoryError):
    """A gradient pass would not fit in the memory budget."""


# ---------------------------------------------------------------------------------------------------------------------
# Per-structure scores
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LayerImportance:
    """Scores of the prunable structures of one decoder layer (indices of the model as it is now).

    ``query_heads[h]``: q rows + o columns of query head h; ``kv_heads[j]``: k and v rows of kv head j;
    ``mlp_channels[c]``: gate/up rows + down column of channel c. For "magnitude" these are sums of squares, for the
    gradient criteria sums of |w * g|; a group's score is their sum.
    """

    layer: int
    criterion: str
    query_heads: torch.Tensor
    kv_heads: torch.Tensor
    mlp_channels: torch.Tensor


def _check_linear(lin: nn.Module, what: str) -> nn.Linear:
    if not isinstance(lin, nn.Linear):
        raise TypeError(
            f"{what} is a {type(lin).__name__}, not an nn.Linear; merge adapters (e.g. PEFT's merge_and_unload()) "
            "before scoring"
        )
    return lin


def scored_parameters(adapter: ArchAdapter, layers: Sequence[int]) -> list[nn.Parameter]:
    """The weights (and per-structure biases) whose gradients the scores need, for decoder layers ``layers``."""
    params: list[nn.Parameter] = []
    for i in layers:
        a, m = adapter.attention(i), adapter.mlp(i)
        for name, lin in (("q_proj", a.q_proj), ("k_proj", a.k_proj), ("v_proj", a.v_proj)):
            lin = _check_linear(lin, f"layer {i} {name}")
            params.append(lin.weight)
            if lin.bias is not None:
                params.append(lin.bias)
        params.append(_check_linear(a.o_proj, f"layer {i} o_proj").weight)
        for name, lin in (("gate_proj", m.gate_proj), ("up_proj", m.up_proj)):
            if lin is None:
                continue
            lin = _check_linear(lin, f"layer {i} {name}")
            params.append(lin.weight)
            if lin.bias is not None:
                params.append(lin.bias)
        params.append(_check_linear(m.down_proj, f"layer {i} down_proj").weight)
    return params


def _element_scores(p: torch.Tensor, grad: torch.Tensor | None, criterion: str) -> torch.Tensor:
    w = p.detach().float()
    if criterion == "magnitude":
        return w * w
    if grad is None:  # a parameter the loss does not reach (e.g. a zero-sized slice): no first-order change
        return torch.zeros_like(w)
    return (w * grad.float()).abs()


def _row_scores(lin: nn.Linear, grads: dict[int, torch.Tensor], criterion: str) -> torch.Tensor:
    s = _element_scores(lin.weight, grads.get(id(lin.weight)), criterion).sum(1)
    if lin.bias is not None:
        s = s + _element_scores(lin.bias, grads.get(id(lin.bias)), criterion)
    return s


def _col_scores(lin: nn.Linear, grads: dict[int, torch.Tensor], criterion: str) -> torch.Tensor:
    return _element_scores(lin.weight, grads.get(id(lin.weight)), criterion).sum(0)


def layer_importance(
    adapter: ArchAdapter, layer: int, criterion: str, grads: dict[int, torch.Tensor]
) -> LayerImportance:
    """Per-head and per-channel scores of one layer from accumulated gradients (keyed by ``id(param)``)."""
    a, m = adapter.attention(layer), adapter.mlp(layer)
    hd = a.head_dim
    q = _row_scores(a.q_proj, grads, criterion).view(a.num_heads, hd).sum(1)
    o = _col_scores(a.o_proj, grads, criterion).view(a.num_heads, hd).sum(1)
    k = _row_scores(a.k_proj, grads, criterion).view(a.num_kv_heads, hd).sum(1)
    v = _row_scores(a.v_proj, grads, criterion).view(a.num_kv_heads, hd).sum(1)
    ch = _row_scores(m.up_proj, grads, criterion) + _col_scores(m.down_proj, grads, criterion)
    if m.gate_proj is not None:
        ch = ch + _row_scores(m.gate_proj, grads, criterion)
    return LayerImportance(layer, criterion, (q + o).cpu(), (k + v).cpu(), ch.cpu())


# ---------------------------------------------------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """A set of structures removed together, with its score and the parameters its removal frees.

    ``kind`` is "attention" or "mlp". ``rank`` orders the query-grouping units of a layer (unit r can only go after
    unit r - 1); it is -1 where removal order is free.
    """

    kind: str
    layer: int
    score: float
    num_params: int
    query_heads: tuple[int, ...] = ()
    kv_heads: tuple[int, ...] = ()
    channels: tuple[int, ...] = ()
    rank: int = -1


def _rows_params(lin: nn.Linear) -> int:
    """Parameters freed by removing one output row of `lin` (its weight row and bias entry)."""
    return lin.in_features + (lin.bias is not None)


def build_groups(adapter: ArchAdapter, imp: LayerImportance, head_grouping: str = "kv",
                 attention: bool = True, mlp: bool = True) -> list[Group]:
    """The removable groups of one layer with their scores (see the module docstring for the groupings)."""
    if head_grouping not in HEAD_GROUPINGS:
        raise ValueError(f"head_grouping={head_grouping!r} is not valid; use one of {HEAD_GROUPINGS}")
    i = imp.layer
    a, m = adapter.attention(i), adapter.mlp(i)
    hd, nq, nkv, g = a.head_dim, a.num_heads, a.num_kv_heads, a.group_size
    def finish(total: float) -> float:
        return float(total)

    groups: list[Group] = []
    if attention:
        q_params = hd * (_rows_params(a.q_proj) + a.o_proj.out_features)
        kv_params = hd * (_rows_params(a.k_proj) + _rows_params(a.v_proj))
        if head_grouping == "query":
            def by_score(h: int) -> tuple[float, int]:
                return float(imp.query_heads[h]), h

            order = [sorted(range(j * g, (j + 1) * g), key=by_score) for j in range(nkv)]
            for r in range(g if g > 1 else 0):
                heads = tuple(sorted(order[j][r] for j in range(nkv)))
                total = sum(float(imp.query_heads[h]) for h in heads)
                groups.append(Group("attention", i, finish(total), nkv * q_params, query_heads=heads, rank=r))
        else:
            for j in range(nkv):
                heads = tuple(range(j * g, (j + 1) * g))
                total = float(imp.query_heads[list(heads)].sum()) + float(imp.kv_heads[j])
                groups.append(Group("attention", i, finish(total), g * q_params + kv_params, heads, (j,)))
    if mlp:
        per = _rows_params(m.up_proj) + m.down_proj.out_features
        if m.gate_proj is not None:
            per += _rows_params(m.gate_proj)
        scores = imp.mlp_channels.tolist()
        groups.extend(Group("mlp", i, finish(s), per, channels=(c,)) for c, s in enumerate(scores))
    return groups


def check_removable(adapter: ArchAdapter, layers: Sequence[int], head_grouping: str = "kv", attention: bool = True,
                    mlp: bool = True, *, method: str = "pruning", allow_partial: bool = False) -> list[str]:
    """What cannot be pruned as asked in decoder layers ``layers``: a ValueError naming the cause, before any
    scoring, when a requested kind of structure has no removable group in any of them (one kv head with
    ``head_grouping="kv"``: the last kv group always stays; one query head per kv group with "query"; one MLP
    channel), or when nothing at all can be removed. With ``allow_partial`` a kind that cannot be pruned is returned
    in the list (for the caller to record and warn about) instead, as long as something else can be removed.
    """
    if head_grouping not in HEAD_GROUPINGS:
        raise ValueError(f"head_grouping={head_grouping!r} is not valid; use one of {HEAD_GROUPINGS}")
    causes: list[str] = []
    can_remove = False
    if attention:
        units = {i: (adapter.attention(i).group_size if head_grouping == "query" else adapter.attention(i).num_kv_heads)
                 for i in layers}
        if all(u <= 1 for u in units.values()):
            if head_grouping == "kv":
                causes.append(
                    f"{method}: attention cannot be pruned: layers {list(layers)} have one kv head each, and with "
                    "head_grouping='kv' no kv group can be removed (the last one always stays); use "
                    "head_grouping='query' to remove query heads inside the group, or prune_attention=False"
                )
            else:
                causes.append(
                    f"{method}: attention cannot be pruned: layers {list(layers)} have one query head per kv group, "
                    "and head_grouping='query' keeps at least one per group; use head_grouping='kv', or "
                    "prune_attention=False"
                )
        else:
            can_remove = True
    if mlp:
        if all(adapter.mlp(i).intermediate_size <= 1 for i in layers):
            causes.append(f"{method}: the MLPs of layers {list(layers)} have one channel left; none can be removed")
        else:
            can_remove = True
    if not can_remove:
        asked = [k for k, on in (("attention", attention), ("MLP", mlp)) if on]
        raise ValueError(" ".join(causes) or f"{method}: nothing to prune: {' and '.join(asked) or 'no structure'} "
                         f"was asked for in layers {list(layers)}; the pruned model would equal the dense one")
    if causes and not allow_partial:
        raise ValueError("; ".join(causes) + " (or allow_partial=True to prune the rest and record what was not)")
    return causes


def resolve_head_grouping(adapter: ArchAdapter, layers: Sequence[int], head_grouping: str = "auto") -> str:
    """The attention grouping to use in decoder layers ``layers``: ``head_grouping`` itself when it is "kv" or
    "query"; for "auto", "query" when every one of these layers has a single kv head shared by several query heads
    (there "kv" has no removable group: the last kv group always stays), else "kv" (grouped-query attention with
    >= 2 kv heads somewhere, and multi-head attention, where "query" has nothing to remove)."""
    if head_grouping not in HEAD_GROUPING_OPTIONS:
        raise ValueError(f"head_grouping={head_grouping!r} is not valid; use one of {HEAD_GROUPING_OPTIONS}")
    if head_grouping != "auto":
        return head_grouping
    attn = [adapter.attention(i) for i in layers]
    if attn and all(a.num_kv_heads <= 1 for a in attn) and any(a.group_size > 1 for a in attn):
        return "query"
    return "kv"


# ---------------------------------------------------------------------------------------------------------------------
# Memory
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class MemoryEstimate:
    """Bytes a gradient pass needs at its peak (an estimate; benchmarks/pip.py compares it with measurements).

    activations: per decoder layer and token, about 5 D + 4 D_q + 3 D_kv + 4 I + H * T values are kept for the
    backward pass (norm inputs/outputs, q/k/v before and after RoPE, attention output, the four MLP
    intermediates, attention probabilities when materialised); with gradient checkpointing only each layer's input
    (D) plus one layer's full set. logits: the logits, their log-softmax and its gradient, fp32, for at most
    `chunk_tokens` tokens at a time (`hf_prune.losses`): C * V values each, C = min(T, chunk_tokens), capped so that
    one head call's fp32 logits stay within `hf_prune.losses.LOGITS_BUDGET_BYTES` (`chunk_rows`).
    """

    weights: int
    gradients: int
    activations: int
    logits: int
    tokens_per_micro_batch: int
    device: str = "cpu"

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.activations + self.logits

    @property
    def beyond_weights(self) -> int:
        """What the pass adds on top of the weights already in memory."""
        return self.total - self.weights

    def __str__(self) -> str:
        gb = 1024**3
        return (
            f"weights {self.weights / gb:.2f} GB + gradients {self.gradients / gb:.2f} GB + activations "
            f"{self.activations / gb:.2f} GB + logits {self.logits / gb:.2f} GB = {self.total / gb:.2f} GB "
            f"({self.tokens_per_micro_batch} tokens per micro-batch)"
        )


def estimate_gradient_memory(
    model: nn.Module,
    micro_batch_size: int,
    seq_len: int,
    scored: Iterable[nn.Parameter] | None = None,
    gradient_checkpointing: bool = False,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> MemoryEstimate:
    """Estimate the peak memory of one forward+backward over ``micro_batch_size`` x ``seq_len`` tokens.

    ``scored`` are the parameters that get gradients (default: all). Gradients are held in the parameters' dtype.
    The loss's logits are made ``chunk_tokens`` tokens at a time (None: all at once).
    """
    model = unwrap_model(model)
    ad = get_adapter(model)
    params = list(model.parameters())
    elem = params[0].element_size() if params else 4
    weights = sum(p.numel() * p.element_size() for p in params)
    scored = params if scored is None else list(scored)
    gradients = sum(p.numel() * p.element_size() for p in scored)
    t = micro_batch_size * seq_len
    d = ad.hidden_size
    per_layer = []
    for i in range(ad.num_layers):
        a, m = ad.attention(i), ad.mlp(i)
        dq, dkv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        per_layer.append(5 * d + 4 * dq + 3 * dkv + 4 * m.intermediate_size + a.num_heads * seq_len)
    if gradient_checkpointing:
        values = ad.num_layers * d + max(per_layer)
    else:
        values = sum(per_layer)
    activations = t * values * elem
    vocab = ad.lm_head.out_features
    logits = 3 * min(t, chunk_rows(output_head(ad), t, chunk_tokens)) * vocab * 4
    device = str(params[0].device) if params else "cpu"
    return MemoryEstimate(weights, gradients, activations, logits, t, device)


def auto_micro_batch_size(
    model: nn.Module,
    rows: int,
    seq_len: int,
    scored: Iterable[nn.Parameter] | None = None,
    gradient_checkpointing: bool = False,
    memory_budget_gb: float | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> int:
    """Rows per forward/backward for ``micro_batch_size="auto"``: the most rows (at most ``rows``, at least 1) whose
    activations and logits (:func:`estimate_gradient_memory`) take at most AUTO_ACTIVATION_FRACTION of the weight
    bytes (or AUTO_ACTIVATION_FLOOR_BYTES when that is more) and whose whole pass fits ``memory_budget_gb`` (None:
    what it adds beyond the weights fits in the device's free memory). One row when even one does not fit:
    :func:`check_memory` then says so before the pass.
    """
    if rows < 1:
        raise ValueError(f"rows={rows} is not valid; it must be >= 1")
    scored = None if scored is None else list(scored)
    allowed = _activation_allowance(model)
    free: int | None = None

    def fits(r: int) -> bool:
        nonlocal free
        est = estimate_gradient_memory(model, r, seq_len, scored, gradient_checkpointing, chunk_tokens)
        if est.activations + est.logits > allowed:
            return False
        if memory_budget_gb is not None:
            return est.total <= memory_budget_gb * 1024**3
        if free is None:
            free = available_memory(est.device)
        return est.beyond_weights <= free

    lo, hi = 1, rows  # activations grow with rows: binary search for the largest that fits
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _activation_allowance(model: nn.Module) -> float:
    weights = sum(p.numel() * p.element_size() for p in unwrap_model(model).parameters())
    return max(AUTO_ACTIVATION_FRACTION * weights, AUTO_ACTIVATION_FLOOR_BYTES)


def auto_gradient_checkpointing(
    model: nn.Module,
    seq_len: int,
    scored: Iterable[nn.Parameter] | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> bool:
    """``gradient_checkpointing=None``: per-layer activation checkpointing when the activations and logits of a single
    row of ``seq_len`` tokens, every layer's activations kept, would take more than AUTO_ACTIVATION_FRACTION of the
    weight bytes (or AUTO_ACTIVATION_FLOOR_BYTES when that is more); it then costs about one more forward pass."""
    est = estimate_gradient_memory(model, 1, seq_len, scored, False, chunk_tokens)
    return est.activations + est.logits > _activation_allowance(model)


def check_memory(estimate: MemoryEstimate, budget_gb: float | None = None, what: str = "gradient pass") -> None:
    """Raise InsufficientMemoryError before any work when ``estimate`` does not fit.

    With ``budget_gb`` the whole estimate (weights included) must fit in it; without, what the pass adds beyond the
    weights (already resident) must fit in the device's free memory.
    """
    gb = 1024**3
    if budget_gb is not None:
        need, have, where = estimate.total, budget_gb * gb, f"the budget memory_budget_gb={budget_gb}"
    else:
        need, have = estimate.beyond_weights, available_memory(estimate.device)
        where = f"the {have / gb:.2f} GB free on {estimate.device} (besides the weights)"
    if need > have:
        raise InsufficientMemoryError(
            f"The {what} needs about {need / gb:.2f} GB ({estimate}), more than {where}. "
            "Lower micro_batch_size, set gradient_checkpointing=True, use shorter calibration sequences, "
            "or raise memory_budget_gb."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Gradient passes
# ---------------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _gradients_only_for(model: nn.Module, params: Sequence[nn.Parameter]) -> Iterator[None]:
    """Gradients for ``params`` only, starting from zero; restores requires_grad and any existing .grad after."""
    saved_flags = [(p, p.requires_grad) for p in model.parameters()]
    saved_grads = [(p, p.grad) for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in saved_flags:
            p.requires_grad_(flag)
        for p, g in saved_grads:
            p.grad = g


@contextlib.contextmanager
def _checkpointing(model: nn.Module, enable: bool) -> Iterator[None]:
    """The pass in eval mode (no dropout), each decoder layer's forward under non-reentrant activation checkpointing
    when ``enable`` or when the model has its own checkpointing turned on (which only acts in training mode: here the
    layers are wrapped instead, so the recomputation runs without dropout and the scores equal those without it).
    The model's mode is restored after; the layers' forwards are unwrapped."""
    from torch.utils.checkpoint import checkpoint

    already = bool(getattr(model, "is_activation_checkpointing", False))
    was_training = model.training
    wrapped: list[nn.Module] = []
    model.eval()
    try:
        if enable or already:
            for layer in get_adapter(model).layers:
                if "forward" in vars(layer):  # already wrapped (or patched by someone else): leave it alone
                    continue
                inner = layer.forward

                def forward(*args, _inner=inner, **kwargs):
                    if not torch.is_grad_enabled():
                        return _inner(*args, **kwargs)
                    return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

                layer.forward = forward
                wrapped.append(layer)
        yield
    finally:
        for layer in wrapped:
            del layer.forward
        model.train(was_training)


def _predicted_tokens(mask: torch.Tensor) -> int:
    return int((mask[:, 1:].bool() & mask[:, :-1].bool()).sum())


def _nll_sum(ad: ArchAdapter, labels: torch.Tensor, mask: torch.Tensor,
             chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS, **inputs) -> torch.Tensor:
    """Summed next-token NLL over positions where both the token and its predecessor are real, from the backbone's
    final hidden states with the logits made ``chunk_tokens`` tokens at a time (`hf_prune.losses`)."""
    hidden = ad.backbone(attention_mask=mask, use_cache=False, **inputs).last_hidden_state
    valid = mask[:, 1:].bool() & mask[:, :-1].bool()
    target = labels.clone()
    target[:, 1:] = target[:, 1:].masked_fill(~valid, IGNORE_INDEX)
    return chunked_causal_lm_loss(hidden, output_head(ad), target, chunk_tokens=chunk_tokens, reduction="sum")


def _views(batch: Batch, perturbed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    key = "perturbed_input_ids" if perturbed else "input_ids"
    ids = batch[key]
    mask = batch.get("perturbed_attention_mask" if perturbed else "attention_mask")
    return ids, (torch.ones_like(ids) if mask is None else mask)


def gradient_pass(
    model: nn.Module,
    batches: Sequence[Batch],
    params: Sequence[nn.Parameter],
    difference: bool = False,
    embedding_noise: EmbeddingNoise | None = None,
    micro_batch_size: int | None = None,
    gradient_checkpointing: bool = False,
    progress: bool = True,
    *,
    method: str = "gradient pass",
    stage: int | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> dict[int, torch.Tensor]:
    """Gradients of the mean calibration loss w.r.t. ``params``, keyed by ``id(param)`` (in the parameters' dtype, the
    one they were accumulated in, on their device; `layer_importance` upcasts them one parameter at a time).

    With ``difference`` the result is grad L(x) - grad L(x~): batches must carry ``perturbed_input_ids`` (and
    ``perturbed_attention_mask``) unless ``embedding_noise`` is given, in which case x~ is the clean ids' embeddings
    plus noise, scored against the clean next tokens. Each view's loss is the mean over its own predicted tokens.
    The loss never holds all tokens' logits: the head runs over ``chunk_tokens`` tokens at a time, forward and
    backward (`hf_prune.losses.chunked_causal_lm_loss`; None: all at once).
    """
    model = unwrap_model(model)
    ad = get_adapter(model)
    device = next(model.parameters()).device
    if not batches:
        raise ValueError("no calibration batches were given; gradient criteria need at least one batch")
    need_perturbed = difference and embedding_noise is None
    if need_perturbed and any("perturbed_input_ids" not in b for b in batches):
        raise ValueError(
            "criterion 'pip' needs a perturbed view: batches with 'perturbed_input_ids' "
            "(hf_prune.perturb.add_perturbed_views) or an EmbeddingNoise"
        )
    n_clean = sum(_predicted_tokens(_views(b, False)[1]) for b in batches)
    n_pert = sum(_predicted_tokens(_views(b, True)[1]) for b in batches) if need_perturbed else n_clean
    if n_clean == 0 or n_pert == 0:
        raise ValueError("the calibration batches hold no predictable token (sequences need at least 2 real tokens)")

    noise_calls = 0
    with _gradients_only_for(model, params), _checkpointing(model, gradient_checkpointing), torch.enable_grad():
        for batch in progress_bar(batches, desc="gradients", enabled=progress):
            rows = batch["input_ids"].shape[0]
            step = micro_batch_size or rows
            for s in range(0, rows, step):
                ids, mask = (t[s : s + step].to(device) for t in _views(batch, False))
                clean = _nll_sum(ad, ids, mask, chunk_tokens, input_ids=ids)
                require_finite(clean.detach(), method=method, stage=stage, layer=None, what="the calibration loss")
                (clean / n_clean).backward()
                if not difference:
                    continue
                if embedding_noise is not None:
                    with torch.no_grad():
                        embeds = embedding_noise(ad.embed(ids), offset=noise_calls)
                    noise_calls += 1
                    loss = _nll_sum(ad, ids, mask, chunk_tokens, inputs_embeds=embeds)
                else:
                    pids, pmask = (t[s : s + step].to(device) for t in _views(batch, True))
                    loss = _nll_sum(ad, pids, pmask, chunk_tokens, input_ids=pids)
                require_finite(loss.detach(), method=method, stage=stage, layer=None,
                               what="the calibration loss on the perturbed view")
                (-loss / n_pert).backward()
        # The accumulated gradients themselves, not fp32 copies: at 8B width in bf16 a copy would add 0.87 GB per
        # layer on top of the 0.44 GB of gradients; the scores upcast one parameter at a time (exactly).
        return {id(p): (p.grad.detach() if p.grad is not None else torch.zeros_like(p)) for p in params}


def compute_importance(
    model: nn.Module,
    batches: Sequence[Batch],
    layers: Sequence[int],
    criterion: str,
    embedding_noise: EmbeddingNoise | None = None,
    micro_batch_size: int | str | None = None,
    gradient_checkpointing: bool | None = False,
    memory_budget_gb: float | None = None,
    progress: bool = True,
    *,
    method: str | None = None,
    stage: int | None = None,
    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS,
) -> list[LayerImportance]:
    """Scores of every head and channel of decoder layers ``layers`` under ``criterion`` (see module docstring).

    For the gradient criteria the memory of the pass is estimated first and checked against ``memory_budget_gb``
    (None: the device's free memory); InsufficientMemoryError is raised before any forward pass if it won't fit.
    A NaN/inf score raises NonFiniteError naming ``method`` (default: the criterion), ``stage`` and the layer.
    The loss's logits are made ``chunk_tokens`` tokens at a time (`gradient_pass`). ``micro_batch_size``: rows per
    forward/backward; None: whole batches; "auto": :func:`auto_micro_batch_size` (logged with the estimate).
    ``gradient_checkpointing``: per-layer activation checkpointing; None: :func:`auto_gradient_checkpointing`.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion={criterion!r} is not valid; use one of {CRITERIA}")
    auto = micro_batch_size == "auto"
    if not auto:
        micro_batch_size = check_optional_int_option("micro_batch_size", micro_batch_size, minimum=1)
    model = unwrap_model(model)
    ad = get_adapter(model)
    params = scored_parameters(ad, layers)
    grads: dict[int, torch.Tensor] = {}
    if criterion != "magnitude":
        batches = list(batches)
        if not batches:
            raise ValueError(f"criterion={criterion!r} needs calibration batches; none were given")
        rows = max(b["input_ids"].shape[0] for b in batches)
        seq_len = max(b["input_ids"].shape[1] for b in batches)
        if gradient_checkpointing is None:
            gradient_checkpointing = auto_gradient_checkpointing(model, seq_len, params, chunk_tokens)
            logger.info("gradient_checkpointing=None: per-layer activation checkpointing %s",
                        "on" if gradient_checkpointing else "off")
        if auto:
            micro_batch_size = auto_micro_batch_size(model, rows, seq_len, params, gradient_checkpointing,
                                                     memory_budget_gb, chunk_tokens)
            logger.info("micro_batch_size='auto': %d of %d rows per forward/backward", micro_batch_size, rows)
        est = estimate_gradient_memory(model, min(micro_batch_size or rows, rows), seq_len, params,
                                       gradient_checkpointing, chunk_tokens)
        logger.info("%r gradient pass over %d batches needs about %s", criterion, len(batches), est)
        check_memory(est, memory_budget_gb, what=f"{criterion!r} gradient pass")
        release_freed_memory()  # what the previous stage's surgery and scoring freed, before this pass's peak
        grads = gradient_pass(model, batches, params, difference=criterion == "pip", embedding_noise=embedding_noise,
                              micro_batch_size=micro_batch_size, gradient_checkpointing=gradient_checkpointing,
                              progress=progress, method=method or criterion, stage=stage, chunk_tokens=chunk_tokens)
    with torch.no_grad():
        scores = [layer_importance(ad, i, criterion, grads) for i in layers]
    name = method or criterion
    for imp in scores:
        for what, t in (("query head", imp.query_heads), ("kv head", imp.kv_heads), ("MLP channel", imp.mlp_channels)):
            require_finite(t, method=name, stage=stage, layer=imp.layer, what=f"{criterion!r} {what} importance")
    return scores
