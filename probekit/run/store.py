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

A store is a local folder (a plain path or a ``file://`` URL) or an fsspec URL
of an object store (``s3://``, ``gs://``, ``az://``, ``memory://``, ...; the
filesystem's own options in ``storage_options=``). Object stores have no
rename and no lock that dies with its process, so there a store is created
with a marker object first and its consolidated metadata last, each file is
replaced by one whole-object write, and the writer's lock is an object created
only if absent, held beside a lock file on the writer's machine; docs/store.md
says which guarantee holds on which backend. A full disk or quota is one
:class:`StoreFullError` naming the path, and leaves every completed epoch and
no temporary file.

This module does not import torch.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import xarray as xr
import zarr

from probekit.run.schema import (
    SCHEMA_VERSION, VARIABLE_DIMS, EpochRow, RunLayout, build_dataset, layout_for_shape, layout_of, row_values, rows_of,
    with_added_variables,
)

__all__ = [
    "CREATING_MARKER", "EPOCH_BLOCK", "LOCK_FILE", "READABLE_VERSIONS", "RunWriter", "StoreError", "StoreFullError",
    "StoreLockedError", "exists", "open_run", "open_run_lazy", "remove", "store_location", "write_atomic",
]

#: Schema versions :func:`open_run` reads; older ones are upgraded in memory (:func:`_upgrade`), never on disk.
READABLE_VERSIONS = (1, SCHEMA_VERSION)
#: Epochs are preallocated, and chunked, in blocks of this many.
EPOCH_BLOCK = 64
LOCK_FILE = ".writer.lock"
#: On an object store, the object a store's creation (or replacement) writes first and removes last.
CREATING_MARKER = ".probekit-creating"
#: Test hook (docs/store.md): a writer made while this is set to k kills its own
#: process with SIGKILL right after its k-th file write, so tests kill at chosen points.
_KILL_AFTER_WRITES = "PROBEKIT_KILL_AFTER_WRITES"


class StoreError(ValueError):
    """A path that is not a usable run store, or a store that does not fit the run."""


class StoreLockedError(StoreError):
    """Another live process is writing the store."""


class StoreFullError(StoreError, OSError):
    """The disk or quota of a store ran out: every completed epoch is kept and no temporary file is left.

    It is an ``OSError`` with ``errno`` ``ENOSPC`` (or ``EDQUOT``) too, so that
    code catching a full disk the usual way catches it.
    """

    def __str__(self) -> str:  # the message, not OSError's "[Errno 28] ..."
        return str(self.args[0]) if self.args else super().__str__()


#: The errors of a full disk or an exhausted quota.
_NO_SPACE = frozenset(code for code in (errno.ENOSPC, getattr(errno, "EDQUOT", None)) if code is not None)


def _no_space(error: BaseException) -> bool:
    return isinstance(error, OSError) and not isinstance(error, StoreFullError) and error.errno in _NO_SPACE


def _full(error: OSError, message: str) -> StoreFullError:
    full = StoreFullError(message)
    full.errno = error.errno
    full.strerror = error.strerror
    return full


# --------------------------------------------------------------- locations
#: Filesystems on which writing one whole object is all-or-nothing and creating one only-if-absent is atomic:
#: object stores, and fsspec's in-process ``memory://``. Other fsspec filesystems (sftp://, ftp://, smb://, ...)
#: can leave a truncated file when a writer dies mid-write, so runs are not written to them (read them, though).
_OBJECT_STORES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "oss", "memory"})


def _is_url(store: object) -> bool:
    return isinstance(store, str) and "://" in store


def store_location(store: str | os.PathLike) -> Path | str:
    """A store as the package names it: a local ``Path`` for a plain path or a ``file://`` URL, else the URL itself.

    Example:
        >>> store_location("file:///tmp/a.zarr"), store_location("s3://bucket/a.zarr")
        (PosixPath('/tmp/a.zarr'), 's3://bucket/a.zarr')
    """
    if not _is_url(store):
        return Path(store)
    if store.startswith("file://"):
        from fsspec.implementations.local import LocalFileSystem

        return Path(LocalFileSystem._strip_protocol(store))
    return store.rstrip("/")


