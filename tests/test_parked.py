"""hf_prune.runtime.parked: a model's parameters on disk while copies of it are tried."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from hf_prune.runtime import parked


def test_parked_model_comes_back_bit_exact_with_its_ties_and_copies_are_independent():
    model = tiny_model("llama", tie_word_embeddings=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        ref = model(ids).logits
    with parked(model) as fresh:
        assert all(p.numel() == 0 for p in model.parameters())  # nothing of it is in memory
        with pytest.raises((RuntimeError, AssertionError)):
            model(ids)  # a parked model cannot be used by mistake
        a, b = fresh(), fresh()
        with torch.no_grad():
            torch.testing.assert_close(a(ids).logits, ref, rtol=0, atol=0)
            a.model.layers[0].mlp.up_proj.weight.mul_(0)  # a copy is its own
            assert b.model.layers[0].mlp.up_proj.weight.abs().sum() > 0
        assert a.lm_head.weight is a.model.embed_tokens.weight
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


def test_parked_restores_the_model_when_the_block_raises():
    model = tiny_model("llama")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="candidate failed"):
        with parked(model):
            raise ValueError("candidate failed")
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
