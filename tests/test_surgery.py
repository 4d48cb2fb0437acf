"""Surgery and saved formats: every reduced model reloads with from_pretrained and reproduces its logits."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import TINY_MODEL_TYPES, tiny_config, tiny_model

import hf_prune
from hf_prune import PlanError, PrunePlan, apply, get_adapter, predicted_num_parameters
from hf_prune.surgery import layer_widths

IDS = torch.tensor([[5, 17, 42, 9, 100, 33, 7, 250, 64, 11, 2, 90, 31, 8, 77, 150] * 3])

# a plan touching every kind of structure: drop a layer, remove a kv group with its query heads, remove query heads
# inside groups (group sizes stay equal), cut MLP channels
HETERO = PrunePlan(
    drop_layers=[1],
    kv_heads={2: [1]},
    heads={3: [0, 2]},
    mlp_channels={0: list(range(0, 128, 2)), 3: list(range(100))},
)
UNIFORM = PrunePlan(drop_layers=[0, 2], mlp_channels={1: list(range(96)), 3: list(range(32, 128))})

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

RELOAD = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    out = {}
    for d, trust in json.loads(sys.argv[1]):
        m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=trust).eval()
        ids = torch.load(d + "/ids.pt")
        with torch.no_grad():
            logits = m(ids).logits
        ref = torch.load(d + "/logits.pt")
        gen = m.generate(ids[:, :8], max_new_tokens=8, do_sample=False, use_cache=True).tolist()
        out[d] = {"diff": (logits - ref).abs().max().item(), "gen": gen, "class": type(m).__name__,
                  "module": type(m).__module__}
    print("RESULT" + json.dumps(out))
    """
)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _save_with_reference(model, directory: Path, ids: torch.Tensor = IDS) -> list:
    model.save_pretrained(directory)
    torch.save(ids, directory / "ids.pt")
    torch.save(_logits(model, ids), directory / "logits.pt")
    return model.generate(ids[:, :8], max_new_tokens=8, do_sample=False, use_cache=True).tolist()


