"""Computational invariance: put a model in rotation-invariant form, then rotate its residual stream.

SliceGPT (Ashkboos et al., ICLR 2024, Sec. 3.1-3.2): a pre-norm transformer whose norms are scale-free RMS norms,
x -> x / ||x|| * sqrt(D), computes the same function after the residual stream is rotated by any orthogonal Q,
provided every linear that READS the stream becomes W Q, every linear that WRITES into it becomes Q^T W (bias Q^T b),
the embedding becomes E Q and the head W_head Q. Getting there:

1. fold each norm's scale into the linears it feeds: RMSNorm(x) W^T = norm(x) (W diag(w))^T (Gemma: 1 + w);
2. replace the norms by scale-free ones (`ScaleFreeNorm`; LayerNorm families would also need the stream centred:
   none of the supported families uses LayerNorm, so that case is refused);
3. the final norm's scale goes into the head. A tied head cannot take it (the embedding would change too), so either
   the head is untied (SliceGPT; +V*D parameters) or the final norm ends with a small D x D matrix F = diag(w) that
   maps into the embedding's basis (`head_projection`, the default for tied models: +D^2 instead of +V*D);
4. Gemma 3's post-sublayer ("sandwich") norms scale AFTER normalising and BEFORE the residual add, where no linear
   follows; the only exact rotation-invariant form is a scale-free norm followed by a projection diag(1 + w) that
   the rotation then turns into diag(1 + w) Q (`NormThenProject`, +D^2 per sublayer).

The form is the family's `Sliced*ForCausalLM` class (hf_prune.modeling) at full width; `rotate` then acts on any set
of residual *slots* (see configuration_hf_prune_sliced.py): slot 2i feeds layer i's attention, slot 2i + 1 its MLP,
slot 2L the head. Slots rotated by different matrices get shortcut matrices Q_a^T Q_b on the residual adds between
them; slots sharing one rotation keep the plain identity add.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from .arch import ArchAdapter, base_model_type, get_adapter, unwrap_model
from .modeling import SLICED_CONFIGS, SLICED_MODELS
from .modeling.modeling_hf_prune_sliced import NormThenProject, SlicedDecoderLayer

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


class NotRotationInvariantError(ValueError):
    """The model is not in rotation-invariant form (call make_rotation_invariant first) or cannot be put in it."""


# ----- conversion -----------------------------------------------------------------------------------------------------
def is_rotation_invariant(model: nn.Module) -> bool:
    return isinstance(unwrap_model(model), tuple(SLICED_MODELS.values()))


def _norm_scale(ad: ArchAdapter, norm: nn.Module, where: str) -> torch.Tensor:
    """The per-channel scale a family norm applies after normalising, in float64 (Gemma: 1 + w)."""
    weight = getattr(norm, "weight", None)
    if weight is None:
        raise NotRotationInvariantError(f"{where} ({type(norm).__name__}) has no scale weight; expected an RMSNorm")
    if getattr(norm, "bias", None) is not None:
        raise NotRotationInvariantError(
            f"{where} ({type(norm).__name__}) has a bias: LayerNorm models also need the residual stream centred, "
            f"which hf_prune does not implement; supported families use RMSNorm"
        )
    w = weight.detach().to(torch.float64)
    return w + 1.0 if ad.norm_offset_one else w


def _norm_eps(norm: nn.Module) -> float | None:
    for name in ("variance_epsilon", "eps"):
        if hasattr(norm, name):
            return float(getattr(norm, name))
    return None


@torch.no_grad()
def _scale_inputs(linears: Iterable[nn.Linear], scale: torch.Tensor) -> None:
    for lin in linears:
        w = lin.weight
        w.copy_((w.to(torch.float64) * scale.to(w.device)[None, :]).to(w.dtype))


def _diag_linear(scale: torch.Tensor, like: torch.Tensor) -> nn.Linear:
    n = scale.numel()
    lin = nn.Linear(n, n, bias=False, device=like.device, dtype=like.dtype)
    with torch.no_grad():
        lin.weight.copy_(torch.diag(scale).to(like.dtype))
    lin.weight.requires_grad_(like.requires_grad)
    return lin


@torch.no_grad()
def make_rotation_invariant(model: nn.Module, tie_head: bool | None = None) -> nn.Module:
    """Convert `model` in place into its family's `Sliced*ForCausalLM` at full width, computing the same function.

    Args:
        tie_head: keep the head tied to the embedding (final-norm scale moved into a D x D `head_projection`).
            None: keep whatever the model does. False on a tied model unties the head (SliceGPT; +V*D parameters).
            True on an untied model raises.
    Returns the unwrapped model (same object). A model already in this form is returned unchanged.
    """
    from .surgery import _swap_config  # surgery owns config swaps; imported late to keep import order simple

    model = unwrap_model(model)
    if is_rotation_invariant(model):
        return model
    ad = get_adapter(model)
    family = base_model_type(model.config)
    if family not in SLICED_MODELS:
        raise NotRotationInvariantError(
            f"model_type={family!r} has no sliced model class; supported: {', '.join(sorted(SLICED_MODELS))}"
        )
    if getattr(model.config, "model_type", family) != family:
        raise NotRotationInvariantError(
            f"{type(model).__name__} (model_type={model.config.model_type!r}) has per-layer widths; slicing needs a "
            f"model with the standard {family!r} layout"
        )
    tied = ad.tied_embeddings
    if tie_head is None:
        tie_head = tied
    if tie_head and not tied:
        raise NotRotationInvariantError(
            "tie_head=True but the model's head is not tied to its embedding; use tie_head=None or False"
        )
    cfg = model.config
    n_layers, hidden = ad.num_layers, ad.hidden_size
    eps = float(cfg.rms_norm_eps)
    sandwich = ad.has_post_sublayer_norms
    ref = ad.embed_tokens.weight

    # 1-2. fold the pre-norm scales into the readers; read the post-norm scales (Gemma) before the norms go away
    post_scales: list[tuple[torch.Tensor, torch.Tensor]] = []
    for i in range(n_layers):
        for where, norm in (("attn_norm", ad.attn_norm(i)), ("mlp_norm", ad.mlp_norm(i))):
            e = _norm_eps(norm)
            if e is not None and abs(e - eps) > 1e-12:
                raise NotRotationInvariantError(f"layer {i} {where} eps={e} differs from config.rms_norm_eps={eps}")
        a, m = ad.attention(i), ad.mlp(i)
        _scale_inputs([a.q_proj, a.k_proj, a.v_proj], _norm_scale(ad, ad.attn_norm(i), f"layer {i} attention norm"))
        readers = [m.up_proj] if m.gate_proj is None else [m.gate_proj, m.up_proj]
        _scale_inputs(readers, _norm_scale(ad, ad.mlp_norm(i), f"layer {i} MLP norm"))
        if sandwich:
            post_scales.append(
                (
                    _norm_scale(ad, ad.post_attn_norm(i), f"layer {i} post-attention norm"),
                    _norm_scale(ad, ad.post_mlp_norm(i), f"layer {i} post-MLP norm"),
                )
            )
    final_scale = _norm_scale(ad, ad.final_norm, "final norm")

    # 3. the head
    head_projection = None
    if tie_head:
        head_projection = _diag_linear(final_scale, ref)
    else:
        w = ad.lm_head.weight
        new_w = (w.detach().to(torch.float64) * final_scale.to(w.device)[None, :]).to(w.dtype)
        model.lm_head.weight = nn.Parameter(new_w, requires_grad=w.requires_grad)  # a new tensor: unties

    # the sliced config at full width
    d = cfg.to_dict()
    for k in ("model_type", "architectures", "auto_map", "transformers_version"):
        d.pop(k, None)
    d.update(
        base_model_type=family,
        head_dim=ad.attention(0).head_dim,
        residual_dims=[hidden] * (2 * n_layers + 1),
        attn_shortcuts=[False] * n_layers,
        mlp_shortcuts=[False] * n_layers,
        head_projection=bool(tie_head),
        tie_word_embeddings=bool(tie_head),
    )
    new_cfg = SLICED_CONFIGS[family].from_dict(d)

    # the new module tree (attention and MLP modules are reused as they are)
    backbone = ad.backbone
    layers = []
    for i in range(n_layers):
        old = ad.layers[i]
        layer = SlicedDecoderLayer.from_modules(new_cfg, i, old.self_attn, old.mlp, sandwich)
        if sandwich:
            s_attn, s_mlp = post_scales[i]
            layer.post_attention_layernorm.proj = _diag_linear(s_attn, ref)
            layer.post_feedforward_layernorm.proj = _diag_linear(s_mlp, ref)
        if hasattr(old, "gradient_checkpointing"):
            layer.gradient_checkpointing = old.gradient_checkpointing
        layers.append(layer)
    backbone.layers = nn.ModuleList(layers)
    backbone.norm = NormThenProject(hidden, eps, hidden, hidden, projection=False)
    backbone.norm.proj = head_projection
    sliced_cls = SLICED_MODELS[family]
    backbone.__class__ = sliced_cls.backbone_class
    model.__class__ = sliced_cls
    _swap_config(model, new_cfg)
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return model


# ----- slots ----------------------------------------------------------------------------------------------------------
def _require_invariant(model: nn.Module) -> nn.Module:
    model = unwrap_model(model)
    if not is_rotation_invariant(model):
        raise NotRotationInvariantError(
            f"{type(model).__name__} is not in rotation-invariant form; call hf_prune.rotation.make_rotation_invariant"
            "(model) first"
        )
    return model


def num_slots(model: nn.Module) -> int:
    """2L + 1 residual slots: layer i's attention input 2i, its MLP input 2i + 1, the head input 2L."""
    return 2 * len(_require_invariant(model).model.layers) + 1


