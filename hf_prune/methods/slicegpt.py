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
- `reader_weight=None` (reader-aware bases): a slot's basis is not always the PCA of its signal. Every candidate
  basis, the eigenvectors of C / tr C + w M / tr M for w in (0, 0.25, 1, 4) (M = sum W^T W over the linears that read
  the slot, norm scales folded in; the head's W is E F on a tied model), is scored by the share of the readers'
  signal energy it loses, tr(M R C R) / tr(M C) with R the dropped directions; PCA (w = 0, SliceGPT's; forced by
  `reader_weight=0`) is kept unless it loses more than `reader_margin` times the best, since small differences in
  that estimate do not predict perplexity. On SmolLM2 the PCA loses 0.1-0.4% per slot at 10% slicing and the
  choice changes little; on Gemma-3-270M, whose norm scales reach 1,600 and whose readers amplify directions with
  little signal, the PCA loses 25-50% of what the readers see per slot and the reader-aware basis 0.1-0.3%.
- `head="auto"` keeps a tied head tied: the final norm's scale becomes a d_L x d_0 projection into the embedding's
  basis instead of an untied V x D head (SliceGPT unties: +V*D parameters, which on a small model with a large
  vocabulary such as SmolLM2 makes a "25% sliced" model larger than the dense one). `embedding_basis="joint"` then
  takes the embedding's PCA over the embeddings AND the head's input (the tied matrix serves both); "embedding" =
  SliceGPT.

`basis="auto"` (the default) measures, global basis first: it holds out the last `holdout` share of the calibration
batches, builds the global basis on the rest (in place) and scores it by the next-token loss of the sliced model on
the held-out tokens (`masked_slicing`: the sliced function at full width, no copy). If that perplexity is within
`max_ppl_ratio` x dense, the global basis is rebuilt from every batch and kept. Only when it fails (or would be larger
than dense) are the shortcut bases ('layer', 'sublayer', and on a tied model the best of them with an untied head)
built on copies and scored the same way; the lowest held-out loss wins. Why not always the lowest held-out loss:
held-out calibration tokens come from the calibration text, and the per-layer bases fit that text at the cost of
other text. On SmolLM2 at 10-20% slicing the layer basis was 7-8% better than global on held-out Austen tokens and
worse on wiki (70.5 vs 48.7 at 10%); on Gemma-3-270M at 10% it was 2.7x better on held-out Austen (72.6 vs 196) and
2.3x worse on wiki (264 vs 117, both built on every batch) (benchmarks/results/slicing_reference_protocol.md).
The global basis pools every slot's statistics, has no shortcut matrices (the smallest and fastest model) and costs
about 2.3 passes over the calibration set (held-out dense loss, build, held-out score, rebuild). `plan.provenance["basis_choice"]` holds every candidate's
held-out perplexity, parameter count and seconds.
Every run also stops (SlicingDegradedError) when the sliced model's perplexity on calibration tokens exceeds
`max_ppl_ratio` times the dense model's (auto: on the held-out tokens; a fixed basis: on the last `holdout` share of
its own calibration batches), and refuses (SlicedLargerThanDenseError) a plan predicted larger than the dense model.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import get_adapter, unwrap_model
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
from ..runtime import parked
from ..rotation import (
    is_rotation_invariant,
    make_rotation_invariant,
    num_slots,
    rotate,
    shortcuts,
    slot_readers,
    slot_widths,
    slot_writers,
)
from ..losses import LOGITS_BUDGET_BYTES
from ..surgery.slicing import apply_slicing, masked_slicing, require_invariant
from . import Batch, PruningMethod, register

__all__ = [
    "DynamicSlicing",
    "SliceGPT",
    "SlicedLargerThanDenseError",
    "SlicingDegradedError",
    "calibration_loss",
    "dynamic_slice_fractions",
    "pca",
    "predicted_sizes",
    "reader_aware_basis",
    "reader_error",
    "split_holdout",
    "widths_from_fractions",
]

BASES = ("auto", "sublayer", "layer", "global")
HEADS = ("auto", "tied", "untied")
EMBEDDING_BASES = ("joint", "embedding")
PROTECT_EARLY = ("auto", "none")
TOKEN_WEIGHTINGS = ("norm", "none")


class SlicedLargerThanDenseError(ValueError):
    """A slicing plan whose model would hold more parameters than the dense one (refused before anything rotates)."""


class SlicingDegradedError(ValueError):
    """A slicing run whose sliced model's calibration perplexity exceeds `max_ppl_ratio` x the dense model's."""


