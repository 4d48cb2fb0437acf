"""The model families that have reduced-architecture classes: the one table every `Pruned*` and `Sliced*` class is
generated from.

Self-contained on purpose: the configuration and modeling files import it, so it is copied next to saved weights with
them and loads where hf_prune is not installed (`trust_remote_code=True`). It may import only the standard library,
torch and transformers; it names the transformers classes rather than importing them, so that loading a config does
not import the modeling code (and torch) of every family.

Adding a family = one entry in FAMILIES + its adapter in hf_prune/arch + its tiny-config tests. The generated classes
take their names from the family's own classes (`Pruned` + `LlamaConfig`, `Sliced` + `LlamaModel`, ...), and their
`model_type` is `pruned_<family>` / `sliced_<family>`: names and model types are what saved `config.json` files and
their `auto_map` entries refer to, so an entry, once released, keeps its class names.
"""

import importlib
from types import FunctionType
from typing import NamedTuple


class Family(NamedTuple):
    """Where a family's classes live in transformers (`transformers.models.<module>`) and what they are called."""

    module: str  # configuration_<module>.py and modeling_<module>.py
    config: str  # its text config class
    causal_lm: str  # its causal LM class
    backbone: str  # the decoder stack inside the causal LM (`causal_lm.model`)
    attention: str  # the attention module of a decoder layer (`layer.self_attn`)
    mlp: str  # the MLP module of a decoder layer (`layer.mlp`)
    sandwich_norms: bool = False  # norms on the sublayer outputs before the residual add (Gemma 2/3)


# family model_type -> its transformers classes
FAMILIES = {
    "llama": Family("llama", "LlamaConfig", "LlamaForCausalLM", "LlamaModel", "LlamaAttention", "LlamaMLP"),
    "mistral": Family("mistral", "MistralConfig", "MistralForCausalLM", "MistralModel", "MistralAttention",
                      "MistralMLP"),
    "qwen2": Family("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "Qwen2Model", "Qwen2Attention", "Qwen2MLP"),
    "qwen3": Family("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "Qwen3Model", "Qwen3Attention", "Qwen3MLP"),
    "gemma3_text": Family("gemma3", "Gemma3TextConfig", "Gemma3ForCausalLM", "Gemma3TextModel", "Gemma3Attention",
                          "Gemma3MLP", sandwich_norms=True),
}


def family_class(family: Family, role: str) -> type:
    """The transformers class that plays `role` (a Family field: config, causal_lm, backbone, attention, mlp) in
    `family`; the config from configuration_<module>, the others from modeling_<module>."""
    name = getattr(family, role)
    kind = "configuration" if role == "config" else "modeling"
    return getattr(importlib.import_module(f"transformers.models.{family.module}.{kind}_{family.module}"), name)


def name_class(cls: type, name: str, module: str) -> type:
    """Give a class made inside a factory function its public name, as if written at the top of `module`."""
    cls.__name__ = cls.__qualname__ = name
    cls.__module__ = module
    for attr, value in vars(cls).items():  # its methods (not the classes it refers to)
        if isinstance(value, FunctionType) and "<locals>" in value.__qualname__:
            value.__qualname__ = f"{name}.{attr}"
    return cls
