"""hf-prune: structured pruning of LLMs inside the Hugging Face stack.

`import hf_prune` is cheap: it imports neither torch nor transformers. The public names below load from their
modules on first access (`hf_prune.prune`, `hf_prune.apply`, ...), and so do the submodules (`hf_prune.methods`).

The pruned and sliced config/model classes (`hf_prune.modeling`) are registered with transformers' Auto classes as
soon as both hf_prune and transformers are imported, in either order, so that `AutoModelForCausalLM.from_pretrained`
loads every format hf-prune writes:

- transformers already imported when hf_prune is: registered at once;
- otherwise a post-import hook (a `sys.meta_path` finder) registers right after `transformers` finishes importing.
  If that import happens inside the import of an hf_prune module, registration waits until the outermost hf_prune
  module being imported has finished, so that `hf_prune.modeling` never sees a half-imported module.

`hf_prune.modeling` also registers the classes itself when it is imported.
"""

from __future__ import annotations

import importlib
import importlib.abc
import sys
import threading
import warnings
from typing import Any

__version__ = "0.1.0"

# name -> module it is loaded from on first access
_LAZY: dict[str, str] = {
    "prune": "hf_prune.pipeline",
    "PruneResult": "hf_prune.pipeline",
    "apply": "hf_prune.surgery",
    "compact_zeros": "hf_prune.surgery",
    "predicted_num_parameters": "hf_prune.surgery",
    "PrunePlan": "hf_prune.plan",
    "PlanError": "hf_prune.plan",
    "get_adapter": "hf_prune.arch",
    "SUPPORTED_MODEL_TYPES": "hf_prune.arch",
}


def _has_pipeline() -> bool:
    from importlib.util import find_spec

    try:
        return find_spec("hf_prune.pipeline") is not None
    except (ImportError, ValueError):
        return False


__all__ = sorted(n for n, m in _LAZY.items() if m != "hf_prune.pipeline" or _has_pipeline())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later accesses skip __getattr__
        return value
    if not name.startswith("__"):  # a submodule: hf_prune.methods, hf_prune.export, ...
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# --------------------------------------------------------------------------------------------------------------------
# Registration with transformers' Auto classes
# --------------------------------------------------------------------------------------------------------------------

_state = threading.local()  # per thread: depth = hf_prune modules (and transformers) being executed; pending = bool


def _depth() -> int:
    return getattr(_state, "depth", 0)


def _registered() -> bool:
    module = sys.modules.get("hf_prune.modeling")
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


def _register_auto_classes() -> None:
    """Import `hf_prune.modeling` (its import registers the Auto classes), or wait while an import is under way."""
    if _registered():
        _state.pending = False
        return
    if _depth() > 0:
        _state.pending = True
        return
    _state.pending = False
    try:
        importlib.import_module("hf_prune.modeling")
    except Exception as e:  # never break the user's `import transformers`; say what will not load
        warnings.warn(
            f"hf_prune could not register its pruned model classes with transformers' Auto classes ({type(e).__name__}:"
            f" {e}); AutoModelForCausalLM.from_pretrained will not load per-layer pruned or sliced models.",
            RuntimeWarning,
            stacklevel=2,
        )


class _RegisteringLoader(importlib.abc.Loader):
    """Wraps the real loader of `transformers` or an hf_prune submodule; registers after it has executed."""

    def __init__(self, loader: importlib.abc.Loader, name: str) -> None:
        self._loader = loader
        self._name = name

    def __getattr__(self, attr: str) -> Any:  # get_source, get_resource_reader, is_package, ...
        if attr == "_loader":  # not set yet (a copy being built): no recursion
            raise AttributeError(attr)
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        _state.depth = _depth() + 1
        try:
            self._loader.exec_module(module)
        finally:
            _state.depth -= 1
        if self._name == "transformers" or getattr(_state, "pending", False):
            _register_auto_classes()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds `transformers` and hf_prune submodules through the other finders and wraps their loaders."""

    hf_prune_register_hook = True  # marks every copy of this finder, even one from a reloaded hf_prune

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers" and not fullname.startswith("hf_prune."):
            return None
        for finder in sys.meta_path:
            if getattr(finder, "hf_prune_register_hook", False) or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader, fullname)
        return spec


def _install() -> None:
    if "transformers" in sys.modules:
        _register_auto_classes()
    if not any(getattr(f, "hf_prune_register_hook", False) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_install()
