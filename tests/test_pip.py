"""PIP, LLM-Pruner (Taylor) and magnitude pruning of head groups and MLP channels; character/embedding perturbation."""

from __future__ import annotations

import json
import re

import pytest
import torch
from tiny import SENTENCES, tiny_model, tiny_tokenizer

import hf_prune
from hf_prune.arch import get_adapter
from hf_prune.data import batches as make_batches
from hf_prune.data import token_blocks
from hf_prune.methods import get
from hf_prune.methods.importance import (
    InsufficientMemoryError,
    build_groups,
    compute_importance,
    estimate_gradient_memory,
)
from hf_prune.pipeline import prune
from hf_prune.perturb import CharPerturbation, EmbeddingNoise, add_perturbed_views, perturb_texts

TEXT = " ".join(SENTENCES) * 20


def gqa_model(seed: int = 0, **kw):
    """Tiny llama with 8 query heads in 2 kv groups (head_dim 8), 5 layers unless told."""
    kw = {"num_attention_heads": 8, "num_key_value_heads": 2, "num_hidden_layers": 5, **kw}
    return tiny_model("llama", seed=seed, **kw)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def calib(tok):
    blocks = token_blocks(tok, SENTENCES * 4, n_samples=4, seq_len=24, seed=0)
    return add_perturbed_views(tok, make_batches(blocks, 2), CharPerturbation(rate=0.2, seed=1))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def group_scores(model, batches, layers, criterion, grouping="kv"):
    ad = get_adapter(model)
    imps = compute_importance(model, batches, layers, criterion, progress=False)
    return {imp.layer: build_groups(ad, imp, grouping) for imp in imps}


# ----- perturbation -----------------------------------------------------------------------------------------------


def test_char_perturbation_is_seeded():
    p = CharPerturbation(rate=0.1, seed=3)
    assert p(TEXT) == p(TEXT)
    assert p(TEXT) == CharPerturbation(rate=0.1, seed=3)(TEXT)
    assert p(TEXT) != p(TEXT, seed=4)
    assert p(TEXT) != TEXT
    assert perturb_texts(["a b c words", TEXT], p) == perturb_texts(["a b c words", TEXT], p)


def test_char_perturbation_changes_the_configured_fraction():
    letters = sum(len(w) for w in re.findall(r"[^\W\d_]+", TEXT))
    rate = 0.1
    sigma = (rate * (1 - rate) / letters) ** 0.5
    # replace-only: every edit changes exactly one letter in place
    out = CharPerturbation(rate=rate, ops=("replace",), seed=0)(TEXT)
    assert len(out) == len(TEXT)
    changed = sum(a != b for a, b in zip(out, TEXT))
    assert abs(changed / letters - rate) < 5 * sigma
    # all edits: their count is about rate * letters; text outside words is untouched
    text, edits = CharPerturbation(rate=rate, seed=1).apply(TEXT)
    assert abs(edits / letters - rate) < 5 * sigma
    assert re.sub(r"[^\W\d_]", "", text) == re.sub(r"[^\W\d_]", "", TEXT)
    assert CharPerturbation(rate=0.0)(TEXT) == TEXT


def test_char_perturbation_rejects_bad_config():
    with pytest.raises(ValueError, match="rate=1.5"):
        CharPerturbation(rate=1.5)
    with pytest.raises(ValueError, match="ops="):
        CharPerturbation(ops=("delete",))


def test_perturbed_views_keep_shape_and_are_seeded(tok, calib):
    blocks = token_blocks(tok, SENTENCES * 4, n_samples=4, seq_len=24, seed=0)
    again = add_perturbed_views(tok, make_batches(blocks, 2), CharPerturbation(rate=0.2, seed=1))
    other = add_perturbed_views(tok, make_batches(blocks, 2), CharPerturbation(rate=0.2, seed=2))
    for a, b, c in zip(calib, again, other):
        assert a["perturbed_input_ids"].shape == a["input_ids"].shape
        assert torch.equal(a["perturbed_input_ids"], b["perturbed_input_ids"])
    assert any(not torch.equal(a["perturbed_input_ids"], a["input_ids"]) for a in calib)
    assert any(not torch.equal(a["perturbed_input_ids"], c["perturbed_input_ids"]) for a, c in zip(calib, other))


