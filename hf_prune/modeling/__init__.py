"""Config and model classes for reduced architectures, registered with the Auto classes on import.

Uniform results never need these: surgery writes the family's standard config. Results whose layers differ in
width use the `Pruned*` classes; their code files are written next to the weights (auto_map) so that
`trust_remote_code=True` loads them where hf_prune is not installed.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_hf_prune import PRUNED_CONFIGS
from .modeling_hf_prune import PRUNED_MODELS, apply_layer_widths

for _family, _cfg in PRUNED_CONFIGS.items():
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoModelForCausalLM.register(_cfg, PRUNED_MODELS[_family], exist_ok=True)

__all__ = ["PRUNED_CONFIGS", "PRUNED_MODELS", "apply_layer_widths"]

# ----- residual-stream-sliced models (SliceGPT, Dynamic Slicing) -----
from .configuration_hf_prune_sliced import SLICED_CONFIGS  # noqa: E402
from .modeling_hf_prune_sliced import SLICED_MODELS  # noqa: E402

for _family, _cfg in SLICED_CONFIGS.items():
    AutoConfig.register(_cfg.model_type, _cfg, exist_ok=True)
    AutoModelForCausalLM.register(_cfg, SLICED_MODELS[_family], exist_ok=True)

__all__ += ["SLICED_CONFIGS", "SLICED_MODELS"]
