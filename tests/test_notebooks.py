"""Every notebook under notebooks/ runs top to bottom in a fresh kernel, and is stored without outputs.

Each notebook has one code cell tagged ``parameters``; the test inserts a cell
after it with CI's values (papermill's convention), runs the notebook with
nbclient in this interpreter's kernel, and fails on the first failing cell.
A last cell reports the kernel's peak memory (``VmHWM``), which must
stay under Binder's budget. Children are reported, not counted: a forked
child's peak includes pages it shares with the kernel, and no notebook starts
a long-lived child process. How long each notebook takes is a benchmark
figure (``python -m benchmarks --only 8``), not an assertion here.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
EXPECTED = ["01-quickstart", "02-monitor-training", "03-inception-vs-resnet", "04-dead-layers", "05-workshop",
            "06-transformers"]
#: Peak memory a notebook's kernel may use (Binder gives 1-2 GB).
MEMORY_LIMIT_MB = 1536
#: Seconds one cell may run before the run counts as hung.
CELL_TIMEOUT_S = 900

#: CI's parameters, by notebook; every name must be a parameter of that notebook.
#: ``{tmp}`` becomes the run's working folder, ``{root}`` this checkout.
CI_PARAMETERS: dict[str, dict[str, object]] = {
    "01-quickstart": {"LIMIT": 200, "EPOCHS": 1},
    "02-monitor-training": {"LIMIT": 200, "EPOCHS": 2, "STORE": "{tmp}/monitor.zarr", "INTERVAL": 0.25},
    "03-inception-vs-resnet": {"RUNS_DIR": "{root}/data/runs"},
    "04-dead-layers": {"RUNS_DIR": "{root}/data/runs"},
    "05-workshop": {"LIMIT": 200, "EPOCHS": 2},
    "06-transformers": {"N_TRAIN": 400, "EPOCHS": 2},
}

# The kernel's own peak is VmHWM, the high-water mark of its address space: unlike
# ru_maxrss, it starts afresh at exec and so does not inherit the peak of the
# process that launched the kernel (pytest, grown by earlier tests).
_PEAK_MEMORY_CELL = """\
import json, re, resource
hwm = int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)) / 1024
print("PEAK_MEMORY_MB", json.dumps({"kernel": hwm,
                                    "children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))"""


def jupyter_home(home: Path) -> dict[str, str]:
    """Jupyter's folders under ``home``, with a ``python3`` kernelspec that runs this interpreter;
    returns the environment variables that point Jupyter there."""
    spec_dir = home / "data" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (probekit tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return {
        "JUPYTER_PATH": str(home / "data"),
        "JUPYTER_DATA_DIR": str(home / "data"),
        "JUPYTER_CONFIG_DIR": str(home / "config"),
        "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
        "IPYTHONDIR": str(home / "ipython"),
    }


@pytest.fixture(scope="session")
def kernel_environment(tmp_path_factory):
    """A ``python3`` kernelspec that runs this interpreter, ahead of any other on the Jupyter path."""
    values = jupyter_home(tmp_path_factory.mktemp("jupyter"))
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        yield values


def parameter_cell(nb: nbformat.NotebookNode) -> int:
    """Index of the notebook's one cell tagged ``parameters``."""
    found = [i for i, cell in enumerate(nb.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(found) == 1, f"expected one cell tagged 'parameters', found {len(found)}"
    return found[0]


def with_parameters(nb: nbformat.NotebookNode, values: dict[str, object]) -> nbformat.NotebookNode:
    """A copy of ``nb`` with a cell setting ``values`` right after its parameters cell."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    index = parameter_cell(nb)
    defined = set(re.findall(r"^([A-Z][A-Z0-9_]*)\s*=", nb.cells[index].source, flags=re.M))
    unknown = sorted(set(values) - defined)
    assert not unknown, f"{unknown} are not parameters of this notebook; it has {sorted(defined)}"
    source = "\n".join(f"{name} = {value!r}" for name, value in values.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cell["id"] = "injected-parameters"
    nb.cells.insert(index + 1, cell)
    return nb


def ci_values(path: Path, tmp: Path) -> dict[str, object]:
    """CI's parameters for the notebook at ``path``, with ``{tmp}`` and ``{root}`` filled in."""
    return {
        name: value.format(tmp=tmp, root=ROOT) if isinstance(value, str) else value
        for name, value in CI_PARAMETERS[path.stem].items()
    }


def run_notebook(path: Path, values: dict[str, object], workdir: Path) -> dict[str, float]:
    """Execute a notebook with ``values`` in ``workdir``; returns the peak memory in MB of its kernel and children."""
    nb = with_parameters(nbformat.read(path, as_version=4), values)
    nb.cells.append(nbformat.v4.new_code_cell(_PEAK_MEMORY_CELL))
    nb.cells[-1]["id"] = "peak-memory"
    client = NotebookClient(
        nb, kernel_name="python3", timeout=CELL_TIMEOUT_S, store_widget_state=True,
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    text = "".join(output.get("text", "") for output in nb.cells[-1].outputs)
    memory = json.loads(text.split("PEAK_MEMORY_MB", 1)[1])
    nbformat.validate(nb)
    return memory


def test_the_notebooks_are_there():
    assert [path.stem for path in NOTEBOOKS] == EXPECTED
    assert sorted(CI_PARAMETERS) == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    parameter_cell(nb)
    assert nb.metadata.kernelspec.name == "python3"
    assert "widgets" not in nb.metadata, "widget state is saved in the notebook; strip it"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"cell {cell.id} has outputs; strip them"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_runs_top_to_bottom(path, tmp_path, kernel_environment, capsys):
    before = sorted(os.listdir(NOTEBOOK_DIR))
    memory = run_notebook(path, ci_values(path, tmp_path), tmp_path)
    with capsys.disabled():
        print(f"\n{path.stem}: peak memory {memory['kernel']:.0f} MB (children {memory['children']:.0f} MB)")
    assert memory["kernel"] < MEMORY_LIMIT_MB
    assert sorted(os.listdir(NOTEBOOK_DIR)) == before, "the notebook wrote into notebooks/; write under its workdir"
