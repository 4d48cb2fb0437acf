"""Iterative pruning of attention head groups and MLP channels: PIP, LLM-Pruner (Taylor) and magnitude.

* ``"pip"`` — PIP, perturbation-based iterative pruning (Cao et al., EMNLP 2025 Findings, arXiv 2501.15278).
  Group importance I(G) = sum_{w in G} |w * (dL/dw(x) - dL/dw(x~))| with x~ a perturbed copy of the calibration
  text (character swaps, replacements, insertions inside words; or embedding noise). Groups whose gradients barely
  tell the two views apart are pruned first, in ``steps`` rounds with scores recomputed each round.
  **Reconstruction**: no public code was available. Every choice below is a config field; the defaults are those
  written in the project's METHODS.md section 4 or, where it is silent, stated in the field's help.
* ``"llm_pruner"`` — LLM-Pruner's block-wise Taylor pruning (Ma et al., NeurIPS 2023): I(G) = sum |w * dL/dw(x)| on
  clean text, one shot, the same budget in every prunable layer, first 3 and last layer kept (the repository's
  defaults for 32-layer Llama). Uses the same groups as PIP (kv head with its query heads, or one query head per kv
  group where every layer has a single kv head; MLP channel).
* ``"magnitude"`` — data-free: I(G) = ||w_G||_2^2 (per parameter: the mean square, comparable across sizes).

Targets are parameter counts: ``target`` is the fraction removed of all parameters (``target_of="all"``, as the
papers count; tied embeddings counted once) or of the decoder-layer parameters (``target_of="layers"``). After step s
of S (0-based) the model has ``N_0 - round((s + 1) / S * target * base)`` parameters, N_0 the count before step 0;
each step's plan removes what is missing from the *current* model (measured, so recovery training in between or a
rounding gap is absorbed). Groups are taken in ascending order of score (per parameter by default) while they fit
in the step's budget, so the result lands below one group's size of the target; the plan's parameter count is
checked with ``hf_prune.surgery.predicted_num_parameters``.

Use by hand or through ``PruneCallback`` (each step is a stage, recovery training in between)::

    method = hf_prune.methods.get("pip", target=0.2, steps=4, tokenizer=tok)
    hf_prune.prune(model, method, batches, recover=lambda model, stage: ...)  # recovery between steps
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Any, Callable, ClassVar, Iterable, Sequence

from torch import nn

from ..arch import ArchAdapter, get_adapter, unwrap_model
from ..perturb import CHAR_OPS, CharPerturbation, EmbeddingNoise, add_perturbed_views
from ..plan import PrunePlan
from ..surgery import predicted_num_parameters
from . import PruningMethod, register
from .importance import (
    check_removable,
    HEAD_GROUPING_OPTIONS,
    Group,
    LayerImportance,
    MemoryEstimate,
    build_groups,
    compute_importance,
    auto_gradient_checkpointing,
    auto_micro_batch_size,
    estimate_gradient_memory,
    resolve_head_grouping,
    scored_parameters,
)

__all__ = ["GroupPruning", "PIP", "LLMPruner", "MagnitudePruning", "select_groups"]

ALLOCATIONS = ("global", "per_layer")
TARGETS_OF = ("all", "layers")
NORMALIZATIONS = ("per_parameter", "none")
PERTURBATIONS = ("chars", "embedding")


def _layer_params(ad: ArchAdapter, i: int) -> int:
    return sum(p.numel() for p in ad.layers[i].parameters())


@dataclass
class GroupPruning(PruningMethod):
    """Iterative structured pruning of head groups and MLP channels to a parameter target (shared machinery).

    Subclasses fix the criterion (``criterion`` class attribute) and may change defaults.
    """

    criterion: ClassVar[str] = "taylor"

    target: float = field(default=0.2, metadata={"help": "Fraction of parameters to remove in total."})
    target_of: str = field(
        default="all",
        metadata={"help": "What `target` is a fraction of: 'all' parameters (embeddings included, tied ones once; "
                  "as the papers count) or the decoder 'layers' only."},
    )
    steps: int = field(default=4, metadata={"help": "Pruning steps (stages); scores are recomputed at each."})
    head_grouping: str = field(
        default="auto",
        metadata={"help": "Attention group: 'kv' = a kv head with its query heads; 'query' = one query head per kv "
                  "group (kv heads kept, group sizes stay equal); 'auto' = 'query' when every prunable layer has a "
                  "single kv head shared by several query heads (e.g. Gemma-3-270M, where 'kv' can remove nothing), "
                  "else 'kv' (GQA with >= 2 kv heads, MHA). The plan's provenance records the grouping used."},
    )
    prune_attention: bool = field(default=True, metadata={"help": "Prune attention head groups."})
    prune_mlp: bool = field(default=True, metadata={"help": "Prune MLP channels."})
    skip_first_layers: int = field(default=1, metadata={"help": "Leave this many first decoder layers untouched."})
    skip_last_layers: int = field(default=1, metadata={"help": "Leave this many last decoder layers untouched."})
    allocation: str = field(
        default="global",
        metadata={"help": "'global': one ranking over all prunable layers (widths differ per layer); 'per_layer': "
                  "every prunable layer loses the same fraction of its parameters, ranked inside the layer."},
    )
    normalize: str = field(
        default="per_parameter",
        metadata={"help": "Rank groups by score per parameter ('per_parameter'; heads and channels differ ~100x in "
                  "size) or by raw score ('none')."},
    )
    max_layer_prune_fraction: float = field(
        default=0.9,
        metadata={"help": "At most this fraction of a layer's head groups / channels is removed in one step "
                  "(at least one kv group and one channel always stay)."},
    )
    micro_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per forward/backward in gradient passes. None: sized from the memory estimate, the "
                  "most rows whose activations and logits take at most a quarter of the weight bytes (at least "
                  "256 MiB) "
                  "and fit memory_budget_gb / free memory (logged). Scores are sums over micro-batches: the same "
                  "for any value up to float rounding. A number >= the batch rows: whole batches."},
    )
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Per-layer activation checkpointing during gradient passes (less memory, ~30% slower; "
                  "same scores). None: on when one row's activations and logits, every layer's kept, would take "
                  "more than a quarter of the weight bytes (at least 256 MiB), as on Gemma-3-270M (logged)."},
    )
    memory_budget_gb: float | None = field(
        default=None,
        metadata={"help": "Memory the gradient pass may use, weights included (None: the device's free memory). "
                  "The pass fails before starting when its estimate exceeds it."},
    )
    reference_num_parameters: int | None = field(
        default=None,
        metadata={"help": "Parameter count the target refers to (the unpruned model). None: the count seen at stage 0 "
                  "(set it when resuming at a later stage with a fresh method object)."},
    )
    progress: bool = field(default=True, metadata={"help": "Show progress bars."})
    allow_partial: bool = field(default=False, metadata={
        "help": "Accept a result that prunes less than asked (a kind of structure that cannot be removed, e.g. "
                "attention with one kv head; a target the limits cannot reach): recorded and warned about instead "
                "of an error."})

    def __post_init__(self) -> None:
        if not 0.0 <= self.target < 1.0:
            raise ValueError(f"target={self.target} is not valid; it must be in [0, 1)")
        _check_choice("target_of", self.target_of, TARGETS_OF)
        _check_choice("head_grouping", self.head_grouping, HEAD_GROUPING_OPTIONS)
        _check_choice("allocation", self.allocation, ALLOCATIONS)
        _check_choice("normalize", self.normalize, NORMALIZATIONS)
        if self.steps < 1:
            raise ValueError(f"steps={self.steps} is not valid; it must be >= 1")
        if self.skip_first_layers < 0 or self.skip_last_layers < 0:
            raise ValueError(f"skip_first_layers={self.skip_first_layers}, skip_last_layers={self.skip_last_layers}:"
                             " both must be >= 0")
        if not 0.0 < self.max_layer_prune_fraction <= 1.0:
            raise ValueError(f"max_layer_prune_fraction={self.max_layer_prune_fraction} must be in (0, 1]")
        if not (self.prune_attention or self.prune_mlp):
            raise ValueError("prune_attention and prune_mlp are both False: nothing to prune")
        self._dense_num_parameters: int | None = self.reference_num_parameters
        self._grouping: str | None = None  # head_grouping as resolved at stage 0 (kept for the later stages)

    # ----- PruningMethod API ---------------------------------------------------------------------------------------
    @property
    def stages(self) -> int:
        return self.steps

    def config_dict(self) -> dict[str, Any]:
        """JSON-friendly config (objects such as a tokenizer are left out)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            if v is None or isinstance(v, (bool, int, float, str, list)):
                out[f.name] = v
        out["criterion"] = self.criterion
        return out

    def prunable_layers(self, num_layers: int) -> list[int]:
        layers = list(range(self.skip_first_layers, num_layers - self.skip_last_layers))
        if not layers:
            raise ValueError(
                f"skip_first_layers={self.skip_first_layers} and skip_last_layers={self.skip_last_layers} leave no "
                f"prunable layer out of {num_layers}; lower them"
            )
        return layers

    def target_num_parameters(self, model: nn.Module, stage: int) -> int:
        """The parameter count the model should have after `stage` (0-based)."""
        model = unwrap_model(model)
        ad = get_adapter(model)
        now = sum(p.numel() for p in model.parameters())
        if stage == 0 and self.reference_num_parameters is None:
            self._dense_num_parameters = now
        dense = self._dense_num_parameters
        if dense is None:
            raise ValueError(
                f"stage {stage} needs the parameter count of the unpruned model: call plan(..., stage=0) with this "
                "method object first, or set reference_num_parameters"
            )
        outside_layers = now - sum(_layer_params(ad, i) for i in range(ad.num_layers))
        base = dense if self.target_of == "all" else dense - outside_layers
        removal = round(self.target * base)
        return dense - round(removal * (stage + 1) / self.steps)

    def plan(self, model: nn.Module, batches: Iterable = (), stage: int = 0) -> PrunePlan:
        """Plan for pruning step `stage`, measured against the model as it is now (indices are its current ones)."""
        if not 0 <= stage < self.steps:
            raise ValueError(f"stage={stage} is not valid; this method has stages 0..{self.steps - 1}")
        model = unwrap_model(model)
        ad = get_adapter(model)
        now = sum(p.numel() for p in model.parameters())
        target = self.target_num_parameters(model, stage)
        need = now - target
        layers = self.prunable_layers(ad.num_layers)
        grouping = self.resolved_head_grouping(model, stage)
        if stage == 0 and self.prune_attention and grouping == "query":
            mha = [i for i in layers if ad.attention(i).group_size == 1]
            if mha:
                raise ValueError(
                    f"head_grouping='query' removes query heads inside kv groups, but layers {mha} have one query "
                    "head per kv head (multi-head attention); use head_grouping='kv'"
                )
        not_pruned = check_removable(ad, layers, grouping, self.prune_attention, self.prune_mlp,
                                     method=self.name, allow_partial=self.allow_partial) if stage == 0 else []
        for cause in not_pruned:
            warnings.warn(cause + " (allow_partial=True: pruning the rest)", stacklevel=2)
        provenance: dict[str, Any] = {
            "not_pruned": not_pruned,
            "method": self.name,
            "criterion": self.criterion,
            "stage": stage,
            "stages": self.steps,
            "config": self.config_dict(),
            "head_grouping": grouping,
            "reference_num_parameters": self._dense_num_parameters,
            "num_parameters_before": now,
            "target_num_parameters": target,
            "prunable_layers": layers,
        }
        if need <= 0:
            return PrunePlan(provenance={**provenance, "num_parameters_after": now, "removed_groups": {}})
        scores = self.importance(model, list(batches), layers, stage)
        groups = [
            g
            for imp in scores
            for g in build_groups(ad, imp, grouping, attention=self.prune_attention, mlp=self.prune_mlp)
        ]
        limits = _removal_limits(ad, layers, grouping, self.max_layer_prune_fraction)
        layer_sizes = {i: _layer_params(ad, i) for i in layers}
        chosen = select_groups(groups, need, limits, self.allocation, self.normalize, layer_sizes)
        plan = _plan_from_groups(ad, chosen)
        removed = sum(g.num_params for g in chosen)
        after = predicted_num_parameters(model, plan)
        if after != now - removed:  # the group sizes and surgery's count must agree exactly
            raise RuntimeError(f"plan removes {now - after} parameters but its groups add up to {removed}")
        largest = max(g.num_params for g in groups)
        if after - target > largest:
            msg = (f"{self.name} stage {stage}: the plan keeps {after} parameters, {after - target} above the target "
                   f"{target}; max_layer_prune_fraction={self.max_layer_prune_fraction} and the protected layers "
                   "leave too little to remove")
            if not self.allow_partial:
                raise ValueError(msg + "; raise max_layer_prune_fraction, protect fewer layers, lower target, or "
                                 "pass allow_partial=True to accept it")
            warnings.warn(msg, stacklevel=2)
        provenance.update(
            num_parameters_after=after,
            removed_groups={
                "attention": sum(g.kind == "attention" for g in chosen),
                "mlp_channels": sum(g.kind == "mlp" for g in chosen),
            },
        )
        plan.provenance = provenance
        return plan

    def resolved_head_grouping(self, model: nn.Module, stage: int = 0) -> str:
        """`head_grouping` as used on `model`: 'kv' or 'query' ('auto' resolved from the prunable layers at stage 0,
        and kept for the later stages of this method object; `importance.resolve_head_grouping`)."""
        if self.head_grouping != "auto":
            return self.head_grouping
        if stage == 0 or self._grouping is None:
            ad = get_adapter(unwrap_model(model))
            self._grouping = resolve_head_grouping(ad, self.prunable_layers(ad.num_layers), "auto")
        return self._grouping

    def gradient_settings(self, model: nn.Module, batch_rows: int, seq_len: int) -> tuple[int, bool]:
        """(rows per forward/backward, per-layer checkpointing) of the gradient pass for batches of `batch_rows` x
        `seq_len` tokens: the fields, or what None resolves to (`importance.auto_gradient_checkpointing`, then
        `importance.auto_micro_batch_size`)."""
        model = unwrap_model(model)
        ad = get_adapter(model)
        params = scored_parameters(ad, self.prunable_layers(ad.num_layers))
        ckpt = self.gradient_checkpointing
        if ckpt is None:
            ckpt = auto_gradient_checkpointing(model, seq_len, params)
        if self.micro_batch_size is not None:
            return min(self.micro_batch_size, batch_rows), ckpt
        return auto_micro_batch_size(model, batch_rows, seq_len, params, ckpt, self.memory_budget_gb), ckpt

    def micro_batch_rows(self, model: nn.Module, batch_rows: int, seq_len: int) -> int:
        """Rows per forward/backward of the gradient pass for batches of `batch_rows` x `seq_len` tokens."""
        return self.gradient_settings(model, batch_rows, seq_len)[0]

    def memory_estimate(self, model: nn.Module, batch_rows: int, seq_len: int) -> MemoryEstimate:
        """Peak memory of this method's gradient pass on `model` for batches of `batch_rows` x `seq_len` tokens."""
        model = unwrap_model(model)
        ad = get_adapter(model)
        params = scored_parameters(ad, self.prunable_layers(ad.num_layers))
        rows, ckpt = self.gradient_settings(model, batch_rows, seq_len)
        return estimate_gradient_memory(model, rows, seq_len, params, ckpt)

    def _micro_batch_option(self) -> int | str:
        return "auto" if self.micro_batch_size is None else self.micro_batch_size

    def importance(self, model: nn.Module, batches: list, layers: Sequence[int], stage: int) -> list[LayerImportance]:
        """Per-structure scores of `layers` (the criterion of this method)."""
        return compute_importance(
            model, batches, layers, self.criterion, micro_batch_size=self._micro_batch_option(),
            gradient_checkpointing=self.gradient_checkpointing, memory_budget_gb=self.memory_budget_gb,
            progress=self.progress,
        )


