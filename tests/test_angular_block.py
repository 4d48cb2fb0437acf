"""Angular-distance block removal (Gromov et al. 2024) on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from tiny import TINY_MODEL_TYPES, tiny_model

import hf_prune
from hf_prune import methods
from hf_prune.arch import get_adapter
from hf_prune.checks import NonFiniteError
from hf_prune.methods.angular_block import AngularBlock, angular_distances, compared_rows

VOCAB = 300


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _batches(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Two batches: one full, one with a right-padded and a left-padded row."""
    full = _ids(2, 12, seed)
    padded = _ids(2, 12, seed + 1)
    mask = torch.ones_like(padded)
    mask[0, 7:] = 0  # right padding
    mask[1, :4] = 0  # left padding
    return [{"input_ids": full, "attention_mask": torch.ones_like(full)},
            {"input_ids": padded, "attention_mask": mask}]


def _make_identity(model, layers) -> None:
    """Zero each layer's two writers into the residual stream: the layer then returns its input unchanged."""
    ad = get_adapter(model)
    with torch.no_grad():
        for i in layers:
            ad.attention(i).o_proj.weight.zero_()
            ad.mlp(i).down_proj.weight.zero_()


def _reference(model, batches, n: int, token: str) -> tuple[list[float], int]:
    """Brute force: the full model's output_hidden_states (final norm swapped for the identity, so the last entry
    is the raw stream leaving the last layer), per-token arccos(cos)/pi in float64, averaged over compared tokens."""
    backbone = get_adapter(model).backbone
    norm = backbone.norm
    backbone.norm = torch.nn.Identity()
    try:
        per_start: list[list[float]] = []
        with torch.no_grad():
            for batch in batches:
                hs = model(**batch, output_hidden_states=True).hidden_states
                n_layers = len(hs) - 1
                per_start += [[] for _ in range(n_layers - n + 1 - len(per_start))]
                mask = batch["attention_mask"]
                for r in range(mask.shape[0]):
                    real = [t for t in range(mask.shape[1]) if mask[r, t]]
                    for t in (real[-1:] if token == "last" else real):
                        for start in range(n_layers - n + 1):
                            a, b = hs[start][r, t].double(), hs[start + n][r, t].double()
                            cos = float(a @ b / (a.norm() * b.norm()))
                            per_start[start].append(math.acos(max(-1.0, min(1.0, cos))) / math.pi)
    finally:
        backbone.norm = norm
    return [sum(d) / len(d) for d in per_start], len(per_start[0])


@pytest.mark.parametrize("token", ["last", "all"])
@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_identity_block_is_found(model_type, token):
    model = tiny_model(model_type, num_hidden_layers=6)
    _make_identity(model, [2, 3])
    plan = AngularBlock(n_remove=2, token=token, progress=False).plan(model, _batches())
    assert plan.drop_layers == [2, 3]
    d = plan.provenance["angular_distance"]
    assert len(d) == 5 and plan.provenance["best_start"] == 2
    assert d[2] < 1e-3
    assert min(x for i, x in enumerate(d) if i != 2) > 1e-2


def test_last_block_is_compared_before_the_final_norm():
    """A final norm with uneven weights turns the stream; the block ending at the last layer must still read 0."""
    model = tiny_model("llama", num_hidden_layers=5)
    _make_identity(model, [3, 4])
    with torch.no_grad():
        get_adapter(model).final_norm.weight.uniform_(-2.0, 2.0)
    plan = AngularBlock(n_remove=2, token="all", progress=False).plan(model, _batches())
    assert plan.drop_layers == [3, 4]
    assert plan.provenance["angular_distance"][3] < 1e-3


