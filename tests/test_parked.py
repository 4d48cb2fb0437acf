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


def test_unpin_checkpoint_maps_releases_a_map_that_only_a_few_tensors_still_view(tmp_path):
    """After most weights were replaced (as a rotation does), the norm scales alone keep the safetensors map of the
    checkpoint; unpin copies them and the map goes. While most of the file is in use, nothing is copied."""
    import sys

    from transformers import AutoModelForCausalLM

    from hf_prune.runtime import _file_maps, unpin_checkpoint_maps

    if not sys.platform.startswith("linux"):
        pytest.skip("reads /proc/self/maps")
    tiny_model("llama", hidden_size=256, intermediate_size=512).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    path = str(tmp_path / "model.safetensors")
    if not any(p == path for _, _, p in _file_maps(".safetensors")):
        pytest.skip("this transformers/safetensors reads the checkpoint without a memory map")
    ids = torch.randint(0, model.config.vocab_size, (1, 10))
    with torch.no_grad():
        ref = model(ids).logits
    assert unpin_checkpoint_maps(model) == 0  # everything still in use: nothing copied
    assert any(p == path for _, _, p in _file_maps(".safetensors"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.data = p.data.clone()
    assert unpin_checkpoint_maps(model) > 0
    assert not any(p == path for _, _, p in _file_maps(".safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, rtol=0, atol=0)


def test_bound_heap_retention_sets_glibc_thresholds_or_says_it_did_not():
    import sys

    from hf_prune.runtime import bound_heap_retention

    ran = bound_heap_retention(1 << 20)
    if sys.platform.startswith("linux"):
        import platform

        assert ran == (platform.libc_ver()[0] == "glibc")
    else:
        assert ran is False
    x = torch.ones(1 << 22)  # allocations still work after the change
    assert float(x.sum()) == float(1 << 22)


def test_bound_heap_retention_leaves_thresholds_set_in_the_environment(monkeypatch):
    from hf_prune.runtime import bound_heap_retention

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1048576")
    assert bound_heap_retention() is False  # both set by the user: neither is changed
