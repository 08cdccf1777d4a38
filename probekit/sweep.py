"""Sweeps: a grid of ``probekit run`` cells on a dask.distributed cluster, one run store per cell, resumable.

A sweep is the product of a grid over the options of ``probekit run``
(``{"seed": ["0", "1"], "reduce": ["pool", "subset100"]}``: four cells), each
cell with the arguments every cell shares. Each cell runs
``python -m probekit.cli run ARGS --out OUT/CELL.zarr`` in a process of its own,
on a dask worker, and writes its own store, named from its cell
(``OUT/seed=0,reduce=pool.zarr``): a cell that fails or crashes (a bad layer
name, a killed process) is one line in the sweep's summary, and the other
cells go on.

The summary, ``OUT/sweep.json``, is rewritten whenever a cell ends (one atomic
file, :func:`probekit.run.store.write_atomic`). Running the same sweep again
skips the cells it records as done with the same arguments whose store is
there, and resumes the others whose store exists (``--resume``: a run
continues from its completed epochs and its training checkpoint); cells
without a store start afresh. :func:`open_sweep` opens the cells done as one
lazy dataset (:func:`probekit.open_runs`), with each grid option as a
coordinate along ``run`` (``grid_lr``, ``grid_seed``).

The cluster is a ``LocalCluster`` on this machine by default (threads that
each wait on one cell's process), or any dask scheduler by its address
(``tcp://host:8786``), with the same code: its workers must reach ``OUT`` (a
shared file system) and run the same probekit.

This module imports numpy, xarray, the run store and :mod:`probekit.run.many`,
and dask.distributed when a sweep runs: never torch, never argparse (the
``probekit sweep`` command is :mod:`probekit.cli`'s).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import xarray as xr

from probekit.params import choices
from probekit.run.many import open_runs
from probekit.run.store import write_atomic

__all__ = [
    "GRID_PREFIX", "RESERVED", "SUMMARY_FILE", "THREAD_VARIABLES", "Cell", "CellResult", "cells_of", "load_spec",
    "open_sweep", "option_argv", "parse_grid", "run_cell", "run_sweep",
]

#: The sweep's summary, in its output folder.
SUMMARY_FILE = "sweep.json"
#: ``probekit run`` options the sweep sets itself, per cell.
RESERVED = ("out", "resume", "overwrite", "quiet")
#: Environment variables that set a cell's threads (torch reads ``OMP_NUM_THREADS`` when it starts).
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
_SAFE = re.compile(r"[^A-Za-z0-9._,=+-]")
#: Prefix of the coordinate along ``run`` that :func:`open_sweep` makes of each grid option (``grid_lr``).
GRID_PREFIX = "grid_"
#: The one-line error of a cell is cut to this many characters.
_ERROR_WIDTH = 400


@dataclass(frozen=True)
class Cell:
    """One run of a sweep.

    Attributes:
        name: The cell's name, from its grid values (``seed=0,reduce=pool``); its store is ``NAME.zarr``.
        values: The cell's grid values, ``(option, value)`` in grid order.
        argv: The ``probekit run`` arguments of the cell, without ``--out``, ``--resume`` and ``--quiet``.
    """

    name: str
    values: tuple[tuple[str, str], ...]
    argv: tuple[str, ...]


@dataclass
class CellResult:
    """How one cell of a sweep ended.

    Attributes:
        name: The cell's name.
        status: ``"done"``, ``"failed"`` or ``"skipped"`` (done by an earlier run of the sweep).
        seconds: The cell's wall time in this run of the sweep (0 when skipped).
        error: The cell's error, one line (empty unless failed).
        resumed: The cell continued a store an earlier run left.
        store: The cell's store.
        values: The cell's grid values, ``{option: value}``.
    """

    name: str
    status: Literal["done", "failed", "skipped"]
    seconds: float
    store: str
    error: str = ""
    resumed: bool = False
    values: dict = field(default_factory=dict)


def _option(key: object) -> str:
    """A grid or argument key as the option name of ``probekit run``: ``model_arg`` and ``--model-arg`` are ``model-arg``."""
    return str(key).strip().removeprefix("--").replace("_", "-")


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """``["seed=0,1", "reduce=pool,subset100"]`` (``--grid`` options) as ``{option: [values]}``.

    Example:
        >>> parse_grid(["seed=0,1", "reduce=pool"])
        {'seed': ['0', '1'], 'reduce': ['pool']}
    """
    grid: dict[str, list[str]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        values = [v.strip() for v in text.split(",")]
        if not sep or not key.strip() or not all(values):
            raise ValueError(f"--grid {item!r} is not KEY=V1,V2,...; e.g. --grid seed=0,1 (a value holding a comma "
                             "goes in a --spec file)")
        _add(grid, _option(key), values, "--grid")
    return grid


def _add(grid: dict[str, list[str]], key: str, values: list[str], source: str) -> None:
    if key in grid:
        raise ValueError(f"{source} names {key!r} twice; give all its values at once ({key}=a,b)")
    if len(set(values)) != len(values):
        raise ValueError(f"{source} {key!r} repeats a value ({', '.join(values)}); give each value once")
    grid[key] = values


def option_argv(options: Mapping[str, object]) -> list[str]:
    """``probekit run`` arguments from ``{option: value}``: True is a bare flag, False or None leaves it out,
    a list repeats the option (``model-arg``).

    Example:
        >>> option_argv({"epochs": 2, "model_arg": ["width=8", "depth=2"]})
        ['--epochs', '2', '--model-arg', 'width=8', '--model-arg', 'depth=2']
    """
    argv: list[str] = []
    for key, value in options.items():
        flag = f"--{_option(key)}"
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            for item in value:
                argv += [flag, str(item)]
        else:
            argv += [flag, str(value)]
    return argv


def load_spec(path: str | os.PathLike) -> tuple[dict[str, list[str]], list[str]]:
    """A sweep's spec file (JSON, or TOML on Python 3.11+) as ``(grid, shared arguments)``.

    The file holds a ``grid`` table, ``{option: [values]}``, and optionally an
    ``args`` table, ``{option: value}``, with the arguments every cell shares
    (see :func:`option_argv`)::

        {"grid": {"seed": [0, 1], "layers": ["input,fc2", "all"]}, "args": {"epochs": 2, "limit": 100}}

    Example:
        >>> grid, shared = load_spec("sweep.json")
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise FileNotFoundError(f"cannot read the sweep spec {str(path)!r} ({error.strerror or error}); check the path") from None
    try:
        if path.suffix == ".toml":
            try:
                import tomllib
            except ImportError:
                raise ValueError(f"{str(path)!r} is TOML, which needs Python 3.11 or later; write the spec as JSON") from None
            spec = tomllib.loads(text)
        else:
            spec = json.loads(text)
    except ValueError as error:
        if "needs Python" in str(error):
            raise
        first = str(error).splitlines()[0]
        raise ValueError(f"the sweep spec {str(path)!r} cannot be read ({first}); it is JSON (or .toml) with a "
                         "'grid' table and an optional 'args' table") from None
    unknown = sorted(set(spec) - {"grid", "args"}) if isinstance(spec, dict) else []
    if not isinstance(spec, dict) or not isinstance(spec.get("grid"), dict) or unknown:
        what = f"unknown tables {unknown}" if unknown else "no 'grid' table"
        raise ValueError(f"the sweep spec {str(path)!r} has {what}; it holds 'grid' ({{option: [values]}}) and "
                         "optionally 'args' ({option: value})")
    grid: dict[str, list[str]] = {}
    for key, values in spec["grid"].items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"the sweep spec's grid entry {key!r} must be a non-empty list of values; got {values!r}")
        _add(grid, _option(key), [str(v) for v in values], "the sweep spec's grid")
    shared = spec.get("args", {})
    if not isinstance(shared, dict):
        raise ValueError(f"the sweep spec's 'args' must be a table of option: value; got {shared!r}")
    return grid, option_argv(shared)