def _filesystem(url: str, storage_options: Mapping[str, object] | None):
    """The fsspec filesystem of ``url`` and the path inside it; one line when its package is missing."""
    import fsspec
    from fsspec.registry import known_implementations

    protocol = url.split("://", 1)[0]
    try:
        fs, root = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as error:
        package = known_implementations.get(protocol, {}).get("class", "").split(".")[0] or f"the package for {protocol}://"
        raise ImportError(
            f"run store {url!r} needs the {package} package for {protocol}:// URLs, which is not installed; "
            f"install {package}: pip install {package}"
        ) from error
    except ValueError as error:
        if "Protocol not known" in str(error):
            raise ValueError(
                f"run store {url!r}: fsspec knows no filesystem for {protocol}:// URLs; pass a local path or a URL "
                "such as s3://bucket/run.zarr, gs://bucket/run.zarr or memory://run.zarr"
            ) from None
        raise
    except TypeError as error:
        raise TypeError(f"storage_options= of run store {url!r} do not fit its filesystem ({error}); pass the options "
                        f"its fsspec filesystem takes") from error
    return fs, root.rstrip("/")


class _LocalFiles:
    """A store in a local folder: files replaced by rename, the lock an ``flock`` (see docs/store.md)."""

    remote = False

    def __init__(self, path: Path):
        self.path = path
        self.name = str(path)

    def read(self, key: str) -> bytes:
        return (self.path / key).read_bytes()

    def write(self, key: str, data: bytes, *, durable: bool = True) -> None:
        """Replace the file ``key`` whole; ``durable`` also fsyncs it (the epoch count), a chunk need not be."""
        path = self.path / key
        if durable:
            _write_atomic_local(path, data)
            return
        tmp = path.with_name(f".{path.name}.partial-{uuid.uuid4().hex[:8]}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def zarr_store(self, *, read_only: bool):
        return self.path


class _RemoteFiles:
    """A store under an fsspec URL: every file one whole-object write, no rename (see docs/store.md)."""

    remote = True

    def __init__(self, url: str, storage_options: Mapping[str, object] | None):
        from fsspec.implementations.memory import MemoryFileSystem

        self.name = url
        self.url = url
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = _filesystem(url, storage_options)
        protocols = {self.fs.protocol} if isinstance(self.fs.protocol, str) else set(self.fs.protocol)
        self.writable = bool(protocols & _OBJECT_STORES) or isinstance(self.fs, MemoryFileSystem)
        self.protocol = url.split("://", 1)[0]  # as the user wrote it (gs://, not gcsfs's first name gcs://)

    def path_of(self, key: str) -> str:
        return f"{self.root}/{key}"

    def read(self, key: str) -> bytes:
        return self.fs.cat_file(self.path_of(key))

    def write(self, key: str, data: bytes, *, durable: bool = True) -> None:
        self.fs.pipe_file(self.path_of(key), data)

    def write_many(self, files: Mapping[str, bytes]) -> None:
        if files:
            self.fs.pipe({self.path_of(key): data for key, data in files.items()})

    def create(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist (the object store's conditional put); False when it does."""
        try:
            self.fs.pipe_file(self.path_of(key), data, mode="create")
        except FileExistsError:
            return False
        return True

    def remove(self, keys: list[str]) -> None:
        """Remove every object of ``keys`` that exists (one bulk delete where the filesystem has one)."""
        if not keys:
            return
        try:
            self.fs.rm([self.path_of(key) for key in keys])
        except FileNotFoundError:  # a filesystem that stops at the first missing one: each, skipping those
            for key in keys:
                try:
                    self.fs.rm_file(self.path_of(key))
                except FileNotFoundError:
                    pass

    def keys(self) -> set[str]:
        """Every object under the store's path, relative to it (listed afresh, never from a cache)."""
        self.fs.invalidate_cache(self.root)
        try:
            found = self.fs.find(self.root)
        except FileNotFoundError:
            return set()
        prefix = self.root + "/"
        return {path[len(prefix):] for path in found if path.startswith(prefix)}

    def zarr_store(self, *, read_only: bool):
        from zarr.storage import FsspecStore

        if self.fs.async_impl:  # zarr makes its own asynchronous instance (s3fs, gcsfs, adlfs)
            try:
                return FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=read_only)
            except ValueError:  # a wrapper that says it is asynchronous over a filesystem that is not (dir://)
                pass
        from fsspec.implementations.asyn_wrapper import AsyncFileSystemWrapper

        return FsspecStore(AsyncFileSystemWrapper(self.fs, asynchronous=True), path=self.root, read_only=read_only)


def _files_for(store: str | os.PathLike, storage_options: Mapping[str, object] | None):
    location = store_location(store)
    if isinstance(location, Path):
        if storage_options:
            raise ValueError(f"storage_options= are for fsspec URLs (s3://, gs://, memory://, ...); run store "
                             f"{str(location)!r} is a local path: drop them, or pass the store as a URL")
        return _LocalFiles(location)
    files = _RemoteFiles(location, storage_options)
    bucket = files.protocol in _OBJECT_STORES and files.protocol != "memory"
    if not files.root or (bucket and "/" not in files.root):
        raise StoreError(f"run store {location!r} names no folder for the store; pass a path inside the bucket, "
                         f"e.g. {location.rstrip('/')}/run.zarr")
    return files


def exists(path: str | os.PathLike, *, storage_options: Mapping[str, object] | None = None) -> bool:
    """Whether a file or store exists at ``path`` (a local path or an fsspec URL).

    Example:
        >>> exists("runs/.demo.zarr.resume.pt")
        False
    """
    files = _files_for(path, storage_options)
    if not files.remote:
        return files.path.exists()
    files.fs.invalidate_cache(files.root)
    return bool(files.fs.exists(files.root))


def remove(path: str | os.PathLike, *, storage_options: Mapping[str, object] | None = None) -> None:
    """Remove the one file at ``path`` (a local path or an fsspec URL), if it is there.

    Example:
        >>> remove("runs/.demo.zarr.resume.pt")
    """
    files = _files_for(path, storage_options)
    if not files.remote:
        files.path.unlink(missing_ok=True)
        return
    try:
        files.fs.rm_file(files.root)
    except FileNotFoundError:
        pass


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


def _check_remote_store(files: _RemoteFiles) -> None:
    """The object-store counterpart of :func:`_check_store_path`, listing the store only when its metadata is missing."""
    try:
        files.read(".zmetadata")
        return
    except FileNotFoundError:
        pass
    except Exception as error:  # noqa: BLE001 - refused, unreachable (botocore's errors are no OSError)
        raise StoreError(
            f"cannot read run store {files.name!r} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
            "check the URL, and the credentials and endpoint in storage_options"
        ) from error
    keys = files.keys()
    if ".zmetadata" in keys:  # written (and the marker removed) between the read and the listing: it is whole now
        return
    if not keys:
        raise FileNotFoundError(f"no run store at {files.name!r}; check the URL, or start a run with store={files.name!r}")
    if CREATING_MARKER in keys or keys == {LOCK_FILE}:  # a writer took the URL and is about to create the store
        raise StoreError(
            f"run store {files.name!r} is being created or replaced, or its writer died doing so; wait for it, "
            "or run again into it to create it anew"
        )
    if ".zgroup" in keys:
        raise StoreError(
            f"run store {files.name!r} is damaged: its metadata object .zmetadata is missing; the arrays may still be "
            f"read with xarray.open_zarr({files.name!r}, consolidated=False). Re-run into a new path to get a clean store"
        )
    raise StoreError(f"{files.name!r} is not a probekit run store: it holds objects but no consolidated Zarr metadata "
                     "(.zmetadata); pass the URL a run wrote, or a new one")


def _read_meta(files) -> dict:
    try:
        return json.loads(files.read(".zmetadata"))["metadata"]
    except (OSError, ValueError, KeyError) as error:
        raise StoreError(
            f"run store {files.name!r} has a broken metadata file .zmetadata ({error}); nothing can be read from it. "
            "Re-run with resume=False into a new path"
        ) from error


def _root_attrs(files, *, writing: bool = False) -> dict:
    path = files.name
    attrs = _read_meta(files).get(".zattrs", {})
    version = attrs.get("probekit_schema")
    if version is None:
        raise StoreError(f"{path!r} is a Zarr store but not a probekit run store (no 'probekit_schema' attribute)")
    if version not in READABLE_VERSIONS:
        raise StoreError(
            f"run store {path!r} has schema version {version}; this probekit reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. Open it with the probekit version that wrote it, or re-run into a new path"
        )
    if writing and version != SCHEMA_VERSION:
        raise StoreError(
            f"run store {path!r} has schema version {version} (this probekit writes version {SCHEMA_VERSION}); "
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


def _opened(path: str | os.PathLike, storage_options: Mapping[str, object] | None):
    """A run store's files, checked to be a readable run store, its root attributes and completed-epoch count."""
    files = _files_for(path, storage_options)
    if files.remote:
        _check_remote_store(files)
    else:
        _check_store_path(files.path)
    attrs = _root_attrs(files)
    return files, attrs, int(attrs.get("completed_epochs", 0))


def _as_read(ds: xr.Dataset, attrs: Mapping[str, object]) -> xr.Dataset:
    """A run as its readers get it: no bookkeeping attribute, no encoding, a schema-1 store upgraded in memory, and
    every variable the store predates at its default (:func:`~probekit.run.schema.with_added_variables`)."""
    ds.attrs.pop("completed_epochs", None)
    for variable in ds.variables.values():
        variable.encoding = {}
    if attrs.get("probekit_schema") == 1:
        ds = _upgrade(ds)
    return with_added_variables(ds)


def open_run(path: str | os.PathLike, *, storage_options: Mapping[str, object] | None = None) -> xr.Dataset:
    """Read a run store into memory, also while a run is still writing it.

    Only completed epochs are returned; the dataset holds no reference to the
    files, so a writer can go on.

    Args:
        path: the folder or fsspec URL a run wrote (``store=`` of ``pk.probe`` and friends).
        storage_options: the fsspec filesystem's options for a URL (credentials, ``client_kwargs``), as the run took them.

    Example:
        >>> ds = pk.open_run("runs/demo.zarr")
        >>> ds.probe.sel(metric="valid_error").isel(epoch=-1).to_series()
        >>> pk.open_run("s3://bucket/demo.zarr", storage_options={"anon": True})
    """
    files, attrs, completed = _opened(path, storage_options)
    path = files.name
    try:
        with xr.open_zarr(files.zarr_store(read_only=True), consolidated=True, zarr_format=2, chunks=None) as lazy:
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
                    f"run store {path!r} is damaged: cannot read {', '.join(broken)}; "
                    f"still readable: {', '.join(readable)}. Use xarray.open_zarr({path!r}, consolidated=True) "
                    "to read those, or re-run into a new path"
                )
            ds = ds.load()
    except StoreError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoding failure is a damaged store
        raise _unreadable(path, error) from error
    return _as_read(ds, attrs)


def open_run_lazy(path: str | os.PathLike, *, storage_options: Mapping[str, object] | None = None) -> xr.Dataset:
    """Open a run store without reading its data: dask arrays over the store's chunks, cut at the completed epochs.

    The checks of :func:`open_run` run first (a missing path, a folder that is
    not a run store, another schema version), and the completed-epoch count is
    read once, now: epochs a writer adds later are not seen, and the epochs
    seen never change (a writer only adds epochs). Only the metadata and the
    small coordinate arrays are read here; each data variable is read, chunk by
    chunk, when it is computed. A store replaced after this call (``overwrite``)
    is read as it is then: open it again.

    Args:
        path: the folder or fsspec URL a run wrote.
        storage_options: the fsspec filesystem's options for a URL, as for :func:`open_run`.

    Example:
        >>> ds = open_run_lazy("runs/demo.zarr")
        >>> ds.probe.sel(metric="valid_error").isel(epoch=-1).compute()
    """
    files, attrs, completed = _opened(path, storage_options)
    path = files.name
    try:
        lazy = xr.open_zarr(files.zarr_store(read_only=True), consolidated=True, zarr_format=2, chunks={})
        ds = lazy.isel(epoch=slice(0, completed))
        for name in ds.coords:
            ds[name].load()
    except Exception as error:  # noqa: BLE001 - any decoding failure is a damaged store
        raise _unreadable(path, error) from error
    return _as_read(ds, attrs)


def _unreadable(path: str, error: Exception) -> StoreError:
    """The one line for a store whose metadata cannot be decoded."""
    return StoreError(
        f"run store {str(path)!r} cannot be opened ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
        "its metadata may be damaged. Re-run into a new path"
    )


# --------------------------------------------------------------------- writing
def write_atomic(path: str | os.PathLike, data: bytes, *, storage_options: Mapping[str, object] | None = None) -> None:
    """Replace the file ``path`` with ``data`` in one step: a reader sees the old file or the new one, whole.

    Locally the bytes go to a temporary file in the same folder, are flushed
    and fsynced, and the temporary file is renamed over ``path``; then the
    folder is fsynced (where the system allows it) so that the rename survives
    a power cut. On an object store (an fsspec URL) the file is one
    whole-object write, which such stores make visible whole or not at all.

    Raises:
        StoreFullError: the disk or quota ran out; ``path`` is as it was and no temporary file is left.

    Example:
        >>> write_atomic(Path("runs/a.zarr/.zattrs"), b"{}")
    """
    files = _files_for(path, storage_options)
    try:
        if files.remote:
            files.fs.pipe_file(files.root, data)
        else:
            _write_atomic_local(files.path, data)
    except OSError as error:
        if not _no_space(error):
            raise
        raise _full(error, f"no space left writing {files.name!r} ({error.strerror or error}): it is as it was and no "
                           "temporary file is left, and the run store keeps every completed epoch. Free space (or raise "
                           "the quota), then continue with resume=True (--resume)") from error


def _write_atomic_local(path: Path, data: bytes) -> None:
    """:func:`write_atomic` on a local file: a fsynced temporary file renamed over ``path``, then the folder fsynced."""
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

    def __init__(self, path: Path, *, store: str | None = None, shared: bool = False):
        self.path = path
        self.store = store or str(path.parent)
        self._shared = shared  # a lock file every user of the machine opens: readable and writable by all
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 if self._shared else 0o644)
        if self._shared and hasattr(os, "fchmod"):
            try:
                os.fchmod(fd, 0o666)
            except OSError:  # another user's file: it is already open to all
                pass
        if not _lock(fd):
            os.lseek(fd, 0, os.SEEK_SET)
            try:
                holder = json.loads(os.read(fd, 4096) or b"{}")
            except (OSError, ValueError):
                holder = {}
            os.close(fd)
            who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('command', 'unknown command')})"
            raise StoreLockedError(
                f"run store {self.store!r} is being written by {who}; wait for it to finish, stop it, "
                "or write to another path (pk.open_run reads it meanwhile)"
            ) from None
        info = _holder()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            _unlock(self._fd)
            os.close(self._fd)
            self._fd = None


