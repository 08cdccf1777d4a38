"""The one module that reads and writes Zarr run stores (the schema itself is :mod:`probekit.run.schema`).

A run is an ``xarray.Dataset`` with a data variable ``probe`` of dims
``(layer, epoch, metric)``; ``docs/store.md`` documents every variable,
coordinate and attribute, and how a store stays readable while it is written
and after its writer is killed. In short: Zarr format 2 with consolidated
metadata, the epoch axis preallocated in blocks, each epoch written into its
region first and only then counted in the root attribute ``completed_epochs``
(one atomic file), and readers cut the epoch axis at that count.

It also owns the one atomic file writer, :func:`write_atomic`, which the
training checkpoints use too, and the writer's lock (``fcntl`` on POSIX,
``msvcrt`` on Windows, imported only when a writer takes it, so that reading
needs no POSIX-only module).

This module does not import torch.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from probekit.run.schema import (
    SCHEMA_VERSION, VARIABLE_DIMS, EpochRow, RunLayout, build_dataset, layout_for_shape, layout_of, row_values, rows_of,
)

__all__ = [
    "EPOCH_BLOCK", "LOCK_FILE", "READABLE_VERSIONS", "RunWriter", "StoreError", "StoreLockedError", "open_run", "open_run_lazy",
    "write_atomic",
]

#: Schema versions :func:`open_run` reads; older ones are upgraded in memory (:func:`_upgrade`), never on disk.
READABLE_VERSIONS = (1, SCHEMA_VERSION)
#: Epochs are preallocated, and chunked, in blocks of this many.
EPOCH_BLOCK = 64
LOCK_FILE = ".writer.lock"
#: Test hook (docs/store.md): a writer made while this is set to k kills its own
#: process with SIGKILL right after its k-th file write, so tests kill at chosen points.
_KILL_AFTER_WRITES = "PROBEKIT_KILL_AFTER_WRITES"


class StoreError(ValueError):
    """A path that is not a usable run store, or a store that does not fit the run."""


class StoreLockedError(StoreError):
    """Another live process is writing the store."""


# --------------------------------------------------------------------- reading
def _check_store_path(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"no run store at {str(path)!r}; check the path, or start a run with store={str(path)!r}")
    if not path.is_dir():
        raise StoreError(f"{str(path)!r} is a file, not a run store (a run store is a folder, e.g. 'runs/a.zarr')")
    if not (path / ".zmetadata").exists():
        if (path / ".zgroup").exists():
            raise StoreError(
                f"run store {str(path)!r} is damaged: its metadata file .zmetadata is missing; the arrays may still be "
                f"read with xarray.open_zarr({str(path)!r}, consolidated=False). Re-run into a new path to get a clean store"
            )
        what = "an empty folder" if not any(path.iterdir()) else "a folder without consolidated Zarr metadata (.zmetadata)"
        raise StoreError(f"{str(path)!r} is not a probekit run store: it is {what}; pass the folder a run wrote, or a new path")


def _read_meta(path: Path) -> dict:
    try:
        return json.loads((path / ".zmetadata").read_text())["metadata"]
    except (OSError, ValueError, KeyError) as error:
        raise StoreError(
            f"run store {str(path)!r} has a broken metadata file .zmetadata ({error}); nothing can be read from it. "
            "Re-run with resume=False into a new path"
        ) from error


def _root_attrs(path: Path, *, writing: bool = False) -> dict:
    attrs = _read_meta(path).get(".zattrs", {})
    version = attrs.get("probekit_schema")
    if version is None:
        raise StoreError(f"{str(path)!r} is a Zarr store but not a probekit run store (no 'probekit_schema' attribute)")
    if version not in READABLE_VERSIONS:
        raise StoreError(
            f"run store {str(path)!r} has schema version {version}; this probekit reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Open it with the probekit version that wrote it, or re-run into a new path"
        )
    if writing and version != SCHEMA_VERSION:
        raise StoreError(
            f"run store {str(path)!r} has schema version {version} (this probekit writes version {SCHEMA_VERSION}); "
            "it can be read but not continued. Pass overwrite=True (--overwrite) to replace it, or write to another path"
        )
    return attrs


def _upgrade(ds: xr.Dataset) -> xr.Dataset:
    """A schema-1 run in the schema-2 form: each layer's layout from its shape, ``l2`` from the run's one fixed value,
    ``reduction_used`` from its one reduction per layer.

    Schema 1 had no token sequences (every point was a feature map or a vector)
    and fitted every probe with the one L2 strength of its ``l2`` attribute, so
    nothing is guessed.
    """
    layouts = [layout_for_shape(str(shape)) for shape in ds["shape"].values]
    l2 = np.full((ds.sizes["layer"], ds.sizes["epoch"]), float(ds.attrs.get("l2", np.nan)))
    l2[np.asarray(ds["nonfinite"].values, dtype=bool)] = np.nan
    ds = ds.assign_coords(layout=("layer", np.array(layouts, dtype=str)))
    ds["l2"] = (("layer", "epoch"), l2)
    used = np.repeat(np.asarray(ds["reduction"].values, dtype=str)[:, None], ds.sizes["epoch"], axis=1)
    ds["reduction_used"] = (("layer", "epoch"), used)
    ds.attrs.update(probekit_schema=SCHEMA_VERSION, upgraded_from_schema=1)
    return ds


def open_run(path: str | os.PathLike) -> xr.Dataset:
    """Read a run store into memory, also while a run is still writing it.

    Only completed epochs are returned; the dataset holds no reference to the
    files, so a writer can go on.

    Args:
        path: the folder a run wrote (``store=`` of ``pk.probe`` and friends).

    Example:
        >>> ds = pk.open_run("runs/demo.zarr")
        >>> ds.probe.sel(metric="valid_error").isel(epoch=-1).to_series()
    """
    path = Path(path)
    _check_store_path(path)
    attrs = _root_attrs(path)
    completed = int(attrs.get("completed_epochs", 0))
    try:
        with xr.open_zarr(path, consolidated=True, zarr_format=2, chunks=None) as lazy:
            ds = lazy.isel(epoch=slice(0, completed))
            broken = []
            for name in list(ds.variables):
                try:
                    ds[name].load()
                except Exception as error:  # noqa: BLE001 - report every broken part, then fail once
                    broken.append(f"{name} ({type(error).__name__}: {str(error).splitlines()[0][:120]})")
            if broken:
                readable = sorted(set(map(str, ds.variables)) - {b.split(" ")[0] for b in broken})
                raise StoreError(
                    f"run store {str(path)!r} is damaged: cannot read {', '.join(broken)}; "
                    f"still readable: {', '.join(readable)}. Use xarray.open_zarr({str(path)!r}, consolidated=True) "
                    "to read those, or re-run into a new path"
                )
            ds = ds.load()
    except StoreError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoding failure is a damaged store
        raise StoreError(
            f"run store {str(path)!r} cannot be opened ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "its metadata may be damaged. Re-run into a new path"
        ) from error
    ds.attrs.pop("completed_epochs", None)
    for variable in ds.variables.values():
        variable.encoding = {}
    if attrs.get("probekit_schema") == 1:
        ds = _upgrade(ds)
    return ds


def open_run_lazy(path: str | os.PathLike) -> xr.Dataset:
    """Open a run store without reading its data: dask arrays over the store's chunks, cut at the completed epochs.

    The checks of :func:`open_run` run first (a missing path, a folder that is
    not a run store, another schema version), and the completed-epoch count is
    read once, now: epochs a writer adds later are not seen, and the epochs
    seen never change (a writer only adds epochs). Only the metadata and the
    small coordinate arrays are read here; each data variable is read, chunk by
    chunk, when it is computed. A store replaced after this call (``overwrite``)
    is read as it is then: open it again.

    Args:
        path: the folder a run wrote.

    Example:
        >>> ds = open_run_lazy("runs/demo.zarr")
        >>> ds.probe.sel(metric="valid_error").isel(epoch=-1).compute()
    """
    path = Path(path)
    _check_store_path(path)
    attrs = _root_attrs(path)
    completed = int(attrs.get("completed_epochs", 0))
    try:
        lazy = xr.open_zarr(path, consolidated=True, zarr_format=2, chunks={})
        ds = lazy.isel(epoch=slice(0, completed))
        for name in ds.coords:
            ds[name].load()
    except Exception as error:  # noqa: BLE001 - any decoding failure is a damaged store
        raise StoreError(
            f"run store {str(path)!r} cannot be opened ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "its metadata may be damaged. Re-run into a new path"
        ) from error
    ds.attrs.pop("completed_epochs", None)
    for variable in ds.variables.values():
        variable.encoding = {}
    if attrs.get("probekit_schema") == 1:
        ds = _upgrade(ds)
    return ds


# --------------------------------------------------------------------- writing
def write_atomic(path: Path, data: bytes) -> None:
    """Replace the file ``path`` with ``data`` in one step: a reader sees the old file or the new one, whole.

    The bytes go to a temporary file in the same folder, are flushed and
    fsynced, and the temporary file is renamed over ``path``; then the folder
    is fsynced (where the system allows it) so that the rename survives a
    power cut.

    Example:
        >>> write_atomic(Path("runs/a.zarr/.zattrs"), b"{}")
    """
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; its renames are durable on their own
        return
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


#: Every array's compressor: Zarr format 2's Blosc (LZ4, byte shuffle), as ``xarray.to_zarr`` writes by default.
_COMPRESSOR = {"id": "blosc", "cname": "lz4", "clevel": 5, "shuffle": 1, "blocksize": 0}
#: A replaced store is renamed to ``.{name}.old-{pid}-{random}`` beside it, then removed in the background.
_TRASH = ".old-"


def _json(value: object, **options) -> bytes:
    def plain(item):
        if isinstance(item, np.generic):
            return item.item()
        if isinstance(item, np.ndarray):
            return item.tolist()
        raise TypeError(f"{type(item).__name__} is not JSON serialisable")

    return json.dumps(value, default=plain, **options).encode()


def _store_files(ds: xr.Dataset) -> dict[str, bytes]:
    """Every file of a new store that holds ``ds``, made in memory: Zarr format 2 with consolidated metadata.

    The files are those ``ds.to_zarr(path, zarr_format=2, consolidated=True)``
    writes with the store's encoding (the epoch axis chunked in blocks of
    :data:`EPOCH_BLOCK`, every other axis whole; floats filled with NaN; no fill
    value for integers, booleans and strings; xarray's ``_ARRAY_DIMENSIONS`` and
    ``coordinates`` attributes; a chunk only where it holds something other than
    the fill), made without a Zarr call per array, so that a store costs one
    small file write per file. ``tests/run/test_store_files.py`` holds them
    equal to what xarray writes.
    """
    from numcodecs import Blosc

    codec = Blosc(cname=_COMPRESSOR["cname"], clevel=_COMPRESSOR["clevel"], shuffle=_COMPRESSOR["shuffle"],
                  blocksize=_COMPRESSOR["blocksize"])
    non_dim = [name for name in ds.coords if name not in ds.dims]
    attached: dict[str, list[str]] = {}
    for coord in non_dim:
        for name, variable in ds.variables.items():
            if name not in non_dim and name not in variable.dims and set(ds[coord].dims) <= set(variable.dims):
                attached.setdefault(name, []).append(coord)
    unattached = sorted(set(non_dim) - {c for coords in attached.values() for c in coords})
    root_attrs = dict(ds.attrs)
    for key, value in root_attrs.items():
        try:
            _json(value)
        except (TypeError, ValueError):
            raise TypeError(f"run attribute {key!r} is of type {type(value).__name__}, which a store cannot hold; a run's "
                            "attributes are strings, numbers, booleans or lists of them") from None
    if unattached:
        root_attrs["coordinates"] = " ".join(unattached)
    meta: dict[str, dict] = {".zgroup": {"zarr_format": 2}, ".zattrs": root_attrs}
    chunks: dict[str, bytes] = {}
    for name in sorted(ds.variables):
        variable = ds.variables[name]
        values = np.ascontiguousarray(variable.values)
        if values.dtype.kind not in "biufU" or values.ndim == 0:
            raise TypeError(f"run variable {name!r} has dtype {values.dtype} and {values.ndim} dims; the store takes "
                            "arrays of numbers, booleans and fixed-width strings")
        floating = values.dtype.kind == "f"
        shape = tuple(int(n) for n in values.shape)
        chunk = tuple(EPOCH_BLOCK if dim == "epoch" else n for dim, n in zip(variable.dims, shape))
        attrs = dict(variable.attrs)
        if attached.get(name):
            attrs["coordinates"] = " ".join(sorted(attached[name]))
        attrs["_ARRAY_DIMENSIONS"] = list(variable.dims)
        meta[f"{name}/.zattrs"] = attrs
        meta[f"{name}/.zarray"] = {
            "shape": list(shape), "chunks": list(chunk), "dtype": values.dtype.str,
            "fill_value": "NaN" if floating else None, "order": "C", "filters": None, "dimension_separator": ".",
            "compressor": dict(_COMPRESSOR), "zarr_format": 2,
        }
        if 0 in shape:
            continue
        empty = np.zeros((), values.dtype)
        grid = [range(0, n, c) for n, c in zip(shape, chunk)]
        for starts in itertools.product(*grid):
            part = values[tuple(slice(s, s + c) for s, c in zip(starts, chunk))]
            holds = ~np.isnan(part) if floating else part != empty
            if not holds.any():
                continue  # an all-fill chunk is not written: readers see the fill, as with zarr
            if part.shape != chunk:  # an edge chunk is stored whole, padded with the fill
                whole = np.full(chunk, np.nan if floating else empty, dtype=values.dtype)
                whole[tuple(slice(0, n) for n in part.shape)] = part
                part = whole
            key = ".".join(str(s // c) for s, c in zip(starts, chunk))
            chunks[f"{name}/{key}"] = bytes(codec.encode(np.ascontiguousarray(part)))
    files = {key: _json(value, indent=2) for key, value in meta.items()}
    files.update(chunks)
    files[".zmetadata"] = _json({"metadata": meta, "zarr_consolidated_format": 1}, indent=4)
    return files


def _write_tree(folder: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (``{relative path: bytes}``) into the new folder ``folder``, making its subfolders."""
    folder.mkdir()
    made = {""}
    for key, data in files.items():
        sub = key.rpartition("/")[0]
        if sub not in made:
            (folder / sub).mkdir(parents=True, exist_ok=True)
            made.add(sub)
        with open(folder / key, "wb") as handle:
            handle.write(data)


