"""Layer-by-layer calibration passes: the engine shared by methods that score decoder layers.

A pass runs *layer-major*: the residual stream entering layer 0 is captured for every calibration batch
(`capture_layer_inputs`), then each decoder layer is applied to all batches before the next layer runs
(`run_layers`). A scoring function sees, for every layer i, the streams entering and leaving it (h_i, h_{i+1}) and
never needs the whole model's activations at once; the streams for all batches stay on the model's device.

Notation (../METHODS.md): h_i is the residual stream entering decoder layer i, h_0 the token embeddings, h_L the
stream after the last layer (before the final norm).

    states = capture_layer_inputs(model, batches)          # h_0 for every batch
    run_layers(model, states, on_layer=lambda i, h_in, h_out, masks: ...)

Methods that skip a layer (IteRABRe) pass `skip={j}`: the layer is treated as the identity, the stream passes
through unchanged, and nothing is copied.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from ..arch import ArchAdapter, get_adapter, unwrap_model
from ..checks import require_finite

__all__ = [
    "LayerStates",
    "LayerHook",
    "require_finite_stream",
    "capture_layer_inputs",
    "collect_hidden_states",
    "eval_mode",
    "model_device",
    "run_layer",
    "run_layers",
    "token_cosines",
]

Batch = Mapping[str, torch.Tensor]
#: on_layer(i, h_in, h_out, attention_masks): lists over batches of the streams entering and leaving layer i.
LayerHook = Callable[[int, Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence["torch.Tensor | None"]], None]


@dataclass
class LayerStates:
    """The residual stream of every calibration batch at one depth of the decoder.

    Attributes:
        hidden: per batch, the stream (batch, tokens, hidden) entering decoder layer `layer`.
        attention_mask: per batch, the (batch, tokens) 0/1 padding mask, or None (no padding).
        layer: index of the decoder layer these streams enter (num_layers once every layer has run).
    """

    hidden: list[torch.Tensor]
    attention_mask: list[torch.Tensor | None]
    layer: int = 0

    @property
    def num_tokens(self) -> int:
        """Number of real (unpadded) tokens over all batches."""
        return sum(
            int(m.sum()) if m is not None else h.shape[0] * h.shape[1]
            for h, m in zip(self.hidden, self.attention_mask)
        )

    def clone(self) -> "LayerStates":
        return LayerStates([h.clone() for h in self.hidden], list(self.attention_mask), self.layer)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's input embeddings (where calibration inputs must go)."""
    return get_adapter(model).embed_tokens.weight.device


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no autograd for the duration; the previous training flag is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _progress(iterable: Iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)


def require_finite_stream(
    hidden: Sequence[torch.Tensor], masks: Sequence["torch.Tensor | None"], *, method: str, stage: int | None,
    layer: int | None, what: str,
) -> None:
    """NonFiniteError when the residual stream of any batch holds NaN/inf at a real (unpadded) token."""
    for h, m in zip(hidden, masks):
        rows = h if m is None else h[m.to(h.device).bool()]
        require_finite(rows, method=method, stage=stage, layer=layer, what=what)


def capture_layer_inputs(
    model: nn.Module, batches: Iterable[Batch], *, method: str = "calibration", stage: int | None = None
) -> LayerStates:
    """h_0 (the stream entering decoder layer 0) for every batch, on the model's device.

    Each batch is a dict with `input_ids` (batch, tokens) and optionally `attention_mask` (1 = real token).
    Call it under `torch.no_grad()` (or `eval_mode(model)`) unless gradients are wanted. Non-finite embeddings raise
    NonFiniteError naming `method` and `stage`.
    """
    ad = get_adapter(model)
    device = ad.embed_tokens.weight.device
    hidden, masks = [], []
    for n, batch in enumerate(batches):
        if "input_ids" not in batch:
            raise KeyError(f"calibration batch {n} has no 'input_ids'; its keys are {sorted(batch)}")
        ids = batch["input_ids"].to(device)
        if ids.dim() != 2:
            raise ValueError(f"calibration batch {n}: input_ids must be (batch, tokens), got shape {tuple(ids.shape)}")
        mask = batch.get("attention_mask")
        if mask is not None:
            mask = mask.to(device)
            if mask.shape != ids.shape:
                raise ValueError(
                    f"calibration batch {n}: attention_mask shape {tuple(mask.shape)} differs from input_ids "
                    f"shape {tuple(ids.shape)}"
                )
            if bool(mask.all()):
                mask = None  # no padding: skip the mask (same result, cheaper attention)
        hidden.append(ad.embed(ids))
        masks.append(mask)
    if not hidden:
        raise ValueError(f"{method}: no calibration batches were given; pass at least one batch with input_ids")
    require_finite_stream(hidden, masks, method=method, stage=stage, layer=0, what="the token embeddings (h_0)")
    return LayerStates(hidden, masks, 0)


