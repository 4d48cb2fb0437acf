"""Write a pruned (or dense) model as a GGUF file that llama.cpp, Ollama and LM Studio run.

    to_gguf("out", "out.gguf", dtype="f16")          # an export folder (`hf-prune prune`, `save`, save_pretrained)
    to_gguf(model, "out.gguf", tokenizer=tokenizer)   # a model in memory

Which llama.cpp architecture a result becomes:

- every layer with the same widths: the family's own architecture (llama and mistral -> `llama`, `qwen2`, `qwen3`);
- widths that differ per layer (heads, kv heads, MLP channels) of a Llama-layout family (llama, mistral, qwen2):
  `deci` (the DeciLM / Nemotron-NAS architecture), whose `head_count`, `head_count_kv` and `feed_forward_length`
  keys are per-layer arrays; otherwise it is Llama (RMSNorm, RoPE, SwiGLU, optional q/k/v biases). llama.cpp pads
  its KV cache to the widest layer.

Results no llama.cpp architecture can run are refused with a ValueError that names the missing engine feature:
sliced models (residual-stream shortcut matrices), per-layer Qwen3 (`deci` has no q/k norms), Gemma-3 (not written
here; uniform Gemma-3 results have a standard config that llama.cpp's own convert_hf_to_gguf.py converts), and
`CompactLinear` projections (llama.cpp multiplies dense matrices only; `expand_compact=True` writes them dense with
their zeros put back, which is exact but keeps no saving).

Conventions follow llama.cpp's converter (convert_hf_to_gguf.py, gguf-py): q and k rows are permuted from the
Hugging Face rotate-half RoPE layout into GGML's interleaved one for `llama` / `deci` (`qwen2` / `qwen3` use NEOX RoPE
and keep the Hugging Face order); 1-D tensors (norms, biases) stay f32; `q8_0` falls back to f16 for matrices whose
rows are not a multiple of 32 values. MLP widths are written rounded up to a multiple of 32 (`pad_ffn_to`) with
zero channels, which is exact and keeps ggml on its fast matmul paths (pruned widths such as 1237 are not). The
tokenizer (byte-level BPE vocabulary,
token types, merges, special token ids, add-bos/eos flags) and the chat template go into the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
import torch
from torch import nn

from .arch import base_model_type, get_adapter, unwrap_model

__all__ = ["DTYPES", "GGUFArchitecture", "choose_architecture", "to_gguf"]

logger = logging.getLogger(__name__)

DTYPES = ("f32", "f16", "bf16", "q8_0")
_FILE_TYPES = {
    "f32": gguf.LlamaFileType.ALL_F32,
    "f16": gguf.LlamaFileType.MOSTLY_F16,
    "bf16": gguf.LlamaFileType.MOSTLY_BF16,
    "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
}
_QTYPES = {
    "f32": gguf.GGMLQuantizationType.F32,
    "f16": gguf.GGMLQuantizationType.F16,
    "bf16": gguf.GGMLQuantizationType.BF16,
    "q8_0": gguf.GGMLQuantizationType.Q8_0,
}
# family -> llama.cpp architecture for a uniform result; whether q/k rows are permuted (GGML's interleaved RoPE)
_UNIFORM_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
_PER_LAYER_FAMILIES = ("llama", "mistral", "qwen2")
_NEOX_ROPE_ARCHS = ("qwen2", "qwen3")
_ROPE_TYPES = ("default", "linear", "llama3")
# Tensor data alignment in the file (`general.alignment`). llama.cpp maps the file and multiplies the tensors where they
# lie; GGUF's default of 32 bytes leaves every tensor at 32 mod 64 whenever the header's length happens to fall that
# way, and then each 64-byte AVX-512 load of an f32 matmul straddles two cache lines: on the 2-core EPYC of
# benchmarks/results/serving.md that made f32 decode ~25% slower for the same weights (a file's name alone moved it).
DATA_ALIGNMENT = 64

# Pre-tokenizer regexes of byte-level BPE tokenizers (tokenizer.json `Split` pattern) -> llama.cpp's pre-tokenizer name.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLIT_PRE = {_LLAMA3_SPLIT: "llama-bpe", _QWEN2_SPLIT: "qwen2"}


@dataclass(frozen=True)
class GGUFArchitecture:
    """What the file will be: llama.cpp architecture name and the per-layer widths read from the module shapes."""

    name: str
    family: str
    heads: list[int]
    kv_heads: list[int]
    ffn: list[int]
    head_dim: int

    @property
    def per_layer(self) -> bool:
        return self.name == "deci"

    @property
    def permute_qk(self) -> bool:
        return self.name not in _NEOX_ROPE_ARCHS


# --------------------------------------------------------------------------------------------------------------------
# What can be written
# --------------------------------------------------------------------------------------------------------------------


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r} is not valid; use one of {DTYPES}")


def _refuse_sliced(config) -> None:
    if getattr(config, "residual_dims", None) is not None or str(config.model_type).startswith("sliced_"):
        raise ValueError(
            f"model_type={config.model_type!r} is a sliced model (SliceGPT / Dynamic Slicing): its residual stream has "
            "a different width at every point and its residual adds go through shortcut matrices; no llama.cpp "
            "architecture has per-layer residual widths or shortcut matmuls, so it cannot be written as GGUF. "
            "Export a result of layer, head or channel pruning instead"
        )


def _compact_linears(model: nn.Module) -> list[str]:
    return [name for name, mod in model.named_modules() if type(mod).__name__ == "CompactLinear"]


def _refuse_compact(model: nn.Module, expand_compact: bool) -> None:
    names = _compact_linears(model)
    if names and not expand_compact:
        raise ValueError(
            f"{len(names)} projections are CompactLinear (stored without their zero rows and columns, e.g. "
            f"{names[0]}); llama.cpp multiplies dense matrices only and has no per-projection row/column index maps, "
            "so the compaction cannot be expressed. Pass expand_compact=True (CLI: --expand-compact) to write them "
            "dense with the zeros put back (exact, but without the saving), or export the model before compact_zeros"
        )


def _refuse_activation_and_rope(config) -> None:
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r}: llama.cpp's Llama-layout architectures run SwiGLU (silu) MLPs only")
    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"rope_type={rope_type!r} is not written by hf-prune's GGUF writer; supported: {_ROPE_TYPES}")


def _widths(model: nn.Module) -> tuple[list[int], list[int], list[int], int]:
    ad = get_adapter(model)
    heads, kv, ffn = [], [], []
    for i in range(ad.num_layers):
        a, m = ad.attention(i), ad.mlp(i)
        heads.append(a.num_heads)
        kv.append(a.num_kv_heads)
        ffn.append(m.intermediate_size)
    return heads, kv, ffn, ad.attention(0).head_dim


def padded_width(width: int, multiple: int) -> int:
    """`width` rounded up to a multiple of `multiple` (1 = unchanged)."""
    if multiple < 1:
        raise ValueError(f"pad_ffn_to={multiple} is not valid; use 1 (no padding) or a positive multiple such as 32")
    return -(-width // multiple) * multiple


def choose_architecture(model: nn.Module, expand_compact: bool = False, pad_ffn_to: int = 1) -> GGUFArchitecture:
    """The llama.cpp architecture `model` is written as, with MLP widths padded to a multiple of `pad_ffn_to`;
    raises ValueError naming what llama.cpp lacks."""
    model = unwrap_model(model)
    config = model.config
    _refuse_sliced(config)
    _refuse_compact(model, expand_compact)
    family = base_model_type(config)
    if family.startswith("gemma3"):
        raise ValueError(
            f"model_type={config.model_type!r}: hf-prune does not write Gemma-3 GGUF files. A per-layer result cannot "
            "be expressed: llama.cpp's only architecture with per-layer widths (deci) has no Gemma-3 sandwich norms, "
            "embedding scaling, GeLU MLP or sliding-window layers. A uniform result has a standard gemma3_text config: "
            "convert it with llama.cpp's own convert_hf_to_gguf.py"
        )
    heads, kv, ffn, head_dim = _widths(model)
    ffn = [padded_width(f, pad_ffn_to) for f in ffn]
    uniform = len(set(zip(heads, kv, ffn))) == 1
    if uniform and family == "qwen2" and heads[0] * head_dim != config.hidden_size:
        name = "deci"  # llama.cpp's qwen2 loader assumes query width == hidden_size; deci takes any width and biases
    elif uniform and family in _UNIFORM_ARCH:
        name = _UNIFORM_ARCH[family]
    elif not uniform and family in _PER_LAYER_FAMILIES:
        name = "deci"
    elif not uniform and family == "qwen3":
        raise ValueError(
            "a Qwen3 result with per-layer widths cannot be written: llama.cpp's only architecture with per-layer "
            "head and MLP widths (deci) has no per-head q/k RMSNorm (attn_q_norm / attn_k_norm), which Qwen3 needs"
        )
    else:
        raise ValueError(f"model_type={config.model_type!r} (family {family!r}) has no GGUF writer; supported "
                         f"families: {sorted(_UNIFORM_ARCH)} (per-layer widths: {list(_PER_LAYER_FAMILIES)})")
    _refuse_activation_and_rope(config)
    if getattr(config, "use_sliding_window", False) or (
            family == "mistral" and getattr(config, "sliding_window", None) is not None):
        logger.warning("sliding_window=%s is not written: llama.cpp's %s architecture attends to the whole context, "
                       "so outputs differ from transformers beyond the window", config.sliding_window, name)
    return GGUFArchitecture(name, family, heads, kv, ffn, head_dim)


# --------------------------------------------------------------------------------------------------------------------
# Hyperparameters
# --------------------------------------------------------------------------------------------------------------------


def _rope_parameters(config) -> dict[str, Any]:
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    if "type" in rope and "rope_type" not in rope:
        rope["rope_type"] = rope["type"]
    return rope


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Per-frequency divisors of Llama-3.1's RoPE scaling (`rope_type="llama3"`), as llama.cpp's `rope_freqs`.

    Wavelengths shorter than original_ctx / high_freq_factor keep their frequency (factor 1); longer than
    original_ctx / low_freq_factor are divided by `factor`; in between the two are blended smoothly."""
    base = float(rope["rope_theta"])
    factor = float(rope.get("factor", 8.0))
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = torch.where(wavelen < old_ctx / high, torch.ones_like(freqs),
                      torch.where(wavelen > old_ctx / low, torch.full_like(freqs, factor), blended))
    return out.float()


