"""Architecture adapters: uniform access to the parts of a decoder-only model, one adapter per family.

Everything that knows how a family names its modules lives here. Methods and surgery ask the adapter for
"the q projection of layer 3" or "the norm that feeds the MLP of layer 5" and never spell module paths.

>>> adapter = get_adapter(model)
>>> adapter.num_layers, adapter.attention(0).q_proj.weight.shape
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

__all__ = [
    "ArchAdapter",
    "AttentionParts",
    "MLPParts",
    "SUPPORTED_MODEL_TYPES",
    "UnsupportedModelError",
    "get_adapter",
    "register_adapter",
    "unwrap_model",
]


class UnsupportedModelError(ValueError):
    """The model's family has no adapter."""


@dataclass
class AttentionParts:
    """The projections of one attention block and its head geometry (read from the weight shapes)."""

    module: nn.Module
    q_proj: nn.Linear
    k_proj: nn.Linear
    v_proj: nn.Linear
    o_proj: nn.Linear
    head_dim: int
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None

    @property
    def num_heads(self) -> int:
        return self.q_proj.out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.k_proj.out_features // self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per kv head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0


@dataclass
class MLPParts:
    """A gated MLP: down(act(gate(x)) * up(x)). `gate` is None for a plain two-matrix MLP."""

    module: nn.Module
    gate_proj: nn.Linear | None
    up_proj: nn.Linear
    down_proj: nn.Linear

    @property
    def intermediate_size(self) -> int:
        return self.up_proj.out_features


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP/compile/PEFT wrappers and return the `*ForCausalLM` module."""
    seen = 0
    while seen < 8:
        seen += 1
        if hasattr(model, "module") and isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        else:
            break
    return model


class ArchAdapter:
    """Uniform access to a causal LM of one family.

    Subclasses set `model_types` and, where names differ, override the small accessors. Defaults follow the
    Llama layout that most families share: `model.model.{embed_tokens,layers,norm}`, `model.lm_head`,
    `layer.self_attn.{q,k,v,o}_proj`, `layer.mlp.{gate,up,down}_proj`, `layer.{input,post_attention}_layernorm`.
    """

    model_types: tuple[str, ...] = ()
    #: True when norms compute x * (1 + w) (Gemma) instead of x * w.
    norm_offset_one: bool = False
    #: Norms applied to the *output* of attention / MLP before the residual add (Gemma's sandwich norms).
    has_post_sublayer_norms: bool = False

    def __init__(self, model: nn.Module):
        self.model = unwrap_model(model)
        self.config = self.model.config

    # ----- model-level parts -------------------------------------------------------------------
    @property
    def backbone(self) -> nn.Module:
        return self.model.model

    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.backbone.embed_tokens

    @property
    def layers(self) -> nn.ModuleList:
        return self.backbone.layers

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def final_norm(self) -> nn.Module:
        return self.backbone.norm

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.lm_head

    @property
    def hidden_size(self) -> int:
        return self.embed_tokens.weight.shape[1]

    @property
    def tied_embeddings(self) -> bool:
        return self.lm_head.weight is self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings as the first decoder layer sees them (family scaling included)."""
        return self.embed_tokens(input_ids)

    # ----- per-layer parts ---------------------------------------------------------------------
    def layer(self, i: int) -> nn.Module:
        return self.layers[i]

    def head_dim(self, layer: nn.Module) -> int:
        attn = layer.self_attn
        hd = getattr(attn, "head_dim", None)
        if hd is None:
            hd = getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads
        return int(hd)

    def attention(self, i: int) -> AttentionParts:
        layer = self.layers[i]
        a = layer.self_attn
        return AttentionParts(
            module=a,
            q_proj=a.q_proj,
            k_proj=a.k_proj,
            v_proj=a.v_proj,
            o_proj=a.o_proj,
            head_dim=self.head_dim(layer),
            q_norm=getattr(a, "q_norm", None),
            k_norm=getattr(a, "k_norm", None),
        )

    def mlp(self, i: int) -> MLPParts:
        m = self.layers[i].mlp
        return MLPParts(module=m, gate_proj=getattr(m, "gate_proj", None), up_proj=m.up_proj, down_proj=m.down_proj)

    def attn_norm(self, i: int) -> nn.Module:
        """The norm applied to the residual stream before attention."""
        return self.layers[i].input_layernorm

    def mlp_norm(self, i: int) -> nn.Module:
        """The norm applied to the residual stream before the MLP."""
        return self.layers[i].post_attention_layernorm

    def post_attn_norm(self, i: int) -> nn.Module | None:
        """A norm on the attention output before the residual add (Gemma), else None."""
        return None

    def post_mlp_norm(self, i: int) -> nn.Module | None:
        """A norm on the MLP output before the residual add (Gemma), else None."""
        return None

    def linears(self, i: int) -> Iterator[tuple[str, nn.Linear]]:
        """Every nn.Linear of decoder layer i with its short name (q_proj, ..., down_proj)."""
        a, m = self.attention(i), self.mlp(i)
        yield "q_proj", a.q_proj
        yield "k_proj", a.k_proj
        yield "v_proj", a.v_proj
        yield "o_proj", a.o_proj
        if m.gate_proj is not None:
            yield "gate_proj", m.gate_proj
        yield "up_proj", m.up_proj
        yield "down_proj", m.down_proj

    # ----- running pieces of the network ---------------------------------------------------------
    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor, layer_idx: int = 0):
        """(cos, sin) position embeddings the decoder layers expect."""
        return self.backbone.rotary_emb(hidden, position_ids)

    def layer_kwargs(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None, layer_idx: int) -> dict:
        """Keyword arguments to call decoder layer `layer_idx` outside the model's own forward (no cache)."""
        b, t = hidden.shape[:2]
        position_ids = torch.arange(t, device=hidden.device).unsqueeze(0).expand(b, -1)
        mask = _causal_mask(hidden, attention_mask, self._sliding_window(layer_idx))
        return {
            "attention_mask": mask,
            "position_ids": position_ids,
            "position_embeddings": self.rotary(hidden, position_ids, layer_idx),
        }

    def run_layer(self, i: int, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                  layer_idx: int | None = None) -> torch.Tensor:
        """Decoder layer i applied to a residual stream `hidden` (no cache). `layer_idx` picks the position
        type (sliding/full attention, RoPE) when it differs from i; it defaults to i."""
        out = self.layers[i](hidden, **self.layer_kwargs(hidden, attention_mask, i if layer_idx is None else layer_idx))
        return out[0] if isinstance(out, tuple) else out

    def _sliding_window(self, layer_idx: int) -> int | None:
        return None

    def final_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.final_norm(hidden)


