"""Width methods (pip, llm_pruner, magnitude) with default settings: head_grouping="auto" and the automatic
micro-batch of the gradient pass (issue 18: Gemma-3-270M has one kv head per layer and must not be refused)."""

from __future__ import annotations

import pytest
import torch
from tiny import SENTENCES, tiny_model, tiny_tokenizer

import hf_prune
from hf_prune.arch import get_adapter
from hf_prune.data import batches as make_batches
from hf_prune.data import token_blocks
from hf_prune.methods import get
from hf_prune.methods.importance import (
    auto_gradient_checkpointing,
    auto_micro_batch_size,
    build_groups,
    compute_importance,
    estimate_gradient_memory,
    resolve_head_grouping,
    scored_parameters,
)
from hf_prune.perturb import CharPerturbation, add_perturbed_views

METHODS = ("pip", "llm_pruner", "magnitude")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def calib(tok):
    blocks = token_blocks(tok, SENTENCES * 4, n_samples=4, seq_len=24, seed=0)
    return add_perturbed_views(tok, make_batches(blocks, 4), CharPerturbation(rate=0.2, seed=1))


def _method(name, tok, **kw):
    kw = {"progress": False, "skip_first_layers": 1, "skip_last_layers": 1, **kw}
    if name == "pip":
        kw["tokenizer"] = tok
    return get(name, **kw)


def single_kv(model_type="llama", **kw):
    """Every layer: 4 query heads sharing one kv head (Gemma-3-270M's layout)."""
    return tiny_model(model_type, num_attention_heads=4, num_key_value_heads=1, num_hidden_layers=4, **kw)


@pytest.mark.parametrize("nq,nkv,expected", [(8, 2, "kv"), (4, 4, "kv"), (4, 1, "query"), (1, 1, "kv")])
def test_auto_grouping_resolves_per_model(nq, nkv, expected):
    kw = {"head_dim": 16} if nq == 1 else {}
    ad = get_adapter(tiny_model("llama", num_attention_heads=nq, num_key_value_heads=nkv, **kw))
    assert resolve_head_grouping(ad, [0, 1], "auto") == expected
    assert resolve_head_grouping(ad, [0, 1], "kv") == "kv" and resolve_head_grouping(ad, [0, 1], "query") == "query"
    with pytest.raises(ValueError, match="head_grouping='heads'"):
        resolve_head_grouping(ad, [0, 1], "heads")


@pytest.mark.parametrize("name", METHODS)
def test_defaults_prune_attention_when_every_layer_has_one_kv_head(name, tok, calib):
    model = single_kv()
    method = _method(name, tok)
    assert method.head_grouping == "auto"
    plans = hf_prune.prune(model, method, calib).plans
    assert all(p.provenance["head_grouping"] == "query" for p in plans)
    assert all(p.provenance["config"]["head_grouping"] == "auto" for p in plans)
    assert all(not p.provenance["not_pruned"] for p in plans)
    assert all(nkv == 1 for _, nkv, _ in hf_prune.surgery.layer_widths(model))
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()
    # attention alone: query heads go, the single kv head stays
    model = single_kv()
    plans = hf_prune.prune(model, _method(name, tok, target=0.05, steps=1, prune_mlp=False), calib).plans
    assert plans[0].provenance["removed_groups"]["attention"] >= 1
    widths = hf_prune.surgery.layer_widths(model)
    assert all(nkv == 1 for _, nkv, _ in widths) and any(nq < 4 for nq, _, _ in widths)


def test_defaults_on_gemma3_layout(tok, calib):
    model = single_kv("gemma3_text")
    plans = hf_prune.prune(model, _method("llm_pruner", tok, target=0.03, prune_mlp=False), calib).plans
    assert plans[0].provenance["head_grouping"] == "query"
    assert any(nq < 4 for nq, _, _ in hf_prune.surgery.layer_widths(model))


@pytest.mark.parametrize("name", METHODS)
def test_auto_equals_kv_on_grouped_query_attention(name, tok, calib):
    """SmolLM2's layout (several kv heads): 'auto' is 'kv', the same plan as before."""
    plans = {}
    for grouping in ("auto", "kv"):
        model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=5)
        plans[grouping] = _method(name, tok, head_grouping=grouping, steps=1, micro_batch_size=4).plan(model, calib)
    assert plans["auto"].provenance["head_grouping"] == "kv"
    assert plans["auto"].kv_heads == plans["kv"].kv_heads and plans["auto"].heads == plans["kv"].heads
    assert plans["auto"].mlp_channels == plans["kv"].mlp_channels


def test_explicit_kv_still_refuses_a_single_kv_head(tok, calib):
    with pytest.raises(ValueError, match="head_grouping='query'"):
        _method("llm_pruner", tok, head_grouping="kv").plan(single_kv(), calib)
    with pytest.raises(ValueError, match="head_grouping="):
        get("pip", head_grouping="heads")


