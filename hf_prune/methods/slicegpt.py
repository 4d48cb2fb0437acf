"""SliceGPT (constant width) and Dynamic Slicing (a width per layer): delete rows and columns of a rotated model.

SliceGPT (Ashkboos et al., ICLR 2024): put the model in rotation-invariant form (hf_prune.rotation), then, slot by
slot on calibration signals computed through the ALREADY-SLICED prefix, take the PCA of the residual-stream signal
X (covariance C = sum_tokens x^T x in float64, padding masked, damped by 1% of its mean diagonal), rotate the slot by
the eigenvectors Q (descending eigenvalues) and keep its first d dims. Dynamic Slicing (Dumitru et al., Findings of
EMNLP 2024) picks d per layer from the layer redundancy LR_i = mean_t cos(h_i, h_{i+1}) of the dense model:

    LRn_i = (LR_i - min LR) / (max LR - min LR)              1 = most redundant
    FS_i  = SB + (SP - SB) * LRn_i / mean(LRn)               slice fraction of layer i; mean(FS) = SP
    d_i   = floor(D * (1 - FS_i) / round_to) * round_to      (FS_i capped at max_slicing; the factor is re-solved so
                                                              the mean stays SP when a cap binds)

`plan()` rotates the model in place (weights change, the function computed does not) and returns a PrunePlan whose
`residual_widths["residual_dims"]` lists the 2L + 1 slot widths; `hf_prune.apply(model, plan)` then
cuts the shapes. Run `plan` on every rank with the same batches in multi-process jobs: the rotation is part of it.

Where this implementation differs from the reference code (knobs, defaults say which):
- `basis="sublayer"`: SliceGPT's two PCAs per layer (attention input, MLP input) and two shortcut matrices per layer.
  `"layer"`: one PCA per layer (of its attention and MLP inputs together): the attention residual add stays a plain
  add, one shortcut matrix per layer. `"global"`: one PCA of all slots for the whole model: no shortcut matrices at
  all, so a sliced model is a strictly smaller dense computation (faster; quality is the trade-off).
- `token_weighting="norm"`: the covariance is taken over unit-normalised token vectors, sum_t x_t^T x_t / ||x_t||^2.
  Attention-sink tokens carry residual norms ~100x the median (SmolLM2: 25,000 vs 150 from layer 15 on), so the
  raw covariance (SliceGPT, "none") is >99% one token per sequence and its basis serves those tokens only; the
  normalised one minimises the relative error that the scale-free norms pass on to every reader.
- `head="auto"` keeps a tied head tied: the final norm's scale becomes a d_L x d_0 projection into the embedding's
  basis instead of an untied V x D head (SliceGPT unties: +V*D parameters, which on a small model with a large
  vocabulary such as SmolLM2 makes a "25% sliced" model larger than the dense one). `embedding_basis="joint"` then
  takes the embedding's PCA over the embeddings AND the head's input (the tied matrix serves both); "embedding" =
  SliceGPT.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..arch import unwrap_model
from ..calibration import LayerwiseRunner, covariance, mean_cosine
from ..checks import (
    check_batches,
    check_choice,
    check_fraction,
    check_int_option,
    require_finite,
    require_finite_weights,
)
from ..modeling.modeling_hf_prune_sliced import carry
from ..plan import PrunePlan, architecture_of
from ..rotation import make_rotation_invariant, num_slots, rotate, shortcuts, slot_readers, slot_widths, slot_writers
from . import Batch, PruningMethod, register

__all__ = ["DynamicSlicing", "SliceGPT", "dynamic_slice_fractions", "pca", "predicted_sizes", "widths_from_fractions"]

BASES = ("auto", "sublayer", "layer", "global")
HEADS = ("auto", "tied", "untied")
EMBEDDING_BASES = ("joint", "embedding")
TOKEN_WEIGHTINGS = ("norm", "none")


def predicted_sizes(model: nn.Module, dims: list[int]) -> dict[str, int]:
    """Parameter counts of `model` (rotation-invariant, unsliced) after slicing to slot widths `dims`, for each basis:
    every reader and writer of a slot loses its cut rows/columns; the sublayer basis adds a d_src x d_dst shortcut
    matrix at every residual add, the layer basis at every MLP add, the global basis none. (A tied head's projection
    reads one slot and writes another; its saving is counted as two cuts, a slight overestimate.)"""
    D = model.config.hidden_size
    dense = sum(p.numel() for p in model.parameters())
    saved = 0
    for s, d in enumerate(dims):
        cut = D - d
        if cut <= 0:
            continue
        saved += sum(cut * m.weight.shape[0] for m in slot_readers(model, s))  # (out, in) / embedding (V, D)
        saved += sum(cut * (m.weight.shape[1] + (m.bias is not None)) for m in slot_writers(model, s))
    pairs = [(src, dst) for _, _, src, dst in shortcuts(model)]
    sublayer = sum(dims[a] * dims[b] for a, b in pairs)
    layer = sum(dims[a] * dims[b] for a, b in pairs if a % 2 == 1)
    return {"dense": dense, "global": dense - saved, "layer": dense - saved + layer,
            "sublayer": dense - saved + sublayer}


def pca(C: torch.Tensor, damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of C + damping * mean(diag C) * I, eigenvalues descending: (eigenvalues, Q)."""
    C = C.to(torch.float64).clone()
    C.diagonal().add_(damping * C.diagonal().mean())
    evals, evecs = torch.linalg.eigh(C)
    order = torch.argsort(evals, descending=True)
    return evals[order], evecs[:, order]


