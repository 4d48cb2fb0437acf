"""Angular-distance block removal (Gromov et al., 2024, "The Unreasonable Ineffectiveness of the Deeper Layers",
arXiv 2403.17887): remove the n consecutive layers whose input and output are closest in direction.

For every start layer l in 0..L-n, with h_l the residual stream entering decoder layer l (h_L: the stream leaving
the last layer, before the final norm):

    d(l) = mean_t arccos(cos(h_l[t], h_{l+n}[t])) / pi

and layers l*..l*+n-1 with the lowest d(l*) are removed (ties: the earliest block), without any weight update.
`token="last"` (the default) compares only the last real token of each sequence, as the paper does (its eq. 7 takes
the inner product "for the final token T of the sequence"; the mean is over the calibration sequences).
`token="all"` averages over every real (unmasked) token instead: more signal from fewer sequences.

One forward pass of the backbone per batch (never the LM head, so no vocabulary-sized logits); hooks on the decoder
layers keep only the compared tokens of at most n+1 residual-stream states at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..arch import get_adapter, unwrap_model
from ..calibration import Batch, token_cosines
from ..checks import check_choice, check_int_option, require_finite
from ..plan import PrunePlan, architecture_of
from ..runtime import eval_mode, progress as progress_bar
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


def _first_tensor(value: object) -> torch.Tensor:
    """A decoder layer's output: a tensor, or a tuple whose first element is the hidden state."""
    return value if isinstance(value, torch.Tensor) else value[0]


def angular_distances(
    model: nn.Module, batches: Iterable[Batch], n: int, token: str = "last", progress: bool = True, *,
    method: str = "angular_block", stage: int | None = None,
) -> tuple[list[float], int]:
    """(d(l) for every start layer l in 0..L-n, number of compared tokens), one backbone forward per batch.

    d(l) = mean over compared tokens of arccos(cos(h_l, h_{l+n})) / pi, a number in [0, 1]. Non-finite distances
    raise NonFiniteError naming `method`, `stage` and the start layer.
    """
    model = unwrap_model(model)
    ad = get_adapter(model)
    n_layers = ad.num_layers
    if not 1 <= n < n_layers:
        raise ValueError(f"n={n} is not valid for a model with {n_layers} layers; use 1..{n_layers - 1}")
    check_choice("token", token, TOKEN_CHOICES)
    device = ad.embed_tokens.weight.device
    sums = [0.0] * (n_layers - n + 1)
    count = 0
    states: dict[int, torch.Tensor] = {}
    rows = torch.empty(0, dtype=torch.long)

    def keep(index: int, hidden: torch.Tensor) -> None:
        states[index] = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(hidden.device))
        start = index - n
        if start >= 0:
            cos = token_cosines(states.pop(start), states[index])
            sums[start] += float((torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi).double().sum())

    def before_first(module, args, kwargs):
        keep(0, args[0] if args else kwargs["hidden_states"])

    def after(index: int):
        return lambda module, args, output: keep(index + 1, _first_tensor(output))

    handles = [ad.layer(0).register_forward_pre_hook(before_first, with_kwargs=True)]
    handles += [ad.layer(i).register_forward_hook(after(i)) for i in range(n_layers)]
    batches = list(batches)
    try:
        with eval_mode(model):
            for batch in progress_bar(batches, desc=f"{method}: angular distances", enabled=progress):
                ids = batch["input_ids"].to(device)
                mask = batch.get("attention_mask")
                mask = torch.ones_like(ids) if mask is None else mask.to(device)
                rows = compared_rows(mask, token)
                if rows.numel() == 0:
                    continue
                states.clear()
                ad.backbone(input_ids=ids, attention_mask=mask, use_cache=False, output_hidden_states=False)
                if set(states) != set(range(n_layers - n + 1, n_layers + 1)):
                    raise RuntimeError(f"{method}: the forward pass did not run every one of the {n_layers} decoder "
                                       f"layers once (states seen: {sorted(states)})")
                count += rows.numel()
    finally:
        for h in handles:
            h.remove()
        states.clear()
    if count == 0:
        raise ValueError(f"{method}: the calibration batches hold no real token (every attention_mask entry is 0)")
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
