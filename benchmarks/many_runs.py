"""Figure 10: eight runs as one ``probekit sweep`` on a dask LocalCluster, against the same runs one after another.

Both sides run the same eight cells, the paper's convnet on the embedded
digits with seeds 0 to 7 (``--limit`` examples per split, ``--epochs``
training epochs, every default probe point), each cell in its own
``python -m probekit.cli run`` process (:func:`probekit.sweep.run_cell`) and
into a fresh store. The baseline runs the cells one after another with torch's
default threads; the sweep (:func:`probekit.sweep.run_sweep`) runs them on a
LocalCluster of one worker per core, each cell's process with the cores
shared among the workers. The figure is the sweep's wall time over the
baseline's, the two interleaved in one invocation: below 1, the sweep is
faster. Every cell of both sides must end done.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from benchmarks.measure import Row, interleave
from probekit.sweep import cells_of, run_cell, run_sweep

CONFIG = {
    "quick": {"runs": 8, "epochs": 0, "limit": 60, "reps": 1},
    "full": {"runs": 8, "epochs": 2, "limit": 400, "reps": 2},
}
#: The sweep's wall time over the sequential runs', on two or more idle cores.
TARGET = 0.75


def run(size: str) -> list[Row]:
    config = CONFIG[size]
    cells = cells_of({"seed": [str(s) for s in range(config["runs"])]},
                     ["--epochs", str(config["epochs"]), "--limit", str(config["limit"]), "--device", "cpu"])
    workers = max(1, min(len(cells), os.cpu_count() or 1))
    root = Path(tempfile.mkdtemp(prefix="probekit-bench-sweep-"))
    outcomes = {"sequential": [], "sweep": []}
    counter = iter(range(10_000))

    def sequential() -> None:
        out = root / f"sequential-{next(counter)}"
        out.mkdir()
        outcomes["sequential"] += [run_cell(list(c.argv), str(out / f"{c.name}.zarr"))["ok"] for c in cells]

    def sweep() -> None:
        results = run_sweep(cells, root / f"sweep-{next(counter)}", workers=workers)
        outcomes["sweep"] += [r.status == "done" for r in results]

    try:
        pairs = interleave(sequential, sweep, reps=config["reps"], warmup=False)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    accurate = all(outcomes["sequential"]) and all(outcomes["sweep"])
    threads = max(1, (os.cpu_count() or 1) // workers)
    return [Row(
        figure="10 sweep", case=f"{len(cells)} runs, paper convnet, digits, {config['limit']} examples, "
                                f"{config['epochs']} epochs", baseline="the runs one after another",
        baseline_value=pairs.baseline_median, probekit_value=pairs.candidate_median, unit="s", target=TARGET,
        note=f"LocalCluster of {workers} workers, {threads} thread(s) per cell; "
             f"cells done: {sum(outcomes['sweep'])}/{len(outcomes['sweep'])} sweep, "
             f"{sum(outcomes['sequential'])}/{len(outcomes['sequential'])} one after another",
        extra=pairs.as_dict(), pair_ratio=pairs.ratio, accurate=accurate,
    )]
