"""Slicing on each family's real quirks, on tiny configs with non-trivial norm scales: Gemma 3's sandwich norms and
sqrt(hidden)-scaled embeddings, Qwen3's q/k norms, Qwen2's q/k/v biases, untied heads.

For every family and basis: the rotation-invariant form equals the model; slicing away directions that carry no
signal leaves the logits unchanged; the sliced model saves and reloads with equal logits.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import hf_prune  # noqa: F401  (registers the Auto classes)
from hf_prune.methods import get
from hf_prune.rotation import make_rotation_invariant, random_orthogonal, rotate
from hf_prune.surgery import apply_slicing
from tiny import TINY_MODEL_TYPES, tiny_model

RANK = 24  # the signal's dimension; the residual stream is 64 wide


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _model(model_type: str, tied: bool = True, seed: int = 0) -> nn.Module:
    """Every norm weight (pre, post/sandwich, q/k, final) moved well away from its neutral value."""
    m = tiny_model(model_type, seed=seed, initializer_range=0.15, tie_word_embeddings=tied)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:
                p.add_(0.5 * torch.randn(p.shape, generator=g))
    return m


def _no_signal_beyond(model: nn.Module, rank: int) -> None:
    """Make the residual stream live in its first `rank` coordinates: the embedding's other columns are zero and
    every write into the stream is zero there. For Gemma 3 the writes are the sandwich norms' outputs, whose scale
    is (1 + w): w = -1 on the silent coordinates (the norm still sees, and normalises, the full sublayer output)."""
    with torch.no_grad():
        model.model.embed_tokens.weight[:, rank:] = 0
        for layer in model.model.layers:
            if hasattr(layer, "post_feedforward_layernorm"):  # Gemma 3: sandwich norms write into the stream
                layer.post_attention_layernorm.weight[rank:] = -1.0
                layer.post_feedforward_layernorm.weight[rank:] = -1.0
            else:
                layer.self_attn.o_proj.weight[rank:] = 0
                layer.mlp.down_proj.weight[rank:] = 0


def _data(vocab: int, b: int = 6, t: int = 12) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return ids, mask, [{"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2]} for i in range(0, b, 2)]


def _logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits * mask[..., None]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def test_the_quirks_are_really_there():
    gemma = _model("gemma3_text")
    assert gemma.model.embed_tokens.embed_scale.item() == pytest.approx(64 ** 0.5)  # scaled embeddings
    layer = gemma.model.layers[0]
    for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm, layer.self_attn.q_norm,
                 layer.self_attn.k_norm):
        assert norm.weight.abs().max() > 0.3  # non-trivial scales on sandwich and q/k norms
    qwen3 = _model("qwen3")
    assert qwen3.model.layers[0].self_attn.q_norm.weight.sub(1).abs().max() > 0.3


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_rotation_invariant_form_equals_the_model_and_keeps_the_qk_norms(model_type):
    model = _model(model_type)
    ids, mask, _ = _data(model.config.vocab_size)
    ref = _logits(model, ids, mask)
    qk = {n: p.detach().clone() for n, p in model.named_parameters() if "q_norm" in n or "k_norm" in n}
    make_rotation_invariant(model)
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4
    rotate(model, random_orthogonal(model.config.hidden_size, seed=7))
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4
    after = dict(model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in qk.items())  # per-head norms are not on the stream: untouched


@pytest.mark.parametrize("basis", ["global", "layer", "sublayer"])
@pytest.mark.parametrize("model_type,tied", [("gemma3_text", True), ("gemma3_text", False), ("qwen3", True),
                                             ("qwen2", False), ("llama", True), ("mistral", True)])
def test_slicing_directions_without_signal_keeps_logits_and_reloads(tmp_path, model_type, tied, basis):
    model = _model(model_type, tied=tied)
    _no_signal_beyond(model, RANK)
    ids, mask, batches = _data(model.config.vocab_size)
    ref = _logits(model, ids, mask)
    assert ref.abs().max() > 1.0
    method = get("slicegpt", slicing=0.5, basis=basis, round_to=8, max_ppl_ratio=0, progress=False)
    method.max_size = float("inf")  # tiny models: the point here is exactness, not size
    plan = method.plan(model, batches)
    dims = plan.residual_widths["residual_dims"]
    assert set(dims) == {32}
    apply_slicing(model, plan)
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert _max_diff(_logits(loaded, ids, mask), _logits(model, ids, mask)) <= 1e-5


def test_gemma3_embedding_scale_survives_slicing_and_reload(tmp_path):
    """The embedding scale sqrt(hidden) is the dense model's (not sqrt of the sliced width) before and after
    reloading; with no signal beyond the kept dims the sliced embeddings are the dense ones, rotated and cut."""
    model = _model("gemma3_text")
    _no_signal_beyond(model, RANK)
    ids, mask, batches = _data(model.config.vocab_size)
    dense_emb = model.model.embed_tokens(ids).detach().clone()
    plan = get("slicegpt", slicing=0.5, basis="global", max_ppl_ratio=0, progress=False)
    plan.max_size = float("inf")
    p = plan.plan(model, batches)
    apply_slicing(model, p)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    for m in (model, loaded):
        emb = m.model.embed_tokens(ids)
        assert emb.shape[-1] == 32
        assert m.model.embed_tokens.embed_scale.item() == pytest.approx(64 ** 0.5)
        assert emb.norm(dim=-1).sub(dense_emb.norm(dim=-1)).abs().max() <= 1e-4  # rotation + cut of zeros


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_sliced_model_returns_hidden_states(family, tmp_path):
    """A sliced model (built in place by a class swap, and reloaded) records its hidden states like the dense one:
    L + 1 of them, the first the (sliced) embedding output, the others each layer's output at its slot width."""
    model = _model(family)
    ids, mask, batches = _data(model.config.vocab_size)
    assert model(ids, output_hidden_states=True).hidden_states is not None  # dense hooks installed first, as in use
    method = get("slicegpt", slicing=0.25, basis="global", max_ppl_ratio=0, progress=False)
    method.max_size = float("inf")
    apply_slicing(model, method.plan(model, batches))
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    dims = model.config.residual_dims
    for m in (model, loaded):
        out = m(ids, attention_mask=mask, output_hidden_states=True)
        assert out.hidden_states is not None
        assert len(out.hidden_states) == m.config.num_hidden_layers + 1
        assert [h.shape[-1] for h in out.hidden_states] == [dims[0]] + dims[2::2]


