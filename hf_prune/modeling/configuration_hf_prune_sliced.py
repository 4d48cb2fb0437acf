"""Config classes for residual-stream-sliced models (SliceGPT, Dynamic Slicing).

Self-contained on purpose: this file is copied next to saved weights so that `trust_remote_code=True` loads them in a
process where hf_prune is not installed. It may import only torch, transformers and huggingface_hub (and its
sibling files, which are copied with it).

A sliced model is its family's model in "rotation-invariant form" (Ashkboos et al., SliceGPT, ICLR 2024): every norm
is a scale-free RMS norm (its scale folded into the linears that read it), and the residual stream has its own width
at every point. The residual stream of an L-layer model has 2L + 1 *slots*:

    slot 2i      the residual entering layer i (read by q/k/v; slot 0 is written by the embedding)
    slot 2i + 1  the residual entering layer i's MLP (written by the attention output)
    slot 2L      the final residual (read by the head)

`residual_dims[s]` is the width of slot s. A residual add from slot s to slot s + 1 carries the stream through a
shortcut matrix (d_s x d_{s+1}) where `attn_shortcuts[i]` / `mlp_shortcuts[i]` say so; elsewhere it is the identity,
truncated or zero-padded to the next width. `head_projection` means the final norm ends with a d_{2L} -> d_0
projection into the embedding's basis so that the head stays tied to the (sliced) embedding.

`hidden_size` keeps the ORIGINAL width D: the scale-free norms average the squared entries over D, as the unsliced
model did (SliceGPT's RMSN), and family code that reads hidden_size (head_dim defaults, rotary) is unaffected.

`make_sliced_config` makes one class per entry of FAMILIES (families_hf_prune.py).
"""

from huggingface_hub.dataclasses import strict

from .families_hf_prune import FAMILIES, family_class, name_class


def _check_sliced(cfg) -> None:
    n = cfg.num_hidden_layers
    dims = cfg.residual_dims
    if dims is not None:
        if len(dims) != 2 * n + 1:
            raise ValueError(
                f"residual_dims has {len(dims)} entries; a model with num_hidden_layers={n} has {2 * n + 1} residual "
                "slots (embedding, then the attention and MLP inputs of every layer, then the final residual)"
            )
        bad = [d for d in dims if not 1 <= d <= cfg.hidden_size]
        if bad:
            raise ValueError(f"residual_dims contains widths {bad}; valid widths are 1..hidden_size={cfg.hidden_size}")
    for name in ("attn_shortcuts", "mlp_shortcuts"):
        flags = getattr(cfg, name)
        if flags is not None and len(flags) != n:
            raise ValueError(f"{name} has {len(flags)} entries but num_hidden_layers={n}")
    if cfg.tie_word_embeddings and not cfg.head_projection:
        raise ValueError(
            "tie_word_embeddings=True needs head_projection=True: a tied head reads the embedding's basis, so the "
            "final norm must end with the projection into it"
        )


def make_sliced_config(family: str, base_config_cls: type, name: str | None = None, module: str = __name__) -> type:
    """The sliced config class of `family`: `base_config_cls` (the family's standard config) with `model_type`
    `sliced_<family>`, `base_model_type` = `family` and the residual widths and shortcut flags, checked on validation.
    Named `Sliced` + the base class's name unless `name` says otherwise; `module` is where it is published."""
    model_type_name = f"sliced_{family}"

    @strict
    class SlicedConfig(base_config_cls):
        model_type = model_type_name
        base_model_type: str = family
        residual_dims: list[int] | None = None
        attn_shortcuts: list[bool] | None = None
        mlp_shortcuts: list[bool] | None = None
        head_projection: bool = False

        def validate_architecture(self):
            super().validate_architecture()
            _check_sliced(self)

    SlicedConfig.__doc__ = (f"{base_config_cls.__name__} with a residual stream of its own width at every slot "
                            "(see hf_prune's configuration_hf_prune_sliced.py).")
    cls = name_class(SlicedConfig, name or f"Sliced{base_config_cls.__name__}", module)
    cls.register_for_auto_class()
    return cls


# family -> its sliced config class, each also a module attribute under its own name (SlicedLlamaConfig, ...)
SLICED_CONFIGS = {}
for _family, _spec in FAMILIES.items():
    _cls = SLICED_CONFIGS[_family] = make_sliced_config(_family, family_class(_spec, "config"))
    globals()[_cls.__name__] = _cls