def predicted_sizes(model: nn.Module, dims: list[int]) -> dict[str, int]:
    """Exact parameter counts of `model` (rotation-invariant, unsliced) after slicing to slot widths `dims`, for each
    basis: every reader of slot s keeps d_s input columns (the embedding d_0 columns), every writer d_s output rows
    (and bias entries); the sublayer basis adds a d_src x d_dst shortcut matrix at every residual add, the layer
    basis at every MLP add, the global basis none. `untied_head` is what untying a tied head adds (V x d_L for the
    head, minus the d_L x d_0 head projection); `dense` is the rotation-invariant model's count."""
    dense = sum(p.numel() for p in model.parameters())
    shapes: dict[int, list[int]] = {}  # id(tensor) -> [numel now, rows, cols]
    for s, d in enumerate(dims):
        for m in slot_readers(model, s):
            w = m.weight
            shapes.setdefault(id(w), [w.numel(), *w.shape])[2] = d
        for m in slot_writers(model, s):
            w = m.weight
            shapes.setdefault(id(w), [w.numel(), *w.shape])[1] = d
            if getattr(m, "bias", None) is not None:
                shapes.setdefault(id(m.bias), [m.bias.numel(), m.bias.numel(), 1])[1] = d
    sliced = dense - sum(n - r * c for n, r, c in shapes.values())
    pairs = [(src, dst) for _, _, src, dst in shortcuts(model)]
    sublayer = sum(dims[a] * dims[b] for a, b in pairs)
    layer = sum(dims[a] * dims[b] for a, b in pairs if a % 2 == 1)
    untie = 0
    if model.config.head_projection:
        untie = model.config.vocab_size * dims[-1] - dims[-1] * dims[0]
    return {"dense": dense, "global": sliced, "layer": sliced + layer, "sublayer": sliced + sublayer,
            "untied_head": untie}


def split_holdout(batches: list, fraction: float) -> tuple[list, list, bool]:
    """(build, held, held_out): the last max(1, round(fraction * n)) of n >= 2 batches are held out; a single batch
    of several rows is split by rows the same way; a single sequence cannot be split and is used for both
    (held_out False)."""
    n = len(batches)
    if n >= 2:
        k = min(n - 1, max(1, round(fraction * n)))
        return list(batches[: n - k]), list(batches[n - k :]), True
    rows = batches[0]["input_ids"].shape[0]
    if rows >= 2:
        k = min(rows - 1, max(1, round(fraction * rows)))
        part = lambda sl: {key: v[sl] for key, v in batches[0].items()}  # noqa: E731
        return [part(slice(0, rows - k))], [part(slice(rows - k, rows))], True
    return list(batches), list(batches), False


@torch.no_grad()
def calibration_loss(model: nn.Module, batches: list, device=None, chunk: int | None = None) -> tuple[float, int]:
    """(mean next-token NLL, number of predictions) of `model` on `batches`: every real token followed by a real
    token is a prediction. Runs layer by layer (LayerwiseRunner); the head sees `chunk` positions at a time (default:
    as many as fit `hf_prune.losses.LOGITS_BUDGET_BYTES` of fp32 logits, 64 at Gemma's 262k vocabulary), so memory
    does not grow with vocabulary x tokens. Gemma's final logit soft-capping is applied when configured."""
    model = unwrap_model(model)
    was_training = model.training
    model.eval()
    runner = LayerwiseRunner(model, batches, device=device, progress=False, method="slicing calibration check")
    runner.run(desc="calibration loss")
    ad = runner.adapter
    cap = getattr(model.config, "final_logit_softcapping", None)
    if chunk is None:
        chunk = max(1, LOGITS_BUDGET_BYTES // (4 * ad.lm_head.weight.shape[0]))
    total, count = 0.0, 0
    with runner.moved(ad.final_norm), runner.moved(ad.lm_head):
        for h, mask, batch in zip(runner.hidden, runner.masks, batches):
            ids = batch["input_ids"].to(h.device)
            valid = torch.ones_like(ids[:, 1:], dtype=torch.bool)
            if mask is not None:
                valid = mask[:, :-1].bool() & mask[:, 1:].bool()
            x, y = h[:, :-1][valid], ids[:, 1:][valid]
            for s in range(0, x.shape[0], chunk):
                logits = ad.lm_head(ad.final_norm(x[s : s + chunk])).float()
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                total += F.cross_entropy(logits, y[s : s + chunk], reduction="sum").item()
            count += int(y.numel())
    model.train(was_training)
    return (total / count if count else float("nan")), count


def _num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in unwrap_model(model).parameters())


