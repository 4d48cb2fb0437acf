"""Input checks shared by the methods, the runner and the configs: each raises an error that names the bad value and
what would be valid, before any weight moves.

    batches = check_batches(batches, model, method="shortgpt")     # list of dicts, every id inside the vocabulary
    n = check_int_option("n_remove", n_remove, minimum=1)          # no bool, no silent float truncation
    require_finite(scores, method="shortgpt", stage=0, layer=3, what="block influence")
"""

from __future__ import annotations

import math
import numbers
import operator
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .arch import unwrap_model

__all__ = [
    "NonFiniteError",
    "check_batches",
    "check_choice",
    "check_fraction",
    "check_int_option",
    "check_optional_int_option",
    "require_finite",
    "require_finite_weights",
    "vocab_size_of",
]

#: keys of a calibration batch that hold token ids (checked against the vocabulary)
ID_KEYS = ("input_ids", "perturbed_input_ids")
#: keys that hold a 0/1 padding mask for the ids key of the same view
MASK_KEYS = {"input_ids": "attention_mask", "perturbed_input_ids": "perturbed_attention_mask"}


class NonFiniteError(ValueError):
    """A score, statistic or activation is NaN or infinite: the run stops before a plan is built from it."""


# ----- calibration batches ------------------------------------------------------------------------------------------


def vocab_size_of(model: nn.Module) -> int:
    """Rows of the model's input embedding (the ids it accepts are 0..rows-1)."""
    base = unwrap_model(model)
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    if emb is not None and getattr(emb, "weight", None) is not None:
        return int(emb.weight.shape[0])
    size = getattr(getattr(base, "config", None), "vocab_size", None)
    if size is None:
        raise TypeError(f"cannot read the vocabulary size of {type(model).__name__}: no input embedding, no "
                        "config.vocab_size")
    return int(size)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a torch.Tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"a {type(value).__name__} ({value!r:.60})"


def _check_ids(method: str, n: int, key: str, ids: Any, vocab: int) -> torch.Tensor:
    where = f"{method}: calibration batch {n}"
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{where}: {key} is {_describe(ids)}; it must be a torch.Tensor of token ids (batch, tokens)")
    if ids.dtype == torch.bool or ids.dtype.is_floating_point or ids.dtype.is_complex:
        raise TypeError(f"{where}: {key} has dtype {ids.dtype}; token ids must be an integer tensor (torch.long)")
    if ids.dim() != 2:
        raise ValueError(f"{where}: {key} has shape {tuple(ids.shape)} ({ids.dim()}-D); it must be 2-D "
                         "(batch, tokens): add a batch dimension with ids[None]")
    if ids.numel() == 0:
        raise ValueError(f"{where}: {key} has shape {tuple(ids.shape)}, no tokens; give at least one token per row")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{where}: {key} holds token id {bad}, outside the model's vocabulary 0..{vocab - 1}; "
                         "was the batch made with another model's tokenizer?")
    return ids


def _check_mask(method: str, n: int, key: str, mask: Any, shape: torch.Size) -> torch.Tensor:
    where = f"{method}: calibration batch {n}"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where}: {key} is {_describe(mask)}; it must be a 0/1 torch.Tensor shaped like the ids")
    if mask.shape != shape:
        raise ValueError(f"{where}: {key} has shape {tuple(mask.shape)}, the ids have shape {tuple(shape)}; "
                         "they must be equal")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"{where}: {key} has dtype {mask.dtype}; use an integer or bool 0/1 mask")
    if mask.numel() and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{where}: {key} holds values {sorted(set(mask.unique().tolist()))[:8]}; only 0 (padding) "
                         "and 1 (real token) are valid")
    return mask


