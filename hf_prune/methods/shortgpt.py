"""ShortGPT: remove the decoder layers that change the residual stream least (Men et al., 2024, arXiv 2403.03853).

Block Influence of layer i over the calibration tokens t (padding excluded):

    BI_i = 1 - mean_t cos(h_i[t], h_{i+1}[t])

with h_i the residual stream entering layer i and h_{i+1} the stream it leaves (h_L before the final norm). The n
layers with the lowest BI are removed in one shot, without any weight update. Through `per_stage` the same target
can be reached in several stages (re-scoring the already pruned, possibly recovered, model each time), which is how
the pruning callback uses it between recovery epochs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

from torch import nn

from ..arch import get_adapter, unwrap_model
from ..calibration import Batch, LayerwiseRunner, token_cosines
from ..checks import check_batches, check_int_option, check_optional_int_option, require_finite
from ..plan import PrunePlan, architecture_of
from ..runtime import eval_mode
from . import PruningMethod, register

__all__ = ["ShortGPT", "block_influence"]


def block_influence(
    model: nn.Module, batches: Iterable[Batch], progress: bool = True, *, method: str = "shortgpt",
    stage: int | None = None,
) -> tuple[list[float], int]:
    """(BI_i for every decoder layer i, number of calibration tokens), computed layer by layer without grad.

    BI_i = 1 - mean over real tokens of cos(h_i, h_{i+1}); the mean is over all tokens of all batches. Non-finite
    activations or scores raise NonFiniteError naming `method`, `stage` and the layer.
    """
    model = unwrap_model(model)
    n_layers = get_adapter(model).num_layers
    cos_sum = [0.0] * n_layers
    count = 0

    def on_layer(i, h_in, h_out, masks):
        cos_sum[i] = sum(float(token_cosines(a, b, m).double().sum()) for a, b, m in zip(h_in, h_out, masks))

    with eval_mode(model):
        runner = LayerwiseRunner(model, batches, progress=progress, method=method, stage=stage)  # no real token: error
        count = runner.num_tokens
        runner.run(on_layer=on_layer, desc="shortgpt: block influence")
    scores = [1.0 - s / count for s in cos_sum]
    for i, bi in enumerate(scores):
        require_finite(bi, method=method, stage=stage, layer=i, what="block influence")
    return scores, count


@register("shortgpt")
@dataclass(kw_only=True)
class ShortGPT(PruningMethod):
    """Remove the `n_remove` layers with the lowest Block Influence (ShortGPT, Men et al. 2024).

    With `per_stage`, `n_remove` is reached in ceil(n_remove / per_stage) stages of `per_stage` layers each (the last
    stage takes the remainder); each stage re-scores the model as it is then.
    """

    n_remove: int = field(default=6, metadata={"help": "Total number of decoder layers to remove (over all stages)."})
    per_stage: int | None = field(
        default=None,
        metadata={"help": "Layers removed per stage when pruning iteratively (None: all n_remove in one stage)."},
    )
    progress: bool = field(default=True, metadata={"help": "Show a progress bar while scoring layers."})

    def __post_init__(self) -> None:
        self.n_remove = check_int_option("n_remove", self.n_remove, minimum=1)
        self.per_stage = check_optional_int_option("per_stage", self.per_stage, minimum=1, maximum=self.n_remove)

    @property
    def stages(self) -> int:
        return 1 if self.per_stage is None else math.ceil(self.n_remove / self.per_stage)

    def removed_at(self, stage: int) -> int:
        """How many layers stage `stage` removes."""
        if not 0 <= stage < self.stages:
            raise ValueError(f"stage={stage} is not valid; this ShortGPT has stages 0..{self.stages - 1}")
        if self.per_stage is None:
            return self.n_remove
        return min(self.per_stage, self.n_remove - stage * self.per_stage)

    def plan(self, model: nn.Module, batches: Iterable[Batch], stage: int = 0) -> PrunePlan:
        """Score every layer of `model` (as it is now) and drop the lowest-BI ones. Indices are the model's current
        layer indices; `provenance` records the scores."""
        k = self.removed_at(stage)
        n_layers = get_adapter(model).num_layers
        still = self.n_remove - sum(self.removed_at(s) for s in range(stage))  # this stage and the later ones
        if still >= n_layers:
            raise ValueError(
                f"n_remove={self.n_remove} cannot be reached: stage {stage} and the later ones would remove {still} "
                f"of the model's {n_layers} layers (stage {stage}: {k}, per_stage={self.per_stage}); keep at least one "
                f"layer: n_remove must be below the number of layers"
            )
        batches = check_batches(batches, model, method=self.name)
        scores, n_tokens = block_influence(model, batches, progress=self.progress, method=self.name, stage=stage)
        order = sorted(range(n_layers), key=lambda i: (scores[i], i))
        drop = sorted(order[:k])
        return PrunePlan(
            architecture=architecture_of(model),
            drop_layers=drop,
            provenance={
                "method": self.name,
                "config": self.config_dict(),
                "stage": stage,
                "num_layers": n_layers,
                "block_influence": scores,
                "calibration_tokens": n_tokens,
                "criterion": "BI_i = 1 - mean cos(h_i, h_{i+1}); lowest removed",
            },
        )
