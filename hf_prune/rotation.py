"""Rotations of the residual stream of a model in rotation-invariant form (the maths; the form itself and the
slots are in `hf_prune.surgery.slicing`).

A rotation-invariant model computes the same function after residual slots are rotated by an orthogonal Q: readers
become W Q, writers Q^T W (bias Q^T b), the embedding E Q. Slots rotated by different matrices get shortcut matrices
Q_a^T Q_b on the residual adds between them; slots sharing one rotation keep the plain identity add.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .surgery.slicing import (
    NotRotationInvariantError,
    is_rotation_invariant,
    make_rotation_invariant,
    num_slots,
    require_invariant,
    set_shortcut_flag,
    shortcuts,
    slot_readers,
    slot_widths,
    slot_writers,
)

__all__ = [
    "NotRotationInvariantError",
    "is_rotation_invariant",
    "make_rotation_invariant",
    "num_slots",
    "random_orthogonal",
    "rotate",
    "slot_readers",
    "slot_widths",
    "slot_writers",
    "shortcuts",
]


# ----- rotation -------------------------------------------------------------------------------------------------------
def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix (QR of a Gaussian matrix with the signs of R's diagonal fixed)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.to(dtype)


_UPDATE_BLOCK_BYTES = 32 * 2**20  # working copy per block: a 262k x 640 embedding is not copied whole


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a rotation of weights stored in `dtype` is computed in: float64 for float32/float64 weights;
    float32 for bf16/fp16 weights, whose storage rounding (2^-8 / 2^-11) is far above float32's products over a
    4096-wide sum (~1e-6), at half the float64 cost (an 8B model's 128k x 4096 embedding alone is 4.3 TFLOP)."""
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _update(param: torch.Tensor, fn, device: torch.device | None, split_dim: int | None = None) -> None:
    """param <- fn(param) computed in `_work_dtype(param.dtype)` on `device`. `fn` must act on slices along
    `split_dim` independently (rows for W Q, columns for Q^T W); large weights then go through in blocks of about
    _UPDATE_BLOCK_BYTES."""
    dev = device or param.device
    wd = _work_dtype(param.dtype)
    size = torch.finfo(wd).bits // 8
    if split_dim is None or param.dim() != 2 or param.numel() * size <= _UPDATE_BLOCK_BYTES:
        new = fn(param.detach().to(device=dev, dtype=wd))
        param.data.copy_(new.to(device=param.device, dtype=param.dtype))
        return
    step = max(1, _UPDATE_BLOCK_BYTES // (size * param.shape[1 - split_dim]))
    for start in range(0, param.shape[split_dim], step):
        block = param.data.narrow(split_dim, start, min(step, param.shape[split_dim] - start))
        block.copy_(fn(block.detach().to(device=dev, dtype=wd)).to(device=param.device, dtype=param.dtype))


@torch.no_grad()
def rotate(
    model: nn.Module,
    Q: torch.Tensor,
    slots: Iterable[int] | None = None,
    device: torch.device | str | None = None,
) -> None:
    """Rotate residual slots by the orthogonal matrix Q, in place; the model computes the same function.

    All `slots` (default: every slot) share Q and must have Q's width. Readers become W Q, writers Q^T W (bias
    Q^T b), the embedding E Q. A residual add between a rotated and an unrotated slot gets a shortcut matrix (the
    identity, materialised, then rotated on the rotated side); one between two rotated slots stays as it is.
    The products run on `device` (default: each weight's own device), in float64 for float32 weights and in
    float32 for bf16/fp16 weights (`_work_dtype`).
    """
    model = require_invariant(model)
    n = num_slots(model)
    group = sorted(set(range(n) if slots is None else (int(s) for s in slots)))
    bad = [s for s in group if not 0 <= s < n]
    if bad:
        raise ValueError(f"slots {bad} out of range; this model has slots 0..{n - 1}")
    widths = slot_widths(model)
    if Q.dim() != 2 or Q.shape[0] != Q.shape[1]:
        raise ValueError(f"Q must be a square orthogonal matrix, got shape {tuple(Q.shape)}")
    wrong = {s: widths[s] for s in group if widths[s] != Q.shape[0]}
    if wrong:
        raise ValueError(f"Q is {Q.shape[0]} x {Q.shape[0]} but slots {wrong} (slot: width) have other widths")
    dev = torch.device(device) if device is not None else None
    Qd = Q.detach().to(torch.float64)
    cast: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def q_as(w: torch.Tensor) -> torch.Tensor:  # Q on w's device and in its work dtype, made once per pair
        key = (w.device, w.dtype)
        if key not in cast:
            cast[key] = Qd.to(device=w.device, dtype=w.dtype)
        return cast[key]

    def right(w: torch.Tensor) -> torch.Tensor:
        return w @ q_as(w)

    def left(w: torch.Tensor) -> torch.Tensor:
        return q_as(w).T @ w

    in_group = set(group)
    for layer, attr, src, dst in shortcuts(model):
        a, b = src in in_group, dst in in_group
        if not (a or b):
            continue
        sc = getattr(layer, attr)
        if sc is None:
            if a and b:
                continue  # Q^T I Q = I
            ref = layer.self_attn.q_proj.weight
            sc = nn.Linear(widths[src], widths[dst], bias=False, device=ref.device, dtype=ref.dtype)
            sc.weight.copy_(torch.eye(widths[dst], widths[src], dtype=ref.dtype))
            sc.weight.requires_grad_(ref.requires_grad)
            setattr(layer, attr, sc)
            set_shortcut_flag(model, attr, layer.layer_idx, True)
        if b:
            _update(sc.weight, left, dev)
        if a:
            _update(sc.weight, right, dev)
    for s in group:
        for m in slot_readers(model, s):
            _update(m.weight, right, dev, split_dim=0)
        for m in slot_writers(model, s):
            _update(m.weight, left, dev, split_dim=1)
            if getattr(m, "bias", None) is not None:
                _update(m.bias, lambda b: q_as(b).T @ b, dev)
