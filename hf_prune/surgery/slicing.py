"""Residual-stream slicing (SliceGPT, Dynamic Slicing): the rotation-invariant form, its residual slots, and the
cut of every slot to its leading dims.

SliceGPT (Ashkboos et al., ICLR 2024, Sec. 3.1-3.2): a pre-norm transformer whose norms are scale-free RMS norms,
x -> x / ||x|| * sqrt(D), computes the same function after the residual stream is rotated by any orthogonal Q,
provided every linear that READS the stream becomes W Q, every linear that WRITES into it becomes Q^T W (bias Q^T b),
the embedding becomes E Q and the head W_head Q. Getting there (`make_rotation_invariant`):

1. fold each norm's scale into the linears it feeds: RMSNorm(x) W^T = norm(x) (W diag(w))^T (Gemma: 1 + w);
2. replace the norms by scale-free ones (`ScaleFreeNorm`; LayerNorm families would also need the stream centred:
   none of the supported families uses LayerNorm, so that case is refused);
3. the final norm's scale goes into the head. A tied head cannot take it (the embedding would change too), so either
   the head is untied (SliceGPT; +V*D parameters) or the final norm ends with a small D x D matrix F = diag(w) that
   maps into the embedding's basis (`head_projection`, the default for tied models: +D^2 instead of +V*D);
4. Gemma 3's post-sublayer ("sandwich") norms scale AFTER normalising and BEFORE the residual add, where no linear
   follows; the only exact rotation-invariant form is a scale-free norm followed by a projection diag(1 + w) that
   the rotation then turns into diag(1 + w) Q (`NormThenProject`, +D^2 per sublayer).

The form is the family's `Sliced*ForCausalLM` class (hf_prune.modeling) at full width. Residual *slots* (see
configuration_hf_prune_sliced.py): slot 2i feeds layer i's attention, slot 2i + 1 its MLP, slot 2L the head;
`hf_prune.rotation.rotate` acts on any set of them, and `apply_slicing` keeps each slot's leading dims.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from ..arch import ArchAdapter, base_model_type, get_adapter, unwrap_model
from ..modeling import SLICED_CONFIGS, SLICED_MODELS
from ..modeling.modeling_hf_prune_sliced import NormThenProject, SlicedDecoderLayer, become
from ..plan import PrunePlan
from .common import keep_leading_cols, keep_leading_rows, swap_config

__all__ = [
    "NotRotationInvariantError",
    "apply_slicing",
    "attn_writer",
    "is_rotation_invariant",
    "make_rotation_invariant",
    "masked_slicing",
    "mlp_writer",
    "num_slots",
    "require_invariant",
    "set_shortcut_flag",
    "shortcuts",
    "sliced_num_parameters",
    "slot_readers",
    "slot_widths",
    "slot_writers",
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
    become(backbone, sliced_cls.backbone_class)
    become(model, sliced_cls)
    swap_config(model, new_cfg)
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)
    return model


# ----- slots ----------------------------------------------------------------------------------------------------------
def require_invariant(model: nn.Module) -> nn.Module:
    model = unwrap_model(model)
    if not is_rotation_invariant(model):
        raise NotRotationInvariantError(
            f"{type(model).__name__} is not in rotation-invariant form; call hf_prune.surgery.make_rotation_invariant"
            "(model) first"
        )
    return model


def num_slots(model: nn.Module) -> int:
    """2L + 1 residual slots: layer i's attention input 2i, its MLP input 2i + 1, the head input 2L."""
    return 2 * len(require_invariant(model).model.layers) + 1


def attn_writer(layer: SlicedDecoderLayer) -> nn.Linear:
    return layer.post_attention_layernorm.proj if layer.sandwich_norms else layer.self_attn.o_proj


def mlp_writer(layer: SlicedDecoderLayer) -> nn.Linear:
    return layer.post_feedforward_layernorm.proj if layer.sandwich_norms else layer.mlp.down_proj


def slot_readers(model: nn.Module, s: int) -> list[nn.Module]:
    """Modules whose weight columns live in slot s (W -> W Q); slot 0 includes the embedding (E -> E Q)."""
    model = require_invariant(model)
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
    model = require_invariant(model)
    layers = model.model.layers
    if s == 0:
        return [model.model.norm.proj] if model.config.head_projection else []
    i = (s - 1) // 2
    return [attn_writer(layers[i])] if s % 2 == 1 else [mlp_writer(layers[i])]