def _fmt(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 10_000_000 else f"{n:,}"


def pca(C: torch.Tensor, damping: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigen-decomposition of C + damping * mean(diag C) * I, eigenvalues descending: (eigenvalues, Q)."""
    C = C.to(torch.float64).clone()
    C.diagonal().add_(damping * C.diagonal().mean())
    evals, evecs = torch.linalg.eigh(C)
    order = torch.argsort(evals, descending=True)
    return evals[order], evecs[:, order]


READER_WEIGHTS = (0.0, 0.25, 1.0, 4.0)


def reader_gram(modules: Iterable[nn.Module]) -> torch.Tensor | None:
    """sum_r W_r^T W_r (float64, D x D) over the linears that read a residual slot (embeddings skipped): how much
    each direction of the stream is amplified by what reads it."""
    total = None
    for m in modules:
        if isinstance(m, nn.Embedding) or not hasattr(m, "weight"):
            continue
        w = m.weight.detach()
        g = (w.T.float() @ w.float()).to(device="cpu", dtype=torch.float64)
        total = g if total is None else total + g
    return total


def embedding_gram(model: nn.Module, width: int, rows: int = 16384) -> torch.Tensor:
    """E^T E of the first `width` embedding columns (float64): the tied head's sensitivity to each direction. Summed
    over blocks of `rows` vocabulary rows, so no copy of the (sliced) embedding is made (262k x 640 at Gemma-3)."""
    e = model.model.embed_tokens.weight.detach()
    total = torch.zeros(width, width, dtype=torch.float64, device=e.device)
    for start in range(0, e.shape[0], rows):
        block = e[start : start + rows, :width].to(torch.float64)
        total += block.T @ block
    return total.cpu()


def head_gram(model: nn.Module, width0: int) -> torch.Tensor:
    """Sensitivity of the logits to each direction of the head's input slot: W^T W of an untied head, or
    F^T (E^T E) F of a tied one (F the final norm's projection into the embedding's first `width0` dims)."""
    if model.config.head_projection:
        f = model.model.norm.proj.weight.detach()[:width0].to(device="cpu", dtype=torch.float64)
        return f.T @ embedding_gram(model, width0) @ f
    return reader_gram([model.lm_head])


def reader_error(Q: torch.Tensor, d: int, C: torch.Tensor, M: torch.Tensor) -> float:
    """Share of the readers' signal energy tr(M C) that cutting to the first d columns of Q loses:
    tr(M R C R) / tr(M C), R the projection on the dropped columns."""
    R = Q[:, d:]
    lost = torch.trace((R.T @ M @ R) @ (R.T @ C @ R)).item()
    return lost / max(torch.trace(M @ C).item(), 1e-300)


def reader_aware_basis(
    C: torch.Tensor, M: torch.Tensor | None, d: int, damping: float, weights: Iterable[float], margin: float = 1.0
) -> tuple[torch.Tensor, dict]:
    """The orthogonal basis (columns by importance) whose first d dims lose the least of what the readers see.

    For every weight w in `weights`, the eigenvectors of C / tr C + w M / tr M (damped as `pca`; w = 0 is
    SliceGPT's PCA of the signal) are scored by `reader_error` on the undamped C; the best one is returned with the
    evidence, except that PCA (w = 0, when tried) is kept unless it loses more than `margin` times the best.
    PCA alone keeps the directions with the most signal; readers whose norm scales amplify a direction ~100x
    (Gemma-3's norms scale by up to 1,600) need that direction kept even when its signal is small."""
    Cn = _normalised(C)
    weights = [float(w) for w in weights]
    if M is None or not torch.isfinite(M).all() or M.trace() <= 0:
        weights = [0.0]
    Mn = _normalised(M) if weights != [0.0] else None
    rows, best, first = [], None, None
    for w in weights:
        _, Q = pca(Cn if w == 0 else Cn + w * Mn, damping)
        err = reader_error(Q, d, Cn, Mn) if Mn is not None else None
        rows.append({"reader_weight": w, "reader_error": err})
        candidate = (err if err is not None else 0.0, w, Q)
        first = first or candidate
        if best is None or (err is not None and err < best[0]):
            best = candidate
    if Mn is not None and first[1] == 0.0 and best[1] != 0.0 and first[0] <= margin * best[0]:
        best = first  # PCA, unless it loses more than `margin` times the best
    return best[2], {"reader_weight": best[1], "reader_error": best[0] if Mn is not None else None,
                     "pca_reader_error": rows[0]["reader_error"] if weights[0] == 0 else None}


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


def _summarise_evidence(evidence: list[dict]) -> dict | None:
    """The reader-aware basis choices of a run: how often each weight won, and the mean share of the readers' signal
    lost with the chosen bases vs with plain PCA (`reader_aware_basis`)."""
    if not evidence:
        return None
    chosen: dict[str, int] = {}
    for e in evidence:
        key = f"{e['reader_weight']:g}"
        chosen[key] = chosen.get(key, 0) + 1
    errs = [e["reader_error"] for e in evidence if e["reader_error"] is not None]
    pca_errs = [e["pca_reader_error"] for e in evidence if e["pca_reader_error"] is not None]
    return {
        "chosen_weights": chosen,
        "mean_reader_error": sum(errs) / len(errs) if errs else None,
        "mean_pca_reader_error": sum(pca_errs) / len(pca_errs) if pca_errs else None,
        "per_basis": evidence,
    }


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
    _shared_stats = None  # basis='auto': dense statistics shared by the candidates
    _record_rotations = False  # basis='auto': candidates keep their rotations to replay the winner's
    _fractions = None  # basis='auto': the per-layer slice fractions of the schedule it chose

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
            "'auto' (the global basis, built on all but the last `holdout` of the calibration batches and kept, "
            "rebuilt on all of them, when its held-out perplexity is within max_ppl_ratio x dense; otherwise the "
            "shortcut bases are built on copies and the lowest held-out loss among those not larger than dense "
            "wins)."
        },
    )
    max_size: float = field(
        default=1.0,
        metadata={"help": "Refuse (SlicedLargerThanDenseError, before anything rotates) a plan predicted larger than "
                  "this fraction of the dense parameter count; basis='auto' does not build such candidates. 1.0: a "
                  "sliced model is never larger than the dense one (the reference SliceGPT has no such limit: its "
                  "0.25 slicing of SmolLM2 has 140.65M parameters, dense 134.5M)."},
    )
    auto_head: bool = field(
        default=True,
        metadata={"help": "basis='auto' with head='auto' on a tied model, when the global basis failed: also try the "
                  "best shortcut basis with an untied head (SliceGPT's; + vocab x width parameters) when that is not "
                  "larger than dense."},
    )
    auto_tolerance: float = field(
        default=0.01,
        metadata={"help": "basis='auto', when the global basis failed: candidates whose held-out perplexity is within "
                  "this relative margin of the "
                  "best one count as equal, and the smallest of them is kept (measurement noise does not buy "
                  "parameters)."},
    )
    holdout: float = field(
        default=0.25,
        metadata={"help": "Share of the calibration batches (at least one; a single batch is split by rows) that "
                  "basis='auto' holds out to compare its candidates and that the perplexity check is run on."},
    )
    max_ppl_ratio: float = field(
        default=10.0,
        metadata={"help": "Stop with SlicingDegradedError when the sliced model's perplexity on calibration tokens "
                  "(held-out ones with basis='auto') exceeds this multiple of the dense model's; 0 skips the check "
                  "(and its cost: two passes over the held-out share with a fixed basis)."},
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
    reader_weight: float | None = field(
        default=None,
        metadata={
            "help": "What a slot's basis keeps: the eigenvectors of C / tr C + w M / tr M, C the signal's covariance "
            "and M = sum W^T W of the linears that read it (norm scales folded in). 0: SliceGPT's PCA of the signal "
            "alone. None (default): per slot, the w of (0, 0.25, 1, 4) whose basis loses the least of the readers' "
            "signal energy tr(M R C R) / tr(M C) on the calibration tokens (the evidence goes into the plan)."
        },
    )
    reader_margin: float = field(
        default=2.0,
        metadata={
            "help": "reader_weight=None: a basis stays SliceGPT's PCA unless PCA loses more than this multiple of the "
            "best candidate's share of the readers' signal. Small differences in that estimate do not predict "
            "perplexity (SmolLM2, global basis at 0.25: 2.16% vs 2.04% estimated, yet ppl 147 vs 257); large ones do "
            "(Gemma-3-270M: 25-50% vs 0.1-0.3% per slot, ppl 8.3e7 vs 117)."
        },
    )
    protect_early: str = field(
        default="auto",
        metadata={
            "help": "'auto' (basis='auto', when the global basis passes): besides one width for every layer, score "
            "the schedules that keep the residual writes of the first L/6 or L/3 layers at full width and slice the "
            "later layers narrower, at no more parameters than one width everywhere; the lowest held-out loss wins "
            "(Gemma-3-270M at 10%: wiki ppl 117 -> 39 at the same size). 'none': one width for every layer "
            "(SliceGPT). Dynamic Slicing's schedule comes from its redundancies instead."
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
        self.max_size = check_fraction("max_size", self.max_size, lo=0.0, hi=float("inf"), lo_inclusive=False)
        self.holdout = check_fraction("holdout", self.holdout, lo=0.0, hi=1.0, lo_inclusive=False)
        self.auto_tolerance = check_fraction("auto_tolerance", self.auto_tolerance, lo=0.0, hi=1.0)
        self.max_ppl_ratio = check_fraction("max_ppl_ratio", self.max_ppl_ratio, lo=0.0, hi=float("inf"))
        if self.max_ppl_ratio != 0 and self.max_ppl_ratio <= 1:
            raise ValueError(f"max_ppl_ratio={self.max_ppl_ratio} must be 0 (no check) or above 1 (a multiple of the "
                             "dense perplexity)")
        if not isinstance(self.auto_head, bool):
            raise TypeError(f"auto_head={self.auto_head!r} must be True or False")
        for name, value, valid in (
            ("basis", self.basis, BASES),
            ("head", self.head, HEADS),
            ("embedding_basis", self.embedding_basis, EMBEDDING_BASES),
            ("token_weighting", self.token_weighting, TOKEN_WEIGHTINGS),
            ("protect_early", self.protect_early, PROTECT_EARLY),
        ):
            check_choice(name, value, valid)
        self.damping = check_fraction("damping", self.damping, lo=0.0, hi=float("inf"))
        if self.reader_weight is not None:
            self.reader_weight = check_fraction("reader_weight", self.reader_weight, lo=0.0, hi=float("inf"))
        self.reader_margin = check_fraction("reader_margin", self.reader_margin, lo=1.0, hi=float("inf"))

    @property
    def reader_weights(self) -> tuple[float, ...]:
        """The weights `reader_aware_basis` tries: `reader_weight`, or READER_WEIGHTS when it is None."""
        return READER_WEIGHTS if self.reader_weight is None else (float(self.reader_weight),)

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
        self._rotations, self._schedule_note, self._stats = [], None, None
        if self.basis == "auto":
            return self._plan_auto(unwrap_model(model), batches, stage, start)
        n_dense = _num_parameters(model)  # before the rotation-invariant form adds its projections
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
        if self._shared_stats is not None:  # basis='auto': computed once on the same model and batches
            stats = self._shared_stats
        elif self.needs_redundancy or global_possible or joint:
            stats = self._dense_statistics(model, runner, need_slots=global_possible, need_head=joint)
        self._stats = stats
        fractions = self._fractions or self.slice_fractions(stats.get("redundancy"), n_layers)
        dims = self.residual_dims(fractions, hidden)
        sizes = predicted_sizes(model, dims)
        self._basis = self.basis
        self._refuse_if_larger(sizes, n_dense)
        self._evidence = []
        if self._basis == "global":
            C = stats["slots"] + (stats["head"] if joint else 0)
            Q, choice = reader_aware_basis(C, stats.get("readers"), round(sum(dims) / len(dims)), self.damping,
                                           self.reader_weights, self.reader_margin)
            self._evidence.append({"slots": "all", **choice})
            rotate(model, Q, device=runner.device)
            self._record(Q, None)
            kept = [self._kept(Q, d, C) for d in dims]
        else:
            kept = self._sequential(model, runner, dims, stats.get("head"))
        check = None
        if self.max_ppl_ratio:  # in-sample: the last `holdout` share of the batches this run was calibrated on
            check = self._calibration_check(model, dims, split_holdout(batches, self.holdout)[1])
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
                "reader_basis": _summarise_evidence(self._evidence),
                "predicted_parameters": sizes,
                "dense_parameters": n_dense,
                "calibration_check": check,
                "schedule_note": self._schedule_note,
                "head": "tied" if tied else "untied",
                "calibration_tokens": int(sum(int(m.sum()) if m is not None else h.shape[0] * h.shape[1]
                                              for h, m in zip(runner.hidden, runner.masks))),
                "seconds": seconds,
            },
        )

    def _record(self, Q: torch.Tensor, slots: list[int] | None) -> None:
        if self._record_rotations:
            self._rotations.append((Q.detach().cpu(), None if slots is None else list(slots)))

    def _refuse_if_larger(self, sizes: dict[str, int], n_dense: int) -> None:
        """SlicedLargerThanDenseError, with the figures, when the predicted sliced model exceeds the dense one."""
        n = sizes[self._basis]
        if n <= self.max_size * n_dense:
            return
        form = sizes["dense"] - n_dense
        raise SlicedLargerThanDenseError(
            f"{self.name} slicing={self.slicing:g} with basis={self._basis!r} would leave {_fmt(n)} parameters, more "
            f"than the dense model's {_fmt(n_dense)}"
            + (f" x {self.max_size:g}" if self.max_size != 1.0 else "")
            + f": the rotation-invariant form adds {_fmt(form)} (tied-head projection, Gemma's post-sublayer norm "
            f"projections) and the shortcut matrices {_fmt(n - sizes['global'])}; predicted per basis: global "
            f"{_fmt(sizes['global'])}, layer {_fmt(sizes['layer'])}, sublayer {_fmt(sizes['sublayer'])}. Slice more, "
            "or use basis='global' (no shortcut matrices) or basis='auto'"
        )

    def _judge(self, dense_nll: float, nll: float, tokens: int, held_out: bool, extra: str = "") -> dict:
        """The calibration-perplexity check: its record, or SlicingDegradedError when the ratio exceeds
        max_ppl_ratio (or is not finite)."""
        ratio = math.exp(min(nll - dense_nll, 700.0)) if math.isfinite(nll) else float("inf")
        record = {
            "dense_ppl": math.exp(dense_nll),
            "sliced_ppl": math.exp(min(nll, 700.0)) if math.isfinite(nll) else None,
            "ratio": ratio if math.isfinite(ratio) else None,
            "tokens": tokens,
            "held_out": held_out,
            "max_ppl_ratio": self.max_ppl_ratio,
        }
        if self.max_ppl_ratio and not ratio <= self.max_ppl_ratio:
            where = "held-out calibration tokens" if held_out else "its own calibration tokens"
            ppl = f"{record['sliced_ppl']:.4g}" if record["sliced_ppl"] is not None else f"not finite (NLL {nll})"
            raise SlicingDegradedError(
                f"{self.name} slicing={self.slicing:g} (basis={self._basis!r}) broke the model: perplexity on "
                f"{tokens} {where} is {ppl} vs {record['dense_ppl']:.4g} dense "
                f"({ratio:.3g}x, above max_ppl_ratio={self.max_ppl_ratio:g}){extra}. Slice less or try another basis; "
                "max_ppl_ratio=0 skips this check"
            )
        return record

    def _calibration_check(self, model: nn.Module, dims: list[int], batches: list) -> dict:
        """Dense vs sliced next-token loss on `batches`: the rotated full-width model is the dense function, and
        under `masked_slicing` the sliced one (two passes over `batches`, no copy of the model)."""
        dense_nll, tokens = calibration_loss(model, batches, self.device)
        with masked_slicing(model, dims):
            nll, _ = calibration_loss(model, batches, self.device)
        return self._judge(dense_nll, nll, tokens, held_out=False)

    def _plan_auto(self, model: nn.Module, batches: list, stage: int, start: float) -> PrunePlan:
        """basis='auto': the global basis is built on all but the held-out batches, in place, and scored by its
        next-token loss on the held-out ones (`masked_slicing`: no copy). If that perplexity is within
        `max_ppl_ratio` x dense (or the check is off), the global basis is rebuilt from every calibration batch (in
        the frame the first build left: the same basis a build on all batches gives) and returned. Otherwise (or
        when the global plan is larger than dense) the shortcut bases ('layer', 'sublayer'; with `auto_head` also
        the best with an untied head) are built on copies and scored the same way; the lowest held-out loss wins
        (the smallest within `auto_tolerance`) and its rotations are replayed on `model`, or SlicingDegradedError
        says that none passes. `model` may be left rotated (the same function) when the run stops."""
        build, held, held_out = split_holdout(batches, self.holdout)
        n_dense = _num_parameters(model)
        tied = (bool(model.config.head_projection) if is_rotation_invariant(model)
                else get_adapter(model).tied_embeddings)
        head = {"auto": "tied" if tied else "untied", "tied": "tied", "untied": "untied"}[self.head]
        t0 = time.perf_counter()
        dense_nll, n_held = calibration_loss(model, held, self.device)
        dense_seconds = time.perf_counter() - t0
        rows: list[dict] = []
        scored: list = []  # (nll, row, plan, candidate) of the candidates not larger than dense

        def score(m: nn.Module, p: PrunePlan, row: dict, t: float, dims: list[int] | None = None,
                  parameters: int | None = None) -> float:
            with masked_slicing(m, dims or p):
                nll, _ = calibration_loss(m, held, self.device)
            row.update(held_out_ppl=math.exp(min(nll, 700.0)) if math.isfinite(nll) else None,
                       held_out_nll=nll if math.isfinite(nll) else None,
                       parameters=parameters or p.provenance["predicted_parameters"][p.residual_widths["basis"]],
                       seconds=time.perf_counter() - t)
            rows.append(row)
            return nll

        def choice(row: dict, criterion: str) -> dict:
            return {"criterion": criterion, "chosen": {"basis": row["basis"], "head": row["head"]},
                    "dense_held_out_ppl": math.exp(dense_nll), "held_out_tokens": n_held, "held_out": held_out,
                    "build_batches": len(build), "held_out_batches": len(held), "dense_parameters": n_dense,
                    "candidates": rows, "dense_loss_seconds": dense_seconds}

        # 1. the global basis, on the model itself
        t = time.perf_counter()
        row: dict = {"basis": "global", "head": head}
        cand = replace(self, basis="global", head=head, max_ppl_ratio=0.0)
        try:
            p = cand.plan(model, build, stage)
        except SlicedLargerThanDenseError as e:
            row.update(skipped=str(e), seconds=time.perf_counter() - t)
            rows.append(row)
            model = make_rotation_invariant(model, tie_head=head == "tied")
        else:
            model = require_invariant(model)
            nll = score(model, p, row, t)
            if math.isfinite(nll) and row["parameters"] <= self.max_size * n_dense:
                scored.append((nll, row, p, cand))
            fractions = None
            if self.protect_early == "auto" and not self.needs_redundancy and math.isfinite(nll):
                for k, fr, dims, size in self._protected_schedules(model, p):
                    t = time.perf_counter()
                    r = {"basis": "global", "head": head, "schedule": f"first {k} layers whole, then width {dims[-2]}",
                         "layer_slicing": fr}
                    nll_k = score(model, p, r, t, dims=dims, parameters=size)
                    if math.isfinite(nll_k) and nll_k < nll - math.log1p(self.auto_tolerance):
                        row, nll, fractions = r, nll_k, fr
            if self._global_passes(nll, dense_nll):
                t = time.perf_counter()
                final = replace(self, basis="global", head=head, max_ppl_ratio=0.0)
                final._fractions = fractions
                p_all = final.plan(model, batches, stage)  # in the frame `p` left: the composition is the basis
                row.update(chosen=True, rebuilt_on_all_batches=True, rebuild_seconds=time.perf_counter() - t)
                check = self._judge(dense_nll, nll, n_held, held_out)
                self._basis = "global"
                return self._auto_plan(model, p_all, choice(row, self._GLOBAL_FIRST), check, n_dense, start)
        # 2. the shortcut bases, each on a copy; the winner's rotations are replayed on `model`. The dense
        # statistics are shared only when the global basis was refused before rotating (same frame).
        shared = cand._stats if (cand._stats and "skipped" in rows[0]) else None

        def on_copy(basis: str, head: str, stats: dict | None) -> None:
            t = time.perf_counter()
            row = {"basis": basis, "head": head}
            c = replace(self, basis=basis, head=head, max_ppl_ratio=0.0)
            c._shared_stats, c._record_rotations = stats, True
            m = fresh()  # `model` is parked on disk meanwhile: one model in memory, not two
            try:
                p = c.plan(m, build, stage)
            except SlicedLargerThanDenseError as e:
                row.update(skipped=str(e), seconds=time.perf_counter() - t)
                rows.append(row)
                return
            nll = score(m, p, row, t)
            if math.isfinite(nll) and row["parameters"] <= self.max_size * n_dense:
                scored.append((nll, row, p, c))

        with parked(model) as fresh:
            for basis in ("layer", "sublayer"):
                on_copy(basis, head, shared)
            if not scored:
                raise SlicedLargerThanDenseError(
                    f"{self.name} slicing={self.slicing:g}: no basis gives a model of at most {self.max_size:g} x "
                    f"the dense {_fmt(n_dense)} parameters: " + "; ".join(r.get("skipped", str(r)) for r in rows)
                )
            best = min(scored, key=lambda c: c[0])
            if self.head == "auto" and head == "tied" and self.auto_head and best[1]["basis"] != "global":
                on_copy(best[1]["basis"], "untied", None)
        low = min(c[0] for c in scored)
        near = [c for c in scored if c[0] <= low + math.log1p(self.auto_tolerance)]
        nll, row, p, cand = min(near, key=lambda c: (c[1]["parameters"], c[0]))
        row["chosen"] = True
        self._basis = row["basis"]
        table = "; candidates: " + ", ".join(
            f"{r['basis']}/{r['head']} " + (f"{r['held_out_ppl']:.4g}" if r.get("held_out_ppl") else "refused")
            for r in rows)
        check = self._judge(dense_nll, nll, n_held, held_out, extra=table)
        if row["basis"] != "global":
            model = make_rotation_invariant(model, tie_head=row["head"] == "tied")
            for Q, slots in cand._rotations:  # the winner's run, replayed: same matrices, same order
                rotate(model, Q, slots, device=self.device)
        return self._auto_plan(model, p, choice(row, self._ESCALATED), check, n_dense, start)

    def _protected_schedules(self, model: nn.Module, p: PrunePlan) -> list[tuple[int, list[float], list[int], int]]:
        """(k, per-layer fractions, slot widths, predicted parameters) of the schedules that keep the first k layers
        (k = L/6 and L/3, at least 1, fewer than L) at full width and slice the later ones to the widest multiple of
        `round_to` whose model is not larger than the uniform plan `p`'s. The embedding and head keep the target
        width, so the vocabulary matrices cost the same."""
        n_layers = len(p.residual_widths["layer_slicing"])
        hidden = model.config.hidden_size
        budget = p.provenance["predicted_parameters"]["global"]
        out = []
        for k in sorted({max(1, round(n_layers / 6)), max(1, round(n_layers / 3))}):
            if k >= n_layers:
                continue
            step = max(1, self.round_to)
            for width in range(hidden - step, 0, -step):
                fr = [0.0] * k + [1.0 - width / hidden] * (n_layers - k)
                dims = self.residual_dims(fr, hidden)
                size = predicted_sizes(model, dims)["global"]
                if size <= budget:
                    out.append((k, fr, dims, size))
                    break
        return out

    def _global_passes(self, nll: float, dense_nll: float) -> bool:
        """basis='auto' keeps the global basis when its held-out loss is finite and within max_ppl_ratio x dense."""
        return math.isfinite(nll) and (not self.max_ppl_ratio or nll - dense_nll <= math.log(self.max_ppl_ratio))

    _GLOBAL_FIRST = ("the global basis (no shortcut matrices), built on the build batches, passed the held-out "
                     "perplexity check and was rebuilt on every calibration batch; the shortcut bases are tried "
                     "only when it fails")
    _ESCALATED = ("the global basis failed the held-out perplexity check or was larger than dense: lowest next-token "
                  "loss on held-out calibration tokens among the candidates not larger than max_size x dense; "
                  "within auto_tolerance of the best perplexity the smallest; built on the build batches only")

    def _auto_plan(self, model: nn.Module, p: PrunePlan, choice: dict, check: dict, n_dense: int,
                   start: float) -> PrunePlan:
        provenance = dict(p.provenance)
        provenance.update(config=self.config_dict(), basis_choice=choice, calibration_check=check,
                          dense_parameters=n_dense, seconds=time.perf_counter() - start)
        return PrunePlan(architecture=architecture_of(model), residual_widths=dict(p.residual_widths),
                         provenance=provenance)

    def _cov(self, signals: list[torch.Tensor], masks: list, layer: int | None = None) -> torch.Tensor:
        C = covariance(signals, masks, normalize_tokens=self.token_weighting == "norm")
        require_finite(C, method=self.name, stage=self._stage, layer=layer, what="the residual-stream covariance")
        return C

    @staticmethod
    def _kept(Q: torch.Tensor, d: int, C: torch.Tensor) -> float:
        """Fraction of the (undamped) signal energy in the first d columns of the basis Q."""
        Qd = Q[:, :d]
        return float(torch.trace(Qd.T @ C @ Qd).item() / max(C.trace().item(), 1e-300))

    def _slot_readers_gram(self, model: nn.Module, slots: list[int], head_width: int, joint: bool) -> torch.Tensor:
        """Normalised sum of the reader sensitivities of `slots` (the head's for slot 2L; on a tied model with a
        joint embedding basis, slot 0 also counts the embedding's use as the head)."""
        n = num_slots(model)
        total = None
        for s in slots:
            parts = [head_gram(model, head_width) if s == n - 1 else reader_gram(slot_readers(model, s))]
            if s == 0 and joint:
                parts.append(embedding_gram(model, model.config.hidden_size))
            for g in parts:
                if g is not None:
                    total = _normalised(g) if total is None else total + _normalised(g)
        return total

    def _dense_statistics(self, model, runner: LayerwiseRunner, need_slots: bool, need_head: bool) -> dict:
        """One pass through the dense (rotation-invariant, unrotated) model: layer redundancies LR_i, the summed
        trace-normalised covariances of all slots (global basis) and the covariance of the head's input."""
        masks = runner.masks
        h = list(runner.hidden)
        redundancy, slots, readers = [], None, None

        def add(C):
            nonlocal slots
            slots = _normalised(C) if slots is None else slots + _normalised(C)

        def add_readers(slot_list: list[int]) -> None:
            nonlocal readers
            M = self._slot_readers_gram(model, slot_list, model.config.hidden_size, need_head)
            if M is not None:
                readers = M if readers is None else readers + M

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
                add_readers([2 * i, 2 * i + 1])
            h = ho
        out: dict = {"redundancy": redundancy}
        if need_slots:
            add(self._cov(h, masks))
            add_readers([2 * runner.num_layers])
            out["slots"], out["readers"] = slots, readers
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

        joint = head_cov is not None

        def pca_rotate(C: torch.Tensor, slots: list[int]) -> torch.Tensor:
            M = self._slot_readers_gram(model, slots, dims[0], joint)
            Q, choice = reader_aware_basis(C, M, min(dims[s] for s in slots), damp, self.reader_weights,
                                           self.reader_margin)
            require_finite(Q, method=self.name, stage=self._stage, layer=min(slots[0] // 2, n_layers - 1),
                           what=f"the basis of residual slots {slots}")
            self._evidence.append({"slots": list(slots), **choice})
            rotate(model, Q, slots, device=dev)
            self._record(Q, slots)
            for s in slots:
                kept[s] = self._kept(Q, dims[s], C)
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

    base_slicing: float | None = field(
        default=None,
        metadata={"help": "Base slice fraction SB given to the least redundant layer, in [0, slicing]; default "
                  "slicing / 3 (the paper's example: SP 0.3, SB 0.1), so the schedule follows the redundancies at "
                  "every target; SB = slicing gives constant SliceGPT (with a warning)."},
    )
    max_slicing: float = field(
        default=0.9, metadata={"help": "Cap on any layer's slice fraction (the mean is kept at `slicing`)."}
    )
    protect_early: str = field(
        default="none",
        metadata={"help": "Dynamic Slicing's schedule comes from its layer redundancies; basis='auto' scores no "
                  "other schedule ('auto' is accepted and ignored here)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.base_slicing is not None:
            self.base_slicing = check_fraction("base_slicing", self.base_slicing, lo=0.0, hi=1.0)
        self.max_slicing = check_fraction("max_slicing", self.max_slicing, lo=0.0, hi=1.0)
        if not 0.0 <= self.base_fraction <= self.slicing:
            raise ValueError(f"base_slicing={self.base_slicing} must lie in [0, slicing={self.slicing}]")
        if not self.slicing <= self.max_slicing < 1.0:
            raise ValueError(f"max_slicing={self.max_slicing} must lie in [slicing={self.slicing}, 1)")

    @property
    def needs_redundancy(self) -> bool:
        return True

    @property
    def base_fraction(self) -> float:
        """SB: `base_slicing`, or slicing / 3 when it is None."""
        return self.slicing / 3.0 if self.base_slicing is None else float(self.base_slicing)

    def slice_fractions(self, redundancy: list[float] | None, num_layers: int) -> list[float]:
        if redundancy is None or len(redundancy) != num_layers:
            raise ValueError(f"dynamic slicing needs {num_layers} layer redundancies, got {redundancy!r}")
        fractions = dynamic_slice_fractions(redundancy, self.slicing, self.base_fraction, self.max_slicing)
        if len(set(fractions)) <= 1:
            why = (f"base_slicing={self.base_fraction:g} equals slicing={self.slicing:g}"
                   if self.base_fraction == self.slicing else "every layer has the same redundancy")
            self._schedule_note = f"constant schedule: {why}; this run is SliceGPT with slicing={self.slicing:g}"
            warnings.warn(f"dynamic_slicing: {self._schedule_note}", stacklevel=2)
        else:
            self._schedule_note = (f"per-layer slicing {min(fractions):.3f}..{max(fractions):.3f} around "
                                   f"{self.slicing:g} (base_slicing={self.base_fraction:.4g})")
        return fractions
