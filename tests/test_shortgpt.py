"""ShortGPT block influence and the layer-by-layer scoring helpers it runs on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny import TINY_MODEL_TYPES, tiny_model

import hf_prune
from hf_prune import methods
from hf_prune.arch import get_adapter
from hf_prune.calibration import collect_hidden_states, token_cosines
from hf_prune.methods.shortgpt import ShortGPT, block_influence

VOCAB = 300


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _make_identity(model, layer: int) -> None:
    """Zero the layer's two writers into the residual stream: the layer then returns its input unchanged."""
    ad = get_adapter(model)
    with torch.no_grad():
        ad.attention(layer).o_proj.weight.zero_()
        ad.mlp(layer).down_proj.weight.zero_()


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_identity_layer_has_zero_influence_and_is_removed(model_type):
    model = tiny_model(model_type)
    _make_identity(model, 2)
    batches = [{"input_ids": _ids(2, 12, s)} for s in range(2)]
    scores, n_tokens = block_influence(model, batches, progress=False)
    assert n_tokens == 2 * 2 * 12
    assert abs(scores[2]) < 1e-6
    assert min(s for i, s in enumerate(scores) if i != 2) > 1e-3
    plan = ShortGPT(n_remove=1, progress=False).plan(model, batches)
    assert plan.drop_layers == [2]
    assert plan.provenance["block_influence"] == scores


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_hidden_state_collection_matches_transformers(model_type):
    model = tiny_model(model_type)
    ids = _ids(2, 10)
    ref = model(input_ids=ids, output_hidden_states=True).hidden_states
    ours = collect_hidden_states(model, [{"input_ids": ids}])
    n = get_adapter(model).num_layers
    assert len(ours) == len(ref) == n + 1
    for i in range(n):
        torch.testing.assert_close(ours[i][0], ref[i], atol=1e-5, rtol=1e-5)
    # transformers applies the final norm to its last entry; the raw stream is what leaves the last layer
    torch.testing.assert_close(get_adapter(model).final_norm(ours[n][0]), ref[n], atol=1e-5, rtol=1e-5)


def test_hidden_state_collection_with_padding_matches_transformers():
    model = tiny_model("llama")
    ids = _ids(2, 10)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0  # right padding
    ref = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    ours = collect_hidden_states(model, [{"input_ids": ids, "attention_mask": mask}])
    real = mask.bool()
    for i in range(len(ref) - 1):
        torch.testing.assert_close(ours[i][0][real], ref[i][real], atol=1e-5, rtol=1e-5)


def test_padding_is_excluded_from_block_influence():
    model = tiny_model("llama")
    a, b = _ids(1, 7, 1), _ids(1, 12, 2)
    padded = torch.full((2, 12), 3)
    padded[0, :7], padded[1] = a[0], b[0]
    mask = torch.zeros_like(padded)
    mask[0, :7], mask[1] = 1, 1
    with_pad, n_pad = block_influence(model, [{"input_ids": padded, "attention_mask": mask}], progress=False)
    separate, n_sep = block_influence(model, [{"input_ids": a}, {"input_ids": b}], progress=False)
    assert n_pad == n_sep == 19
    assert with_pad == pytest.approx(separate, rel=1e-5, abs=1e-7)
    # the padded positions would change the scores if they were counted
    unmasked, _ = block_influence(model, [{"input_ids": padded}], progress=False)
    assert unmasked != pytest.approx(separate, rel=1e-5, abs=1e-7)


def test_token_cosines_is_rowwise_cosine_over_real_tokens():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    b[1, 2] = 0.0  # a zero vector gives 0, not NaN
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[2, 3:] = 0
    got = token_cosines(a, b, mask, chunk_rows=4)
    want = F.cosine_similarity(a, b, dim=-1)[mask.bool()]
    assert got.shape == (13,)
    torch.testing.assert_close(got, want.float(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="equal shapes"):
        token_cosines(a, b[:, :4])


def test_stages_split_the_target():
    m = ShortGPT(n_remove=5, per_stage=2)
    assert m.stages == 3
    assert [m.removed_at(s) for s in range(3)] == [2, 2, 1]
    assert ShortGPT(n_remove=3).stages == 1
    with pytest.raises(ValueError, match="stage=3"):
        m.removed_at(3)
    with pytest.raises(ValueError, match="n_remove=0"):
        ShortGPT(n_remove=0)
    with pytest.raises(ValueError, match="per_stage=4"):
        ShortGPT(n_remove=3, per_stage=4)


def test_registry_and_two_stage_pruning_by_hand():
    method = methods.get("shortgpt", n_remove=2, per_stage=1, progress=False)
    assert isinstance(method, ShortGPT) and "shortgpt" in methods.available()
    model = tiny_model("llama", num_hidden_layers=5)
    _make_identity(model, 3)
    batches = [{"input_ids": _ids(2, 9)}]
    first = method.plan(model, batches, stage=0)
    assert first.drop_layers == [3]
    hf_prune.apply(model, first)
    second = method.plan(model, batches, stage=1)
    assert len(second.drop_layers) == 1 and second.provenance["num_layers"] == 4
    hf_prune.apply(model, second)
    assert get_adapter(model).num_layers == model.config.num_hidden_layers == 3
    assert model(input_ids=batches[0]["input_ids"]).logits.shape == (2, 9, model.config.vocab_size)


def test_refuses_to_remove_every_layer():
    model = tiny_model("llama", num_hidden_layers=2)
    with pytest.raises(ValueError, match="keep at least one"):
        ShortGPT(n_remove=2, progress=False).plan(model, [{"input_ids": _ids(1, 4)}])
