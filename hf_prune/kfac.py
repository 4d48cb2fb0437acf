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
    "FactorStore",
    "choose_factor_device",
    "collect_lm_kfac",
    "damped",
    "damped_inverse",
    "decoder_linears",
    "factor_bytes",
    "hidden_next_token_loss",
    "iter_lm_kfac",
    "layer_groups",
    "next_token_loss",
]

logger = logging.getLogger(__name__)

FISHER_KINDS = ("empirical", "sampled")


class KFACMemoryError(MemoryError):
    """The K-FAC factors do not fit in the memory that is available."""


class KFACFactor:
    """Kronecker factors of one nn.Linear (R outputs, C inputs): F ~= G (x) A on vec(W_aug), W_aug = [W | b].

    Attributes:
        A: (C', C') second moment of the inputs, C' = C + 1 when the layer has a bias (column of ones), times `scale`.
        G: (R, R) second moment of the per-token output gradients, divided by `scale`.
        has_bias: whether the last row/column of A belongs to the bias.
        n_tokens: calibration tokens the expectations were taken over.
        scale: the equal-norm rescaling (1 until `equalize_norms`). It is kept apart from the stored moments so that
            linears reading the same input (q/k/v; gate/up) can share one stored A: `A` and `G` return scaled
            copies, `dense(dtype, device)` scaled copies in the dtype of the algebra.
    """

    def __init__(self, A: torch.Tensor, G: torch.Tensor, has_bias: bool, n_tokens: int, scale: float = 1.0):
        self.A_moment, self.G_moment = A, G
        self.has_bias, self.n_tokens, self.scale = has_bias, n_tokens, float(scale)

    @property
    def A(self) -> torch.Tensor:
        return self.A_moment if self.scale == 1.0 else self.A_moment * self.scale

    @property
    def G(self) -> torch.Tensor:
        return self.G_moment if self.scale == 1.0 else self.G_moment / self.scale

    def dense(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """(G, A) as new tensors in `dtype` on `device`, rescaled: the stored moments stay as they are (float32),
        only one linear's factors are upcast at a time."""
        G = self.G_moment.to(device=device, dtype=dtype, copy=True)
        A = self.A_moment.to(device=device, dtype=dtype, copy=True)
        if self.scale != 1.0:
            G.div_(self.scale)
            A.mul_(self.scale)
        return G, A

    def equalize_norms(self) -> "KFACFactor":
        """Rescale A and G to equal Frobenius norm, keeping G (x) A unchanged (sets `scale`; idempotent)."""
        na = torch.linalg.matrix_norm(self.A_moment).item()
        ng = torch.linalg.matrix_norm(self.G_moment).item()
        self.scale = math.sqrt(ng / na) if na > 0 and ng > 0 else 1.0
        return self

    def __repr__(self) -> str:
        return (f"KFACFactor(A={tuple(self.A_moment.shape)}, G={tuple(self.G_moment.shape)}, "
                f"has_bias={self.has_bias}, n_tokens={self.n_tokens}, scale={self.scale:.4g})")


def damp_(M: torch.Tensor, damping: float) -> torch.Tensor:
    """M += damping * mean(diag M) * I, in place (no second copy); returns M. A zero matrix is damped with
    1 * damping."""
    if damping < 0:
        raise ValueError(f"damping={damping} must be >= 0")
    scale = M.diagonal().mean()
    if not torch.isfinite(scale):
        raise ValueError("the curvature factor holds non-finite values; check the calibration data and the model")
    if scale <= 0:
        scale = torch.ones_like(scale)
    M.diagonal().add_(damping * scale)
    return M


def damped(M: torch.Tensor, damping: float) -> torch.Tensor:
    """M + damping * mean(diag M) * I (a new tensor). A zero matrix is damped with 1 * damping."""
    return damp_(M.clone(), damping)


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


SHARED_INPUTS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))  # read the same tensor in a layer


