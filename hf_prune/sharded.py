"""Pruning a model that is sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`), between two training stages.

Shapes never change inside a sharded step: a sharded parameter is a DTensor whose shards live on different ranks,
and the FSDP2 groups, the optimizer's per-parameter state and accelerate's bookkeeping are all built for one set of
shapes. A stage therefore runs between two `train()` calls, on gathered weights:

    stage = prune_sharded(model, optimizer, stage_fn)   # collective: every rank calls it
        1. gather   the full weights to the main process's CPU (`get_model_state_dict(full_state_dict=True,
                    cpu_offload=True)`: one parameter at a time is all-gathered on the device, then moved to the
                    host; the other ranks receive nothing) and the optimizer state the same way; a plain,
                    unsharded copy of the model is built there (a LoRA adapter merged into it);
        2. prune    `stage_fn(plain_copy)` runs on the main process only (hf_prune.pipeline.run_stage through the
                    callback); what it returns is broadcast, errors included, so no rank is left in a collective;
        3. share    every other rank builds the pruned architecture from the broadcast config with empty weights
                    (or, `full_copies=True`, receives every weight: needed when the re-shard reads each rank's own
                    copy); the architecture is checked against the main process's, name by name;
        4. carry    the optimizer state of every parameter that survived unchanged is kept under its new name
                    (removed or cut parameters, and LoRA adapters re-created after the merge, start fresh; the
                    reason is logged).

    then either `trainer.model = stage.model` and the next `train()` shards it (accelerate's FSDP2 plugin with
    `cpu_ram_efficient_loading`: the main process's weights are broadcast into the new shards), or, in a hand-written
    loop, `sharded = shard_pruned(stage.model)`; and in both `load_optimizer_state(sharded, optimizer,
    stage.optimizer_state)` once the new optimizer exists.

Memory: before each step its need is logged (`MemoryStep`): the gather holds the full weights (and the full
optimizer state) in the main process's host memory, never on a device; scoring runs on that host copy, a
layer-by-layer method (`is_layerwise`) with the embeddings, final norm and head plus one decoder layer at a time on
the device (`scoring_placement`); re-sharding holds one full tensor at a time on the device.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from .arch import get_adapter, unwrap_model
from .runtime import available_memory

__all__ = [
    "LAYERWISE_METHODS",
    "MemoryStep",
    "ShardedStage",
    "broadcast_from_main",
    "carry_state_by_name",
    "comm_device",
    "gather_full_model",
    "gather_to_main",
    "is_fsdp2",
    "is_layerwise",
    "load_full_weights",
    "load_optimizer_state",
    "optimizer_gather_problem",
    "prune_sharded",
    "raise_on_every_rank",
    "scoring_memory",
    "scoring_placement",
    "shard_model",
    "shard_pruned",
    "sharded_device",
]

logger = logging.getLogger(__name__)

GiB = 1024**3

#: methods whose scoring runs layer by layer (hf_prune.calibration.LayerwiseRunner): on a gathered host copy they
#: need only the embeddings, the final norm and head, one decoder layer and the activations on the device. Every
#: other method runs whole forward (and backward) passes and scores on the host copy where it lies.
LAYERWISE_METHODS = ("shortgpt", "iterabre", "slicegpt", "dynamic_slicing")


# ---------------------------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------------------------


def _dist() -> Any:
    return torch.distributed


def _world() -> int:
    d = _dist()
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def _rank() -> int:
    d = _dist()
    return d.get_rank() if d.is_available() and d.is_initialized() else 0


def is_fsdp2(model: nn.Module) -> bool:
    """True when `model` or one of its submodules was sharded with FSDP2's `fully_shard`."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def sharded_device(model: nn.Module) -> torch.device:
    """The device a sharded model's local shards live on (where a layer-by-layer scoring pass should run)."""
    p = next(iter(model.parameters()), None)
    if p is None:
        return torch.device("cpu")
    local = p.to_local() if hasattr(p, "to_local") else p
    return local.device


