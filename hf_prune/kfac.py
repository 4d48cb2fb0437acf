"""K-FAC curvature of the decoder's linear layers (Martens & Grosse, ICML 2015), as LLM Surgeon uses it
(van der Ouderaa et al., ICLR 2024, arXiv 2312.17244).

For a linear layer y = W a (bias as an extra input column of ones) the Fisher of the loss w.r.t. vec(W) is
approximated by a Kronecker product

    F ~= G (x) A,   A = E[a a^T] over input activations,   G = E[g g^T],  g = dL/dy per token,

with expectations over the calibration tokens. g comes from the next-token loss with the dataset's own labels
(empirical Fisher, the default) or with labels sampled from the model's predictive distribution (`fisher="sampled"`,
the true Fisher). Both factors are rescaled to equal Frobenius norm (the product is unchanged; classic K-FAC) and are
inverted with damping relative to their mean diagonal: (M + lambda * mean(diag M) I)^-1.

    factors = collect_lm_kfac(model, batches)           # {"model.layers.0.self_attn.q_proj": KFACFactor, ...}
    Ginv = damped_inverse(factors[name].G, 0.01)

`KFACCollector` is the model-agnostic part (hooks on any set of nn.Linear and any loss); `collect_lm_kfac` runs it
on a causal LM with the next-token loss. Factors are accumulated on the model's device when they fit there and on
the CPU otherwise; the memory they need is logged before the pass and a clear error is raised when they cannot fit.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .arch import get_adapter, unwrap_model
from .checks import require_finite
from .losses import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, chunked_causal_lm_loss, output_head, sample_labels
from .runtime import available_memory, model_device, progress as progress_bar

__all__ = [
    "FISHER_KINDS",
    "KFACCollector",
    "KFACFactor",
    "KFACMemoryError",
    "choose_factor_device",
    "collect_lm_kfac",
    "damped",
    "damped_inverse",
    "decoder_linears",
    "factor_bytes",
    "hidden_next_token_loss",
    "next_token_loss",
]

logger = logging.getLogger(__name__)

FISHER_KINDS = ("empirical", "sampled")


class KFACMemoryError(MemoryError):
    """The K-FAC factors do not fit in the memory that is available."""


@dataclass
class KFACFactor:
    """Kronecker factors of one nn.Linear (R outputs, C inputs): F ~= G (x) A on vec(W_aug), W_aug = [W | b].

    Attributes:
        A: (C', C') second moment of the inputs, C' = C + 1 when the layer has a bias (column of ones).
        G: (R, R) second moment of the per-token output gradients.
        has_bias: whether the last row/column of A belongs to the bias.
        n_tokens: calibration tokens the expectations were taken over.
    """

    A: torch.Tensor
    G: torch.Tensor
    has_bias: bool
    n_tokens: int

    def equalize_norms(self) -> "KFACFactor":
        """Rescale A and G to equal Frobenius norm, keeping G (x) A unchanged (in place)."""
        na, ng = torch.linalg.matrix_norm(self.A).item(), torch.linalg.matrix_norm(self.G).item()
        if na > 0 and ng > 0:
            s = math.sqrt(ng / na)
            self.A.mul_(s)
            self.G.div_(s)
        return self


def damped(M: torch.Tensor, damping: float) -> torch.Tensor:
    """M + damping * mean(diag M) * I (a new tensor). A zero matrix is damped with 1 * damping."""
    if damping < 0:
        raise ValueError(f"damping={damping} must be >= 0")
    scale = M.diagonal().mean()
    if not torch.isfinite(scale):
        raise ValueError("the curvature factor holds non-finite values; check the calibration data and the model")
    if scale <= 0:
        scale = torch.ones_like(scale)
    return M + damping * scale * torch.eye(M.shape[0], dtype=M.dtype, device=M.device)


def damped_inverse(M: torch.Tensor, damping: float) -> torch.Tensor:
    """(M + damping * mean(diag M) I)^-1 through a Cholesky factorisation (M symmetric positive semi-definite)."""
    Md = damped(M, damping)
    L, info = torch.linalg.cholesky_ex(Md)
    if int(info) != 0:
        raise ValueError(
            f"damped curvature factor of size {M.shape[0]} is not positive definite (damping={damping}); "
            "use a larger damping"
        )
    return torch.cholesky_inverse(L)


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear of the decoder layers, by qualified module name in the unwrapped model (adapter order)."""
    model = unwrap_model(model)
    ad = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    out: dict[str, nn.Linear] = {}
    for i in range(ad.num_layers):
        for _, lin in ad.linears(i):
            out[names[id(lin)]] = lin
    return out