@pytest.mark.parametrize("criterion", ["pip", "taylor"])
def test_micro_batched_and_whole_batch_scores_match(criterion, calib):
    model = tiny_model("llama", seed=5, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4)
    whole = compute_importance(model, calib, [1, 2], criterion, micro_batch_size=None, progress=False)
    for mb in (1, 3, "auto"):
        part = compute_importance(model, calib, [1, 2], criterion, micro_batch_size=mb, progress=False)
        for a, b in zip(whole, part):
            for x, y in ((a.query_heads, b.query_heads), (a.kv_heads, b.kv_heads), (a.mlp_channels, b.mlp_channels)):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-8)
    assert all(p.grad is None for p in model.parameters())


def test_gradients_only_for_the_scored_linears(calib):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4)
    ad = get_adapter(model)
    seen = []
    scored = {id(p) for p in scored_parameters(ad, [1, 2])}
    for p in model.parameters():
        p.register_hook(lambda g, p=p: seen.append(id(p)))
    compute_importance(model, calib, [1, 2], "taylor", micro_batch_size="auto", progress=False)
    assert seen and set(seen) <= scored
    assert id(ad.embed_tokens.weight) not in set(seen)


def test_auto_micro_batch_is_sized_from_the_estimate(calib):
    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4)
    params = scored_parameters(get_adapter(model), [1, 2])
    assert auto_micro_batch_size(model, 4, 24, params) == 4  # tiny: everything fits the 256 MiB floor
    one = estimate_gradient_memory(model, 1, 24, params)
    two = estimate_gradient_memory(model, 2, 24, params)
    budget = (one.total + (two.total - one.total) / 2) / 1024**3  # room for one row and a half
    assert auto_micro_batch_size(model, 4, 24, params, memory_budget_gb=budget) == 1
    assert auto_micro_batch_size(model, 4, 24, params, memory_budget_gb=1e-9) == 1  # check_memory then refuses
    method = get("llm_pruner", memory_budget_gb=budget, skip_first_layers=1, progress=False)
    assert method.micro_batch_rows(model, 4, 24) == 1
    assert get("llm_pruner", micro_batch_size=3, skip_first_layers=1).micro_batch_rows(model, 4, 24) == 3


def test_estimate_caps_the_logit_chunk_at_the_budget():
    from hf_prune.losses import LOGITS_BUDGET_BYTES

    model = tiny_model("llama", vocab_size=300_000, num_hidden_layers=2)
    est = estimate_gradient_memory(model, 4, 64)
    assert est.logits <= 3 * LOGITS_BUDGET_BYTES


def test_auto_checkpointing_follows_the_activation_allowance(monkeypatch):
    import hf_prune.methods.importance as imp

    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4)
    params = scored_parameters(get_adapter(model), [1, 2])
    assert not auto_gradient_checkpointing(model, 24, params)  # tiny: within the 256 MiB floor
    monkeypatch.setattr(imp, "AUTO_ACTIVATION_FLOOR_BYTES", 1)
    monkeypatch.setattr(imp, "AUTO_ACTIVATION_FRACTION", 1e-6)
    assert auto_gradient_checkpointing(model, 24, params)
    rows, ckpt = get("llm_pruner", skip_first_layers=1).gradient_settings(model, 4, 24)
    assert ckpt and rows == 1
    assert get("llm_pruner", skip_first_layers=1, gradient_checkpointing=False).gradient_settings(model, 4, 24)[1] is False


def test_checkpointed_pass_runs_without_dropout_and_restores_the_model(calib):
    """Per-layer checkpointing in eval mode: a model with dropout gives the same scores with and without it."""
    model = tiny_model("llama", seed=2, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=4,
                       attention_dropout=0.5)
    model.train()
    plain = compute_importance(model, calib, [1, 2], "taylor", gradient_checkpointing=False, progress=False)
    again = compute_importance(model, calib, [1, 2], "taylor", gradient_checkpointing=False, progress=False)
    ckpt = compute_importance(model, calib, [1, 2], "taylor", gradient_checkpointing=True, micro_batch_size=1,
                              progress=False)
    for a, b, c in zip(plain, again, ckpt):
        torch.testing.assert_close(a.mlp_channels, b.mlp_channels)  # no dropout: deterministic
        torch.testing.assert_close(a.mlp_channels, c.mlp_channels, rtol=1e-4, atol=1e-8)
        torch.testing.assert_close(a.query_heads, c.query_heads, rtol=1e-4, atol=1e-8)
    assert model.training
    assert not any("forward" in vars(layer) for layer in get_adapter(model).layers)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_removing_query_heads_of_a_single_kv_group_equals_zeroing_their_output(model_type, calib):
    """What head_grouping='query' plans on a single-kv-head layer: the pruned model computes what the dense one does
    with those heads' o_proj columns zeroed."""
    from hf_prune.plan import PrunePlan

    dense, pruned = single_kv(model_type), single_kv(model_type)
    a = get_adapter(dense).attention(1)
    with torch.no_grad():
        for h in (1, 3):
            a.o_proj.weight[:, h * a.head_dim:(h + 1) * a.head_dim] = 0
    hf_prune.apply(pruned, PrunePlan(heads={1: [0, 2]}))
    assert hf_prune.surgery.layer_widths(pruned)[1][:2] == (2, 1)
    ids = calib[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(pruned(input_ids=ids).logits, dense(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