def check_batches(batches: Any, model: nn.Module, *, method: str, required: bool = True) -> list[dict]:
    """The calibration batches as a list of dicts, each checked against `model`; raises TypeError / ValueError
    naming the bad value and what is valid.

    Each batch is a dict with `input_ids` (batch, tokens) of integer ids in 0..vocab_size-1, and optionally an
    `attention_mask` of the same shape (0/1), `labels` of the same shape, and a perturbed view
    (`perturbed_input_ids`, `perturbed_attention_mask`). At least one real (unpadded) token must be present over
    all batches. `required=False` accepts no batches at all (data-free methods) and returns [].
    """
    if isinstance(batches, torch.Tensor):
        raise TypeError(
            f"{method}: got {_describe(batches)} where calibration batches are expected; wrap it with "
            "hf_prune.data.batches(blocks, batch_size) (a list of dicts with input_ids and attention_mask)"
        )
    if isinstance(batches, Mapping):
        raise TypeError(f"{method}: got a single batch dict (keys {sorted(map(str, batches))}); pass a list of "
                        "batches, e.g. [batch]")
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"{method}: calibration batches must be a list of dicts with input_ids; got "
                        f"{_describe(batches)}")
    out = list(batches)
    if not out:
        if not required:
            return out
        raise ValueError(f"{method}: the calibration batches are empty; pass at least one dict with input_ids "
                         "(hf_prune.data.batches(blocks, batch_size))")
    vocab = vocab_size_of(model)
    real = 0
    for n, batch in enumerate(out):
        if not isinstance(batch, Mapping):
            raise TypeError(f"{method}: calibration batch {n} is {_describe(batch)}; each batch must be a dict with "
                            "input_ids (and optionally attention_mask)")
        if "input_ids" not in batch:
            raise ValueError(f"{method}: calibration batch {n} has no 'input_ids'; its keys are "
                             f"{sorted(map(str, batch))}")
        for key in ID_KEYS:
            if key not in batch:
                continue
            ids = _check_ids(method, n, key, batch[key], vocab)
            mask_key = MASK_KEYS[key]
            mask = batch.get(mask_key)
            if mask is not None:
                mask = _check_mask(method, n, mask_key, mask, ids.shape)
            if key == "input_ids":
                real += int(mask.bool().sum()) if mask is not None else ids.numel()
        labels = batch.get("labels")
        if labels is not None:
            if not isinstance(labels, torch.Tensor) or labels.shape != batch["input_ids"].shape:
                raise ValueError(f"{method}: calibration batch {n}: labels are {_describe(labels)}; they must be a "
                                 f"tensor shaped like input_ids {tuple(batch['input_ids'].shape)}")
    if real == 0:
        raise ValueError(f"{method}: the calibration batches hold no real token: every attention_mask entry of the "
                         f"{len(out)} batch(es) is 0 (all padding); pass batches with real tokens (mask 1)")
    return out


# ----- finite values ------------------------------------------------------------------------------------------------


