"""2:4 with update_rule='columns': the N:M mask chosen inside the column sweep (SparseGPT, Frantar & Alistarh 2023)."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from hf_prune.methods.llm_surgeon import LLMSurgeon, block24_selection, column_update, column_update_nm

D = torch.float64


def _layer(seed: int, R: int = 16, C: int = 64, N: int = 200):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, C, generator=g, dtype=D) @ torch.randn(C, C, generator=g, dtype=D) * 0.3
    X = X + torch.randn(N, C, generator=g, dtype=D)
    A = X.T @ X / N
    Ai = torch.linalg.inv(A + 0.01 * A.diagonal().mean() * torch.eye(C, dtype=D))
    return torch.randn(R, C, generator=g, dtype=D), A, Ai


def _err(V, W, A) -> float:
    dW = V - W
    return float(torch.trace(dW @ A @ dW.T))  # the layer's output error on the calibration inputs (x N)


@pytest.mark.parametrize("seed", range(6))
def test_adaptive_mask_is_exactly_two_four_and_reconstructs_no_worse(seed):
    W, A, Ai = _layer(seed)
    R, C = W.shape
    _, fixed = block24_selection(W**2 * A.diagonal()[None])  # K-OBD's choice, made before the sweep
    W_fixed = column_update(W, Ai, fixed)
    W_ad, mask = column_update_nm(W, Ai, torch.ones(R, C // 4, dtype=torch.bool))
    assert (mask.reshape(R, -1, 4).sum(-1) == 2).all()
    assert not W_ad[mask].any() and (W_ad[~mask] != 0).all()
    assert _err(W_ad, W, A) <= _err(W_fixed, W, A)


def test_adaptive_first_group_is_sparsegpt_saliency_and_only_selected_groups_prune():
    W, A, Ai = _layer(7, R=8, C=16)
    groups = torch.zeros(8, 4, dtype=torch.bool)
    groups[:, 0] = True
    groups[3, 2] = True
    W_ad, mask = column_update_nm(W, Ai, groups, block_size=8)
    U = torch.linalg.cholesky(Ai, upper=True)
    sal = W[:, :4] ** 2 / U.diagonal()[:4] ** 2  # the first group sees the original weights
    expect = torch.zeros(8, 4, dtype=torch.bool).scatter_(1, torch.argsort(sal, dim=1, stable=True)[:, :2], True)
    assert torch.equal(mask[:, :4], expect)
    assert mask[:, 4:8].sum() == 0 and mask[:, 12:].sum() == 0 and mask[3, 8:12].sum() == 2 and mask.sum() == 18
    # with the mask fixed to what it chose, the plain sweep gives the same weights (lazy blocks of any size)
    torch.testing.assert_close(column_update(W, Ai, mask, block_size=3), W_ad, rtol=1e-10, atol=1e-12)


def test_lazy_block_updates_equal_the_column_by_column_sweep():
    W, A, Ai = _layer(3, R=6, C=20)
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(0)) < 0.4
    ref = column_update(W, Ai, mask, block_size=1)
    for b in (4, 7, 128):
        torch.testing.assert_close(column_update(W, Ai, mask, block_size=b), ref, rtol=1e-10, atol=1e-12)


def test_two_four_run_with_adaptive_masks():
    base = tiny_model("llama", num_hidden_layers=2)
    batches = [{"input_ids": torch.randint(4, 300, (2, 16), generator=torch.Generator().manual_seed(s))}
               for s in range(2)]
    kw = dict(target=0.5, shots=1, mode="2:4", criterion="kobd", weight_update=True, update_rule="columns",
              verbose=False)
    ad = LLMSurgeon(mask_24="adaptive", **kw).prune_step(base, batches, 0)
    fx = LLMSurgeon(**kw).prune_step(base, batches, 0)  # fixed: the default
    assert LLMSurgeon(mask_24="adaptive", **kw).adaptive_24 and not LLMSurgeon(**kw).adaptive_24
    differ = False
    for name, W in ad.updates.items():
        if name.endswith(".weight"):
            assert (W.reshape(W.shape[0], -1, 4) == 0).sum(-1).eq(2).all(), name
            differ |= not torch.equal(W == 0, fx.updates[name] == 0)
    assert differ
    assert ad.stats["selected"] == fx.stats["selected"]
    with pytest.raises(ValueError, match="mask_24='bogus'"):
        LLMSurgeon(mask_24="bogus")
