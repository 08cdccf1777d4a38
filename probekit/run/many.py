"""Many runs as one dataset: :func:`open_runs`, and one run back out of it (:func:`select_run`).

``pk.open_runs("runs/*.zarr")`` opens every store with
:func:`probekit.run.store.open_run_lazy` (the single-run reader's checks, no
data read) and concatenates the runs along a ``run`` dimension: dask arrays
over each store's chunks, so that nothing is read until it is computed. Each
run's attributes become coordinates along ``run`` (``ds.model``, ``ds.seed``,
``ds.sel(run=ds.seed == 0)``); attributes every run shares stay in
``ds.attrs`` too. Layer coordinates that differ between runs (``reduction``,
``feature_dim`` in a sweep over reductions) become ``(run, layer)``
coordinates. Epochs are joined: a run with fewer epochs (one still being
written) is padded with the store's own fill values (NaN; ``step`` -1), the
``(run, epoch)`` coordinate ``completed`` says which epochs each run has, and
:func:`select_run` cuts a run back to its own epochs.

The runs must share their layers and metrics; when they do not, the error
names the runs that differ and how to choose compatible ones (``layers=``,
``metrics=``, ``join="inner"``, or a subset of the stores).

This module imports xarray and the run store: never torch.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal, Union

import numpy as np
import xarray as xr

from probekit.params import Options, check_params, choices
from probekit.run.schema import SCHEMA_VERSION, epoch_arrays, layout_of
from probekit.run.store import StoreError, open_run_lazy

__all__ = [
    "ATTR_PREFIX", "COMPLETED_COORD", "RUN_ATTR", "RUN_ATTR_JSON", "RUN_DIM", "STORE_COORD", "open_runs", "run_names",
    "select_run", "split_runs",
]

#: The dimension that indexes the runs of :func:`open_runs`' dataset.
RUN_DIM = "run"
#: The coordinate along ``run`` that holds each run's store path.
STORE_COORD = "store"
#: The ``(run, epoch)`` coordinate that says which epochs of the joined axis each run has completed.
COMPLETED_COORD = "completed"
#: The attribute of a coordinate made from a run attribute: the attribute's name.
RUN_ATTR = "run_attr"
#: Set on a run attribute's coordinate whose values are JSON text (the attribute was a list or a table).
RUN_ATTR_JSON = "run_attr_json"
#: Prefix of a run attribute's coordinate when its name is already a variable of the run (``l2``, ``baselines``).
ATTR_PREFIX = "attr_"

#: What :func:`open_runs`' arguments may be (see :func:`probekit.params.check_params`).
_CONSTRAINTS = {"join": [Options("exact", "inner")]}
_GLOB_CHARS = frozenset("*?[")

#: Runs to open: a glob pattern or a store path, a list of store paths, or a mapping from name to store path.
RunsLike = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]], Mapping[str, Union[str, os.PathLike]]]


def _is_url(path: object) -> bool:
    """An fsspec URL other than ``file://`` (which is a local path)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def _store_path(path: str | os.PathLike) -> Path | str:
    """A local store as a Path; a URL as it was written (a Path would fold its ``//``)."""
    return path if _is_url(path) else Path(path)


def _glob_url(text: str, storage_options: Mapping[str, object] | None) -> list[str]:
    """The stores a URL pattern matches, as URLs (sorted)."""
    import fsspec

    fs, pattern = fsspec.core.url_to_fs(text, **dict(storage_options or {}))
    return sorted(fs.unstrip_protocol(p) for p in fs.glob(pattern))


