"""The Binder configuration parses, pins CPU-only torch, and resolves with pip.

mybinder.org cannot be reached from here, and neither can PyTorch's CPU index,
so the resolver check is offline: pip's resolver runs in ``--dry-run`` mode with
``--no-index`` on ``binder/requirements.txt`` with two substitutions, against
the packages installed in this environment:

* the ``+cpu`` local labels are dropped, so that ``torch==2.14.1`` is satisfied
  by the torch installed here (whatever its build); this also checks that
  Binder gets the torch version the tests run with;
* ``-e .`` becomes the checkout's path (a regular install): pip builds the
  project's metadata with the installed hatchling (``--no-build-isolation``),
  where an editable build would need the ``editables`` package, which pip's
  build isolation fetches on Binder.

pip then resolves every dependency of ``pyproject.toml`` against those pins.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def requirement_lines() -> list[str]:
    lines = []
    for raw in (BINDER / "requirements.txt").read_text().splitlines():
        line = raw.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            lines.append(line)
    return lines


def pinned() -> dict[str, Requirement]:
    return {
        (req := Requirement(line)).name: req
        for line in requirement_lines()
        if not line.startswith("-")
    }


def test_runtime_is_the_tested_python():
    text = (BINDER / "runtime.txt").read_text().strip()
    assert re.fullmatch(r"python-3\.\d+", text), f"runtime.txt must read python-3.X; got {text!r}"
    assert Version(text.split("-")[1]).release >= (3, 10)


def test_requirements_parse_and_install_cpu_torch_and_this_checkout():
    lines = requirement_lines()
    options = [line for line in lines if line.startswith("-")]
    assert f"--extra-index-url {CPU_INDEX}" in options
    assert "-e ." in options, "binder must install this checkout (-e .), never 'probekit' from PyPI"
    assert set(options) == {f"--extra-index-url {CPU_INDEX}", "-e ."}
    reqs = pinned()
    assert set(reqs) == {"torch", "torchvision"}
    for name, req in reqs.items():
        (spec,) = req.specifier
        assert spec.operator == "==" and Version(spec.version).local == "cpu", f"{name} must be pinned to a +cpu build"


def test_pins_meet_the_project_dependencies():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(line).name: Requirement(line) for line in project["dependencies"]}
    for name, req in pinned().items():
        version = Version(next(iter(req.specifier)).version)
        assert wanted[name].specifier.contains(version), f"{name} {version} does not meet pyproject's {wanted[name]}"


@pytest.mark.slow
def test_pip_resolves_the_requirements_offline(tmp_path):
    lines = [
        str(ROOT) if line == "-e ." else re.sub(r"\+cpu\b", "", line)
        for line in requirement_lines()
    ]
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("\n".join(lines) + "\n")
    report = tmp_path / "report.json"
    command = [
        sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--no-index", "--no-build-isolation",
        "--quiet", "--report", str(report), "-r", str(requirements),
    ]
    result = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, f"pip's resolver refused binder/requirements.txt:\n{result.stderr[-3000:]}"
    installs = {item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())["install"]}
    assert set(installs) == {"probekit"}, f"everything but the checkout should already be satisfied; would install {installs}"


#: The modules each runtime dependency of pyproject.toml provides, where the name differs.
_MODULES = {"scikit-learn": "sklearn", "vl-convert-python": "vl_convert"}


def test_notebooks_import_only_what_binder_installs():
    """Binder installs the checkout and its runtime dependencies, never the test extras (timm, transformers):
    every import of every notebook's code cells is the standard library's, probekit's or one of those."""
    import ast

    import nbformat

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    allowed = {"probekit", "IPython"} | {_MODULES.get(name, name) for name in
                                         (Requirement(line).name for line in project["dependencies"])}
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.cell_type != "code":
                continue
            source = "\n".join(line for line in cell.source.splitlines() if not line.lstrip().startswith(("%", "!")))
            tree = ast.parse(source.replace("await ", ""))
            for node in ast.walk(tree):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
                for name in names:
                    root = name.split(".")[0]
                    assert root in allowed or root in sys.stdlib_module_names, (
                        f"{path.name} imports {name}, which Binder does not install (allowed: {sorted(allowed)})")


def test_post_build_opens_the_quickstart(tmp_path):
    """binder/postBuild is valid bash and points JupyterLab's default URL at the quickstart."""
    script = BINDER / "postBuild"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", str(script)], check=True, env={**os.environ, "HOME": str(tmp_path)})
    config = (tmp_path / ".jupyter" / "jupyter_server_config.py").read_text()
    assert 'default_url = "/lab/tree/notebooks/01-quickstart.ipynb"' in config
    assert (ROOT / "notebooks" / "01-quickstart.ipynb").exists()
