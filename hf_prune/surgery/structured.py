"""Structured surgery: remove whole decoder layers, attention heads (in whole GQA groups) and MLP channels.

`apply_structured(model, plan)` works in place on fp32/bf16 models on any device and leaves a model that
`save_pretrained` writes in a loadable format:

- every layer with the same widths: the family's standard config (plain `from_pretrained`, no hf_prune needed);
- widths that differ per layer: the family's `Pruned*` config/model class (hf_prune.modeling), whose code files
  and `auto_map` are written next to the weights for `trust_remote_code=True`.
"""

from __future__ import annotations

import torch
from torch import nn

from ..arch import ArchAdapter, base_model_type, get_adapter, unwrap_model
from ..modeling import PRUNED_CONFIGS, PRUNED_MODELS
from ..plan import PrunePlan
from .common import head_rows, refuse_compacted, swap_config
from .peft import (
    adapter_numel_per_col,
    adapter_numel_per_row,
    refuse_unsupported_peft_projections,
    remap_adapter_layers,
    select_cols_with_adapters,
    select_rows_with_adapters,
)

__all__ = ["apply_structured", "drop_layers", "is_uniform", "layer_widths", "predicted_num_parameters",
           "set_layer_widths_config"]


def prune_attention(ad: ArchAdapter, layer: int, q_keep: list[int], kv_keep: list[int]) -> None:
    a = ad.attention(layer)
    if len(q_keep) == a.num_heads and len(kv_keep) == a.num_kv_heads:
        return
    hd = a.head_dim
    q_rows, kv_rows = head_rows(q_keep, hd), head_rows(kv_keep, hd)
    m = a.module
    m.q_proj = select_rows_with_adapters(a.q_proj, q_rows)
    m.k_proj = select_rows_with_adapters(a.k_proj, kv_rows)
    m.v_proj = select_rows_with_adapters(a.v_proj, kv_rows)
    m.o_proj = select_cols_with_adapters(a.o_proj, q_rows)
    # q_norm / k_norm (Qwen3, Gemma3) normalise over head_dim with weights shared by all heads: nothing to cut.
    m.num_key_value_groups = len(q_keep) // len(kv_keep)


def prune_mlp(ad: ArchAdapter, layer: int, keep: list[int]) -> None:
    p = ad.mlp(layer)
    if len(keep) == p.intermediate_size:
        return
    idx = torch.tensor(sorted(keep), dtype=torch.long)
    m = p.module
    if p.gate_proj is not None:
        m.gate_proj = select_rows_with_adapters(p.gate_proj, idx)
    m.up_proj = select_rows_with_adapters(p.up_proj, idx)
    m.down_proj = select_cols_with_adapters(p.down_proj, idx)
    if hasattr(m, "intermediate_size"):
        m.intermediate_size = len(keep)


def drop_layers(ad: ArchAdapter, drop: set[int]) -> list[int]:
    kept = [i for i in range(ad.num_layers) if i not in drop]
    if not drop:
        return kept
    backbone = ad.backbone
    backbone.layers = nn.ModuleList([ad.layers[i] for i in kept])
    for new_idx, layer in enumerate(backbone.layers):
        for mod in layer.modules():  # the KV cache is indexed by layer_idx
            if hasattr(mod, "layer_idx"):
                mod.layer_idx = new_idx
    cfg = ad.config
    cfg.num_hidden_layers = len(kept)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in kept]
    if hasattr(cfg, "max_window_layers") and isinstance(cfg.max_window_layers, int):
        cfg.max_window_layers = sum(1 for i in kept if i < cfg.max_window_layers)
    remap_adapter_layers(ad.model, kept)  # a LoRA config's layers_to_transform follows the renumbering
    return kept


def layer_widths(model: nn.Module) -> list[tuple[int, int, int]]:
    """(query heads, kv heads, intermediate size) of every decoder layer, read from the module shapes."""
    ad = get_adapter(model)
    out = []
    for i in range(ad.num_layers):
        a, m = ad.attention(i), ad.mlp(i)
        out.append((a.num_heads, a.num_kv_heads, m.intermediate_size))
    return out


def is_uniform(model: nn.Module) -> bool:
    return len(set(layer_widths(model))) == 1


def _uniform_config_is_valid(cfg, nq: int) -> bool:
    # Standard Llama/Gemma configs require hidden_size % num_attention_heads == 0.
    try:
        probe = type(cfg).from_dict({**cfg.to_dict(), "num_attention_heads": nq})
        probe.validate()
        return True
    except Exception:
        return False