def test_embedding_noise_is_seeded_and_scaled():
    e = torch.randn(4, 16, 256)
    n = EmbeddingNoise(scale=0.1, seed=0)
    assert torch.equal(n(e), n(e))
    assert not torch.equal(n(e), EmbeddingNoise(scale=0.1, seed=1)(e))
    rel = ((n(e) - e).pow(2).mean() / e.pow(2).mean()).sqrt().item()
    assert abs(rel - 0.1) < 0.01


# ----- importance ---------------------------------------------------------------------------------------------------


def _zero_structures(model, layer: int, kv_head: int, channel: int) -> None:
    ad = get_adapter(model)
    a, m = ad.attention(layer), ad.mlp(layer)
    hd, g = a.head_dim, a.group_size
    q_rows = slice(kv_head * g * hd, (kv_head + 1) * g * hd)
    kv_rows = slice(kv_head * hd, (kv_head + 1) * hd)
    with torch.no_grad():
        a.q_proj.weight[q_rows] = 0
        a.k_proj.weight[kv_rows] = 0
        a.v_proj.weight[kv_rows] = 0
        a.o_proj.weight[:, q_rows] = 0
        m.gate_proj.weight[channel] = 0
        m.up_proj.weight[channel] = 0
        m.down_proj.weight[:, channel] = 0


@pytest.mark.parametrize("criterion", ["pip", "taylor", "magnitude"])
def test_zero_structure_has_zero_importance_and_its_removal_changes_nothing(criterion, calib):
    model = gqa_model()
    _zero_structures(model, layer=2, kv_head=1, channel=5)
    groups = group_scores(model, calib, [2], criterion)[2]
    attn = {g.kv_heads: g.score for g in groups if g.kind == "attention"}
    mlp = {g.channels[0]: g.score for g in groups if g.kind == "mlp"}
    assert attn[(1,)] == 0.0 and mlp[5] == 0.0
    assert attn[(0,)] > 0 and min(s for c, s in mlp.items() if c != 5) > 0

    ids = calib[0]["input_ids"]
    before = logits(model, ids)
    plan = hf_prune.PrunePlan(kv_heads={2: [0]}, mlp_channels={2: [c for c in range(128) if c != 5]})
    hf_prune.apply(model, plan)
    assert (logits(model, ids) - before).abs().max().item() <= 1e-5


def _hand_group_scores(model, layer, grads):
    """sum |w * g| per kv group and per channel, written out directly from the weight matrices."""
    ad = get_adapter(model)
    a, m = ad.attention(layer), ad.mlp(layer)
    hd, g = a.head_dim, a.group_size
    s = {}
    for j in range(a.num_kv_heads):
        q, kv = slice(j * g * hd, (j + 1) * g * hd), slice(j * hd, (j + 1) * hd)
        s[("kv", j)] = sum(
            (w[idx] * grads[w][idx]).abs().sum().item()
            for w, idx in (
                (a.q_proj.weight, (q,)),
                (a.k_proj.weight, (kv,)),
                (a.v_proj.weight, (kv,)),
                (a.o_proj.weight, (slice(None), q)),
            )
        )
    for c in range(m.intermediate_size):
        s[("ch", c)] = sum(
            (w[idx] * grads[w][idx]).abs().sum().item()
            for w, idx in (
                (m.gate_proj.weight, (c,)),
                (m.up_proj.weight, (c,)),
                (m.down_proj.weight, (slice(None), c)),
            )
        )
    return s


def _grads(model, ids, mask=None):
    model.zero_grad()
    model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
    return {p: p.grad.clone() for p in model.parameters()}


def _compare(model, layer, ours, expected):
    """Every kv group and every channel of the layer is scored once, each as the hand-written sum."""
    keys = [("kv", g.kv_heads[0]) if g.kind == "attention" else ("ch", g.channels[0]) for g in ours]
    assert keys, f"no groups scored in layer {layer}"
    assert sorted(keys) == sorted(expected), f"scored groups {sorted(set(keys) ^ set(expected))} differ"
    for key, g in zip(keys, ours):
        assert g.score == pytest.approx(expected[key], rel=1e-4, abs=1e-9), key


def test_taylor_importance_equals_hand_computed(calib):
    model = gqa_model(seed=1)
    batch = [{"input_ids": calib[0]["input_ids"], "attention_mask": calib[0]["attention_mask"]}]
    ours = group_scores(model, batch, [1], "taylor")[1]
    expected = _hand_group_scores(model, 1, _grads(model, batch[0]["input_ids"]))
    _compare(model, 1, ours, expected)