def _holder() -> dict:
    """Who a lock says holds it: this process's id, machine and command."""
    return {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:500]}


def _describe_holder(holder: dict) -> str:
    return f"process {holder.get('pid', '?')} on {holder.get('host', '?')} ({holder.get('command', 'unknown command')})"


def _alive(pid: object) -> bool:
    """Whether ``pid`` is a running process of this machine (on Windows, where no probe is safe, always False).

    A second guard beside the machine's lock file, which two processes with
    different temporary folders would not share.
    """
    if os.name == "nt" or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class _RemoteLock:
    """The writer's lock of a store on an object store, where no lock dies with its process.

    Two parts: an ``flock`` on a file of this machine named after the store's
    URL (in the system's temporary folder), which serialises the writers of one
    machine and dies with its process; and the object ``.writer.lock`` in the
    store, created only if absent (a conditional put), which holds the writer's
    pid, host, command and a token. A lock object left by a killed writer of
    *this* machine is taken over, since holding the machine's lock and finding
    no process of its pid prove that writer gone; one left by another machine
    cannot be told from a live writer,
    so it is refused with a message naming it and how to clear it. The writer
    checks its token before counting each epoch, so a lock taken from it stops
    it before it counts another.
    """

    def __init__(self, files: _RemoteFiles):
        self.files = files
        folder = Path(tempfile.gettempdir()) / "probekit-locks"
        digest = hashlib.sha256(files.url.encode()).hexdigest()[:32]
        self._local = _Lock(folder / f"{digest}.lock", store=files.name, shared=True)
        self._folder = folder
        self._token: str | None = None

    def acquire(self) -> None:
        self._folder.mkdir(exist_ok=True)
        try:
            os.chmod(self._folder, 0o1777)  # shared by every user of the machine, as the temporary folder is
        except OSError:
            pass
        self._local.acquire()
        try:
            token = uuid.uuid4().hex
            info = json.dumps({**_holder(), "token": token}).encode()
            if not self.files.create(LOCK_FILE, info):
                holder = self._holder()
                if holder is None:  # released between the two calls: one more try
                    if not self.files.create(LOCK_FILE, info):
                        raise StoreLockedError(f"run store {self.files.name!r} was just taken by another writer; "
                                               "wait for it to finish, or write to another path")
                elif holder.get("host") == socket.gethostname() and not _alive(holder.get("pid")):
                    # A writer of this machine that holds no machine lock any more and whose process is gone.
                    self.files.write(LOCK_FILE, info)
                else:
                    raise StoreLockedError(
                        f"run store {self.files.name!r} is being written by {_describe_holder(holder)}, or was until "
                        f"that process died; wait for it, or, if it no longer runs, delete {self.files.name}/{LOCK_FILE} "
                        "and run again (pk.open_run reads the store meanwhile)"
                    )
            self._token = token
            # A filesystem package that ignores create-only puts lets two machines both "create" the lock: the
            # last write wins, and the loser sees the winner's token here (or, later, at its first count).
            self.check()
        except BaseException:
            self._token = None
            self._local.release()
            raise

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.files.read(LOCK_FILE))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}

    def check(self) -> None:
        """Raise :class:`StoreLockedError` if the lock object no longer holds this writer's token."""
        holder = self._holder()
        if holder is None or holder.get("token") != self._token:
            who = "removed" if holder is None else f"taken by {_describe_holder(holder)}"
            raise StoreLockedError(
                f"the writer's lock of run store {self.files.name!r} was {who} while this run wrote it; it stopped "
                "before counting another epoch. Let one process write a store at a time"
            )

    def release(self) -> None:
        if self._token is None:
            return
        try:
            holder = self._holder()
            if holder is not None and holder.get("token") == self._token:
                self.files.remove([LOCK_FILE])
        finally:
            self._token = None
            self._local.release()


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
    writing, an unwritable location, a URL of a filesystem that cannot hold a
    run) refuses in the constructor, before any work starts, and leaves what is
    there untouched. A full disk or quota later is one :class:`StoreFullError`
    that keeps every completed epoch.

    Args:
        path: the store folder, or an fsspec URL (``s3://bucket/run.zarr``, ``memory://run.zarr``).
        layout: the run's layers, metrics and provenance.
        resume: continue an existing store with the same layout.
        overwrite: replace an existing store.
        storage_options: the fsspec filesystem's options for a URL (credentials, ``client_kwargs``).
    """

    def __init__(self, path: str | os.PathLike, layout: RunLayout, *, resume: bool = False, overwrite: bool = False,
                 storage_options: Mapping[str, object] | None = None):
        self._files = _files_for(path, storage_options)
        self.path = self._files.path if not self._files.remote else self._files.url
        self.layout = layout
        self.rows: list[EpochRow] = []
        self._writes = 0
        self._meta: dict | None = None  # the consolidated metadata, once read (see _metadata)
        self._kill_after = int(os.environ.get(_KILL_AFTER_WRITES) or 0)
        if self._files.remote:
            self._lock = _RemoteLock(self._files)
            self._open_remote(resume=resume, overwrite=overwrite)
            return
        self._lock = _Lock(self.path / LOCK_FILE)
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"store path {str(self.path)!r} is a file; pass a folder path such as 'runs/a.zarr'")
        try:
            if self.path.is_dir() and any(self.path.iterdir()):
                self._open_existing(resume=resume, overwrite=overwrite)
            else:
                if self.path.is_dir():
                    self.path.rmdir()
                self._create()
        except BaseException:
            self._lock.release()  # a writer that refused holds nothing (a full disk while healing, say)
            raise

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
            if _no_space(error):
                raise _full(error, f"no space left to create run store {str(self.path)!r} ({error.strerror}); nothing "
                                   "was written and no temporary file is left. Free space (or raise the quota) and "
                                   "run again") from error
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

    # object stores -------------------------------------------------------------
    def _open_remote(self, *, resume: bool, overwrite: bool) -> None:
        """Take the lock, then create, replace or continue the store under the URL (see docs/store.md)."""
        files = self._files
        if not files.writable:
            raise StoreError(
                f"run store {files.name!r}: {files.protocol}:// cannot hold a run while it is written (a writer killed "
                "mid-write can leave a truncated file there); write to a local path or an object store "
                "(s3://, gs://, az://) and copy it, or read such a store with pk.open_run"
            )
        try:
            self._lock.acquire()
        except StoreError:
            raise
        except Exception as error:  # noqa: BLE001 - refused, unreachable (botocore's errors are no OSError)
            if not _no_space(error):
                raise StoreError(
                    f"cannot write run store {files.name!r} ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                    "check that its bucket exists and that the credentials in storage_options may write there"
                ) from error
            raise _full(error, f"no space left on run store {files.name!r} for its writer's lock ({error.strerror}): "
                               "nothing was written, what it holds is kept and no temporary file is left. Free space "
                               "(or raise the quota), then run again (with resume=True, --resume, to continue it)") from error
        try:
            keys = files.keys() - {LOCK_FILE}
            if ".zmetadata" in keys:
                self._open_existing(resume=resume, overwrite=overwrite, keys=keys)
            elif not keys or CREATING_MARKER in keys:  # new, or a creation that died: nothing complete is there
                self._create_remote(keys)
            else:
                what = "a damaged run store (its .zmetadata is missing)" if ".zgroup" in keys else "objects of something else"
                raise StoreError(
                    f"{files.name!r} holds {what}, not a probekit run store; refusing to write into it. "
                    "Pass a new URL, or remove those objects first"
                )
        except BaseException:
            self._lock.release()
            raise

    def _create_remote(self, clear: set[str]) -> None:
        """Create the store where nothing complete is: the marker first, the old objects removed, ``.zmetadata`` last.

        A reader sees no ``.zmetadata`` (no store, or "being created") until the
        store is whole; a writer killed on the way leaves the marker, and the next
        writer into the URL creates the store anew.
        """
        files = self._files
        self._meta = None
        written: list[str] = []
        try:
            ds = build_dataset(self.layout, [], capacity=EPOCH_BLOCK)
            ds.attrs["completed_epochs"] = 0
            tree = _store_files(ds)
            files.write(CREATING_MARKER, json.dumps(_holder()).encode())
            files.remove(sorted(clear & {".zmetadata"}))
            files.remove(sorted(clear - {".zmetadata", CREATING_MARKER}))
            metadata = tree.pop(".zmetadata")
            written = sorted(tree)
            files.write_many(tree)
            files.write(".zmetadata", metadata)
            written.append(".zmetadata")
            files.remove([CREATING_MARKER])
        except OSError as error:
            if not _no_space(error):
                raise StoreError(f"cannot create run store {files.name!r}: {error.strerror or error}; "
                                 "choose a writable location") from error
            try:
                files.remove(written)
                files.remove([CREATING_MARKER])  # last: while it is there, the next run creates the store anew
            except OSError:
                pass
            raise _full(error, f"no space left to create run store {files.name!r} ({error.strerror}); nothing was "
                               "kept. Free space (or raise the quota) and run again") from error
        self._wrote()

    # existing stores -----------------------------------------------------------
    def _open_existing(self, *, resume: bool, overwrite: bool, keys: set[str] | None = None) -> None:
        remote = self._files.remote
        if not remote and not (self.path / ".zmetadata").exists():
            raise StoreError(
                f"{str(self.path)!r} is a folder that is not a probekit run store; refusing to write into it. "
                "Pass a new path, or an empty folder"
            )
        attrs = _root_attrs(self._files, writing=not overwrite)
        done = int(attrs.get("completed_epochs", 0))
        if overwrite and remote:
            self._create_remote(keys)
            return
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
        existing = open_run(self.path, storage_options=self._files.storage_options if remote else None)
        mismatch = _describe_mismatch(layout_of(existing), self.layout)
        if mismatch:
            raise StoreError(
                f"run store {str(self.path)!r} was made for another run: {mismatch}; "
                "nothing was written. Resume with the same model, layers, reductions and data, or write to another path"
            )
        if not remote:
            self._lock.acquire()
        self.rows = rows_of(existing)
        if remote:
            self._files.remove(sorted(keys & {CREATING_MARKER}))  # the last step of a creation that was cut short
        with self._space(f"continuing it at epoch {len(self.rows)}"):
            self._heal()

    def _heal(self) -> None:
        """Give every epoch array one capacity again (a kill during growth can leave them uneven)."""
        self._add_variables()
        group = self._group()
        names = self.layout.epoch_variables()
        capacity = max(group[name].shape[VARIABLE_DIMS[name].index("epoch")] for name in names)
        for name in names:
            self._resize(group[name], name, capacity)
        self._commit(len(self.rows), resized=True)

    def _add_variables(self) -> None:
        """Add the epoch arrays of this run that the store predates (``model_valid_loss``), empty: their default.

        Each array's files are written as a new store's would be; the
        consolidated metadata that names them is rewritten by :meth:`_heal`'s
        commit, so a writer killed before it leaves a store that reads as it
        did, and the next resume adds the arrays again.
        """
        entries = self._metadata()["metadata"]
        missing = [name for name in self.layout.epoch_variables() if f"{name}/.zarray" not in entries]
        if not missing:
            return
        capacity = int(entries["epoch/.zarray"]["shape"][VARIABLE_DIMS["epoch"].index("epoch")])
        files = _store_files(build_dataset(self.layout, [], capacity=capacity))
        for name in missing:
            if not self._files.remote:
                (self.path / name).mkdir(exist_ok=True)
            for key in sorted(k for k in files if k.startswith(f"{name}/")):
                self._files.write(key, files[key])
                self._wrote()
                if key.rsplit("/", 1)[1] in (".zarray", ".zattrs"):
                    entries[key] = json.loads(files[key])

    def _resize(self, array, name: str, capacity: int) -> None:
        shape = list(array.shape)
        axis = VARIABLE_DIMS[name].index("epoch")
        if shape[axis] != capacity:
            shape[axis] = capacity
            array.resize(tuple(shape))
            self._wrote()

    # appending ---------------------------------------------------------------
    def _group(self):
        return zarr.open_group(self._files.zarr_store(read_only=False), mode="r+", zarr_format=2, use_consolidated=False)

    def _space(self, doing: str):
        """Turn a full disk or quota into one :class:`StoreFullError` naming the store and what is kept."""
        return _OutOfSpace(self, doing)

    def append(self, row: EpochRow) -> None:
        """Write one epoch, then count it: readers see it whole or not at all."""
        with self._space(f"writing epoch {row.epoch}"):
            self._append(row)

    def _append(self, row: EpochRow) -> None:
        index = len(self.rows)
        capacity = self._metadata()["metadata"]["epoch/.zarray"]["shape"][0]
        resized = index >= capacity
        if resized:
            group = self._group()
            for name in self.layout.epoch_variables():
                self._resize(group[name], name, capacity + EPOCH_BLOCK)
            self._reload_arrays()
        group = None
        for name, value in row_values(row, self.layout).items():
            if not self._write_epoch(name, index, value):
                group = group or self._group()
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
        try:
            raw = self._files.read(f"{name}/{key}")
        except FileNotFoundError:
            data = _filled(chunks, dtype, meta.get("fill_value"))
        else:
            data = np.frombuffer(codec.decode(raw) if codec else raw, dtype=dtype).reshape(chunks).copy()
        where = [slice(None)] * len(shape)
        where[axis] = offset
        data[tuple(where)] = np.asarray(value).astype(dtype)
        data = np.ascontiguousarray(data)
        self._files.write(f"{name}/{key}", bytes(codec.encode(data)) if codec else data.tobytes(), durable=False)
        return True

    def _metadata(self) -> dict:
        """The store's consolidated metadata, read once: this writer is the only one (it holds the lock)."""
        if self._meta is None:
            self._meta = json.loads(self._files.read(".zmetadata"))
        return self._meta

    def _reload_arrays(self) -> None:
        """Take each epoch array's ``.zarray`` (its shape, after a resize) into the consolidated metadata."""
        entries = self._metadata()["metadata"]
        for name in self.layout.epoch_variables():
            entries[f"{name}/.zarray"] = json.loads(self._files.read(f"{name}/.zarray"))

    def _commit(self, completed: int, *, resized: bool) -> None:
        """Count ``completed`` epochs: rewrite the consolidated metadata, one atomic file.

        The metadata is updated here rather than by ``zarr.consolidate_metadata``,
        which would walk the folder (and trip over the lock file) every epoch.
        """
        if resized:
            self._reload_arrays()
        if self._files.remote:
            self._lock.check()
        meta = self._metadata()
        entries = meta["metadata"]
        entries[".zattrs"]["completed_epochs"] = completed
        self._files.write(".zattrs", json.dumps(entries[".zattrs"], indent=4).encode())
        self._wrote()
        self._files.write(".zmetadata", json.dumps(meta, indent=4).encode())
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


class _OutOfSpace:
    """``with writer._space(doing):`` a full disk or quota inside is one :class:`StoreFullError` (see :meth:`RunWriter._space`)."""

    def __init__(self, writer: RunWriter, doing: str):
        self.writer, self.doing = writer, doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, trace) -> bool:
        if error is None or not _no_space(error):
            return False
        kept = len(self.writer.rows)
        raise _full(error, f"no space left on run store {self.writer._files.name!r} while {self.doing} "
                           f"({error.strerror or error}): it keeps its {kept} completed epoch{'s' if kept != 1 else ''} "
                           "and no temporary file is left. Free space (or raise the quota), then continue with "
                           "resume=True (--resume)") from error