def _reload_in_fresh_process(dirs: list[tuple[str, bool]], hide_hf_prune: bool) -> dict:
    prelude = BLOCK_HF_PRUNE if hide_hf_prune else "import hf_prune\n"
    proc = subprocess.run(
        [sys.executable, "-c", prelude + RELOAD, json.dumps(dirs)],
        capture_output=True, text=True, cwd="/tmp", timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every family pruned heterogeneously and uniformly, saved with reference logits and generations."""
    root = tmp_path_factory.mktemp("saved")
    records = {}
    for mt in TINY_MODEL_TYPES:
        for kind, plan in (("hetero", HETERO), ("uniform", UNIFORM)):
            m = tiny_model(mt)
            predicted = predicted_num_parameters(m, plan)
            apply(m, plan)
            d = root / f"{mt}-{kind}"
            gen = _save_with_reference(m, d)
            plan.save(d)
            records[(mt, kind)] = {"dir": str(d), "gen": gen, "model": m, "predicted": predicted}
    return records


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_every_adapter_sees_every_projection(model_type):
    m = tiny_model(model_type)
    ad = get_adapter(m)
    cfg = m.config
    assert ad.num_layers == cfg.num_hidden_layers
    for i in range(ad.num_layers):
        a, mlp = ad.attention(i), ad.mlp(i)
        assert (a.num_heads, a.num_kv_heads) == (cfg.num_attention_heads, cfg.num_key_value_heads)
        assert a.q_proj.weight.shape == (cfg.num_attention_heads * a.head_dim, cfg.hidden_size)
        assert a.o_proj.weight.shape == (cfg.hidden_size, cfg.num_attention_heads * a.head_dim)
        assert mlp.down_proj.weight.shape == (cfg.hidden_size, cfg.intermediate_size)
        assert len(dict(ad.linears(i))) == 7
    assert ad.final_norm is m.model.norm and ad.lm_head is m.lm_head


def test_unsupported_family_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ValueError, match="supported model types: .*llama.*qwen3"):
        get_adapter(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)))


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
@pytest.mark.parametrize("kind", ["hetero", "uniform"])
def test_parameter_count_matches_plan(saved, model_type, kind):
    rec = saved[(model_type, kind)]
    assert sum(p.numel() for p in rec["model"].parameters()) == rec["predicted"]


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_saved_formats(saved, model_type):
    hetero = json.loads(Path(saved[(model_type, "hetero")]["dir"], "config.json").read_text())
    uniform = json.loads(Path(saved[(model_type, "uniform")]["dir"], "config.json").read_text())
    assert hetero["model_type"] == f"pruned_{model_type}" and "auto_map" in hetero
    assert hetero["num_hidden_layers"] == 3
    assert hetero["layer_num_key_value_heads"][1] == 1  # original layer 2 is new layer 1
    assert uniform["model_type"] == model_type and "auto_map" not in uniform
    assert uniform["num_hidden_layers"] == 2 and uniform["intermediate_size"] == 96
    assert PrunePlan.load(saved[(model_type, "uniform")]["dir"]).drop_layers == [0, 2]


def test_reload_with_hf_prune(saved):
    dirs = [(rec["dir"], False) for rec in saved.values()]
    res = _reload_in_fresh_process(dirs, hide_hf_prune=False)
    for rec in saved.values():
        r = res[rec["dir"]]
        assert r["diff"] <= 1e-5, (rec["dir"], r["diff"])
        assert r["gen"] == rec["gen"], rec["dir"]


def test_reload_without_hf_prune(saved):
    """Standard configs load with plain from_pretrained, pruned ones with trust_remote_code, hf_prune hidden."""
    dirs = [(rec["dir"], kind == "hetero") for (mt, kind), rec in saved.items()]
    res = _reload_in_fresh_process(dirs, hide_hf_prune=True)
    for (mt, kind), rec in saved.items():
        r = res[rec["dir"]]
        assert r["diff"] <= 1e-5, (rec["dir"], r["diff"])
        assert r["gen"] == rec["gen"], rec["dir"]
        if kind == "hetero":
            assert r["module"].startswith("transformers_modules"), r["module"]
        else:
            assert r["module"].startswith("transformers.models"), r["module"]


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_removing_zeroed_structures_keeps_logits(model_type):
    m = tiny_model(model_type)
    ad = get_adapter(m)
    hd = ad.attention(0).head_dim
    with torch.no_grad():
        # layer 1 becomes an identity: its attention and MLP write nothing to the residual stream
        ad.attention(1).o_proj.weight.zero_()
        ad.mlp(1).down_proj.weight.zero_()
        # layer 0: kv group 0 (query heads 0, 1) writes nothing
        ad.attention(0).o_proj.weight[:, : 2 * hd].zero_()
        # layer 2: query heads 1 and 3 (one per group) write nothing
        ad.attention(2).o_proj.weight[:, hd : 2 * hd].zero_()
        ad.attention(2).o_proj.weight[:, 3 * hd : 4 * hd].zero_()
        # layer 3: MLP channels 10..59 write nothing
        ad.mlp(3).down_proj.weight[:, 10:60].zero_()
    before = _logits(m)
    plan = PrunePlan(
        drop_layers=[1], kv_heads={0: [1]}, heads={2: [0, 2]},
        mlp_channels={3: [c for c in range(128) if not 10 <= c < 60]},
    )
    apply(m, plan)
    after = _logits(m)
    assert (before - after).abs().max().item() <= 1e-5
    # and the cache still works after renumbering the layers
    out = m.generate(IDS[:, :6], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 12)


INVALID = [
    (PrunePlan(drop_layers=[4]), "out of range"),
    (PrunePlan(drop_layers=[1, 1]), "repeated"),
    (PrunePlan(drop_layers=[0, 1, 2, 3]), "removes all 4 layers"),
    (PrunePlan(heads={0: [0, 1, 2]}), "same number of query heads"),
    (PrunePlan(heads={0: [0, 1]}, kv_heads={0: [0, 1]}), "same number of query heads"),
    (PrunePlan(heads={0: [0]}, kv_heads={0: [1]}), "belongs to kv head 0"),
    (PrunePlan(heads={0: [7]}), "out of range"),
    (PrunePlan(kv_heads={0: []}), "keeps no attention head"),
    (PrunePlan(mlp_channels={2: []}), "keeps no channel"),
    (PrunePlan(mlp_channels={2: [0, 200]}), "out of range"),
    (PrunePlan(drop_layers=[2], mlp_channels={2: [0]}), "drop_layers removes"),
    (PrunePlan(mlp_channels={9: [0]}), "valid layers are 0..3"),
    (PrunePlan(residual_widths={"0": 32}), "residual_widths"),
]


@pytest.mark.parametrize("plan,message", INVALID, ids=[m for _, m in INVALID])
def test_invalid_plan_raises_before_touching(plan, message):
    m = tiny_model("llama")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(PlanError, match=message):
        apply(m, plan)
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert m.config.num_hidden_layers == 4


def test_plan_json_roundtrip():
    again = PrunePlan.from_json(HETERO.to_json())
    assert again == HETERO
    with pytest.raises(PlanError, match="unknown plan fields"):
        PrunePlan.from_dict({"drop_layer": [1]})


def test_bf16_surgery_keeps_dtype_and_second_prune_stays_loadable(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config("qwen3"), dtype=torch.bfloat16).eval()
    apply(m, HETERO)
    assert all(p.dtype == torch.bfloat16 for p in m.parameters())
    # prune the already pruned (heterogeneous) model again, with indices of its current layers
    apply(m, PrunePlan(drop_layers=[0], mlp_channels={2: list(range(10))}))
    assert m.config.num_hidden_layers == 2 and m.config.layer_intermediate_size == [128, 10]
    m.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert torch.equal(_logits(m), _logits(m2))
    assert layer_widths(m2) == layer_widths(m)


@pytest.mark.slow
def test_real_smollm2_example(tmp_path):
    """The issue's example: 4 layers dropped, 1 of 3 kv groups removed in two layers, 25% of MLP channels in five."""
    from hf_prune.assets import load_smollm2

    model, tok = load_smollm2()
    n_before = sum(p.numel() for p in model.parameters())
    plan = PrunePlan(
        drop_layers=[20, 22, 24, 26],
        kv_heads={5: [0, 2], 12: [1, 2]},
        mlp_channels={i: [c for c in range(1536) if c % 4] for i in (3, 8, 13, 18, 23)},
    )
    predicted = predicted_num_parameters(model, plan)
    apply(model, plan)
    assert sum(p.numel() for p in model.parameters()) == predicted < n_before
    ids = tok("The Lord is my shepherd; I shall not want.", return_tensors="pt").input_ids
    gen = _save_with_reference(model, tmp_path, ids)
    for hide in (False, True):
        r = _reload_in_fresh_process([(str(tmp_path), True)], hide_hf_prune=hide)[str(tmp_path)]
        assert r["diff"] <= 1e-5 and r["gen"] == gen


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_composed_plan_equals_two_stages(model_type):
    """plan1.then(plan2) applied once gives the same model (logits, widths, parameter count) as plan1 then plan2."""
    torch.manual_seed(0)
    model = tiny_model(model_type, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4, seed=1)
    twice = tiny_model(model_type, num_hidden_layers=5, num_attention_heads=8, num_key_value_heads=4, seed=1)
    first = PrunePlan(drop_layers=[1], heads={2: [7, 6, 1, 0]}, mlp_channels={0: list(range(0, 128, 2)), 3: [5, 9, 1]},
                      provenance={"method": "a"})
    first_r = first.resolve(twice)
    assert first_r.kv_heads[2] == [0, 3]
    apply(twice, first)
    # indices of the pruned model: its layer 1 is original layer 2 (2 kv groups of 2 heads left), layer 2 is 3
    second = PrunePlan(drop_layers=[3], kv_heads={1: [1]}, heads={0: [0, 1, 2, 3]},
                       mlp_channels={0: [0, 3, 63], 2: [2, 0]}, provenance={"method": "b"})
    second_r = second.resolve(twice)
    apply(twice, second)
    both = first_r.then(second_r)
    assert both.drop_layers == [1, 4]
    assert both.heads == {0: [0, 1, 2, 3], 2: [6, 7]} and both.kv_heads == {0: [0, 1], 2: [3]}
    assert both.mlp_channels == {0: [0, 6, 126], 3: [1, 9]}
    assert [s["method"] for s in both.provenance["stages"]] == ["a", "b"]
    assert predicted_num_parameters(model, both) == sum(p.numel() for p in twice.parameters())
    apply(model, PrunePlan.from_json(both.to_json()))
    assert layer_widths(model) == layer_widths(twice)
    torch.testing.assert_close(_logits(model), _logits(twice), atol=1e-6, rtol=0)
    with pytest.raises(PlanError, match="resolve"):
        first.then(second)


# ----- compact_zeros: zero rows and columns that head / channel surgery cannot remove ----------------------------------


def _zero_scattered(model) -> int:
    """Zero what LLM Surgeon leaves in place: query/key rows inside heads, single value/output dimensions,
    residual-stream columns and rows, MLP input columns. Returns how many parameters compaction must remove."""
    ad = get_adapter(model)
    removed = 0
    with torch.no_grad():
        for i in range(ad.num_layers):
            a, m = ad.attention(i), ad.mlp(i)
            hd = a.head_dim
            for lin, rows in ((a.q_proj, [1, hd + 3]), (a.k_proj, [2]), (a.v_proj, [hd - 1])):
                lin.weight[rows] = 0
                if lin.bias is not None:
                    lin.bias[rows] = 0
                removed += len(rows) * (lin.in_features + (lin.bias is not None))
            a.o_proj.weight[:, [0, 5]] = 0  # single value/output dimensions of query heads
            removed += 2 * a.o_proj.out_features
            m.up_proj.weight[:, [3, 7, 11]] = 0  # residual-stream columns
            removed += 3 * m.up_proj.out_features
            m.down_proj.weight[[4]] = 0  # a residual-stream row
            removed += m.down_proj.in_features
    return removed


@pytest.fixture(scope="module")
def compacted(tmp_path_factory):
    """Every family with scattered zeros, compacted and saved with reference logits and generations."""
    root = tmp_path_factory.mktemp("compacted")
    out = {}
    for mt in TINY_MODEL_TYPES:
        m = tiny_model(mt).eval()
        expected = _zero_scattered(m)
        ref, n0 = _logits(m), sum(p.numel() for p in m.parameters())
        assert hf_prune.compact_zeros(copy.deepcopy(m), min_fraction=0.5) == {"linears": 0, "parameters_removed": 0}
        stats = hf_prune.compact_zeros(m, min_fraction=0.0)
        d = root / mt
        gen = _save_with_reference(m, d)
        out[mt] = {"model": m, "expected": expected, "ref": ref, "n0": n0, "stats": stats, "dir": d, "gen": gen}
    return out


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_compact_zeros_removes_scattered_zeros_keeps_logits_and_reloads(model_type, compacted):
    from transformers import AutoModelForCausalLM

    from hf_prune.modeling.modeling_hf_prune import CompactLinear

    rec = compacted[model_type]
    m, expected, n0 = rec["model"], rec["expected"], rec["n0"]
    assert rec["stats"] == {"linears": 6 * m.config.num_hidden_layers, "parameters_removed": expected}
    assert sum(p.numel() for p in m.parameters()) == n0 - expected
    assert torch.equal(_logits(m), rec["ref"])  # the same arithmetic on the kept entries: bit-identical
    assert type(m).__name__.startswith("Pruned") and all(m.config.layer_compact_linears)
    assert hf_prune.compact_zeros(m, min_fraction=0.0) == {"linears": 0, "parameters_removed": 0}  # nothing left
    with pytest.raises(ValueError, match="must come before compaction"):
        apply(m, PrunePlan(mlp_channels={0: [0, 1]}))
    loaded = AutoModelForCausalLM.from_pretrained(rec["dir"]).eval()
    assert sum(isinstance(x, CompactLinear) for x in loaded.modules()) == rec["stats"]["linears"]
    assert sum(p.numel() for p in loaded.parameters()) == n0 - expected
    assert torch.equal(_logits(loaded), rec["ref"])


def test_compacted_models_reload_without_hf_prune(compacted):
    res = _reload_in_fresh_process([(str(r["dir"]), True) for r in compacted.values()], hide_hf_prune=True)
    for mt, rec in compacted.items():
        r = res[str(rec["dir"])]
        assert r["diff"] <= 1e-6 and r["gen"] == rec["gen"], mt
        assert r["module"].startswith("transformers_modules"), r["module"]


def test_compact_zeros_after_head_and_channel_surgery_of_an_llm_surgeon_run():
    from hf_prune.methods.llm_surgeon import LLMSurgeon

    m = tiny_model("llama", num_hidden_layers=2).eval()
    method = LLMSurgeon(target=0.3, shots=2, criterion="kobd", verbose=False)
    batches = [{"input_ids": IDS[:, :12]}]
    for stage in range(2):
        plan = method.plan(m, batches, stage)
        apply(m, plan)  # the plan's weight update, then surgery
    linears = [p for n, p in m.named_parameters() if n.endswith("proj.weight")]
    zeros_before = sum(int((w == 0).sum()) for w in linears)
    ref, n0 = _logits(m), sum(p.numel() for p in m.parameters())
    stats = hf_prune.compact_zeros(m, min_fraction=0.0)
    assert stats["parameters_removed"] > 0 and torch.equal(_logits(m), ref)
    zeros_after = sum(int((p == 0).sum()) for n, p in m.named_parameters() if n.endswith("proj.weight"))
    # everything LLM Surgeon zeroed was a whole row or column: compaction leaves (almost) no zero behind
    assert zeros_before - zeros_after == stats["parameters_removed"]
    assert zeros_after <= 0.01 * zeros_before


def test_compact_zeros_skips_projections_that_lose_too_little():
    m = tiny_model("llama", num_hidden_layers=2).eval()
    a = get_adapter(m).attention(0)
    with torch.no_grad():
        a.q_proj.weight[:2] = 0  # 2 of 64 rows: 3%
        a.k_proj.weight[:16] = 0  # 16 of 32 rows: 50%
    ref = _logits(m)
    stats = hf_prune.compact_zeros(m)  # default min_fraction 0.05
    assert stats == {"linears": 1, "parameters_removed": 16 * a.k_proj.in_features}
    assert torch.equal(_logits(m), ref)
    with pytest.raises(ValueError, match="min_fraction=1.5"):
        hf_prune.compact_zeros(m, min_fraction=1.5)


def test_compact_zeros_refuses_a_sliced_model():
    from hf_prune.methods import get

    m = tiny_model("llama", num_hidden_layers=2)
    method = get("slicegpt", slicing=0.25, progress=False)
    plan = method.plan(m, [{"input_ids": IDS}], 0)
    apply(m, plan)
    with pytest.raises(ValueError, match="not on a sliced SlicedLlamaForCausalLM"):
        hf_prune.compact_zeros(m)
