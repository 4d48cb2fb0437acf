"""Apply a PrunePlan: physically smaller modules, config updated, layer indices fixed.

This is the only place in hf_prune that changes shapes. `apply(model, plan)` works in place on fp32/bf16 models
on any device and leaves a model that `save_pretrained` writes in a loadable format:

- every layer with the same widths: the family's standard config (plain `from_pretrained`, no hf_prune needed);
- widths that differ per layer: the family's `Pruned*` config/model class (hf_prune.modeling), whose code files
  and `auto_map` are written next to the weights for `trust_remote_code=True`.
"""

from __future__ import annotations

import torch
from torch import nn

from .arch import ArchAdapter, base_model_type, get_adapter, unwrap_model
from .modeling import PRUNED_CONFIGS, PRUNED_MODELS
from .modeling.modeling_hf_prune import CompactLinear
from .plan import PrunePlan

__all__ = ["apply", "compact_zeros", "predicted_num_parameters", "layer_widths", "is_uniform",
           "set_layer_widths_config"]


def _select_rows(lin: nn.Linear, rows: torch.Tensor) -> nn.Linear:
    new = nn.Linear(lin.in_features, len(rows), bias=lin.bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight.index_select(0, rows.to(lin.weight.device)))
        if lin.bias is not None:
            new.bias.copy_(lin.bias.index_select(0, rows.to(lin.bias.device)))
    new.weight.requires_grad_(lin.weight.requires_grad)
    if lin.bias is not None:
        new.bias.requires_grad_(lin.bias.requires_grad)
    return new