def factor_bytes(linears: Mapping[str, nn.Linear], dtype: torch.dtype = torch.float32) -> int:
    """Bytes the A and G factors of `linears` take: sum over layers of (C'^2 + R^2) * itemsize."""
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    for lin in linears.values():
        c = lin.in_features + (lin.bias is not None)
        total += (c * c + lin.out_features**2) * item
    return total


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def choose_factor_device(needed: int, device: torch.device, setting: str = "auto",
                         headroom: float = 0.5) -> torch.device:
    """Where to keep the factors: `setting` "auto" keeps them on `device` (the model's) when they take at most
    `headroom` of its free memory, else on the CPU; "cpu" or a device string forces a place. Raises
    KFACMemoryError when the chosen place (or, for "auto", the CPU fallback) cannot hold them."""
    if setting == "auto":
        if device.type != "cpu" and needed <= headroom * available_memory(device):
            return device
        place = torch.device("cpu")
    else:
        place = torch.device(setting)
    free = available_memory(place)
    if needed > free:
        raise KFACMemoryError(
            f"K-FAC factors need {_gib(needed)} but only {_gib(free)} is free on {place}; "
            "prune fewer layers at once, free memory, or use a machine with more memory"
        )
    return place


class KFACCollector:
    """Accumulate K-FAC factors of `modules` over forward/backward passes run by the caller.

    Forward hooks add a a^T of every token's input (bias column of ones appended) to A; hooks on the outputs add
    g g^T of every token's output gradient to G. `token_mask` (a flat bool tensor over batch * time, set before each
    forward) selects which tokens count. The caller backpropagates a loss *summed* over tokens so that g is the
    per-token gradient; `factors()` divides both sums by the token count.

        with KFACCollector(linears) as kc:
            loss = loss_fn(model(x)); loss.backward()
        factors = kc.factors()
    """

    def __init__(self, modules: Mapping[str, nn.Linear], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.modules = dict(modules)
        self.device = torch.device(device)
        self.dtype = dtype
        self.token_mask: torch.Tensor | None = None
        self._A: dict[str, torch.Tensor] = {}
        self._G: dict[str, torch.Tensor] = {}
        self._n: dict[str, int] = {}
        self._handles: list = []

    # ----- hooks ---------------------------------------------------------------------------------
    def _select(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach().reshape(-1, x.shape[-1])
        if self.token_mask is not None:
            m = self.token_mask.reshape(-1).to(x.device)
            if m.numel() != x.shape[0]:
                raise ValueError(f"token_mask has {m.numel()} entries but the layer saw {x.shape[0]} tokens")
            x = x[m.bool()]
        return x.to(self.dtype)

    def _add(self, store: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> None:
        outer = x.T @ x
        if name in store:
            store[name].add_(outer.to(self.device))
        else:
            store[name] = outer.to(self.device, copy=True)

    def _forward_hook(self, name: str, lin: nn.Linear):
        def hook(module, inputs, output):
            a = self._select(inputs[0])
            if lin.bias is not None:
                a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
            self._add(self._A, name, a)
            self._n[name] = self._n.get(name, 0) + a.shape[0]
            if output.requires_grad:
                output.register_hook(lambda grad: self._add(self._G, name, self._select(grad)))

        return hook

    def __enter__(self) -> "KFACCollector":
        for name, lin in self.modules.items():
            self._handles.append(lin.register_forward_hook(self._forward_hook(name, lin)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # ----- result ----------------------------------------------------------------------------------
    def factors(self, equalize: bool = True) -> dict[str, KFACFactor]:
        """Expectations A = sum a a^T / N, G = sum g g^T / N per module (N its token count)."""
        out: dict[str, KFACFactor] = {}
        for name, lin in self.modules.items():
            n = self._n.get(name, 0)
            if n == 0 or name not in self._G:
                raise RuntimeError(
                    f"{name} saw no tokens with an output gradient; run forward and backward through it "
                    "(is the loss connected to this layer, and does the batch hold unmasked tokens?)"
                )
            f = KFACFactor(A=self._A[name] / n, G=self._G[name] / n, has_bias=lin.bias is not None, n_tokens=n)
            m = re.search(r"layers\.(\d+)\.", name)
            for what, t in (("A (input activations)", f.A), ("G (output gradients)", f.G)):
                require_finite(t, method="K-FAC", stage=None, layer=int(m.group(1)) if m else None,
                               what=f"the factor {what} of {name}")
            out[name] = f.equalize_norms() if equalize else f
        return out


def next_token_loss(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                    labels: torch.Tensor | None = None, fisher: str = "empirical",
                    generator: torch.Generator | None = None) -> torch.Tensor:
    """Sum over predicted tokens of -log p(target | prefix).

    Targets are `labels` shifted (or `input_ids` shifted, padding ignored) for the empirical Fisher, or samples from
    the model's own softmax at every position for `fisher="sampled"` (the true Fisher).
    """
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher={fisher!r}; valid: {FISHER_KINDS}")
    logits = logits[:, :-1].float()
    target = (labels if labels is not None else input_ids)[:, 1:].clone()
    if labels is None and attention_mask is not None:
        target[attention_mask[:, 1:] == 0] = -100
    if fisher == "sampled":
        with torch.no_grad():
            probs = torch.softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
            sampled = torch.multinomial(probs, 1, generator=generator).view_as(target)
        target = torch.where(target == -100, target, sampled)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction="sum")


def hidden_next_token_loss(hidden: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor],
                           input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           labels: torch.Tensor | None = None, fisher: str = "empirical",
                           generator: torch.Generator | None = None,
                           chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """`next_token_loss` from the final hidden states (batch, seq, d) and the head (`hf_prune.losses.output_head`),
    the logits made `chunk_tokens` tokens at a time for the loss, its backward and the sampled labels alike."""
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher={fisher!r}; valid: {FISHER_KINDS}")
    target = (labels if labels is not None else input_ids).clone()
    if labels is None and attention_mask is not None:
        target[attention_mask == 0] = IGNORE_INDEX
    if fisher == "sampled":
        sampled = sample_labels(hidden.detach(), head, generator=generator, chunk_tokens=chunk_tokens)
        target = torch.where(target == IGNORE_INDEX, target, sampled.to(target.device))
    return chunked_causal_lm_loss(hidden, head, target, chunk_tokens=chunk_tokens, reduction="sum")


def collect_lm_kfac(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], fisher: str = "empirical",
                    factor_device: str = "auto", seed: int = 0, linears: Mapping[str, nn.Linear] | None = None,
                    progress: bool = True, log: Callable[[str], None] | None = None,
                    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS) -> dict[str, KFACFactor]:
    """K-FAC factors of every decoder nn.Linear of a causal LM from the next-token loss on `batches`.

    Each batch is a dict with `input_ids` and optionally `attention_mask` and `labels`. The model runs in eval mode
    with every parameter's requires_grad switched off for the pass (no parameter gradients are computed or left
    behind), both restored afterwards; only activation gradients flow, started at the embedding output. The memory
    the factors need is reported through `log` (default: this module's logger at INFO). The loss runs on the
    backbone's final hidden states with the logits made `chunk_tokens` tokens at a time (`hidden_next_token_loss`),
    so no step holds all tokens' logits.
    """
    log = log if log is not None else logger.info
    model = unwrap_model(model)
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher={fisher!r}; valid: {FISHER_KINDS}")
    linears = dict(linears) if linears is not None else decoder_linears(model)
    ad = get_adapter(model)
    head = output_head(ad)
    dev = model_device(model)
    needed = factor_bytes(linears)
    place = choose_factor_device(needed, dev, factor_device)
    log(f"K-FAC: {len(linears)} linear layers, factors need {_gib(needed)} (fp32), kept on {place}; "
        f"the backward pass needs activation memory like one training step")
    batches = list(batches)
    if not batches:
        raise ValueError("collect_lm_kfac needs at least one calibration batch")

    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    gen = torch.Generator(device=dev).manual_seed(seed) if fisher == "sampled" else None

    def start_graph(module, inputs, output):  # gradients must flow although no parameter requires them
        return output.requires_grad_(True) if not output.requires_grad else output

    embed_hook = ad.embed_tokens.register_forward_hook(start_graph)
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        with KFACCollector(linears, device=place) as kc, torch.enable_grad():
            for batch in progress_bar(batches, desc=f"K-FAC ({fisher} Fisher)", enabled=progress):
                ids = batch["input_ids"].to(dev)
                mask = batch.get("attention_mask")
                mask = mask.to(dev) if mask is not None else None
                labels = batch.get("labels")
                labels = labels.to(dev) if labels is not None else None
                kc.token_mask = mask.reshape(-1).bool() if mask is not None else None
                hidden = ad.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                loss = hidden_next_token_loss(hidden, head, ids, mask, labels, fisher, gen, chunk_tokens)
                require_finite(loss.detach(), method="K-FAC", stage=None, layer=None, what="the calibration loss")
                loss.backward()
                del hidden, loss
            factors = kc.factors()
    finally:
        embed_hook.remove()
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)
    return factors
