"""PEFT (LoRA) models through surgery: the adapters are pruned with the base weights, or surgery refuses up front.

A LoRA projection computes y = W x + b + s * B (A x) (Hu et al., 2021, "LoRA"). Removing output row r of the
projection removes row r of W, b and B; removing input column c removes column c of W and A. The pruned model then
equals "merge, then prune" exactly, and the PeftModel keeps working (forward, training, `merge_and_unload`,
`save_pretrained` of the adapter). A removed decoder layer takes its adapters with it.

What cannot be pruned exactly is refused before anything changes, with what to do instead: a slicing plan (the
rotation changes every weight), a plan with a weight update attached (LLM Surgeon), DoRA and other LoRA variants,
quantized LoRA layers, adapters other than LoRA on a projection the plan narrows, prefix tuning / adaption prompts,
adapter configs that name layer indices when layers are dropped, and `compact_zeros`.

peft is imported lazily: a model can only hold PEFT modules once peft has been imported, so `sys.modules` is asked
first and `import hf_prune` stays light.
"""

from __future__ import annotations

import re
import sys

import torch
from torch import nn

from ..arch import get_adapter, unwrap_model
from ..plan import PrunePlan
from .common import select_cols, select_rows

__all__ = [
    "MERGE_FIRST",
    "PeftSurgeryError",
    "adapter_numel_per_col",
    "adapter_numel_per_row",
    "is_peft_model",
    "refuse_peft",
    "refuse_unsupported_peft_plan",
    "refuse_unsupported_peft_projections",
    "remap_adapter_layers",
    "select_cols_with_adapters",
    "select_rows_with_adapters",
]

MERGE_FIRST = "merge the adapter first: model = model.merge_and_unload()"


class PeftSurgeryError(ValueError):
    """Surgery cannot prune this PEFT model exactly; nothing was changed."""


def peft_loaded() -> bool:
    """True when peft has been imported in this process (no PEFT module can exist otherwise)."""
    return "peft" in sys.modules


def tuner_layer_type() -> type | None:
    if not peft_loaded():
        return None
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


def lora_linear_type() -> type | None:
    if not peft_loaded():
        return None
    from peft.tuners.lora import Linear

    return Linear


def is_lora_linear(module: nn.Module) -> bool:
    """True for peft's plain `lora.Linear` (not a quantized or otherwise derived LoRA layer)."""
    cls = lora_linear_type()
    return cls is not None and type(module) is cls


def peft_configs(model: nn.Module) -> list:
    """The PEFT configs attached to `model` (the PeftModel wrapper and/or the base model holding injected layers)."""
    out, seen = [], set()
    for m in (model, unwrap_model(model)):
        cfgs = getattr(m, "peft_config", None)
        if isinstance(cfgs, dict):
            for cfg in cfgs.values():
                if id(cfg) not in seen:
                    seen.add(id(cfg))
                    out.append(cfg)
    return out


def is_peft_model(model: nn.Module) -> bool:
    """True for a PeftModel wrapper or a model with PEFT tuner layers injected (`inject_adapter_in_model`)."""
    tuner = tuner_layer_type()
    if tuner is None:
        return False
    if peft_configs(model):
        return True
    return any(isinstance(m, tuner) for m in unwrap_model(model).modules())


def refuse_peft(model: nn.Module, what: str) -> None:
    """Raise PeftSurgeryError when `model` is a PEFT model: `what` cannot keep its adapters."""
    if is_peft_model(model):
        raise PeftSurgeryError(f"{what} does not support PEFT models (it would drop or corrupt the adapter); "
                               f"{MERGE_FIRST}, then run {what} on the merged model")


def refuse_unsupported_peft_plan(model: nn.Module, plan: PrunePlan, has_weight_update: bool) -> None:
    """Checks that need only the plan, run by `apply` before anything else: a PEFT model takes structured plans
    without a weight update; prefix tuning and adaption prompts (per-layer, per-head state) are refused."""
    if not is_peft_model(model):
        return
    if plan.residual_widths:
        raise PeftSurgeryError("the plan slices the residual stream (residual_widths) and the model is a PEFT model: "
                               "the rotation changes every weight, so the adapter cannot follow; "
                               f"{MERGE_FIRST}, then plan and prune the merged model")
    if has_weight_update:
        raise PeftSurgeryError("the plan carries a weight update (its method compensates the remaining weights, e.g. "
                               "LLM Surgeon) and the model is a PEFT model: the update applies to merged weights; "
                               f"{MERGE_FIRST}, then plan and prune the merged model")
    for cfg in peft_configs(model):
        kind = str(getattr(cfg, "peft_type", type(cfg).__name__))
        if "PREFIX_TUNING" in kind or getattr(cfg, "is_adaption_prompt", False):
            raise PeftSurgeryError(f"peft_type={kind} keeps per-layer, per-head state that surgery cannot prune; "
                                   "remove the adapter (model = model.get_base_model()), prune, and train a new one")