def comm_device() -> torch.device:
    """Where tensors must be for a collective of the default process group: the current CUDA device under NCCL,
    the CPU under gloo."""
    d = _dist()
    if d.is_available() and d.is_initialized() and "nccl" in str(d.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_from_main(value: Any) -> Any:
    """`value` of the main process (rank 0) on every rank (pickled; for small objects: plans, configs, specs)."""
    if _world() == 1:
        return value
    box = [value if _rank() == 0 else None]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def raise_on_every_rank(error: BaseException | None) -> None:
    """Collective: raise the main process's `error` there and a RuntimeError naming it on every other rank (so that
    no rank is left waiting in the next collective); nothing when the main process had none."""
    message = broadcast_from_main(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"pruning failed on the main process: {message}")


def _nbytes(tensors: Iterator[torch.Tensor] | Sequence[torch.Tensor]) -> int:
    """Bytes of `tensors`, a tensor shared by several names (tied embeddings) counted once."""
    seen: set[Any] = set()
    total = 0
    for t in tensors:
        plain = not hasattr(t, "to_local") and t.device.type != "meta" and t.data_ptr() != 0
        key = (t.device, t.data_ptr(), tuple(t.shape)) if plain else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return int(total)


@dataclass
class MemoryStep:
    """What one step of a sharded stage needs, logged before it starts."""

    step: str
    where: str
    nbytes: int

    def message(self) -> str:
        return f"sharded prune: {self.step} needs ~{self.nbytes / GiB:.3f} GiB on {self.where}"

    def record(self) -> dict[str, float]:
        return {f"prune/memory_gib/{self.step}": round(self.nbytes / GiB, 6)}


def _announce(step: MemoryStep, steps: list[MemoryStep], log: Callable[[str], None]) -> None:
    steps.append(step)
    if _rank() == 0:
        log(step.message())


# ---------------------------------------------------------------------------------------------------------------------
# building plain (unsharded) models
# ---------------------------------------------------------------------------------------------------------------------


def _is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, persistent: bool = True) -> None:
    parent, _, leaf = name.rpartition(".")
    owner = module.get_submodule(parent) if parent else module
    if leaf in dict(owner.named_parameters(recurse=False)):
        owner.register_parameter(leaf, nn.Parameter(value, requires_grad=getattr(owner, leaf).requires_grad))
    else:
        owner.register_buffer(leaf, value, persistent=persistent)


