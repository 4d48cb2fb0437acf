"""IteRABRe selection: prefix-cached scores equal naive ones; an identity layer is removed first."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model

from hf_prune import PrunePlan, apply, get_adapter
from hf_prune.methods import get
from hf_prune.methods.iterabre import layer_removal_scores


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 300, (2, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    return [{"input_ids": ids, "attention_mask": mask}]


def _naive_scores(model, batches, kind):
    """Copy the model, drop layer j with surgery, run the full forward: no cache, no layer-wise code."""
    n = get_adapter(model).num_layers
    out = []
    for j in range(n):
        m = copy.deepcopy(model)
        apply(m, PrunePlan(drop_layers=[j]))
        num, den = 0.0, 0
        for b in batches:
            with torch.no_grad():
                ref = model.model(**b).last_hidden_state
                got = m.model(**b).last_hidden_state
            if kind == "cosine":
                s = F.cosine_similarity(got, ref, dim=-1)
            else:
                lp, lq = F.log_softmax(m.lm_head(got), -1), F.log_softmax(model.lm_head(ref), -1)
                s = -(lq.exp() * (lq - lp)).sum(-1)
            s = s.detach()
            mask = b["attention_mask"].bool()
            num += float(s[mask].sum())
            den += int(mask.sum())
        out.append(num / den)
    return out


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
@pytest.mark.parametrize("kind", ["cosine", "kl"])
def test_cached_scores_equal_naive(model_type, kind):
    m = tiny_model(model_type, num_hidden_layers=5, sliding_window=16)
    b = _batches()
    cached = layer_removal_scores(m, b, kind, progress=False)
    naive = _naive_scores(m, b, kind)
    assert max(abs(a - c) for a, c in zip(cached, naive)) <= 1e-5, (cached, naive)


def test_identity_layer_is_selected():
    m = tiny_model("qwen2", num_hidden_layers=5)
    ad = get_adapter(m)
    with torch.no_grad():
        ad.attention(3).o_proj.weight.zero_()
        ad.attention(3).o_proj.bias.zero_() if ad.attention(3).o_proj.bias is not None else None
        ad.mlp(3).down_proj.weight.zero_()
    plan = get("iterabre", n_remove=2).plan(m, _batches())
    assert plan.drop_layers == [3]
    assert plan.provenance["scores"][3] == pytest.approx(1.0, abs=1e-6)


def test_two_stages_remove_two_layers_and_reload(tmp_path):
    from transformers import AutoModelForCausalLM

    m = tiny_model("llama", num_hidden_layers=5)
    method = get("iterabre", n_remove=2)
    removed = []
    for stage in range(method.stages):
        plan = method.plan(m, _batches(stage), stage)
        removed.append(plan.provenance["removed_original_layer"])
        apply(m, plan)
    assert m.config.num_hidden_layers == 3 and len(set(removed)) == 2
    m.save_pretrained(tmp_path)
    m2 = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = _batches()[0]["input_ids"]
    with torch.no_grad():
        assert (m(ids).logits - m2(ids).logits).abs().max() <= 1e-5
    assert m2.config.model_type == "llama"  # whole layers removed: the standard config


def test_bad_options_name_the_value():
    with pytest.raises(ValueError, match="similarity='cos'"):
        get("iterabre", similarity="cos")
    with pytest.raises(ValueError, match="unknown option"):
        get("iterabre", n_layers=3)


@pytest.mark.parametrize("protect", [(0, 0), (2, 1)])
def test_selection_equals_the_naive_rule_and_the_reported_cost_is_the_layer_calls_made(protect):
    """The plan removes the naive rule's layer among the candidates; protected layers are not scored; the cost in
    the provenance is the number of decoder-layer calls the selection really made (one batch here)."""
    first, last = protect
    m = tiny_model("llama", num_hidden_layers=6)
    b = _batches()
    naive = _naive_scores(m, b, "cosine")
    candidates = list(range(first, 6 - last))
    calls = [0]
    hooks = [layer.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
             for layer in get_adapter(m).layers]
    try:
        plan = get("iterabre", n_remove=1, protect_first=first, protect_last=last).plan(m, b)
    finally:
        for h in hooks:
            h.remove()
    assert plan.drop_layers == [max(candidates, key=lambda j: naive[j])]
    scores = plan.provenance["scores"]
    assert [j for j, s in enumerate(scores) if s is None] == [j for j in range(6) if j not in candidates]
    cost = plan.provenance["cost"]
    assert cost["layer_forwards"] == calls[0] == 6 + sum(5 - j for j in candidates)
    assert cost["candidates"] == len(candidates) and cost["seconds"] >= 0
