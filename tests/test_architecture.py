"""The package's layout rules, read from the source: data flows one way, and each part imports only what it says.

docs/architecture.md draws the path (model -> engine -> run -> diagnosis / plots -> explorers);
these tests keep the code to it without importing anything heavy.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "probekit"

#: What each part of the package may import from the package (besides itself and probekit.params).
#: Parts are top-level modules or subpackages; "probekit" is the package's own __init__.
ALLOWED = {
    "params": set(),
    "run": set(),
    "engine": {"run"},
    "diagnosis": {"run"},
    "plots": {"run"},
    "explorers": {"run", "plots", "diagnosis"},
    "accessor": {"run", "plots", "diagnosis"},
    "data": set(),
    "zoo": {"engine"},
    "experiments": {"probekit", "engine", "run", "data", "zoo", "diagnosis", "plots", "accessor"},
    "integrations": {"probekit", "engine", "run"},
    "sweep": {"run"},
    "dashboard": {"run", "explorers"},
    "cli": {"probekit", "engine", "run", "data", "zoo", "diagnosis", "plots", "experiments", "accessor", "sweep",
            "dashboard"},
    "__main__": {"cli"},
    "probekit": {"accessor", "engine", "run", "diagnosis", "explorers", "plots", "data", "zoo", "experiments"},
}
#: Third-party packages a part must never import (it must work without them loaded).
FORBIDDEN = {
    "run/schema.py": {"torch", "zarr", "altair", "ipywidgets"},
    "engine/batch.py": {"numpy", "pandas", "xarray", "zarr", "torchvision", "altair", "ipywidgets"},
    "run": {"torch", "altair", "ipywidgets"},
    "diagnosis": {"torch", "zarr", "altair", "ipywidgets"},
    "plots": {"torch", "zarr", "ipywidgets"},
    "explorers": {"torch"},
    "dashboard": {"torch"},
    "accessor": {"torch", "zarr", "ipywidgets"},
    "params": {"torch", "numpy", "xarray", "zarr"},
    "engine": {"altair", "ipywidgets"},
    "data": {"altair", "ipywidgets"},
    "zoo": {"altair", "ipywidgets"},
    "sweep": {"torch", "altair", "ipywidgets"},
}


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _part(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    if rel.parts == ("__init__.py",):
        return "probekit"
    return rel.parts[0].removesuffix(".py")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (lazy imports included)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            if module == "probekit" or module.startswith("probekit."):
                found.update(f"{module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_each_part_imports_only_what_flows_into_it(path):
    part = _part(path)
    allowed = ALLOWED[part] | {part, "params"}
    bad = []
    for name in _imports(path):
        if not name.startswith("probekit."):
            continue  # a bare "from probekit import x" is checked through x
        pieces = name.split(".")
        target = "probekit" if len(pieces) == 1 else pieces[1]
        if target == "__version__" or (len(pieces) == 2 and not _is_module(name) and target not in ALLOWED):
            continue  # a name imported from the package's __init__ (e.g. __version__)
        if target not in allowed:
            bad.append(name)
    assert not bad, f"{path.relative_to(ROOT)} ({part}) imports {sorted(bad)}; {part} may import only {sorted(allowed)}"


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_heavy_libraries_stay_out_of_the_parts_that_promise_it(path):
    rel = str(path.relative_to(PACKAGE))
    rules = FORBIDDEN.get(rel, set()) | FORBIDDEN.get(_part(path), set())
    roots = {name.split(".")[0] for name in _imports(path)}
    assert not roots & rules, f"{rel} imports {sorted(roots & rules)}, which it must never import"


def test_the_batch_module_is_the_first_of_the_engine():
    """engine/batch.py (what a batch is, how a model is called with it) imports no other probekit module."""
    found = {n for n in _imports(PACKAGE / "engine" / "batch.py") if n == "probekit" or n.startswith("probekit.")}
    assert not found, f"probekit/engine/batch.py imports {sorted(found)}; it must import only torch"


def test_no_import_cycles_between_modules():
    graph = {}
    for path in _modules():
        name = _module_name(path)
        graph[name] = {n for n in _imports(path) if n.startswith("probekit.") and _is_module(n) and n != name}
    # Importing a submodule runs its package's __init__; imports of a package by its own children are not edges.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("path", _modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_has_a_docstring_and_an_all(path):
    tree = ast.parse(path.read_text())
    assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no module docstring saying what it owns"
    if path.name == "__main__.py":
        return
    names = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
             for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    assert "__all__" in names, f"{path.relative_to(ROOT)} has no __all__"


def test_importing_the_package_loads_neither_torch_nor_zarr():
    code = "import sys, probekit; sys.exit(sorted(m for m in ('torch', 'zarr') if m in sys.modules) or 0)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr or result.stdout


def test_dir_of_the_package_is_its_public_api():
    import probekit as pk

    names = dir(pk)
    assert len(names) == len(set(names))
    assert not {"annotations", "importlib", "accessor"} & set(names)
    for name in pk.__all__:
        assert getattr(pk, name) is not None
    for name in ("Plan", "StoreError", "Explorer", "Comparison", "experiments"):
        assert name in names


def test_explore_and_compare_stay_functions_after_their_subpackage_is_imported():
    code = ("import probekit as pk, probekit.explorers, probekit.explorers.compare; "
            "import sys; sys.exit(0 if callable(pk.explore) and callable(pk.compare) else 1)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr or "pk.explore or pk.compare became a module"


@pytest.mark.parametrize("doc", ["docs/reliability.md", "docs/store.md", "docs/architecture.md", "README.md"])
def test_the_docs_name_tests_and_modules_that_exist(doc):
    """Every ``tests/...py::test_name`` (or ``::test_name`` after one) and probekit module a doc names is real."""
    import re

    text = (ROOT / doc).read_text()
    last, missing = None, []
    for match in re.finditer(r"`(tests/[\w/]+\.py)?(::[\w-]+)?[^`]*`", text):
        path, test = match.group(1), match.group(2)
        last = path or last
        if path and not (ROOT / path).is_file():
            missing.append(path)
        elif test and last and not re.search(rf"def {re.escape(test[2:])}\b", (ROOT / last).read_text()):
            missing.append(f"{last}{test}")
    for module in set(re.findall(r"`(probekit(?:\.\w+)+)`", text)):
        if not _is_module(module) and not _is_module(module.rpartition(".")[0]):
            missing.append(module)
    assert not missing, f"{doc} names what does not exist: {missing}"
