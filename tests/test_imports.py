"""Imports: the import graph of the house, and what `import hf_prune` costs and provides.

The graph is read from the source with `ast` (every `import` statement, including those inside functions; those under
`if TYPE_CHECKING:` are skipped since they never run) over hf_prune/, callbacks/ (installed as hf_prune.callbacks) and
recipes/. Rules from DESIGN.md: no import circle among hf_prune modules, no private name imported from another
hf_prune module, and the engine (hf_prune/) never imports the Trainer, the callbacks or the recipes.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TREES = {"hf_prune": REPO / "hf_prune", "hf_prune.callbacks": REPO / "callbacks", "recipes": REPO / "recipes"}


@dataclass
class Module:
    name: str
    path: Path
    is_package: bool
    imports: list[tuple[str, int]] = field(default_factory=list)  # (imported module or module.name, line)
    private: list[str] = field(default_factory=list)  # "line N: from M import _x" / "line N: M._x"


def _module_name(root_name: str, root: Path, path: Path) -> tuple[str, bool]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join([root_name, *parts]), is_package


def _under_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _under_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def read_house() -> dict[str, Module]:
    modules: dict[str, Module] = {}
    lazy = _lazy_names()
    for root_name, root in TREES.items():
        for path in sorted(root.rglob("*.py")):
            name, is_package = _module_name(root_name, root, path)
            modules[name] = Module(name, path, is_package)
    for mod in modules.values():
        tree = ast.parse(mod.path.read_text(), filename=str(mod.path))
        package = mod.name if mod.is_package else mod.name.rpartition(".")[0]
        bound: dict[str, str] = {}  # local name -> hf_prune module it names
        for node in _import_nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = _canonical(alias.name, modules)
                    mod.imports.append((target, node.lineno))
                    if alias.asname and target in modules:
                        bound[alias.asname] = target
                continue
            if node.level:
                base = package.split(".")
                if node.level > 1:
                    base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            source = _canonical(source, modules)
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                if sub in modules:  # `from package import submodule`
                    mod.imports.append((sub, node.lineno))
                    bound[alias.asname or alias.name] = sub
                elif source == "hf_prune" and alias.name in lazy:  # loaded from its module on first access
                    mod.imports.append((f"{lazy[alias.name]}:{alias.name}", node.lineno))
                else:
                    mod.imports.append((f"{source}:{alias.name}", node.lineno))
                    if _is_private(alias.name) and source in modules and source != mod.name:
                        mod.private.append(f"line {node.lineno}: from {source} import {alias.name}")
        for node in ast.walk(tree):  # `module._name`, the module named by an import of this file or spelled out
            if not (isinstance(node, ast.Attribute) and _is_private(node.attr)):
                continue
            dotted = _dotted(node.value)
            if dotted is None:
                continue
            head, _, rest = dotted.partition(".")
            owner = ".".join(filter(None, [bound[head], rest])) if head in bound else dotted
            if owner in modules and owner != mod.name:
                mod.private.append(f"line {node.lineno}: {owner}.{node.attr}")
    return modules


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return None if base is None else f"{base}.{node.attr}"
    return None


def _lazy_names() -> dict[str, str]:
    """hf_prune/__init__.py's table of names loaded on first access: `from hf_prune import apply` uses surgery."""
    tree = ast.parse((REPO / "hf_prune" / "__init__.py").read_text())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "_LAZY":
            return ast.literal_eval(node.value)
    return {}


def _canonical(name: str, modules: dict[str, Module]) -> str:
    """`callbacks.x` (recipes put the repo root on sys.path) and `recipe_utils` name the modules of this house."""
    if name == "callbacks" or name.startswith("callbacks."):
        return "hf_prune." + name
    if f"recipes.{name.split('.')[0]}" in modules:
        return "recipes." + name
    return name


def _edges(modules: dict[str, Module]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for mod in modules.values():
        for target, _ in mod.imports:
            target = target.split(":")[0]
            if target in modules and target != mod.name:
                graph[mod.name].add(target)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as one closed path through it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_closed_path(graph, set(c)) for c in components]


def _closed_path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest loop through the component's first module (breadth-first inside the component)."""
    start = min(comp)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


@pytest.fixture(scope="module")
def house() -> dict[str, Module]:
    return read_house()


def test_reader_resolves_relative_and_function_level_imports():
    """The reader itself can fail: it must see the imports that these known modules make."""
    modules = read_house()
    graph = _edges(modules)
    assert "hf_prune.cli" in modules and "hf_prune.methods" in modules and modules["hf_prune.methods"].is_package
    # hf_prune/cli.py imports `from . import methods` inside a function
    assert "hf_prune.methods" in graph["hf_prune.cli"]
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert import_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle(house):
    cycles = import_cycles(_edges({n: m for n, m in house.items() if n.startswith("hf_prune")}))
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_private_name_imported_from_another_module(house):
    found = [f"{m.path.relative_to(REPO)} {p}" for m in house.values() for p in m.private]
    assert not found, "private names used outside their module:\n" + "\n".join(found)


