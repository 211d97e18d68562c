"""The package's import structure: every module imports, the layers point one way, no cycles.

The layering checks read the source with `ast` (every import statement, also those inside
functions), so a lazy import that breaks the layering is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
import importlib
import os
import pkgutil
import subprocess
import sys

import pytest
from helpers import REPO

import jaxspec

# package -> prefixes it must not import from (a prefix matches itself and its submodules)
FORBIDDEN = {
    "jaxspec.models": ("jaxspec.decode", "jaxspec.drafts", "jaxspec.checkpoint", "jaxspec.api",
                       "jaxspec.generate", "jaxspec.bench"),
    "jaxspec.decode": ("jaxspec.checkpoint", "jaxspec.api", "jaxspec.generate", "jaxspec.bench"),
    "jaxspec.drafts": ("jaxspec.checkpoint", "jaxspec.api", "jaxspec.generate",
                       "jaxspec.training"),
    "jaxspec.training": ("jaxspec.api", "jaxspec.generate"),
}


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _module_files() -> dict[str, str]:
    """{module name: file} for every .py file under jaxspec/ and kernels/ (as jaxspec.kernels)."""
    files = {}
    for folder, package in (("jaxspec", "jaxspec"), ("kernels", "jaxspec.kernels")):
        root = os.path.join(REPO, folder)
        for dirpath, _, names in os.walk(root):
            rel = os.path.relpath(dirpath, root)
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for name in names:
                if name.endswith(".py"):
                    stem = name[:-3]
                    module = ".".join(parts if stem == "__init__" else parts + [stem])
                    files[module] = os.path.join(dirpath, name)
    return files


def _resolve(name: str, modules) -> str | None:
    """The longest known module that `name` is or lies in (None outside the package)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """{module: jaxspec modules it imports}, without a module's edges to its own packages."""
    files = _module_files()
    graph = {}
    for module, path in files.items():
        is_package = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the module's package, up level - 1 more
                    parts = module.split(".") if is_package else module.split(".")[:-1]
                    package = ".".join(parts[: len(parts) - node.level + 1])
                    base = f"{package}.{base}" if base else package
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    targets.add(full if full in files else base)
        resolved = {_resolve(t, files) for t in targets}
        graph[module] = {t for t in resolved
                         if t and t != module and not _under(module, t)}
    return graph


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_every_module_imports():
    """Every module of jaxspec (and jaxspec.kernels) imports without error."""
    names = ["jaxspec.kernels"]
    for package in (jaxspec, importlib.import_module("jaxspec.kernels")):
        names += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    for name in names:
        importlib.import_module(name)
    assert {"jaxspec.decode.loop", "jaxspec.drafts.registry", "jaxspec.checkpoint.load"} <= set(
        names)


def test_graph_builder_finds_known_edges(graph):
    """The static graph is not empty: known imports (top-level and lazy) appear as edges."""
    assert "jaxspec.models.decoder" in graph["jaxspec.decode.loop"]
    assert "jaxspec.drafts.ngram" in graph["jaxspec.drafts.registry"]  # inside build()
    assert "jaxspec.decode.rejection" in graph["jaxspec.kernels"]  # kernels/ is jaxspec.kernels


def test_layers_point_one_way(graph):
    """models, decode and drafts import nothing from the layers above them (statically)."""
    bad = [f"{module} -> {target}"
           for package, forbidden in FORBIDDEN.items()
           for module, targets in sorted(graph.items()) if _under(module, package)
           for target in sorted(targets) if any(_under(target, f) for f in forbidden)]
    assert not bad, "forbidden imports: " + "; ".join(bad)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search)."""
    done, stack, on_stack = set(), [], set()

    def visit(node):
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in done and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        on_stack.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_detects_a_cycle():
    """The cycle finder itself works: a -> b -> c -> a is reported, a DAG is not."""
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_module_graph_has_no_cycles(graph):
    """The jaxspec module graph is acyclic."""
    cycle = _find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _loaded_after(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """Modules under `prefixes` in sys.modules of a fresh interpreter after importing `modules`."""
    code = (f"import sys\nfor m in {modules!r}: __import__(m)\n"
            f"print(' '.join(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_runtime_imports_respect_the_layers():
    """Importing the model modules, or the decode loop, loads nothing of the layers above."""
    models = ["jaxspec.models.decoder", "jaxspec.models.cache", "jaxspec.models.layout"]
    loaded = _loaded_after(models, ("jaxspec.decode", "jaxspec.drafts", "jaxspec.checkpoint",
                                    "jaxspec.api", "jaxspec.generate"))
    assert not loaded, f"importing {models} loaded {loaded}"
    loaded = _loaded_after(["jaxspec.decode.loop"],
                           ("jaxspec.checkpoint", "jaxspec.api", "jaxspec.generate"))
    assert not loaded, f"importing jaxspec.decode.loop loaded {loaded}"


def test_the_decoding_path_does_not_import_flax():
    """What the CLI loads at run time (the API, the loaders, the drafts) leaves flax out: its
    import (flax.linen) cost every process about 0.3 s (jaxspec.pytree does what flax.struct
    did)."""
    modules = ["jaxspec.api", "jaxspec.checkpoint.load", "jaxspec.drafts.registry",
               "jaxspec.drafts.head", "jaxspec.decode.loop"]
    assert _loaded_after(modules, ("flax",)) == []