FINITE_CHUNK = 1 << 22  # elements per isfinite pass: 16 MiB of fp32 plus its 4 MiB of bools


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of the floating-point tensor `t` is finite, checked in blocks of rows holding about
    FINITE_CHUNK elements: `torch.isfinite` of a whole tensor allocates its |t| (a tensor of t's size) and two bool
    masks, ~1 GB for Gemma-3's 262k x 640 fp32 embedding."""
    t = t.detach()
    if t.dim() == 0 or t.numel() <= FINITE_CHUNK:
        return bool(torch.isfinite(t).all())
    rows = max(1, FINITE_CHUNK // max(1, t[0].numel()))
    return all(bool(torch.isfinite(t[i:i + rows]).all()) for i in range(0, t.shape[0], rows))


def require_finite(
    value: torch.Tensor | float | Iterable[float],
    *,
    method: str,
    stage: int | None,
    layer: int | None,
    what: str,
) -> None:
    """Raise NonFiniteError when `value` (a tensor, a number or a sequence of numbers) holds NaN or +-inf.

    The message names the method, the stage, the layer and what was computed, so a model with NaN weights or an
    overflowing fp16 forward stops before a plan is built from garbage.
    """
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_floating_point() or t.is_complex():
            if all_finite(t):
                return
            bad = int((~torch.isfinite(t)).sum())
            kinds = "NaN" if bool(torch.isnan(t).any()) else "inf"
            detail = f"{bad} of {t.numel()} values are {kinds}"
        else:
            return
    elif isinstance(value, numbers.Real):
        if math.isfinite(float(value)):
            return
        detail = f"the value is {float(value)}"
    else:
        values = [float(v) for v in value]
        bad_at = [i for i, v in enumerate(values) if not math.isfinite(v)]
        if not bad_at:
            return
        detail = f"entries {bad_at[:8]} are {[values[i] for i in bad_at[:8]]}"
    where = ", ".join(p for p in (f"stage {stage}" if stage is not None else "",
                                  f"layer {layer}" if layer is not None else "") if p)
    raise NonFiniteError(
        f"{method}: {what} is not finite{' at ' + where if where else ''} ({detail}); check the model's weights "
        "for NaN/inf and the calibration data, or score in float32 if the model runs in float16"
    )


def require_finite_weights(model: nn.Module, *, method: str, stage: int | None = None) -> None:
    """NonFiniteError naming the first parameter (and its decoder layer) that holds NaN/inf. One pass over the
    weights, no forward: run it before a method changes any weight (a rotation, an update)."""
    for name, p in unwrap_model(model).named_parameters():
        if p.is_floating_point() and not all_finite(p):
            m = re.search(r"\.layers\.(\d+)\.", name)
            require_finite(p, method=method, stage=stage, layer=int(m.group(1)) if m else None,
                           what=f"the weight {name}")


# ----- option values ------------------------------------------------------------------------------------------------


def _range_text(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f"{minimum}..{maximum}"
    if minimum is not None:
        return f">= {minimum}"
    if maximum is not None:
        return f"<= {maximum}"
    return "any integer"


def check_int_option(name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """`value` as an int within [minimum, maximum]. Refuses bools, strings, and floats with a fractional part (2.0
    is taken as 2; 1.7 is refused, never truncated). TypeError for a wrong type, ValueError for out of range."""
    valid = _range_text(minimum, maximum)
    if isinstance(value, bool) or (hasattr(value, "dtype") and "bool" in str(getattr(value, "dtype", ""))):
        raise TypeError(f"{name}={value!r} is a boolean; give an integer ({valid})")
    if isinstance(value, float) or (isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral)):
        f = float(value)
        if not (math.isfinite(f) and f.is_integer()):
            raise TypeError(f"{name}={value!r} is not a whole number; give an integer ({valid}), it is never rounded")
        out = int(f)
    else:
        try:
            out = operator.index(value)
        except TypeError:
            raise TypeError(f"{name}={value!r} is a {type(value).__name__}, not an integer; give an integer "
                            f"({valid})") from None
    if (minimum is not None and out < minimum) or (maximum is not None and out > maximum):
        raise ValueError(f"{name}={out} is out of range; valid: {valid}")
    return out


def check_optional_int_option(name: str, value: Any, *, minimum: int | None = None,
                              maximum: int | None = None) -> int | None:
    """None, or `check_int_option(name, value, ...)`."""
    return None if value is None else check_int_option(name, value, minimum=minimum, maximum=maximum)


def check_fraction(name: str, value: Any, *, lo: float, hi: float, lo_inclusive: bool = True,
                   hi_inclusive: bool = False) -> float:
    """`value` as a finite float within lo..hi (inclusive or not at each end). Refuses bools and strings."""
    left, right = "[" if lo_inclusive else "(", "]" if hi_inclusive else ")"
    valid = f"{left}{lo:g}, {hi:g}{right}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r} is a {type(value).__name__}, not a number; give a number in {valid}")
    f = float(value)
    ok = math.isfinite(f) and (f >= lo if lo_inclusive else f > lo) and (f <= hi if hi_inclusive else f < hi)
    if not ok:
        raise ValueError(f"{name}={value!r} is out of range; valid: {valid}")
    return f


def check_choice(name: str, value: Any, valid: Iterable[str]) -> str:
    """`value` if it is one of `valid`, else ValueError naming both."""
    valid = tuple(valid)
    if not isinstance(value, str) or value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; use one of {valid}")
    return value