def _named_paths(runs: object, storage_options: Mapping[str, object] | None = None) -> dict[str, Path | str]:
    """``{run name: store path or URL}``: a glob's matches (sorted), a list's paths or a mapping's items."""
    if isinstance(runs, Mapping):
        named = {str(name): _store_path(path) for name, path in runs.items()}
    else:
        if isinstance(runs, (str, os.PathLike)):
            text = os.fspath(runs)
            if _is_url(text):
                found = _glob_url(text, storage_options) if _GLOB_CHARS & set(text) else [text]
                if not found:
                    raise FileNotFoundError(f"no run store matches {text!r}; check the pattern, or pass the stores' URLs")
                paths = found
            elif _GLOB_CHARS & set(text):
                found = sorted(glob.glob(text))
                if not found:
                    raise FileNotFoundError(
                        f"no run store matches {text!r} (looked from {os.getcwd()!r}); check the pattern, "
                        "or pass the stores' paths"
                    )
                paths = [Path(p) for p in found]
            else:
                paths = [Path(text)]
                inside = sorted(paths[0].glob("*.zarr")) if paths[0].is_dir() else []
                if inside and not (paths[0] / ".zmetadata").exists():
                    raise StoreError(
                        f"{text!r} is a folder holding {len(inside)} '*.zarr' folders, not a run store itself; pass "
                        f"{os.path.join(text, '*.zarr')!r} to open them all"
                    )
        elif isinstance(runs, Sequence):
            paths = [_store_path(p) for p in runs]
        else:
            raise TypeError(
                "open_runs takes a glob pattern ('runs/*.zarr'), a list of store paths or a mapping from name to "
                f"store path; got {type(runs).__name__}"
            )
        stems = [(p.rstrip("/").rsplit("/", 1)[-1] if isinstance(p, str) else p.name).removesuffix(".zarr")
                 for p in paths]
        names = stems if len(set(stems)) == len(stems) else [str(p) for p in paths]
        named = dict(zip(names, paths))
        if len(named) != len(paths):
            raise ValueError(f"the same store is given twice among {choices([str(p) for p in paths])}; pass each once")
    if not named:
        raise ValueError("open_runs needs at least one run store; got none")
    return named


def _differing(values: dict[str, tuple[str, ...]], what: str, option: str) -> str | None:
    """The one-line complaint when runs do not all have the same ``what`` (layers or metrics), else None."""
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, items in values.items():
        groups.setdefault(tuple(sorted(items)), []).append(name)
    if len(groups) == 1:
        return None
    first = next(iter(values.values()))
    shared = [item for item in first if all(item in other for other in values.values())]
    parts = [f"{choices([repr(n) for n in names], limit=4)} {'have' if len(names) > 1 else 'has'} "
             f"{choices(list(key), limit=6)}" for key, names in groups.items()]
    fix = (f"pass {option}={shared!r} (what they all have) or join='inner' to keep those"
           if shared else f"they share no {what[:-1]}: open runs with the same {what} in separate calls")
    return f"the runs differ in their {what}: {'; '.join(parts)}; {fix}, or open a subset of the stores"


def _coordinate(key: str, values: list[object]) -> xr.Variable:
    """One attribute across the runs as a coordinate along ``run``: typed when every run has it with one type, else
    objects (NaN where a run lacks it); lists and tables as JSON text, marked so that :func:`select_run` reads them back."""
    attrs: dict[str, object] = {RUN_ATTR: key}
    if any(isinstance(v, (list, tuple, dict)) for v in values):
        values = [None if v is None else json.dumps(v) for v in values]
        attrs[RUN_ATTR_JSON] = 1
    kinds = {type(v) for v in values}
    if None not in values and len(kinds) == 1 and kinds <= {str, bool, int, float}:
        array = np.array(values)
    elif None not in values and kinds <= {int, float}:
        array = np.array(values, dtype=np.float64)
    else:
        array = np.array(values, dtype=object)
    return xr.Variable(RUN_DIM, array, attrs=attrs)


def _select(ds: xr.Dataset, dim: str, wanted: Sequence[str], name: str, option: str) -> xr.Dataset:
    present = [str(v) for v in ds[dim].values]
    missing = [w for w in wanted if w not in present]
    if missing:
        raise ValueError(f"{option} {choices(missing)} are not in run {name!r}; it has: {choices(present)}")
    return ds.sel({dim: list(wanted)})


