"""Explorers: small ipywidgets apps over probe runs, for JupyterLab.

:func:`explore` opens one run: pick layers (with the shortcuts *all*,
*blocks only* and *every k-th*), the metric and the split, and move an epoch
slider; the depth profile, the training curves, the layer x epoch heatmap and
the diagnosis panel follow. :func:`compare` puts several runs of different
architectures on one relative-depth axis (Inception v3 against ResNet-50)
with the same selections applied to every run.

    >>> ex = pk.explore("runs/demo.zarr")           # last expression of a cell: the app
    >>> ex.select(layers=["fc1", "conv1"], split="test")  # what the widgets do, from code
    >>> ex.selected_layers                           # what the user picked, for the next cell
    ['conv1', 'fc1']
    >>> live = pk.explore("runs/b.zarr", live=True)  # follows a run that is still writing

Each explorer is a state object (:class:`ExploreState`, :class:`CompareState`)
with one owner, the explorer, which is also the controller: every change from
a widget or from :meth:`Explorer.select` builds a new state and renders it
into views that hold no data. Charts are pure functions of the state, built
with :mod:`probekit.plots` and shown in :class:`altair.JupyterChart` widgets
whose chart is replaced in place; the Vega JavaScript is inlined
(:func:`probekit.plots.enable_offline`), so nothing is fetched from a CDN.

With ``live=True`` an :mod:`asyncio` task in the kernel's own event loop
checks the store every ``interval`` seconds (one ``stat`` of its metadata
file), reads it with :func:`probekit.run.store.open_run` in a worker thread when
an epoch has landed, and updates the widgets back on the event loop: the
kernel stays free for other cells, and no widget is touched from a thread.

This module imports numpy, pandas, xarray, altair and ipywidgets, never torch.
"""

from __future__ import annotations

import asyncio
import html
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Union

import altair as alt
import ipywidgets as widgets
import numpy as np
import pandas as pd
import xarray as xr

from probekit import plots
from probekit.run.store import StoreError, open_run

__all__ = ["CompareState", "Comparison", "ExploreState", "Explorer", "block_layers", "compare", "explore"]

#: A run: a dataset, or the path of its store.
RunLike = Union[xr.Dataset, str, os.PathLike]

#: Default seconds between two checks of a live store.
DEFAULT_INTERVAL = 2.0
#: Layers selected by default; runs with more start on every k-th layer.
DEFAULT_MAX_LAYERS = 24
#: ``op`` values of probe points where paths merge: residual sums, concatenations.
MERGE_OPS = ("add", "cat")

_MEASURE_LABELS = {"error": "error", "loss": "loss (nats)", "top5": "top-5 error"}
_SPLIT_ORDER = ("valid", "test", "train")
_EMBED_OPTIONS = {"renderer": "svg", "actions": False}
_INDEXED = re.compile(r"\.\d+$")


# --------------------------------------------------------------------------
# Layer shortcuts (pure functions of a run's layer names)


def block_layers(names: Sequence[str], ops: Sequence[str] | None = None) -> list[str]:
    """The layers the *blocks only* shortcut keeps, in the order given.

    A block is the first layer (the input), the last (the output), an
    indexed child of a container (``layer1.0``, ``layers.63``, ``blocks.2``)
    or a merge point (``op`` ``add`` or ``cat``: a residual sum, an Inception
    concatenation). A run with no such layer between its ends keeps them all.

    Args:
        names: Layer names in forward order (a run's ``layer`` coordinate).
        ops: Their ``op`` coordinate, the same length; None to judge by names only.

    Returns:
        The block layers, in the order of ``names``.

    Example:
        >>> block_layers(["input", "conv1", "layer1.0", "layer1.1", "fc"])
        ['input', 'layer1.0', 'layer1.1', 'fc']
    """
    names = [str(name) for name in names]
    ops = [str(op) for op in ops] if ops is not None else [""] * len(names)
    if len(ops) != len(names):
        raise ValueError(f"block_layers got {len(names)} names but {len(ops)} ops; give one op per layer")
    inner = [name for name, op in zip(names[1:-1], ops[1:-1]) if _INDEXED.search(name) or op in MERGE_OPS]
    if not inner:
        return names
    keep = {names[0], names[-1], *inner}
    return [name for name in names if name in keep]


def _every(names: Sequence[str], k: int) -> list[str]:
    """Every ``k``-th layer from the first, and the last one too."""
    chosen = list(names[::k])
    if names and names[-1] not in chosen:
        chosen.append(names[-1])
    return chosen


def _check_every(every: object) -> int:
    if isinstance(every, bool) or not isinstance(every, (int, np.integer)) or every < 1:
        raise ValueError(f"every must be a whole number of at least 1 (keep every k-th layer); got {every!r}")
    return int(every)


def _default_layers(names: list[str]) -> list[str]:
    if len(names) <= DEFAULT_MAX_LAYERS:
        return names
    return _every(names, math.ceil(len(names) / DEFAULT_MAX_LAYERS))


def _run_layers(ds: xr.Dataset) -> list[str]:
    """Layer names in forward (depth) order."""
    order = np.argsort(np.asarray(ds["depth"].values), kind="stable")
    return [str(name) for name in np.asarray(ds["layer"].values)[order]]


def _run_blocks(ds: xr.Dataset) -> list[str]:
    order = np.argsort(np.asarray(ds["depth"].values), kind="stable")
    names = np.asarray(ds["layer"].values)[order]
    ops = np.asarray(ds["op"].values)[order] if "op" in ds.coords else None
    return block_layers(names.tolist(), None if ops is None else ops.tolist())


def _resolve_layers(ds: xr.Dataset, layers: str | Sequence[str], every: int | None) -> tuple[str, ...]:
    """A ``layers=`` / ``every=`` request as layer names in forward order."""
    names = _run_layers(ds)
    if every is not None:
        if layers is not None:
            raise ValueError("pass layers= or every=, not both (every=k keeps every k-th layer of the run)")
        return tuple(_every(names, _check_every(every)))
    if isinstance(layers, str):
        if layers == "all":
            return tuple(names)
        if layers == "blocks":
            return tuple(_run_blocks(ds))
        if layers in names:
            return (layers,)
        raise ValueError(
            f"layers={layers!r} is neither a layer of this run nor a shortcut; use 'all', 'blocks', "
            f"every=k, or names from: {_choices(names)}"
        )
    wanted = [str(name) for name in layers]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise ValueError(f"layers {_choices(unknown)} are not in this run; choose from: {_choices(names)}")
    keep = set(wanted)
    return tuple(name for name in names if name in keep)


def _choices(values: Sequence[object], limit: int = 12) -> str:
    items = [str(v) for v in values]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[: limit - 2]) + f", ..., {items[-1]} ({len(items)} in all)"