def run_layer(adapter: ArchAdapter, i: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Decoder layer i applied to one batch's stream (no cache), through the adapter."""
    out = adapter.layers[i](hidden, **adapter.layer_kwargs(hidden, attention_mask, i))
    return out[0] if isinstance(out, tuple) else out


def run_layers(
    model: nn.Module,
    states: LayerStates,
    end: int | None = None,
    *,
    skip: Iterable[int] = (),
    on_layer: LayerHook | None = None,
    progress: bool = False,
    desc: str = "layers",
    method: str = "calibration",
    stage: int | None = None,
) -> LayerStates:
    """Advance `states` from layer `states.layer` through layer `end - 1` (default: the last), layer-major.

    Layers in `skip` act as the identity (their output is their input; `on_layer` is not called for them).
    `on_layer(i, h_in, h_out, masks)` is called after layer i has run on every batch. Returns new states entering
    layer `end`; `states` itself is not modified. Call under `torch.no_grad()` unless gradients are wanted.
    A layer output with NaN/inf at a real token raises NonFiniteError naming `method`, `stage` and the layer.
    """
    ad = get_adapter(model)
    n = ad.num_layers
    end = n if end is None else end
    if not 0 <= states.layer <= end <= n:
        raise ValueError(f"cannot run layers {states.layer}..{end - 1}: the model has layers 0..{n - 1}")
    skip = set(skip)
    hidden = list(states.hidden)
    masks = states.attention_mask
    layers = range(states.layer, end)
    for i in _progress(layers, len(layers), desc, progress):
        if i in skip:
            continue
        out = [run_layer(ad, i, h, m) for h, m in zip(hidden, masks)]
        require_finite_stream(out, masks, method=method, stage=stage, layer=i, what="the decoder layer's output")
        if on_layer is not None:
            on_layer(i, hidden, out, masks)
        hidden = out
    return LayerStates(hidden, list(masks), end)


def collect_hidden_states(model: nn.Module, batches: Iterable[Batch], progress: bool = False) -> list[list[torch.Tensor]]:
    """[h_0, ..., h_L], each a list over batches, computed layer by layer without grad.

    Matches `model(..., output_hidden_states=True).hidden_states` for h_0..h_{L-1}; transformers applies the final
    norm to its last entry, this returns h_L before the final norm (the norm is not part of any layer).
    """
    model = unwrap_model(model)
    with eval_mode(model):
        states = capture_layer_inputs(model, batches)
        collected = [list(states.hidden)]
        run_layers(model, states, on_layer=lambda i, h_in, h_out, m: collected.append(list(h_out)),
                   progress=progress, desc="hidden states")
    return collected


def token_cosines(
    a: torch.Tensor, b: torch.Tensor, attention_mask: torch.Tensor | None = None, chunk_rows: int = 8192
) -> torch.Tensor:
    """cos(a_t, b_t) for every real token t: a 1-D float32 tensor over the unmasked tokens.

    a, b: (..., hidden) of the same shape; attention_mask: 1 for real tokens, shape a.shape[:-1]. Each row's dot
    product is taken with its own partner row only (never an N x N similarity matrix), in float32, `chunk_rows` rows
    at a time. Zero vectors give cosine 0 (not NaN).
    """
    if a.shape != b.shape:
        raise ValueError(f"token_cosines needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    d = a.shape[-1]
    a2, b2 = a.reshape(-1, d), b.reshape(-1, d)
    if attention_mask is not None:
        if attention_mask.shape != a.shape[:-1]:
            raise ValueError(
                f"attention_mask shape {tuple(attention_mask.shape)} does not match the tokens {tuple(a.shape[:-1])}"
            )
        keep = attention_mask.reshape(-1).to(a.device).bool()
        a2, b2 = a2[keep], b2[keep]
    out = torch.empty(a2.shape[0], dtype=torch.float32, device=a.device)
    eps = torch.finfo(torch.float32).tiny
    for s in range(0, a2.shape[0], chunk_rows):
        x, y = a2[s : s + chunk_rows].float(), b2[s : s + chunk_rows].float()
        dot = (x * y).sum(-1)
        norm = x.norm(dim=-1) * y.norm(dim=-1)
        out[s : s + chunk_rows] = dot / norm.clamp_min(eps)
    return out