def test_pip_importance_equals_hand_computed_gradient_difference(calib):
    model = gqa_model(seed=2)
    b = calib[0]
    ours = group_scores(model, [b], [3], "pip")[3]
    clean = _grads(model, b["input_ids"])
    pids, pmask = b["perturbed_input_ids"], b["perturbed_attention_mask"]
    labels = pids.masked_fill(pmask == 0, -100)
    model.zero_grad()
    model(input_ids=pids, attention_mask=pmask, labels=labels).loss.backward()
    diff = {p: clean[p] - p.grad for p in model.parameters()}
    _compare(model, 3, ours, _hand_group_scores(model, 3, diff))


def test_micro_batching_and_checkpointing_give_the_same_scores(calib):
    model = gqa_model(seed=3)
    ref = compute_importance(model, calib, [1, 2], "pip", progress=False)
    for kw in ({"micro_batch_size": 1}, {"gradient_checkpointing": True}):
        other = compute_importance(model, calib, [1, 2], "pip", progress=False, **kw)
        for a, b in zip(ref, other):
            torch.testing.assert_close(a.mlp_channels, b.mlp_channels, rtol=1e-4, atol=1e-8)
            torch.testing.assert_close(a.kv_heads, b.kv_heads, rtol=1e-4, atol=1e-8)
    assert not model.is_activation_checkpointing
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_memory_is_estimated_and_checked_before_the_pass(calib):
    model = gqa_model()
    full = estimate_gradient_memory(model, 2, 24)
    ckpt = estimate_gradient_memory(model, 2, 24, gradient_checkpointing=True)
    assert ckpt.activations < full.activations and full.total > full.weights
    calls = []
    model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(InsufficientMemoryError, match="micro_batch_size"):
        compute_importance(model, calib, [1], "taylor", memory_budget_gb=1e-6, progress=False)
    assert not calls


# ----- methods ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grouping", ["kv", "query"])
def test_gqa_group_sizes_stay_equal(grouping, tok):
    model = gqa_model()
    blocks = token_blocks(tok, SENTENCES * 4, n_samples=2, seq_len=16, seed=0)
    method = get("pip", target=0.08, steps=2, head_grouping=grouping, prune_mlp=False, tokenizer=tok, progress=False)
    prune(model, method, make_batches(blocks, 2)).plans
    ad = get_adapter(model)
    widths = hf_prune.surgery.layer_widths(model)
    assert any(nq < 8 for nq, _, _ in widths)  # attention was pruned
    for i, (nq, nkv, _) in enumerate(widths):
        assert nkv >= 1 and nq % nkv == 0
        assert ad.attention(i).module.num_key_value_groups == nq // nkv
    if grouping == "query":
        assert all(nkv == 2 for _, nkv, _ in widths)


@pytest.mark.parametrize("name,target_of", [("pip", "all"), ("llm_pruner", "all"), ("magnitude", "layers")])
def test_iterative_pruning_hits_the_parameter_target(name, target_of, tok, calib):
    model = gqa_model(num_hidden_layers=6)
    ad = get_adapter(model)
    dense = sum(p.numel() for p in model.parameters())
    layers_total = sum(p.numel() for layer in ad.layers for p in layer.parameters())
    kw = {"tokenizer": tok} if name == "pip" else {}
    method = get(name, target=0.2, target_of=target_of, steps=3, skip_first_layers=1, progress=False, **kw)
    a = ad.attention(1)
    largest_group = a.group_size * a.head_dim * (64 + 64) + 2 * a.head_dim * 64  # a kv head with its query heads
    plans = prune(model, method, calib).plans
    after = sum(p.numel() for p in model.parameters())
    base = dense if target_of == "all" else layers_total
    target = dense - round(0.2 * base)
    assert abs(after - target) <= largest_group
    assert plans[-1].provenance["num_parameters_after"] == after
    assert hf_prune.surgery.layer_widths(model)[0] == (8, 2, 128)  # first layer protected
    assert hf_prune.surgery.layer_widths(model)[-1] == (8, 2, 128)  # last layer protected
    json.loads(plans[0].to_json())  # the provenance is plain JSON