@register("pip")
@dataclass
class PIP(GroupPruning):
    """PIP: I(G) = sum_{w in G} |w * (dL/dw(x) - dL/dw(x~))|, iterative (reconstruction, see module docstring).

    The perturbed view x~ comes from, in order: ``perturbed_input_ids`` already in the batches
    (``hf_prune.perturb.add_perturbed_views``); ``perturbation="chars"`` with ``tokenizer`` set (text is decoded,
    perturbed and re-encoded; seed = ``seed + stage``); ``perturbation="embedding"`` (noise on inputs_embeds).
    """

    criterion: ClassVar[str] = "pip"

    perturbation: str = field(
        default="chars", metadata={"help": "Perturbed view: 'chars' (edits inside words) or 'embedding' (noise)."}
    )
    perturb_rate: float = field(
        default=0.1, metadata={"help": "Probability that a letter inside a word is edited ('chars'; reconstruction)."}
    )
    perturb_ops: tuple[str, ...] = field(
        default=CHAR_OPS, metadata={"help": f"Character edits drawn uniformly ('chars'): subset of {CHAR_OPS}."}
    )
    embedding_noise_scale: float = field(
        default=0.1, metadata={"help": "Noise std relative to each token's embedding RMS ('embedding')."}
    )
    tokenizer: Any = field(
        default=None, repr=False, compare=False,
        metadata={"help": "Tokenizer for 'chars' perturbation when batches carry no perturbed_input_ids."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_choice("perturbation", self.perturbation, PERTURBATIONS)
        self.perturb_ops = tuple(self.perturb_ops)
        CharPerturbation(self.perturb_rate, self.perturb_ops)  # validates rate and ops
        EmbeddingNoise(self.embedding_noise_scale)

    def importance(self, model, batches, layers, stage):
        noise = None
        if self.perturbation == "embedding":
            noise = EmbeddingNoise(self.embedding_noise_scale, seed=self.seed + stage)
        elif batches and not all("perturbed_input_ids" in b for b in batches):
            if self.tokenizer is None:
                raise ValueError(
                    "PIP with perturbation='chars' needs the tokenizer (get('pip', tokenizer=tok)) or batches that "
                    "carry 'perturbed_input_ids' (hf_prune.perturb.add_perturbed_views); or use "
                    "perturbation='embedding'"
                )
            pert = CharPerturbation(self.perturb_rate, self.perturb_ops, seed=self.seed + stage)
            batches = add_perturbed_views(self.tokenizer, batches, pert)
        return compute_importance(
            model, batches, layers, "pip", embedding_noise=noise, micro_batch_size=self._micro_batch_option(),
            gradient_checkpointing=self.gradient_checkpointing, memory_budget_gb=self.memory_budget_gb,
            progress=self.progress,
        )


@register("llm_pruner")
@dataclass
class LLMPruner(GroupPruning):
    """LLM-Pruner block-wise, first-order Taylor: I(G) = sum_{w in G} |w * dL/dw(x)| (Ma et al., NeurIPS 2023).

    Defaults follow the repository's block-wise script: one shot, the same ratio in every prunable layer, layers
    [3, L-1) prunable, kv head groups for grouped-query attention (query heads inside the group where every layer
    has one kv head: ``head_grouping="auto"``). Its calibration (10 samples of 64 tokens) and
    LoRA recovery are the caller's. The ratio is applied as an equal *parameter* fraction per layer, ranked inside the
    layer, rather than equal fractions of heads and of channels: small GQA models have too few kv heads per layer
    (3 in SmolLM2) for a 20-25% head ratio.
    """

    criterion: ClassVar[str] = "taylor"

    steps: int = field(default=1, metadata={"help": "Pruning steps (LLM-Pruner: 1, one shot)."})
    allocation: str = field(default="per_layer", metadata={"help": "'per_layer' (LLM-Pruner) or 'global'."})
    skip_first_layers: int = field(default=3, metadata={"help": "First layers kept (LLM-Pruner default: 3)."})
    skip_last_layers: int = field(default=1, metadata={"help": "Last layers kept (LLM-Pruner default: 1)."})


@register("magnitude")
@dataclass
class MagnitudePruning(GroupPruning):
    """Data-free baseline: I(G) = ||w_G||_2^2 over the group's weights (ranked per parameter: the mean square), same
    groups and schedule as PIP."""

    criterion: ClassVar[str] = "magnitude"

    @property
    def needs_calibration(self) -> bool:
        return False


# ---------------------------------------------------------------------------------------------------------------------
# Selection
# ---------------------------------------------------------------------------------------------------------------------


def _check_choice(name: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; use one of {valid}")


def _removal_limits(ad: ArchAdapter, layers: Sequence[int], head_grouping: str, fraction: float) -> dict:
    """How many groups of each (layer, kind) may go in one step."""
    limits = {}
    for i in layers:
        a, m = ad.attention(i), ad.mlp(i)
        units = a.group_size if head_grouping == "query" else a.num_kv_heads
        limits[(i, "attention")] = min(units - 1, int(fraction * units))
        limits[(i, "mlp")] = min(m.intermediate_size - 1, int(fraction * m.intermediate_size))
    return limits


def _key(normalize: str) -> Callable[[Group], tuple]:
    if normalize == "per_parameter":
        return lambda g: (g.score / g.num_params, g.rank, g.layer, g.kind, g.query_heads, g.kv_heads, g.channels)
    return lambda g: (g.score, g.rank, g.layer, g.kind, g.query_heads, g.kv_heads, g.channels)


def _fill(candidates: list[Group], budget: int, limits: dict, counts: dict, taken: set) -> int:
    """Take candidates (already sorted) that fit in `budget`, respecting per-layer limits and unit order."""
    removed = 0
    for g in candidates:
        if id(g) in taken:
            continue
        k = (g.layer, g.kind)
        if counts.get(k, 0) >= limits[k]:
            continue
        if g.rank >= 0 and g.rank != counts.get(k, 0):  # query units go in rank order
            continue
        if removed + g.num_params > budget:
            continue
        taken.add(id(g))
        counts[k] = counts.get(k, 0) + 1
        removed += g.num_params
    return removed


def select_groups(
    groups: list[Group],
    need: int,
    limits: dict,
    allocation: str = "global",
    normalize: str = "per_parameter",
    layer_sizes: dict[int, int] | None = None,
) -> list[Group]:
    """Groups to remove: ascending score order, each taken while it fits in the remaining budget `need`.

    'per_layer' first fills each layer's share of `need` (proportional to its size) inside the layer, then fills
    what rounding left over globally. The total lands within the smallest group's size of `need` whenever enough
    small groups remain.
    """
    _check_choice("allocation", allocation, ALLOCATIONS)
    ordered = sorted(groups, key=_key(normalize))
    counts: dict = {}
    taken: set[int] = set()
    removed = 0
    if allocation == "per_layer":
        sizes = layer_sizes or {}
        total = sum(sizes.values())
        if not total:
            raise ValueError("allocation='per_layer' needs the sizes of the prunable layers")
        for layer, size in sorted(sizes.items()):
            share = need * size // total
            removed += _fill([g for g in ordered if g.layer == layer], share, limits, counts, taken)
    removed += _fill(ordered, need - removed, limits, counts, taken)
    return [g for g in ordered if id(g) in taken]


def _plan_from_groups(ad: ArchAdapter, chosen: list[Group]) -> PrunePlan:
    plan = PrunePlan()
    by_layer: dict[int, list[Group]] = {}
    for g in chosen:
        by_layer.setdefault(g.layer, []).append(g)
    for i, gs in sorted(by_layer.items()):
        a, m = ad.attention(i), ad.mlp(i)
        drop_kv = {j for g in gs for j in g.kv_heads}
        drop_q = {h for g in gs if not g.kv_heads for h in g.query_heads}
        drop_ch = {c for g in gs for c in g.channels}
        if drop_kv:
            plan.kv_heads[i] = [j for j in range(a.num_kv_heads) if j not in drop_kv]
        if drop_q:
            plan.heads[i] = [h for h in range(a.num_heads) if h not in drop_q]
        if drop_ch:
            plan.mlp_channels[i] = [c for c in range(m.intermediate_size) if c not in drop_ch]
    return plan
