"""Config classes for structurally pruned models whose layers differ in width.

Self-contained on purpose: this file is copied next to saved weights so that `trust_remote_code=True` loads them in a
process where hf_prune is not installed. It may import only torch, transformers and huggingface_hub.

Each class extends its family's standard config. The global fields (num_attention_heads, num_key_value_heads,
intermediate_size) keep the *original* values so that every piece of family code that reads them still works; the
per-layer widths live in three lists. `layer_compact_linears` (per layer: {projection name: [kept rows, kept
columns]}) names projections stored without their zero rows and columns (CompactLinear in modeling_hf_prune.py). transformers' own `per_layer_config` is not used for these widths: the family
modeling code (LlamaAttention, the rotary embedding, generation utilities) reads the global attributes, which
`per_layer_config` makes ambiguous (AmbiguousGlobalPerLayerAttributeError), and transformers 5.23 builds every
layer from the global config anyway.
"""

from huggingface_hub.dataclasses import strict
from transformers import Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config


COMPACT_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _check_per_layer(cfg) -> None:
    n = cfg.num_hidden_layers
    for name in ("layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size"):
        values = getattr(cfg, name)
        if values is not None and len(values) != n:
            raise ValueError(f"{name} has {len(values)} entries but num_hidden_layers={n}")
        if values is not None and any(v < 1 for v in values):
            raise ValueError(f"{name}={values} contains a width below 1")
    compact = cfg.layer_compact_linears
    if compact is not None:
        if len(compact) != n:
            raise ValueError(f"layer_compact_linears has {len(compact)} entries but num_hidden_layers={n}")
        for i, entry in enumerate(compact):
            for name, shape in entry.items():
                if name not in COMPACT_LINEAR_NAMES or len(shape) != 2 or min(shape) < 1:
                    raise ValueError(f"layer_compact_linears[{i}][{name!r}]={shape}: valid names are "
                                     f"{COMPACT_LINEAR_NAMES}, each with [kept rows, kept columns] >= 1")
    q, kv = cfg.layer_num_attention_heads, cfg.layer_num_key_value_heads
    if q is not None and kv is not None:
        for i, (a, b) in enumerate(zip(q, kv)):
            if a % b:
                raise ValueError(f"layer {i}: {a} query heads is not a multiple of {b} kv heads")


@strict
class PrunedLlamaConfig(LlamaConfig):
    model_type = "pruned_llama"
    base_model_type: str = "llama"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    layer_compact_linears: list[dict[str, list[int]]] | None = None

    def validate_architecture(self):
        super().validate_architecture()
        _check_per_layer(self)


@strict
class PrunedMistralConfig(MistralConfig):
    model_type = "pruned_mistral"
    base_model_type: str = "mistral"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    layer_compact_linears: list[dict[str, list[int]]] | None = None

    def validate_architecture(self):
        _check_per_layer(self)


@strict
class PrunedQwen2Config(Qwen2Config):
    model_type = "pruned_qwen2"
    base_model_type: str = "qwen2"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    layer_compact_linears: list[dict[str, list[int]]] | None = None

    def validate_architecture(self):
        _check_per_layer(self)


@strict
class PrunedQwen3Config(Qwen3Config):
    model_type = "pruned_qwen3"
    base_model_type: str = "qwen3"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    layer_compact_linears: list[dict[str, list[int]]] | None = None

    def validate_architecture(self):
        _check_per_layer(self)


@strict
class PrunedGemma3TextConfig(Gemma3TextConfig):
    model_type = "pruned_gemma3_text"
    base_model_type: str = "gemma3_text"
    layer_num_attention_heads: list[int] | None = None
    layer_num_key_value_heads: list[int] | None = None
    layer_intermediate_size: list[int] | None = None
    layer_compact_linears: list[dict[str, list[int]]] | None = None

    def validate_architecture(self):
        _check_per_layer(self)


PRUNED_CONFIGS = {
    "llama": PrunedLlamaConfig,
    "mistral": PrunedMistralConfig,
    "qwen2": PrunedQwen2Config,
    "qwen3": PrunedQwen3Config,
    "gemma3_text": PrunedGemma3TextConfig,
}

for _cls in PRUNED_CONFIGS.values():
    _cls.register_for_auto_class()