@pytest.mark.parametrize("token", ["last", "all"])
@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_distances_match_a_brute_force_reference(model_type, token):
    model = tiny_model(model_type, num_hidden_layers=5)
    batches = _batches(3)
    for n in (1, 3):
        ours, count = angular_distances(model, batches, n, token, progress=False)
        ref, ref_count = _reference(model, batches, n, token)
        assert count == ref_count == (4 if token == "last" else 24 + 7 + 8)
        assert ours == pytest.approx(ref, abs=1e-5)
        assert all(0.0 < x < 1.0 for x in ours)


def test_compared_rows_take_the_last_real_token_with_either_padding():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert compared_rows(mask, "last").tolist() == [2, 7, 15]
    assert compared_rows(mask, "all").tolist() == [0, 1, 2, 6, 7, 12, 13, 14, 15]


def test_one_backbone_forward_per_batch_and_no_lm_head():
    model = tiny_model("llama", num_hidden_layers=4)
    ad = get_adapter(model)
    calls = {"layer0": 0, "lm_head": 0}

    def count(key):
        def hook(*_):
            calls[key] += 1
        return hook

    h0 = ad.layer(0).register_forward_hook(count("layer0"))
    h1 = ad.lm_head.register_forward_hook(count("lm_head"))
    try:
        AngularBlock(n_remove=1, progress=False).plan(model, _batches())
    finally:
        h0.remove()
        h1.remove()
    assert calls == {"layer0": 2, "lm_head": 0}
    assert not ad.layer(1)._forward_hooks and not ad.layer(0)._forward_pre_hooks  # hooks removed afterwards


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_plan_applies_through_prune_and_keeps_the_function(model_type):
    """The identity block is removed by the runner: fewer layers, the same logits."""
    model = tiny_model(model_type, num_hidden_layers=6)
    _make_identity(model, [1, 2, 3])
    ids = _ids(2, 10, 9)
    with torch.no_grad():
        before = model(ids).logits
    result = hf_prune.prune(model, methods.get("angular_block", n_remove=3, progress=False), _batches())
    assert result.plan.drop_layers == [1, 2, 3] and len(result.stages) == 1
    assert model.config.num_hidden_layers == 3 and get_adapter(model).num_layers == 3
    assert result.plan.provenance["method"] == "angular_block"
    assert result.plan.provenance["method_config"] == {"method": "angular_block", "seed": 0, "n_remove": 3,
                                                       "token": "last", "progress": False}
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n_remove", [4, 5])
def test_removing_every_layer_is_refused(n_remove):
    model = tiny_model("llama")  # 4 layers
    with pytest.raises(ValueError, match=f"n_remove={n_remove} cannot be removed from a model with 4 layers.*1..3"):
        AngularBlock(n_remove=n_remove, progress=False).plan(model, _batches())


@pytest.mark.parametrize("kwargs,error,fragment", [
    ({"n_remove": 0}, ValueError, "n_remove=0"),
    ({"n_remove": 1.5}, TypeError, "n_remove=1.5"),
    ({"token": "first"}, ValueError, "token='first'.*'last', 'all'"),
])
def test_bad_options_are_refused(kwargs, error, fragment):
    with pytest.raises(error, match=fragment):
        methods.get("angular_block", **kwargs)


def test_nan_weights_stop_scoring_naming_the_block():
    model = tiny_model("llama")
    with torch.no_grad():
        get_adapter(model).mlp(2).down_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="angular_block.*stage 0.*layer 1"):
        AngularBlock(n_remove=2, progress=False).plan(model, _batches())


def test_registered_and_config_round_trips(tmp_path):
    assert "angular_block" in methods.available()
    assert methods.AngularBlock is AngularBlock and type(methods.get("angular_block")) is AngularBlock
    method = methods.get("angular_block", n_remove=3, token="all")
    method.save(tmp_path)
    loaded = methods.load(tmp_path)
    assert type(loaded) is AngularBlock and loaded.to_dict() == method.to_dict()
    assert AngularBlock.field_defaults()["n_remove"] == 6 and AngularBlock.field_defaults()["token"] == "last"