def shortcuts(model: nn.Module) -> list[tuple[SlicedDecoderLayer, str, int, int]]:
    """(layer, attribute, source slot, destination slot) of every residual add."""
    model = require_invariant(model)
    out = []
    for i, layer in enumerate(model.model.layers):
        out.append((layer, "attn_shortcut", 2 * i, 2 * i + 1))
        out.append((layer, "mlp_shortcut", 2 * i + 1, 2 * i + 2))
    return out


def slot_widths(model: nn.Module) -> list[int]:
    """Current width of every slot, read from the module shapes."""
    model = require_invariant(model)
    n = num_slots(model)
    widths = []
    for s in range(n):
        readers = slot_readers(model, s)
        m = readers[-1]
        widths.append(m.weight.shape[1])
    return widths


def set_shortcut_flag(model: nn.Module, attr: str, layer_idx: int, value: bool) -> None:
    key = "attn_shortcuts" if attr == "attn_shortcut" else "mlp_shortcuts"
    flags = list(getattr(model.config, key) or [False] * model.config.num_hidden_layers)
    flags[layer_idx] = value
    setattr(model.config, key, flags)


# ----- slicing --------------------------------------------------------------------------------------------------------
def slicing_dims(model: nn.Module, widths) -> list[int]:
    if isinstance(widths, PrunePlan):
        rw = widths.residual_widths or {}
        if "residual_dims" not in rw:
            raise ValueError(
                "the plan has no residual_widths['residual_dims']; it was not made by a slicing method "
                f"(residual_widths={rw!r})"
            )
        widths = rw["residual_dims"]
    return [int(d) for d in widths]


def _checked_widths(model: nn.Module, widths) -> tuple[list[int], list[int]]:
    """(asked, current) slot widths; ValueError unless there is one per slot and each lies in 1..current."""
    dims = slicing_dims(model, widths)
    n = num_slots(model)
    if len(dims) != n:
        raise ValueError(f"{len(dims)} widths given; this model has {n} residual slots (2 * num_layers + 1)")
    current = slot_widths(model)
    bad = {s: (d, c) for s, (d, c) in enumerate(zip(dims, current)) if not 1 <= d <= c}
    if bad:
        raise ValueError(f"widths must be between 1 and the current width; slot: (asked, current) = {bad}")
    return dims, current


def apply_slicing(model: nn.Module, widths) -> nn.Module:
    """Slice the residual stream of a rotation-invariant model (hf_prune.rotation) to per-slot widths, in place.

    `widths` is a PrunePlan from a slicing method (its `residual_widths["residual_dims"]`) or the list of 2L + 1
    slot widths itself. Every slot keeps its LEADING dims (after a PCA rotation: the principal ones): readers keep
    their first d_s input columns, writers their first d_s output rows, the embedding its first d_0 columns, each
    shortcut matrix its leading d_src x d_dst block. Widths can only shrink. Returns the (unwrapped) model, whose
    config records the widths; save_pretrained writes the Sliced* config and code files.
    """
    model = require_invariant(model)
    dims, _ = _checked_widths(model, widths)
    backbone = model.model
    emb = backbone.embed_tokens
    if emb.weight.shape[1] != dims[0]:
        with torch.no_grad():
            emb.weight = nn.Parameter(emb.weight[:, : dims[0]].clone(), requires_grad=emb.weight.requires_grad)
        emb.embedding_dim = dims[0]
    for i, layer in enumerate(backbone.layers):
        d_in, d_mid, d_out = dims[2 * i], dims[2 * i + 1], dims[2 * i + 2]
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = keep_leading_cols(attn.q_proj, d_in)
        attn.k_proj = keep_leading_cols(attn.k_proj, d_in)
        attn.v_proj = keep_leading_cols(attn.v_proj, d_in)
        if getattr(mlp, "gate_proj", None) is not None:
            mlp.gate_proj = keep_leading_cols(mlp.gate_proj, d_mid)
        mlp.up_proj = keep_leading_cols(mlp.up_proj, d_mid)
        if layer.sandwich_norms:
            layer.post_attention_layernorm.proj = keep_leading_rows(attn_writer(layer), d_mid)
            layer.post_feedforward_layernorm.proj = keep_leading_rows(mlp_writer(layer), d_out)
        else:
            attn.o_proj = keep_leading_rows(attn.o_proj, d_mid)
            mlp.down_proj = keep_leading_rows(mlp.down_proj, d_out)
        for attr, (a, b) in (("attn_shortcut", (d_in, d_mid)), ("mlp_shortcut", (d_mid, d_out))):
            sc = getattr(layer, attr)
            if sc is not None:
                setattr(layer, attr, keep_leading_rows(keep_leading_cols(sc, a), b))
    head_in = dims[-1]
    if model.config.head_projection:
        backbone.norm.proj = keep_leading_rows(keep_leading_cols(backbone.norm.proj, head_in), dims[0])
        model.lm_head.weight = emb.weight  # tied: the head is the sliced embedding
        model.lm_head.in_features = dims[0]
    else:
        model.lm_head = keep_leading_cols(model.lm_head, head_in)
    model.config.residual_dims = dims
    return model