def _cell_name(values: Sequence[tuple[str, str]]) -> str:
    return _SAFE.sub("_", ",".join(f"{key}={value}" for key, value in values)) or "cell"


def cells_of(grid: Mapping[str, Sequence[str]], shared: Sequence[str] = ()) -> list[Cell]:
    """Every cell of ``grid`` (the product of its values, in its order), each with the ``shared`` arguments first.

    A cell's name joins its ``option=value`` pairs with commas, any character
    other than letters, digits and ``._,=+-`` replaced by ``_``; cells whose
    names would collide get a short hash of their values.

    Example:
        >>> [c.name for c in cells_of({"seed": ["0", "1"]}, ["--epochs", "2"])]
        ['seed=0', 'seed=1']
    """
    given = [*grid, *(a[2:].partition("=")[0] for a in shared if a.startswith("--"))]
    for key in given:
        if key in RESERVED:
            raise ValueError(f"--{key} is set by the sweep for each cell (its store is OUT/CELL.zarr); "
                             "leave it out of the grid and the shared arguments")
    keys = list(grid)
    cells = []
    for combination in itertools.product(*(grid[key] for key in keys)):
        values = tuple(zip(keys, (str(v) for v in combination)))
        cells.append(Cell(_cell_name(values), values, (*shared, *option_argv({k: [v] for k, v in values}))))
    counts: dict[str, int] = {}
    for cell in cells:
        counts[cell.name] = counts.get(cell.name, 0) + 1
    for i, cell in enumerate(cells):
        if counts[cell.name] > 1:
            digest = hashlib.sha1(json.dumps(cell.values).encode()).hexdigest()[:6]
            cells[i] = Cell(f"{cell.name}-{digest}", cell.values, cell.argv)
    return cells


