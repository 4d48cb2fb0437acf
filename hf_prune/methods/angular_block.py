"""Angular-distance block removal (Gromov et al., 2024, "The Unreasonable Ineffectiveness of the Deeper Layers",
arXiv 2403.17887): remove the n consecutive layers whose input and output are closest in direction.

For every start layer l in 0..L-n, with h_l the residual stream entering decoder layer l (h_L: the stream leaving
the last layer, before the final norm):

    d(l) = mean_t arccos(cos(h_l[t], h_{l+n}[t])) / pi

and layers l*..l*+n-1 with the lowest d(l*) are removed (ties: the earliest block), without any weight update.
`token="last"` (the default) compares only the last real token of each sequence, as the paper does (its eq. 7 takes
the inner product "for the final token T of the sequence"; the mean is over the calibration sequences).
`token="all"` averages over every real (unmasked) token instead: more signal from fewer sequences.

One pass of the decoder layers over the calibration batches, layer by layer (never the LM head, so no
vocabulary-sized logits; a `hf_prune.calibration.streamed_model` is read one layer at a time); only the compared
tokens of at most n+1 residual-stream states are kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from ..arch import get_adapter, unwrap_model
from ..calibration import Batch, LayerwiseRunner, token_cosines
from ..checks import NonFiniteError, check_choice, check_int_option, require_finite
from ..plan import PrunePlan, architecture_of
from ..runtime import eval_mode
from . import PruningMethod, register

__all__ = ["AngularBlock", "TOKEN_CHOICES", "angular_distances", "compared_rows"]

TOKEN_CHOICES = ("last", "all")


def compared_rows(attention_mask: torch.Tensor, token: str) -> torch.Tensor:
    """Flat indices into the (batch * tokens) positions of the tokens whose states are compared: every real token
    (`token="all"`) or the last real token of each sequence (`"last"`; left or right padding alike; a row with no
    real token contributes nothing)."""
    real = attention_mask.bool()
    if token == "all":
        return real.reshape(-1).nonzero().squeeze(1)
    b, t = real.shape
    positions = torch.arange(t, device=real.device).expand(b, t)
    last = torch.where(real, positions, torch.full_like(positions, -1)).amax(dim=1)
    rows = torch.arange(b, device=real.device)
    has_real = last >= 0
    return rows[has_real] * t + last[has_real]


def angular_distances(
    model: nn.Module, batches: Iterable[Batch], n: int, token: str = "last", progress: bool = True, *,
    method: str = "angular_block", stage: int | None = None,
) -> tuple[list[float], int]:
    """(d(l) for every start layer l in 0..L-n, number of compared tokens), one pass of the decoder layers.

    d(l) = mean over compared tokens of arccos(cos(h_l, h_{l+n})) / pi, a number in [0, 1]. The pass runs layer by
    layer (`hf_prune.calibration.LayerwiseRunner`, so a `streamed_model` is scored one layer's weights at a time)
    and keeps only the compared tokens of at most n+1 states. Non-finite distances raise NonFiniteError naming
    `method`, `stage` and the start layer.
    """
    model = unwrap_model(model)
    n_layers = get_adapter(model).num_layers
    if not 1 <= n < n_layers:
        raise ValueError(f"n={n} is not valid for a model with {n_layers} layers; use 1..{n_layers - 1}")
    check_choice("token", token, TOKEN_CHOICES)
    sums = [0.0] * (n_layers - n + 1)
    with eval_mode(model):
        runner = LayerwiseRunner(model, batches, progress=progress, method=method, stage=stage)
        rows = []
        for b, h in enumerate(runner.hidden):
            mask = runner.token_mask(b)
            mask = torch.ones(h.shape[:2], dtype=torch.long, device=h.device) if mask is None else mask
            rows.append(compared_rows(mask, token))
        count = sum(r.numel() for r in rows)
        if count == 0:
            raise ValueError(f"{method}: the calibration batches hold no compared token (every sequence is padding)")

        def select(states: Sequence[torch.Tensor]) -> list[torch.Tensor]:
            return [h.reshape(-1, h.shape[-1]).index_select(0, r.to(h.device)) for h, r in zip(states, rows)]

        kept = {0: select(runner.hidden)}

        def on_layer(i: int, h_in, h_out, masks) -> None:
            kept[i + 1] = select(h_out)
            start = i + 1 - n
            if start >= 0:
                for a, c in zip(kept.pop(start), kept[i + 1]):
                    cos = token_cosines(a, c)
                    sums[start] += float((torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).double().sum())

        try:
            runner.run(on_layer=on_layer, desc=f"{method}: angular distances")
        except NonFiniteError as e:  # name the blocks the bad layer belongs to, as the distances would
            i = runner.layer
            raise NonFiniteError(f"{e}; so the angular distances of the blocks starting at layer "
                                 f"{max(0, i + 1 - n)}..{min(i, n_layers - n)} cannot be computed") from e
    distances = [s / count for s in sums]
    for start, d in enumerate(distances):
        require_finite(d, method=method, stage=stage, layer=start, what=f"the angular distance of layers "
                       f"{start}..{start + n - 1}")
    return distances, count


@register("angular_block")
@dataclass(kw_only=True)
class AngularBlock(PruningMethod):
    """Remove the `n_remove` consecutive layers whose input and output states are closest in angular distance
    (Gromov et al. 2024), in one stage, without a weight update (the paper heals with QLoRA afterwards)."""

    n_remove: int = field(default=6, metadata={"help": "Number of consecutive decoder layers to remove."})
    token: str = field(
        default="last",
        metadata={"help": "Tokens compared: 'last' (the last real token of each sequence, as in the paper) or 'all' "
                          "(every real token)."},
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar while scoring."})

    def __post_init__(self) -> None:
        self.n_remove = check_int_option("n_remove", self.n_remove, minimum=1)
        self.token = check_choice("token", self.token, TOKEN_CHOICES)

    def plan(self, model: nn.Module, batches: Iterable[Batch], stage: int = 0) -> PrunePlan:
        """Score every block of `n_remove` consecutive layers of `model` and drop the closest one; `provenance`
        records d(l) for every start layer l."""
        n_layers = get_adapter(model).num_layers
        if self.n_remove >= n_layers:
            raise ValueError(f"n_remove={self.n_remove} cannot be removed from a model with {n_layers} layers; keep "
                             f"at least one layer: n_remove must be 1..{n_layers - 1}")
        distances, n_tokens = angular_distances(model, batches, self.n_remove, self.token, self.progress,
                                                method=self.name, stage=stage)
        best = min(range(len(distances)), key=lambda l: (distances[l], l))
        return PrunePlan(
            architecture=architecture_of(model),
            drop_layers=list(range(best, best + self.n_remove)),
            provenance={
                "method": self.name,
                "config": self.config_dict(),
                "stage": stage,
                "num_layers": n_layers,
                "angular_distance": distances,
                "best_start": best,
                "compared_tokens": n_tokens,
                "criterion": f"d(l) = mean over {self.token} real tokens of arccos(cos(h_l, h_l+n)) / pi; "
                             "layers l..l+n-1 with the lowest d removed",
            },
        )
