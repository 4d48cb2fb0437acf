"""Config classes for structurally pruned models whose layers differ in width.

Self-contained on purpose: this file is copied next to saved weights so that `trust_remote_code=True` loads them in a
process where hf_prune is not installed. It may import only torch, transformers and huggingface_hub (and its
sibling files, which are copied with it).

Each class extends its family's standard config; `make_pruned_config` makes one per entry of FAMILIES
(families_hf_prune.py). The global fields (num_attention_heads, num_key_value_heads,
intermediate_size) keep the *original* values so that every piece of family code that reads them still works; the
per-layer widths live in three lists. `layer_compact_linears` (per layer: {projection name: [kept rows, kept
columns]}) names projections stored without their zero rows and columns (CompactLinear in modeling_hf_prune.py). transformers' own `per_layer_config` is not used for these widths: the family
modeling code (LlamaAttention, the rotary embedding, generation utilities) reads the global attributes, which
`per_layer_config` makes ambiguous (AmbiguousGlobalPerLayerAttributeError), and transformers 5.23 builds every
layer from the global config anyway.
"""

from huggingface_hub.dataclasses import strict

from .families_hf_prune import FAMILIES, family_class, name_class


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


def make_pruned_config(family: str, base_config_cls: type, name: str | None = None, module: str = __name__) -> type:
    """The pruned config class of `family`: `base_config_cls` (the family's standard config) with `model_type`
    `pruned_<family>`, `base_model_type` = `family` and the per-layer width lists, checked on validation. Named
    `Pruned` + the base class's name unless `name` says otherwise; `module` is where it is published (its file is
    the one written next to the weights)."""
    model_type_name = f"pruned_{family}"

    @strict
    class PrunedConfig(base_config_cls):
        model_type = model_type_name
        base_model_type: str = family
        layer_num_attention_heads: list[int] | None = None
        layer_num_key_value_heads: list[int] | None = None
        layer_intermediate_size: list[int] | None = None
        layer_compact_linears: list[dict[str, list[int]]] | None = None

        def validate_architecture(self):
            super().validate_architecture()
            _check_per_layer(self)

    PrunedConfig.__doc__ = (f"{base_config_cls.__name__} with per-layer attention heads, kv heads and MLP widths "
                            "(see hf_prune's configuration_hf_prune.py).")
    cls = name_class(PrunedConfig, name or f"Pruned{base_config_cls.__name__}", module)
    cls.register_for_auto_class()
    return cls


# family -> its pruned config class, each also a module attribute under its own name (PrunedLlamaConfig, ...)
PRUNED_CONFIGS = {}
for _family, _spec in FAMILIES.items():
    _cls = PRUNED_CONFIGS[_family] = make_pruned_config(_family, family_class(_spec, "config"))
    globals()[_cls.__name__] = _cls