def _select_cols(lin: nn.Linear, cols: torch.Tensor) -> nn.Linear:
    new = nn.Linear(len(cols), lin.out_features, bias=lin.bias is not None, device=lin.weight.device,
                    dtype=lin.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(lin.weight.index_select(1, cols.to(lin.weight.device)))
        if lin.bias is not None:
            new.bias.copy_(lin.bias)
    new.weight.requires_grad_(lin.weight.requires_grad)
    if lin.bias is not None:
        new.bias.requires_grad_(lin.bias.requires_grad)
    return new


def _head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def _prune_attention(ad: ArchAdapter, layer: int, q_keep: list[int], kv_keep: list[int]) -> None:
    a = ad.attention(layer)
    if len(q_keep) == a.num_heads and len(kv_keep) == a.num_kv_heads:
        return
    hd = a.head_dim
    q_rows, kv_rows = _head_rows(q_keep, hd), _head_rows(kv_keep, hd)
    m = a.module
    m.q_proj = _select_rows(a.q_proj, q_rows)
    m.k_proj = _select_rows(a.k_proj, kv_rows)
    m.v_proj = _select_rows(a.v_proj, kv_rows)
    m.o_proj = _select_cols(a.o_proj, q_rows)
    # q_norm / k_norm (Qwen3, Gemma3) normalise over head_dim with weights shared by all heads: nothing to cut.
    m.num_key_value_groups = len(q_keep) // len(kv_keep)


def _prune_mlp(ad: ArchAdapter, layer: int, keep: list[int]) -> None:
    p = ad.mlp(layer)
    if len(keep) == p.intermediate_size:
        return
    idx = torch.tensor(sorted(keep), dtype=torch.long)
    m = p.module
    if p.gate_proj is not None:
        m.gate_proj = _select_rows(p.gate_proj, idx)
    m.up_proj = _select_rows(p.up_proj, idx)
    m.down_proj = _select_cols(p.down_proj, idx)
    if hasattr(m, "intermediate_size"):
        m.intermediate_size = len(keep)


def _drop_layers(ad: ArchAdapter, drop: set[int]) -> list[int]:
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


def _swap_config(model: nn.Module, new_cfg) -> None:
    old = model.config
    new_cfg._attn_implementation = old._attn_implementation
    for mod in model.modules():
        if getattr(mod, "config", None) is old:
            mod.config = new_cfg


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
    _swap_config(model, new_cfg)
    model.__class__ = pruned_class


def apply(model: nn.Module, plan: PrunePlan) -> nn.Module:
    """Remove what `plan` names from `model`, in place. Validates first: an invalid plan raises PlanError and
    leaves every weight untouched. Returns the (unwrapped) model."""
    model = unwrap_model(model)
    _refuse_compacted(model, "surgery")
    plan.validate(model)
    ad = get_adapter(model)
    for layer in range(ad.num_layers):
        if layer in plan.drop_layers:
            continue
        if layer in plan.heads or layer in plan.kv_heads:
            q, kv = plan.resolved_heads(ad, layer)
            _prune_attention(ad, layer, q, kv)
        if layer in plan.mlp_channels:
            _prune_mlp(ad, layer, plan.mlp_channels[layer])
    _drop_layers(ad, set(plan.drop_layers))
    set_layer_widths_config(model)
    return model


def _refuse_compacted(model: nn.Module, what: str) -> None:
    if any(isinstance(m, CompactLinear) for m in model.modules()):
        raise ValueError(f"the model has CompactLinear projections (compact_zeros): {what} must come before "
                         "compaction; prune the uncompacted model, or reload it from before compact_zeros")


def compact_zeros(model: nn.Module, min_fraction: float = 0.05) -> dict[str, int]:
    """Store every decoder projection without its zero rows (weight row and bias entry zero) and zero columns, in
    place (`CompactLinear`); the model computes the same function with fewer parameters. This removes the zeros that
    head / channel surgery cannot: query and key rows inside a head, single value / output dimensions, residual-stream
    rows and columns. The result uses the family's `Pruned*` class (`layer_compact_linears` in the config) and
    saves / reloads like any pruned model. Run it last: surgery refuses a compacted model, and PEFT does not wrap
    CompactLinear. `min_fraction`: a projection is compacted only when that fraction of its parameters goes, since
    the index gather and scatter cost time on every call (on LLM Surgeon's SmolLM2 results 5% keeps about 97% of the
    saving with 40% of the projections). Returns {"linears": projections compacted, "parameters_removed": ...}."""
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction={min_fraction}; valid: 0 <= min_fraction <= 1")
    model = unwrap_model(model)
    from .modeling import SLICED_MODELS

    if isinstance(model, tuple(SLICED_MODELS.values())):
        raise ValueError(f"compact_zeros works on head/channel-pruned models, not on a sliced {type(model).__name__} "
                         "(its widths are already the slicing's)")
    ad = get_adapter(model)
    old = getattr(model.config, "layer_compact_linears", None)
    compact = [dict(e) for e in old] if old else [{} for _ in range(ad.num_layers)]
    count = removed = 0
    for i in range(ad.num_layers):
        parents = {"attention": ad.attention(i).module, "mlp": ad.mlp(i).module}
        for short, lin in list(ad.linears(i)):
            if not isinstance(lin, nn.Linear):
                continue
            w = lin.weight.detach()
            zero_rows = (w == 0).all(1)
            if lin.bias is not None:
                zero_rows &= lin.bias.detach() == 0
            zero_cols = (w == 0).all(0)
            if not (bool(zero_rows.any()) or bool(zero_cols.any())):
                continue
            rows = torch.nonzero(~zero_rows).flatten()
            cols = torch.nonzero(~zero_cols).flatten()
            rows = rows if rows.numel() else torch.zeros(1, dtype=torch.long, device=w.device)  # keep one zero row
            cols = cols if cols.numel() else torch.zeros(1, dtype=torch.long, device=w.device)
            total = sum(p.numel() for p in lin.parameters())
            kept = rows.numel() * cols.numel() + (rows.numel() if lin.bias is not None else 0)
            if total - kept < max(1, min_fraction * total):
                continue
            new = CompactLinear.from_linear(lin, rows, cols)
            removed += total - kept
            parent = parents["attention" if short in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"]
            setattr(parent, short, new)
            compact[i][short] = [int(rows.numel()), int(cols.numel())]
            count += 1
    if count:
        set_layer_widths_config(model, compact)
    return {"linears": count, "parameters_removed": removed}


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
        removed += dq * (a.q_proj.in_features + (a.q_proj.bias is not None))
        removed += dkv * (a.k_proj.in_features + (a.k_proj.bias is not None))
        removed += dkv * (a.v_proj.in_features + (a.v_proj.bias is not None))
        removed += dq * a.o_proj.out_features
        if i in plan.mlp_channels:
            dc = m.intermediate_size - len(plan.mlp_channels[i])
            per = m.up_proj.in_features + (m.up_proj.bias is not None) + m.down_proj.out_features
            if m.gate_proj is not None:
                per += m.gate_proj.in_features + (m.gate_proj.bias is not None)
            removed += dc * per
    return total - removed


# ======================================================================================================================
# Residual-stream slicing (SliceGPT, Dynamic Slicing). Additive section: the functions above are untouched.
# ======================================================================================================================


def _keep_leading_cols(lin: nn.Linear, d: int) -> nn.Linear:
    return lin if lin.in_features == d else _select_cols(lin, torch.arange(d))


def _keep_leading_rows(lin: nn.Linear, d: int) -> nn.Linear:
    return lin if lin.out_features == d else _select_rows(lin, torch.arange(d))


def _slicing_dims(model: nn.Module, widths) -> list[int]:
    if isinstance(widths, PrunePlan):
        rw = widths.residual_widths or {}
        if "residual_dims" not in rw:
            raise ValueError(
                "the plan has no residual_widths['residual_dims']; it was not made by a slicing method "
                f"(residual_widths={rw!r})"
            )
        widths = rw["residual_dims"]
    return [int(d) for d in widths]


def apply_slicing(model: nn.Module, widths) -> nn.Module:
    """Slice the residual stream of a rotation-invariant model (hf_prune.rotation) to per-slot widths, in place.

    `widths` is a PrunePlan from a slicing method (its `residual_widths["residual_dims"]`) or the list of 2L + 1
    slot widths itself. Every slot keeps its LEADING dims (after a PCA rotation: the principal ones): readers keep
    their first d_s input columns, writers their first d_s output rows, the embedding its first d_0 columns, each
    shortcut matrix its leading d_src x d_dst block. Widths can only shrink. Returns the (unwrapped) model, whose
    config records the widths; save_pretrained writes the Sliced* config and code files.
    """
    from .rotation import _attn_writer, _mlp_writer, _require_invariant, num_slots, slot_widths

    model = _require_invariant(model)
    dims = _slicing_dims(model, widths)
    n = num_slots(model)
    if len(dims) != n:
        raise ValueError(f"{len(dims)} widths given; this model has {n} residual slots (2 * num_layers + 1)")
    current = slot_widths(model)
    bad = {s: (d, c) for s, (d, c) in enumerate(zip(dims, current)) if not 1 <= d <= c}
    if bad:
        raise ValueError(f"widths must be between 1 and the current width; slot: (asked, current) = {bad}")
    backbone = model.model
    emb = backbone.embed_tokens
    if emb.weight.shape[1] != dims[0]:
        with torch.no_grad():
            emb.weight = nn.Parameter(emb.weight[:, : dims[0]].clone(), requires_grad=emb.weight.requires_grad)
        emb.embedding_dim = dims[0]
    for i, layer in enumerate(backbone.layers):
        d_in, d_mid, d_out = dims[2 * i], dims[2 * i + 1], dims[2 * i + 2]
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = _keep_leading_cols(attn.q_proj, d_in)
        attn.k_proj = _keep_leading_cols(attn.k_proj, d_in)
        attn.v_proj = _keep_leading_cols(attn.v_proj, d_in)
        if getattr(mlp, "gate_proj", None) is not None:
            mlp.gate_proj = _keep_leading_cols(mlp.gate_proj, d_mid)
        mlp.up_proj = _keep_leading_cols(mlp.up_proj, d_mid)
        if layer.sandwich_norms:
            layer.post_attention_layernorm.proj = _keep_leading_rows(_attn_writer(layer), d_mid)
            layer.post_feedforward_layernorm.proj = _keep_leading_rows(_mlp_writer(layer), d_out)
        else:
            attn.o_proj = _keep_leading_rows(attn.o_proj, d_mid)
            mlp.down_proj = _keep_leading_rows(mlp.down_proj, d_out)
        for attr, (a, b) in (("attn_shortcut", (d_in, d_mid)), ("mlp_shortcut", (d_mid, d_out))):
            sc = getattr(layer, attr)
            if sc is not None:
                setattr(layer, attr, _keep_leading_rows(_keep_leading_cols(sc, a), b))
    head_in = dims[-1]
    if model.config.head_projection:
        backbone.norm.proj = _keep_leading_rows(_keep_leading_cols(backbone.norm.proj, head_in), dims[0])
        model.lm_head.weight = emb.weight  # tied: the head is the sliced embedding
        model.lm_head.in_features = dims[0]
    else:
        model.lm_head = _keep_leading_cols(model.lm_head, head_in)
    model.config.residual_dims = dims
    return model


def sliced_num_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter count of a (sliced) model split into parts: total (tied tensors once), shortcuts (residual
    shortcut matrices), projections (tied-head and Gemma post-norm projections), head (an untied lm_head)."""
    model = unwrap_model(model)
    total = sum(p.numel() for p in model.parameters())
    shortcut = projections = 0
    for name, p in model.named_parameters():
        if "_shortcut." in name:
            shortcut += p.numel()
        elif name.endswith("norm.proj.weight"):
            projections += p.numel()
    head = 0 if getattr(model.config, "tie_word_embeddings", False) else model.lm_head.weight.numel()
    return {"total": total, "shortcuts": shortcut, "projections": projections, "untied_head": head}