class _MaskedCarry(nn.Module):
    """Stands in for a missing shortcut (the identity carry) while `masked_slicing` is active: the stream keeps its
    leading `width` dims, the rest is zero (what `carry` does by cutting or zero-padding in the sliced model)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.mask.to(x.dtype)


@contextmanager
def masked_slicing(model: nn.Module, widths) -> Iterator[nn.Module]:
    """Inside the block, the full-width rotation-invariant `model` computes exactly what `apply_slicing(model,
    widths)` would, without copying or cutting a weight: every write into slot s (the embedding, the sublayer
    writers, the shortcut matrices and identity carries, a tied head's projection) keeps its leading d_s dims and
    zeroes the rest, so the stream is zero wherever the sliced model has no dims, and the scale-free norms (averaged
    over the fixed original width) see the same sums. Used to score slicing candidates and the perplexity check at
    the memory of one model. The model is restored on exit (hooks removed, identity carries back to None)."""
    model = require_invariant(model)
    dims, current = _checked_widths(model, widths)
    ref = model.model.embed_tokens.weight
    masks: dict[tuple[int, int], torch.Tensor] = {}

    def mask(d: int, width: int) -> torch.Tensor:
        if (d, width) not in masks:
            m = torch.zeros(width, device=ref.device, dtype=ref.dtype)
            m[:d] = 1
            masks[(d, width)] = m
        return masks[(d, width)]

    def keep(d: int):
        def hook(module, inputs, output):
            return output * mask(d, output.shape[-1]).to(output.dtype)

        return hook

    handles = [model.model.embed_tokens.register_forward_hook(keep(dims[0]))]
    carries: list[tuple[nn.Module, str]] = []
    try:
        for s in range(1, len(dims)):
            for w in slot_writers(model, s):
                handles.append(w.register_forward_hook(keep(dims[s])))
        if model.config.head_projection:
            handles.append(model.model.norm.proj.register_forward_hook(keep(dims[0])))
        for layer, attr, src, dst in shortcuts(model):
            sc = getattr(layer, attr)
            if sc is None:
                setattr(layer, attr, _MaskedCarry(mask(min(dims[src], dims[dst]), current[dst])))
                carries.append((layer, attr))
            else:
                handles.append(sc.register_forward_hook(keep(dims[dst])))
        yield model
    finally:
        for h in handles:
            h.remove()
        for layer, attr in carries:
            setattr(layer, attr, None)


def sliced_num_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter count of a (sliced) model split into parts: total (tied tensors once), shortcuts (residual
    shortcut matrices), projections (tied-head and Gemma post-norm projections), head (an untied lm_head)."""
    model = unwrap_model(model)
    total = sum(p.numel() for p in model.parameters())
    shortcut = projections = 0
    for name, p in model.named_parameters():
        if "_shortcut." in name:
            shortcut += p.numel()
        elif name.endswith("norm.proj.weight"):
            projections += p.numel()
    head = 0 if getattr(model.config, "tie_word_embeddings", False) else model.lm_head.weight.numel()
    return {"total": total, "shortcuts": shortcut, "projections": projections, "untied_head": head}
