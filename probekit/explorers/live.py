"""Reading runs for the explorers, once or live, and what every live app shares.

A :class:`Source` is where one run comes from (a dataset in memory, or a store
path). With ``live=True`` a :class:`Poller`, an :mod:`asyncio` task in the
kernel's own event loop, checks each store every ``interval`` seconds (one
``stat`` of its metadata file), reads it with :func:`probekit.run.store.open_run`
in a worker thread when an epoch has landed, and calls the app back on the
event loop: the kernel stays free for other cells, and no widget is touched
from a thread. :class:`LiveApp` is the base of the explorer and the comparison:
following stores, stopping and closing.

This module imports xarray and the run store (and the widgets module, to close an
app's widgets): never torch, never altair.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import xarray as xr

from probekit.explorers.widgets import close_tree
from probekit.params import Interval, check_params
from probekit.run.schema import check_run
from probekit.run.store import StoreError, open_run

__all__ = ["DEFAULT_INTERVAL", "LiveApp", "Poller", "RunLike", "Source", "as_source", "read_now"]

#: A run: a dataset, or the path of its store.
RunLike = Union[xr.Dataset, str, os.PathLike]

#: Default seconds between two checks of a live store.
DEFAULT_INTERVAL = 2.0

#: What a poller's arguments may be (see :func:`probekit.params.check_params`).
_CONSTRAINTS = {"interval": [Interval(float, 0, None, closed="neither")]}


@dataclass
class Source:
    """Where one run comes from: a dataset given in memory, or a store path."""

    label: str
    path: Path | None
    dataset: xr.Dataset | None
    signature: tuple[int, int] | None = None


def _metadata_signature(path: Path) -> tuple[int, int] | None:
    """When and how the store's consolidated metadata last changed (None: no store yet)."""
    try:
        stat = (path / ".zmetadata").stat()
    except OSError:
        return None
    return (stat.st_mtime_ns, stat.st_size)


def as_source(run: object, label: str | None, *, wait: bool) -> Source:
    """A run (a dataset or a store path) as a :class:`Source`, read once now unless ``wait`` and no store yet.

    Example:
        >>> as_source("runs/demo.zarr", None, wait=False).label
        'toynet'
    """
    if isinstance(run, xr.Dataset):
        check_run(run)
        return Source(label or str(run.attrs.get("model") or "run"), None, run)
    if isinstance(run, (str, os.PathLike)):
        path = Path(run)
        signature = _metadata_signature(path)
        dataset = None
        if signature is not None or not wait:
            dataset = open_run(path)
        name = str(dataset.attrs.get("model")) if dataset is not None and dataset.attrs.get("model") else path.stem
        return Source(label or name, path, dataset, signature)
    raise TypeError(
        f"a run is an xarray.Dataset or the path of its store (e.g. 'runs/a.zarr'); got {type(run).__name__}"
    )


class Poller:
    """An asyncio task in the kernel's event loop that re-reads stores, off the loop, when they change.

    Args:
        sources: The sources to follow (those with a path).
        interval: Seconds between two checks of the stores.
        on_data: Called on the event loop after a store was read.
        on_status: Called on the event loop with a message and whether it reports a problem.

    Example:
        >>> Poller([source], 2.0, app.redraw, app.show_status).start()   # inside a running event loop
    """

    def __init__(self, sources: list[Source], interval: float, on_data: Callable[[], None],
                 on_status: Callable[[str, bool], None]):
        check_params(_CONSTRAINTS, interval=interval)
        self.sources, self.interval = sources, float(interval)
        self.on_data, self.on_status = on_data, on_status
        self._task: asyncio.Task | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError(
                "live=True needs a running asyncio event loop, as in a Jupyter kernel; "
                "outside Jupyter, pass live=False and call .refresh() to read new epochs"
            ) from None
        self._task = loop.create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                changed = False
                for source in self.sources:
                    signature = _metadata_signature(source.path)
                    if signature is None or signature == source.signature:
                        continue
                    try:
                        dataset = await loop.run_in_executor(None, open_run, source.path)
                    except (FileNotFoundError, StoreError) as error:
                        self.on_status(f"cannot read {source.path} yet ({error}); retrying", True)
                        continue
                    source.signature, source.dataset, changed = signature, dataset, True
                if changed:
                    self.on_data()
                await asyncio.sleep(self.interval)
        except Exception as error:  # noqa: BLE001 - reported in the app, where the user looks
            self.on_status(f"live refresh stopped: {type(error).__name__}: {error}; call .refresh() to read the store", True)


def read_now(sources: list[Source]) -> list[str]:
    """Re-read every store now, on the caller's thread; returns messages for stores that could not be read.

    Example:
        >>> read_now([source])
        []
    """
    problems = []
    for source in sources:
        if source.path is None:
            continue
        signature = _metadata_signature(source.path)
        if signature is None:
            problems.append(f"no run store at {source.path} yet")
            continue
        source.dataset, source.signature = open_run(source.path), signature
    return problems


class LiveApp:
    """What an explorer and a comparison share: following stores, stopping, closing.

    Subclasses set ``_poller`` (a :class:`Poller`), ``widget`` and ``_render``.
    """

    _poller: Poller

    def stop(self):
        """Stop following live stores (the app stays, with what it last read).

        Returns:
            The app.

        Example:
            >>> ex.stop().live
            False
        """
        self._poller.stop()
        self._render()
        return self

    @property
    def live(self) -> bool:
        """Whether the app is following its store(s)."""
        return self._poller.running

    def close(self) -> None:
        """Stop following the store(s) and close every widget of the app.

        Example:
            >>> ex.close()
        """
        self._poller.stop()
        close_tree(self.widget)

    def _repr_mimebundle_(self, **kwargs: object) -> dict:
        return self.widget._repr_mimebundle_(**kwargs)