def open_runs(
    runs: RunsLike,
    *,
    layers: Sequence[str] | None = None,
    metrics: Sequence[str] | None = None,
    join: Literal["exact", "inner"] = "exact",
    storage_options: Mapping[str, object] | None = None,
) -> xr.Dataset:
    """Open many run stores as one lazy dataset along a ``run`` dimension.

    Nothing but metadata and coordinates is read: every data variable is a
    dask array over its store's chunks (``ds.probe.sel(metric="valid_error")
    .isel(epoch=-1).compute()`` reads one chunk per run). A store that a run is
    still writing is read up to its completed epochs, as :func:`probekit.open_run`
    reads it.

    Args:
        runs: A glob pattern (``"runs/*.zarr"``; runs named by their stores'
            names, ``a`` for ``runs/a.zarr``), a store path, a list of store paths,
            or a mapping from run name to store path.
        layers: Keep these layers of every run (each run must have them).
        metrics: Keep these metrics of every run (each run must have them).
        join: ``"exact"`` (the default): runs with other layers or metrics are
            refused, naming them; ``"inner"``: keep the layers and metrics all runs have.
        storage_options: the fsspec filesystem's options for stores given as URLs
            (``"s3://bucket/runs/*.zarr"`` globs there too), as for :func:`probekit.open_run`.

    Returns:
        A dataset with dims ``(run, layer, epoch, metric)`` (and ``baseline``,
        ``repeat`` where the runs have them); the runs' attributes as
        coordinates along ``run``, each marked with a ``run_attr`` attribute
        (named ``attr_NAME`` where ``NAME`` is already a variable, such as
        ``l2``; NaN where a run lacks it; a list as JSON text); each store's
        path as the ``store`` coordinate. Take one run
        back out with :func:`select_run`; :func:`probekit.explore` and
        :func:`probekit.compare` take the dataset as it is.

    Raises:
        FileNotFoundError: The pattern matches nothing, or a path does not exist.
        StoreError: A path is not a run store (the message names it).
        ValueError: The runs differ in their layers, metrics, baselines or repeats.

    Example:
        >>> ds = pk.open_runs("runs/sweep/*.zarr")
        >>> ds.probe.sel(metric="valid_error").isel(epoch=-1).to_pandas()   # run x layer, read now
        >>> pk.compare(ds.sel(run=ds.seed == 0))
    """
    check_params(_CONSTRAINTS, join=join)
    named = _named_paths(runs, storage_options)
    opened = {name: open_run_lazy(path, storage_options=storage_options if _is_url(path) else None)
              for name, path in named.items()}
    if layers is not None:
        opened = {name: _select(ds, "layer", [str(v) for v in layers], name, "layers") for name, ds in opened.items()}
    if metrics is not None:
        opened = {name: _select(ds, "metric", [str(v) for v in metrics], name, "metrics") for name, ds in opened.items()}
    first = next(iter(opened.values()))
    for dim, what, option in (("layer", "layers", "layers"), ("metric", "metrics", "metrics")):
        values = {name: tuple(str(v) for v in ds[dim].values) for name, ds in opened.items()}
        order = [str(v) for v in first[dim].values]
        if join == "inner":
            keep = [v for v in order if all(v in other for other in values.values())]
            if not keep:
                raise ValueError(_differing(values, what, option))
            opened = {name: ds.sel({dim: keep}) for name, ds in opened.items()}
        else:
            problem = _differing(values, what, option)
            if problem:
                raise ValueError(problem)
            opened = {name: ds.sel({dim: order}) for name, ds in opened.items()}
    for dim, what in (("baseline", "baselines"), ("repeat", "repeats")):
        values = {name: tuple(str(v) for v in ds[dim].values) if dim in ds.dims else () for name, ds in opened.items()}
        if len(set(values.values())) > 1:
            listed = "; ".join(f"{name!r}: {', '.join(v) or 'none'}" for name, v in values.items())
            raise ValueError(f"the runs differ in their {what} ({listed}); open runs with the same {what} together")
    return _concat(opened, named)


