"""Model classes for structurally pruned models whose layers differ in width.

Self-contained on purpose (see configuration_hf_prune.py): copied next to saved weights for `trust_remote_code`.
Each class is its family's standard causal LM; after the standard construction it rebuilds the attention and MLP
projections of every layer at the widths the config lists, so the state dict keys are the family's own.
"""

import torch
from torch import nn
from transformers import Gemma3ForCausalLM, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM

from .configuration_hf_prune import (
    PrunedGemma3TextConfig,
    PrunedLlamaConfig,
    PrunedMistralConfig,
    PrunedQwen2Config,
    PrunedQwen3Config,
)


def _resized(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    if old.in_features == in_features and old.out_features == out_features:
        return old
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


class CompactLinear(nn.Module):
    """A linear layer stored without its zero rows and columns.

    y[..., out_index] = x[..., in_index] @ weight.T + bias; every other output is zero. `in_features` and
    `out_features` are the full sizes, so the module replaces an nn.Linear whose pruned rows (with their bias entries)
    and columns are exactly zero, with the same outputs. The index buffers are saved with the weights. It is not an
    nn.Linear, so PEFT does not wrap it: compact after the last training.
    """

    def __init__(self, in_features: int, out_features: int, kept_in: int, kept_out: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(kept_out, kept_in, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(kept_out, device=device, dtype=dtype)) if bias else None
        self.register_buffer("in_index", torch.arange(kept_in, device=device), persistent=True)
        self.register_buffer("out_index", torch.arange(kept_out, device=device), persistent=True)

    @classmethod
    def from_linear(cls, lin: nn.Linear, rows: torch.Tensor, cols: torch.Tensor) -> "CompactLinear":
        """The rows `rows` and columns `cols` (sorted index tensors) of `lin`."""
        w = lin.weight
        new = cls(lin.in_features, lin.out_features, len(cols), len(rows), lin.bias is not None, w.device, w.dtype)
        with torch.no_grad():
            rows, cols = rows.to(w.device), cols.to(w.device)
            new.weight.copy_(w.index_select(0, rows).index_select(1, cols))
            if lin.bias is not None:
                new.bias.copy_(lin.bias.index_select(0, rows))
            new.in_index.copy_(cols)
            new.out_index.copy_(rows)
        new.weight.requires_grad_(w.requires_grad)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.shape[1] != self.in_features:
            x = x.index_select(-1, self.in_index)
        y = nn.functional.linear(x, self.weight, self.bias)
        if self.weight.shape[0] == self.out_features:
            return y
        out = y.new_zeros(*y.shape[:-1], self.out_features)
        return out.index_copy_(out.dim() - 1, self.out_index, y)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features} (kept {self.weight.shape[1]}), out_features={self.out_features} "
                f"(kept {self.weight.shape[0]}), bias={self.bias is not None}")


def _projection_parent(layer: nn.Module, name: str) -> nn.Module:
    return layer.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp


def apply_compact_linears(model: nn.Module) -> None:
    """Replace the projections the config lists in `layer_compact_linears` by CompactLinear modules of those
    shapes (weights and index buffers come from the checkpoint)."""
    compact = getattr(model.config, "layer_compact_linears", None)
    if not compact:
        return
    for layer, entry in zip(model.model.layers, compact):
        for name, (rows, cols) in entry.items():
            parent = _projection_parent(layer, name)
            old = getattr(parent, name)
            setattr(parent, name, CompactLinear(old.in_features, old.out_features, cols, rows, old.bias is not None,
                                                old.weight.device, old.weight.dtype))


def apply_layer_widths(model: nn.Module) -> None:
    """Give every decoder layer the attention and MLP widths its config lists (weights are re-created)."""
    cfg = model.config
    heads, kv_heads, inter = cfg.layer_num_attention_heads, cfg.layer_num_key_value_heads, cfg.layer_intermediate_size
    for i, layer in enumerate(model.model.layers):
        attn = layer.self_attn
        hd = attn.head_dim
        if heads is not None or kv_heads is not None:
            nq = heads[i] if heads is not None else attn.q_proj.out_features // hd
            nkv = kv_heads[i] if kv_heads is not None else attn.k_proj.out_features // hd
            hidden = attn.q_proj.in_features
            attn.q_proj = _resized(attn.q_proj, hidden, nq * hd)
            attn.k_proj = _resized(attn.k_proj, hidden, nkv * hd)
            attn.v_proj = _resized(attn.v_proj, hidden, nkv * hd)
            attn.o_proj = _resized(attn.o_proj, nq * hd, attn.o_proj.out_features)
            attn.num_key_value_groups = nq // nkv
        if inter is not None:
            mlp = layer.mlp
            hidden = mlp.up_proj.in_features
            mlp.gate_proj = _resized(mlp.gate_proj, hidden, inter[i])
            mlp.up_proj = _resized(mlp.up_proj, hidden, inter[i])
            mlp.down_proj = _resized(mlp.down_proj, inter[i], mlp.down_proj.out_features)
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = inter[i]


class PrunedLlamaForCausalLM(LlamaForCausalLM):
    config_class = PrunedLlamaConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)
        apply_compact_linears(self)


class PrunedMistralForCausalLM(MistralForCausalLM):
    config_class = PrunedMistralConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)
        apply_compact_linears(self)


class PrunedQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = PrunedQwen2Config

    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)
        apply_compact_linears(self)


class PrunedQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = PrunedQwen3Config

    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)
        apply_compact_linears(self)


class PrunedGemma3ForCausalLM(Gemma3ForCausalLM):
    config_class = PrunedGemma3TextConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)
        apply_compact_linears(self)


PRUNED_MODELS = {
    "llama": PrunedLlamaForCausalLM,
    "mistral": PrunedMistralForCausalLM,
    "qwen2": PrunedQwen2ForCausalLM,
    "qwen3": PrunedQwen3ForCausalLM,
    "gemma3_text": PrunedGemma3ForCausalLM,
}

for _cls in PRUNED_MODELS.values():
    _cls.register_for_auto_class("AutoModelForCausalLM")