# ----- reader-aware bases (hf_prune.methods.slicegpt.reader_aware_basis) ------------------------------------------
def _diag(values) -> torch.Tensor:
    return torch.diag(torch.tensor(values, dtype=torch.float64))


def test_reader_error_is_zero_when_the_signal_fits_the_kept_dims():
    from hf_prune.methods.slicegpt import pca, reader_error

    g = torch.Generator().manual_seed(0)
    A = torch.randn(8, 3, generator=g, dtype=torch.float64)
    C = A @ A.T  # rank 3
    B = torch.randn(8, 8, generator=g, dtype=torch.float64)
    M = B @ B.T
    _, Q = pca(C, damping=0.0)
    assert reader_error(Q, 3, C, M) == pytest.approx(0.0, abs=1e-12)
    assert reader_error(Q, 2, C, M) > 1e-3


def test_reader_aware_basis_keeps_a_direction_the_readers_amplify():
    """Little signal (0.01) in a direction its readers scale by 1e3 (M = 1e6): PCA drops it and loses almost all of
    what the readers see; the reader-aware basis keeps it and drops the least useful other direction."""
    from hf_prune.methods.slicegpt import READER_WEIGHTS, reader_aware_basis, reader_error

    C = _diag([10, 9, 8, 7, 6, 5, 4, 0.01])
    M = _diag([1, 1, 1, 1, 1, 1, 1, 1e6])
    Q, info = reader_aware_basis(C, M, 7, damping=0.0, weights=READER_WEIGHTS, margin=2.0)
    assert info["pca_reader_error"] > 0.9
    assert info["reader_weight"] > 0 and info["reader_error"] < 0.01
    assert info["reader_error"] == pytest.approx(reader_error(Q, 7, C / C.trace(), M / M.trace()))
    kept = Q[:, :7]
    assert (kept[7] ** 2).sum().item() == pytest.approx(1.0, abs=1e-9)  # e_7 lies in the kept span


def test_reader_aware_basis_stays_pca_when_readers_do_not_prefer_a_direction():
    from hf_prune.methods.slicegpt import READER_WEIGHTS, pca, reader_aware_basis

    C = _diag([10, 9, 8, 7, 6, 5, 4, 3])
    for M in (torch.eye(8, dtype=torch.float64), _diag([1, 1, 1, 1, 1, 1, 1.5, 1])):  # uniform; a slight preference
        Q, info = reader_aware_basis(C, M, 6, damping=0.0, weights=READER_WEIGHTS, margin=2.0)
        assert info["reader_weight"] == 0.0
        assert torch.allclose(Q.abs(), pca(C / C.trace(), 0.0)[1].abs())
    _, info = reader_aware_basis(C, _diag([1, 1, 1, 1, 1, 1, 1.5, 1]), 6, damping=0.0, weights=READER_WEIGHTS,
                                 margin=1.0)
    assert info["reader_weight"] > 0  # without the margin the slightly better estimate wins