def _unique(values: object) -> list[str]:
    return list(dict.fromkeys(str(v) for v in np.asarray(values).tolist()))


def _measures(ds: xr.Dataset) -> list[str]:
    return _unique(ds["measure"].values)


def _splits(ds: xr.Dataset) -> list[str]:
    return _unique(ds["split"].values)


def _default_split(splits: Sequence[str]) -> str:
    return next(split for split in (*_SPLIT_ORDER, *splits) if split in splits)


def _check_choice(name: str, value: object, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not in this run; choose from: {_choices(choices)}")
    return str(value)


def _epoch_numbers(ds: xr.Dataset) -> list[int]:
    return [int(e) for e in np.asarray(ds["epoch"].values)]


def _check_epoch(epoch: object, numbers: Sequence[int]) -> int | None:
    """An ``epoch=`` request as an epoch number (pinned), or None for the latest (``-1``, which follows)."""
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
        raise TypeError(f"epoch must be an int (an epoch number, or -1 for the latest); got {epoch!r}")
    epoch = int(epoch)
    if epoch == -1:
        return None
    if epoch < 0:
        if -epoch > len(numbers):
            raise ValueError(f"epoch={epoch} reaches before the first epoch; this run has {len(numbers)} epochs")
        epoch = numbers[epoch]
    elif epoch not in numbers:
        raise ValueError(f"epoch={epoch} is not in this run; choose from: {_choices(numbers)} (or -1 for the latest)")
    return epoch


# --------------------------------------------------------------------------
# Reading runs, once or live


@dataclass
class _Source:
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


def _as_source(run: object, label: str | None, *, wait: bool) -> _Source:
    if isinstance(run, xr.Dataset):
        plots.tidy(run, layers=[], epoch=[])  # refuses a dataset that is not a run
        return _Source(label or str(run.attrs.get("model") or "run"), None, run)
    if isinstance(run, (str, os.PathLike)):
        path = Path(run)
        signature = _metadata_signature(path)
        dataset = None
        if signature is not None or not wait:
            dataset = open_run(path)
        name = str(dataset.attrs.get("model")) if dataset is not None and dataset.attrs.get("model") else path.stem
        return _Source(label or name, path, dataset, signature)
    raise TypeError(
        f"a run is an xarray.Dataset or the path of its store (e.g. 'runs/a.zarr'); got {type(run).__name__}"
    )


class _Poller:
    """An asyncio task in the kernel's event loop that re-reads stores when they change."""

    def __init__(self, sources: list[_Source], interval: float, on_data: Callable[[], None],
                 on_status: Callable[[str, bool], None]):
        self.sources, self.interval = sources, interval
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


def _check_interval(interval: object) -> float:
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval > 0:
        raise ValueError(f"interval must be a positive number of seconds; got {interval!r}")
    return float(interval)


def _read_now(sources: list[_Source]) -> list[str]:
    """Re-read every store now; returns messages for stores that could not be read."""
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


# --------------------------------------------------------------------------
# Views: widgets that show a state and report user changes; they hold no data


def _chart_widget(name: str) -> alt.JupyterChart:
    chart = alt.JupyterChart(None, embed_options=dict(_EMBED_OPTIONS))
    chart.add_class(f"probekit-{name}")
    return chart


class _ChartPanel:
    """One JupyterChart whose chart is replaced in place when its inputs change."""

    def __init__(self, name: str):
        self.name = name
        self.widget = _chart_widget(name)
        self._key: object = None

    def show(self, key: object, build: Callable[[], alt.TopLevelMixin | None]) -> None:
        if key == self._key:
            return
        self.widget.chart = build()
        self._key = key


class _Guard:
    """Set while the controller pushes a state into widgets, so their observers stay quiet."""

    def __init__(self) -> None:
        self.active = False

    def __enter__(self) -> None:
        self.active = True

    def __exit__(self, *exc: object) -> None:
        self.active = False


def _set_options(widget: widgets.Widget, options: list, value: object) -> None:
    if list(widget.options) != options:
        widget.options = options
    if widget.value != value:
        widget.value = value


def _measure_options(measures: Sequence[str]) -> list[tuple[str, str]]:
    return [(_MEASURE_LABELS.get(m, m), m) for m in measures]


class _EpochSlider:
    """An epoch slider over epoch numbers (they need not be consecutive)."""

    def __init__(self) -> None:
        self.widget = widgets.SelectionSlider(
            options=[("-", -1)], value=-1, description="epoch", continuous_update=False, disabled=True,
            layout=widgets.Layout(width="96%"),
        )
        self.widget.add_class("probekit-epoch")

    def show(self, numbers: Sequence[int], shown: int | None) -> None:
        if not numbers:
            _set_options(self.widget, [("-", -1)], -1)
            self.widget.disabled = True
            return
        _set_options(self.widget, [(str(n), n) for n in numbers], numbers[-1] if shown is None else shown)
        self.widget.disabled = len(numbers) < 2


def _status_html(text: str, *, error: bool = False) -> str:
    colour = "#b00020" if error else "#555555"
    return f'<span style="color:{colour}">{html.escape(text)}</span>' if text else ""


class _ExploreControls:
    """Layer list with shortcuts, metric, split and epoch for one run."""

    def __init__(self, on_change: Callable[..., None]):
        self._guard = _Guard()
        self._on_change = on_change
        self.layers = widgets.SelectMultiple(options=[], rows=12, layout=widgets.Layout(width="96%"))
        self.layers.add_class("probekit-layers")
        self.all = widgets.Button(description="all", layout=widgets.Layout(width="auto"))
        self.blocks = widgets.Button(description="blocks only", layout=widgets.Layout(width="auto"))
        self.every = widgets.Button(description="every k-th", layout=widgets.Layout(width="auto"))
        self.k = widgets.BoundedIntText(value=2, min=1, max=1000, description="k", layout=widgets.Layout(width="110px"),
                                        style={"description_width": "16px"})
        for button, name in ((self.all, "all"), (self.blocks, "blocks"), (self.every, "every")):
            button.add_class(f"probekit-{name}")
        self.measure = widgets.Dropdown(options=[("error", "error")], description="metric",
                                        layout=widgets.Layout(width="96%"))
        self.split = widgets.ToggleButtons(options=["valid"], description="split", style={"button_width": "64px"})
        self.epoch = _EpochSlider()
        self.status = widgets.HTML()
        self.layers.observe(self._layers_changed, names="value")
        self.measure.observe(lambda change: self._changed(measure=change["new"]), names="value")
        self.split.observe(lambda change: self._changed(split=change["new"]), names="value")
        self.epoch.widget.observe(self._epoch_changed, names="value")
        self.all.on_click(lambda _: self._changed(layers="all"))
        self.blocks.on_click(lambda _: self._changed(layers="blocks"))
        self.every.on_click(lambda _: self._changed(every=self.k.value))
        self.widget = widgets.VBox(
            [
                widgets.HTML("<b>layers</b> (shift/ctrl-click for several)"),
                self.layers,
                widgets.HBox([self.all, self.blocks], layout=widgets.Layout(flex_flow="row wrap")),
                widgets.HBox([self.every, self.k]),
                self.measure,
                self.split,
                self.epoch.widget,
                self.status,
            ],
            layout=widgets.Layout(width="320px", min_width="280px"),
        )

    def _changed(self, **change: object) -> None:
        if not self._guard.active:
            self._on_change(**change)

    def _layers_changed(self, change: dict) -> None:
        self._changed(layers=tuple(change["new"]))

    def _epoch_changed(self, change: dict) -> None:
        if change["new"] is not None and change["new"] != -1:
            self._changed(epoch=-1 if change["new"] == self.epoch.widget.options[-1][1] else change["new"])

    def show(self, state: ExploreState) -> None:
        with self._guard:
            ds = state.run
            names = _run_layers(ds) if ds is not None else []
            _set_options(self.layers, names, tuple(state.layers))
            self.layers.rows = max(4, min(12, len(names)))
            self.k.max = max(1, len(names))
            measures = _measures(ds) if ds is not None else [state.measure]
            _set_options(self.measure, _measure_options(measures), state.measure)
            _set_options(self.split, _splits(ds) if ds is not None else [state.split], state.split)
            self.epoch.show(_epoch_numbers(ds) if ds is not None else [], state.epoch)
            for control in (self.layers, self.all, self.blocks, self.every, self.k, self.measure, self.split):
                control.disabled = ds is None
            self.status.value = _status_html(state.status, error=state.alert)


# --------------------------------------------------------------------------
# One run: state, charts and the controller


@dataclass(frozen=True)
class ExploreState:
    """Everything an :class:`Explorer` shows; the explorer is its one owner.

    Attributes:
        run: The run as last read (None while a live store has not appeared).
        layers: Selected layers, in forward order.
        measure: ``"error"``, ``"loss"`` or ``"top5"``.
        split: ``"train"``, ``"valid"`` or ``"test"``.
        epoch: The epoch number shown, or None for the latest (which follows
            a live run as epochs land).
        version: Counts the times new run data arrived.
        status: A one-line message for the user ("" when all is well).
        alert: Whether ``status`` reports a problem (shown in red).
    """

    run: xr.Dataset | None
    layers: tuple[str, ...] = ()
    measure: str = "error"
    split: str = "valid"
    epoch: int | None = None
    version: int = 0
    status: str = ""
    alert: bool = False

    @property
    def epoch_shown(self) -> int | None:
        """The epoch number the charts show (None when the run has no epoch yet)."""
        if self.run is None or self.run.sizes["epoch"] == 0:
            return None
        return _epoch_numbers(self.run)[-1] if self.epoch is None else self.epoch


def _profile_splits(ds: xr.Dataset, split: str) -> tuple[str, ...]:
    """The chosen split, with train beside it so the generalisation gap shows."""
    return (split,) if split == "train" or "train" not in _splits(ds) else ("train", split)


def _epoch_rule(epoch: int) -> alt.Chart:
    return (
        alt.Chart(pd.DataFrame({"epoch": [epoch]}))
        .mark_rule(color="#d62728", strokeDash=[4, 3])
        .encode(x=alt.X("epoch:Q"), tooltip=[alt.Tooltip("epoch:Q", title="shown epoch")])
    )


def _epoch_column(epoch: int) -> alt.Chart:
    return (
        alt.Chart(pd.DataFrame({"epoch": [epoch]}))
        .mark_rect(fillOpacity=0, stroke="#d62728", strokeWidth=2)
        .encode(x=alt.X("epoch:O"))
    )


def _profile_chart(state: ExploreState) -> alt.LayerChart:
    return plots.depth_profile(
        state.run, measure=state.measure, epoch=state.epoch_shown, splits=_profile_splits(state.run, state.split),
        layers=list(state.layers),
    )


def _curves_chart(state: ExploreState) -> alt.LayerChart:
    chart = plots.training_curves(state.run, measure=state.measure, split=state.split, layers=list(state.layers))
    return chart + _epoch_rule(state.epoch_shown)


def _heatmap_chart(state: ExploreState) -> alt.LayerChart:
    chart = plots.heatmap(state.run, measure=state.measure, split=state.split, layers=list(state.layers))
    numbers = _epoch_numbers(state.run)
    kept = {numbers[i] for i in plots.thin_epochs(len(numbers), max(len(state.layers), 1))}
    return chart + _epoch_column(state.epoch_shown) if state.epoch_shown in kept else chart


def _empty_findings() -> pd.DataFrame:
    return pd.DataFrame(columns=list(plots.FINDING_COLUMNS))


def _findings_of(ds: xr.Dataset, split: str, epoch: int) -> pd.DataFrame:
    """The diagnosis of a run at one epoch, as a frame (see ``probekit.diagnose``)."""
    from probekit.diagnosis import diagnose

    return diagnose(ds, split=split, epoch=epoch).to_frame()


def _names_text(value: object) -> str:
    """A finding's ``layers`` cell (a name or a list of names) as short text."""
    if isinstance(value, str):
        return value
    names = [] if np.ndim(value) == 0 else [str(name) for name in value]
    if len(names) > 3:
        return f"{names[0]} ... {names[-1]} ({len(names)} layers)"
    return ", ".join(names)


def _close_tree(widget: widgets.Widget) -> None:
    """Close a widget and every widget inside it (``Widget.close_all`` would close every widget of the kernel)."""
    for child in getattr(widget, "children", ()):
        _close_tree(child)
    widget.close()


def _table_html(frame: pd.DataFrame) -> str:
    """A small left-aligned HTML table (widgets do not get JupyterLab's table styles); cells are escaped."""
    cell = "padding:2px 10px 2px 0;text-align:left;vertical-align:top"
    head = "".join(f'<th style="{cell};border-bottom:1px solid #999">{html.escape(str(c))}</th>' for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f'<td style="{cell}">{"" if v is None else html.escape(str(v))}</td>' for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f'<table style="border-collapse:collapse;font-size:12px"><tr>{head}</tr>{body}</table>'


def _findings_html(findings: pd.DataFrame | None, error: str | None, epoch: int | None) -> str:
    if error:
        return _status_html(error, error=True)
    if findings is None:
        return ""
    if not len(findings):
        return f"<b>diagnosis at epoch {epoch}</b>: no findings."
    frame = findings[list(plots.FINDING_COLUMNS)].copy()
    frame["layers"] = [_names_text(value) for value in frame["layers"]]
    table = _table_html(frame)
    return f"<b>diagnosis at epoch {epoch}</b>: {len(frame)} finding{'s' if len(frame) != 1 else ''}{table}"


class _LiveApp:
    """What an explorer and a comparison share: following stores, stopping, closing.

    Subclasses set ``_poller`` (a :class:`_Poller`), ``widget`` and ``_render``.
    """

    _poller: _Poller

    def stop(self):
        """Stop following live stores (the app stays, with what it last read).

        Returns:
            The app.
        """
        self._poller.stop()
        self._render()
        return self

    @property
    def live(self) -> bool:
        """Whether the app is following its store(s)."""
        return self._poller.running

    def close(self) -> None:
        """Stop following the store(s) and close every widget of the app."""
        self._poller.stop()
        _close_tree(self.widget)


class Explorer(_LiveApp):
    """One run in an app: layers, metric, split and epoch drive four charts.

    Build it with :func:`explore`. Show it by ending a cell with it (or
    ``display(ex)``); read the user's choices back with
    :attr:`selected_layers`, :attr:`measure`, :attr:`split` and
    :attr:`epoch`, and change them from code with :meth:`select`.

    Attributes:
        state: The current :class:`ExploreState`.
        charts: The chart widgets by name (``profile``, ``curves``,
            ``heatmap``, ``diagnosis``): :class:`altair.JupyterChart`, whose
            ``.chart`` is the Altair chart shown and ``.spec`` its Vega-Lite.
        controls: The control widgets: ``layers`` (a SelectMultiple), the
            buttons ``all``, ``blocks`` and ``every`` with the box ``k``,
            ``measure``, ``split``, ``epoch.widget`` (a SelectionSlider) and
            ``status``. Setting their values acts as a user would.
        widget: The app's root widget.

    Example:
        >>> ex = pk.explore(ds)
        >>> ex.select(every=2, measure="loss")
        >>> ex.charts["curves"].chart          # an Altair chart: save it, change it
    """

    def __init__(
        self,
        run: RunLike,
        *,
        live: bool = False,
        interval: float = DEFAULT_INTERVAL,
        layers: str | Sequence[str] | None = None,
        every: int | None = None,
        measure: str = "error",
        split: str | None = None,
        epoch: int = -1,
    ):
        interval = _check_interval(interval)
        self._source = _as_source(run, None, wait=live)
        if live and self._source.path is None:
            raise ValueError(
                "live=True follows a run store on disk, but an in-memory dataset was given; "
                "pass the store's path (e.g. 'runs/b.zarr') or leave live=False"
            )
        self._request = {"layers": layers, "every": every, "measure": measure, "split": split, "epoch": epoch}
        self._findings: dict[tuple[int, str, int], tuple[pd.DataFrame | None, str | None]] = {}
        plots.enable_offline(renderer=False)
        self.controls = _ExploreControls(self._user_change)
        self._header = widgets.HTML()
        self._findings_view = widgets.HTML()
        self._findings_view.add_class("probekit-findings")
        self._panels = {name: _ChartPanel(name) for name in ("profile", "curves", "heatmap", "diagnosis")}
        self.charts: dict[str, alt.JupyterChart] = {name: panel.widget for name, panel in self._panels.items()}
        charts = widgets.HBox([panel.widget for panel in self._panels.values()],
                              layout=widgets.Layout(flex_flow="row wrap", align_items="flex-start"))
        self.widget = widgets.VBox(
            [self._header, widgets.HBox([self.controls.widget, widgets.VBox([charts, self._findings_view])])]
        )
        self.widget.add_class("probekit-explorer")
        self.state = ExploreState(run=None, status=f"waiting for the run store {self._source.path} to appear")
        if self._source.dataset is not None:
            self.state = self._first_state(self._source.dataset, version=1)
        self._poller = _Poller([self._source], interval, self._data_arrived, self._set_status)
        if live:
            self._poller.start()
        self._render()

    # -- selections ------------------------------------------------------------
    @property
    def dataset(self) -> xr.Dataset | None:
        """The run as last read (None while a live store has not appeared)."""
        return self.state.run

    @property
    def selected_layers(self) -> list[str]:
        """The selected layers, in forward order."""
        return list(self.state.layers)

    @property
    def measure(self) -> str:
        """The selected measure (``error``, ``loss`` or ``top5``)."""
        return self.state.measure

    @property
    def split(self) -> str:
        """The selected split."""
        return self.state.split

    @property
    def epoch(self) -> int | None:
        """The epoch number shown (None when the run has no epoch yet)."""
        return self.state.epoch_shown

    @property
    def findings(self) -> pd.DataFrame | None:
        """The diagnosis shown: ``pk.diagnose(run, split=split, epoch=epoch).to_frame()``."""
        key = self._findings_key()
        return None if key is None else self._findings_for(key)[0]

    def select(
        self,
        *,
        layers: str | Sequence[str] | None = None,
        every: int | None = None,
        measure: str | None = None,
        split: str | None = None,
        epoch: int | None = None,
    ) -> Explorer:
        """Change the selection from code, as the widgets do; unset arguments stay.

        Args:
            layers: Layer names, ``"all"`` or ``"blocks"`` (see :func:`block_layers`).
            every: Keep every k-th layer from the input (and the last layer).
            measure: ``"error"``, ``"loss"`` or ``"top5"``.
            split: ``"train"``, ``"valid"`` or ``"test"``.
            epoch: An epoch number; ``-1`` follows the latest epoch; other
                negative numbers count from the end.

        Returns:
            The explorer, so calls chain.

        Raises:
            ValueError: A name, measure, split or epoch the run does not have
                (the message lists those it has).

        Example:
            >>> ex.select(layers=["conv1", "fc1"], split="test", epoch=0)
        """
        ds = self.state.run
        if ds is None:
            raise ValueError(f"the run store {self._source.path} has not appeared yet; select once it has epochs")
        changes: dict[str, object] = {}
        if layers is not None or every is not None:
            changes["layers"] = _resolve_layers(ds, layers, every)
        if measure is not None:
            changes["measure"] = _check_choice("measure", measure, _measures(ds))
        if split is not None:
            changes["split"] = _check_choice("split", split, _splits(ds))
        if epoch is not None:
            changes["epoch"] = _check_epoch(epoch, _epoch_numbers(ds))
        self.state = replace(self.state, status="", alert=False, **changes)
        self._render()
        return self

    def _user_change(self, **change: object) -> None:
        try:
            self.select(**change)
        except (TypeError, ValueError) as error:
            self._set_status(str(error), True)

    # -- data ------------------------------------------------------------------
    def _first_state(self, ds: xr.Dataset, *, version: int) -> ExploreState:
        request = self._request
        names = _run_layers(ds)
        if request["layers"] is None and request["every"] is None:
            layers = tuple(_default_layers(names))
        else:
            layers = _resolve_layers(ds, request["layers"], request["every"])
        split = request["split"] or _default_split(_splits(ds))
        return ExploreState(
            run=ds,
            layers=layers,
            measure=_check_choice("measure", request["measure"], _measures(ds)),
            split=_check_choice("split", split, _splits(ds)),
            epoch=_check_epoch(request["epoch"], _epoch_numbers(ds)) if ds.sizes["epoch"] else None,
            version=version,
        )

    def _data_arrived(self) -> None:
        ds = self._source.dataset
        old = self.state
        if old.run is None or _run_layers(old.run) != _run_layers(ds):
            try:
                self.state = self._first_state(ds, version=old.version + 1)
            except (TypeError, ValueError) as error:
                self._request = {"layers": None, "every": None, "measure": "error", "split": None, "epoch": -1}
                self.state = replace(self._first_state(ds, version=old.version + 1), status=str(error), alert=True)
        else:
            epoch = old.epoch if old.epoch is None or old.epoch in _epoch_numbers(ds) else None
            self.state = replace(old, run=ds, epoch=epoch, version=old.version + 1, status="", alert=False)
        self._findings.clear()
        self._render()

    def _set_status(self, text: str, alert: bool = False) -> None:
        self.state = replace(self.state, status=text, alert=alert)
        self.controls.show(self.state)
        self._header.value = self._header_html()

    def refresh(self) -> Explorer:
        """Read the run's store again now and redraw (a dataset given in memory is redrawn as is).

        Returns:
            The explorer.

        Example:
            >>> ex.refresh().epoch
        """
        problems = _read_now([self._source])
        if problems:
            self._set_status("; ".join(problems), True)
        elif self._source.dataset is not None:
            self._data_arrived()
        return self

    # -- rendering -------------------------------------------------------------
    def _findings_key(self) -> tuple[int, str, int] | None:
        state = self.state
        if state.epoch_shown is None:
            return None
        return (state.version, state.split, state.epoch_shown)

    def _findings_for(self, key: tuple[int, str, int]) -> tuple[pd.DataFrame | None, str | None]:
        if key not in self._findings:
            try:
                self._findings[key] = (_findings_of(self.state.run, key[1], key[2]), None)
            except (TypeError, ValueError) as error:
                self._findings[key] = (None, f"diagnosis failed at this epoch: {error}")
        return self._findings[key]

    def _header_html(self) -> str:
        state = self.state
        live = " &middot; <b style='color:#2e7d32'>live</b>" if self.live else ""
        if state.run is None:
            return f"<b>{html.escape(str(self._source.path))}</b>{live}"
        ds, attrs = state.run, state.run.attrs
        n_epochs = ds.sizes["epoch"]
        parts = [
            f"<b>{html.escape(str(attrs.get('model', 'run')))}</b> on {html.escape(str(attrs.get('dataset', '?')))}",
            f"{ds.sizes['layer']} layers, {len(state.layers)} selected",
            f"{n_epochs} epoch{'s' if n_epochs != 1 else ''}",
            f"{html.escape(str(attrs.get('mode', '?')))} probes",
        ]
        return " &middot; ".join(parts) + live

    def _render(self) -> None:
        state = self.state
        self.controls.show(state)
        self._header.value = self._header_html()
        if state.epoch_shown is None:
            for panel in self._panels.values():
                panel.show(None, lambda: None)
            self._findings_view.value = _status_html("waiting for the first epoch" if state.run is not None else "")
            return
        view = (state.version, state.layers, state.measure, state.split, state.epoch_shown)
        self._panels["profile"].show(view, lambda: _profile_chart(state))
        self._panels["curves"].show(view, lambda: _curves_chart(state))
        self._panels["heatmap"].show(view, lambda: _heatmap_chart(state))
        findings, error = self._findings_for(self._findings_key())
        overlay = findings if findings is not None else _empty_findings()
        self._panels["diagnosis"].show(
            (state.version, state.measure, state.split, state.epoch_shown, error is None),
            lambda: plots.diagnosis_overlay(state.run, overlay, measure=state.measure, split=state.split,
                                            epoch=state.epoch_shown),
        )
        self._findings_view.value = _findings_html(findings, error, state.epoch_shown)

    def _repr_mimebundle_(self, **kwargs: object) -> dict:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        state = self.state
        where = self._source.path or "an in-memory run"
        return (
            f"<Explorer of {where}: {len(state.layers)} layers selected, {state.split} {state.measure}, "
            f"epoch {state.epoch_shown}{', live' if self.live else ''}>"
        )


def explore(
    run: RunLike,
    *,
    live: bool = False,
    interval: float = DEFAULT_INTERVAL,
    layers: str | Sequence[str] | None = None,
    every: int | None = None,
    measure: str = "error",
    split: str | None = None,
    epoch: int = -1,
) -> Explorer:
    """An app over one run: layers, metric, split and epoch drive the charts.

    The app shows the depth profile at the chosen epoch (with the train
    split beside the chosen one, so the generalisation gap shows), the
    training curves of the selected layers (one line per layer, the chosen
    epoch marked), the layer x epoch heatmap (the chosen epoch outlined) and
    the diagnosis of the chosen split at the chosen epoch
    (:func:`probekit.diagnosis.diagnose`, which also reads the epochs before
    it), drawn on the profile and listed below it.

    Args:
        run: A run dataset, or the path of its store.
        live: Follow a store that a run is still writing: check it every
            ``interval`` seconds and redraw as each epoch lands, without
            blocking the kernel. The store may not exist yet. Stop with
            :meth:`Explorer.stop`.
        interval: Seconds between two checks of a live store.
        layers: Layers selected at first: names, ``"all"`` or ``"blocks"``;
            by default all of them, or every k-th for runs of more than 24.
        every: Select every k-th layer instead (the last layer is always kept).
        measure: ``"error"``, ``"loss"`` or ``"top5"``.
        split: The split shown; by default ``valid`` when the run has it.
        epoch: The epoch shown; ``-1`` (the default) follows the latest.

    Returns:
        The :class:`Explorer`; end a cell with it to show it.

    Raises:
        FileNotFoundError: No store at ``run`` (and ``live`` is False).
        ValueError: A selection the run does not have (the message lists
            what it has).
        RuntimeError: ``live=True`` outside a running event loop (not in Jupyter).

    Example:
        >>> ex = pk.explore("runs/demo.zarr", layers="blocks")
        >>> ex                                   # shows the app
        >>> pk.explore("runs/b.zarr", live=True) # follows a run still writing
    """
    return Explorer(run, live=live, interval=interval, layers=layers, every=every, measure=measure, split=split,
                    epoch=epoch)


# --------------------------------------------------------------------------
# Several runs: state, chart and the controller

#: How :func:`compare` picks each run's layers.
LayerRule = Literal["all", "blocks", "every"]


@dataclass(frozen=True)
class CompareState:
    """Everything a :class:`Comparison` shows; the comparison is its one owner.

    Attributes:
        runs: ``(name, run)`` pairs; a run is None while its live store has
            not appeared.
        rule: Which layers of each run: ``"all"``, ``"blocks"`` or ``"every"``.
        every: k of the ``"every"`` rule.
        depth_range: Keep layers whose relative depth lies in this interval.
        measure: The measure drawn; every run has it.
        split: The split drawn; every run has it.
        epoch: Each run is drawn at its last epoch up to this number; None
            draws each run's latest.
        version: Counts the times new run data arrived.
        status: A one-line message for the user.
        alert: Whether ``status`` reports a problem (shown in red).
    """

    runs: tuple[tuple[str, xr.Dataset | None], ...]
    rule: LayerRule = "all"
    every: int = 2
    depth_range: tuple[float, float] = (0.0, 1.0)
    measure: str = "error"
    split: str = "valid"
    epoch: int | None = None
    version: int = 0
    status: str = ""
    alert: bool = False

    @property
    def ready(self) -> list[tuple[str, xr.Dataset]]:
        """The runs that have been read and have at least one epoch."""
        return [(name, ds) for name, ds in self.runs if ds is not None and ds.sizes["epoch"]]


def _rule_layers(ds: xr.Dataset, rule: LayerRule, every: int, depth_range: tuple[float, float]) -> list[str]:
    if rule == "all":
        chosen = _run_layers(ds)
    elif rule == "blocks":
        chosen = _run_blocks(ds)
    else:
        chosen = _every(_run_layers(ds), every)
    relative = dict(zip((str(n) for n in ds["layer"].values), np.asarray(ds["relative_depth"].values, dtype=float)))
    low, high = depth_range
    return [name for name in chosen if low - 1e-9 <= relative[name] <= high + 1e-9]


def _position_up_to(ds: xr.Dataset, epoch: int | None) -> int | None:
    """Position of the run's last epoch at or before ``epoch`` (None: none that early)."""
    numbers = _epoch_numbers(ds)
    if epoch is None:
        return len(numbers) - 1
    earlier = [i for i, number in enumerate(numbers) if number <= epoch]
    return earlier[-1] if earlier else None


def _compared_runs(state: CompareState) -> tuple[dict[str, xr.Dataset], list[dict]]:
    """Each run cut to the selected layers and epochs, and a summary row per run."""
    shown, rows = {}, []
    for name, ds in state.runs:
        row = {"run": name, "model": None, "layers shown": 0, "layers": 0, "epoch shown": None, "reductions": ""}
        if ds is None:
            rows.append({**row, "note": "waiting for its store"})
            continue
        row.update(model=str(ds.attrs.get("model", "?")), layers=ds.sizes["layer"])
        position = _position_up_to(ds, state.epoch) if ds.sizes["epoch"] else None
        layers = _rule_layers(ds, state.rule, state.every, state.depth_range)
        note = ""
        if position is None:
            note = "no epoch yet" if not ds.sizes["epoch"] else f"no epoch at or before {state.epoch}"
        elif not layers:
            note = "no layer in the selection"
        if not note:
            index = {str(n): i for i, n in enumerate(ds["layer"].values)}
            cut = ds.isel(layer=[index[n] for n in layers], epoch=slice(0, position + 1))
            shown[name] = cut
            reductions = _unique(cut["reduction"].values)
            row.update({"layers shown": len(layers), "epoch shown": _epoch_numbers(cut)[-1],
                        "reductions": ", ".join(reductions)})
        rows.append({**row, "note": note})
    return shown, rows


def _comparison_chart(state: CompareState, shown: dict[str, xr.Dataset]) -> alt.LayerChart | None:
    if not shown:
        return None
    return plots.comparison(shown, measure=state.measure, split=state.split, epoch=-1)


def _common(values: list[list[str]]) -> list[str]:
    if not values:
        return []
    return [v for v in values[0] if all(v in other for other in values[1:])]


class _CompareControls:
    """Layer rule, relative-depth window, metric, split and epoch for several runs."""

    def __init__(self, on_change: Callable[..., None]):
        self._guard = _Guard()
        self._on_change = on_change
        self.rule = widgets.ToggleButtons(
            options=[("all", "all"), ("blocks only", "blocks"), ("every k-th", "every")], description="layers",
            style={"button_width": "92px", "description_width": "60px"},
        )
        self.rule.add_class("probekit-rule")
        self.k = widgets.BoundedIntText(value=2, min=1, max=1000, description="k", layout=widgets.Layout(width="110px"),
                                        style={"description_width": "16px"})
        self.depth = widgets.FloatRangeSlider(value=(0.0, 1.0), min=0.0, max=1.0, step=0.05, description="rel. depth",
                                              continuous_update=False, readout_format=".2f")
        self.measure = widgets.Dropdown(options=[("error", "error")], description="metric",
                                        layout=widgets.Layout(width="96%"))
        self.split = widgets.ToggleButtons(options=["valid"], description="split", style={"button_width": "64px"})
        self.epoch = _EpochSlider()
        self.status = widgets.HTML()
        self.rule.observe(lambda change: self._changed(rule=change["new"]), names="value")
        self.k.observe(lambda change: self._changed(every=change["new"]), names="value")
        self.depth.observe(lambda change: self._changed(depth_range=tuple(change["new"])), names="value")
        self.measure.observe(lambda change: self._changed(measure=change["new"]), names="value")
        self.split.observe(lambda change: self._changed(split=change["new"]), names="value")
        self.epoch.widget.observe(self._epoch_changed, names="value")
        self.widget = widgets.VBox([self.rule, self.k, self.depth, self.measure, self.split, self.epoch.widget,
                                    self.status], layout=widgets.Layout(width="380px", min_width="320px"))

    def _changed(self, **change: object) -> None:
        if not self._guard.active:
            self._on_change(**change)

    def _epoch_changed(self, change: dict) -> None:
        if change["new"] is not None and change["new"] != -1:
            self._changed(epoch=-1 if change["new"] == self.epoch.widget.options[-1][1] else change["new"])

    def show(self, state: CompareState, measures: list[str], splits: list[str], epochs: list[int]) -> None:
        with self._guard:
            self.rule.value = state.rule
            self.k.value = state.every
            self.k.disabled = state.rule != "every"
            self.depth.value = state.depth_range
            _set_options(self.measure, _measure_options(measures or [state.measure]), state.measure)
            _set_options(self.split, splits or [state.split], state.split)
            self.epoch.show(epochs, state.epoch)
            self.status.value = _status_html(state.status, error=state.alert)


class Comparison(_LiveApp):
    """Several runs on one relative-depth axis, with one set of selections for all.

    Build it with :func:`compare`. The layer rule (*all*, *blocks only*,
    *every k-th*) and the relative-depth window apply to each run; the epoch
    slider runs over every run's epochs and each run is drawn at its last
    epoch up to the chosen one (a model probed once, such as a pretrained
    ResNet-50, stays at its only epoch).

    Attributes:
        state: The current :class:`CompareState`.
        charts: ``{"comparison": JupyterChart}``.
        controls: The control widgets: ``rule`` (all / blocks only / every
            k-th), ``k``, ``depth`` (a FloatRangeSlider), ``measure``,
            ``split``, ``epoch.widget`` and ``status``.
        widget: The app's root widget.

    Example:
        >>> cmp = pk.compare({"Inception v3": "data/runs/inception_v3.zarr", "ResNet-50": "data/runs/resnet50.zarr"})
        >>> cmp.select(layers="blocks", depth_range=(0.5, 1.0))
        >>> cmp.selected_layers["ResNet-50"]
    """

    def __init__(
        self,
        runs: Sequence[RunLike] | Mapping[str, RunLike],
        *,
        names: Sequence[str] | None = None,
        live: bool = False,
        interval: float = DEFAULT_INTERVAL,
        layers: str = "all",
        every: int | None = None,
        depth_range: tuple[float, float] = (0.0, 1.0),
        measure: str = "error",
        split: str | None = None,
        epoch: int = -1,
    ):
        interval = _check_interval(interval)
        self._sources = _compare_sources(runs, names, wait=live)
        if live and not any(source.path for source in self._sources):
            raise ValueError(
                "live=True follows run stores on disk, but only in-memory datasets were given; "
                "pass store paths or leave live=False"
            )
        plots.enable_offline(renderer=False)
        self.controls = _CompareControls(self._user_change)
        self._header = widgets.HTML()
        self._table = widgets.HTML()
        self._table.add_class("probekit-runs")
        self._panel = _ChartPanel("comparison")
        self.charts: dict[str, alt.JupyterChart] = {"comparison": self._panel.widget}
        self.widget = widgets.VBox(
            [self._header, widgets.HBox([self.controls.widget, widgets.VBox([self._panel.widget, self._table])])]
        )
        self.widget.add_class("probekit-compare")
        self._poller = _Poller([s for s in self._sources if s.path is not None], interval, self._data_arrived,
                               self._set_status)
        self.state = CompareState(runs=tuple((s.label, s.dataset) for s in self._sources), version=1)
        _, splits, _ = self._choices()
        self.select(
            layers=None if every is not None else layers, every=every, depth_range=depth_range, measure=measure,
            split=split or (_default_split(splits) if splits else None), epoch=epoch,
        )
        if live:
            self._poller.start()
            self._render()

    # -- selections ------------------------------------------------------------
    @property
    def datasets(self) -> dict[str, xr.Dataset | None]:
        """Each run as last read, by name."""
        return dict(self.state.runs)

    @property
    def selected_layers(self) -> dict[str, list[str]]:
        """The layers drawn for each run, by run name, in forward order."""
        return {
            name: _rule_layers(ds, self.state.rule, self.state.every, self.state.depth_range)
            for name, ds in self.state.runs
            if ds is not None
        }

    @property
    def measure(self) -> str:
        """The selected measure."""
        return self.state.measure

    @property
    def split(self) -> str:
        """The selected split."""
        return self.state.split

    @property
    def epoch(self) -> int | None:
        """The chosen epoch number (None: each run's latest)."""
        return self.state.epoch

    @property
    def epochs_shown(self) -> dict[str, int | None]:
        """The epoch each run is drawn at, by run name (None when it has none that early)."""
        shown = {}
        for name, ds in self.state.runs:
            position = _position_up_to(ds, self.state.epoch) if ds is not None and ds.sizes["epoch"] else None
            shown[name] = None if position is None else _epoch_numbers(ds)[position]
        return shown

    def _choices(self) -> tuple[list[str], list[str], list[int]]:
        ready = [ds for _, ds in self.state.ready]
        measures = _common([_measures(ds) for ds in ready])
        splits = _common([_splits(ds) for ds in ready])
        epochs = sorted({number for ds in ready for number in _epoch_numbers(ds)})
        return measures, splits, epochs

    def select(
        self,
        *,
        layers: str | None = None,
        every: int | None = None,
        depth_range: tuple[float, float] | None = None,
        measure: str | None = None,
        split: str | None = None,
        epoch: int | None = None,
    ) -> Comparison:
        """Change the selection from code, as the widgets do; unset arguments stay.

        Args:
            layers: ``"all"`` or ``"blocks"`` (see :func:`block_layers`), for every run.
            every: Keep every k-th layer of each run (and its last layer).
            depth_range: ``(low, high)`` relative depths to keep, within [0, 1].
            measure: A measure every run has.
            split: A split every run has.
            epoch: Draw each run at its last epoch up to this number; ``-1``
                draws each run's latest.

        Returns:
            The comparison, so calls chain.

        Raises:
            ValueError: A value outside what the runs share (the message lists it).

        Example:
            >>> cmp.select(every=2, split="test")
        """
        measures, splits, epochs = self._choices()
        changes: dict[str, object] = {}
        if layers is not None and every is not None:
            raise ValueError("pass layers= or every=, not both (every=k keeps every k-th layer of each run)")
        if layers is not None:
            if layers not in ("all", "blocks"):
                raise ValueError(
                    f"compare selects layers by rule, the same for every run; layers={layers!r} is not one of: "
                    "all, blocks (or pass every=k)"
                )
            changes["rule"] = layers
        if every is not None:
            changes.update(rule="every", every=_check_every(every))
        if depth_range is not None:
            changes["depth_range"] = _check_depth_range(depth_range)
        if measure is not None:  # checked once runs have been read
            changes["measure"] = _check_choice("measure", measure, measures) if measures else measure
        if split is not None:
            changes["split"] = _check_choice("split", split, splits) if splits else split
        if epoch is not None:
            changes["epoch"] = _check_compare_epoch(epoch, epochs)
        self.state = replace(self.state, status="", alert=False, **changes)
        self._render()
        return self

    def _user_change(self, **change: object) -> None:
        try:
            if change.get("rule") == "every":
                change = {"every": self.controls.k.value}
            elif "rule" in change:
                change = {"layers": change["rule"]}
            elif "every" in change and self.state.rule != "every":
                return
            self.select(**change)
        except (TypeError, ValueError) as error:
            self._set_status(str(error), True)

    # -- data ------------------------------------------------------------------
    def _data_arrived(self) -> None:
        state = replace(self.state, runs=tuple((s.label, s.dataset) for s in self._sources),
                        version=self.state.version + 1, status="", alert=False)
        self.state = state
        measures, splits, epochs = self._choices()
        fixes = {}
        if measures and state.measure not in measures:
            fixes["measure"] = measures[0]
        if splits and state.split not in splits:
            fixes["split"] = _default_split(splits)
        if state.epoch is not None and state.epoch not in epochs:
            fixes["epoch"] = None
        if fixes:
            asked = ", ".join(f"{name}={getattr(state, name)!r}" for name in fixes)
            shown = ", ".join(f"{name}={value!r}" for name, value in fixes.items())
            fixes.update(status=f"the runs do not all have {asked}; showing {shown}", alert=True)
        self.state = replace(state, **fixes)
        self._render()

    def _set_status(self, text: str, alert: bool = False) -> None:
        self.state = replace(self.state, status=text, alert=alert)
        self._render()

    def refresh(self) -> Comparison:
        """Read every run's store again now and redraw.

        Returns:
            The comparison.
        """
        problems = _read_now(self._sources)
        self._data_arrived()
        if problems:
            self._set_status("; ".join(problems), True)
        return self

    # -- rendering -------------------------------------------------------------
    def _render(self) -> None:
        state = self.state
        measures, splits, epochs = self._choices()
        self.controls.show(state, measures, splits, epochs)
        shown, rows = _compared_runs(state)
        live = " &middot; <b style='color:#2e7d32'>live</b>" if self.live else ""
        self._header.value = (
            f"<b>{len(state.runs)} runs</b> by relative depth: {html.escape(', '.join(n for n, _ in state.runs))}{live}"
        )
        key = (state.version, state.rule, state.every, state.depth_range, state.measure, state.split, state.epoch)
        self._panel.show(key, lambda: _comparison_chart(state, shown))
        self._table.value = _table_html(pd.DataFrame(rows))

    def _repr_mimebundle_(self, **kwargs: object) -> dict:
        return self.widget._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return f"<Comparison of {', '.join(name for name, _ in self.state.runs)}{', live' if self.live else ''}>"


def _check_depth_range(depth_range: object) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in depth_range)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(f"depth_range must be two numbers (low, high) within [0, 1]; got {depth_range!r}") from None
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"depth_range must satisfy 0 <= low <= high <= 1; got {depth_range!r}")
    return (low, high)


