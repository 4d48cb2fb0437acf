"""Layer-wise calibration: capture the inputs of layer 0, then run one decoder layer at a time on the device.

The pattern of SliceGPT / SparseGPT / llm-compressor's sequential pipeline: only the layer being processed is moved
to the compute device; the other layers stay where they are (CPU); the calibration activations of every batch are
kept (on the device by default), so a model larger than the accelerator can still be calibrated. Methods step
through the layers, computing statistics on a layer's inputs and outputs and optionally changing the layer before
its outputs become the next layer's inputs.

    runner = LayerwiseRunner(model, batches)          # embeds every batch: runner.hidden[b] enters layer 0
    for i in runner.layer_indices():
        with runner.on_device(i) as layer:
            outs = [layer(h, **runner.layer_kwargs(b, i)) for b, h in enumerate(runner.hidden)]
        runner.advance(outs)                          # the outputs enter layer i + 1

Padding is kept out of every statistic through `runner.token_mask(b)` (helpers `masked_rows`, `covariance`,
`mean_cosine`).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable, Iterator, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from .arch import get_adapter, unwrap_model
from .checks import require_finite

__all__ = ["LayerwiseRunner", "covariance", "masked_rows", "mean_cosine", "model_device"]

Batch = Mapping[str, torch.Tensor]


def model_device(model: nn.Module) -> torch.device:
    p = next(iter(unwrap_model(model).parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def masked_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(b, t, d) -> (n, d): the rows of real tokens (mask 1), padding dropped."""
    rows = x.reshape(-1, x.shape[-1])
    if mask is None:
        return rows
    return rows[mask.reshape(-1).to(rows.device).bool()]


def covariance(
    signals: Iterable[torch.Tensor],
    masks: Iterable[torch.Tensor | None],
    width: int | None = None,
    normalize_tokens: bool = False,
) -> torch.Tensor:
    """Uncentred second moment sum_tokens x^T x in float64 over the real tokens of every batch (d x d).

    Only the first `width` dims are used when given (the rest of a zero-padded signal). `normalize_tokens` divides
    every token's vector by its norm first (sum_t x_t^T x_t / ||x_t||^2), so each token weighs the same.
    """
    total = None
    for x, m in zip(signals, masks):
        rows = masked_rows(x if width is None else x[..., :width], m).to(torch.float64)
        if normalize_tokens:
            rows = rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-30)
        c = rows.T @ rows
        total = c if total is None else total + c
    if total is None:
        raise ValueError("covariance of no signals: the calibration set is empty")
    return total


def mean_cosine(a: Iterable[torch.Tensor], b: Iterable[torch.Tensor], masks: Iterable[torch.Tensor | None]) -> float:
    """Mean over real tokens of cos(a_t, b_t) (per-token rows, no N x N matrix); the trailing dims of the shorter
    signal are taken as zero."""
    total, count = 0.0, 0
    for x, y, m in zip(a, b, masks):
        rx, ry = masked_rows(x, m).double(), masked_rows(y, m).double()
        d = min(rx.shape[-1], ry.shape[-1])
        dot = (rx[:, :d] * ry[:, :d]).sum(-1)
        cos = dot / (rx.norm(dim=-1) * ry.norm(dim=-1)).clamp_min(1e-30)
        total += cos.sum().item()
        count += cos.numel()
    if count == 0:
        raise ValueError("mean_cosine over no tokens: every calibration token is padding")
    return total / count


