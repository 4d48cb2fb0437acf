"""Model classes for residual-stream-sliced models (SliceGPT, Dynamic Slicing).

Self-contained on purpose (see configuration_hf_prune_sliced.py): copied next to saved weights for
`trust_remote_code`. Each class is its family's causal LM whose decoder layers are replaced by `SlicedDecoderLayer`:

    h_mid = carry(h, attn_shortcut) + attn(norm(h))          carry: shortcut matrix, or identity cut/padded to width
    h_out = carry(h_mid, mlp_shortcut) + mlp(norm(h_mid))

with scale-free RMS norms (x / sqrt(sum(x^2) / D + eps), D = the original hidden size) and q/k/v, o, gate/up, down
reading and writing the residual widths the config lists. Gemma 3's sandwich norms on the sublayer outputs become
a scale-free norm followed by a projection (`NormThenProject`), because their (1 + w) scale sits between a
normalisation and the residual add, where no linear can absorb it. The state-dict keys are the family's own plus
`attn_shortcut`, `mlp_shortcut`, `norm.proj` (tied head) and `*_layernorm.proj` (Gemma 3). The classes are generated
by `make_sliced_backbone` and `make_sliced_model`, one pair per entry of FAMILIES (families_hf_prune.py).
"""

import functools
import inspect

import torch
from torch import nn
from torch.nn import functional as F
from transformers.modeling_layers import GradientCheckpointingLayer

from .configuration_hf_prune_sliced import SLICED_CONFIGS
from .families_hf_prune import FAMILIES, family_class, name_class