def factor_bytes(linears: Mapping[str, nn.Linear], dtype: torch.dtype = torch.float32,
                 share_inputs: bool = False) -> int:
    """Bytes the A and G factors of `linears` take: sum over layers of (C'^2 + R^2) * itemsize. With `share_inputs`,
    one A for the q/k/v projections and one for gate/up of the same layer (named `...layers.<i>.<part>.<short>`),
    as `KFACCollector` stores them."""
    item = torch.empty((), dtype=dtype).element_size()
    total = 0
    seen: set[tuple[str, int]] = set()
    for name, lin in linears.items():
        c = lin.in_features + (lin.bias is not None)
        total += lin.out_features**2 * item
        prefix, _, short = name.rpartition(".")
        key = next(((prefix.rpartition(".")[0], k) for k, g in enumerate(SHARED_INPUTS) if short in g), None)
        if share_inputs and key is not None:
            if (key, c) in seen:
                continue
            seen.add((key, c))
        total += c * c * item
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
                 dtype: torch.dtype = torch.float32, share_inputs: bool = True):
        self.modules = dict(modules)
        self.device = torch.device(device)
        self.dtype = dtype
        self.share_inputs = share_inputs
        self.token_mask: torch.Tensor | None = None
        self._A: dict[str, torch.Tensor] = {}
        self._G: dict[str, torch.Tensor] = {}
        self._n: dict[str, int] = {}
        self._handles: list = []
        self.leader: dict[str, str] = {}  # linear -> the linear whose A it shares (itself when it owns one)
        self._last: tuple[torch.Tensor, str, nn.Linear] | None = None  # the last input seen, its owner

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

    def _owner(self, name: str, lin: nn.Linear, x: torch.Tensor) -> str:
        """Which linear's A `name` accumulates into: a linear called on the very tensor the previous hooked linear
        read (q/k/v on the normed stream; gate/up), with the same bias layout, shares that linear's A. Decided at the
        first forward and checked at every later one."""
        last, self._last = self._last, None
        same = (self.share_inputs and last is not None and last[0] is x
                and (last[2].bias is None) == (lin.bias is None))
        owner = last[1] if same else name
        if name not in self.leader:
            self.leader[name] = owner
        elif self.leader[name] != owner:
            raise RuntimeError(
                f"{name} read the same input as {self.leader[name]} in an earlier pass but not in this one (or the "
                "other way round); collect its factors with share_inputs=False")
        self._last = (x, owner, lin)
        return owner

    def _forward_hook(self, name: str, lin: nn.Linear):
        def hook(module, inputs, output):
            owner = self._owner(name, lin, inputs[0])
            if owner == name:
                a = self._select(inputs[0])
                if lin.bias is not None:
                    a = torch.cat([a, a.new_ones(a.shape[0], 1)], dim=1)
                self._add(self._A, name, a)
                n = a.shape[0]
            else:
                n = int(self.token_mask.sum()) if self.token_mask is not None else inputs[0].reshape(
                    -1, inputs[0].shape[-1]).shape[0]
            self._n[name] = self._n.get(name, 0) + n
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
        self._last = None

    # ----- result ----------------------------------------------------------------------------------
    def factors(self, equalize: bool = True) -> dict[str, KFACFactor]:
        """Expectations A = sum a a^T / N, G = sum g g^T / N per module (N its token count). Linears that read the
        same input share one A tensor. The sums are divided in place and handed over: call it once."""
        out: dict[str, KFACFactor] = {}
        for name, A in self._A.items():
            A.div_(max(self._n.get(name, 0), 1))
        for name, lin in self.modules.items():
            n = self._n.get(name, 0)
            owner = self.leader.get(name, name)
            if n == 0 or name not in self._G or owner not in self._A:
                raise RuntimeError(
                    f"{name} saw no tokens with an output gradient; run forward and backward through it "
                    "(is the loss connected to this layer, and does the batch hold unmasked tokens?)"
                )
            if owner != name and self._n[owner] != n:
                raise RuntimeError(f"{name} shares the input of {owner} but saw {n} tokens, not {self._n[owner]}")
            f = KFACFactor(A=self._A[owner], G=self._G.pop(name).div_(n), has_bias=lin.bias is not None, n_tokens=n)
            m = re.search(r"layers\.(\d+)\.", name)
            for what, t in (("A (input activations)", f.A), ("G (output gradients)", f.G)):
                require_finite(t, method="K-FAC", stage=None, layer=int(m.group(1)) if m else None,
                               what=f"the factor {what} of {name}")
            out[name] = f.equalize_norms() if equalize else f
        self._A.clear()
        self._n.clear()
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