def _write_hparams(w: gguf.GGUFWriter, arch: GGUFArchitecture, config, vocab_size: int, dtype: str,
                   name: str) -> None:
    w.add_name(name)
    w.add_file_type(_FILE_TYPES[dtype])
    w.add_block_count(len(arch.heads))
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    if arch.per_layer:
        w.add_feed_forward_length(arch.ffn)
        w.add_head_count(arch.heads)
        w.add_head_count_kv(arch.kv_heads)
    else:
        w.add_feed_forward_length(arch.ffn[0])
        w.add_head_count(arch.heads[0])
        w.add_head_count_kv(arch.kv_heads[0])
    # llama.cpp derives head size from hidden_size / head_count (of layer 0) unless told: always tell it.
    w.add_key_length(arch.head_dim)
    w.add_value_length(arch.head_dim)
    w.add_rope_dimension_count(arch.head_dim)
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_vocab_size(vocab_size)
    rope = _rope_parameters(config)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))


# --------------------------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------------------------


def permute_for_ggml_rope(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q or k rows (weight or bias) of each head from Hugging Face's rotate-half RoPE layout (first half of
    the head's dimensions paired with the second half) to GGML's interleaved one (dimension 2j paired with 2j+1)."""
    rows = weight.shape[0]
    if n_heads < 1 or rows % (2 * n_heads):
        raise ValueError(f"{rows} rows cannot be split into {n_heads} heads of an even size")
    return (weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2)
            .reshape(weight.shape))


def _dense_weight(lin: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight, bias) of an nn.Linear, or of a CompactLinear with its zero rows and columns put back."""
    w, b = lin.weight.detach(), None if lin.bias is None else lin.bias.detach()
    if type(lin).__name__ != "CompactLinear":
        return w, b
    full = w.new_zeros(lin.out_features, lin.in_features)
    full[lin.out_index[:, None], lin.in_index[None, :]] = w
    if b is not None:
        fb = b.new_zeros(lin.out_features)
        fb[lin.out_index] = b
        b = fb
    return full, b


def _zero_pad(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """`t` with zeros appended along `dim` up to `size`. Zero MLP channels are exact: silu(0) * 0 = 0 reaches a zero
    column of the down projection."""
    missing = size - t.shape[dim]
    if missing < 0:
        raise ValueError(f"cannot pad dimension {dim} of size {t.shape[dim]} to {size}")
    if missing == 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t, t.new_zeros(shape)], dim=dim)