def _cell_error(returncode: int, stderr: str) -> str:
    """A failed cell's error, one line: probekit's own message, a traceback's last line, or the signal that killed it."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    last = lines[-1].removeprefix("probekit: error: ") if lines else ""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        text = f"killed by {name}" + (f" (last output: {last})" if last else "")
    else:
        text = last or f"exit code {returncode} with no error output"
    return text if len(text) <= _ERROR_WIDTH else text[: _ERROR_WIDTH - 3] + "..."


def run_cell(argv: Sequence[str], store: str, *, resume: bool = False, threads: int | None = None) -> dict:
    """Run one cell: ``probekit run ARGV --out STORE --quiet`` in a process of its own; never raises.

    This is the task a worker runs. The process is this interpreter
    (``sys.executable -m probekit.cli``), with ``threads`` (when given) in
    :data:`THREAD_VARIABLES`.

    Returns:
        ``{"ok": bool, "seconds": float, "error": str}``, the error one line.

    Example:
        >>> run_cell(["--epochs", "1", "--limit", "100"], "runs/sweep/a.zarr")["ok"]
        True
    """
    command = [sys.executable, "-m", "probekit.cli", "run", *argv, "--out", str(store), "--quiet"]
    if resume:
        command.append("--resume")
    env = dict(os.environ)
    if threads:
        env.update({name: str(threads) for name in THREAD_VARIABLES})
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, env=env, stdin=subprocess.DEVNULL)
    except OSError as error:
        return {"ok": False, "seconds": time.perf_counter() - start,
                "error": f"cannot start {sys.executable} on this worker ({error.strerror or error})"}
    seconds = time.perf_counter() - start
    if proc.returncode == 0:
        return {"ok": True, "seconds": seconds, "error": ""}
    return {"ok": False, "seconds": seconds, "error": _cell_error(proc.returncode, proc.stderr)}


def _read_summary(out: Path) -> dict:
    path = out / SUMMARY_FILE
    if not path.exists():
        return {}
    try:
        summary = json.loads(path.read_text())
        return dict(summary["cells"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"the sweep summary {str(path)!r} cannot be read ({type(error).__name__}: {error}); "
                         "move it aside to start the sweep's record afresh (finished stores are resumed, not redone)") from None


def _write_summary(out: Path, cells: dict, grid: Mapping[str, Sequence[str]], shared: Sequence[str]) -> None:
    summary = {"probekit_sweep": 1, "grid": {k: list(v) for k, v in grid.items()}, "args": list(shared), "cells": cells}
    write_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=1).encode())


def _client(scheduler: str | None, workers: int):
    """A dask client of the scheduler at ``scheduler``, or of a new LocalCluster (closed with the client)."""
    from dask.distributed import Client, LocalCluster

    if scheduler:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError, ValueError) as error:
            raise OSError(f"cannot reach the dask scheduler at {scheduler!r} ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else 'no answer'}); start it (dask scheduler) "
                          "or leave --scheduler out to run on a LocalCluster here") from None
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, dashboard_address=None,
                           silence_logs=logging.ERROR)
    return Client(cluster), cluster


def run_sweep(
    cells: Sequence[Cell],
    out: str | os.PathLike,
    *,
    grid: Mapping[str, Sequence[str]] | None = None,
    shared: Sequence[str] = (),
    scheduler: str | None = None,
    workers: int | None = None,
    cell_threads: int | None = None,
    on_result: Callable[[CellResult], None] | None = None,
) -> list[CellResult]:
    """Run ``cells`` on a dask cluster, each into ``OUT/NAME.zarr``; skip the done ones, resume the unfinished.

    Args:
        cells: The cells (:func:`cells_of`).
        out: The sweep's folder: every cell's store and the summary ``sweep.json``.
        grid, shared: The grid and shared arguments the cells came from, recorded in the summary.
        scheduler: A dask scheduler's address (``tcp://host:8786``); None: a
            LocalCluster here, with ``workers`` workers.
        workers: LocalCluster workers (default: as many as cells to run, at most the CPU count).
        cell_threads: Threads of each cell's process (default: on a LocalCluster, the
            CPU count shared among the workers; with ``scheduler``, what the worker's environment says).
        on_result: Called with each cell's result as it ends (skipped cells first).

    Returns:
        Every cell's :class:`CellResult`, in the order of ``cells``.

    Example:
        >>> cells = cells_of({"seed": ["0", "1"]}, ["--epochs", "1", "--limit", "100"])
        >>> [r.status for r in run_sweep(cells, "runs/sweep")]
        ['done', 'done']
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file; the sweep writes a folder of stores (e.g. runs/sweep)")
    names = [cell.name for cell in cells]
    if len(set(names)) != len(names):
        raise ValueError(f"cells must have distinct names; got {choices(names)}")
    record = _read_summary(out)
    grid = dict(grid or {})
    results: dict[str, CellResult] = {}
    todo: list[tuple[Cell, Path, bool]] = []
    for cell in cells:
        store = out / f"{cell.name}.zarr"
        entry = record.get(cell.name, {})
        if entry.get("status") == "done" and entry.get("argv") == list(cell.argv) and store.exists():
            results[cell.name] = CellResult(cell.name, "skipped", 0.0, str(store), values=dict(cell.values))
            if on_result:
                on_result(results[cell.name])
            continue
        resume = store.exists()
        todo.append((cell, store, resume))
        record[cell.name] = {"values": dict(cell.values), "argv": list(cell.argv), "store": store.name,
                             "status": "running", "error": "", "seconds": None, "resumed": resume}
    if not todo:
        _write_summary(out, record, grid, shared)
        return [results[cell.name] for cell in cells]
    local = scheduler is None
    workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
    threads = cell_threads or (max(1, (os.cpu_count() or 1) // workers) if local else None)
    from dask.distributed import as_completed

    client, cluster = _client(scheduler, workers)  # first: an unreachable scheduler leaves nothing behind
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_summary(out, record, grid, shared)
        token = uuid.uuid4().hex[:8]
        futures = {
            client.submit(run_cell, list(cell.argv), str(store), resume=resume, threads=threads,
                          key=f"probekit-cell-{cell.name}-{token}", pure=False): (cell, store, resume)
            for cell, store, resume in todo
        }
        for future in as_completed(futures):
            cell, store, resume = futures[future]
            try:
                answer = future.result()
            except Exception as error:  # noqa: BLE001 - a lost worker or task is this cell's failure only
                first = str(error).splitlines()[0] if str(error) else ""
                answer = {"ok": False, "seconds": float("nan"), "error": f"{type(error).__name__}: {first}"}
            result = CellResult(cell.name, "done" if answer["ok"] else "failed", float(answer["seconds"]),
                                str(store), answer["error"], resume, dict(cell.values))
            results[cell.name] = result
            seconds = None if result.seconds != result.seconds else round(result.seconds, 3)  # NaN: a lost task
            record[cell.name].update(status=result.status, error=result.error, seconds=seconds,
                                     finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            _write_summary(out, record, grid, shared)
            if on_result:
                on_result(result)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
    return [results[cell.name] for cell in cells]


def open_sweep(
    out: str | os.PathLike,
    *,
    layers: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    join: Literal["exact", "inner"] = "exact",
) -> xr.Dataset:
    """The cells of a sweep that are done, as one lazy dataset along ``run``, with the grid's values as coordinates.

    The dataset is :func:`probekit.open_runs`' over the done cells' stores
    (runs named by their cells), with one coordinate along ``run`` per grid
    option, ``grid_`` and its name (``grid_lr``, ``grid_model_arg``), holding
    each cell's value as text: options a run does not record as an attribute
    (``lr``, ``epochs``) can be selected too.

    Args:
        out: The sweep's folder (``--out``).
        layers, metrics, join: As for :func:`probekit.open_runs`.

    Example:
        >>> ds = open_sweep("runs/sweep")
        >>> ds.probe.sel(metric="valid_error").isel(epoch=-1).where(ds.grid_lr == "0.1", drop=True)
    """
    out = Path(out)
    record = _read_summary(out)
    if not record:
        raise FileNotFoundError(f"no sweep in {str(out)!r} (it has no {SUMMARY_FILE}); run probekit sweep --out "
                                f"{str(out)!r} first, or open its stores with pk.open_runs")
    done = {name: out / entry["store"] for name, entry in record.items()
            if entry.get("status") == "done" and (out / entry["store"]).exists()}
    if not done:
        states = choices(sorted({str(entry.get("status")) for entry in record.values()}))
        raise ValueError(f"no cell of the sweep in {str(out)!r} is done yet ({len(record)} cells, {states}); "
                         "wait for one, or run the sweep again")
    ds = open_runs(done, layers=layers, metrics=metrics, join=join)
    keys = list(dict.fromkeys(key for name in done for key in record[name].get("values", {})))
    return ds.assign_coords({
        f"{GRID_PREFIX}{key.replace('-', '_')}": ("run", np.array([str(record[name]["values"].get(key, "")) for name in done]))
        for key in keys
    })
