"""Layer-by-layer calibration passes: the one runner shared by every method that looks inside the decoder.

The pattern of SliceGPT / SparseGPT / llm-compressor's sequential pipeline: the residual stream entering layer 0 is
captured for every calibration batch, then each decoder layer is applied to all batches before the next layer runs
(layer-major). Only the layer being run is moved to the compute device; the other layers stay where they are (CPU);
the activations of every batch are kept on the device, so a model larger than the accelerator can still be scored.
A method sees, for every layer i, the streams entering and leaving it (h_i, h_{i+1}), and may change the layer before
its outputs become the next layer's inputs.

Notation (../METHODS.md): h_i is the residual stream entering decoder layer i, h_0 the token embeddings, h_L the
stream after the last layer (before the final norm).

    runner = LayerwiseRunner(model, batches)          # embeds every batch: runner.hidden[b] is h_0 of batch b
    runner.run(on_layer=lambda i, h_in, h_out, masks: ...)      # h_i and h_{i+1} of every batch, layer by layer

or, to change a layer before its outputs move on:

    for i in runner.layer_indices():
        with runner.on_device(i) as layer:
            outs = [layer(h, **runner.layer_kwargs(b, i))[0] for b, h in enumerate(runner.hidden)]
        runner.advance(outs)                          # the outputs enter layer i + 1

Streaming (`streamed_model(path)`): a model built on the meta device whose decoder layers and embeddings stay in
their safetensors checkpoint; the runner reads each one when it runs (`CheckpointWeights`) and drops it afterwards,
so scoring holds one layer's weights plus the activations, whatever the depth (scoring only: surgery, generation and
the LM head need the real model).

`run(skip={j})` treats layer j as the identity; `branch(layer, hidden)` restarts from cached streams (IteRABRe's
prefix cache). Every embedding and layer output is checked: NaN/inf at a real token raises NonFiniteError naming the
method, stage and layer. Padding is kept out of every statistic through `runner.token_mask(b)` (helpers
`masked_rows`, `covariance`, `mean_cosine`, `token_cosines`).
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .arch import get_adapter, unwrap_model
from .checks import require_finite
from .runtime import eval_mode, model_device, progress

__all__ = [
    "Batch",
    "CheckpointWeights",
    "LayerHook",
    "LayerwiseRunner",
    "collect_hidden_states",
    "covariance",
    "masked_rows",
    "mean_cosine",
    "streamed_model",
    "token_cosines",
]

Batch = Mapping[str, torch.Tensor]
#: on_layer(i, h_in, h_out, attention_masks): lists over batches of the streams entering and leaving layer i.
LayerHook = Callable[[int, Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence["torch.Tensor | None"]], None]


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


# --------------------------------------------------------------------------------------------------------------------
# Weights streamed from a safetensors checkpoint
# --------------------------------------------------------------------------------------------------------------------


class CheckpointWeights:
    """The tensors of a safetensors checkpoint (one `model.safetensors`, an index of shards, or a `.safetensors`
    file), read on demand: `load(module, prefix)` gives a module the checkpoint's tensors `{prefix}.{name}`,
    `release(module)` puts it back on the meta device. Each load opens the file and closes it again, so no mapping of
    the checkpoint stays resident between loads."""

    def __init__(self, path: str | Path):
        p = Path(path)
        index, single = p / "model.safetensors.index.json", p / "model.safetensors"
        if p.is_file() and p.suffix == ".safetensors":
            files = [p]
        elif p.is_dir() and index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: p / v for k, v in weight_map.items()}
            self.path = p
            return
        elif p.is_dir() and single.is_file():
            files = [single]
        else:
            raise FileNotFoundError(f"{str(path)!r} is neither a .safetensors file nor a folder holding "
                                    "model.safetensors or model.safetensors.index.json")
        from safetensors import safe_open

        self.path = p
        self.files = {}
        for f in files:
            with safe_open(str(f), "pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), f))

    def load(self, module: nn.Module, prefix: str, device: torch.device | str) -> None:
        """Replace every parameter and persistent buffer of `module` by the checkpoint's `{prefix}.{name}`, on
        `device` in the dtype the module declares (no autograd)."""
        from safetensors import safe_open

        wanted = [(n, t) for n, t in module.named_parameters()]
        for n, t in module.named_buffers():
            if f"{prefix}.{n}" in self.files:
                wanted.append((n, t))
            elif t.device != torch.device(device):  # computed buffers (embedding scale) follow the weights
                owner_name, _, leaf = n.rpartition(".")
                module.get_submodule(owner_name)._buffers[leaf] = t.to(device)
        missing = [f"{prefix}.{n}" for n, _ in wanted if f"{prefix}.{n}" not in self.files]
        if missing:
            sample = sorted(self.files)[:4]
            raise KeyError(f"the checkpoint at {str(self.path)!r} has no tensor {missing[0]!r} "
                           f"({len(missing)} missing); its keys look like {sample}")
        by_file: dict[Path, list[tuple[str, torch.Tensor]]] = {}
        for n, t in wanted:
            by_file.setdefault(self.files[f"{prefix}.{n}"], []).append((n, t))
        for file, entries in by_file.items():
            with safe_open(str(file), "pt", device="cpu") as handle:
                for name, old in entries:
                    value = handle.get_tensor(f"{prefix}.{name}").to(device=device, dtype=old.dtype)
                    if tuple(value.shape) != tuple(old.shape):
                        raise ValueError(f"checkpoint tensor {prefix}.{name} has shape {tuple(value.shape)}; the "
                                         f"model expects {tuple(old.shape)}")
                    owner_name, _, leaf = name.rpartition(".")
                    owner = module.get_submodule(owner_name)
                    if leaf in owner._parameters:
                        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
                    else:
                        owner._buffers[leaf] = value

    def release(self, module: nn.Module) -> None:
        """Drop the module's parameters and the buffers the checkpoint holds (back to the meta device); buffers
        computed from the config (rotary frequencies, embedding scales) are kept."""
        for owner in module.modules():
            for leaf, t in list(owner._parameters.items()):
                if t is not None:
                    owner._parameters[leaf] = nn.Parameter(torch.empty_like(t, device="meta"), requires_grad=False)
            for leaf, t in list(owner._buffers.items()):
                if t is not None and leaf not in owner._non_persistent_buffers_set:
                    owner._buffers[leaf] = torch.empty_like(t, device="meta")


def _materialise_buffers(model: nn.Module) -> None:
    """Meta buffers (rotary frequencies, embedding scales) become real CPU tensors computed by the model's own
    `_init_weights`; parameters stay on the meta device (initialising a meta tensor is a no-op)."""
    init = getattr(model, "_init_weights", None)
    for module in model.modules():
        metas = [n for n, b in module.named_buffers(recurse=False) if b is not None and b.device.type == "meta"]
        if not metas:
            continue
        for n in metas:
            module._buffers[n] = torch.empty_like(module._buffers[n], device="cpu")
        if init is None:
            raise RuntimeError(f"{type(model).__name__} has no _init_weights to compute its buffers {metas}")
        init(module)


def streamed_model(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """The causal LM saved at `path` (a local folder with config.json and safetensors weights) built on the meta
    device for layer-by-layer scoring: decoder layers and token embeddings are read from the checkpoint one at a time
    by `LayerwiseRunner` and dropped after use; the final norm is loaded; the LM head stays unloaded.

    Peak memory is one layer's weights plus the calibration activations, independent of depth. The model serves
    layer-by-layer scorers only (ShortGPT, the angular block, IteRABRe's cosine score): `hf_prune.apply`,
    `generate` or anything that needs the LM head needs the model loaded normally. The checkpoint's layer i must be
    the model's layer i."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    _materialise_buffers(model)
    weights = CheckpointWeights(path)
    ad = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    norm = ad.final_norm
    weights.load(norm, names[id(norm)], "cpu")
    model.hf_prune_weights = weights
    return model.eval()


class LayerwiseRunner:
    """Calibration activations of a model, advanced one decoder layer at a time.

    Args:
        model: a causal LM of a supported family (hf_prune.arch); wrappers are unwrapped.
        batches: dicts with `input_ids` (b, t) and optionally `attention_mask` (b, t) (1 = real token).
        device: where each layer runs and the activations live (default: `model_device(model)`, the device of the
            input embeddings).
        progress: show a progress bar in `run` and `layer_indices` (hf_prune.runtime.progress).
        method: named in errors (NonFiniteError when an embedding or a layer output holds NaN/inf at a real token).
        stage: the method's stage, named in errors.

    Attributes:
        hidden: per batch, the stream (batch, tokens, hidden) entering decoder layer `layer`.
        masks: per batch, the (batch, tokens) 0/1 padding mask, or None (no padding).
        layer: index of the decoder layer `hidden` enters (num_layers once every layer has run).

    The embedding and the layers run without autograd; wrap the pass in `eval_mode(model)` to switch dropout off.
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
        self.weights: CheckpointWeights | None = getattr(self.model, "hf_prune_weights", None)
        home = model_device(self.model)
        if device is None:
            device = "cpu" if home.type == "meta" else home
        self.device = torch.device(device)
        self._names = {id(m): n for n, m in self.model.named_modules()} if self.weights is not None else {}
        self._plain: dict[tuple[int, int], bool] = {}
        self.progress = progress
        self.method, self.stage = method, stage
        self.layer = 0  # the decoder layer `hidden` enters
        self.masks: list[torch.Tensor | None] = []
        self.hidden: list[torch.Tensor] = self._capture(batches)
        if not self.hidden:
            raise ValueError(f"{method}: no calibration batches were given; pass at least one batch with input_ids")
        if self.num_tokens == 0:
            raise ValueError(f"{method}: the calibration batches hold no real token (every attention_mask entry is 0)")
        self.require_finite(self.hidden, "the token embeddings (h_0)", layer=0)

    @torch.no_grad()
    def _capture(self, batches: Iterable[Batch]) -> list[torch.Tensor]:
        """The hidden states entering layer 0 (the family's embedding, scaling included)."""
        out = []
        with self.moved(self.adapter.embed_tokens):
            for n, batch in enumerate(batches):
                if "input_ids" not in batch:
                    raise KeyError(f"calibration batch {n} has no 'input_ids'; its keys are {sorted(batch)}")
                ids = batch["input_ids"].to(self.device)
                if ids.dim() != 2:
                    raise ValueError(f"calibration batch {n}: input_ids must be (batch, tokens), got shape "
                                     f"{tuple(ids.shape)}")
                mask = batch.get("attention_mask")
                if mask is not None:
                    mask = mask.to(self.device)
                    if mask.shape != ids.shape:
                        raise ValueError(
                            f"calibration batch {n}: attention_mask shape {tuple(mask.shape)} differs from input_ids "
                            f"shape {tuple(ids.shape)}"
                        )
                    if bool(mask.all()):
                        mask = None  # no padding: skip the mask (same result, cheaper attention)
                self.masks.append(mask)
                out.append(self.adapter.embed(ids))
        return out

    @contextmanager
    def moved(self, module: nn.Module) -> Iterator[nn.Module]:
        """`module` moved to the runner's device for the duration of the block (moved back afterwards); a streamed
        module (weights on the meta device, `streamed_model`) is read from its checkpoint and dropped afterwards."""
        p = next(iter(module.parameters()), None)
        home = p.device if p is not None else self.device
        if home.type == "meta":
            if self.weights is None:
                raise RuntimeError(f"{self.method}: {type(module).__name__} has its weights on the meta device and the "
                                   "model has no checkpoint to stream them from; load the model with its weights, "
                                   "or build it with hf_prune.calibration.streamed_model(path)")
            self.weights.load(module, self._names[id(module)], self.device)
            try:
                yield module
            finally:
                self.weights.release(module)
            return
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
        with self.moved(self.adapter.layers[i]) as layer:
            yield layer

    @property
    def num_layers(self) -> int:
        return self.adapter.num_layers

    def layer_indices(self, desc: str = "layers") -> Iterator[int]:
        """0..num_layers-1, with a progress bar when the runner shows progress."""
        return iter(progress(range(self.num_layers), desc=desc, enabled=self.progress, unit="layer"))

    def token_mask(self, b: int) -> torch.Tensor | None:
        return self.masks[b]

    @property
    def num_tokens(self) -> int:
        """Real (unpadded) calibration tokens over all batches."""
        return sum(int(m.sum()) if m is not None else h.shape[0] * h.shape[1] for h, m in zip(self.hidden, self.masks))

    def require_finite(self, signals: Sequence[torch.Tensor], what: str, layer: int | None) -> None:
        """NonFiniteError (naming the method, stage and layer) when a signal holds NaN/inf at a real token."""
        for b, x in enumerate(signals):
            require_finite(masked_rows(x, self.masks[b]), method=self.method, stage=self.stage, layer=layer, what=what)

    def layer_kwargs(self, b: int, i: int, hidden: torch.Tensor | None = None) -> dict:
        """Keyword arguments to call decoder layer i (or its attention) on batch b: mask, positions, rotary.

        An unpadded batch whose mask for layer i is the plain causal one gets `attention_mask=None` under SDPA
        attention, as the model's own forward does: SDPA then runs its `is_causal` kernel instead of adding a
        (batch, 1, t, t) float mask (~9% of a SmolLM2 layer at 1,024 tokens on the CPU; same outputs)."""
        h = self.hidden[b] if hidden is None else hidden
        kwargs = self.adapter.layer_kwargs(h, self.masks[b], i)
        if self.masks[b] is None and self._plain_causal(kwargs.get("attention_mask"), i):
            kwargs["attention_mask"] = None
        return kwargs

    def _plain_causal(self, mask: torch.Tensor | None, i: int) -> bool:
        """Whether layer i's additive mask is exactly causal (no window, no padding) and the model's attention is
        SDPA (eager attention needs the mask); decided once per layer and length."""
        if mask is None or getattr(self.model.config, "_attn_implementation", None) != "sdpa":
            return False
        t = mask.shape[-1]
        key = (i, t)
        if key not in self._plain:
            causal = torch.ones(t, t, dtype=torch.bool, device=mask.device).tril()
            self._plain[key] = bool(((mask[0, 0] == 0) == causal).all()) and mask.shape[-2] == t
        return self._plain[key]

    @torch.no_grad()
    def run_layer(
        self,
        i: int,
        inputs: Sequence[torch.Tensor] | None = None,
        fn: Callable[[nn.Module, torch.Tensor, dict], torch.Tensor] | None = None,
    ) -> list[torch.Tensor]:
        """Outputs of layer i on every batch (inputs default to `self.hidden`); `fn(layer, h, kwargs)` replaces the
        plain call. Runs without autograd."""
        inputs = self.hidden if inputs is None else inputs
        outs = []
        with self.on_device(i) as layer:
            for b, h in enumerate(inputs):
                kw = self.layer_kwargs(b, i, h)
                y = fn(layer, h, kw) if fn is not None else layer(h, **kw)
                outs.append(y[0] if isinstance(y, tuple) else y)
        return outs

    def advance(self, outputs: Sequence[torch.Tensor]) -> None:
        """Make `outputs` (the outputs of layer `self.layer`) the inputs of the next layer; NaN/inf at a real token
        raises NonFiniteError."""
        if len(outputs) != len(self.hidden):
            raise ValueError(f"{len(outputs)} outputs for {len(self.hidden)} calibration batches")
        self.require_finite(outputs, "the decoder layer's output", layer=self.layer)
        self.hidden = list(outputs)
        self.layer += 1

    def run(
        self,
        end: int | None = None,
        *,
        skip: Iterable[int] = (),
        on_layer: LayerHook | None = None,
        desc: str = "layers",
    ) -> "LayerwiseRunner":
        """Advance from layer `self.layer` through layer `end - 1` (default: the last), layer-major; returns self.

        Layers in `skip` act as the identity (their output is their input; `on_layer` is not called for them).
        `on_layer(i, h_in, h_out, masks)` is called after layer i has run on every batch and its outputs were
        checked for NaN/inf.
        """
        n = self.num_layers
        end = n if end is None else end
        if not 0 <= self.layer <= end <= n:
            raise ValueError(f"cannot run layers {self.layer}..{end - 1}: the model has layers 0..{n - 1}")
        skip = set(skip)
        for i in progress(range(self.layer, end), desc=desc, enabled=self.progress, unit="layer"):
            if i in skip:
                self.layer += 1
                continue
            h_in = self.hidden
            self.advance(self.run_layer(i))
            if on_layer is not None:
                on_layer(i, h_in, self.hidden, self.masks)
        return self

    def branch(self, layer: int, hidden: Sequence[torch.Tensor]) -> "LayerwiseRunner":
        """A runner over the same model and batches whose streams `hidden` enter layer `layer` (this one is left as
        it is): restart a pass from cached streams, e.g. `runner.branch(j + 1, h_j).run()` runs the model without
        layer j."""
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"layer={layer} is not valid; the model has layers 0..{self.num_layers - 1}")
        if len(hidden) != len(self.hidden):
            raise ValueError(f"{len(hidden)} streams for {len(self.hidden)} calibration batches")
        other = copy.copy(self)
        other.hidden, other.layer = list(hidden), layer
        return other


def collect_hidden_states(model: nn.Module, batches: Iterable[Batch], progress: bool = False) -> list[list[torch.Tensor]]:
    """[h_0, ..., h_L], each a list over batches, computed layer by layer without grad.

    Matches `model(..., output_hidden_states=True).hidden_states` for h_0..h_{L-1}; transformers applies the final
    norm to its last entry, this returns h_L before the final norm (the norm is not part of any layer).
    """
    model = unwrap_model(model)
    with eval_mode(model):
        runner = LayerwiseRunner(model, batches, progress=progress)
        collected = [list(runner.hidden)]
        runner.run(on_layer=lambda i, h_in, h_out, masks: collected.append(list(h_out)), desc="hidden states")
    return collected