def _tensor_name(kind: gguf.MODEL_TENSOR, suffix: str, layer: int | None = None) -> str:
    base = gguf.TENSOR_NAMES[kind]
    return f"{base.format(bid=layer) if layer is not None else base}.{suffix}"


TensorSource = Callable[[], torch.Tensor]


def _layer_tensors(model: nn.Module, arch: GGUFArchitecture, i: int) -> Iterator[tuple[str, TensorSource]]:
    ad = get_adapter(model)
    T = gguf.MODEL_TENSOR
    a, m = ad.attention(i), ad.mlp(i)
    yield _tensor_name(T.ATTN_NORM, "weight", i), lambda: ad.attn_norm(i).weight.detach()
    for kind, lin, n in ((T.ATTN_Q, a.q_proj, arch.heads[i]), (T.ATTN_K, a.k_proj, arch.kv_heads[i]),
                         (T.ATTN_V, a.v_proj, 0), (T.ATTN_OUT, a.o_proj, 0)):
        permute = arch.permute_qk and n > 0

        def weight(lin=lin, permute=permute, n=n) -> torch.Tensor:
            w = _dense_weight(lin)[0]
            return permute_for_ggml_rope(w, n) if permute else w

        def bias(lin=lin, permute=permute, n=n) -> torch.Tensor:
            b = _dense_weight(lin)[1]
            return permute_for_ggml_rope(b, n) if permute else b

        yield _tensor_name(kind, "weight", i), weight
        if lin.bias is not None:
            yield _tensor_name(kind, "bias", i), bias
    if a.q_norm is not None:
        yield _tensor_name(T.ATTN_Q_NORM, "weight", i), lambda: a.q_norm.weight.detach()
        yield _tensor_name(T.ATTN_K_NORM, "weight", i), lambda: a.k_norm.weight.detach()
    yield _tensor_name(T.FFN_NORM, "weight", i), lambda: ad.mlp_norm(i).weight.detach()
    width = arch.ffn[i]
    for kind, lin in ((T.FFN_GATE, m.gate_proj), (T.FFN_UP, m.up_proj), (T.FFN_DOWN, m.down_proj)):
        dim = 1 if kind == T.FFN_DOWN else 0  # the channel dimension: down's columns, gate's and up's rows
        yield _tensor_name(kind, "weight", i), lambda lin=lin, dim=dim: _zero_pad(_dense_weight(lin)[0], dim, width)
        if lin.bias is not None:
            bias_width = width if dim == 0 else lin.bias.shape[0]
            yield _tensor_name(kind, "bias", i), lambda lin=lin: _zero_pad(_dense_weight(lin)[1], 0, bias_width)


