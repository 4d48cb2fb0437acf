"""LLM Surgeon: K-FAC factors, OBS costs and updates against brute force, global thresholds, multi-shot schedule,
2:4 pattern, compaction into smaller models that save and reload."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import tiny_model
from torch import nn

import hf_prune
from hf_prune import methods
from hf_prune.arch import get_adapter
from hf_prune.kfac import (
    KFACCollector,
    KFACMemoryError,
    choose_factor_device,
    collect_lm_kfac,
    damped_inverse,
    decoder_linears,
)
from hf_prune.methods.llm_surgeon import (
    LLMSurgeon,
    apply_updates,
    augmented_weight,
    block24_selection,
    column_update,
    compaction,
    element_costs,
    element_update,
    select_elements,
    structure_pool,
    structured_costs,
    structured_update,
)

VOCAB = 300
D = torch.float64


def _ids(b: int, t: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


def _batches(n: int = 2, b: int = 2, t: int = 16) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": _ids(b, t, s)} for s in range(n)]


def _spd(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2 * n, generator=g, dtype=D)
    return X @ X.T / (2 * n) + 0.1 * torch.eye(n, dtype=D)


def _obs(W: torch.Tensor, G: torch.Tensor, A: torch.Tensor, Q: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Brute force OBS with the full Fisher F = G (x) A on row-major vec(W): remove the flat indices Q.
    Returns (cost 1/2 w_Q^T ([F^-1]_QQ)^-1 w_Q, new W = W - F^-1 E_Q ([F^-1]_QQ)^-1 w_Q)."""
    Finv = torch.linalg.inv(torch.kron(G, A))
    w = W.reshape(-1)
    lam = torch.linalg.solve(Finv[Q][:, Q], w[Q])
    return 0.5 * float(w[Q] @ lam), (w - Finv[:, Q] @ lam).reshape(W.shape)


def _flat(R: int, C: int, rows=(), cols=()) -> torch.Tensor:
    m = torch.zeros(R, C, dtype=torch.bool)
    m[list(rows)] = True
    m[:, list(cols)] = True
    return torch.nonzero(m.reshape(-1)).flatten()