def layer_groups(model: nn.Module, linears: Mapping[str, nn.Linear], max_bytes: int | None
                 ) -> list[list[str]]:
    """Split `linears` into groups of consecutive decoder layers whose factors (float32, A shared within a layer)
    take at most `max_bytes` each (None: one group): as few groups as the budget allows, as even as the layers allow
    (the largest group as small as it can be with that many groups). A layer is never split, so a group holds at
    least one layer. Linears outside the decoder layers go with the first group."""
    ad = get_adapter(unwrap_model(model))
    layer_of = {id(lin): i for i in range(ad.num_layers) for _, lin in ad.linears(i)}
    by_layer: dict[int, dict[str, nn.Linear]] = {}
    for name, lin in linears.items():
        by_layer.setdefault(layer_of.get(id(lin), -1), {})[name] = lin
    order = sorted(by_layer)
    sizes = [factor_bytes(by_layer[i], share_inputs=True) for i in order]

    def pack(cap: float) -> list[list[int]]:
        out: list[list[int]] = []
        size = 0
        for k, b in enumerate(sizes):
            if not out or (size + b > cap and order[k] >= 0):
                out.append([])
                size = 0
            out[-1].append(k)
            size += b
        return out

    if max_bytes is None:
        packed = [list(range(len(sizes)))]
    else:
        packed = pack(max_bytes)  # the fewest groups within the budget (greedy is optimal for consecutive runs)
        lo, hi = max(sizes), max(max_bytes, max(sizes))
        for _ in range(40):  # the smallest cap that still needs no more groups: even groups
            mid = (lo + hi) / 2
            if len(pack(mid)) <= len(packed):
                hi = mid
            else:
                lo = mid
        if len(pack(hi)) <= len(packed):
            packed = pack(hi)
    return [[n for k in grp for n in by_layer[order[k]]] for grp in packed]


def _first_layer(model: nn.Module, names: list[str], linears: Mapping[str, nn.Linear]) -> int:
    ad = get_adapter(unwrap_model(model))
    ids = {id(linears[n]) for n in names}
    for i in range(ad.num_layers):
        if any(id(lin) in ids for _, lin in ad.linears(i)):
            return i
    return -1


def _micro_batches(batch: Mapping[str, torch.Tensor], size: int | None):
    n = batch["input_ids"].shape[0]
    if size is None or size >= n:
        yield batch
        return
    for s in range(0, n, size):
        yield {k: (v[s:s + size] if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == n else v)
               for k, v in batch.items()}