def _model_tensors(model: nn.Module, arch: GGUFArchitecture) -> Iterator[tuple[str, TensorSource]]:
    """(GGUF name, producer of the tensor in Hugging Face orientation) in file order."""
    ad = get_adapter(model)
    T = gguf.MODEL_TENSOR
    yield _tensor_name(T.TOKEN_EMBD, "weight"), lambda: ad.embed_tokens.weight.detach()
    rope = _rope_parameters(model.config)
    if rope.get("rope_type") == "llama3":
        yield _tensor_name(T.ROPE_FREQS, "weight"), lambda: llama3_rope_factors(rope, arch.head_dim)
    for i in range(ad.num_layers):
        yield from _layer_tensors(model, arch, i)
    yield _tensor_name(T.OUTPUT_NORM, "weight"), lambda: ad.final_norm.weight.detach()
    if not ad.tied_embeddings:
        yield _tensor_name(T.OUTPUT, "weight"), lambda: ad.lm_head.weight.detach()


def _storage_type(shape: tuple[int, ...], dtype: str) -> gguf.GGMLQuantizationType:
    """1-D tensors stay f32; q8_0 needs rows that are a multiple of its 32-value block, else f16."""
    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32
    qtype = _QTYPES[dtype]
    if qtype == gguf.GGMLQuantizationType.Q8_0:
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if shape[-1] % block:
            return gguf.GGMLQuantizationType.F16
    return qtype


