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


class PrunedMistralForCausalLM(MistralForCausalLM):
    config_class = PrunedMistralConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)


class PrunedQwen2ForCausalLM(Qwen2ForCausalLM):
    config_class = PrunedQwen2Config

    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)


class PrunedQwen3ForCausalLM(Qwen3ForCausalLM):
    config_class = PrunedQwen3Config

    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)


class PrunedGemma3ForCausalLM(Gemma3ForCausalLM):
    config_class = PrunedGemma3TextConfig

    def __init__(self, config):
        super().__init__(config)
        apply_layer_widths(self)


PRUNED_MODELS = {
    "llama": PrunedLlamaForCausalLM,
    "mistral": PrunedMistralForCausalLM,
    "qwen2": PrunedQwen2ForCausalLM,
    "qwen3": PrunedQwen3ForCausalLM,
    "gemma3_text": PrunedGemma3ForCausalLM,
}

for _cls in PRUNED_MODELS.values():
    _cls.register_for_auto_class("AutoModelForCausalLM")
