"""LLM Surgeon (van der Ouderaa et al., "The LLM Surgeon", ICLR 2024, arXiv 2312.17244).

Every nn.Linear of the decoder layers is pruned with a K-FAC approximation of the Fisher, F = G (x) A
(hf_prune.kfac), on the augmented matrix W = [W | b] (R x C). Optimal-brain-surgeon costs of removing

    element (i, j):  1/2 W_ij^2 / ([G^-1]_ii [A^-1]_jj)
    row i:           1/2 (W A W^T)_ii / [G^-1]_ii
    column j:        1/2 (W^T G W)_jj / [A^-1]_jj
    2:4 block:       sum of its two cheapest element costs

are pooled over all matrices of all layers and one global threshold removes the cheapest structures until the
shot's parameter target is met (r rows and c columns of an R x C matrix remove rC + cR - rc parameters, so widths end
up different per layer and matrix). The remaining weights get the correlated OBS update
dw = -F^-1 E_Q ([F^-1]_QQ)^-1 w_Q. For rows R and columns K removed together this has the closed form

    W'[keep_r, keep_c] = (G_rr)^-1 [G W A]_{keep_r, keep_c} (A_cc)^-1
    (rows only, this is the paper's dW = -G^-1 E_R ([G^-1]_RR)^-1 W_R)

(the exact joint solution: the gradient of 1/2 tr(dW^T G dW A) vanishes on the kept block); element and 2:4 sets solve
the joint system with [G^-1] (x) [A^-1] restricted to the set, in chunks of `chunk_size` weights (or, with
`update_rule="columns"`, SparseGPT's column-after-column OBS per row under A alone: `column_update`). Multi-shot: the
target after shot t (1-based) is t * target / shots, with the curvature recomputed on the updated model every shot.

Counting (structured, `compact=True`): a selected structure can kill coupled ones (a gate row silences its channel's
up row and down column; the o_proj columns of a head its q/k rows), which surgery then removes too. The shot's count is
therefore "removed by surgery or zero", and the cheapest-first prefix is the longest whose count stays within the
target (bisection). With `compact=False` it is the paper's rC + cR - rc count.

Baselines in the same code (`criterion`): "kobd" (K-OBD: the uncompensated cost 1/2 w_Q^T F_QQ w_Q, no update) and
"magnitude" (1/2 ||w_Q||^2, no update, no data).

A method never edits modules. `prune_step` returns a `SurgeonStep` (a PrunePlan plus new values for the changed
parameters); `apply_updates(model, step)` writes the weights, then `hf_prune.surgery.apply(model, step.plan)` removes
what can be removed physically: MLP channels whose gate row (act(0) = 0), up row or down column is zero, and attention
heads whose o_proj columns or v_proj rows are zero, in whole grouped-query groups (equal query heads per kept kv
head). Everything else stays as zeros in place, and `plan.provenance["zeros_per_matrix"]` counts them per matrix.
Training between shots fills those zeros; `plan()` writes them back before the next shot and `finalize(model)` after
the last training. When no more training or surgery follows, `hf_prune.compact_zeros(model)` stores every projection
without its zero rows and columns (query/key rows inside heads, single value/output dimensions, residual-stream rows
and columns): same outputs, fewer parameters.

    result = hf_prune.prune(model, LLMSurgeon(target=0.2, shots=5, mode="structured"), batches)
    # per shot: plan (scores; the weight update travels with the plan), apply (update, then surgery); finalize
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Iterable

import torch
from torch import nn

from ..arch import get_adapter, unwrap_model
from ..kfac import FactorStore, damp_, decoder_linears, factor_bytes, iter_lm_kfac
from ..plan import PrunePlan
from ..runtime import progress, release_freed_memory
from ..surgery import attach_weight_update
from . import Batch, PruningMethod, register

__all__ = [
    "CRITERIA",
    "MODES",
    "LLMSurgeon",
    "SurgeonStep",
    "ZeroPattern",
    "apply_updates",
    "augmented_weight",
    "block24_selection",
    "column_update",
    "column_update_nm",
    "element_costs",
    "element_update",
    "select_elements",
    "select_structures",
    "structured_costs",
    "structured_update",
]

logger = logging.getLogger(__name__)

CRITERIA = ("surgeon", "kobd", "magnitude")
MODES = ("structured", "2:4", "unstructured")
UPDATE_RULES = ("kfac", "columns")
MASKS_24 = ("adaptive", "fixed")
TARGET_OF = ("auto", "all", "linears")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------------------------------------------------------
# Costs of one matrix (W is the augmented R x C' matrix; G, A damped; Ginv, Ainv their inverses)
# ------------------------------------------------------------------------------------------------------------------


def augmented_weight(lin: nn.Linear, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """[W | b] as one R x (C + has_bias) matrix in `dtype`."""
    W = lin.weight.detach().to(dtype)
    if lin.bias is not None:
        W = torch.cat([W, lin.bias.detach().to(dtype)[:, None]], dim=1)
    return W


def structured_costs(W: torch.Tensor, criterion: str, G: torch.Tensor | None = None, A: torch.Tensor | None = None,
                     Ginv: torch.Tensor | None = None, Ainv: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(row costs, column costs) of W.

    surgeon (OBS):  row 1/2 (W A W^T)_ii / [G^-1]_ii,   column 1/2 (W^T G W)_jj / [A^-1]_jj
    kobd (no update): row 1/2 (W A W^T)_ii G_ii,         column 1/2 (W^T G W)_jj A_jj
    magnitude:       row 1/2 ||W_i.||^2,                 column 1/2 ||W_.j||^2
    """
    if criterion == "magnitude":
        sq = W * W
        return 0.5 * sq.sum(1), 0.5 * sq.sum(0)
    wa = ((W @ A) * W).sum(1)
    gw = ((G @ W) * W).sum(0)
    if criterion == "surgeon":
        return 0.5 * wa / Ginv.diagonal(), 0.5 * gw / Ainv.diagonal()
    if criterion == "kobd":
        return 0.5 * wa * G.diagonal(), 0.5 * gw * A.diagonal()
    raise ValueError(f"criterion={criterion!r}; valid: {CRITERIA}")


def element_costs(W: torch.Tensor, criterion: str, G: torch.Tensor | None = None, A: torch.Tensor | None = None,
                  Ginv: torch.Tensor | None = None, Ainv: torch.Tensor | None = None) -> torch.Tensor:
    """Per-weight costs: surgeon 1/2 W_ij^2 / ([G^-1]_ii [A^-1]_jj); kobd 1/2 W_ij^2 G_ii A_jj; magnitude 1/2 W_ij^2."""
    sq = 0.5 * W * W
    if criterion == "magnitude":
        return sq
    if criterion == "surgeon":
        return sq / torch.outer(Ginv.diagonal(), Ainv.diagonal())
    if criterion == "kobd":
        return sq * torch.outer(G.diagonal(), A.diagonal())
    raise ValueError(f"criterion={criterion!r}; valid: {CRITERIA}")