def widths_from_fractions(fractions: list[float], hidden: int, round_to: int) -> list[int]:
    """d_i = floor(D (1 - FS_i) / round_to) * round_to, at least round_to (at least 1)."""
    step = max(1, int(round_to))
    out = []
    for f in fractions:
        d = int(math.floor(hidden * (1.0 - f) / step + 1e-9)) * step
        out.append(min(hidden, max(step, d, 1)))
    return out


def dynamic_slice_fractions(
    redundancy: list[float], target: float, base: float, max_fraction: float = 0.9
) -> list[float]:
    """Per-layer slice fractions from layer redundancies (Dynamic Slicing).

    FS_i = min(max_fraction, SB + k * LRn_i) with LRn the redundancies min-max normalised to [0, 1]; k is
    (SP - SB) / mean(LRn) (the paper's formula) unless a cap binds, in which case k is re-solved (bisection) so the
    mean stays SP. Equal redundancies give the constant schedule.
    """
    if not 0.0 <= base <= target < 1.0:
        raise ValueError(f"need 0 <= base_slicing ({base}) <= slicing ({target}) < 1")
    if not target <= max_fraction < 1.0:
        raise ValueError(f"max_slicing={max_fraction} must lie in [slicing={target}, 1)")
    lr = torch.tensor(redundancy, dtype=torch.float64)
    span = (lr.max() - lr.min()).item()
    if lr.numel() == 0:
        return []
    if span <= 1e-12 or target == base:
        return [float(target)] * lr.numel()
    lrn = (lr - lr.min()) / span

    def fs(k: float) -> torch.Tensor:
        return (base + k * lrn).clamp(max=max_fraction)

    k = (target - base) / lrn.mean().item()
    if fs(k).mean().item() < target - 1e-9:  # a cap binds: find k with mean(fs(k)) = target
        reachable = torch.where(lrn > 0, torch.full_like(lrn, max_fraction), torch.full_like(lrn, base)).mean().item()
        if reachable < target - 1e-9:
            raise ValueError(
                f"mean slicing {target} is out of reach: with base_slicing={base} on the least redundant layers and "
                f"max_slicing={max_fraction} the mean is at most {reachable:.4f}; raise max_slicing or base_slicing"
            )
        lo, hi = k, k
        while fs(hi).mean().item() < target - 1e-9:
            hi *= 2.0
        for _ in range(200):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if fs(mid).mean().item() < target else (lo, mid)
        k = hi
    return [float(x) for x in fs(k)]


def _rotate_signals(xs: list[torch.Tensor], Q: torch.Tensor) -> list[torch.Tensor]:
    return [x @ Q.to(device=x.device, dtype=x.dtype) for x in xs]


def _keep_leading(xs: list[torch.Tensor], d: int) -> list[torch.Tensor]:
    """Simulate slicing on a full-width signal: zero every dim from d on (in place)."""
    for x in xs:
        x[..., d:] = 0
    return xs


def _normalised(C: torch.Tensor) -> torch.Tensor:
    return C / C.trace().clamp_min(1e-300)