def test_engine_never_imports_trainer_callbacks_or_recipes(house):
    bad = []
    for mod in house.values():
        if not mod.name.startswith("hf_prune") or mod.name.startswith("hf_prune.callbacks"):
            continue
        for target, line in mod.imports:
            source, _, name = target.partition(":")
            if (source.startswith(("hf_prune.callbacks", "recipes", "transformers.trainer", "trl"))
                    or (source == "transformers" and name.startswith("Trainer"))):
                bad.append(f"{mod.path.relative_to(REPO)}:{line} imports {target.replace(':', '.')}")
    assert not bad, "the engine reaches up:\n" + "\n".join(bad)


def test_callbacks_never_import_recipes(house):
    bad = [f"{m.path.relative_to(REPO)}:{line} imports {t}" for m in house.values()
           if m.name.startswith("hf_prune.callbacks") for t, line in m.imports if t.startswith("recipes")]
    assert not bad, "\n".join(bad)


# --------------------------------------------------------------------------------------------------------------------
# `import hf_prune`: cheap, and the Auto classes are registered in either import order
# --------------------------------------------------------------------------------------------------------------------


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_import_hf_prune_loads_neither_torch_nor_transformers(tmp_path):
    proc = _python("""
        import sys
        import hf_prune
        heavy = sorted(m for m in ("torch", "transformers", "hf_prune.modeling", "hf_prune.methods") if m in sys.modules)
        print("HEAVY" + ",".join(heavy))
        assert callable(hf_prune.apply) and hf_prune.PrunePlan.__name__ == "PrunePlan"  # lazy names resolve
        assert set(hf_prune.__all__) <= set(dir(hf_prune))
        """, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[0] == "HEAVY", proc.stdout


def test_lazy_names_resolve_and_unknown_names_fail():
    import hf_prune

    for name in hf_prune.__all__:
        assert getattr(hf_prune, name) is not None, name
    assert {"apply", "compact_zeros", "predicted_num_parameters", "PrunePlan", "PlanError", "get_adapter",
            "SUPPORTED_MODEL_TYPES"} <= set(hf_prune.__all__)
    with pytest.raises(AttributeError, match="no_such_name"):
        hf_prune.no_such_name


@pytest.fixture(scope="module")
def per_layer_pruned(tmp_path_factory) -> Path:
    """A tiny Llama whose layers differ in width, saved: its config.json names hf_prune's pruned classes."""
    import torch
    from tiny import tiny_model

    from hf_prune import PrunePlan, apply

    model = tiny_model("llama")
    apply(model, PrunePlan(kv_heads={2: [1]}, mlp_channels={0: list(range(0, 128, 2))}))
    out = tmp_path_factory.mktemp("pruned") / "model"
    model.save_pretrained(out)
    ids = torch.arange(3, 19).unsqueeze(0)
    with torch.no_grad():
        torch.save({"ids": ids, "logits": model(ids).logits}, out / "reference.pt")
    assert json.loads((out / "config.json").read_text())["model_type"] != "llama"  # needs hf_prune's classes
    return out


PROBE = """
import sys
import transformers
from transformers import AutoConfig
assert "hf_prune.modeling" not in sys.modules, "registration ran inside an hf_prune import"
"""

ORDERS = {
    "hf_prune_first": "import hf_prune\nfrom transformers import AutoModelForCausalLM\n",
    "transformers_first": "from transformers import AutoModelForCausalLM\nimport hf_prune\n",
    "hf_prune_submodule_first": "import hf_prune.plan\nfrom transformers import AutoModelForCausalLM\n",
    # transformers first imported by an hf_prune module: registration waits until that import has finished
    "transformers_inside_an_hf_prune_import": "import hf_prune\nhf_prune.__path__.append(PROBE_DIR)\n"
                                              "import hf_prune.probe_imports_transformers\n"
                                              "from transformers import AutoModelForCausalLM\n",
}


@pytest.mark.parametrize("order", [o if o == "hf_prune_first" else pytest.param(o, marks=pytest.mark.slow)
                                   for o in sorted(ORDERS)])
def test_pruned_model_loads_after_import_hf_prune_in_any_order(per_layer_pruned, tmp_path, order):
    """In a fresh process, `import hf_prune` before or after transformers: from_pretrained loads the pruned folder."""
    (tmp_path / "probe_imports_transformers.py").write_text(PROBE)
    expected = json.loads((per_layer_pruned / "config.json").read_text())["architectures"][0]
    proc = _python(f"PROBE_DIR = {str(tmp_path)!r}\n" + ORDERS[order] + textwrap.dedent(f"""
        import torch, warnings
        warnings.simplefilter("error", RuntimeWarning)
        m = AutoModelForCausalLM.from_pretrained({str(per_layer_pruned)!r}).eval()
        ref = torch.load({str(per_layer_pruned / 'reference.pt')!r})
        with torch.no_grad():
            diff = (m(ref["ids"]).logits - ref["logits"]).abs().max().item()
        print("RESULT", type(m).__name__, diff)
        """), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, cls, diff = proc.stdout.strip().splitlines()[-1].split()
    assert cls == expected and float(diff) <= 1e-5
