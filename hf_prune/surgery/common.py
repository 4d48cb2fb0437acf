"""Building blocks shared by every kind of surgery: copies of linears that keep some rows or columns, config swaps."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.modeling_hf_prune import CompactLinear

__all__ = ["head_rows", "keep_leading_cols", "keep_leading_rows", "refuse_compacted", "select_cols", "select_rows",
           "swap_config"]


def select_rows(lin: nn.Linear, rows: torch.Tensor) -> nn.Linear:
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


def select_cols(lin: nn.Linear, cols: torch.Tensor) -> nn.Linear:
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


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def swap_config(model: nn.Module, new_cfg) -> None:
    old = model.config
    new_cfg._attn_implementation = old._attn_implementation
    for mod in model.modules():
        if getattr(mod, "config", None) is old:
            mod.config = new_cfg


def refuse_compacted(model: nn.Module, what: str) -> None:
    if any(isinstance(m, CompactLinear) for m in model.modules()):
        raise ValueError(f"the model has CompactLinear projections (compact_zeros): {what} must come before "
                         "compaction; prune the uncompacted model, or reload it from before compact_zeros")


def keep_leading_cols(lin: nn.Linear, d: int) -> nn.Linear:
    return lin if lin.in_features == d else select_cols(lin, torch.arange(d))


def keep_leading_rows(lin: nn.Linear, d: int) -> nn.Linear:
    return lin if lin.out_features == d else select_rows(lin, torch.arange(d))