class ScaleFreeNorm(nn.Module):
    """RMS normalisation without a scale, averaged over a fixed width: x / sqrt(sum(x^2) / norm_dim + eps).

    With norm_dim = the original hidden size this equals the family's RMSNorm (scale folded elsewhere) on the full
    stream, commutes with any orthogonal rotation of it, and keeps its scale when trailing dims are sliced away.
    """

    def __init__(self, norm_dim: int, eps: float):
        super().__init__()
        self.norm_dim = int(norm_dim)
        self.eps = float(eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        variance = xf.pow(2).sum(-1, keepdim=True) / self.norm_dim
        return (xf * torch.rsqrt(variance + self.eps)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"norm_dim={self.norm_dim}, eps={self.eps}"


class NormThenProject(nn.Module):
    """A scale-free norm followed by a linear map (no bias): the rotation-invariant form of a norm whose scale cannot
    be folded forward (Gemma's post-sublayer norms) or of a final norm feeding a tied head."""

    def __init__(self, norm_dim: int, eps: float, in_features: int, out_features: int, projection: bool = True):
        super().__init__()
        self.norm = ScaleFreeNorm(norm_dim, eps)
        self.proj = nn.Linear(in_features, out_features, bias=False) if projection else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        return x if self.proj is None else self.proj(x)


def add_residual(x: torch.Tensor, shortcut: nn.Module | None, update: torch.Tensor) -> torch.Tensor:
    """carry(x, shortcut) + update. A plain nn.Linear shortcut is fused with the add into one addmm, so a layer with
    shortcut matrices runs as many kernels as the dense layer (decode at batch 1 is bound by their count); wrapped
    shortcuts (e.g. LoRA) and shortcuts with hooks (calibration capture, tests) take the generic path, so hooks fire."""
    if (
        type(shortcut) is nn.Linear
        and shortcut.bias is None
        and x.dtype == update.dtype
        and not (shortcut._forward_hooks or shortcut._forward_pre_hooks)
    ):
        out = torch.addmm(update.reshape(-1, update.shape[-1]), x.reshape(-1, x.shape[-1]), shortcut.weight.t())
        return out.view(update.shape)
    return carry(x, shortcut, update.shape[-1]) + update


def carry(x: torch.Tensor, shortcut: nn.Module | None, width: int) -> torch.Tensor:
    """The residual stream moved to the next slot: through the shortcut matrix if there is one, else the identity
    cut to (or zero-padded up to) `width`."""
    if shortcut is not None:
        return shortcut(x)
    d = x.shape[-1]
    if d == width:
        return x
    if d > width:
        return x[..., :width]
    return F.pad(x, (0, width - d))


def _linear(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=bias)


def _resize_linear(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    if old.in_features == in_features and old.out_features == out_features:
        return old
    return nn.Linear(
        in_features, out_features, bias=old.bias is not None, device=old.weight.device, dtype=old.weight.dtype
    )


def _slot_dims(config) -> list[int]:
    n = config.num_hidden_layers
    return list(config.residual_dims) if config.residual_dims is not None else [config.hidden_size] * (2 * n + 1)


class SlicedDecoderLayer(GradientCheckpointingLayer):
    """A decoder layer in rotation-invariant form with its own residual widths (see the module docstring)."""

    def __init__(self, config, layer_idx: int, attention_class, mlp_class, sandwich_norms: bool = False):
        super().__init__()
        dims = _slot_dims(config)
        d_in, d_mid, d_out = dims[2 * layer_idx], dims[2 * layer_idx + 1], dims[2 * layer_idx + 2]
        hidden = config.hidden_size
        attn, mlp = attention_class(config=config, layer_idx=layer_idx), mlp_class(config)
        attn.q_proj = _resize_linear(attn.q_proj, d_in, attn.q_proj.out_features)
        attn.k_proj = _resize_linear(attn.k_proj, d_in, attn.k_proj.out_features)
        attn.v_proj = _resize_linear(attn.v_proj, d_in, attn.v_proj.out_features)
        attn.o_proj = _resize_linear(attn.o_proj, attn.o_proj.in_features, hidden if sandwich_norms else d_mid)
        if getattr(mlp, "gate_proj", None) is not None:
            mlp.gate_proj = _resize_linear(mlp.gate_proj, d_mid, mlp.gate_proj.out_features)
        mlp.up_proj = _resize_linear(mlp.up_proj, d_mid, mlp.up_proj.out_features)
        mlp.down_proj = _resize_linear(mlp.down_proj, mlp.down_proj.in_features, hidden if sandwich_norms else d_out)
        self._assemble(config, layer_idx, attn, mlp, sandwich_norms, (d_in, d_mid, d_out))

    @classmethod
    def from_modules(cls, config, layer_idx: int, self_attn: nn.Module, mlp: nn.Module, sandwich_norms: bool):
        """Wrap existing attention and MLP modules (used when converting a dense model, no weights re-created)."""
        layer = cls.__new__(cls)
        GradientCheckpointingLayer.__init__(layer)
        dims = _slot_dims(config)
        layer._assemble(
            config, layer_idx, self_attn, mlp, sandwich_norms, tuple(dims[2 * layer_idx : 2 * layer_idx + 3])
        )
        return layer

    def _assemble(self, config, layer_idx, attn, mlp, sandwich_norms, widths) -> None:
        d_in, d_mid, d_out = widths
        hidden, eps = config.hidden_size, config.rms_norm_eps
        self.layer_idx = layer_idx
        self.sandwich_norms = bool(sandwich_norms)
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = ScaleFreeNorm(hidden, eps)
        if self.sandwich_norms:
            self.post_attention_layernorm = NormThenProject(hidden, eps, hidden, d_mid)
            self.pre_feedforward_layernorm = ScaleFreeNorm(hidden, eps)
            self.post_feedforward_layernorm = NormThenProject(hidden, eps, hidden, d_out)
        else:
            self.post_attention_layernorm = ScaleFreeNorm(hidden, eps)
        attn_flags = config.attn_shortcuts or [False] * config.num_hidden_layers
        mlp_flags = config.mlp_shortcuts or [False] * config.num_hidden_layers
        self.attn_shortcut = _linear(d_in, d_mid, False) if attn_flags[layer_idx] else None
        self.mlp_shortcut = _linear(d_mid, d_out, False) if mlp_flags[layer_idx] else None

    # the two halves, usable on their own by layer-wise calibration
    def attention_update(self, hidden_states: torch.Tensor, **kwargs) -> torch.Tensor:
        """What the attention half adds to the residual stream."""
        h, _ = self.self_attn(hidden_states=self.input_layernorm(hidden_states), **kwargs)
        return self.post_attention_layernorm(h) if self.sandwich_norms else h

    def mlp_norm(self) -> nn.Module:
        return self.pre_feedforward_layernorm if self.sandwich_norms else self.post_attention_layernorm

    def mlp_update(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """What the MLP half adds to the residual stream."""
        h = self.mlp(self.mlp_norm()(hidden_states))
        return self.post_feedforward_layernorm(h) if self.sandwich_norms else h

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        use_cache: bool | None = False,
        position_embeddings=None,
        **kwargs,
    ) -> torch.Tensor:
        cache = kwargs.pop("cache", None)  # transformers >= 5.2x names it `cache`; older ones `past_key_values`
        kwargs[_cache_keyword(type(self.self_attn))] = cache if cache is not None else past_key_values
        update = self.attention_update(
            hidden_states,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=use_cache,
            position_embeddings=position_embeddings,
            **kwargs,
        )
        hidden_states = add_residual(hidden_states, self.attn_shortcut, update)
        return add_residual(hidden_states, self.mlp_shortcut, self.mlp_update(hidden_states))


def become(module: nn.Module, cls: type) -> None:
    """Give `module` the class `cls` and keep its hidden states and attentions recordable.

    transformers records `output_hidden_states` / `output_attentions` with forward hooks chosen by the class's
    `_can_record_outputs`, looked up by class name in a registry filled when a model is constructed; a module whose
    class changes afterwards would silently return `hidden_states=None`. So the new class is registered, the hooks
    installed for the old class are removed, and they are installed again on the next forward."""
    module.__class__ = cls
    try:
        from transformers.utils import output_capturing
    except ImportError:  # older transformers: outputs are returned by the layers themselves
        return
    registry = getattr(output_capturing, "_CAN_RECORD_REGISTRY", None)
    if registry is None:
        return
    registry[module] = getattr(cls, "_can_record_outputs", None)
    if getattr(module, "_output_capturing_hooks_installed", False):
        for sub in module.modules():
            for key, hook in list(sub._forward_hooks.items()):
                if getattr(hook, "__name__", "") == "output_capturing_hook":
                    del sub._forward_hooks[key]
        module._output_capturing_hooks_installed = False


@functools.lru_cache(maxsize=None)
def _cache_keyword(attention_cls: type) -> str:
    """The name under which `attention_cls.forward` takes the KV cache (passing the deprecated one as well makes
    transformers warn at every layer of every forward)."""
    params = inspect.signature(attention_cls.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def build_sliced_modules(model: nn.Module) -> None:
    """Replace the decoder layers, final norm, embedding width and head of a freshly built family model by their
    sliced forms at the widths `model.config` lists (weights are re-created; loading fills them)."""
    cfg = model.config
    backbone = model.model
    dims = _slot_dims(cfg)
    backbone.layers = nn.ModuleList(
        [
            SlicedDecoderLayer(cfg, i, model.attention_class, model.mlp_class, model.sandwich_norms)
            for i in range(cfg.num_hidden_layers)
        ]
    )
    backbone.norm = NormThenProject(cfg.hidden_size, cfg.rms_norm_eps, dims[-1], dims[0], bool(cfg.head_projection))
    emb = backbone.embed_tokens
    if emb.weight.shape[1] != dims[0]:
        emb.weight = nn.Parameter(torch.empty(emb.weight.shape[0], dims[0], device=emb.weight.device,
                                              dtype=emb.weight.dtype))
        emb.embedding_dim = dims[0]
    head_in = dims[0] if cfg.head_projection else dims[-1]
    model.lm_head = _resize_linear(model.lm_head, head_in, model.lm_head.out_features)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = emb.weight


class _SlicedMixin:
    """Shared class attributes of the sliced causal LMs."""

    _no_split_modules = ["SlicedDecoderLayer"]
    sandwich_norms = False

    def _finish_init(self) -> None:
        build_sliced_modules(self)
        self.post_init()


def make_sliced_backbone(base_backbone_cls: type, config_cls: type, attention_cls: type, name: str | None = None,
                         module: str = __name__) -> type:
    """The sliced decoder stack of a family: `base_backbone_cls` (the family's `*Model`) recording the hidden states of
    its SlicedDecoderLayers. Never built on its own: the sliced causal LM builds the family's stack and gives it this
    class. Named `Sliced` + the base class's name unless `name` says otherwise."""

    class SlicedBackbone(base_backbone_cls):
        config_class = config_cls
        _can_record_outputs = {"hidden_states": SlicedDecoderLayer, "attentions": attention_cls}

    return name_class(SlicedBackbone, name or f"Sliced{base_backbone_cls.__name__}", module)


def make_sliced_model(base_model_cls: type, config_cls: type, backbone_cls: type, attention_cls: type,
                      mlp_cls: type, sandwich_norms: bool = False, name: str | None = None,
                      module: str = __name__) -> type:
    """The sliced causal LM of a family: `base_model_cls` (the family's standard causal LM) whose stack becomes
    `backbone_cls` (make_sliced_backbone) with SlicedDecoderLayers around `attention_cls` and `mlp_cls`, at the widths
    `config_cls` lists; `sandwich_norms` for families that norm the sublayer outputs (Gemma). Named `Sliced` + the
    base class's name unless `name` says otherwise; `module` is where it is published."""

    class SlicedForCausalLM(_SlicedMixin, base_model_cls):
        config_class = config_cls
        backbone_class = backbone_cls
        attention_class, mlp_class = attention_cls, mlp_cls

        def __init__(self, config):
            super().__init__(config)
            become(self.model, backbone_cls)
            self._finish_init()

    SlicedForCausalLM.sandwich_norms = bool(sandwich_norms)
    cls = name_class(SlicedForCausalLM, name or f"Sliced{base_model_cls.__name__}", module)
    cls.register_for_auto_class("AutoModelForCausalLM")
    return cls


# family -> its sliced causal LM; each class (and its stack) also a module attribute under its own name
# (SlicedLlamaForCausalLM, SlicedLlamaModel, ...)
SLICED_MODELS = {}
for _family, _spec in FAMILIES.items():
    _attention = family_class(_spec, "attention")
    _backbone = make_sliced_backbone(family_class(_spec, "backbone"), SLICED_CONFIGS[_family], _attention)
    _cls = SLICED_MODELS[_family] = make_sliced_model(
        family_class(_spec, "causal_lm"), SLICED_CONFIGS[_family], _backbone, _attention,
        family_class(_spec, "mlp"), _spec.sandwich_norms,
    )
    globals()[_backbone.__name__] = _backbone
    globals()[_cls.__name__] = _cls