def set_layer_widths_config(model: nn.Module, compact_linears: list[dict[str, list[int]]] | None = None) -> None:
    """Write the module widths into the config: standard fields when uniform, else the Pruned* class (always with
    `compact_linears`, the shapes of CompactLinear projections per layer)."""
    model = unwrap_model(model)
    ad = get_adapter(model)
    cfg = model.config
    widths = layer_widths(model)
    family = base_model_type(cfg)
    head_dim = ad.attention(0).head_dim
    nq, nkv, inter = widths[0]
    pruned_class = PRUNED_MODELS[family]
    already_pruned = isinstance(model, pruned_class)
    if compact_linears is None:
        compact_linears = getattr(cfg, "layer_compact_linears", None)
    compacted = bool(compact_linears) and any(compact_linears)
    if not compacted and len(set(widths)) == 1 and _uniform_config_is_valid(cfg, nq):
        cfg.num_attention_heads = nq
        cfg.num_key_value_heads = nkv
        cfg.intermediate_size = inter
        cfg.head_dim = head_dim
        if already_pruned:
            cfg.layer_num_attention_heads = cfg.layer_num_key_value_heads = cfg.layer_intermediate_size = None
        return
    lists = {
        "layer_num_attention_heads": [w[0] for w in widths],
        "layer_num_key_value_heads": [w[1] for w in widths],
        "layer_intermediate_size": [w[2] for w in widths],
        "layer_compact_linears": compact_linears if compacted else None,
    }
    if already_pruned:
        for k, v in lists.items():
            setattr(cfg, k, v)
        return
    d = cfg.to_dict()
    for k in ("model_type", "architectures", "auto_map", "transformers_version"):
        d.pop(k, None)
    d["head_dim"] = head_dim
    new_cfg = PRUNED_CONFIGS[family].from_dict({**d, **lists, "base_model_type": family})
    swap_config(model, new_cfg)
    model.__class__ = pruned_class


def apply_structured(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Remove what `plan` names from `model`, in place. Validates first: an invalid plan raises PlanError and
    leaves every weight untouched. LoRA adapters on the projections are pruned with them (hf_prune.surgery.peft).
    Returns the (unwrapped) model."""
    model = unwrap_model(model)
    refuse_compacted(model, "surgery")
    plan.validate(model)
    refuse_unsupported_peft_projections(model, plan)
    ad = get_adapter(model)
    for layer in range(ad.num_layers):
        if layer in plan.drop_layers:
            continue
        if layer in plan.heads or layer in plan.kv_heads:
            q, kv = plan.resolved_heads(ad, layer)
            prune_attention(ad, layer, q, kv)
        if layer in plan.mlp_channels:
            prune_mlp(ad, layer, plan.mlp_channels[layer])
    drop_layers(ad, set(plan.drop_layers))
    set_layer_widths_config(model)
    return model


def predicted_num_parameters(model: nn.Module, plan: PrunePlan) -> int:
    """Parameter count the model will have after `apply(model, plan)`, computed from the plan alone."""
    model = unwrap_model(model)
    plan.validate(model)
    ad = get_adapter(model)
    total = sum(p.numel() for p in model.parameters())
    removed = 0
    for i in range(ad.num_layers):
        if i in plan.drop_layers:
            removed += sum(p.numel() for p in ad.layers[i].parameters())
            continue
        a, m = ad.attention(i), ad.mlp(i)
        q, kv = plan.resolved_heads(ad, i)
        hd = a.head_dim
        dq, dkv = (a.num_heads - len(q)) * hd, (a.num_kv_heads - len(kv)) * hd
        removed += dq * (a.q_proj.in_features + (a.q_proj.bias is not None) + adapter_numel_per_row(a.q_proj))
        removed += dkv * (a.k_proj.in_features + (a.k_proj.bias is not None) + adapter_numel_per_row(a.k_proj))
        removed += dkv * (a.v_proj.in_features + (a.v_proj.bias is not None) + adapter_numel_per_row(a.v_proj))
        removed += dq * (a.o_proj.out_features + adapter_numel_per_col(a.o_proj))
        if i in plan.mlp_channels:
            dc = m.intermediate_size - len(plan.mlp_channels[i])
            per = m.up_proj.in_features + (m.up_proj.bias is not None) + adapter_numel_per_row(m.up_proj)
            per += m.down_proj.out_features + adapter_numel_per_col(m.down_proj)
            if m.gate_proj is not None:
                per += m.gate_proj.in_features + (m.gate_proj.bias is not None) + adapter_numel_per_row(m.gate_proj)
            removed += dc * per
    return total - removed