def _causal_mask(hidden: torch.Tensor, attention_mask: torch.Tensor | None, window: int | None) -> torch.Tensor:
    """Additive 4-D float mask (b, 1, t, t): causal, padding masked, optional sliding window."""
    b, t = hidden.shape[:2]
    dev = hidden.device
    i = torch.arange(t, device=dev)
    allowed = i[None, :] <= i[:, None]
    if window is not None:
        allowed = allowed & (i[:, None] - i[None, :] < window)
    allowed = allowed[None, None].expand(b, 1, t, t)
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :].bool()
        # a fully padded query row would be all -inf: let it see itself so softmax stays finite
        allowed = allowed | torch.eye(t, dtype=torch.bool, device=dev)[None, None]
    neg = torch.finfo(hidden.dtype).min
    return torch.zeros(b, 1, t, t, dtype=hidden.dtype, device=dev).masked_fill(~allowed, neg)


class LlamaAdapter(ArchAdapter):
    model_types = ("llama",)


class MistralAdapter(ArchAdapter):
    model_types = ("mistral",)

    def _sliding_window(self, layer_idx: int) -> int | None:
        return getattr(self.config, "sliding_window", None)


class Qwen2Adapter(ArchAdapter):
    model_types = ("qwen2",)

    def _sliding_window(self, layer_idx: int) -> int | None:
        lt = getattr(self.config, "layer_types", None)
        if lt and lt[layer_idx] == "sliding_attention":
            return self.config.sliding_window
        return None


class Qwen3Adapter(Qwen2Adapter):
    model_types = ("qwen3",)


class Gemma3Adapter(ArchAdapter):
    """Gemma 3 text models: scaled embeddings, (1 + w) RMSNorms, sandwich norms, q/k norms, local/global RoPE."""

    model_types = ("gemma3_text",)
    norm_offset_one = True
    has_post_sublayer_norms = True

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # Gemma3TextScaledWordEmbedding applies the sqrt(hidden) scale

    def mlp_norm(self, i: int) -> nn.Module:
        return self.layers[i].pre_feedforward_layernorm

    def post_attn_norm(self, i: int) -> nn.Module | None:
        return self.layers[i].post_attention_layernorm

    def post_mlp_norm(self, i: int) -> nn.Module | None:
        return self.layers[i].post_feedforward_layernorm

    def _sliding_window(self, layer_idx: int) -> int | None:
        lt = getattr(self.config, "layer_types", None)
        if lt and lt[layer_idx] == "sliding_attention":
            return self.config.sliding_window
        return None

    def rotary(self, hidden, position_ids, layer_idx: int = 0):
        lt = getattr(self.config, "layer_types", None)
        layer_type = lt[layer_idx] if lt else "full_attention"
        return self.backbone.rotary_emb(hidden, position_ids, layer_type)


_REGISTRY: dict[str, type[ArchAdapter]] = {}


def register_adapter(cls: type[ArchAdapter]) -> type[ArchAdapter]:
    """Register an adapter class for each of its `model_types` (usable as a decorator)."""
    for mt in cls.model_types:
        _REGISTRY[mt] = cls
    return cls


for _cls in (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter, Gemma3Adapter):
    register_adapter(_cls)

SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(sorted(_REGISTRY))


def base_model_type(config) -> str:
    """The family a config belongs to; pruned configs record the family they came from."""
    return getattr(config, "base_model_type", None) or config.model_type


def get_adapter(model: nn.Module) -> ArchAdapter:
    """The adapter for `model`'s family; raises UnsupportedModelError listing the supported families."""
    inner = unwrap_model(model)
    config = getattr(inner, "config", None)
    if config is None:
        raise UnsupportedModelError(f"{type(inner).__name__} has no `config`; expected a transformers causal LM")
    mt = base_model_type(config)
    if mt not in _REGISTRY:
        raise UnsupportedModelError(
            f"model_type={mt!r} is not supported; supported model types: {', '.join(sorted(_REGISTRY))}"
        )
    return _REGISTRY[mt](inner)


def linear_factory(like: nn.Linear, in_features: int, out_features: int, bias: bool | None = None) -> nn.Linear:
    """An empty nn.Linear on `like`'s device and dtype."""
    use_bias = like.bias is not None if bias is None else bias
    return nn.Linear(in_features, out_features, bias=use_bias, device=like.weight.device, dtype=like.weight.dtype)


LinearFactory = Callable[[nn.Linear, int, int], nn.Linear]