def _concat(opened: dict[str, xr.Dataset], named: dict[str, Path]) -> xr.Dataset:
    first = next(iter(opened.values()))
    taken = set(first.variables) | set(first.dims) | {RUN_DIM, STORE_COORD}
    keys = list(dict.fromkeys(k for ds in opened.values() for k in ds.attrs if k != "probekit_schema"))
    attr_coords = {}
    for key in keys:
        coord = f"{ATTR_PREFIX}{key}" if key in taken else key
        attr_coords[coord] = _coordinate(key, [ds.attrs.get(key) for ds in opened.values()])
    shared = {k: v for k, v in first.attrs.items()
              if all(k in ds.attrs and _same(ds.attrs[k], v) for ds in opened.values())}
    fills = {name: value.flat[0] for name, value in epoch_arrays(layout_of(first), [], capacity=1).items()
             if name != "epoch"}
    fills[COMPLETED_COORD] = False
    runs = [ds.drop_attrs(deep=False).assign_coords({COMPLETED_COORD: ("epoch", np.ones(ds.sizes["epoch"], bool))})
            for ds in opened.values()]
    ds = xr.concat(runs, dim=RUN_DIM, data_vars="all", coords="different", compat="equals", join="outer",
                   fill_value=fills, combine_attrs="drop")
    completed = ds[COMPLETED_COORD]
    if RUN_DIM not in completed.dims:  # every run has every epoch: concat kept the one copy
        ds = ds.assign_coords({COMPLETED_COORD: completed.expand_dims({RUN_DIM: len(runs)}).variable})
    ds = ds.assign_coords({RUN_DIM: np.array(list(opened), dtype=str),
                           STORE_COORD: (RUN_DIM, np.array([str(named[n]) for n in opened], dtype=str)), **attr_coords})
    ds.attrs = {"probekit_schema": SCHEMA_VERSION, **shared}
    return ds


def _same(a: object, b: object) -> bool:
    try:
        return bool(np.all(a == b)) and type(a) is type(b)
    except (TypeError, ValueError):
        return False


def run_names(ds: xr.Dataset) -> list[str]:
    """The names of the runs of an :func:`open_runs` dataset, in order.

    Example:
        >>> run_names(pk.open_runs("runs/sweep/*.zarr"))[:2]
        ['seed=0', 'seed=1']
    """
    if RUN_DIM not in ds.dims:
        raise ValueError(f"this dataset has no {RUN_DIM!r} dimension; open several runs with probekit.open_runs")
    return [str(v) for v in ds[RUN_DIM].values]


def select_run(ds: xr.Dataset, run: str) -> xr.Dataset:
    """One run of an :func:`open_runs` dataset, as :func:`probekit.open_run` would give it (still lazy).

    Its attributes come back from their coordinates, its layer coordinates lose
    the ``run`` dimension, and its epoch axis is cut back to its own epochs
    (those another run added are dropped).

    Args:
        ds: A dataset with a ``run`` dimension.
        run: A name on its ``run`` coordinate.

    Example:
        >>> one = select_run(pk.open_runs("runs/sweep/*.zarr"), "seed=0").load()
        >>> pk.diagnose(one)
    """
    names = run_names(ds)
    if run not in names:
        raise ValueError(f"run={run!r} is not in this dataset; choose from: {choices(names)}")
    one = ds.sel({RUN_DIM: run})
    attrs = {"probekit_schema": ds.attrs.get("probekit_schema", SCHEMA_VERSION)}
    dropped = [RUN_DIM, STORE_COORD, COMPLETED_COORD]
    for name, coord in one.coords.items():
        if RUN_ATTR in coord.attrs and coord.ndim == 0:
            value = coord.values.item()
            lacking = value is None or (coord.dtype == object and isinstance(value, float) and np.isnan(value))
            if not lacking:  # xarray keeps a lacking value of an object coordinate as NaN
                attrs[str(coord.attrs[RUN_ATTR])] = json.loads(value) if coord.attrs.get(RUN_ATTR_JSON) else value
            dropped.append(name)
    own = np.flatnonzero(np.asarray(one[COMPLETED_COORD].values, dtype=bool))
    one = one.drop_vars([name for name in dropped if name in one.variables])
    if own.size != one.sizes["epoch"]:
        one = one.isel(epoch=own)
    one.attrs = attrs
    return one


def split_runs(ds: xr.Dataset) -> dict[str, xr.Dataset]:
    """Every run of an :func:`open_runs` dataset, by name (see :func:`select_run`).

    Example:
        >>> {name: one.sizes["epoch"] for name, one in split_runs(ds).items()}
    """
    return {name: select_run(ds, name) for name in run_names(ds)}
