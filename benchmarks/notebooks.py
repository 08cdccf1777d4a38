"""Figure 8: each notebook, top to bottom with CI's parameters, against its time budget.

The notebooks run as ``tests/test_notebooks.py`` runs them (the same
parameters, kernelspec and runner: that test asserts their peak memory); here
their wall time is measured against the budget a Binder session can afford.
``--quick`` runs the two notebooks that read the committed runs only.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from unittest import mock

from benchmarks.measure import Row
from tests.test_notebooks import NOTEBOOKS, ci_values, jupyter_home, run_notebook

#: Seconds a notebook may take with CI's parameters.
BUDGET_S = 180
CONFIG = {
    "quick": ["03-inception-vs-resnet", "04-dead-layers"],
    "full": [path.stem for path in NOTEBOOKS],
}


def run(size: str) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="probekit-notebooks-") as home, \
            mock.patch.dict(os.environ, jupyter_home(Path(home) / "jupyter")):
        for path in NOTEBOOKS:
            if path.stem not in CONFIG[size]:
                continue
            workdir = Path(home) / path.stem
            workdir.mkdir()
            start = time.perf_counter()
            memory = run_notebook(path, ci_values(path, workdir), workdir)
            seconds = time.perf_counter() - start
            rows.append(Row(
                figure="8 notebooks", case=f"{path.stem}, CI's parameters", baseline="time budget",
                baseline_value=BUDGET_S, probekit_value=seconds, unit="s", target=1.0,
                note=f"peak kernel memory {memory['kernel']:.0f} MB", extra={"memory_mb": memory},
            ))
    return rows
