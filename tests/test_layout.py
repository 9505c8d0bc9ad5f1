"""The package import graph of pipeline/, training/ and jobs/, read with `ast` (nothing imported).

The layering it enforces (STYLE.md 2, training/__init__.py):

* no import cycles between modules, counting the imports that run at import time (module level,
  class bodies, ``if``/``try`` blocks); imports inside functions are deferred, and a cycle that
  exists only through them is reported by its own test;
* ``training/model/*`` imports only torch, the standard library and ``training.model.*``;
* ``training/export.py``, ``training/eval/*`` and ``training/generation/*`` never reach
  ``training.train`` (evaluation and generation load an export without the training driver),
  not even through another module;
* nothing in pipeline/ or training/ imports ``jobs``; nothing in pipeline/ imports ``training``;
* only ``training/hf`` and ``jobs/hf.py`` import the optional extra (transformers, lm-eval,
  datasets); the sources ``gpthf export-hf`` assembles into ``modeling_gpthf.py`` import only
  torch, numpy, transformers, the standard library and each other (the folder needs no gpthf).

Every failure names the importing file and line.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "training", "jobs")
STDLIB = frozenset(sys.stdlib_module_names)


@dataclass(frozen=True)
class Import:
    """One imported name: ``source`` (a module of ours) imports ``target`` (a dotted name: the
    most specific module of ours it names, or the external name as written)."""

    source: str
    target: str
    path: Path
    line: int
    deferred: bool  # inside a function body: runs when called, not at import time
    type_only: bool  # under ``if TYPE_CHECKING:``: never runs

    def where(self) -> str:
        when = " (type-only)" if self.type_only else " (in a function)" if self.deferred else ""
        return f"{self.path.relative_to(ROOT)}:{self.line}: imports {self.target}{when}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of our packages, by dotted name."""
    found = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[_module_name(path)] = path
    return found