_discarding: set[str] = set()
_discarders: list[threading.Thread] = []
_discard_lock = threading.Lock()


def _discard(parent: Path, name: str) -> None:
    """Remove the replaced copies of store ``name`` in ``parent`` (``.{name}.old-*``) in a background thread.

    A replaced store was renamed aside whole and nothing reads it again, so its
    removal (milliseconds per folder on some file systems) need not hold up the
    run. The thread is not a daemon: the interpreter finishes it before it
    exits. A process killed first leaves the folder behind, and the next
    replacement of the same store removes it.
    """
    prefix = f".{name}{_TRASH}"
    try:
        found = sorted(str(parent / entry) for entry in os.listdir(parent) if entry.startswith(prefix))
    except OSError:
        return
    with _discard_lock:
        found = [path for path in found if path not in _discarding]
        _discarding.update(found)
        _discarders[:] = [thread for thread in _discarders if thread.is_alive()]
        if not found:
            return
        thread = threading.Thread(target=_remove, args=(found,), name="probekit-store-discard", daemon=False)
        _discarders.append(thread)
    thread.start()


def _remove(paths: list[str]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
        with _discard_lock:
            _discarding.discard(path)


def _wait_discarded() -> None:
    """Wait until every replaced store this process set aside is removed (for tests)."""
    with _discard_lock:
        threads = list(_discarders)
    for thread in threads:
        thread.join()


def _filled(shape, dtype: np.dtype, fill: object) -> np.ndarray:
    """A chunk that was never written, as Zarr format 2 reads it: its fill value, or zeros (``""``, False) without one."""
    if fill is None:
        return np.zeros(shape, dtype)
    if isinstance(fill, str) and dtype.kind == "f":
        fill = float(fill)  # "NaN", "Infinity", "-Infinity"
    return np.full(shape, fill, dtype)


class _Lock:
    """An exclusive lock on a store that dies with its process (``flock`` on POSIX, ``msvcrt.locking`` on Windows).

    The lock modules are imported here, not at the top of the module, so that
    reading a store never needs them.
    """

    def __init__(self, path: Path):
        self.path = path / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not _lock(fd):
            os.lseek(fd, 0, os.SEEK_SET)
            try:
                holder = json.loads(os.read(fd, 4096) or b"{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('command', 'unknown command')})"
            raise StoreLockedError(
                f"run store {str(self.path.parent)!r} is being written by {who}; wait for it to finish, stop it, "
                "or write to another path (pk.open_run reads it meanwhile)"
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            _unlock(self._fd)
            os.close(self._fd)
            self._fd = None


#: Windows locks a byte range, and a locked range cannot be read by others: lock one
#: byte far past the holder's description, so that a refused writer can still name it.
_LOCKED_BYTE = 1 << 20


def _lock(fd: int) -> bool:
    """Take the exclusive lock on ``fd`` without waiting; False when another process holds it."""
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _unlock(fd: int) -> None:
    if os.name == "nt":
        import msvcrt

        os.lseek(fd, _LOCKED_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _describe_mismatch(old: RunLayout, new: RunLayout) -> str | None:
    if old.layers != new.layers:
        extra, missing = sorted(set(new.layers) - set(old.layers)), sorted(set(old.layers) - set(new.layers))
        detail = "; ".join(filter(None, [f"new layers {extra[:5]}" if extra else "", f"missing {missing[:5]}" if missing else ""]))
        return f"its layers differ ({detail or 'different order'})"
    if old.metrics != new.metrics:
        return f"its metrics differ (store: {old.metrics}, this run: {new.metrics})"
    for name in ("feature_dim", "reduction", "shape", "layouts"):
        if getattr(old, name) != getattr(new, name):
            what = name.replace("_", " ").rstrip("s")
            return f"its {what}s differ (store: {getattr(old, name)}, this run: {getattr(new, name)})"
    if old.baselines != new.baselines:
        return f"its baselines differ (store: {list(old.baselines)}, this run: {list(new.baselines)})"
    if old.repeats != new.repeats:
        return f"its repeats differ (store: {old.repeats}, this run: {new.repeats})"
    old_attrs, new_attrs = old.fixed_attrs(), new.fixed_attrs()
    first = ["model", "mode", "dataset", "n_train", "n_valid", "n_test", "num_classes", "seed"]
    for key in sorted(set(old_attrs) | set(new_attrs), key=lambda k: (k not in first, first.index(k) if k in first else 0, k)):
        if old_attrs.get(key) != new_attrs.get(key):
            return f"its {key!r} differs (store: {old_attrs.get(key)!r}, this run: {new_attrs.get(key)!r})"
    return None


class RunWriter:
    """Writes one run into a Zarr store, one epoch at a time.

    Everything that can refuse (a path that is a file, a folder that is not a
    store, a store of another schema or layout, a store another process is
    writing, an unwritable location) refuses in the constructor, before any
    work starts, and leaves what is there untouched.

    Args:
        path: the store folder.
        layout: the run's layers, metrics and provenance.
        resume: continue an existing store with the same layout.
        overwrite: replace an existing store.
    """

    def __init__(self, path: str | os.PathLike, layout: RunLayout, *, resume: bool = False, overwrite: bool = False):
        self.path = Path(path)
        self.layout = layout
        self.rows: list[EpochRow] = []
        self._lock = _Lock(self.path)
        self._writes = 0
        self._meta: dict | None = None  # the consolidated metadata, once read (see _metadata)
        self._kill_after = int(os.environ.get(_KILL_AFTER_WRITES) or 0)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store path {str(self.path)!r} is a file; pass a folder path such as 'runs/a.zarr'")
        if self.path.is_dir() and any(self.path.iterdir()):
            self._open_existing(resume=resume, overwrite=overwrite)
        else:
            if self.path.is_dir():
                self.path.rmdir()
            self._create()

    # creation ----------------------------------------------------------------
    def _create(self, *, replace: Path | None = None) -> None:
        parent = self.path.parent
        tmp = None
        self._meta = None
        try:
            parent.mkdir(parents=True, exist_ok=True)
            ds = build_dataset(self.layout, [], capacity=EPOCH_BLOCK)
            ds.attrs["completed_epochs"] = 0
            files = _store_files(ds)
            tmp = parent / f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            _write_tree(tmp, files)
        except OSError as error:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
            raise StoreError(
                f"cannot create run store {str(self.path)!r}: {error.strerror or error}; choose a writable location"
            ) from error
        if replace is not None:
            trash = parent / f".{self.path.name}{_TRASH}{os.getpid()}-{uuid.uuid4().hex[:8]}"
            os.rename(self.path, trash)
            os.rename(tmp, self.path)
            self._wrote()
            _discard(parent, self.path.name)
        else:
            try:
                os.rename(tmp, self.path)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                raise FileExistsError(
                    f"run store {str(self.path)!r} appeared while this run was creating it; another process is using that path"
                ) from None
            self._wrote()
        self._lock.acquire()

    # existing stores -----------------------------------------------------------
    def _open_existing(self, *, resume: bool, overwrite: bool) -> None:
        if not (self.path / ".zmetadata").exists():
            raise StoreError(
                f"{str(self.path)!r} is a folder that is not a probekit run store; refusing to write into it. "
                "Pass a new path, or an empty folder"
            )
        attrs = _root_attrs(self.path, writing=not overwrite)
        done = int(attrs.get("completed_epochs", 0))
        if overwrite:
            self._lock.acquire()  # never replace a store that another process is writing
            self._lock.release()
            self._create(replace=self.path)
            return
        if not resume:
            raise FileExistsError(
                f"run store {str(self.path)!r} already exists ({done} epochs of {attrs.get('model', 'a model')}); "
                "pass resume=True (--resume) to continue it, overwrite=True (--overwrite) to replace it, or another path"
            )
        existing = open_run(self.path)
        mismatch = _describe_mismatch(layout_of(existing), self.layout)
        if mismatch:
            raise StoreError(
                f"run store {str(self.path)!r} was made for another run: {mismatch}; "
                "nothing was written. Resume with the same model, layers, reductions and data, or write to another path"
            )
        self._lock.acquire()
        self.rows = rows_of(existing)
        self._heal()

    def _heal(self) -> None:
        """Give every epoch array one capacity again (a kill during growth can leave them uneven)."""
        group = zarr.open_group(self.path, mode="r+", zarr_format=2, use_consolidated=False)
        names = self.layout.epoch_variables()
        capacity = max(group[name].shape[VARIABLE_DIMS[name].index("epoch")] for name in names)
        for name in names:
            self._resize(group[name], name, capacity)
        self._commit(len(self.rows), resized=True)

    def _resize(self, array, name: str, capacity: int) -> None:
        shape = list(array.shape)
        axis = VARIABLE_DIMS[name].index("epoch")
        if shape[axis] != capacity:
            shape[axis] = capacity
            array.resize(tuple(shape))
            self._wrote()

    # appending ---------------------------------------------------------------
    def append(self, row: EpochRow) -> None:
        """Write one epoch, then count it: readers see it whole or not at all."""
        index = len(self.rows)
        capacity = self._metadata()["metadata"]["epoch/.zarray"]["shape"][0]
        resized = index >= capacity
        if resized:
            group = zarr.open_group(self.path, mode="r+", zarr_format=2, use_consolidated=False)
            for name in self.layout.epoch_variables():
                self._resize(group[name], name, capacity + EPOCH_BLOCK)
            self._reload_arrays()
        group = None
        for name, value in row_values(row, self.layout).items():
            if not self._write_epoch(name, index, value):
                group = group or zarr.open_group(self.path, mode="r+", zarr_format=2, use_consolidated=False)
                array = group[name]
                where = [slice(None)] * array.ndim
                where[VARIABLE_DIMS[name].index("epoch")] = index
                array[tuple(where)] = np.asarray(value).astype(array.dtype)
            self._wrote()  # one chunk file: the epoch axis is chunked in blocks, the others whole
        self._commit(index + 1, resized=False)
        self.rows.append(row)

    def _write_epoch(self, name: str, index: int, value: object) -> bool:
        """Write ``value`` as epoch ``index`` of array ``name``: its one chunk read, changed and replaced atomically.

        The chunk is read and written as Zarr format 2 lays it out (C order, the
        ``.zarray``'s compressor), without a Zarr call. False, with nothing
        written, for an array laid out otherwise (several chunks across a
        non-epoch axis, filters, another order or key separator): Zarr writes it.
        """
        meta = self._metadata()["metadata"][f"{name}/.zarray"]
        axis = VARIABLE_DIMS[name].index("epoch")
        shape, chunks = meta["shape"], meta["chunks"]
        if (meta.get("order", "C") != "C" or meta.get("filters") or meta.get("dimension_separator", ".") != "."
                or any(c < n for i, (n, c) in enumerate(zip(shape, chunks)) if i != axis)):
            return False
        import numcodecs

        codec = numcodecs.get_codec(meta["compressor"]) if meta.get("compressor") else None
        dtype = np.dtype(meta["dtype"])
        block, offset = divmod(index, chunks[axis])
        key = ".".join(str(block) if i == axis else "0" for i in range(len(shape)))
        path = self.path / name / key
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            data = _filled(chunks, dtype, meta.get("fill_value"))
        else:
            data = np.frombuffer(codec.decode(raw) if codec else raw, dtype=dtype).reshape(chunks).copy()
        where = [slice(None)] * len(shape)
        where[axis] = offset
        data[tuple(where)] = np.asarray(value).astype(dtype)
        data = np.ascontiguousarray(data)
        tmp = path.with_name(f".{key}.partial-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_bytes(bytes(codec.encode(data)) if codec else data.tobytes())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return True

    def _metadata(self) -> dict:
        """The store's consolidated metadata, read once: this writer is the only one (it holds the lock)."""
        if self._meta is None:
            self._meta = json.loads((self.path / ".zmetadata").read_text())
        return self._meta

    def _reload_arrays(self) -> None:
        """Take each epoch array's ``.zarray`` (its shape, after a resize) into the consolidated metadata."""
        entries = self._metadata()["metadata"]
        for name in self.layout.epoch_variables():
            entries[f"{name}/.zarray"] = json.loads((self.path / name / ".zarray").read_text())

    def _commit(self, completed: int, *, resized: bool) -> None:
        """Count ``completed`` epochs: rewrite the consolidated metadata, one atomic file.

        The metadata is updated here rather than by ``zarr.consolidate_metadata``,
        which would walk the folder (and trip over the lock file) every epoch.
        """
        if resized:
            self._reload_arrays()
        meta = self._metadata()
        entries = meta["metadata"]
        entries[".zattrs"]["completed_epochs"] = completed
        write_atomic(self.path / ".zattrs", json.dumps(entries[".zattrs"], indent=4).encode())
        self._wrote()
        write_atomic(self.path / ".zmetadata", json.dumps(meta, indent=4).encode())
        self._wrote()

    def _wrote(self) -> None:
        """Count one file write; the test hook ``PROBEKIT_KILL_AFTER_WRITES=k`` dies right after the k-th."""
        self._writes += 1
        if self._writes == self._kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def close(self) -> None:
        self._lock.release()

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