def _encode(name: str, t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    data = t.detach().to(torch.float32).cpu().contiguous().numpy()
    if not np.isfinite(data).all():
        raise ValueError(f"tensor {name} has non-finite values; refusing to write it")
    return gguf.quants.quantize(data, qtype)


def _byte_shape(shape: tuple[int, ...], qtype: gguf.GGMLQuantizationType) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape passed to the writer, numpy dtype of the encoded array, bytes) of a tensor stored as `qtype`."""
    n = int(np.prod(shape))
    if qtype == gguf.GGMLQuantizationType.F32:
        return shape, np.dtype(np.float32), 4 * n
    if qtype == gguf.GGMLQuantizationType.F16:
        return shape, np.dtype(np.float16), 2 * n
    if qtype == gguf.GGMLQuantizationType.BF16:
        return shape, np.dtype(np.uint16), 2 * n
    byte_shape = gguf.quant_shape_to_byte_shape(shape, qtype)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def _write_tensors(w: gguf.GGUFWriter, tensors: list[tuple[str, TensorSource]], dtype: str) -> dict[str, int]:
    """Write tensor infos, header data, then each tensor in turn (one tensor in memory at a time).
    Returns how many tensors went into each storage type."""
    plans = []
    for name, source in tensors:
        shape = tuple(source().shape)
        qtype = _storage_type(shape, dtype)
        info_shape, np_dtype, nbytes = _byte_shape(shape, qtype)
        w.add_tensor_info(name, info_shape, np_dtype, nbytes, raw_dtype=qtype)
        plans.append((name, source, qtype, nbytes))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    counts: dict[str, int] = {}
    for name, source, qtype, nbytes in plans:
        data = _encode(name, source(), qtype)
        if data.nbytes != nbytes:
            raise RuntimeError(f"encoded {qtype.name} tensor has {data.nbytes} bytes, expected {nbytes}")
        w.write_tensor_data(data)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    return counts


# --------------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------------


def _tokenizer_state(tokenizer) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; the GGUF writer "
                         "reads the byte-level BPE vocabulary and merges from tokenizer.json")
    state = json.loads(backend.to_str())
    model_type = state.get("model", {}).get("type")
    if model_type != "BPE" or state["model"].get("byte_fallback"):
        raise ValueError(f"tokenizer model {model_type!r} (byte_fallback={state['model'].get('byte_fallback')}) is "
                         "not written: hf-prune writes byte-level BPE (llama.cpp's 'gpt2' tokenizer model) only; "
                         "SentencePiece-style vocabularies are converted by llama.cpp's convert_hf_to_gguf.py")
    return state


def _pre_tokenizer_parts(pre: dict[str, Any] | None) -> list[dict[str, Any]]:
    if not pre:
        return []
    return list(pre.get("pretokenizers", [])) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_name(state: dict[str, Any]) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the pre-tokenizer of a byte-level BPE tokenizer.json `state`:
    GPT-2's regex alone -> "gpt-2"; individual digits then GPT-2's regex -> "smollm"; the Llama-3 or Qwen2 split
    regex -> "llama-bpe" / "qwen2"; anything else -> "default" (with a warning: llama.cpp's own text tokenization
    may then differ from transformers'; token ids passed in directly are unaffected)."""
    parts = _pre_tokenizer_parts(state.get("pre_tokenizer"))
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = parts[0].get("pattern", {}).get("Regex")
        if pattern in _SPLIT_PRE:
            return _SPLIT_PRE[pattern]
    logger.warning("pre-tokenizer %s has no llama.cpp equivalent known to hf-prune; writing 'default'", kinds)
    return "default"


