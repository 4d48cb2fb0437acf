"""The reduced-architecture classes are generated from one table of families (hf_prune/modeling/families_hf_prune.py).

Every family in the table has its pruned and sliced classes under their released names and model types (the names
that saved `config.json` files and `auto_map` entries refer to), registered with the Auto classes; a family added to
the table gets all of them with nothing else written (here: SmolLM3, which is not in the table).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import TINY_MODEL_TYPES, tiny_config, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from hf_prune import get_adapter
from hf_prune.modeling import (
    FAMILIES,
    PRUNED_CONFIGS,
    PRUNED_MODELS,
    SLICED_CONFIGS,
    SLICED_MODELS,
    Family,
    configuration_hf_prune,
    configuration_hf_prune_sliced,
    make_pruned_config,
    make_pruned_model,
    make_sliced_backbone,
    make_sliced_config,
    make_sliced_model,
    modeling_hf_prune,
    modeling_hf_prune_sliced,
)
from hf_prune.modeling.families_hf_prune import family_class

# the released names: saved exports refer to them (config.json model_type, auto_map "<file>.<class>"), so they never
# change; a new family adds its own line
RELEASED = {
    "llama": ("PrunedLlamaConfig", "PrunedLlamaForCausalLM", "SlicedLlamaConfig", "SlicedLlamaModel",
              "SlicedLlamaForCausalLM"),
    "mistral": ("PrunedMistralConfig", "PrunedMistralForCausalLM", "SlicedMistralConfig", "SlicedMistralModel",
                "SlicedMistralForCausalLM"),
    "qwen2": ("PrunedQwen2Config", "PrunedQwen2ForCausalLM", "SlicedQwen2Config", "SlicedQwen2Model",
              "SlicedQwen2ForCausalLM"),
    "qwen3": ("PrunedQwen3Config", "PrunedQwen3ForCausalLM", "SlicedQwen3Config", "SlicedQwen3Model",
              "SlicedQwen3ForCausalLM"),
    "gemma3_text": ("PrunedGemma3TextConfig", "PrunedGemma3ForCausalLM", "SlicedGemma3TextConfig",
                    "SlicedGemma3TextModel", "SlicedGemma3ForCausalLM"),
}

# a family that is not in the table: Llama-like (q/k/v/o, gate/up/down, RMSNorm), with NoPE layers
SMOLLM3 = Family("smollm3", "SmolLM3Config", "SmolLM3ForCausalLM", "SmolLM3Model", "SmolLM3Attention", "SmolLM3MLP")

IDS = torch.tensor([[5, 17, 42, 9, 100, 33, 7, 250, 64, 11, 2, 90, 31, 8, 77, 150] * 2])


def _tiny(config_cls: type, family: str):
    """A tiny config of `config_cls` with per-layer widths (pruned) or residual widths (sliced)."""
    d = tiny_config(family).to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        d.pop(k)
    if config_cls.model_type.startswith("pruned_"):
        extra = {"layer_intermediate_size": [64, 32, 96, 128]}
    else:
        extra = {"residual_dims": [64, 60, 56, 60, 48, 64, 40, 50, 32], "head_projection": True,
                 "tie_word_embeddings": True}
    return config_cls.from_dict({**d, **extra})


def test_every_family_in_the_table_has_an_adapter_and_tiny_config_tests():
    assert set(FAMILIES) == set(TINY_MODEL_TYPES) == set(RELEASED)
    for family in FAMILIES:
        assert get_adapter(tiny_model(family, num_hidden_layers=1)) is not None


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_has_its_classes_under_their_released_names(family):
    spec = FAMILIES[family]
    pruned_cfg, pruned_lm, sliced_cfg, sliced_backbone, sliced_lm = RELEASED[family]
    expected = [  # (file, released name, generated class, model_type, the transformers class it extends)
        (configuration_hf_prune, pruned_cfg, PRUNED_CONFIGS[family], f"pruned_{family}", "config"),
        (modeling_hf_prune, pruned_lm, PRUNED_MODELS[family], f"pruned_{family}", "causal_lm"),
        (configuration_hf_prune_sliced, sliced_cfg, SLICED_CONFIGS[family], f"sliced_{family}", "config"),
        (modeling_hf_prune_sliced, sliced_backbone, SLICED_MODELS[family].backbone_class, f"sliced_{family}",
         "backbone"),
        (modeling_hf_prune_sliced, sliced_lm, SLICED_MODELS[family], f"sliced_{family}", "causal_lm"),
    ]
    for module, name, cls, model_type, role in expected:
        # a module attribute of the file that is copied next to the weights, under its released name
        assert getattr(module, name) is cls and cls.__name__ == cls.__qualname__ == name
        assert cls.__module__ == module.__name__
        assert cls.__bases__[-1] is family_class(spec, role)
        config_cls = cls if role == "config" else cls.config_class
        assert config_cls.model_type == model_type and config_cls.base_model_type == family  # the field default
    # registered with the Auto classes, as transformers resolves a saved config.json
    for config_cls, model_cls in ((PRUNED_CONFIGS[family], PRUNED_MODELS[family]),
                                  (SLICED_CONFIGS[family], SLICED_MODELS[family])):
        assert type(AutoConfig.for_model(config_cls.model_type, tie_word_embeddings=False)) is config_cls
        assert type(AutoModelForCausalLM.from_config(_tiny(config_cls, family))) is model_cls
        assert config_cls._auto_class == "AutoConfig" and model_cls._auto_class == "AutoModelForCausalLM"
    sliced = SLICED_MODELS[family]
    assert sliced.attention_class is family_class(spec, "attention") and sliced.mlp_class is family_class(spec, "mlp")
    assert sliced.sandwich_norms == spec.sandwich_norms


def test_saved_pruned_and_sliced_models_point_auto_map_at_their_released_names(tmp_path):
    for family in ("llama", "gemma3_text"):
        for kind, config_cls, config_file in (("pruned", PRUNED_CONFIGS[family], "configuration_hf_prune"),
                                              ("sliced", SLICED_CONFIGS[family], "configuration_hf_prune_sliced")):
            model = AutoModelForCausalLM.from_config(_tiny(config_cls, family))
            model.save_pretrained(tmp_path / f"{kind}_{family}")
            saved = json.loads((tmp_path / f"{kind}_{family}" / "config.json").read_text())
            names = RELEASED[family]
            config_name, model_name = (names[0], names[1]) if kind == "pruned" else (names[2], names[4])
            assert saved["model_type"] == f"{kind}_{family}"
            assert saved["auto_map"] == {"AutoConfig": f"{config_file}.{config_name}",
                                         "AutoModelForCausalLM": f"{config_file.replace('configuration', 'modeling')}"
                                                                 f".{model_name}"}
            files = {p.name for p in (tmp_path / f"{kind}_{family}").iterdir()}
            # the code files travel with the weights, the families table with them (a relative import)
            assert {f"{config_file}.py", f"{config_file.replace('configuration', 'modeling')}.py",
                    "families_hf_prune.py"} <= files


# ----- a family that is not in the table ------------------------------------------------------------------------------
def _smollm3_config_dict(**extra) -> dict:
    base = family_class(SMOLLM3, "config")(
        hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
        vocab_size=320, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=3, bos_token_id=1,
        eos_token_id=2,
    ).to_dict()
    for k in ("model_type", "architectures", "transformers_version"):
        base.pop(k, None)
    return {**base, **extra}


def test_a_new_table_entry_gets_pruned_classes_with_nothing_else_written():
    config_cls = make_pruned_config("smollm3", family_class(SMOLLM3, "config"))
    model_cls = make_pruned_model(family_class(SMOLLM3, "causal_lm"), config_cls)
    assert (config_cls.__name__, config_cls.model_type, model_cls.__name__) == (
        "PrunedSmolLM3Config", "pruned_smollm3", "PrunedSmolLM3ForCausalLM")
    assert config_cls().base_model_type == "smollm3" and model_cls.config_class is config_cls

    # at the family's own widths it is the family's model: same parameters, same logits
    torch.manual_seed(0)
    dense = family_class(SMOLLM3, "causal_lm")(family_class(SMOLLM3, "config").from_dict(_smollm3_config_dict()))
    same = model_cls(config_cls.from_dict(_smollm3_config_dict())).eval()
    same.load_state_dict(dense.state_dict())
    with torch.no_grad():
        assert torch.equal(same(IDS).logits, dense.eval()(IDS).logits)

    # per-layer widths (and a compact projection) give every layer its own shapes, and the model runs
    cfg = config_cls.from_dict(_smollm3_config_dict(
        layer_num_attention_heads=[4, 2, 4, 2], layer_num_key_value_heads=[2, 1, 2, 2],
        layer_intermediate_size=[128, 64, 32, 100], layer_compact_linears=[{"q_proj": [48, 60]}, {}, {}, {}]))
    pruned = model_cls(cfg).eval()
    layers = pruned.model.layers
    assert [layer.self_attn.q_proj.out_features for layer in layers] == [64, 32, 64, 32]
    assert [layer.self_attn.k_proj.out_features for layer in layers] == [32, 16, 32, 32]
    assert [layer.mlp.down_proj.in_features for layer in layers] == [128, 64, 32, 100]
    assert tuple(layers[0].self_attn.q_proj.weight.shape) == (48, 60)
    with pytest.raises(Exception, match="layer_intermediate_size has 3 entries"):
        config_cls.from_dict(_smollm3_config_dict(layer_intermediate_size=[1, 2, 3]))
    with torch.no_grad():
        assert pruned(IDS).logits.shape == (1, IDS.shape[1], 320)


def test_a_new_table_entry_gets_sliced_classes_with_nothing_else_written(tmp_path):
    config_cls = make_sliced_config("smollm3", family_class(SMOLLM3, "config"))
    attention = family_class(SMOLLM3, "attention")
    backbone = make_sliced_backbone(family_class(SMOLLM3, "backbone"), config_cls, attention)
    model_cls = make_sliced_model(family_class(SMOLLM3, "causal_lm"), config_cls, backbone, attention,
                                  family_class(SMOLLM3, "mlp"), SMOLLM3.sandwich_norms)
    assert (config_cls.__name__, config_cls.model_type, backbone.__name__, model_cls.__name__) == (
        "SlicedSmolLM3Config", "sliced_smollm3", "SlicedSmolLM3Model", "SlicedSmolLM3ForCausalLM")

    dims = [64, 60, 56, 60, 48, 64, 40, 50, 32]
    cfg = config_cls.from_dict(_smollm3_config_dict(
        residual_dims=dims, attn_shortcuts=[True, False, True, False], mlp_shortcuts=[False, True, False, True]))
    torch.manual_seed(0)
    model = model_cls(cfg).eval()
    assert type(model.model) is backbone and model.model.embed_tokens.weight.shape[1] == dims[0]
    layers = model.model.layers
    assert [layer.self_attn.q_proj.in_features for layer in layers] == dims[0:-1:2]
    assert [layer.mlp.down_proj.out_features for layer in layers] == dims[2::2]
    assert [layer.attn_shortcut is not None for layer in layers] == [True, False, True, False]
    assert model.lm_head.in_features == dims[-1]
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
        ref = model(IDS).logits
    assert ref.shape == (1, IDS.shape[1], 320)

    # save and reload with the generated class: the same logits
    model.save_pretrained(tmp_path / "sliced")
    again = model_cls.from_pretrained(tmp_path / "sliced").eval()
    with torch.no_grad():
        assert (again(IDS).logits - ref).abs().max().item() <= 1e-5


BLOCK_HF_PRUNE = textwrap.dedent(
    """
    import sys, importlib.abc
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_prune" or name.startswith("hf_prune."):
                raise ImportError("hf_prune is hidden in this process")
    sys.meta_path.insert(0, _Block())
    """
)

NEW_FAMILY = textwrap.dedent(
    """
    import json, os, sys, torch
    sys.path.insert(0, sys.argv[1])
    import modeling_copy  # hf_prune/modeling with one more entry in its table: generates and registers every class
    from modeling_copy import configuration_hf_prune as pc, configuration_hf_prune_sliced as sc
    from modeling_copy import modeling_hf_prune as pm, modeling_hf_prune_sliced as sm
    from transformers import AutoConfig, AutoModelForCausalLM
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=320, tie_word_embeddings=False, pad_token_id=3, bos_token_id=1,
                 eos_token_id=2)
    widths = {"pruned": dict(layer_num_attention_heads=[4, 2], layer_num_key_value_heads=[2, 1],
                             layer_intermediate_size=[96, 32]),
              "sliced": dict(residual_dims=[64, 48, 56, 40, 32], attn_shortcuts=[True, False],
                             mlp_shortcuts=[False, True])}
    ids = torch.tensor([[5, 17, 42, 9, 100, 33, 7, 250, 64, 11]])
    out = {}
    for kind in ("pruned", "sliced"):
        cfg = AutoConfig.for_model(f"{kind}_smollm3", **small, **widths[kind])
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg).eval()
        with torch.no_grad():
            ref = model(ids).logits
        path = os.path.join(sys.argv[1], kind)
        model.save_pretrained(path)
        torch.save({"ids": ids, "logits": ref}, os.path.join(path, "reference.pt"))
        out[kind] = [type(cfg).__name__, type(model).__name__, type(model.model).__name__]
    out["attributes"] = [hasattr(pc, "PrunedSmolLM3Config"), hasattr(pm, "PrunedSmolLM3ForCausalLM"),
                         hasattr(sc, "SlicedSmolLM3Config"), hasattr(sm, "SlicedSmolLM3Model"),
                         hasattr(sm, "SlicedSmolLM3ForCausalLM")]
    print("RESULT" + json.dumps(out))
    """
)

RELOAD = textwrap.dedent(
    """
    import json, os, sys, torch
    from transformers import AutoModelForCausalLM
    out = {}
    for kind in ("pruned", "sliced"):
        path = os.path.join(sys.argv[1], kind)
        model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()  # the code saved with it
        ref = torch.load(os.path.join(path, "reference.pt"))
        with torch.no_grad():
            diff = (model(ref["ids"]).logits - ref["logits"]).abs().max().item()
        out[kind] = [type(model).__name__, type(model).__module__.split(".")[0], diff <= 1e-5]
    print("RESULT" + json.dumps(out))
    """
)


def _run(script: str, *args: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", BLOCK_HF_PRUNE + script, *args], capture_output=True, text=True,
                          cwd="/tmp", timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][len("RESULT"):])


@pytest.mark.slow  # a fresh process
def test_one_table_entry_is_all_a_new_family_needs(tmp_path):
    """Copy hf_prune/modeling, add SmolLM3 to the copy's table and change nothing else: in a process without hf_prune
    the copy generates, registers and exports the pruned and sliced SmolLM3 classes, and what it saves loads back
    with trust_remote_code (the code files written next to the weights carry the table)."""
    copy = tmp_path / "modeling_copy"
    copy.mkdir()
    for source in Path(modeling_hf_prune.__file__).parent.glob("*.py"):
        (copy / source.name).write_text(source.read_text())
    table = copy / "families_hf_prune.py"
    text = table.read_text()
    assert text.count("FAMILIES = {\n") == 1
    table.write_text(text.replace("FAMILIES = {\n", "FAMILIES = {\n    \"smollm3\": Family(\"smollm3\", \"SmolLM3Config\", "
                                  "\"SmolLM3ForCausalLM\", \"SmolLM3Model\", \"SmolLM3Attention\", \"SmolLM3MLP\"),\n"))
    assert _run(NEW_FAMILY, str(tmp_path)) == {
        "pruned": ["PrunedSmolLM3Config", "PrunedSmolLM3ForCausalLM", "SmolLM3Model"],
        "sliced": ["SlicedSmolLM3Config", "SlicedSmolLM3ForCausalLM", "SlicedSmolLM3Model"],
        "attributes": [True, True, True, True, True],
    }
    assert {"configuration_hf_prune.py", "modeling_hf_prune.py", "families_hf_prune.py"} <= {
        p.name for p in (tmp_path / "pruned").iterdir()}
    # a fresh process that has neither hf_prune nor the copy: the files saved next to the weights are enough
    assert _run(RELOAD, str(tmp_path)) == {
        "pruned": ["PrunedSmolLM3ForCausalLM", "transformers_modules", True],
        "sliced": ["SlicedSmolLM3ForCausalLM", "transformers_modules", True],
    }
