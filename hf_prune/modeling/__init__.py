"""Config and model classes for reduced architectures, registered with the Auto classes on import.

Uniform results never need these: surgery writes the family's standard config. Results whose layers differ in
width use the `Pruned*` classes, residual-stream-sliced results the `Sliced*` classes; their code files are written
next to the weights (auto_map) so that `trust_remote_code=True` loads them where hf_prune is not installed.

Every class is generated from one definition per kind (`make_pruned_config` / `make_pruned_model`,
`make_sliced_config` / `make_sliced_backbone` / `make_sliced_model`) for every entry of FAMILIES: adding a family is
one entry there, its adapter in hf_prune/arch and its tiny-config tests.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_hf_prune import PRUNED_CONFIGS, make_pruned_config
from .configuration_hf_prune_sliced import SLICED_CONFIGS, make_sliced_config
from .families_hf_prune import FAMILIES, Family
from .modeling_hf_prune import PRUNED_MODELS, apply_layer_widths, make_pruned_model
from .modeling_hf_prune_sliced import SLICED_MODELS, make_sliced_backbone, make_sliced_model

for _family in FAMILIES:
    for _cfg, _model in ((PRUNED_CONFIGS[_family], PRUNED_MODELS[_family]),
                         (SLICED_CONFIGS[_family], SLICED_MODELS[_family])):
        AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
        AutoModelForCausalLM.register(_cfg, _model, exist_ok=True)

__all__ = [
    "FAMILIES",
    "Family",
    "PRUNED_CONFIGS",
    "PRUNED_MODELS",
    "SLICED_CONFIGS",
    "SLICED_MODELS",
    "apply_layer_widths",
    "make_pruned_config",
    "make_pruned_model",
    "make_sliced_backbone",
    "make_sliced_model",
    "make_sliced_config",
]
