"""IteRABRe: iterative recovery-aided block reduction (Wibowo et al., arXiv 2503.06291).

Each stage removes the one layer whose absence changes the model's output least, then recovery training (LoRA +
distillation from the unpruned teacher, run by PruneCallback / recipes/iterabre.py) repairs the damage before the
next selection. The paper publishes no code: the selection below is a reconstruction (METHODS.md section 1) whose
choices are config fields.

Selection score of layer j on calibration tokens t (padding masked):

    s_j = mean_t cos( f(model without layer j)_t , f(reference)_t )       (similarity="cosine", default)
    s_j = -mean_t KL( softmax(ref logits_t) || softmax(logits without j)_t )   (similarity="kl")

where f is the final hidden state (after the final norm). The layer with the highest s_j is removed. The cosine
score never runs the LM head; the KL score runs it (with the config's final-logit softcapping) over 256 tokens at a
time (`hf_prune.losses.chunked_kl_divergence`), never over a whole batch's (b, t, vocab) logits.

Cost: the residual stream entering every layer is computed once (prefix cache); skipping layer j then only runs
layers j+1..L-1 from the cached input of layer j, so scoring all L layers costs L(L-1)/2 layer forwards instead of
L^2 (plus one full pass). Protected layers (`protect_first`, `protect_last`) are not candidates and are not scored
(protecting the first k layers saves their suffixes, the longest ones). Every stage logs and records in its plan's
provenance `cost`: seconds, layer forwards over the calibration set, and the same in full forward passes.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchAdapter, get_adapter, unwrap_model
from ..calibration import LayerwiseRunner
from ..checks import check_batches, check_choice, check_fraction, check_int_option, require_finite
from ..losses import chunked_kl_divergence, output_head
from ..plan import PrunePlan, architecture_of
from ..runtime import progress as progress_bar
from . import Batch, PruningMethod, register

__all__ = ["IteRABRe", "layer_removal_scores", "selection_cost"]

logger = logging.getLogger(__name__)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    m = mask.bool()
    return float(values[m].sum()), int(m.sum())


def _similarity(out: torch.Tensor, ref: torch.Tensor, ad: ArchAdapter, kind: str) -> torch.Tensor:
    """Per-token similarity (b, t) between final hidden states `out` and `ref` (higher = more similar)."""
    if kind == "cosine":
        return F.cosine_similarity(out.float(), ref.float(), dim=-1)
    if kind == "kl":  # the head runs over 256 tokens at a time: never (b, t, vocab) at once
        return -chunked_kl_divergence(ref, out, output_head(ad))
    raise ValueError(f"similarity={kind!r} is not valid; use 'cosine' or 'kl'")


@torch.no_grad()
def layer_removal_scores(
    model: nn.Module,
    batches: Iterable[Batch],
    similarity: str = "cosine",
    reference: nn.Module | None = None,
    progress: bool = True,
    *,
    method: str = "iterabre",
    stage: int | None = None,
    candidates: Sequence[int] | None = None,
) -> list[float | None]:
    """s_j for every current layer j in `candidates` (default: every layer; the others get None), with the prefix
    cache (see module docstring): one full pass, then for candidate j the layers j+1..L-1 from the cached input of j.

    `reference` is the model whose output the pruned candidates are compared with (default: `model` itself).
    Empty or all-padding calibration raises ValueError; NaN/inf activations or scores raise NonFiniteError naming
    `method`, `stage` and the layer.
    """
    model = unwrap_model(model)
    ad = get_adapter(model)
    ref_ad = get_adapter(reference) if reference is not None else None
    n = ad.num_layers
    todo = sorted(set(range(n) if candidates is None else candidates))
    if not todo or todo[0] < 0 or todo[-1] >= n:
        raise ValueError(f"candidates={list(candidates or [])} is not valid; give layers in 0..{n - 1}")
    sums, count = [0.0] * n, 0
    batches = check_batches(batches, model, method=method)
    bar = progress_bar(total=len(batches) * len(todo), desc="IteRABRe scoring", enabled=progress)
    for batch in batches:  # one batch at a time: the prefix cache holds n + 1 streams of one batch
        runner = _runner(model, batch, method, stage)
        if runner is None:  # every token of this batch is padding: it adds nothing to any score
            bar.update(len(todo))
            continue
        dev = runner.device
        mask = runner.masks[0]
        mask = torch.ones(runner.hidden[0].shape[:2], dtype=torch.long, device=dev) if mask is None else mask
        real = mask.bool()
        inputs = [runner.hidden[0]]  # inputs[j] = residual stream entering layer j
        runner.run(on_layer=lambda j, h_in, h_out, masks: inputs.append(h_out[0]))
        if ref_ad is None:
            ref = ad.final_hidden(inputs[n])
        else:
            ref_runner = _runner(reference, batch, method, stage)
            ref = ref_ad.final_hidden(ref_runner.run().hidden[0]).to(dev)
        require_finite(ref[real], method=method, stage=stage, layer=None,
                       what="the reference model's final hidden state")
        for j in todo:
            h = runner.branch(j + 1, [inputs[j]]).run().hidden[0]  # the model without layer j
            s, c = _masked_mean(_similarity(ad.final_hidden(h), ref, ad, similarity), mask)
            sums[j] += s
            bar.update(1)
        count += int(real.sum())
    bar.close()
    if count == 0:  # check_batches refuses this; kept for callers of the bare function
        raise ValueError(f"{method}: the calibration batches hold no real token (every attention_mask entry is 0)")
    scores: list[float | None] = [sums[j] / count if j in todo else None for j in range(n)]
    for j in todo:
        require_finite(scores[j], method=method, stage=stage, layer=j,
                       what=f"the {similarity} similarity without the layer")
    return scores


def selection_cost(num_layers: int, candidates: Sequence[int]) -> int:
    """Decoder-layer forwards over the calibration set of one selection: the full pass (num_layers) plus, for each
    candidate j, the suffix j+1..L-1 (L(L-1)/2 when every layer is a candidate)."""
    return num_layers + sum(num_layers - 1 - j for j in candidates)


def _runner(model: nn.Module, batch: Batch, method: str, stage: int | None) -> LayerwiseRunner | None:
    """The layer-by-layer runner over one batch (its h_0 checked for NaN/inf), or None when the batch holds no real
    token."""
    mask = batch.get("attention_mask")
    if mask is not None and not bool(mask.bool().any()):
        return None
    return LayerwiseRunner(model, [batch], progress=False, method=method, stage=stage)


@register("iterabre")
@dataclass
class IteRABRe(PruningMethod):
    """Iterative block removal by output similarity; one layer per stage, recovery between stages."""

    n_remove: int = field(default=6, metadata={"help": "Layers to remove in total (one per stage)."})
    similarity: str = field(
        default="cosine",
        metadata={"help": "'cosine': mean cosine of final hidden states (default); 'kl': minus the mean KL of the "
                  "output distributions. Reconstruction choice (paper: output similarity)."},
    )
    reference: str = field(
        default="current",
        metadata={"help": "'current': compare with the current (already pruned, recovered) model (default); "
                  "'teacher': compare with the original model, kept as a frozen copy at the first stage."},
    )
    protect_first: int = field(default=0, metadata={"help": "Never remove the first k layers."})
    protect_last: int = field(default=0, metadata={"help": "Never remove the last k layers."})
    total_tokens: int = field(
        default=2_500_000, metadata={"help": "Recovery tokens over all stages (paper: 2.5M); the recipe gives each "
                                     "stage total_tokens / n_remove."}
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank of the recovery adapter (merged after each stage)."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha."})
    lora_target_modules: str = field(
        default="all-linear", metadata={"help": "LoRA targets: 'all-linear' or comma-separated module names."}
    )
    kd_alpha: float = field(
        default=1.0, metadata={"help": "Loss = kd_alpha * KL(teacher || student) + (1 - kd_alpha) * CE."}
    )
    kd_temperature: float = field(default=1.0, metadata={"help": "Distillation temperature."})

    def __post_init__(self) -> None:
        self.n_remove = check_int_option("n_remove", self.n_remove, minimum=1)
        check_choice("reference", self.reference, ("current", "teacher"))
        check_choice("similarity", self.similarity, ("cosine", "kl"))
        self.protect_first = check_int_option("protect_first", self.protect_first, minimum=0)
        self.protect_last = check_int_option("protect_last", self.protect_last, minimum=0)
        self.total_tokens = check_int_option("total_tokens", self.total_tokens, minimum=self.n_remove)
        self.lora_r = check_int_option("lora_r", self.lora_r, minimum=1)
        self.lora_alpha = check_int_option("lora_alpha", self.lora_alpha, minimum=1)
        self.kd_alpha = check_fraction("kd_alpha", self.kd_alpha, lo=0.0, hi=1.0, hi_inclusive=True)
        self.kd_temperature = check_fraction("kd_temperature", self.kd_temperature, lo=0.0, hi=float("inf"),
                                             lo_inclusive=False)
        self._teacher: nn.Module | None = None
        self._original_index: list[int] | None = None

    @property
    def stages(self) -> int:
        return self.n_remove

    @property
    def tokens_per_stage(self) -> int:
        return self.total_tokens // self.n_remove

    def plan(self, model: nn.Module, batches: Iterable[Batch], stage: int = 0) -> PrunePlan:
        model = unwrap_model(model)
        n = get_adapter(model).num_layers
        stage = check_int_option("stage", stage, minimum=0, maximum=self.n_remove - 1)
        still = self.n_remove - stage  # layers this stage and the later ones remove
        removable = n - self.protect_first - self.protect_last
        if still >= n or still > removable:
            raise ValueError(
                f"iterabre: n_remove={self.n_remove} stages cannot all run: stage {stage} and the later ones remove "
                f"{still} of the model's {n} layers ({removable} removable with protect_first={self.protect_first}, "
                f"protect_last={self.protect_last}); use n_remove <= {stage + min(n - 1, removable)}"
            )
        batches = check_batches(batches, model, method=self.name)
        if stage == 0 or self._original_index is None or len(self._original_index) != n:
            self._original_index = list(range(n)) if stage == 0 else [None] * n  # original numbering if known
        reference = None
        if self.reference == "teacher":
            if self._teacher is None:
                self._teacher = copy.deepcopy(model).eval().requires_grad_(False)
            reference = self._teacher
        candidates = [j for j in range(self.protect_first, n - self.protect_last)]
        if len(candidates) < 1 or n <= 1:
            raise ValueError(
                f"no layer can be removed: {n} layers, protect_first={self.protect_first}, "
                f"protect_last={self.protect_last}"
            )
        start = time.perf_counter()
        scores = layer_removal_scores(model, batches, self.similarity, reference, method=self.name, stage=stage,
                                      candidates=candidates)
        seconds = time.perf_counter() - start
        forwards = selection_cost(n, candidates) + (n if reference is not None else 0)
        cost = {"seconds": round(seconds, 2), "layer_forwards": forwards,
                "full_passes": round(forwards / n, 2), "candidates": len(candidates),
                "formula": "L (full pass) + sum over candidates j of (L - 1 - j) suffix layers"
                           + (" + L (teacher pass)" if reference is not None else "")}
        logger.info("iterabre stage %d: %d candidates of %d layers scored in %.1f s, %d layer forwards over the "
                    "calibration set (%.1f full passes)", stage, len(candidates), n, seconds, forwards, forwards / n)
        best = max(candidates, key=lambda j: scores[j])
        original = self._original_index[best]
        self._original_index = [o for j, o in enumerate(self._original_index) if j != best]
        return PrunePlan(
            architecture=architecture_of(model),
            drop_layers=[best],
            provenance={
                "method": "iterabre",
                "stage": stage,
                "removed_original_layer": original,
                "similarity": self.similarity,
                "reference": self.reference,
                "scores": [None if s is None else round(s, 6) for s in scores],
                "cost": cost,
            },
        )