class LayerwiseRunner:
    """Calibration activations of a model, advanced one decoder layer at a time.

    Args:
        model: a causal LM of a supported family (hf_prune.arch); wrappers are unwrapped.
        batches: dicts with `input_ids` (b, t) and optionally `attention_mask` (b, t) (1 = real token).
        device: where each layer runs and the activations live (default: the model's device).
        progress: show tqdm bars in `layer_indices`.
        method: named in errors (NonFiniteError when an embedding or a layer output holds NaN/inf at a real token).
        stage: the method's stage, named in errors.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Iterable[Batch],
        device: torch.device | str | None = None,
        progress: bool = True,
        method: str = "calibration",
        stage: int | None = None,
    ):
        self.model = unwrap_model(model)
        self.adapter = get_adapter(self.model)
        self.device = torch.device(device) if device is not None else model_device(self.model)
        self.progress = progress
        self.method, self.stage = method, stage
        self.layer = 0  # the decoder layer `hidden` enters
        self.masks: list[torch.Tensor | None] = []
        self.hidden: list[torch.Tensor] = self._capture(batches)
        if not self.hidden:
            raise ValueError(f"{method}: no calibration batches were given")
        if self.num_tokens == 0:
            raise ValueError(f"{method}: the calibration batches hold no real token (every attention_mask entry is 0)")
        self.require_finite(self.hidden, "the token embeddings (h_0)", layer=0)

    @torch.no_grad()
    def _capture(self, batches: Iterable[Batch]) -> list[torch.Tensor]:
        """The hidden states entering layer 0 (the family's embedding, scaling included)."""
        out = []
        emb = self.adapter.embed_tokens
        with self._moved(emb):
            for batch in batches:
                ids = batch["input_ids"].to(self.device)
                mask = batch.get("attention_mask")
                if mask is not None:
                    mask = mask.to(self.device)
                    if bool(mask.all()):
                        mask = None
                self.masks.append(mask)
                out.append(self.adapter.embed(ids))
        return out

    @contextmanager
    def _moved(self, module: nn.Module) -> Iterator[nn.Module]:
        p = next(iter(module.parameters()), None)
        home = p.device if p is not None else self.device
        if home != self.device:
            module.to(self.device)
        try:
            yield module
        finally:
            if home != self.device:
                module.to(home)

    @contextmanager
    def on_device(self, i: int) -> Iterator[nn.Module]:
        """Decoder layer i moved to the device for the duration of the block (moved back afterwards)."""
        with self._moved(self.adapter.layers[i]) as layer:
            yield layer

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def layer_indices(self, desc: str = "layers") -> Iterator[int]:
        return iter(tqdm(range(self.num_layers), desc=desc, disable=not self.progress, unit="layer"))

    def token_mask(self, b: int) -> torch.Tensor | None:
        return self.masks[b]

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) calibration tokens over all batches."""
        return sum(int(m.sum()) if m is not None else h.shape[0] * h.shape[1] for h, m in zip(self.hidden, self.masks))

    def require_finite(self, signals: list[torch.Tensor], what: str, layer: int | None) -> None:
        """NonFiniteError (naming the method, stage and layer) when a signal holds NaN/inf at a real token."""
        for b, x in enumerate(signals):
            require_finite(masked_rows(x, self.masks[b]), method=self.method, stage=self.stage, layer=layer, what=what)

    def layer_kwargs(self, b: int, i: int, hidden: torch.Tensor | None = None) -> dict:
        """Keyword arguments to call decoder layer i (or its attention) on batch b: mask, positions, rotary."""
        h = self.hidden[b] if hidden is None else hidden
        return self.adapter.layer_kwargs(h, self.masks[b], i)

    @torch.no_grad()
    def run_layer(
        self,
        i: int,
        inputs: list[torch.Tensor] | None = None,
        fn: Callable[[nn.Module, torch.Tensor, dict], torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Outputs of layer i on every batch (inputs default to `self.hidden`); `fn(layer, h, kwargs)` replaces the
        plain call."""
        inputs = self.hidden if inputs is None else inputs
        outs = []
        with self.on_device(i) as layer:
            for b, h in enumerate(inputs):
                kw = self.layer_kwargs(b, i, h)
                y = fn(layer, h, kw) if fn is not None else layer(h, **kw)
                outs.append(y[0] if isinstance(y, tuple) else y)
        return outs

    def advance(self, outputs: list[torch.Tensor]) -> None:
        """Make `outputs` the inputs of the next layer."""
        if len(outputs) != len(self.hidden):
            raise ValueError(f"{len(outputs)} outputs for {len(self.hidden)} calibration batches")
        self.require_finite(outputs, "the decoder layer's output", layer=self.layer)
        self.hidden = outputs
        self.layer += 1