def _non_persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers that are not in the state dict (rotary frequencies): the skeleton cannot get them from the weights."""
    persistent = set(model.state_dict().keys())
    return {n: b.detach().to("cpu").clone() for n, b in model.named_buffers() if n not in persistent}


def _skeleton(config: Any, spec: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
              buffers: Mapping[str, torch.Tensor]) -> nn.Module:
    """A model of `config`'s architecture on the CPU with uninitialised weights of the shapes and dtypes in `spec`
    (name -> (shape, dtype), the state dict of the model it must match) and the given non-persistent buffers.

    Raises RuntimeError naming the first difference when the built architecture does not match `spec`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.to_empty(device="cpu")
    for name, b in buffers.items():
        _set_tensor(model, name, b.clone(), persistent=False)
    mine = {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}
    missing, extra = sorted(set(spec) - set(mine)), sorted(set(mine) - set(spec))
    if missing or extra:
        raise RuntimeError(f"the model rebuilt from the pruned config differs from the main process's: missing "
                           f"{missing[:5]}, unexpected {extra[:5]} (config class {type(config).__name__})")
    for name, (shape, dtype) in spec.items():
        if tuple(mine[name][0]) != tuple(shape):
            raise RuntimeError(f"the model rebuilt from the pruned config has {name} of shape {mine[name][0]}; the "
                               f"main process's is {tuple(shape)}")
        if mine[name][1] != dtype:
            _set_tensor(model, name, torch.empty(shape, dtype=dtype))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def _state_spec(model: nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {n: (tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}


def _plain_copy(sharded: nn.Module, full_sd: dict[str, torch.Tensor], buffers: Mapping[str, torch.Tensor]) -> nn.Module:
    """The unsharded model (main process): the sharded model's architecture with the gathered weights (the tensors of
    `full_sd` themselves, no second copy); a PEFT model comes back merged (`merge_and_unload`)."""
    base = unwrap_model(sharded)
    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        plain = AutoModelForCausalLM.from_config(base.config)
    plain.to_empty(device="cpu")
    if _is_peft(sharded):
        from peft import get_peft_model

        name = sharded.active_adapter
        plain = get_peft_model(plain, sharded.peft_config[name], adapter_name=name)
    for n, b in buffers.items():
        _set_tensor(plain, n, b.clone(), persistent=False)
    result = plain.load_state_dict(full_sd, strict=False, assign=True)
    tied = {n for n in result.missing_keys if n.endswith("lm_head.weight")}
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise RuntimeError(f"the gathered weights do not fit the model's architecture: missing {missing[:5]}, "
                           f"unexpected {result.unexpected_keys[:5]}")
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    if _is_peft(plain):
        plain = plain.merge_and_unload()
    return plain


# ---------------------------------------------------------------------------------------------------------------------
# 1. gather
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Gathered:
    """The main process's unsharded copy of a sharded model (None on the other ranks) and what came with it."""

    model: nn.Module | None
    optimizer_state: dict[str, dict[str, Any]] | None  # parameter name -> its optimizer state (main process)
    names: dict[nn.Parameter, str]  # parameter of `model` -> its name before the stage (main process)
    peft_config: Any  # the LoRA config of a PEFT model (merged into `model`), else None
    device: torch.device  # where the sharded model's shards live: where layer-by-layer scoring runs
    memory: list[MemoryStep] = field(default_factory=list)
    optimizer_dropped: str | None = None  # why the optimizer state was not gathered (None: gathered, or none given)


def optimizer_gather_problem(state_bytes: int, weight_bytes: int, host_bytes: int) -> str | None:
    """Why the full optimizer state cannot be gathered next to the full weights on a host with `host_bytes` free
    (None when it fits)."""
    if state_bytes + weight_bytes <= host_bytes:
        return None
    return (f"gathering it needs {state_bytes / GiB:.2f} GiB next to the {weight_bytes / GiB:.2f} GiB of weights on "
            f"the main process's host, which has {host_bytes / GiB:.2f} GiB free; the new optimizer starts fresh "
            "(raise the host memory, or shard over more nodes' hosts by pruning offline)")


def gather_to_main(model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                   log: Callable[[str], None] = logger.info, max_host_bytes: int | None = None) -> Gathered:
    """Collective: the full weights (and full optimizer state) of the FSDP2-sharded `model` on the main process's
    CPU, as a plain model (a LoRA adapter merged). Every rank must call it. The optimizer state is left out, with
    the reason logged, when it would not fit next to the weights in `max_host_bytes` (default: the main process's
    free host memory, hf_prune.runtime.available_memory)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)

    steps: list[MemoryStep] = []
    peft_config = None
    if _is_peft(model):
        import copy

        peft_config = copy.deepcopy(model.peft_config[model.active_adapter])
    if not is_fsdp2(model):  # not sharded yet (a stage before the first train()): the main process's copy is it
        plain = None
        if _rank() == 0:
            plain = model.merge_and_unload() if _is_peft(model) else unwrap_model(model)
        names = {p: n for n, p in plain.named_parameters()} if plain is not None else {}
        return Gathered(plain, None, names, peft_config, sharded_device(model), steps)
    full_bytes = _nbytes(list(model.parameters()))  # a DTensor's numel is the global one
    _announce(MemoryStep("gather_weights", "the main process's host (CPU)", full_bytes), steps, log)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    full_sd = get_model_state_dict(model, options=options)
    osd, problem = None, None
    if optimizer is not None:
        state_bytes = sum(_nbytes([v for v in st.values() if torch.is_tensor(v) and v.dim() > 0])
                          for st in optimizer.state.values())
        problem = None
        if _rank() == 0:
            host = available_memory("cpu") + full_bytes if max_host_bytes is None else max_host_bytes
            problem = optimizer_gather_problem(state_bytes, full_bytes, host)
        problem = broadcast_from_main(problem)  # every rank takes part in the gather, or none does
        if problem is None:
            _announce(MemoryStep("gather_optimizer_state", "the main process's host (CPU)", state_bytes), steps, log)
            osd = get_optimizer_state_dict(model, optimizer, options=options)
        elif _rank() == 0:
            log(f"sharded prune: optimizer state dropped: {problem}")
    plain, names, state, error = None, {}, None, None
    if _rank() == 0:
        try:
            plain = _plain_copy(model, full_sd, _non_persistent_buffers(model))
            names = {p: n for n, p in plain.named_parameters()}
        except Exception as e:  # raised on every rank by `raise_on_every_rank`, not left behind in a collective
            error = e
        if osd is not None:
            state = dict(osd.get("state", {}))
    del full_sd, osd
    raise_on_every_rank(error)
    return Gathered(plain, state, names, peft_config, sharded_device(model), steps,
                    problem if optimizer is not None else None)


# ---------------------------------------------------------------------------------------------------------------------
# 2. scoring on the gathered copy
# ---------------------------------------------------------------------------------------------------------------------


def is_layerwise(method: Any) -> bool:
    """True for methods that score layer by layer (LAYERWISE_METHODS, or a method with `layerwise = True`)."""
    flag = getattr(method, "layerwise", None)
    if isinstance(flag, bool):
        return flag
    return getattr(method, "name", None) in LAYERWISE_METHODS


def _outside_layers(model: nn.Module) -> Iterator[tuple[nn.Module, str, torch.Tensor, bool]]:
    """(owner module, name, tensor, is_parameter) for every parameter and buffer that is not inside a decoder layer."""
    layers = get_adapter(model).layers
    inside = {id(m) for m in layers.modules()}
    seen: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        for name, p in module.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                yield module, name, p, True
        for name, b in module.named_buffers(recurse=False):
            if b is not None and id(b) not in seen:
                seen.add(id(b))
                yield module, name, b, False


@contextmanager
def scoring_placement(model: nn.Module, device: torch.device | str) -> Iterator[nn.Module]:
    """Everything but the decoder layers of the host copy `model` on `device` for the duration of the block
    (embeddings, final norm, head, rotary buffers): a LayerwiseRunner then follows the embeddings to `device` and
    moves one decoder layer at a time there. Parameters keep their identity (their `.data` moves), so surgery
    afterwards still recognises every survivor."""
    device = torch.device(device)
    moved: list[tuple[nn.Module, str, torch.Tensor, bool, torch.device]] = []
    try:
        for owner, name, t, is_param in _outside_layers(model):
            if t.device == device:
                continue
            moved.append((owner, name, t, is_param, t.device))
            if is_param:
                t.data = t.data.to(device)
            else:
                setattr(owner, name, t.to(device))
        yield model
    finally:
        for owner, name, t, is_param, home in moved:
            if is_param:
                t.data = t.data.to(home)
            else:
                setattr(owner, name, getattr(owner, name).to(home))
        # what scoring created or replaced on the device (a rotation's new weights) goes to the host copy too
        home = moved[0][4] if moved else torch.device("cpu")
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if p.device == device:
                    p.data = p.data.to(home)
            for name, b in module.named_buffers(recurse=False):
                if b is not None and b.device == device:
                    setattr(module, name, b.to(home))


def scoring_memory(model: nn.Module, method: Any, batches: Sequence[Mapping[str, torch.Tensor]],
                   device: torch.device | str) -> MemoryStep:
    """What scoring `model` (the gathered host copy) needs: layer by layer, the modules outside the decoder layers,
    the largest layer and the calibration activations (two streams of hidden states per token, fp32) on `device`;
    otherwise the whole model, its gradients and the largest layer's activations per token on the host."""
    ad = get_adapter(model)
    tokens = int(sum(b["input_ids"].numel() for b in batches))
    layer_bytes = max((_nbytes(list(layer.parameters())) for layer in ad.layers), default=0)
    activations = 2 * tokens * ad.hidden_size * 4
    if is_layerwise(method) and torch.device(device).type != "cpu":
        outside = _nbytes([t for _, _, t, _ in _outside_layers(model)])
        return MemoryStep("score_layerwise", str(device), outside + layer_bytes + activations)
    weights = _nbytes(list(model.parameters()))
    return MemoryStep("score_whole_model", "the main process's host (CPU)",
                      2 * weights + activations * max(1, ad.num_layers))


# ---------------------------------------------------------------------------------------------------------------------
# 3. share the pruned model
# ---------------------------------------------------------------------------------------------------------------------


def _share(model: nn.Module | None, full_copies: bool) -> nn.Module:
    """The main process's pruned plain `model` on every rank: the architecture always, the weights with
    `full_copies` (one tensor at a time through the communication device)."""
    if _world() == 1:
        assert model is not None
        return model
    main = _rank() == 0
    mine = {"config": model.config, "spec": _state_spec(model), "buffers": _non_persistent_buffers(model)} if main \
        else None
    payload = broadcast_from_main(mine)
    problem = None
    try:
        if not main:
            model = _skeleton(payload["config"], payload["spec"], payload["buffers"])
        if _state_spec(model) != payload["spec"]:
            problem = "its state dict's names, shapes or dtypes differ from the main process's"
    except Exception as e:  # every rank learns of it below, instead of waiting in the next collective
        problem = f"{type(e).__name__}: {e}"
    problems: list[Any] = [None] * _world()
    _dist().all_gather_object(problems, problem)
    bad = {r: p for r, p in enumerate(problems) if p is not None}
    if bad:
        raise RuntimeError(f"ranks could not rebuild the pruned architecture: {bad}")
    if full_copies:
        dev = comm_device()
        with torch.no_grad():
            for name, t in model.state_dict().items():  # every rank iterates the same names in the same order
                buf = t.detach().to(dev) if main else torch.empty(t.shape, dtype=t.dtype, device=dev)
                _dist().broadcast(buf, src=0)
                if not main:
                    t.copy_(buf)
    return model


def gather_full_model(model: nn.Module, log: Callable[[str], None] = logger.info) -> nn.Module:
    """Collective: the FSDP2-sharded `model` as a plain model with its full weights on every rank's CPU (a LoRA
    adapter merged), for what runs on every rank after training (evaluation, export). Costs one full host copy per
    rank; `gather_to_main` keeps only the main process's."""
    gathered = gather_to_main(model, log=log)
    if _rank() == 0:
        _announce(MemoryStep("full_copy_per_rank", "every rank's host (CPU)",
                             _nbytes(list(gathered.model.state_dict().values()))), [], log)
    return _share(gathered.model, full_copies=True)


@dataclass
class ShardedStage:
    """What `prune_sharded` leaves on this rank."""

    model: nn.Module  # the pruned plain model: weights on the main process (every rank with full_copies)
    outcome: Any  # what stage_fn returned on the main process, on every rank
    optimizer_state: dict[str, dict[str, Any]] | None  # new parameter name -> carried state (main process)
    carried: int  # parameters whose optimizer state was carried
    dropped: dict[str, int]  # reason -> parameters whose state was dropped
    peft_config: Any
    memory: list[MemoryStep]
    optimizer_dropped: str | None = None  # why no optimizer state was carried at all (None: it was gathered)


def carry_state_by_name(names: Mapping[nn.Parameter, str], state: Mapping[str, Mapping[str, Any]] | None,
                        model: nn.Module) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """The optimizer state of every parameter of the pruned `model` that survived the stage unchanged, under its
    new name (`names`: parameter -> name before the stage; surgery keeps the objects of what it does not cut).
    Returns (state by new name, {reason: count} of the states before the stage that were not carried); parameters
    without carried state start fresh."""
    carried: dict[str, dict[str, Any]] = {}
    dropped: dict[str, int] = {}
    state = state or {}
    used: set[str] = set()
    for new_name, p in model.named_parameters():
        old = names.get(p)
        st = state.get(old) if old is not None else None
        if not st:
            continue
        used.add(old)
        if all(not torch.is_tensor(v) or v.dim() == 0 or tuple(v.shape) == tuple(p.shape) for v in st.values()):
            carried[new_name] = dict(st)
        else:
            dropped["shape changed by the stage"] = dropped.get("shape changed by the stage", 0) + 1
    gone = sum(1 for name, st in state.items() if st and name not in used)
    if gone:
        dropped["parameter removed, or replaced by a narrower one, by the stage; or a LoRA adapter merged into the "
                "weights (a fresh adapter starts without state)"] = gone
    return carried, dropped


def prune_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, stage_fn: Callable[[Gathered], Any],
                  *, full_copies: bool = False, max_host_bytes: int | None = None,
                  log: Callable[[str], None] = logger.info) -> ShardedStage:
    """Collective: gather `model` (FSDP2-sharded) to the main process, run `stage_fn(gathered)` there (it prunes
    `gathered.model` in place; use `scoring_placement(gathered.model, gathered.device)` for layer-by-layer scoring),
    give every rank the pruned architecture (and with `full_copies` the weights) and carry the optimizer state of
    the surviving parameters (`max_host_bytes`: see `gather_to_main`). `stage_fn`'s return value is broadcast; an
    exception it raises on the main process is raised on every rank. The sharded `model` is left as it was (drop it afterwards)."""
    gathered = gather_to_main(model, optimizer, log=log, max_host_bytes=max_host_bytes)
    outcome, error = None, None
    if _rank() == 0:
        try:
            outcome = stage_fn(gathered)
        except Exception as e:  # tell the other ranks instead of leaving them in the next collective
            error = e
    raise_on_every_rank(error)
    shared = {"outcome": broadcast_from_main(outcome)}
    steps = list(gathered.memory)
    pruned = gathered.model
    where = "every rank's host (CPU)" if full_copies else "the main process's host (CPU); the other ranks hold " \
                                                          "empty weights"
    nbytes = broadcast_from_main(_nbytes(list(pruned.state_dict().values())) if _rank() == 0 else None)
    _announce(MemoryStep("pruned_model", where, nbytes), steps, log)
    pruned = _share(pruned, full_copies)
    state, dropped = (carry_state_by_name(gathered.names, gathered.optimizer_state, pruned)
                      if _rank() == 0 else (None, {}))
    carried = len(state) if state is not None else 0
    counts = broadcast_from_main((carried, dropped))
    if _rank() == 0:
        for reason, n in dropped.items():
            log(f"sharded prune: optimizer state of {n} parameter(s) dropped: {reason}")
    return ShardedStage(pruned, shared["outcome"], state, counts[0], counts[1], gathered.peft_config, steps,
                        gathered.optimizer_dropped)


# ---------------------------------------------------------------------------------------------------------------------
# 4. re-shard (a hand-written loop; under the Trainer, accelerate's FSDP2 plugin does this in the next train())
# ---------------------------------------------------------------------------------------------------------------------


def shard_model(model: nn.Module, mesh: Any = None, **fully_shard_kwargs: Any) -> nn.Module:
    """FSDP2 the way accelerate's transformer-layer policy does: each decoder layer its own group, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in get_adapter(unwrap_model(model)).layers:
        fully_shard(layer, mesh=mesh, **fully_shard_kwargs)
    fully_shard(model, mesh=mesh, **fully_shard_kwargs)
    return model


def load_full_weights(model: nn.Module, full_sd: Mapping[str, torch.Tensor] | None) -> None:
    """Collective: the main process's full state dict `full_sd` (None elsewhere) broadcast into the shards of the
    FSDP2 `model` (one tensor at a time on the device)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sd = dict(full_sd) if _rank() == 0 and full_sd is not None else {}
    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))