@register("slicegpt")
@dataclass
class SliceGPT(PruningMethod):
    """SliceGPT: rotate by per-slot PCA and delete the trailing rows/columns; one width for every layer."""

    #: `plan()` rotates the model in place: a caller must run it on every rank (not broadcast the plan alone) and
    #: apply the plan with `hf_prune.surgery.apply_slicing`.
    runs_on_every_rank = True
    _stage = None  # the stage plan() is running (named in errors)

    slicing: float = field(
        default=0.25, metadata={"help": "Fraction of the residual-stream width D to delete (SP), in [0, 1)."}
    )
    round_to: int = field(
        default=8, metadata={"help": "Round every width DOWN to a multiple of this (1 = no rounding)."}
    )
    basis: str = field(
        default="auto",
        metadata={
            "help": "PCA granularity: 'sublayer' (SliceGPT: attention and MLP inputs, 2 shortcut matrices per "
            "layer), 'layer' (one per layer, 1 shortcut), 'global' (one for the model, no shortcut matrices), "
            "'auto' (sublayer when the sliced model, shortcut matrices included, is predicted at most auto_max_size "
            "of the dense model; else global, so slicing never grows the model)."
        },
    )
    auto_max_size: float = field(
        default=0.9,
        metadata={"help": "basis='auto': largest predicted size (fraction of the dense parameter count) at which "
                  "the sublayer basis and its shortcut matrices are used."},
    )
    head: str = field(
        default="auto",
        metadata={
            "help": "'auto' keeps the model's tying; 'tied' keeps a tied head tied (final-norm scale as a small "
            "projection); 'untied' unties it as SliceGPT does (+vocab x hidden parameters)."
        },
    )
    embedding_basis: str = field(
        default="joint",
        metadata={
            "help": "Tied head only: PCA for the shared embedding/head basis over the embeddings and the head "
            "input ('joint') or the embeddings alone ('embedding', SliceGPT)."
        },
    )
    token_weighting: str = field(
        default="norm",
        metadata={
            "help": "'norm': every token's signal is divided by its norm before the covariance, so each token "
            "counts once (the relative error the scale-free norms see; keeps attention-sink tokens with 100x "
            "norms from choosing the basis); 'none': raw signals (SliceGPT)."
        },
    )
    damping: float = field(
        default=0.01, metadata={"help": "Covariance damping as a fraction of its mean diagonal (SliceGPT: 0.01)."}
    )
    device: str | None = field(
        default=None, metadata={"help": "Device for the layer being processed (default: the model's device)."}
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})

    def __post_init__(self) -> None:
        self.slicing = check_fraction("slicing", self.slicing, lo=0.0, hi=1.0)
        self.round_to = check_int_option("round_to", self.round_to, minimum=1)
        self.auto_max_size = check_fraction("auto_max_size", self.auto_max_size, lo=0.0, hi=1.0, lo_inclusive=False,
                                            hi_inclusive=True)
        for name, value, valid in (
            ("basis", self.basis, BASES),
            ("head", self.head, HEADS),
            ("embedding_basis", self.embedding_basis, EMBEDDING_BASES),
            ("token_weighting", self.token_weighting, TOKEN_WEIGHTINGS),
        ):
            check_choice(name, value, valid)
        self.damping = check_fraction("damping", self.damping, lo=0.0, hi=float("inf"))

    # ----- schedule -------------------------------------------------------------------------------------------------
    @property
    def needs_redundancy(self) -> bool:
        return False

    def slice_fractions(self, redundancy: list[float] | None, num_layers: int) -> list[float]:
        """Slice fraction of every layer; constant for SliceGPT."""
        return [float(self.slicing)] * num_layers

    def residual_dims(self, fractions: list[float], hidden: int) -> list[int]:
        """2L + 1 slot widths: layer i's attention and MLP inputs get d_i; the embedding (slot 0, also layer 0's
        attention input) and the head input (slot 2L) get the target width (1 - slicing) * D, so the vocabulary
        matrices cost the same whatever the per-layer schedule."""
        d = widths_from_fractions(fractions, hidden, self.round_to)
        target = widths_from_fractions([self.slicing], hidden, self.round_to)[0]
        dims = []
        for w in d:
            dims += [w, w]
        dims[0] = target
        return dims + [target]

    # ----- the method -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def plan(self, model: nn.Module, batches: Iterable[Batch], stage: int = 0) -> PrunePlan:
        """Rotate `model` in place (rotation-invariant form, then per-slot PCA) and return the slicing plan.

        The batches and the weights are checked before anything is rotated; a NaN/inf activation, covariance or
        eigenvalue met later raises NonFiniteError naming the layer (the rotation done so far leaves the function
        unchanged)."""
        start = time.perf_counter()
        tie = {"auto": None, "tied": True, "untied": False}[self.head]
        batches = check_batches(batches, model, method=self.name)
        self._stage = stage
        require_finite_weights(model, method=self.name, stage=stage)
        model = make_rotation_invariant(unwrap_model(model), tie_head=tie)
        was_training = model.training
        model.eval()
        hidden = model.config.hidden_size
        if any(w != hidden for w in slot_widths(model)):
            raise ValueError(
                f"the model is already sliced (slot widths {sorted(set(slot_widths(model)))}, hidden_size={hidden}); "
                "slice the dense model once to the final target instead"
            )
        runner = LayerwiseRunner(model, batches, device=self.device, progress=self.progress, method=self.name,
                                 stage=stage)
        n_layers = runner.num_layers
        tied = bool(model.config.head_projection)
        joint = tied and self.embedding_basis == "joint"
        stats = {}
        global_possible = self.basis in ("global", "auto")
        if self.needs_redundancy or global_possible or joint:
            stats = self._dense_statistics(model, runner, need_slots=global_possible, need_head=joint)
        fractions = self.slice_fractions(stats.get("redundancy"), n_layers)
        dims = self.residual_dims(fractions, hidden)
        sizes = predicted_sizes(model, dims)
        self._basis = self.basis
        if self.basis == "auto":
            self._basis = "sublayer" if sizes["sublayer"] <= self.auto_max_size * sizes["dense"] else "global"
        if self._basis == "global":
            C = stats["slots"] + (stats["head"] if joint else 0)
            evals, Q = pca(C, self.damping)
            rotate(model, Q, device=runner.device)
            kept = [self._kept(evals, d, C) for d in dims]
        else:
            kept = self._sequential(model, runner, dims, stats.get("head"))
        model.train(was_training)
        seconds = time.perf_counter() - start
        return PrunePlan(
            architecture=architecture_of(model),
            residual_widths={
                "residual_dims": dims,
                "layer_slicing": fractions,
                "basis": self._basis,
                "hidden_size": hidden,
            },
            provenance={
                "method": self.name,
                "config": self.config_dict(),
                "average_slicing": 1.0 - sum(dims[1:-1:2]) / (n_layers * hidden),
                "layer_redundancy": stats.get("redundancy"),
                "kept_variance": kept,
                "predicted_parameters": sizes,
                "head": "tied" if tied else "untied",
                "calibration_tokens": int(sum(int(m.sum()) if m is not None else h.shape[0] * h.shape[1]
                                              for h, m in zip(runner.hidden, runner.masks))),
                "seconds": seconds,
            },
        )

    def _cov(self, signals: list[torch.Tensor], masks: list, layer: int | None = None) -> torch.Tensor:
        C = covariance(signals, masks, normalize_tokens=self.token_weighting == "norm")
        require_finite(C, method=self.name, stage=self._stage, layer=layer, what="the residual-stream covariance")
        return C

    @staticmethod
    def _kept(evals: torch.Tensor, d: int, C: torch.Tensor) -> float:
        """Fraction of the (undamped) signal energy in the first d principal directions."""
        total = C.trace().item()
        shift = (evals.sum().item() - total) / evals.numel()
        return float(((evals[:d] - shift).sum() / max(total, 1e-300)).item())

    def _dense_statistics(self, model, runner: LayerwiseRunner, need_slots: bool, need_head: bool) -> dict:
        """One pass through the dense (rotation-invariant, unrotated) model: layer redundancies LR_i, the summed
        trace-normalised covariances of all slots (global basis) and the covariance of the head's input."""
        masks = runner.masks
        h = list(runner.hidden)
        redundancy, slots = [], None

        def add(C):
            nonlocal slots
            slots = _normalised(C) if slots is None else slots + _normalised(C)

        for i in runner.layer_indices("dense statistics"):
            with runner.on_device(i) as layer:
                hm, ho = [], []
                for b, x in enumerate(h):
                    u = layer.attention_update(x, **runner.layer_kwargs(b, i, x))
                    m = carry(x, layer.attn_shortcut, u.shape[-1]) + u
                    v = layer.mlp_update(m)
                    hm.append(m)
                    ho.append(carry(m, layer.mlp_shortcut, v.shape[-1]) + v)
            runner.require_finite(ho, "the decoder layer's output", layer=i)
            redundancy.append(mean_cosine(h, ho, masks))
            require_finite(redundancy[-1], method=self.name, stage=self._stage, layer=i, what="the layer redundancy")
            if need_slots:
                add(self._cov(h, masks, i))
                add(self._cov(hm, masks, i))
            h = ho
        out: dict = {"redundancy": redundancy}
        if need_slots:
            add(self._cov(h, masks))
            out["slots"] = slots
        if need_head:
            norm = model.model.norm
            with runner.moved(norm):
                out["head"] = _normalised(self._cov([norm(x) for x in h], masks))
        return out

    def _sequential(self, model, runner: LayerwiseRunner, dims: list[int], head_cov: torch.Tensor | None) -> list:
        """Rotate slot by slot; every signal is computed through the already-rotated-and-sliced prefix (slicing is
        simulated at full width by zeroing the dropped dims, which the sliced model computes exactly)."""
        masks, dev, damp = runner.masks, runner.device, self.damping
        n_layers = runner.num_layers
        kept: list = [None] * num_slots(model)

        def pca_rotate(C: torch.Tensor, slots: list[int]) -> torch.Tensor:
            evals, Q = pca(C, damp)
            require_finite(evals, method=self.name, stage=self._stage, layer=min(slots[0] // 2, n_layers - 1),
                           what=f"the covariance eigenvalues of residual slots {slots}")
            rotate(model, Q, slots, device=dev)
            for s in slots:
                kept[s] = self._kept(evals, dims[s], C)
            return Q

        h = list(runner.hidden)  # slot 0 signal, original basis
        if self._basis == "sublayer":
            C = self._cov(h, masks)
            Q = pca_rotate(C if head_cov is None else _normalised(C) + head_cov, [0])
            h = _keep_leading(_rotate_signals(h, Q), dims[0])
        for i in runner.layer_indices("rotate + slice"):
            with runner.on_device(i) as layer:
                kw = [runner.layer_kwargs(b, i, x) for b, x in enumerate(h)]
                if self._basis == "layer":  # one basis for slots 2i and 2i + 1, from both signals (input unsliced)
                    hm = [x + layer.attention_update(x, **k) for x, k in zip(h, kw)]
                    C = _normalised(self._cov(h, masks)) + _normalised(self._cov(hm, masks))
                    if i == 0 and head_cov is not None:
                        C = C + head_cov
                    Q = pca_rotate(C, [2 * i, 2 * i + 1])
                    h = _keep_leading(_rotate_signals(h, Q), dims[2 * i])
                hm = []
                for x, k in zip(h, kw):
                    u = layer.attention_update(x, **k)
                    hm.append(carry(x, layer.attn_shortcut, u.shape[-1]) + u)
                runner.require_finite(hm, "the attention sublayer's output", layer=i)
                if self._basis == "sublayer":
                    Q = pca_rotate(self._cov(hm, masks), [2 * i + 1])
                    hm = _rotate_signals(hm, Q)
                hm = _keep_leading(hm, dims[2 * i + 1])
                ho = []
                for x in hm:
                    v = layer.mlp_update(x)
                    ho.append(carry(x, layer.mlp_shortcut, v.shape[-1]) + v)
                runner.require_finite(ho, "the decoder layer's output", layer=i)
            last = i == n_layers - 1
            if self._basis == "sublayer" or last:
                Q = pca_rotate(self._cov(ho, masks), [2 * i + 2])
                ho = _keep_leading(_rotate_signals(ho, Q), dims[2 * i + 2])
            h = ho
        return kept


@register("dynamic_slicing")
@dataclass
class DynamicSlicing(SliceGPT):
    """Dynamic Slicing: SliceGPT with a slice fraction per layer from its redundancy (more redundant: sliced more)."""

    base_slicing: float = field(
        default=0.1,
        metadata={"help": "Base slice fraction SB given to the least redundant layer; SB = slicing is constant."},
    )
    max_slicing: float = field(
        default=0.9, metadata={"help": "Cap on any layer's slice fraction (the mean is kept at `slicing`)."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.base_slicing = check_fraction("base_slicing", self.base_slicing, lo=0.0, hi=1.0)
        self.max_slicing = check_fraction("max_slicing", self.max_slicing, lo=0.0, hi=1.0)
        if not 0.0 <= self.base_slicing <= self.slicing:
            raise ValueError(f"base_slicing={self.base_slicing} must lie in [0, slicing={self.slicing}]")
        if not self.slicing <= self.max_slicing < 1.0:
            raise ValueError(f"max_slicing={self.max_slicing} must lie in [slicing={self.slicing}, 1)")

    @property
    def needs_redundancy(self) -> bool:
        return True

    def slice_fractions(self, redundancy: list[float] | None, num_layers: int) -> list[float]:
        if redundancy is None or len(redundancy) != num_layers:
            raise ValueError(f"dynamic slicing needs {num_layers} layer redundancies, got {redundancy!r}")
        return dynamic_slice_fractions(redundancy, self.slicing, self.base_slicing, self.max_slicing)