def _check_compare_epoch(epoch: object, epochs: Sequence[int]) -> int | None:
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
        raise TypeError(f"epoch must be an int (an epoch number, or -1 for each run's latest); got {epoch!r}")
    if int(epoch) == -1:
        return None
    if int(epoch) < 0:
        raise ValueError(f"epoch={epoch} is not an epoch number; pass one of {_choices(epochs)}, or -1 for each run's latest")
    return int(epoch)


def _compare_sources(runs: object, names: Sequence[str] | None, *, wait: bool) -> list[_Source]:
    if isinstance(runs, (xr.Dataset, str, os.PathLike)):
        raise TypeError("compare takes several runs (a list, or a dict from name to run); for one run use pk.explore")
    if isinstance(runs, Mapping):
        if names is not None:
            raise TypeError("names= is for a list of runs; the keys of a dict already name them")
        pairs = [(str(name), run) for name, run in runs.items()]
    else:
        items = list(runs)
        if names is not None:
            names = [str(name) for name in names]
            if len(names) != len(items):
                raise ValueError(f"names has {len(names)} entries for {len(items)} runs; give one name per run")
        pairs = list(zip(names or [None] * len(items), items))
    if not pairs:
        raise ValueError("compare needs at least one run; got none")
    sources = []
    for i, (name, run) in enumerate(pairs):
        try:
            sources.append(_as_source(run, name, wait=wait))
        except TypeError as error:
            raise TypeError(f"runs[{i}]: {error}") from error
    labels = [source.label for source in sources]
    if names is not None and len(set(labels)) != len(labels):
        raise ValueError(f"names must be distinct; got {', '.join(labels)}")
    seen: dict[str, int] = {}
    for source in sources:  # default names: number the models that appear twice
        if labels.count(source.label) > 1:
            seen[source.label] = seen.get(source.label, 0) + 1
            source.label = f"{source.label} ({seen[source.label]})"
    return sources