def _token_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types for ids 0..vocab_size-1 (ids the tokenizer lacks become unused pads)."""
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    if by_id and max(by_id) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(by_id)} but the model's vocab_size is {vocab_size}; "
                         "pass the tokenizer the model was trained with")
    added = getattr(tokenizer, "added_tokens_decoder", {})
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, [int(t) for t in types]


def _write_tokenizer(w: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    state = _tokenizer_state(tokenizer)
    tokens, types = _token_table(tokenizer, vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer_name(state))
    w.add_token_list(tokens)
    w.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="hf_prune_gguf_tok-") as tmp:
        tokenizer.save_pretrained(tmp)  # SpecialVocab reads merges, special ids, add_*_token, chat template from disk
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ValueError("the tokenizer has no BPE merges; llama.cpp's gpt2 tokenizer model needs them")
    special.add_to_gguf(w, quiet=True)


# --------------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------------


def _load(folder_or_model, tokenizer):
    """(model, tokenizer, display name). A folder is checked for a writable architecture before weights load."""
    if isinstance(folder_or_model, nn.Module):
        model = unwrap_model(folder_or_model)
        if tokenizer is None:
            source = getattr(model.config, "_name_or_path", "") or ""
            if not (source and (Path(source) / "tokenizer.json").is_file()):
                raise ValueError("tokenizer=None with a model in memory: pass the tokenizer (llama.cpp needs the "
                                 "vocabulary inside the GGUF file)")
            tokenizer = _load_tokenizer(source)
        name = Path(getattr(model.config, "_name_or_path", "") or "model").name or "model"
        return model, tokenizer, name
    folder = Path(folder_or_model)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(folder)!r} is not a saved model folder (no config.json); pass an export folder or "
                         "a model")
    from transformers import AutoConfig, AutoModelForCausalLM

    from . import modeling  # noqa: F401  (registers hf-prune's pruned config classes)

    _refuse_sliced(AutoConfig.from_pretrained(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto").eval()
    if tokenizer is None:
        tokenizer = _load_tokenizer(folder)
    return model, tokenizer, folder.resolve().name


def _load_tokenizer(source: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def to_gguf(folder_or_model: str | os.PathLike | nn.Module, path: str | os.PathLike, dtype: str = "f16",
            tokenizer=None, *, overwrite: bool = False, expand_compact: bool = False, pad_ffn_to: int = 32) -> Path:
    """Write `folder_or_model` (an export folder or a causal LM) as a GGUF file at `path` and return its path.

    dtype: storage of the matrices ("f32", "f16", "bf16", "q8_0"; norms and biases are always f32). `tokenizer`
    defaults to the folder's. `pad_ffn_to`: MLP widths are written rounded up to this multiple with zero channels
    (exact: a zero channel adds silu(0) * 0 = 0); ggml's fast matmul paths and q8_0 need rows that are multiples of
    32, and on SmolLM2's LLM-Pruner result (MLP widths 1228-1536) unpadded widths cost a third of the f16 prefill
    speed (benchmarks/results/serving.md); 1 writes the widths as they are. `expand_compact`: write CompactLinear
    projections dense with their zeros put back instead of refusing them. The file is written to a temporary sibling
    and renamed into place; an existing `path` is replaced only with `overwrite=True`. See the module docstring for
    the architecture chosen and what is refused.
    """
    _check_dtype(dtype)
    padded_width(1, pad_ffn_to)  # validates pad_ffn_to before any weight loads
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    if path.exists() and not path.is_file():
        raise ValueError(f"{str(path)!r} exists and is not a file")
    if not path.parent.is_dir():
        raise ValueError(f"folder {str(path.parent)!r} does not exist")
    model, tokenizer, name = _load(folder_or_model, tokenizer)
    arch = choose_architecture(model, expand_compact, pad_ffn_to)
    vocab_size = int(get_adapter(model).embed_tokens.weight.shape[0])
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        w = gguf.GGUFWriter(tmp, arch.name)
        w.add_custom_alignment(DATA_ALIGNMENT)
        _write_hparams(w, arch, model.config, vocab_size, dtype, name)
        _write_tokenizer(w, tokenizer, vocab_size)
        with torch.no_grad():
            counts = _write_tensors(w, list(_model_tensors(model, arch)), dtype)
        w.close()
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("wrote %s: architecture %s, tensors %s", path, arch.name, counts)
    return path