def test_pruned_model_save_reloads_with_identical_logits(tmp_path, tok, calib):
    from transformers import AutoModelForCausalLM

    model = gqa_model(seed=4)
    prune(model, get("pip", target=0.25, steps=2, tokenizer=tok, progress=False), calib).plans
    assert len(set(hf_prune.surgery.layer_widths(model))) > 1  # widths differ per layer
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = calib[0]["input_ids"]
    assert (logits(model.eval(), ids) - logits(loaded, ids)).abs().max().item() <= 1e-5


def test_embedding_perturbation_and_stage_bookkeeping(calib):
    model = gqa_model()
    dense = sum(p.numel() for p in model.parameters())
    clean = [{"input_ids": b["input_ids"], "attention_mask": b["attention_mask"]} for b in calib]
    method = get("pip", perturbation="embedding", steps=2, progress=False)
    with pytest.raises(ValueError, match="stage=0"):
        get("pip", perturbation="embedding", steps=2, progress=False).plan(model, clean, stage=1)
    hf_prune.apply(model, method.plan(model, clean, 0))
    resumed = get("pip", perturbation="embedding", steps=2, reference_num_parameters=dense, progress=False)
    for m in (method, resumed):
        plan = m.plan(model, clean, 1)
        assert plan.provenance["reference_num_parameters"] == dense
        assert plan.provenance["target_num_parameters"] == dense - round(0.2 * dense)
    with pytest.raises(ValueError, match="tokenizer"):
        get("pip", progress=False).plan(gqa_model(), clean, 0)
    mha = tiny_model("llama", num_key_value_heads=4)
    with pytest.raises(ValueError, match="multi-head attention"):
        get("pip", perturbation="embedding", head_grouping="query", progress=False).plan(mha, clean, 0)
    with pytest.raises(ValueError, match="head_grouping='heads'"):
        get("pip", head_grouping="heads")


@pytest.mark.slow  # a recipe run
def test_recipe_prunes_with_lora_recovery_and_saves_a_loadable_model(tmp_path, tok, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    gqa_model().save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    (tmp_path / "train.txt").write_text("\n\n".join(SENTENCES * 30))
    (tmp_path / "eval.txt").write_text("\n\n".join(SENTENCES * 3))
    path = Path(__file__).resolve().parents[1] / "recipes" / "pip.py"
    spec = importlib.util.spec_from_file_location("recipe_pip_under_test", path)
    recipe = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, recipe)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the recipe puts its folder on sys.path
    spec.loader.exec_module(recipe)
    out = tmp_path / "out"
    report = recipe.main([
        "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", str(tmp_path / "train.txt"),
        "--eval_text", str(tmp_path / "eval.txt"), "--eval_dense", "false", "--eval_max_tokens", "256",
        "--calibration_samples", "4", "--calibration_seq_len", "16", "--recovery_tokens", "512",
        "--recovery_seq_len", "16", "--steps", "2", "--target", "0.2", "--kd_alpha", "0", "--output_dir", str(out),
        "--per_device_train_batch_size", "4", "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true",
        "--disable_tqdm", "true",
    ])
    log = json.loads((out / "train_log.json").read_text())
    assert [h["prune/stage"] for h in log if "prune/stage" in h] == [1, 2]
    loaded = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    dense = sum(p.numel() for p in gqa_model().parameters())
    n = sum(p.numel() for p in loaded.parameters())
    assert n == report["pruned_recovered"]["params"] and abs(n - round(0.8 * dense)) < 0.02 * dense


def test_magnitude_per_parameter_score_does_not_depend_on_group_size(calib):
    """Magnitude scores are sums of squares, so per parameter they are mean squares: with every weight equal, a kv
    head group (~100x an MLP channel's parameters here) and an MLP channel score the same per parameter. (An L2 norm
    per parameter would be rms / sqrt(n) and remove the largest groups first.)"""
    model = gqa_model()
    with torch.no_grad():
        for p in model.model.layers.parameters():
            p.fill_(0.05)
    groups = group_scores(model, calib, [2], "magnitude")[2]
    per_param = {g.kind: g.score / g.num_params for g in groups}
    assert per_param["attention"] == pytest.approx(0.05**2, rel=1e-5)
    assert per_param["mlp"] == pytest.approx(0.05**2, rel=1e-5)
    sizes = {g.kind: g.num_params for g in groups}
    assert sizes["attention"] > 10 * sizes["mlp"]