def test_reader_weight_option_is_checked_and_zero_is_sliceGPTs_pca():
    assert get("slicegpt", reader_weight=0.0).reader_weights == (0.0,)
    assert len(get("slicegpt").reader_weights) > 1
    with pytest.raises(ValueError, match="reader_weight"):
        get("slicegpt", reader_weight=-1.0)
    with pytest.raises(ValueError, match="reader_margin"):
        get("slicegpt", reader_margin=0.5)


@pytest.mark.parametrize("rotation", ["global", "per_slot"])
@pytest.mark.parametrize("model_type,tied", [("gemma3_text", True), ("llama", True), ("llama", False),
                                             ("qwen3", True)])
def test_masked_slicing_computes_what_the_sliced_model_computes(model_type, tied, rotation):
    """`masked_slicing` (zeroing at full width, used to score candidates without a copy) gives the sliced model's
    logits exactly, with shortcut matrices, identity carries that cut or pad, and widths that differ per slot; the
    model is whole again afterwards. A width of the full stream everywhere would make the test blind: the widths cut
    real signal (the logits move far from the dense ones)."""
    import copy

    from hf_prune.surgery import masked_slicing

    model = make_rotation_invariant(_model(model_type, tied=tied, seed=3))
    model.eval()
    ids, mask, _ = _data(model.config.vocab_size)
    dense = _logits(model, ids, mask)
    D = model.config.hidden_size
    n = 2 * model.config.num_hidden_layers + 1
    if rotation == "global":
        rotate(model, random_orthogonal(D, seed=7))
        dims = [D - 8 * (1 + s % 3) for s in range(n)]  # global basis, widths that shrink and grow between slots
    else:
        for s in range(n):  # a basis per slot: every residual add gets a shortcut matrix
            rotate(model, random_orthogonal(D, seed=7 + s), [s])
        dims = [D - 4 * (s % 5) - 8 for s in range(n)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sliced = apply_slicing(copy.deepcopy(model), dims)
    expected = _logits(sliced, ids, mask)
    with masked_slicing(model, dims) as masked:
        got = _logits(masked, ids, mask)
    assert _max_diff(got, expected) < 1e-4 * max(1.0, expected.abs().max().item())
    assert _max_diff(expected, dense) > 1e-2  # the widths really cut signal
    after = _logits(model, ids, mask)
    assert _max_diff(after, dense) < 1e-4 * max(1.0, dense.abs().max().item())  # restored: the full model again
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(layer.attn_shortcut is None or isinstance(layer.attn_shortcut, nn.Linear)
               for layer in model.model.layers)


@pytest.mark.parametrize("weighting", ["norm", "none"])
@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
def test_an_attention_sink_token_survives_slicing_of_directions_without_signal(model_type, weighting):
    """An attention-sink token (first in every sequence, its embedding 100x the others' norm, in a direction of its
    own inside the signal subspace) must neither choose the basis nor lose its direction: slicing every direction
    without signal leaves the logits unchanged under both token weightings, with the default protect_early schedule
    scoring and the held-out check on."""
    model = _model(model_type)
    _no_signal_beyond(model, RANK)
    sink = 3
    with torch.no_grad():
        e = model.model.embed_tokens.weight
        e[sink] = 0
        e[sink, RANK - 1] = 100 * e[4:, :RANK].norm(dim=-1).mean()
    ids, mask, batches = _data(model.config.vocab_size)
    ids[:, 0] = sink
    batches = [{"input_ids": ids[i : i + 2], "attention_mask": mask[i : i + 2]} for i in range(0, ids.shape[0], 2)]
    ref = _logits(model, ids, mask)
    method = get("slicegpt", slicing=0.5, round_to=8, token_weighting=weighting, max_size=100.0, progress=False)
    plan = method.plan(model, batches)  # tiny models: the point here is exactness, not size
    assert min(plan.residual_widths["residual_dims"]) >= RANK
    apply_slicing(model, plan)
    assert _max_diff(_logits(model, ids, mask), ref) <= 1e-4 * max(1.0, ref.abs().max().item())