def narrowed_projections(model: nn.Module, plan: PrunePlan) -> list[tuple[int, str, nn.Module]]:
    """(layer, name, module) of every projection whose shape the (validated) plan changes in a kept layer."""
    ad = get_adapter(model)
    out = []
    for i in range(ad.num_layers):
        if i in plan.drop_layers:
            continue
        a, m = ad.attention(i), ad.mlp(i)
        q, kv = plan.resolved_heads(ad, i)
        if len(q) != a.num_heads or len(kv) != a.num_kv_heads:
            out += [(i, n, getattr(a, n)) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        if i in plan.mlp_channels and len(plan.mlp_channels[i]) != m.intermediate_size:
            out += [(i, n, getattr(m, n)) for n in ("gate_proj", "up_proj", "down_proj") if getattr(m, n) is not None]
    return out


def lora_layer_problem(module: nn.Module) -> str | None:
    """Why `module` (a projection the plan narrows) cannot be pruned with its adapter, or None when it can."""
    if type(module) is nn.Linear:
        return None
    if not is_lora_linear(module):
        return (f"it is a {type(module).__module__}.{type(module).__name__}; surgery prunes plain nn.Linear "
                "projections and peft's lora.Linear only")
    if type(module.base_layer) is not nn.Linear:
        return (f"its base layer is a {type(module.base_layer).__name__} (stacked adapters or quantized weights); "
                "the base layer must be a plain nn.Linear")
    if getattr(module, "fan_in_fan_out", False):
        return "it stores its weight transposed (fan_in_fan_out=True)"
    if any(module.use_dora.values()) or len(module.lora_magnitude_vector) or getattr(module, "lora_variant", None):
        variants = sorted(set(getattr(module, "lora_variant", {}) or {}) | {k for k, v in module.use_dora.items() if v})
        return (f"adapters {variants} use a LoRA variant (DoRA or another lora_variant) whose magnitude or extra "
                "state depends on whole rows; only plain LoRA can be pruned exactly")
    if len(module.lora_embedding_A) or len(module.lora_embedding_B):
        return "it holds embedding LoRA weights"
    return None


def digits_in(value) -> bool:
    if value is None:
        return False
    if isinstance(value, str):
        return bool(re.search(r"\d", value))
    if isinstance(value, dict):
        return any(digits_in(k) for k in value)
    if isinstance(value, (list, tuple, set)):
        return any(digits_in(v) for v in value)
    return False


def refuse_unsupported_peft_projections(model: nn.Module, plan: PrunePlan) -> None:
    """Checks run by structured surgery after the plan is validated, before any weight moves: every projection the
    plan narrows is a plain nn.Linear or a plain lora.Linear, and the adapter config stays true when layers are
    dropped (`layers_to_transform` is renumbered; patterns that may name layer indices are refused)."""
    if not is_peft_model(model):
        return
    for layer, name, module in narrowed_projections(model, plan):
        why = lora_layer_problem(module)
        if why is not None:
            raise PeftSurgeryError(f"layer {layer} {name} cannot be pruned with its adapter: {why}; {MERGE_FIRST}, "
                                   "then prune the merged model")
    if not plan.drop_layers:
        return
    dropped = set(plan.drop_layers)
    for cfg in peft_configs(model):
        for field in ("target_modules", "exclude_modules", "rank_pattern", "alpha_pattern"):
            value = getattr(cfg, field, None)
            if (field.endswith("_pattern") or isinstance(value, str)) and digits_in(value):
                raise PeftSurgeryError(f"the plan drops layers {sorted(dropped)} and the adapter config's {field}="
                                       f"{value!r} may name layer indices, which would point at other layers after "
                                       f"renumbering; {MERGE_FIRST}, or write {field} without layer numbers")
        ltt = getattr(cfg, "layers_to_transform", None)
        if ltt is not None:
            old = [ltt] if isinstance(ltt, int) else list(ltt)
            if all(i in dropped for i in old):
                raise PeftSurgeryError(f"the plan drops every layer the adapter targets (layers_to_transform={ltt}); "
                                       f"{MERGE_FIRST}, or keep one of those layers")


def remap_adapter_layers(model: nn.Module, kept: list[int]) -> None:
    """After layers are dropped (`kept` = surviving original indices in order), renumber every adapter config's
    `layers_to_transform`, so the saved adapter loads onto the pruned base."""
    new_index = {old: new for new, old in enumerate(kept)}
    for cfg in peft_configs(model):
        ltt = getattr(cfg, "layers_to_transform", None)
        if ltt is None:
            continue
        old = [ltt] if isinstance(ltt, int) else list(ltt)
        cfg.layers_to_transform = [new_index[i] for i in old if i in new_index]


def select_rows_with_adapters(lin: nn.Module, rows: torch.Tensor) -> nn.Module:
    """`select_rows` for a projection that may carry LoRA: keeps `rows` of the base weight, its bias and every
    adapter's lora_B (and lora_B bias); lora_A, dropout and scaling are unchanged. Returns the same lora.Linear
    (updated in place), or a new nn.Linear for a plain projection."""
    if not is_lora_linear(lin):
        return select_rows(lin, rows)
    lin.base_layer = select_rows(lin.base_layer, rows)
    for name in list(lin.lora_B.keys()):
        lin.lora_B[name] = select_rows(lin.lora_B[name], rows)
    lin.out_features = len(rows)
    return lin


def select_cols_with_adapters(lin: nn.Module, cols: torch.Tensor) -> nn.Module:
    """`select_cols` for a projection that may carry LoRA: keeps `cols` of the base weight and of every adapter's
    lora_A; the bias and lora_B are unchanged. Returns the same lora.Linear, or a new nn.Linear."""
    if not is_lora_linear(lin):
        return select_cols(lin, cols)
    lin.base_layer = select_cols(lin.base_layer, cols)
    for name in list(lin.lora_A.keys()):
        lin.lora_A[name] = select_cols(lin.lora_A[name], cols)
    lin.in_features = len(cols)
    return lin


def adapter_numel_per_row(lin: nn.Module) -> int:
    """Adapter parameters that one output row of `lin` carries (lora_B rows and their bias); 0 without LoRA."""
    if not is_lora_linear(lin):
        return 0
    return sum(b.in_features + (b.bias is not None) for b in lin.lora_B.values())


def adapter_numel_per_col(lin: nn.Module) -> int:
    """Adapter parameters that one input column of `lin` carries (lora_A columns); 0 without LoRA."""
    if not is_lora_linear(lin):
        return 0
    return sum(a.out_features for a in lin.lora_A.values())