def compare(
    runs: Sequence[RunLike] | Mapping[str, RunLike],
    *,
    names: Sequence[str] | None = None,
    live: bool = False,
    interval: float = DEFAULT_INTERVAL,
    layers: str = "all",
    every: int | None = None,
    depth_range: tuple[float, float] = (0.0, 1.0),
    measure: str = "error",
    split: str | None = None,
    epoch: int = -1,
) -> Comparison:
    """An app over several runs of different architectures, aligned by relative depth.

    Relative depth runs from 0 at a model's input to 1 at its output, so a
    17-point Inception v3 run and a 17-point ResNet-50 run (or a trained
    model and its untrained copy) share one axis. One layer rule and one
    relative-depth window apply to every run; the table under the chart
    lists, per run, what is drawn, at which epoch and with which reductions
    (a reduction is part of the result).

    Args:
        runs: A list of runs (datasets or store paths), or a dict from name to run.
        names: Names for a list of runs; by default each run's ``model``
            attribute (numbered when two share one).
        live: Follow stores that runs are still writing (see :func:`explore`).
        interval: Seconds between two checks of live stores.
        layers: ``"all"`` or ``"blocks"`` (see :func:`block_layers`).
        every: Keep every k-th layer of each run instead.
        depth_range: ``(low, high)``: keep layers at these relative depths.
        measure: A measure every run has.
        split: A split every run has; by default ``valid`` when all have it.
        epoch: Draw each run at its last epoch up to this number; ``-1`` (the
            default) draws each run's latest.

    Returns:
        The :class:`Comparison`; end a cell with it to show it.

    Example:
        >>> pk.compare({"Inception v3": "data/runs/inception_v3.zarr", "ResNet-50": "data/runs/resnet50.zarr"})
    """
    return Comparison(runs, names=names, live=live, interval=interval, layers=layers, every=every,
                      depth_range=depth_range, measure=measure, split=split, epoch=epoch)