def iter_lm_kfac(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], fisher: str = "empirical",
                 factor_device: str = "auto", seed: int = 0, linears: Mapping[str, nn.Linear] | None = None,
                 progress: bool = True, log: Callable[[str], None] | None = None,
                 chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS, max_factor_bytes: int | None = None,
                 micro_batch_size: int | None = None):
    """`collect_lm_kfac` one group of layers at a time: yields a dict {name: KFACFactor} per group of consecutive
    decoder layers whose factors fit in `max_factor_bytes` (`layer_groups`; None: one group of every linear). Each
    group costs one forward and backward pass over `batches`; the backward starts at the loss and stops at the
    group's first layer (the graph starts at that layer's input), and only the group's factors are resident. Drop a
    group's dict before asking for the next to keep it so. `micro_batch_size` splits every batch into that many
    sequences per pass (the sums are the same; activation memory of the backward scales with it). The sampled
    Fisher draws the same labels in every group's pass (the generator is re-seeded)."""
    log = log if log is not None else logger.info
    model = unwrap_model(model)
    if fisher not in FISHER_KINDS:
        raise ValueError(f"fisher={fisher!r}; valid: {FISHER_KINDS}")
    if micro_batch_size is not None and micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size}; need at least 1 (or None: the batches as given)")
    linears = dict(linears) if linears is not None else decoder_linears(model)
    ad = get_adapter(model)
    head = output_head(ad)
    dev = model_device(model)
    groups = layer_groups(model, linears, max_factor_bytes)
    needed = max(factor_bytes({n: linears[n] for n in g}, share_inputs=True) for g in groups)
    place = choose_factor_device(needed, dev, factor_device)
    log(f"K-FAC: {len(linears)} linear layers in {len(groups)} pass(es), factors need {_gib(needed)} (fp32, one input "
        f"factor per shared input) at a time, of {_gib(factor_bytes(linears, share_inputs=True))} in all, kept on "
        f"{place}; the backward pass needs activation memory like one training step")
    batches = list(batches)
    if not batches:
        raise ValueError("collect_lm_kfac needs at least one calibration batch")

    def start_graph(module, inputs, output):  # gradients must flow although no parameter requires them
        return output.requires_grad_(True) if not output.requires_grad else output

    def start_graph_at_layer(module, args, kwargs):  # the layers below the group keep no activations
        if args:
            return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
        return args, kwargs

    was_training = model.training
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for gi, names in enumerate(groups):
            first = _first_layer(model, names, linears)
            hook = (ad.embed_tokens.register_forward_hook(start_graph) if first <= 0 else
                    ad.layer(first).register_forward_pre_hook(start_graph_at_layer, with_kwargs=True))
            gen = torch.Generator(device=dev).manual_seed(seed) if fisher == "sampled" else None
            desc = f"K-FAC ({fisher} Fisher)" + (f", pass {gi + 1}/{len(groups)}" if len(groups) > 1 else "")
            try:
                with KFACCollector({n: linears[n] for n in names}, device=place) as kc, torch.enable_grad():
                    for big in progress_bar(batches, desc=desc, enabled=progress):
                        for batch in _micro_batches(big, micro_batch_size):
                            ids = batch["input_ids"].to(dev)
                            mask = batch.get("attention_mask")
                            mask = mask.to(dev) if mask is not None else None
                            labels = batch.get("labels")
                            labels = labels.to(dev) if labels is not None else None
                            kc.token_mask = mask.reshape(-1).bool() if mask is not None else None
                            hidden = ad.backbone(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                            loss = hidden_next_token_loss(hidden, head, ids, mask, labels, fisher, gen, chunk_tokens)
                            require_finite(loss.detach(), method="K-FAC", stage=None, layer=None,
                                           what="the calibration loss")
                            loss.backward()
                            del hidden, loss
                    factors = kc.factors()
            finally:
                hook.remove()
            yield factors
            del factors
    finally:
        for p, f in flags.items():
            p.requires_grad_(f)
        model.train(was_training)


def collect_lm_kfac(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], fisher: str = "empirical",
                    factor_device: str = "auto", seed: int = 0, linears: Mapping[str, nn.Linear] | None = None,
                    progress: bool = True, log: Callable[[str], None] | None = None,
                    chunk_tokens: int | None = DEFAULT_CHUNK_TOKENS, micro_batch_size: int | None = None
                    ) -> dict[str, KFACFactor]:
    """K-FAC factors of every decoder nn.Linear of a causal LM from the next-token loss on `batches`.

    Each batch is a dict with `input_ids` and optionally `attention_mask` and `labels`. The model runs in eval mode
    with every parameter's requires_grad switched off for the pass (no parameter gradients are computed or left
    behind), both restored afterwards; only activation gradients flow, started at the embedding output. The memory
    the factors need is reported through `log` (default: this module's logger at INFO). The loss runs on the
    backbone's final hidden states with the logits made `chunk_tokens` tokens at a time (`hidden_next_token_loss`),
    so no step holds all tokens' logits. Linears reading the same input (q/k/v, gate/up) share one A tensor. To keep
    only some layers' factors resident at a time, use `iter_lm_kfac` with `max_factor_bytes`.
    """
    out: dict[str, KFACFactor] = {}
    for group in iter_lm_kfac(model, batches, fisher=fisher, factor_device=factor_device, seed=seed, linears=linears,
                              progress=progress, log=log, chunk_tokens=chunk_tokens,
                              micro_batch_size=micro_batch_size):
        out.update(group)
    return out


class FactorStore:
    """K-FAC factors by linear name, kept in memory or, with `spill=True`, written to one file per linear in a
    temporary folder (`directory`, default the system's) and read back on `get`, so that only the factors in use are
    resident. Use as a context manager; the folder is deleted on exit."""

    def __init__(self, spill: bool = False, directory: str | None = None):
        self.spill = spill
        self._mem: dict[str, KFACFactor] = {}
        self._files: dict[str, str] = {}
        self._dir = None
        if spill:
            import tempfile

            self._dir = tempfile.TemporaryDirectory(prefix="hf_prune_kfac_", dir=directory)

    def put(self, name: str, f: KFACFactor) -> None:
        if not self.spill:
            self._mem[name] = f
            return
        import os

        path = os.path.join(self._dir.name, f"{len(self._files)}.pt")
        torch.save({"A": f.A_moment, "G": f.G_moment, "has_bias": f.has_bias, "n_tokens": f.n_tokens,
                    "scale": f.scale}, path)
        self._files[name] = path

    def get(self, name: str, device: torch.device | str | None = None) -> KFACFactor:
        if not self.spill:
            return self._mem[name]
        d = torch.load(self._files[name], map_location=device, weights_only=True)
        return KFACFactor(d["A"], d["G"], d["has_bias"], d["n_tokens"], d["scale"])

    @property
    def directory(self) -> str | None:
        """The folder the factors are spilled to (None when they stay in memory)."""
        return self._dir.name if self._dir is not None else None

    def __contains__(self, name: str) -> bool:
        return name in self._mem or name in self._files

    def close(self) -> None:
        self._mem.clear()
        self._files.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> "FactorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
