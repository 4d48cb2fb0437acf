"""Where and how hf-prune runs a model: its device, the memory free on a device, eval mode, progress bars.

One helper per question, used by every method, the calibration runner and the evaluation:

- `model_device(model)`: the device of the model's input embeddings, i.e. where token ids must go and where
  layer-by-layer passes keep their activations by default.
- `available_memory(device)`: bytes that can still be allocated on `device`.
- `eval_mode(model)`: eval mode and no autograd for a block, the training flag restored afterwards.
- `progress(iterable, total, desc, enabled)`: a progress bar on huggingface_hub's tqdm.
- `release_freed_memory()`: hand memory that Python and torch already freed back to the operating system.

Progress bars are hidden when `enabled` is False (the methods' `progress` / `verbose` options), when
`HF_HUB_DISABLE_PROGRESS_BARS=1` (or `huggingface_hub.utils.disable_progress_bars()`), when `HF_PRUNE_NO_PROGRESS` is
set to anything but "", "0", "false", "no" or "off", and when stderr is not a terminal. Messages go through `logging`
(logger names under "hf_prune"); the CLI's `-v` shows the INFO ones.

This module imports torch only inside the helpers that need it, so importing it stays cheap.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Any, Iterable, Iterator

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["available_memory", "bound_heap_retention", "eval_mode", "model_device", "parked", "progress",
           "progress_disabled", "release_freed_memory", "unpin_checkpoint_maps"]

_FALSE = ("", "0", "false", "no", "off")


def progress_disabled() -> bool:
    """Whether `HF_PRUNE_NO_PROGRESS` asks to hide every hf-prune progress bar."""
    return os.environ.get("HF_PRUNE_NO_PROGRESS", "").strip().lower() not in _FALSE


def progress(
    iterable: Iterable | None = None,
    total: int | None = None,
    desc: str | None = None,
    enabled: bool = True,
    unit: str = "it",
    leave: bool = False,
) -> Any:
    """A tqdm bar over `iterable` (or, without one, a bar to `update(n)` by hand and `close()`).

    Built on `huggingface_hub.utils.tqdm`, so `HF_HUB_DISABLE_PROGRESS_BARS` hides it like the Hub's own bars; also
    hidden when `enabled` is False, under `HF_PRUNE_NO_PROGRESS`, and when stderr is not a terminal (tqdm's
    `disable=None`). A hidden bar still iterates and accepts `update`/`close`.
    """
    from huggingface_hub.utils import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    disable = True if (not enabled or progress_disabled()) else None
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, disable=disable, dynamic_ncols=True)


def model_device(model: "nn.Module") -> "torch.device":
    """The device of the model's input embeddings: where token ids must go, and where layer-by-layer passes keep
    their activations unless told otherwise. Wrappers (DDP, peft) are looked through; a model without input
    embeddings answers with its first parameter's device, one without parameters with the CPU."""
    import torch

    inner = model
    while hasattr(inner, "module") and isinstance(getattr(inner, "module"), torch.nn.Module):  # DDP, FSDP, DataParallel
        inner = inner.module
    get = getattr(inner, "get_input_embeddings", None)
    if callable(get):
        try:
            emb = get()
        except (NotImplementedError, AttributeError):
            emb = None
        weight = getattr(emb, "weight", None)
        if isinstance(weight, torch.Tensor):
            return weight.device
    p = next(iter(inner.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def available_memory(device: "torch.device | str") -> int:
    """Bytes that can still be allocated on `device`, other processes' use included.

    CUDA (and XPU): the driver's free memory (`torch.cuda.mem_get_info`), not counting what PyTorch's caching
    allocator holds but does not use. Any other device (CPU; MPS shares the host's memory): the host's available
    memory (`MemAvailable`: free plus reclaimable caches, as psutil reports it), or the free pages where neither
    psutil nor /proc/meminfo is there.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "xpu" and hasattr(torch, "xpu") and hasattr(torch.xpu, "mem_get_info"):
        free, _ = torch.xpu.mem_get_info(device)
        return int(free)
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # pragma: no cover - psutil comes with accelerate
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


@contextlib.contextmanager
def eval_mode(model: "nn.Module") -> Iterator["nn.Module"]:
    """Eval mode and no autograd for the duration; the previous training flag is restored afterwards."""
    import torch

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def _glibc(name: str, argtypes: list) -> Any:
    """The C library function `name` with its argument types, or None off Linux or where the C library lacks it
    (musl has no malloc_trim)."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    return fn


def release_freed_memory() -> bool:
    """Return freed heap memory to the operating system (glibc's `malloc_trim(0)`); True when it ran.

    glibc keeps small and medium blocks that were freed (a tokenizer's millions of Python ints, torch's temporary
    CPU tensors under its mmap threshold) in the process's heap, so the resident set stays at its high-water mark
    after a phase ends and the next phase's peak lands on top of it. Trimming after such a phase (the CLI does it
    after tokenizing the calibration corpus and after each evaluation) lowers the baseline of the next one. A no-op
    off glibc (macOS, Windows, musl)."""
    import ctypes
    import gc

    gc.collect()
    trim = _glibc("malloc_trim", [ctypes.c_size_t])
    if trim is None:
        return False
    trim(0)
    return True


@contextlib.contextmanager
def parked(model: "nn.Module") -> Iterator[Any]:
    """Inside the block, `model`'s parameters live in a temporary safetensors file instead of memory (each holds
    an empty tensor, so any use of the parked model fails loudly), and the block gets `fresh()`, which builds a full,
    independent copy of the model from that file. Trying candidates on copies then holds one model in memory instead
    of two (Gemma-3-270M: 1.07 GB). On exit every parameter gets its values back (the same Parameter objects, ties
    kept) and the file is deleted. Buffers are not parked (they are small)."""
    import copy
    import shutil
    import tempfile
    from pathlib import Path

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    params = dict(model.named_parameters())  # tied parameters once
    places = {name: (p.device, p.dtype) for name, p in params.items()}
    folder = Path(tempfile.mkdtemp(prefix="hf_prune_parked_"))
    path = folder / "parameters.safetensors"

    def load(target: "nn.Module") -> None:
        slots = dict(target.named_parameters())
        with safe_open(str(path), framework="pt") as f:
            for name, (device, dtype) in places.items():
                slots[name].data = f.get_tensor(name).to(device=device, dtype=dtype)

    def fresh() -> "nn.Module":
        m = copy.deepcopy(model)  # the structure only: every parameter is empty while parked
        load(m)
        return m

    try:
        storages: set[int] = set()
        tensors = {}
        for name, p in params.items():  # safetensors refuses tensors that share memory: copy the later ones
            t = p.detach().contiguous().cpu()
            key = t.untyped_storage().data_ptr()
            tensors[name] = t.clone() if key in storages else t
            storages.add(key)
        save_file(tensors, str(path))
        del tensors
        for p in params.values():
            p.data = torch.empty(0, device=p.device, dtype=p.dtype)
        release_freed_memory()
        try:
            yield fresh
        finally:
            load(model)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _file_maps(suffix: str) -> list[tuple[int, int, str]]:
    """(start, end, path) of this process's memory maps of files whose name ends with `suffix` (Linux)."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6 and parts[5].rstrip("\n").endswith(suffix):
                    start, end = (int(x, 16) for x in parts[0].split("-"))
                    out.append((start, end, parts[5].rstrip("\n")))
    except OSError:
        return []
    return out


def unpin_checkpoint_maps(model: "nn.Module") -> int:
    """Copy the tensors that still view a memory-mapped safetensors file into their own memory when most of the file
    is no longer used, so the map (and every page of it read so far) is released. Returns the bytes of the maps
    released.

    A model loaded from safetensors views a map of the file, and the map stays, with the pages read so far resident,
    while any tensor views it. After surgery has replaced most weights (a rotation replaces them all but the norm
    scales), the few tensors left pin up to the whole file: on Gemma-3-270M 1 GB stayed resident through the
    evaluation of the pruned model. A map is released only when the tensors viewing it hold at most half of it (the
    copies then cost less than what is freed). Linux only (reads /proc/self/maps); elsewhere a no-op."""
    import gc

    maps = _file_maps(".safetensors")
    if not maps:
        return 0
    by_file: dict[str, list[tuple[int, int]]] = {}
    for start, end, path in maps:
        by_file.setdefault(path, []).append((start, end))
    views: dict[str, list[tuple[Any, str, Any]]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for kind in ("_parameters", "_buffers"):
            for name, t in getattr(module, kind).items():
                if t is None or id(t) in seen or t.device.type != "cpu" or t.numel() == 0:
                    continue
                seen.add(id(t))
                ptr = t.data_ptr()
                for path, ranges in by_file.items():
                    if any(a <= ptr < b for a, b in ranges):
                        views.setdefault(path, []).append((module, kind, name))
                        break
    released = 0
    for path, held in views.items():
        size = sum(b - a for a, b in by_file[path])
        live = sum(getattr(m, kind)[name].nbytes for m, kind, name in held)
        if live > size // 2:
            continue
        for m, kind, name in held:
            t = getattr(m, kind)[name]
            if kind == "_parameters":
                t.data = t.data.clone()
            else:
                getattr(m, kind)[name] = t.clone()
        released += size
    if released:
        gc.collect()
    return released


#: glibc's own environment settings of the two thresholds; a value set there wins over bound_heap_retention's.
_MALLOC_ENV = {"mmap": ("MALLOC_MMAP_THRESHOLD_", "glibc.malloc.mmap_threshold"),
               "trim": ("MALLOC_TRIM_THRESHOLD_", "glibc.malloc.trim_threshold")}


def _set_in_environment(which: str) -> bool:
    var, tunable = _MALLOC_ENV[which]
    return var in os.environ or tunable in os.environ.get("GLIBC_TUNABLES", "")


def bound_heap_retention(mmap_threshold: int = 128 * 1024, trim_threshold: int = 128 * 1024) -> bool:
    """Make glibc serve every allocation above `mmap_threshold` bytes from its own memory map and return freed heap
    above `trim_threshold` to the system (mallopt M_MMAP_THRESHOLD and M_TRIM_THRESHOLD); True when it set either.

    By default glibc raises its mmap threshold, up to 32 MiB, each time a large block is freed; the weights and
    temporaries of a pruning plan (a few MiB each) then come from the heap, and after the plan about 1 GB of freed heap
    stayed with the process on Gemma-3-270M (Dynamic Slicing: 2.98 GB peak; 2.87 GB with the thresholds fixed at
    128 KiB). Process-wide: `hf-prune prune` calls it at start; a library never changes it for its caller. A threshold
    set in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or GLIBC_TUNABLES) is left as set. A
    no-op off glibc (macOS, Windows, musl)."""
    import ctypes

    mallopt = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
    if mallopt is None:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    ran = False
    if not _set_in_environment("mmap"):
        ran = bool(mallopt(M_MMAP_THRESHOLD, mmap_threshold)) or ran
    if not _set_in_environment("trim"):
        ran = bool(mallopt(M_TRIM_THRESHOLD, trim_threshold)) or ran
    return ran