def shard_pruned(model: nn.Module, mesh: Any = None, **fully_shard_kwargs: Any) -> nn.Module:
    """Collective: shard the pruned plain model `prune_sharded` returned and fill its shards with the main process's
    weights (what accelerate's FSDP2 plugin does with `cpu_ram_efficient_loading`)."""
    full_sd = model.state_dict() if _rank() == 0 else None  # keeps the full tensors alive through fully_shard
    shard_model(model, mesh, **fully_shard_kwargs)
    load_full_weights(model, full_sd)
    return model


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer,
                         state: Mapping[str, Mapping[str, Any]] | None) -> int:
    """Collective: give the optimizer of the re-sharded `model` the carried full state (`state`, by parameter name,
    on the main process; None elsewhere), each tensor scattered into the shards of its parameter. Returns the
    number of parameters that got state. Call it after the optimizer is built over the sharded parameters (and
    before its first step)."""
    main = _rank() == 0
    spec = None
    if main:
        spec = {name: {k: (("tensor", tuple(v.shape), v.dtype) if torch.is_tensor(v) and v.dim() > 0 else ("value", v))
                       for k, v in st.items()} for name, st in (state or {}).items()}
    spec = broadcast_from_main(spec)
    params = dict(unwrap_model(model).named_parameters())
    if not params or not any(n in params for n in spec):
        params = dict(model.named_parameters())
    held = {id(p) for g in optimizer.param_groups for p in g["params"]}
    unknown = sorted(n for n in spec if n not in params or id(params[n]) not in held)
    if unknown:
        raise KeyError(f"carried optimizer state for {unknown[:5]} has no parameter of that name in the optimizer; "
                       f"the model's parameters are {sorted(params)[:5]}...")
    dev = comm_device()
    on_device = {id(p) for g in optimizer.param_groups if g.get("fused") or g.get("capturable") for p in g["params"]}
    for name in sorted(spec):
        p = params[name]
        new: dict[str, Any] = {}
        for key, (kind, *rest) in sorted(spec[name].items()):
            if kind == "value":  # a scalar ("step"): on the parameter's device for fused / capturable optimizers
                value = rest[0].clone() if torch.is_tensor(rest[0]) else rest[0]
                if torch.is_tensor(value) and id(p) in on_device:
                    value = value.to(p.to_local().device if hasattr(p, "to_local") else p.device)
                new[key] = value
                continue
            shape, dtype = rest
            full = state[name][key].to(dev) if main else torch.empty(shape, dtype=dtype, device=dev)
            if hasattr(p, "device_mesh"):  # a DTensor: scatter into its shards (rank 0 is the source)
                from torch.distributed.tensor import distribute_tensor

                value = distribute_tensor(full, p.device_mesh, p.placements)
                local = value.to_local()
                if tuple(local.shape) != tuple(p.to_local().shape):
                    raise RuntimeError(f"{name}.{key}: shard of shape {tuple(local.shape)} for a parameter shard "
                                       f"of shape {tuple(p.to_local().shape)}")
                new[key] = value.to(p.to_local().device) if local.device != p.to_local().device else value
            else:
                if _world() > 1:
                    _dist().broadcast(full, src=0)
                new[key] = full.to(p.device)
        optimizer.state[p] = new
    return len(spec)