def block24_selection(costs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For an R x C cost matrix (C divisible by 4): (block costs R x C/4 = sum of the two cheapest of each group of
    four consecutive inputs, R x C bool mask of those two cheapest)."""
    R, C = costs.shape
    blocks = costs.reshape(R, C // 4, 4)
    order = torch.argsort(blocks, dim=-1, stable=True)[..., :2]
    cheapest = torch.zeros_like(blocks, dtype=torch.bool).scatter_(-1, order, True)
    return torch.gather(blocks, -1, order).sum(-1), cheapest.reshape(R, C)


# ------------------------------------------------------------------------------------------------------------------
# Global selection
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class StructurePool:
    """Row and column costs of all matrices pooled and sorted; `total[k-1]` is the parameter count removed by the
    k cheapest structures (a matrix of R rows and C columns with r rows and c columns removed loses rC + cR - rc)."""

    costs: torch.Tensor
    order: torch.Tensor
    total: torch.Tensor
    n_rows: list[int]
    n_cols: list[int]

    def prefix_for(self, target: int) -> int:
        """The largest k whose removed count stays <= target."""
        return int(torch.searchsorted(self.total, torch.tensor([int(target)]), right=True).item())

    def masks(self, k: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(row masks, column masks) of the k cheapest structures."""
        sel = torch.zeros(self.costs.numel(), dtype=torch.bool)
        sel[self.order[:k]] = True
        rows, cols, pos = [], [], 0
        for R, C in zip(self.n_rows, self.n_cols):
            rows.append(sel[pos:pos + R])
            cols.append(sel[pos + R:pos + R + C])
            pos += R + C
        return rows, cols

    def threshold(self, k: int) -> float:
        return float(self.costs[self.order[k - 1]]) if k else float("-inf")


def structure_pool(row_costs: list[torch.Tensor], col_costs: list[torch.Tensor]) -> StructurePool:
    """Pool row and column costs of all matrices (one global order; ties broken by position)."""
    costs, mat, is_row, n_rows, n_cols = [], [], [], [], []
    for m, (rc, cc) in enumerate(zip(row_costs, col_costs)):
        R, C = rc.numel(), cc.numel()
        n_rows.append(R)
        n_cols.append(C)
        costs += [rc.float().cpu(), cc.float().cpu()]
        mat.append(torch.full((R + C,), m, dtype=torch.long))
        is_row.append(torch.cat([torch.ones(R, dtype=torch.bool), torch.zeros(C, dtype=torch.bool)]))
    costs, mat, is_row = torch.cat(costs), torch.cat(mat), torch.cat(is_row)
    order = torch.argsort(costs, stable=True)
    mid, isr = mat[order], is_row[order]
    # rows / columns of the same matrix earlier in the order: group by matrix, keeping the order inside groups
    grp = torch.argsort(mid, stable=True)
    g_mid, g_isr = mid[grp], isr[grp].long()
    _, counts = torch.unique_consecutive(g_mid, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    excl_r = torch.cumsum(g_isr, 0) - g_isr
    excl_c = torch.cumsum(1 - g_isr, 0) - (1 - g_isr)
    r_before, c_before = torch.empty_like(excl_r), torch.empty_like(excl_c)
    r_before[grp] = excl_r - excl_r[starts].repeat_interleave(counts)
    c_before[grp] = excl_c - excl_c[starts].repeat_interleave(counts)
    gain = torch.where(isr, torch.tensor(n_cols)[mid] - c_before, torch.tensor(n_rows)[mid] - r_before)
    return StructurePool(costs, order, torch.cumsum(gain, 0), n_rows, n_cols)


def select_structures(row_costs: list[torch.Tensor], col_costs: list[torch.Tensor], target: int
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor], int, float]:
    """Remove the cheapest rows and columns pooled over all matrices, in order, while the removed parameter count
    (overlap counted once) stays <= `target`. Returns (row masks, column masks, parameters removed, threshold)."""
    pool = structure_pool(row_costs, col_costs)
    k = pool.prefix_for(target)
    rows, cols = pool.masks(k)
    return rows, cols, int(pool.total[k - 1]) if k else 0, pool.threshold(k)


def select_elements(costs: list[torch.Tensor], target: int) -> tuple[list[torch.Tensor], float]:
    """Masks of the `target` cheapest entries pooled over all tensors (ties broken by position). Returns (masks,
    threshold)."""
    flat = torch.cat([c.reshape(-1).float().cpu() for c in costs])
    n = flat.numel()
    target = max(0, min(int(target), n))
    if target == 0:
        return [torch.zeros_like(c, dtype=torch.bool) for c in costs], float("-inf")
    thr = float(torch.kthvalue(flat, target).values)
    sel = flat < thr
    need = target - int(sel.sum())
    if need > 0:
        ties = torch.nonzero(flat == thr).flatten()[:need]
        sel[ties] = True
    masks, pos = [], 0
    for c in costs:
        masks.append(sel[pos:pos + c.numel()].reshape(c.shape).to(c.device))
        pos += c.numel()
    return masks, thr


def _largest_prefix(count, target: int, hi: int) -> int:
    """Largest k in [0, hi] with count(k) <= target, for a nondecreasing count (binary search)."""
    lo = 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if count(mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


# ------------------------------------------------------------------------------------------------------------------
# Correlated OBS updates
# ------------------------------------------------------------------------------------------------------------------




def _chol(M: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a damped curvature block; a float32 failure is retried in float64."""
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0 and M.dtype != torch.float64:
        L, info = torch.linalg.cholesky_ex(M.double())
        L = L.to(M.dtype)
    if int(info) != 0:
        raise ValueError(f"curvature block of size {M.shape[0]} is not positive definite; use a larger damping")
    return L


def structured_update(W: torch.Tensor, G: torch.Tensor, A: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
                      ) -> torch.Tensor:
    """Exact OBS removal of rows `rows` and columns `cols` (bool masks) of W under F = G (x) A:
    W'[kr, kc] = G[kr, kr]^-1 (G W A)[kr, kc] A[kc, kc]^-1, zero on the removed rows and columns."""
    kr, kc = ~rows, ~cols
    out = torch.zeros_like(W)
    if not bool(kr.any()) or not bool(kc.any()):
        return out
    M = (G[kr] @ W) @ A[:, kc]
    X = torch.cholesky_solve(M, _chol(G[kr][:, kr]))
    X = torch.cholesky_solve(X.T, _chol(A[kc][:, kc])).T
    out[torch.nonzero(kr).flatten()[:, None], torch.nonzero(kc).flatten()[None, :]] = X
    return out


def element_update(W: torch.Tensor, Ginv: torch.Tensor, Ainv: torch.Tensor, mask: torch.Tensor,
                   chunk_size: int = 2000) -> torch.Tensor:
    """OBS removal of the weights in `mask`: chunk by chunk (row-major order, `chunk_size` weights each),
    dW = -Ginv E_Q ([Ginv]_rr * [Ainv]_cc)^-1 w_Q  (the Kronecker inverse restricted to the chunk), applied to the
    running W; every masked weight is zero at the end. One chunk holding the whole mask is the exact joint solution."""
    W = W.clone()
    idx = torch.nonzero(mask)
    for s in range(0, idx.shape[0], chunk_size):
        r, c = idx[s:s + chunk_size].unbind(1)
        K = Ginv[r][:, r] * Ainv[c][:, c]
        lam = torch.cholesky_solve(W[r, c][:, None], _chol(K)).squeeze(1)
        rows, local = torch.unique(r, return_inverse=True)
        Mat = torch.zeros(rows.numel(), W.shape[1], dtype=W.dtype, device=W.device)
        Mat.index_put_((local, c), lam, accumulate=True)
        W -= Ginv[:, rows] @ (Mat @ Ainv)
        W[r, c] = 0
    W[mask] = 0
    return W


def column_update(W: torch.Tensor, Ainv: torch.Tensor, mask: torch.Tensor, block_size: int = 128) -> torch.Tensor:
    """OBS removal of the weights in `mask` row by row under the input curvature A alone, column after column as
    SparseGPT does (Frantar & Alistarh 2023): with A^-1 = U^T U (U upper triangular), removing column j's masked
    weights adds dW[:, j:] = -(w_j / U_jj) U_j,j: to the row, so each removed weight is compensated by the weights to
    its right and a weight already zeroed is never moved again. Exact OBS for the first column; the order makes it
    an approximation for the others (the weights to the left are frozen). G only scales whole rows under F = G (x) A
    with G diagonal, so the rows decouple and G drops out. O(R C^2) per matrix; the columns right of the current
    `block_size` columns receive their updates once per block (lazy batched updates, the same result)."""
    return _column_sweep(W, Ainv, mask=mask, block_size=block_size)[0]


def column_update_nm(W: torch.Tensor, Ainv: torch.Tensor, groups: torch.Tensor, n: int = 2, m: int = 4,
                     block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """`column_update` with the N:M mask chosen inside the sweep, as SparseGPT does (Frantar & Alistarh 2023, Alg. 1
    with B_s = M): when the sweep reaches the first column of a group of `m` inputs, each row whose group is to be
    pruned (`groups`, R x C/m bool, over the first C = m * groups.shape[1] columns of W) removes the `n` weights of
    lowest saliency w_j^2 / U_jj^2 (A^-1 = U^T U), computed on the weights as the OBS updates of the columns to the
    left have already changed them; 1 / U_jj^2 is the OBS denominator of column j with the columns to its left
    frozen. Columns past C (a bias) are compensated but never removed. Returns (new W, the mask chosen)."""
    R, ng = groups.shape
    if ng * m > W.shape[1]:
        raise ValueError(f"{ng} groups of {m} inputs need {ng * m} columns but W has {W.shape[1]}")
    return _column_sweep(W, Ainv, groups=groups, n=n, m=m, block_size=block_size)


def _column_sweep(W: torch.Tensor, Ainv: torch.Tensor, mask: torch.Tensor | None = None,
                  groups: torch.Tensor | None = None, n: int = 2, m: int = 4, block_size: int = 128
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    W = W.clone()
    R, C = W.shape
    U = torch.linalg.cholesky(Ainv, upper=True)
    chosen = torch.zeros_like(W, dtype=torch.bool) if mask is None else mask.clone()
    if mask is not None:
        active = chosen.any(0)
    else:
        active = torch.zeros(C, dtype=torch.bool, device=W.device)
        active[: groups.shape[1] * m] = groups.any(0).repeat_interleave(m)
    if groups is not None:
        block_size = max(m, block_size - block_size % m)  # a group never straddles two blocks
    last = int(torch.nonzero(active).max()) + 1 if bool(active.any()) else 0
    for i1 in range(0, last, block_size):
        i2 = min(i1 + block_size, C)
        if not bool(active[i1:i2].any()):
            continue
        W1, U1 = W[:, i1:i2], U[i1:i2, i1:i2]
        d = U1.diagonal()
        err = torch.zeros(R, i2 - i1, dtype=W.dtype, device=W.device)
        for j in range(i2 - i1):
            col = i1 + j
            if groups is not None and col % m == 0 and col // m < groups.shape[1] and bool(active[col]):
                sal = W1[:, j:j + m] ** 2 / d[j:j + m] ** 2
                low = torch.argsort(sal, dim=1, stable=True)[:, :n]
                pick = torch.zeros(R, m, dtype=torch.bool, device=W.device).scatter_(1, low, True)
                chosen[:, col:col + m] = pick & groups[:, col // m, None]
            if not bool(active[col]):
                continue
            e = torch.where(chosen[:, col], W1[:, j], torch.zeros_like(W1[:, j])) / d[j]
            W1[:, j:] -= e[:, None] * U1[j, j:][None, :]
            err[:, j] = e
        if i2 < C:
            W[:, i2:] -= err @ U[i1:i2, i2:]
    W[chosen] = 0
    return W, chosen


# ------------------------------------------------------------------------------------------------------------------
# From zeros to a plan
# ------------------------------------------------------------------------------------------------------------------


def _zero_rows(W: torch.Tensor) -> torch.Tensor:
    return ~W.bool().any(1)


def _zero_cols(W: torch.Tensor) -> torch.Tensor:
    return ~W.bool().any(0)


def _act_zero_at_zero(mlp_module: nn.Module) -> bool:
    act = getattr(mlp_module, "act_fn", None)
    if act is None:
        return False
    try:
        return float(act(torch.zeros(1))) == 0.0
    except Exception:
        return False


@dataclass
class _Compaction:
    """Structures surgery can remove (kept indices, only for layers that lose something) and per-matrix counts."""

    heads: dict[int, list[int]]
    kv_heads: dict[int, list[int]]
    mlp_channels: dict[int, list[int]]
    counts: dict[str, dict[str, int]]

    @property
    def removed_or_zero(self) -> int:
        return sum(c["removed"] + c["zeros_left"] for c in self.counts.values())


def compaction(model: nn.Module, names: dict[int, dict[str, str]], zero_rows: dict[str, torch.Tensor],
               zero_cols: dict[str, torch.Tensor], weights: dict[str, torch.Tensor] | None = None,
               compact: bool = True) -> _Compaction:
    """Dead structures of every layer given the zero rows / columns of each augmented matrix (by module name).

    An MLP channel is dead when its down_proj column, its up_proj row, or (act(0) = 0) its gate_proj row is zero; a
    query head when its o_proj columns or the v_proj rows of its kv head are zero. A kv head goes when all its query
    heads are dead; kept kv groups keep equally many query heads (dead ones fill up groups with more live heads).
    Counts per matrix: "removed" (parameters surgery removes), "zeros_left" (zeros in what it keeps; exact from
    `weights` when given, else rows x columns arithmetic) and "zeros" (before surgery).
    """
    ad = get_adapter(model)
    heads, kv_heads, channels, counts = {}, {}, {}, {}
    for i in range(ad.num_layers):
        a, m = ad.attention(i), ad.mlp(i)
        n = names[i]
        zr = {k: zero_rows[v] for k, v in n.items()}
        zc = {k: zero_cols[v] for k, v in n.items()}
        for k in n:  # a matrix with every column removed has every row zero, and the other way round
            if bool(zc[k].all()) or bool(zr[k].all()):
                zr[k], zc[k] = torch.ones_like(zr[k]), torch.ones_like(zc[k])
        keep_rows = {k: torch.ones_like(v) for k, v in zr.items()}
        keep_cols = {k: torch.ones_like(v) for k, v in zc.items()}
        if compact:
            # ----- MLP channels: the channel's output is zero if any of its three pieces is zero
            I = m.intermediate_size
            dead = zc["down_proj"][:I] | zr["up_proj"]
            if "gate_proj" in zr and _act_zero_at_zero(m.module):
                dead = dead | zr["gate_proj"]
            if bool(dead.all()):
                dead = dead.clone()
                dead[0] = False  # a layer keeps at least one channel (validate); it stays zero
            if bool(dead.any()):
                channels[i] = torch.nonzero(~dead).flatten().tolist()
                for k in ("gate_proj", "up_proj"):
                    if k in zr:
                        keep_rows[k] = ~dead
                keep_cols["down_proj"] = keep_cols["down_proj"].clone()
                keep_cols["down_proj"][:I] = ~dead
            # ----- attention heads: zero o_proj columns of a head, or zero v_proj rows of its kv head
            hd, nq, nkv, g = a.head_dim, a.num_heads, a.num_kv_heads, a.group_size
            v_dead = zr["v_proj"].reshape(nkv, hd).all(1)
            o_dead = zc["o_proj"][: nq * hd].reshape(nq, hd).all(1)
            live = (~(o_dead | v_dead.repeat_interleave(g))).reshape(nkv, g).cpu()
            kv_keep = [k for k in range(nkv) if bool(live[k].any())] or [0]
            per_group = max(1, max(int(live[k].sum()) for k in kv_keep))
            q_keep = []
            for k in kv_keep:
                order = sorted(range(g), key=lambda j: (not bool(live[k, j]), j))  # live heads first, then dead
                q_keep += sorted(k * g + j for j in order[:per_group])
            if len(q_keep) < nq:
                heads[i], kv_heads[i] = q_keep, kv_keep
                qmask = torch.zeros(nq, dtype=torch.bool)
                qmask[q_keep] = True
                kvmask = torch.zeros(nkv, dtype=torch.bool)
                kvmask[kv_keep] = True
                qrows, kvrows = qmask.repeat_interleave(hd), kvmask.repeat_interleave(hd)
                dev = zr["q_proj"].device
                keep_rows["q_proj"], keep_rows["k_proj"], keep_rows["v_proj"] = qrows.to(dev), kvrows.to(dev), \
                    kvrows.to(dev)
                keep_cols["o_proj"] = keep_cols["o_proj"].clone()
                keep_cols["o_proj"][: nq * hd] = qrows.to(dev)
        for k, v in n.items():
            R, C = zr[k].numel(), zc[k].numel()
            kr, kc = keep_rows[k], keep_cols[k]
            nr, nc = int(kr.sum()), int(kc.sum())
            if weights is not None:
                w = weights[v]
                zeros = int((w == 0).sum())
                left = int((w[kr][:, kc] == 0).sum())
            else:
                zeros = int(zr[k].sum()) * C + int(zc[k].sum()) * R - int(zr[k].sum()) * int(zc[k].sum())
                a_, b_ = int((zr[k] & kr).sum()), int((zc[k] & kc).sum())
                left = a_ * nc + b_ * nr - a_ * b_
            counts[f"layers.{i}.{k}"] = {"zeros": zeros, "removed": R * C - nr * nc, "zeros_left": left}
    return _Compaction(heads, kv_heads, channels, counts)


# ------------------------------------------------------------------------------------------------------------------
# The weight update object and its application
# ------------------------------------------------------------------------------------------------------------------


@dataclass
class SurgeonStep:
    """One shot of LLM Surgeon: what to remove (`plan`) and the new values of the parameters it changed
    (`updates`: parameter name in the unwrapped model -> tensor of the parameter's current shape). Apply with
    `apply_updates(model, step)` and then `hf_prune.surgery.apply(model, step.plan)`."""

    plan: PrunePlan
    updates: dict[str, torch.Tensor]
    stats: dict[str, Any] = field(default_factory=dict)


def apply_updates(model: nn.Module, step: SurgeonStep | dict[str, torch.Tensor]) -> None:
    """Copy the new parameter values of `step` into `model` (in place, no shape change). Raises naming the parameter
    when a name is missing or a shape differs (e.g. the model was already compacted by another plan)."""
    updates = step.updates if isinstance(step, SurgeonStep) else step
    params = dict(unwrap_model(model).named_parameters())
    for name, new in updates.items():
        if name not in params:
            raise KeyError(f"update names parameter {name!r}, which the model does not have")
        if params[name].shape != new.shape:
            raise ValueError(
                f"update for {name} has shape {tuple(new.shape)} but the parameter has {tuple(params[name].shape)}; "
                "apply the update before the plan's surgery, on the model it was computed for"
            )
    with torch.no_grad():
        for name, new in updates.items():
            params[name].copy_(new.to(device=params[name].device, dtype=params[name].dtype))


@dataclass
class ZeroPattern:
    """The zeros of one decoder linear that surgery could not remove: whole rows of the augmented matrix [W | b]
    (`rows`, R), whole weight columns (`cols`, C), the bias column (`bias_zero`; None without a bias) and, in element
    modes, single weights (`elems`, R x C). Training (a merged LoRA, full fine-tuning) fills them; `restore` writes
    them back."""

    rows: torch.Tensor
    cols: torch.Tensor
    bias_zero: bool | None = None
    elems: torch.Tensor | None = None

    @classmethod
    def of(cls, lin: nn.Linear, elements: bool) -> "ZeroPattern":
        z = lin.weight.detach() == 0
        rows, cols = z.all(1), z.all(0)
        bias_zero = None
        if lin.bias is not None:
            bz = lin.bias.detach() == 0
            rows, bias_zero = rows & bz, bool(bz.all())
        return cls(rows.cpu(), cols.cpu(), bias_zero, z.cpu() if elements else None)

    def select(self, rows: torch.Tensor | None, cols: torch.Tensor | None) -> "ZeroPattern":
        """The pattern after surgery kept rows `rows` and weight columns `cols` (None: all)."""
        r, c, e = self.rows, self.cols, self.elems
        if rows is not None:
            r = r[rows]
            e = e[rows] if e is not None else None
        if cols is not None:
            c = c[cols]
            e = e[:, cols] if e is not None else None
        return ZeroPattern(r, c, self.bias_zero, e)

    def restore(self, lin: nn.Linear) -> int:
        """Zero `lin` where the pattern says; returns how many nonzero parameters it zeroed."""
        W, b = lin.weight, lin.bias
        fits = (self.rows.numel() == W.shape[0] and self.cols.numel() == W.shape[1]
                and (self.bias_zero is None) == (b is None)
                and (self.elems is None or tuple(self.elems.shape) == tuple(W.shape)))
        if not fits:
            raise ValueError(f"zero pattern of {self.rows.numel()} rows x {self.cols.numel()} columns does not fit a "
                             f"linear of {W.shape[0]} x {W.shape[1]} (bias: {b is not None}): the model changed shape "
                             "since the last shot other than by that shot's plan")
        mask = self.rows.to(W.device)[:, None] | self.cols.to(W.device)[None, :]
        if self.elems is not None:
            mask = mask | self.elems.to(W.device)
        with torch.no_grad():
            n = int((W[mask] != 0).sum())
            W.masked_fill_(mask, 0)
            if b is not None:
                bmask = torch.ones_like(self.rows) if self.bias_zero else self.rows
                bmask = bmask.to(b.device)
                n += int((b[bmask] != 0).sum())
                b.masked_fill_(bmask, 0)
        return n


def _kept_indices(ad, plan: PrunePlan, layer: int) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """(kept rows, kept weight columns) of every linear of `layer` under `plan` (None: all kept)."""
    out: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
    a, m = ad.attention(layer), ad.mlp(layer)
    q, kv = plan.resolved_heads(ad, layer)
    if len(q) < a.num_heads or len(kv) < a.num_kv_heads:
        from ..surgery.common import head_rows  # the rows surgery keeps for these heads

        qr, kvr = head_rows(q, a.head_dim), head_rows(kv, a.head_dim)
        out.update(q_proj=(qr, None), k_proj=(kvr, None), v_proj=(kvr, None), o_proj=(None, qr))
    ch = plan.mlp_channels.get(layer)
    if ch is not None and len(ch) < m.intermediate_size:
        idx = torch.tensor(sorted(ch), dtype=torch.long)
        out.update(up_proj=(idx, None), down_proj=(None, idx))
        if m.gate_proj is not None:
            out["gate_proj"] = (idx, None)
    return out


# ------------------------------------------------------------------------------------------------------------------
# The method
# ------------------------------------------------------------------------------------------------------------------


@register("llm_surgeon")
@dataclass
class LLMSurgeon(PruningMethod):
    """LLM Surgeon: K-FAC OBS pruning of every decoder nn.Linear with a global threshold and multi-shot schedule
    (van der Ouderaa et al., ICLR 2024). Each shot is one stage: `plan(model, batches, stage)`, then
    `hf_prune.apply(model, plan)`, which writes the shot's weight update and then removes what surgery can."""

    runs_on_every_rank = True  # the plan carries the correlated weight update: every process computes it itself

    target: float = field(default=0.2, metadata={"help": "Fraction removed after the last shot, of what target_of "
                                                           "names."})
    target_of: str = field(default="auto", metadata={
        "help": "What target is a fraction of: all (every parameter of the model, tied embeddings once: the meaning "
                "`target` has in pip, llm_pruner and magnitude), linears (the decoder's linear weights and biases: "
                "the paper's), or auto (all in structured mode; linears for 2:4 and unstructured, whose target is a "
                "per-weight sparsity as in SparseGPT and Wanda)."})
    shots: int = field(default=5, metadata={"help": "Number of shots T; the target after shot t is t * target / T, "
                                                     "with the curvature recomputed every shot (paper: 40)."})
    mode: str = field(default="structured", metadata={"help": f"What is removed: one of {MODES}."})
    criterion: str = field(default="surgeon", metadata={
        "help": "surgeon (OBS costs + correlated updates), kobd (K-OBD: uncompensated cost, no update) or "
                "magnitude (1/2 ||w||^2, no update, no calibration data)."})
    damping_g: float | None = field(default=None, metadata={
        "help": "Damping of G relative to its mean diagonal; None: 0.01 structured, 0.1 for 2:4 and unstructured."})
    damping_a: float = field(default=0.01, metadata={"help": "Damping of A relative to its mean diagonal."})
    fisher: str = field(default="empirical", metadata={
        "help": "empirical (dataset labels) or sampled (labels drawn from the model: the true Fisher)."})
    chunk_size: int = field(default=2000, metadata={
        "help": "Weights solved jointly per chunk in the element / 2:4 update (cost ~ chunk_size^2 per weight)."})
    update_rule: str = field(default="kfac", metadata={
        "help": "Element and 2:4 weight update: kfac (the joint K-FAC OBS system in chunks of chunk_size, rows "
                "coupled through G^-1) or columns (SparseGPT's column-after-column OBS per row with A alone: no "
                "weight is moved after it was zeroed; much faster). Used where the update is on (weight_update)."})
    weight_update: bool | None = field(default=None, metadata={
        "help": "Apply the correlated OBS weight update to what remains; None: yes for surgeon, no for kobd and "
                "magnitude. Setting it separates the two halves of the method in ablations (surgeon costs without "
                "the update; K-OBD costs with it). Needs curvature: not with magnitude."})
    mask_24: str = field(default="fixed", metadata={
        "help": "2:4 mode with update_rule=columns: fixed (the two cheapest by the criterion's cost, chosen before the "
                "sweep) or adaptive (SparseGPT's: each group of four inputs picks its two weights when the column "
                "sweep reaches it, by w^2 / [U]_jj^2 with A^-1 = U^T U, on the weights as the updates of the columns "
                "to its left left them). Which groups are pruned in a shot is the global selection either way. "
                "Measured on SmolLM2-135M (benchmarks/peers.py, K-OBD + columns, 2 shots): fixed 113.88, adaptive "
                "134.17 wiki perplexity, although adaptive reconstructs each layer better on its calibration inputs."})
    sequential: bool = field(default=False, metadata={
        "help": "2:4 mode in one shot: prune the decoder layer by layer, each layer's input factor A measured on the "
                "outputs of the layers already pruned before it, with the column update and the adaptive 2:4 mask "
                "(SparseGPT's sequential calibration; needs target=0.5, shots=1 and a criterion with curvature). No "
                "backward pass: inside a row, G only scales the costs. Measured on SmolLM2-135M (benchmarks/peers.py): "
                "95.6 wiki perplexity (103.6 with float64 sums: the adaptive chain amplifies rounding) against 115.0 "
                "for K-OBD 2:4 in 2 shots and 103.3 for llm-compressor's SparseGPT 2:4."})
    compute_dtype: str = field(default="float64", metadata={"help": "dtype of the curvature algebra: float64 or "
                                                                    "float32."})
    factor_device: str = field(default="auto", metadata={
        "help": "Where K-FAC factors live: auto (the model's device when they fit, else cpu), cpu, or a device."})
    factor_memory: float | None = field(default=0.25, metadata={
        "help": "GiB of K-FAC factors (float32) resident at once: the decoder layers are collected in groups that "
                "fit, one forward/backward pass per group, and when there is more than one group the factors wait "
                "for the update pass in files in the temporary folder; None: every layer in one pass, in memory."})
    kfac_micro_batch: int | None = field(default=1, metadata={
        "help": "Sequences per forward/backward pass of the curvature (each calibration batch is split; same sums, "
                "activation memory of one training step at this batch size); None: the batches as given."})
    compact: bool = field(default=True, metadata={
        "help": "Put dead MLP channels and attention head groups into the plan (physically removed by surgery). "
                "Never done in 2:4 mode, where removing a column would break the pattern."})
    reference_numel: int | None = field(default=None, metadata={
        "help": "Prunable parameters of the dense model the target refers to; None: counted at stage 0. Set it "
                "when resuming a multi-shot run at a later stage."})
    verbose: bool = field(
        default=True,
        metadata={"help": "Show progress bars and log each shot's progress and memory estimates at INFO (logger "
                          "hf_prune.methods.llm_surgeon; the CLI shows them with -v)."},
    )

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r}; valid: {MODES}")
        if self.criterion not in CRITERIA:
            raise ValueError(f"criterion={self.criterion!r}; valid: {CRITERIA}")
        if self.target_of not in TARGET_OF:
            raise ValueError(f"target_of={self.target_of!r}; valid: {TARGET_OF}")
        if self.mode == "2:4" and self.target_of == "all":
            raise ValueError("target_of='all' does not fit mode '2:4': its target is the fraction of each linear's "
                             "weights (at most 0.5); use target_of='linears' or 'auto'")
        hi = 0.5 if self.mode == "2:4" else 1.0
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or not 0.0 < self.target <= hi:
            raise ValueError(f"target={self.target} for mode {self.mode!r}; valid: 0 < target <= {hi}")
        if self.shots < 1:
            raise ValueError(f"shots={self.shots}; need at least 1")
        if self.compute_dtype not in DTYPES:
            raise ValueError(f"compute_dtype={self.compute_dtype!r}; valid: {sorted(DTYPES)}")
        if self.weight_update and self.criterion == "magnitude":
            raise ValueError("weight_update=True needs the K-FAC curvature, which criterion='magnitude' does not "
                             "compute; use criterion 'surgeon' or 'kobd'")
        if self.chunk_size < 1:
            raise ValueError(f"chunk_size={self.chunk_size}; need at least 1")
        if self.update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule={self.update_rule!r}; valid: {UPDATE_RULES}")
        if self.mask_24 not in MASKS_24:
            raise ValueError(f"mask_24={self.mask_24!r}; valid: {MASKS_24}")
        if self.sequential:
            wrong = {k: v for k, v in (("mode", self.mode), ("shots", self.shots), ("target", self.target),
                                        ("criterion", self.criterion), ("weight_update", self.weight_update))
                     if (k, v) not in (("mode", "2:4"), ("shots", 1), ("target", 0.5), ("criterion", "surgeon"),
                                       ("criterion", "kobd"), ("weight_update", None), ("weight_update", True))}
            if wrong:
                raise ValueError(f"sequential=True prunes every group of four inputs of each layer in one pass: it "
                                 f"needs mode='2:4', shots=1, target=0.5, a criterion with curvature ('surgeon' or "
                                 f"'kobd') and the weight update; got {wrong}")
        if self.factor_memory is not None and not self.factor_memory > 0:
            raise ValueError(f"factor_memory={self.factor_memory}; give GiB > 0, or None for all factors at once")
        if self.kfac_micro_batch is not None and self.kfac_micro_batch < 1:
            raise ValueError(f"kfac_micro_batch={self.kfac_micro_batch}; need at least 1 (or None)")
        # zeros of the shots so far that surgery could not remove, keyed by (layer, matrix), in the current indices
        self.zero_patterns: dict[tuple[int, str], ZeroPattern] | None = None

    @property
    def stages(self) -> int:
        return self.shots

    @property
    def needs_calibration(self) -> bool:
        return self.criterion != "magnitude"

    @property
    def target_counts_all(self) -> bool:
        """Whether `target` is a fraction of every parameter of the model (else of the decoder's linears)."""
        return self.target_of == "all" or (self.target_of == "auto" and self.mode == "structured")

    @property
    def updates_weights(self) -> bool:
        """Whether shots apply the correlated OBS update (`weight_update`, default: only for surgeon)."""
        return self.weight_update if self.weight_update is not None else self.criterion == "surgeon"

    @property
    def adaptive_24(self) -> bool:
        """Whether 2:4 masks are chosen inside the column sweep (mode 2:4, update on, update_rule columns, mask_24
        adaptive)."""
        return (self.mode == "2:4" and self.updates_weights and self.update_rule == "columns"
                and self.mask_24 == "adaptive")

    @property
    def damping(self) -> tuple[float, float]:
        g = self.damping_g if self.damping_g is not None else (0.01 if self.mode == "structured" else 0.1)
        return g, self.damping_a

    def _log(self, msg: str) -> None:
        """Log `msg` at INFO when `verbose` (the CLI's -v shows INFO messages)."""
        if self.verbose:
            logger.info("%s", msg)

    # ----- PruningMethod interface --------------------------------------------------------------
    def plan(self, model: nn.Module, batches: Iterable[Batch], stage: int = 0) -> PrunePlan:
        """Score the model for shot `stage` and return its PrunePlan. The correlated weight update travels with the
        plan (`hf_prune.surgery.attach_weight_update`): `hf_prune.apply(model, plan)` writes it before the surgery,
        so no caller can skip it."""
        if stage == 0:
            self.zero_patterns = None
        else:
            self.restore_zeros(model)  # recovery training since the last shot filled them
        step = self.sequential_step(model, batches) if self.sequential else self.prune_step(model, batches, stage)
        attach_weight_update(step.plan, partial(self._write_step, step))
        return step.plan

    def _write_step(self, step: SurgeonStep, model: nn.Module) -> None:
        """Write the weight update of `step` into `model` (before its surgery) and remember the zeros that the plan's
        surgery will not remove, in the indices of the model after that surgery."""
        apply_updates(model, step)
        self.zero_patterns = self._patterns_after(unwrap_model(model), step.plan)

    def finalize(self, model: nn.Module) -> None:
        """After the last recovery training (LoRA merged): `restore_zeros`."""
        self.restore_zeros(model)

    def restore_zeros(self, model: nn.Module) -> int:
        """Write back the zeros of every shot so far that surgery could not remove (q/k rows, residual-stream
        columns, partial heads, 2:4 and unstructured zeros) and that training filled since: a merged LoRA adds its
        low-rank product everywhere, full fine-tuning moves every weight. `plan()` does it before each later shot;
        call it (or `finalize`) after merging the last recovery. Returns how many nonzero parameters it zeroed."""
        if not self.zero_patterns:
            return 0
        model = unwrap_model(model)
        ad = get_adapter(model)
        n = 0
        for i in range(ad.num_layers):
            for short, lin in ad.linears(i):
                pattern = self.zero_patterns.get((i, short))
                if pattern is not None:
                    n += pattern.restore(lin)
        if n:
            self._log(f"restored {n:,} pruned zeros that training had filled")
        return n

    def state_dict(self) -> dict[str, Any]:
        """The reference parameter count and the zero patterns of the shots so far (for a resumed run)."""
        patterns = {f"{i}:{short}": {"rows": p.rows, "cols": p.cols, "bias_zero": p.bias_zero, "elems": p.elems}
                    for (i, short), p in (self.zero_patterns or {}).items()}
        return {"reference_numel": self.reference_numel, "reference_total": getattr(self, "reference_total", None),
                "zero_patterns": patterns}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("reference_numel") is not None:
            self.reference_numel = int(state["reference_numel"])
            self._auto_reference = False
        if state.get("reference_total") is not None:
            self.reference_total = int(state["reference_total"])
        patterns = {}
        for key, p in (state.get("zero_patterns") or {}).items():
            layer, short = key.split(":")
            patterns[(int(layer), short)] = ZeroPattern(p["rows"], p["cols"], p["bias_zero"], p["elems"])
        self.zero_patterns = patterns or None

    def _patterns_after(self, model: nn.Module, plan: PrunePlan) -> dict[tuple[int, str], ZeroPattern]:
        ad = get_adapter(model)
        elements = self.mode != "structured"
        dropped = set(plan.drop_layers)
        kept_layers = [i for i in range(ad.num_layers) if i not in dropped]
        out: dict[tuple[int, str], ZeroPattern] = {}
        for new_i, i in enumerate(kept_layers):
            keep = _kept_indices(ad, plan, i)
            for short, lin in ad.linears(i):
                pattern = ZeroPattern.of(lin, elements)
                if short in keep:
                    pattern = pattern.select(*keep[short])
                if bool(pattern.rows.any()) or bool(pattern.cols.any()) or pattern.bias_zero or (
                        pattern.elems is not None and bool(pattern.elems.any())):
                    out[(new_i, short)] = pattern
        return out

    # ----- one shot --------------------------------------------------------------------------------
    def prunable_numel(self, linears: dict[str, nn.Linear]) -> int:
        """Parameters the target refers to: weights and biases (weights only in 2:4 mode)."""
        bias = self.mode != "2:4"
        return sum(l.weight.numel() + (l.bias.numel() if bias and l.bias is not None else 0) for l in linears.values())

    def prune_step(self, model: nn.Module, batches: Iterable[Batch], stage: int = 0) -> SurgeonStep:
        """Shot `stage` (0-based): curvature, costs, global threshold, updates, compaction. Does not touch the model's
        weights or shapes."""
        if not 0 <= stage < self.shots:
            raise ValueError(f"stage={stage}; valid stages are 0..{self.shots - 1} (shots={self.shots})")
        t0 = time.perf_counter()
        model = unwrap_model(model)
        from ..surgery.common import refuse_compacted

        refuse_compacted(model, "LLM Surgeon")
        release_freed_memory()  # what the last shot's update and surgery freed, before this shot's factors
        ad = get_adapter(model)
        dtype = DTYPES[self.compute_dtype]
        linears = decoder_linears(model)
        param_names = {id(lin): name for name, lin in linears.items()}
        current = self.prunable_numel(linears)
        if stage == 0 and self.reference_numel is None:
            self.reference_numel = current
            self._auto_reference = True
        elif stage == 0 and getattr(self, "_auto_reference", False):
            self.reference_numel = current
        if stage == 0:
            self.reference_total = sum(p.numel() for p in model.parameters())
        if self.reference_numel is None:
            raise ValueError(
                f"stage={stage} > 0 but reference_numel is unknown; run stage 0 first on the dense model or set "
                "reference_numel to the dense model's prunable parameter count"
            )
        fraction = (stage + 1) * self.target / self.shots
        if self.target_counts_all:
            if getattr(self, "reference_total", None) is None:
                raise ValueError(f"stage={stage} > 0 but the dense model's parameter count is unknown (target_of="
                                 f"{self.target_of!r}); run stage 0 first or load the method state of a stage checkpoint")
            goal = round(fraction * self.reference_total)
            if goal > self.reference_numel:
                raise ValueError(
                    f"target={self.target} of all {self.reference_total:,} parameters asks for {goal:,}, more than the "
                    f"decoder's {self.reference_numel:,} linear parameters LLM Surgeon can remove; lower target "
                    f"(at most {self.reference_numel / self.reference_total:.3f})")
        else:
            goal = round(fraction * self.reference_numel)
        already = self.reference_numel - current  # removed physically by earlier shots
        want = max(0, goal - already)
        self._log(f"shot {stage + 1}/{self.shots}: {self.mode} {self.criterion}, target {fraction:.4f} of "
                  f"{self.reference_numel:,} -> remove {want:,} of the current {current:,}")

        dev = next(model.parameters()).device
        lam_g, lam_a = self.damping

        def curvature(f):
            """Damped (G, A) of one linear in the compute dtype; the stored factors stay float32."""
            G, A = f.dense(dtype, dev)
            return damp_(G, lam_g), damp_(A, lam_a)

        def inverses(G, A):
            return torch.cholesky_inverse(_chol(G)), torch.cholesky_inverse(_chol(A))

        # ----- costs of every matrix, the curvature collected group of layers by group (factor_memory)
        names = list(linears)
        row_c, col_c, elem_c, block_sel = {}, {}, {}, {}
        do_update = self.updates_weights
        groups_24: dict[str, torch.Tensor] = {}
        n_tokens = 0
        fstore = None

        def costs_of(name: str, f) -> None:
            W = augmented_weight(linears[name], dtype).to(dev)
            G = A = Ginv = Ainv = None
            if f is not None:
                G, A = curvature(f)
                if self.criterion == "surgeon":
                    Ginv, Ainv = inverses(G, A)
            if self.mode == "structured":
                r, c = structured_costs(W, self.criterion, G, A, Ginv, Ainv)
                row_c[name], col_c[name] = r.float(), c.float()
            else:
                e = element_costs(W, self.criterion, G, A, Ginv, Ainv).float()
                if self.mode == "2:4":
                    C = linears[name].in_features
                    if C % 4:
                        raise ValueError(f"{name} has {C} inputs, not a multiple of 4: 2:4 sparsity is impossible")
                    bc, cheapest = block24_selection(e[:, :C])
                    elem_c[name], block_sel[name] = bc, cheapest
                else:
                    elem_c[name] = e

        if self.criterion != "magnitude":
            batches = list(batches)
            budget = None if self.factor_memory is None else int(self.factor_memory * 2**30)
            groups = iter_lm_kfac(model, batches, fisher=self.fisher, factor_device=self.factor_device,
                                  seed=self.seed + stage, linears=linears, progress=self.verbose, log=self._log,
                                  max_factor_bytes=budget, micro_batch_size=self.kfac_micro_batch)
            spill = budget is not None and factor_bytes(linears, share_inputs=True) > budget
            fstore = FactorStore(spill=spill and do_update)
            if spill and do_update:
                self._log(f"the factors wait for the update pass in {fstore.directory} "
                          f"({factor_bytes(linears) / 2**30:.2f} GiB of files)")
            for group in groups:
                for name in progress(list(group), desc="costs", enabled=self.verbose):
                    f = group.pop(name)
                    n_tokens = f.n_tokens
                    costs_of(name, f)
                    if do_update:
                        fstore.put(name, f)
                    del f
                del group
                release_freed_memory()  # the group's factors are freed: give the heap back before the next pass
        else:
            for name in progress(names, desc="costs", enabled=self.verbose):
                costs_of(name, None)
        release_freed_memory()
        t_curv = time.perf_counter()
        row_c = [row_c[n] for n in names] if row_c else []
        col_c = [col_c[n] for n in names] if col_c else []
        block_sel = [block_sel[n] for n in names] if block_sel else []
        elem_c = [elem_c[n] for n in names] if elem_c else []

        # ----- global threshold
        layer_names = {i: {short: param_names[id(lin)] for short, lin in ad.linears(i)}
                       for i in range(ad.num_layers)}
        compact = self.compact and self.mode != "2:4"
        if self.mode == "structured":
            pool = structure_pool(row_c, col_c)
            k = pool.prefix_for(want)
            if compact:  # count what surgery removes with the selected structures (coupled pieces die with them)
                k = _largest_prefix(lambda j: self._removed_or_zero(model, pool, j, names, layer_names), want, k)
            rows, cols = pool.masks(k)
            removed, thr = int(pool.total[k - 1]) if k else 0, pool.threshold(k)
            masks = None
        elif self.mode == "2:4":
            sel, thr = select_elements(elem_c, want // 2)
            masks = []
            groups_24 = dict(zip(names, sel)) if self.adaptive_24 else {}
            for name, s, cheapest in zip(names, sel, block_sel):
                mk = cheapest & s.repeat_interleave(4, dim=1)
                if linears[name].bias is not None:
                    mk = torch.cat([mk, torch.zeros_like(mk[:, :1])], dim=1)
                masks.append(mk)
            removed = 2 * sum(int(s.sum()) for s in sel)
        else:
            masks, thr = select_elements(elem_c, want)
            removed = sum(int(m.sum()) for m in masks)
        del row_c, col_c, elem_c, block_sel
        self._log(f"threshold {thr:.4g}: {removed:,} parameters selected "
                  f"({(removed + already) / self.reference_numel:.4f} of the reference)")

        # ----- updates, one linear at a time (its factors read back from the store); results in the model's dtype
        weights: dict[str, torch.Tensor] = {}
        try:
            for k, name in enumerate(progress(names, desc="updates", enabled=self.verbose)):
                lin = linears[name]
                if self.mode == "structured":
                    r, c = rows[k].to(dev), cols[k].to(dev)
                    changed = bool(r.any()) or bool(c.any())
                else:
                    mk = masks[k].to(dev)
                    changed = bool(mk.any())
                if not changed:
                    weights[name] = augmented_weight(lin, lin.weight.dtype)
                    continue
                W = augmented_weight(lin, dtype).to(dev)
                if self.mode == "structured":
                    if do_update:
                        G, A = curvature(fstore.get(name, dev))
                        W = structured_update(W, G, A, r, c)
                        del G, A
                    else:
                        W[r] = 0
                        W[:, c] = 0
                else:
                    if do_update:
                        G, A = curvature(fstore.get(name, dev))
                        if self.update_rule == "columns":
                            del G
                            Ainv = torch.cholesky_inverse(_chol(A))
                            del A
                            if name in groups_24:  # the 2 of each 4 chosen inside the sweep (SparseGPT)
                                W, mk = column_update_nm(W, Ainv, groups_24.pop(name).to(dev), 2, 4)
                            else:
                                W = column_update(W, Ainv, mk)
                        else:
                            Ginv, Ainv = inverses(G, A)
                            del G, A
                            W = element_update(W, Ginv, Ainv, mk, self.chunk_size)
                    else:
                        W = torch.where(mk, torch.zeros_like(W), W)
                weights[name] = W.to(lin.weight.dtype)
                del W
        finally:
            if fstore is not None:
                fstore.close()
        release_freed_memory()
        t_upd = time.perf_counter()

        stats = {"stage": stage, "target_fraction": fraction, "threshold": thr, "selected": removed,
                 "removed_before": already, "calibration_tokens": n_tokens, "seconds_curvature": t_curv - t0,
                 "seconds_update": t_upd - t_curv}
        return self._step_of(model, weights, layer_names, compact, stats, t0)

    @torch.no_grad()
    def sequential_step(self, model: nn.Module, batches: Iterable[Batch]) -> SurgeonStep:
        """The one shot of `sequential=True`: layer by layer, the input second moment A of every linear of the layer
        on the streams that the already-pruned layers before it produce, then every linear to 2:4 by the column
        sweep with the mask chosen inside it (`column_update_nm`); the pruned layer's outputs feed the next layer.
        Does not touch the model's weights (each layer runs with its new weights swapped in and back)."""
        from ..calibration import LayerwiseRunner
        from ..runtime import eval_mode
        from ..surgery.common import refuse_compacted

        t0 = time.perf_counter()
        model = unwrap_model(model)
        refuse_compacted(model, "LLM Surgeon")
        release_freed_memory()
        ad = get_adapter(model)
        dtype = DTYPES[self.compute_dtype]
        linears = decoder_linears(model)
        param_names = {id(lin): name for name, lin in linears.items()}
        self.reference_numel = self.prunable_numel(linears)
        self._auto_reference = True
        self.reference_total = sum(p.numel() for p in model.parameters())
        for name, lin in linears.items():
            if lin.in_features % 4:
                raise ValueError(f"{name} has {lin.in_features} inputs, not a multiple of 4: 2:4 sparsity is impossible")
        self._log(f"sequential 2:4 over {ad.num_layers} layers: {self.reference_numel:,} weights, half of them removed")
        lam_a = self.damping[1]
        weights: dict[str, torch.Tensor] = {}
        with eval_mode(model):
            runner = LayerwiseRunner(model, batches, progress=False, method="llm_surgeon", stage=0)
            for i in progress(range(ad.num_layers), desc="sequential 2:4", enabled=self.verbose, unit="layer"):
                lins = [(param_names[id(lin)], lin) for _, lin in ad.linears(i)]
                # linears that read the same tensor (q/k/v, gate/up) share one float32 sum of x^T x
                sums: dict[str, torch.Tensor] = {}
                seen: list[tuple[torch.Tensor, str]] = []  # the inputs met in this forward, held (no address reuse)
                share: dict[str, str] = {}
                has_bias = {name: lin.bias is not None for name, lin in lins}
                real: list[torch.Tensor | None] = [None]

                def add(name: str, lin: nn.Linear):
                    def hook(_module, args):
                        first = next((n for t, n in seen if t is args[0] and has_bias[n] == (lin.bias is not None)),
                                     None)
                        if first is None:
                            seen.append((args[0], name))
                            first = name
                        share[name] = first
                        if first != name:
                            return
                        x = args[0].reshape(-1, args[0].shape[-1]).float()
                        if real[0] is not None:
                            x = x[real[0]]
                        if lin.bias is not None:
                            x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
                        sums[name] = sums[name].add_(x.T @ x) if name in sums else x.T @ x
                    return hook

                hooks = [lin.register_forward_pre_hook(add(name, lin)) for name, lin in lins]
                try:
                    with runner.on_device(i) as layer:
                        for b, h in enumerate(runner.hidden):
                            m = runner.masks[b]
                            real[0] = None if m is None else m.reshape(-1).bool()
                            seen.clear()
                            layer(h, **runner.layer_kwargs(b, i))
                finally:
                    for h in hooks:
                        h.remove()
                for name, lin in lins:
                    W = augmented_weight(lin, dtype)
                    A = damp_(sums[share[name]].to(dtype, copy=True).div_(max(runner.num_tokens, 1)), lam_a)
                    Ainv = torch.cholesky_inverse(_chol(A.to(W.device)))
                    del A
                    groups = torch.ones(W.shape[0], lin.in_features // 4, dtype=torch.bool, device=W.device)
                    W, _ = column_update_nm(W, Ainv, groups, 2, 4)
                    weights[name] = W.to(lin.weight.dtype)
                    del Ainv
                del sums
                originals = {name: (lin.weight.data, None if lin.bias is None else lin.bias.data) for name, lin in lins}
                try:
                    for name, lin in lins:
                        C = lin.in_features
                        lin.weight.data = weights[name][:, :C].to(lin.weight.device)
                        if lin.bias is not None:
                            lin.bias.data = weights[name][:, C].to(lin.bias.device).contiguous()
                    runner.advance(runner.run_layer(i))
                finally:
                    for name, lin in lins:
                        lin.weight.data, bias = originals[name]
                        if bias is not None:
                            lin.bias.data = bias
        t_upd = time.perf_counter()
        layer_names = {i: {short: param_names[id(lin)] for short, lin in ad.linears(i)}
                       for i in range(ad.num_layers)}
        selected = sum(int((w[:, :linears[n].in_features] == 0).sum()) for n, w in weights.items())
        stats = {"stage": 0, "target_fraction": 0.5, "threshold": None, "selected": selected, "removed_before": 0,
                 "calibration_tokens": runner.num_tokens, "seconds_curvature": t_upd - t0, "seconds_update": 0.0}
        return self._step_of(model, weights, layer_names, False, stats, t0)

    def _step_of(self, model: nn.Module, weights: dict[str, torch.Tensor], layer_names: dict[int, dict[str, str]],
                 compact: bool, stats: dict[str, Any], t0: float) -> SurgeonStep:
        """The SurgeonStep of a shot whose new [W | b] per decoder linear are `weights`: what surgery can remove
        physically (`compact`), the parameter updates and the shot's figures (`stats`: stage, target_fraction,
        threshold, selected, removed_before, calibration_tokens, seconds_curvature, seconds_update)."""
        linears = decoder_linears(model)
        dev = next(model.parameters()).device
        stage, already = stats["stage"], stats["removed_before"]
        comp = compaction(model, layer_names, {n: _zero_rows(w) for n, w in weights.items()},
                          {n: _zero_cols(w) for n, w in weights.items()}, weights=weights, compact=compact)
        heads, kv_heads, channels, counts = comp.heads, comp.kv_heads, comp.mlp_channels, comp.counts
        updates: dict[str, torch.Tensor] = {}
        store = torch.device("cpu") if self.factor_device == "cpu" else dev
        for name, W in weights.items():
            lin = linears[name]
            C = lin.in_features
            updates[f"{name}.weight"] = W[:, :C].to(store, lin.weight.dtype)
            if lin.bias is not None:
                updates[f"{name}.bias"] = W[:, C].to(store, lin.bias.dtype).contiguous()
        zeros = sum(c["zeros"] for c in counts.values())
        effective = comp.removed_or_zero
        compacted = sum(c["removed"] for c in counts.values())
        left = sum(c["zeros_left"] for c in counts.values())
        t_end = time.perf_counter()
        total = getattr(self, "reference_total", None)
        stats = {
            **{k: v for k, v in stats.items() if not k.startswith("seconds")},
            "removed_fraction": (effective + already) / self.reference_numel,
            "removed_fraction_of_model": (effective + already) / total if total else None,
            "zeros": zeros,
            "compacted": compacted,
            "zeros_left": left,
            **{k: v for k, v in stats.items() if k.startswith("seconds")},
            "seconds_total": t_end - t0,
        }
        plan = PrunePlan(heads=heads, kv_heads=kv_heads, mlp_channels=channels, provenance={
            "method": "llm_surgeon",
            "config": self.config_dict(),
            "reference_numel": self.reference_numel,
            **{k: v for k, v in stats.items() if not k.startswith("seconds")},
            "note": "zeros_left: zeroed parameters that head/channel surgery cannot remove (rows/columns of the "
                    "residual stream, q/k rows, partial heads, 2:4 and unstructured zeros); they stay as zeros in the "
                    "weights until hf_prune.compact_zeros drops whole zero rows and columns from storage",
            "zeros_per_matrix": counts,
        })
        self._log(f"shot {stage + 1} done in {t_end - t0:.1f}s (curvature {stats['seconds_curvature']:.1f}s): "
                  f"removed or zero {stats['removed_fraction']:.4f} of the reference, compacted now {compacted:,}, "
                  f"zeros left {left:,}")
        return SurgeonStep(plan=plan, updates=updates, stats=stats)

    def _removed_or_zero(self, model, pool: StructurePool, k: int, names: list[str],
                         layer_names: dict[int, dict[str, str]]) -> int:
        rows, cols = pool.masks(k)
        comp = compaction(model, layer_names, dict(zip(names, rows)), dict(zip(names, cols)))
        return comp.removed_or_zero