def _quad(dW: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> float:
    return 0.5 * float(torch.trace(dW.T @ G @ dW @ A))


# ----------------------------------------------------------------------------------------------------------------
# K-FAC factors
# ----------------------------------------------------------------------------------------------------------------


def test_kfac_factors_of_linear_regression_are_the_exact_moments():
    """y = W x + b with the summed squared error: the output gradient is the residual, so A = E[[x,1][x,1]^T] and
    G = E[(y - t)(y - t)^T] exactly; K-FAC must reproduce both (up to its equal-norm rescaling)."""
    torch.manual_seed(0)
    R, C, N = 3, 5, 400
    lin = nn.Linear(C, R).double()
    X = torch.randn(N, C, dtype=D) @ torch.randn(C, C, dtype=D)  # correlated Gaussian inputs
    T = torch.randn(N, R, dtype=D)
    with KFACCollector({"lin": lin}, dtype=D) as kc:
        for xb, tb in zip(X.split(100), T.split(100)):  # several batches: sums must accumulate
            y = lin(xb)
            (0.5 * ((y - tb) ** 2).sum()).backward()
    f = kc.factors()["lin"]
    Xa = torch.cat([X, torch.ones(N, 1, dtype=D)], 1)
    with torch.no_grad():
        res = lin(X) - T
    A_ref, G_ref = Xa.T @ Xa / N, res.T @ res / N
    assert f.n_tokens == N and f.has_bias
    s = float(f.A[0, 0] / A_ref[0, 0])
    torch.testing.assert_close(f.A, s * A_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(f.G, G_ref / s, rtol=1e-10, atol=1e-12)
    assert torch.linalg.matrix_norm(f.A).item() == pytest.approx(torch.linalg.matrix_norm(f.G).item(), rel=1e-10)


def test_lm_kfac_matches_autograd_and_ignores_padding():
    model = tiny_model("llama")
    ids = _ids(2, 12)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0  # right padding of the second sequence
    batch = {"input_ids": ids, "attention_mask": mask}
    name = "model.layers.1.mlp.down_proj"
    lin = dict(model.named_modules())[name]
    grads_before = [p.requires_grad for p in model.parameters()]
    factors = collect_lm_kfac(model, [batch], progress=False, log=lambda s: None)
    assert set(factors) == set(decoder_linears(model)) and len(factors) == 4 * 7
    assert [p.requires_grad for p in model.parameters()] == grads_before
    assert all(p.grad is None for p in model.parameters())

    # reference: the input and the output gradient of that layer through plain autograd
    seen = {}
    h = lin.register_forward_hook(lambda m, i, o: seen.update(a=i[0], y=o) or o.retain_grad())
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    tgt = ids[:, 1:].clone()
    tgt[mask[:, 1:] == 0] = -100
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100,
                                      reduction="sum").backward()
    h.remove()
    keep = mask.reshape(-1).bool()
    a = seen["a"].detach().reshape(-1, lin.in_features)[keep]
    g = seen["y"].grad.reshape(-1, lin.out_features)[keep]
    n = int(keep.sum())
    A_ref, G_ref = a.T @ a / n, g.T @ g / n
    f = factors[name]
    assert f.n_tokens == n == 20
    s = float(f.A.trace() / A_ref.trace())
    torch.testing.assert_close(f.A, s * A_ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(f.G, G_ref / s, rtol=1e-4, atol=1e-9)


def test_sampled_fisher_uses_model_samples_and_is_seeded():
    model = tiny_model("llama")
    b = _batches(1)
    emp = collect_lm_kfac(model, b, progress=False, log=lambda s: None)
    s1 = collect_lm_kfac(model, b, fisher="sampled", seed=3, progress=False, log=lambda s: None)
    s2 = collect_lm_kfac(model, b, fisher="sampled", seed=3, progress=False, log=lambda s: None)
    name = "model.layers.0.self_attn.o_proj"
    torch.testing.assert_close(s1[name].G, s2[name].G)
    assert not torch.allclose(s1[name].G, emp[name].G)
    with pytest.raises(ValueError, match="fisher='bogus'"):
        collect_lm_kfac(model, b, fisher="bogus", progress=False)


def test_damped_inverse_and_memory_error():
    M = _spd(6, 1)
    ref = torch.linalg.inv(M + 0.1 * M.diagonal().mean() * torch.eye(6, dtype=D))
    torch.testing.assert_close(damped_inverse(M, 0.1), ref)
    with pytest.raises(KFACMemoryError, match="need"):
        choose_factor_device(1 << 62, torch.device("cpu"), "cpu")


# ----------------------------------------------------------------------------------------------------------------
# OBS costs and updates against the full Kronecker Fisher
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture
def problem():
    R, C = 5, 6
    W = torch.randn(R, C, generator=torch.Generator().manual_seed(0), dtype=D)
    G, A = _spd(R, 1), _spd(C, 2)
    return W, G, A, torch.linalg.inv(G), torch.linalg.inv(A)


def test_row_column_and_element_costs_match_brute_force_obs(problem):
    W, G, A, Gi, Ai = problem
    R, C = W.shape
    rows, cols = structured_costs(W, "surgeon", G, A, Gi, Ai)
    elems = element_costs(W, "surgeon", G, A, Gi, Ai)
    for i in range(R):
        assert rows[i].item() == pytest.approx(_obs(W, G, A, _flat(R, C, rows=[i]))[0], rel=1e-9)
    for j in range(C):
        assert cols[j].item() == pytest.approx(_obs(W, G, A, _flat(R, C, cols=[j]))[0], rel=1e-9)
    for i, j in [(0, 0), (2, 3), (4, 5)]:
        assert elems[i, j].item() == pytest.approx(_obs(W, G, A, torch.tensor([i * C + j]))[0], rel=1e-9)
    # K-OBD: uncompensated cost 1/2 w_Q^T F_QQ w_Q
    F = torch.kron(G, A)
    kr, kc = structured_costs(W, "kobd", G, A)
    q = _flat(R, C, rows=[1])
    assert kr[1].item() == pytest.approx(0.5 * float(W.reshape(-1)[q] @ F[q][:, q] @ W.reshape(-1)[q]), rel=1e-9)
    q = _flat(R, C, cols=[4])
    assert kc[4].item() == pytest.approx(0.5 * float(W.reshape(-1)[q] @ F[q][:, q] @ W.reshape(-1)[q]), rel=1e-9)


@pytest.mark.parametrize("rows,cols", [([1, 3], []), ([], [0, 2, 5]), ([0, 4], [1, 2])])
def test_structured_update_is_the_exact_joint_obs_solution(problem, rows, cols):
    W, G, A, Gi, Ai = problem
    R, C = W.shape
    rmask = torch.zeros(R, dtype=torch.bool)
    rmask[rows] = True
    cmask = torch.zeros(C, dtype=torch.bool)
    cmask[cols] = True
    cost, W_ref = _obs(W, G, A, _flat(R, C, rows, cols))
    W_new = structured_update(W, G, A, rmask, cmask)
    torch.testing.assert_close(W_new, W_ref, rtol=1e-9, atol=1e-10)
    assert _quad(W_new - W, G, A) == pytest.approx(cost, rel=1e-9)
    assert not W_new[rmask].any() and not W_new[:, cmask].any()
    if not cols:  # the paper's row formula: dW = -G^-1 E_R ([G^-1]_RR)^-1 W_R
        dW = -Gi[:, rows] @ torch.linalg.solve(Gi[rows][:, rows], W[rows])
        torch.testing.assert_close(W_new, W + dW, rtol=1e-9, atol=1e-10)


def test_element_update_one_chunk_is_exact_and_chunks_keep_the_mask(problem):
    W, G, A, Gi, Ai = problem
    mask = torch.rand(W.shape, generator=torch.Generator().manual_seed(5)) < 0.4
    cost, W_ref = _obs(W, G, A, torch.nonzero(mask.reshape(-1)).flatten())
    torch.testing.assert_close(element_update(W, Gi, Ai, mask, chunk_size=10_000), W_ref, rtol=1e-9, atol=1e-10)
    W_chunked = element_update(W, Gi, Ai, mask, chunk_size=3)
    assert not W_chunked[mask].any()
    # chunks can only do as well as the joint optimum, and must do better than no update at all
    dW_none = torch.where(mask, -W, torch.zeros_like(W))
    assert cost - 1e-12 <= _quad(W_chunked - W, G, A) < _quad(dW_none, G, A)


def test_column_update_is_sparsegpt_obs_per_row(problem):
    """update_rule='columns': the first column's removal is exact OBS under A; zeroed weights stay zero; a 2:4 mask
    is reconstructed better than by zeroing alone, and no better than the joint OBS optimum (one chunk, G = I)."""
    W, _, A, _, Ai = problem
    first = torch.zeros_like(W, dtype=torch.bool)
    first[:, 0] = True
    expected = W - W[:, :1] * Ai[:1] / Ai[0, 0]  # OBS: dw = -w_0 [A^-1]_0,: / [A^-1]_00, row by row
    torch.testing.assert_close(column_update(W, Ai, first), expected, rtol=1e-9, atol=1e-10)
    C = W.shape[1] - W.shape[1] % 4
    _, two_four = block24_selection(W[:, :C].abs())
    mask = torch.zeros_like(W, dtype=torch.bool)
    mask[:, :C] = two_four
    I = torch.eye(W.shape[0], dtype=W.dtype)
    W_cols = column_update(W, Ai, mask)
    assert not W_cols[mask].any() and bool((W_cols[~mask] != W[~mask]).any())
    err = lambda V: _quad(V - W, I, A)  # noqa: E731 - the layer's output error tr(dW A dW^T) / 2
    assert err(W_cols) < err(torch.where(mask, torch.zeros_like(W), W))
    assert err(element_update(W, I, Ai, mask, chunk_size=10_000)) <= err(W_cols) * (1 + 1e-9)


def test_update_rule_columns_in_a_two_four_run():
    base = tiny_model("llama", num_hidden_layers=2)
    kw = dict(target=0.5, shots=1, mode="2:4", criterion="kobd", weight_update=True, verbose=False)
    cols = LLMSurgeon(update_rule="columns", mask_24="fixed", **kw).prune_step(base, _batches(), 0).updates
    none = LLMSurgeon(weight_update=False, **{k: v for k, v in kw.items() if k != "weight_update"}
                      ).prune_step(base, _batches(), 0).updates
    for name, W in cols.items():
        assert torch.equal(W == 0, none[name] == 0), name  # the same 2:4 selection, now compensated
        assert (W.reshape(W.shape[0], -1, 4) == 0).sum(-1).eq(2).all(), name
    assert any(not torch.allclose(cols[n], none[n]) for n in cols)
    with pytest.raises(ValueError, match="update_rule='rows'"):
        LLMSurgeon(update_rule="rows")


def test_structures_of_zeros_cost_zero(problem):
    W, G, A, Gi, Ai = problem
    W = W.clone()
    W[2] = 0
    W[:, 4] = 0
    W[0, :2] = 0  # a 2:4 block (0, 0:4) with two zeros
    for crit in ("surgeon", "kobd", "magnitude"):
        rows, cols = structured_costs(W, crit, G, A, Gi, Ai)
        e = element_costs(W, crit, G, A, Gi, Ai)
        assert rows[2].item() == 0 and cols[4].item() == 0
        assert (e[2] == 0).all() and (e[:, 4] == 0).all()
        assert (rows[[0, 1, 3, 4]] > 0).all()
        block, _ = block24_selection(e[:, :4])
        assert block[0, 0].item() == 0 and block[1, 0].item() > 0


def test_global_threshold_counts_row_column_overlap():
    """pool.total must equal the number of distinct entries covered by the selected rows and columns."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 7), (6, 3), (5, 5)]
    rc = [torch.rand(r, generator=g) for r, _ in shapes]
    cc = [torch.rand(c, generator=g) for _, c in shapes]
    pool = structure_pool(rc, cc)
    assert torch.all(pool.costs[pool.order][1:] >= pool.costs[pool.order][:-1])
    for k in range(0, len(pool.order) + 1):
        rows, cols = pool.masks(k)
        covered = sum(int((r[:, None] | c[None, :]).sum()) for r, c in zip(rows, cols))
        assert covered == (int(pool.total[k - 1]) if k else 0)
    target = 40
    k = pool.prefix_for(target)
    assert pool.total[k - 1] <= target < pool.total[k]


def test_select_elements_hits_the_count_exactly_with_ties():
    costs = [torch.tensor([[0.0, 1.0], [0.0, 2.0]]), torch.tensor([0.0, 0.0, 3.0])]
    masks, _ = select_elements(costs, 3)
    assert sum(int(m.sum()) for m in masks) == 3
    assert masks[0][0, 0] and masks[0][1, 0] and not masks[0][0, 1]


# ----------------------------------------------------------------------------------------------------------------
# The method on tiny models
# ----------------------------------------------------------------------------------------------------------------


def _prunable(model) -> tuple[int, int]:
    """(parameters, zeros) of the decoder linears, biases included."""
    n = z = 0
    for lin in decoder_linears(model).values():
        W = augmented_weight(lin)
        n += W.numel()
        z += int((W == 0).sum())
    return n, z


def _run(model, method: LLMSurgeon, batches) -> list:
    plans = []
    for stage in range(method.stages):
        plan = method.plan(model, batches, stage)
        hf_prune.apply(model, plan)
        plans.append(plan)
    return plans


def test_registry_and_config_errors():
    m = methods.get("llm_surgeon", target=0.3, shots=2, mode="2:4", criterion="kobd")
    assert isinstance(m, LLMSurgeon) and m.stages == 2 and m.damping == (0.1, 0.01)
    assert "magnitude" not in methods.available() or methods.get("magnitude").__class__ is not LLMSurgeon
    with pytest.raises(ValueError, match="target=0.6 for mode '2:4'"):
        LLMSurgeon(target_of="linears", target=0.6, mode="2:4")
    with pytest.raises(ValueError, match="mode='rows'"):
        LLMSurgeon(mode="rows")
    with pytest.raises(ValueError, match="criterion='obs'"):
        LLMSurgeon(criterion="obs")
    assert not hasattr(LLMSurgeon(), "update")  # the weight update travels with the plan; apply() writes it


def test_multi_shot_unstructured_reaches_every_target_exactly():
    model = tiny_model("llama", num_hidden_layers=2)
    n0, _ = _prunable(model)
    method = LLMSurgeon(target_of="linears", target=0.45, shots=3, mode="unstructured", chunk_size=1024, compute_dtype="float32",
                        verbose=False)
    for stage in range(3):
        plan = method.plan(model, _batches(), stage)
        hf_prune.apply(model, plan)
        n, z = _prunable(model)
        assert n0 - n + z == round((stage + 1) * 0.45 / 3 * n0)


def test_two_four_pattern_is_exact():
    model = tiny_model("llama", num_hidden_layers=2)
    method = LLMSurgeon(target_of="linears", target=0.5, shots=2, mode="2:4", chunk_size=512, verbose=False)
    _run(model, method, _batches())
    for name, lin in decoder_linears(model).items():
        zeros = (lin.weight.reshape(lin.out_features, -1, 4) == 0).sum(-1)
        assert (zeros == 2).all(), name


@pytest.mark.parametrize("criterion", ["surgeon", "kobd", "magnitude"])
def test_structured_multi_shot_count_matches_the_compacted_model(criterion):
    """The removed-or-zero count each shot reports is what the compacted model really lost, never above target."""
    model = tiny_model("llama", num_hidden_layers=2)
    n0, _ = _prunable(model)
    method = LLMSurgeon(target_of="linears", target=0.3, shots=2, criterion=criterion, verbose=False)
    for stage, plan in enumerate(_run(model, method, _batches())):
        pass
    n, z = _prunable(model)
    assert plan.provenance["removed_fraction"] * n0 == pytest.approx(n0 - n + z)
    assert n0 - n + z <= round(0.3 * n0)
    assert n0 - n + z >= 0.2 * n0  # the shot did prune (a kv group is ~6% of this model)


def test_structured_paper_count_without_compaction_is_within_one_structure():
    model = tiny_model("llama", num_hidden_layers=2)
    n0, _ = _prunable(model)
    method = LLMSurgeon(target_of="linears", target=0.3, shots=2, compact=False, verbose=False)
    _run(model, method, _batches())
    n, z = _prunable(model)
    assert n == n0  # nothing compacted
    assert 0 <= round(0.3 * n0) - z < 128 + 1  # short by less than one row/column (at most 128 entries)


def test_compaction_respects_grouped_query_attention():
    model = tiny_model("llama", num_hidden_layers=2)  # 4 query heads, 2 kv heads, head_dim 16
    ad = get_adapter(model)
    lins = decoder_linears(model)
    names = {i: {s: next(n for n, l in lins.items() if l is lin) for s, lin in ad.linears(i)} for i in range(2)}
    W = {n: augmented_weight(l) for n, l in lins.items()}
    W[names[0]["o_proj"]][:, 16:32] = 0  # query head 1 (kv group 0) dead
    W[names[0]["o_proj"]][:, 48:64] = 0  # query head 3 (kv group 1) dead
    W[names[1]["v_proj"]][16:32] = 0  # kv head 1 dead: query heads 2, 3 dead
    W[names[1]["o_proj"]][:, 0:16] = 0  # and query head 0: group 0 keeps head 1 alone
    W[names[1]["gate_proj"]][[5, 7]] = 0  # two MLP channels dead through the gate (silu(0) = 0)
    W[names[1]["down_proj"]][:, 9] = 0  # one through down_proj
    W[names[0]["q_proj"]][0:16] = 0  # q rows do not kill a head (uniform attention)
    zr = {n: ~w.bool().any(1) for n, w in W.items()}
    zc = {n: ~w.bool().any(0) for n, w in W.items()}
    comp = compaction(model, names, zr, zc, weights=W)
    assert comp.heads == {0: [0, 2], 1: [1]} and comp.kv_heads == {0: [0, 1], 1: [0]}
    assert comp.mlp_channels == {1: [c for c in range(128) if c not in (5, 7, 9)]}
    assert comp.counts["layers.0.q_proj"]["zeros_left"] == 16 * 64  # head 0's q rows stay as zeros
    plan = hf_prune.PrunePlan(heads=comp.heads, kv_heads=comp.kv_heads, mlp_channels=comp.mlp_channels)
    plan.validate(model)


def test_compaction_from_masks_counts_what_zeroed_weights_show():
    """The bisection counts from row/column masks alone; it must agree with the zeroed weights, also when a whole
    matrix goes (every input column of v_proj removed kills every kv head)."""
    model = tiny_model("llama", num_hidden_layers=2)
    ad = get_adapter(model)
    lins = decoder_linears(model)
    names = {i: {s: next(n for n, l in lins.items() if l is lin) for s, lin in ad.linears(i)} for i in range(2)}
    g = torch.Generator().manual_seed(0)
    zr, zc, W = {}, {}, {}
    for n, lin in lins.items():
        w = augmented_weight(lin)
        zr[n] = torch.rand(w.shape[0], generator=g) < 0.15
        zc[n] = torch.rand(w.shape[1], generator=g) < 0.15
        if n == names[1]["v_proj"]:
            zc[n][:] = True
        w[zr[n]] = 0
        w[:, zc[n]] = 0
        W[n] = w
    from_masks = compaction(model, names, zr, zc)
    from_weights = compaction(model, names, {n: ~w.bool().any(1) for n, w in W.items()},
                              {n: ~w.bool().any(0) for n, w in W.items()}, weights=W)
    assert from_masks.counts == from_weights.counts
    assert (from_masks.heads, from_masks.kv_heads) == (from_weights.heads, from_weights.kv_heads)
    assert from_masks.kv_heads[1] == [0] and from_masks.heads[1] == [0]  # all dead: one group, one head kept


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_structured_surgeon_compacts_into_a_smaller_model_that_reloads(tmp_path, model_type):
    from transformers import AutoModelForCausalLM

    model = tiny_model(model_type, num_hidden_layers=2)
    n_before = model.num_parameters()
    ids = _ids(2, 10, seed=9)
    method = LLMSurgeon(target_of="linears", target=0.35, shots=2, verbose=False)
    for stage in range(2):
        plan = method.plan(model, _batches(), stage)
        updated = copy.deepcopy(model)
        hf_prune.surgery.weight_update_of(plan)(updated)  # the update alone, without the surgery
        with torch.no_grad():
            zeroed = updated(input_ids=ids).logits
        hf_prune.apply(model, plan)
        with torch.no_grad():
            compacted = model(input_ids=ids).logits
        torch.testing.assert_close(compacted, zeroed, rtol=0, atol=1e-5)  # surgery removes only dead structures
    assert plan.mlp_channels or plan.heads  # something became physically smaller
    assert model.num_parameters() < n_before
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert back.num_parameters() == model.num_parameters()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, compacted, rtol=0, atol=1e-5)


def test_apply_updates_checks_names_and_shapes():
    model = tiny_model("llama", num_hidden_layers=2)
    step = LLMSurgeon(target_of="linears", target=0.2, shots=1, criterion="magnitude", verbose=False).prune_step(model, [], 0)
    name = next(iter(step.updates))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        apply_updates(model, {name: torch.zeros(3, 3)})
    with pytest.raises(KeyError, match="nope"):
        apply_updates(model, {"nope.weight": torch.zeros(1)})
    apply_updates(model, step)
    assert dict(model.named_parameters())[name].eq(step.updates[name]).all()


def _train_like(model, seed: int) -> None:
    """What a merged LoRA does to every decoder linear: add a dense low-rank product (fills every zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lin in decoder_linears(model).values():
            R, C = lin.weight.shape
            lin.weight += 0.01 * torch.randn(R, 2, generator=g) @ torch.randn(2, C, generator=g)


def _zero_masks(model) -> dict[str, torch.Tensor]:
    return {name: lin.weight == 0 for name, lin in decoder_linears(model).items()}


@pytest.mark.parametrize("mode,target", [("structured", 0.3), ("2:4", 0.5), ("unstructured", 0.4)])
def test_zeros_that_training_fills_are_restored_before_the_next_shot_and_at_the_end(mode, target):
    model = tiny_model("llama", num_hidden_layers=2)
    n0, _ = _prunable(model)
    method = LLMSurgeon(target_of="linears", target=target, shots=2, mode=mode, chunk_size=512, criterion="kobd", verbose=False)
    plan = method.plan(model, _batches(), 0)
    hf_prune.apply(model, plan)
    after_shot = _zero_masks(model)
    _train_like(model, 0)
    assert all(not bool(m.any()) for m in _zero_masks(model).values())  # training filled every zero
    assert method.restore_zeros(model) > 0
    assert all(torch.equal(_zero_masks(model)[k], m) for k, m in after_shot.items())  # the very same zeros
    _train_like(model, 1)
    plan = method.plan(model, _batches(), 1)  # restores them itself before scoring
    hf_prune.apply(model, plan)
    n, z = _prunable(model)
    reached = n0 - n + z
    _train_like(model, 2)
    method.finalize(model)
    n, z = _prunable(model)
    assert n0 - n + z == reached
    if mode == "structured":
        assert reached == pytest.approx(plan.provenance["removed_fraction"] * n0)
        assert n < n0  # the second shot still compacted the model
    elif mode == "unstructured":
        assert reached == round(target * n0)
    else:
        for name, lin in decoder_linears(model).items():
            assert ((lin.weight.reshape(lin.out_features, -1, 4) == 0).sum(-1) == 2).all(), name


def test_zero_pattern_maps_through_surgery_and_refuses_another_shape():
    from hf_prune.methods.llm_surgeon import ZeroPattern

    lin = nn.Linear(6, 4, bias=True)
    with torch.no_grad():
        lin.weight[1] = 0
        lin.bias[1] = 0
        lin.weight[:, 4] = 0
    p = ZeroPattern.of(lin, elements=False)
    assert p.rows.tolist() == [False, True, False, False] and p.cols.tolist() == [False] * 4 + [True, False]
    kept = p.select(torch.tensor([0, 1, 3]), torch.tensor([0, 4, 5]))  # surgery kept rows 0, 1, 3, columns 0, 4, 5
    assert kept.rows.tolist() == [False, True, False] and kept.cols.tolist() == [False, True, False]
    small = nn.Linear(3, 3, bias=True)
    assert kept.restore(small) == 3 + 3 - 1 + 1  # row 1 (3 weights + its bias) and column 1 (3 weights, one shared)
    assert (small.weight[1] == 0).all() and (small.weight[:, 1] == 0).all() and small.bias[1] == 0
    assert small.weight[0, 0] != 0 and small.bias[0] != 0
    with pytest.raises(ValueError, match="does not fit a linear of 4 x 6"):
        kept.restore(lin)


@pytest.mark.parametrize("mode", ["structured", "unstructured"])
def test_weight_update_switch_separates_costs_from_update(mode):
    """Ablation knob: surgeon costs without the update only zero the selection; K-OBD costs with it move the rest."""
    base = tiny_model("llama", num_hidden_layers=2)
    kw = dict(target=0.3, shots=1, mode=mode, chunk_size=512, verbose=False, compute_dtype="float64")
    steps = {}
    for crit, upd in (("surgeon", None), ("surgeon", False), ("kobd", None), ("kobd", True)):
        m = LLMSurgeon(criterion=crit, weight_update=upd, **kw)
        assert m.updates_weights == (upd if upd is not None else crit == "surgeon")
        steps[crit, upd] = m.prune_step(base, _batches(), 0)
    orig = {f"{n}.weight": lin.weight for n, lin in decoder_linears(base).items()}
    for key in (("surgeon", False), ("kobd", None)):  # no update: every weight is either kept as it was or zero
        assert set(steps[key].updates) == set(orig), key  # one update per decoder linear, under its parameter name
        for name, W in steps[key].updates.items():
            assert bool(((W == orig[name]) | (W == 0)).all()), (key, name)
    for a, b in ((("surgeon", None), ("surgeon", False)), (("kobd", True), ("kobd", None))):
        sa, sb = steps[a].updates, steps[b].updates
        assert set(sa) == set(sb) == set(orig), (a, b)
        assert all(torch.equal(sa[n] == 0, sb[n] == 0) for n in sa)  # same selection
        assert any(not torch.allclose(sa[n], sb[n]) for n in sa)  # but the update moved the kept weights
    with pytest.raises(ValueError, match="weight_update=True needs the K-FAC curvature"):
        LLMSurgeon(criterion="magnitude", weight_update=True)


def test_target_is_a_fraction_of_all_parameters_by_default_in_structured_mode():
    """One meaning of `target` across methods: in structured mode LLM Surgeon removes that fraction of every
    parameter of the model (as pip, llm_pruner and magnitude do); target_of='linears' keeps the paper's count."""
    model = tiny_model("llama", num_hidden_layers=2)
    total = sum(p.numel() for p in model.parameters())
    n0, _ = _prunable(model)
    method = LLMSurgeon(target=0.2, shots=1, verbose=False)
    assert method.target_counts_all and not LLMSurgeon(mode="unstructured", target=0.5).target_counts_all
    _run(model, method, _batches())
    n, z = _prunable(model)
    removed = n0 - n + z
    assert removed <= round(0.2 * total) and removed > round(0.2 * n0)  # more than 20% of the linears alone
    assert removed >= 0.15 * total
    with pytest.raises(ValueError, match="target_of='all' does not fit mode '2:4'"):
        LLMSurgeon(mode="2:4", target=0.5, target_of="all")
    with pytest.raises(ValueError, match="target_of='rows'"):
        LLMSurgeon(target_of="rows")
    with pytest.raises(ValueError, match="more than the decoder's"):
        _run(tiny_model("llama", num_hidden_layers=2), LLMSurgeon(target=0.99, shots=1, verbose=False), _batches())