def _resolve(name: str) -> str:
    """The most specific module of ours that ``name`` names, or ``name`` itself if external."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules():
            return candidate
    return name


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports_of(source: str, path: Path) -> Iterator[Import]:
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    package = source if is_package else source.rpartition(".")[0]

    def absolute(module: str | None, level: int) -> str:
        if level == 0:
            return module or ""
        base = package.split(".")
        base = base[: len(base) - (level - 1)]
        return ".".join([*base, module] if module else base)

    def visit(node: ast.AST, deferred: bool, type_only: bool) -> Iterator[Import]:
        def found(target: str) -> Import:
            return Import(source, target, path, node.lineno, deferred, type_only)  # type: ignore[attr-defined]

        if isinstance(node, ast.Import):
            for alias in node.names:
                yield found(_resolve(alias.name))
        elif isinstance(node, ast.ImportFrom):
            base = absolute(node.module, node.level)
            for alias in node.names:
                # `from training.model import attention` names the submodule when it is one.
                sub = f"{base}.{alias.name}"
                yield found(sub if sub in modules() else _resolve(base))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            yield found(_resolve(node.args[0].value))  # importlib.import_module("literal")
        for child in ast.iter_child_nodes(node):
            child_deferred = deferred or isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            child_type_only = type_only or (
                isinstance(node, ast.If) and _is_type_checking(node.test) and child in node.body
            )
            yield from visit(child, child_deferred, child_type_only)

    yield from visit(tree, False, False)


@cache
def imports() -> tuple[Import, ...]:
    return tuple(i for name, path in modules().items() for i in _imports_of(name, path))


def _top(name: str) -> str:
    return name.partition(".")[0]


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _graph(edges: Iterable[Import], packages: bool = False) -> dict[str, dict[str, Import]]:
    """source -> target -> the first import that makes the edge; only edges between our modules.

    ``packages``: also an edge from every module to its package, whose ``__init__`` runs first
    (what importing a module really executes; left out for cycles, where it would make every
    package that imports its own submodules a cycle)."""
    graph: dict[str, dict[str, Import]] = {m: {} for m in modules()}
    for i in edges:
        if i.target in modules() and i.target != i.source:
            graph[i.source].setdefault(i.target, i)
    if packages:
        for m, path in modules().items():
            parent = m.rpartition(".")[0]
            if parent:
                graph[m].setdefault(parent, Import(m, parent, path, 1, False, False))
    return graph


def _cycles(graph: dict[str, dict[str, Import]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def _describe(cycle: list[str], graph: dict[str, dict[str, Import]]) -> str:
    members = set(cycle)
    lines = [f"cycle between {', '.join(cycle)}:"]
    for m in cycle:
        lines += [f"  {i.where()}" for t, i in graph[m].items() if t in members]
    return "\n".join(lines)


def _reachable(start: str, graph: dict[str, dict[str, Import]]) -> dict[str, list[Import]]:
    """Every module reachable from ``start``, with the chain of imports that reaches it."""
    chains: dict[str, list[Import]] = {start: []}
    todo = [start]
    while todo:
        v = todo.pop()
        for w, i in graph[v].items():
            if w not in chains:
                chains[w] = [*chains[v], i]
                todo.append(w)
    return chains


# --------------------------------------------------------------------------- the parser itself


def test_the_graph_sees_every_package_and_known_edges() -> None:
    names = modules()
    for must in ("pipeline", "training", "jobs", "training.model.attention", "jobs.registry"):
        assert must in names, must
    graph = _graph(imports())
    assert "training.model.attention" in graph["training.model.transformer"]
    assert "training.model.transformer" in graph["training.model"]  # package __init__
    assert {"torch"} <= {i.target for i in imports() if i.source == "training.model.attention"}


def test_relative_deferred_and_type_only_imports_are_classified(tmp_path: Path) -> None:
    source = tmp_path / "x.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import training.model.attention as a\n"
        "from training.model import transformer\n"
        "if TYPE_CHECKING:\n"
        "    from jobs import registry\n"
        "def f():\n"
        "    import importlib\n"
        "    importlib.import_module('pipeline.text')\n"
        "    from . import scoring\n"
    )
    got = {(i.target, i.deferred, i.type_only) for i in _imports_of("training.eval.x", source)}
    assert ("training.model.attention", False, False) in got
    assert ("training.model.transformer", False, False) in got
    assert ("jobs.registry", False, True) in got
    assert ("pipeline.text", True, False) in got
    assert ("training.eval.scoring", True, False) in got


# --------------------------------------------------------------------------- the rules


def test_no_import_cycles_at_import_time() -> None:
    graph = _graph(i for i in imports() if not i.deferred and not i.type_only)
    cycles = _cycles(graph)
    assert not cycles, "\n".join(_describe(c, graph) for c in cycles)


def test_no_import_cycles_even_through_imports_in_functions() -> None:
    """A cycle closed only by a deferred import works, but hides a layering mistake."""
    graph = _graph(i for i in imports() if not i.type_only)
    cycles = _cycles(graph)
    assert not cycles, "\n".join(_describe(c, graph) for c in cycles)


def test_the_model_imports_only_torch_the_standard_library_and_itself() -> None:
    bad = [
        i.where()
        for i in imports()
        if _within(i.source, "training.model")
        and not _within(i.target, "training.model")
        and _top(i.target) not in {"torch", "__future__"} | STDLIB
    ]
    assert not bad, "training/model/ must import only torch and the stdlib:\n" + "\n".join(bad)


EXPORT_READERS = (
    "training.export",
    "training.eval",
    "training.generation",
    "training.hf",
    "training.compare",
)


def test_export_eval_and_generation_never_reach_the_training_driver() -> None:
    graph = _graph((i for i in imports() if not i.type_only), packages=True)
    bad = []
    for source in modules():
        if not any(_within(source, p) for p in EXPORT_READERS):
            continue
        for target, chain in _reachable(source, graph).items():
            if _within(target, "training.train"):
                bad.append(
                    f"{source} reaches {target}:\n" + "\n".join(f"  {i.where()}" for i in chain)
                )
                break
    assert not bad, "\n".join(bad)


def test_pipeline_and_training_never_import_jobs() -> None:
    bad = [
        i.where()
        for i in imports()
        if _top(i.source) in ("pipeline", "training") and _within(i.target, "jobs")
    ]
    assert not bad, "jobs/ is the top layer:\n" + "\n".join(bad)


def test_pipeline_never_imports_training() -> None:
    bad = [
        i.where()
        for i in imports()
        if _top(i.source) == "pipeline" and _within(i.target, "training")
    ]
    assert not bad, "pipeline/ sits below training/:\n" + "\n".join(bad)


HF_EXTRA = {"transformers", "lm_eval", "datasets"}
MODELING_SOURCES = (
    "training.model.pruning",
    "training.model.attention",
    "training.model.transformer",
    "training.generation.eviction",
    "training.generation.decoders",
    "training.generation.pruned_decoders",
    "training.generation.decode",
    "training.hf.hf_model",
)


def test_only_the_hf_modules_import_the_optional_extra() -> None:
    bad = [
        i.where()
        for i in imports()
        if _top(i.target) in HF_EXTRA
        and not (_within(i.source, "training.hf") or _within(i.source, "jobs.hf"))
    ]
    assert not bad, "transformers/lm-eval belong to training/hf (the .[hf] extra):\n" + "\n".join(
        bad
    )


def test_the_exported_modelling_file_needs_only_torch_numpy_and_transformers() -> None:
    allowed = {"torch", "numpy", "transformers", "__future__"} | STDLIB
    bad = [
        i.where()
        for i in imports()
        if i.source in MODELING_SOURCES
        and i.target not in MODELING_SOURCES
        and not any(_within(i.target, m) for m in ("training.model",))
        and _top(i.target) not in allowed
    ]
    assert not bad, "modeling_gpthf.py would need more than torch + transformers:\n" + "\n".join(
        bad
    )