def _attn_writer(layer: SlicedDecoderLayer) -> nn.Linear:
    return layer.post_attention_layernorm.proj if layer.sandwich_norms else layer.self_attn.o_proj


def _mlp_writer(layer: SlicedDecoderLayer) -> nn.Linear:
    return layer.post_feedforward_layernorm.proj if layer.sandwich_norms else layer.mlp.down_proj


def slot_readers(model: nn.Module, s: int) -> list[nn.Module]:
    """Modules whose weight columns live in slot s (W -> W Q); slot 0 includes the embedding (E -> E Q)."""
    model = _require_invariant(model)
    layers = model.model.layers
    n = len(layers)
    out: list[nn.Module] = []
    if s == 0:
        out.append(model.model.embed_tokens)
    if s == 2 * n:
        out.append(model.model.norm.proj if model.config.head_projection else model.lm_head)
    elif s % 2 == 0:
        a = layers[s // 2].self_attn
        out += [a.q_proj, a.k_proj, a.v_proj]
    else:
        mlp = layers[s // 2].mlp
        out += [m for m in (getattr(mlp, "gate_proj", None), mlp.up_proj) if m is not None]
    return out


def slot_writers(model: nn.Module, s: int) -> list[nn.Linear]:
    """Linears whose weight rows (and bias) live in slot s (W -> Q^T W); slot 0 includes a tied head's projection."""
    model = _require_invariant(model)
    layers = model.model.layers
    if s == 0:
        return [model.model.norm.proj] if model.config.head_projection else []
    i = (s - 1) // 2
    return [_attn_writer(layers[i])] if s % 2 == 1 else [_mlp_writer(layers[i])]


def shortcuts(model: nn.Module) -> list[tuple[SlicedDecoderLayer, str, int, int]]:
    """(layer, attribute, source slot, destination slot) of every residual add."""
    model = _require_invariant(model)
    out = []
    for i, layer in enumerate(model.model.layers):
        out.append((layer, "attn_shortcut", 2 * i, 2 * i + 1))
        out.append((layer, "mlp_shortcut", 2 * i + 1, 2 * i + 2))
    return out


def slot_widths(model: nn.Module) -> list[int]:
    """Current width of every slot, read from the module shapes."""
    model = _require_invariant(model)
    n = num_slots(model)
    widths = []
    for s in range(n):
        readers = slot_readers(model, s)
        m = readers[-1]
        widths.append(m.weight.shape[1])
    return widths


def _set_shortcut_flag(model: nn.Module, attr: str, layer_idx: int, value: bool) -> None:
    key = "attn_shortcuts" if attr == "attn_shortcut" else "mlp_shortcuts"
    flags = list(getattr(model.config, key) or [False] * model.config.num_hidden_layers)
    flags[layer_idx] = value
    setattr(model.config, key, flags)


# ----- rotation -------------------------------------------------------------------------------------------------------
def random_orthogonal(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-random n x n orthogonal matrix (QR of a Gaussian matrix with the signs of R's diagonal fixed)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))[None, :]
    return q.to(dtype)


def _update(param: torch.Tensor, fn, device: torch.device | None) -> None:
    dev = device or param.device
    new = fn(param.detach().to(device=dev, dtype=torch.float64))
    param.data.copy_(new.to(device=param.device, dtype=param.dtype))


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
    The float64 products run on `device` (default: each weight's own device).
    """
    model = _require_invariant(model)
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

    def right(w: torch.Tensor) -> torch.Tensor:
        return w @ Qd.to(w.device)

    def left(w: torch.Tensor) -> torch.Tensor:
        return Qd.to(w.device).T @ w

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
            _set_shortcut_flag(model, attr, layer.layer_idx, True)
        if b:
            _update(sc.weight, left, dev)
        if a:
            _update(sc.weight, right, dev)
    for s in group:
        for m in slot_readers(model, s):
            _update(m.weight, right, dev)
        for m in slot_writers(model, s):
            _update(m.weight, left, dev)
            if getattr(m, "bias", None) is not None:
                _update(m.bias, lambda b: (Qd.to(b.device).T @ b), dev)
