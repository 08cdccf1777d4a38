"""The single-run explorer: :func:`explore`, its state and its controller.

:func:`explore` opens one run: pick layers (with the shortcuts *all*,
*merge points only* and *every k-th*), the metric and the split, and move an
epoch slider; the depth profile, the training curves, the layer x epoch
heatmap and the diagnosis panel follow. Given many runs
(:func:`probekit.open_runs`' dataset, with a ``run`` dimension), a run menu
picks the one shown; each run is read when it is first picked.

    >>> ex = pk.explore("runs/demo.zarr")           # last expression of a cell: the app
    >>> ex.select(layers=["fc1", "conv1"], split="test")  # what the widgets do, from code
    >>> ex.selected_layers                           # what the user picked, for the next cell
    ['conv1', 'fc1']
    >>> live = pk.explore("runs/b.zarr", live=True)  # follows a run that is still writing
    >>> pk.explore(pk.open_runs("runs/sweep/*.zarr"), run="seed=1")   # many runs: pick one

The explorer owns one :class:`ExploreState` and is its controller: every change
from a widget or from :meth:`Explorer.select` builds a new state and renders it
into views (:mod:`probekit.explorers.widgets`) that hold no data. Charts are pure
functions of the state, built with :mod:`probekit.plots`; the Vega JavaScript
is inlined (:func:`probekit.plots.enable_offline`), so nothing is fetched from
a CDN. Live reading is :mod:`probekit.explorers.live`'s.

This module imports pandas, xarray, altair and ipywidgets: never torch.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, replace

import altair as alt
import ipywidgets as widgets
import pandas as pd
import xarray as xr

from probekit import plots
from probekit.explorers.live import DEFAULT_INTERVAL, LiveApp, Poller, RunLike, Source, as_source, read_now
from probekit.explorers.selection import (
    default_layers, default_split, epoch_numbers, fits_epoch, resolve_layers, run_layers,
)
from probekit.explorers.widgets import ChartPanel, ExploreControls, findings_html, status_html
from probekit.run.many import RUN_DIM, run_names, select_run
from probekit.run.schema import check_in_run, epoch_position, measures_of, splits_of

__all__ = ["ExploreState", "Explorer", "explore"]


@dataclass(frozen=True)
class ExploreState:
    """Everything an :class:`Explorer` shows; the explorer is its one owner.

    Attributes:
        run: The run as last read (None while a live store has not appeared).
        layers: Selected layers, in forward order.
        measure: ``"error"``, ``"loss"`` or ``"top5"``.
        split: ``"train"``, ``"valid"`` or ``"test"``.
        epoch: The epoch asked for: an epoch number, or negative to count from
            the end (``-1``, the latest, follows a live run as epochs land).
        baselines: The baselines drawn as dashed curves; None: every one the run has.
        version: Counts the times new run data arrived.
        status: A one-line message for the user ("" when all is well).
        alert: Whether ``status`` reports a problem (shown in red).
        run_name: The name of the run shown, when the explorer was given many runs (None otherwise).
    """

    run: xr.Dataset | None
    layers: tuple[str, ...] = ()
    measure: str = "error"
    split: str = "valid"
    epoch: int = -1
    baselines: tuple[str, ...] | None = None
    version: int = 0
    status: str = ""
    alert: bool = False
    run_name: str | None = None

    @property
    def baselines_shown(self) -> tuple[str, ...]:
        """The baselines the charts draw (those of the run that are selected)."""
        names = tuple(plots.baselines_of(self.run)) if self.run is not None else ()
        return names if self.baselines is None else tuple(b for b in names if b in self.baselines)

    @property
    def epoch_shown(self) -> int | None:
        """The epoch number the charts show (None when the run has no epoch yet)."""
        if self.run is None or self.run.sizes["epoch"] == 0:
            return None
        return int(self.run["epoch"].values[epoch_position(self.run, self.epoch)])


def _profile_splits(ds: xr.Dataset, split: str) -> tuple[str, ...]:
    """The chosen split, with train beside it so the generalisation gap shows."""
    return (split,) if split == "train" or "train" not in splits_of(ds) else ("train", split)


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
        layers=list(state.layers), baselines=list(state.baselines_shown),
    )


def _curves_chart(state: ExploreState) -> alt.LayerChart:
    chart = plots.training_curves(state.run, measure=state.measure, split=state.split, layers=list(state.layers),
                                  baselines=list(state.baselines_shown))
    return chart + _epoch_rule(state.epoch_shown)


def _heatmap_chart(state: ExploreState) -> alt.LayerChart:
    chart = plots.heatmap(state.run, measure=state.measure, split=state.split, layers=list(state.layers))
    numbers = epoch_numbers(state.run)
    kept = {numbers[i] for i in plots.thin_epochs(len(numbers), max(len(state.layers), 1))}
    return chart + _epoch_column(state.epoch_shown) if state.epoch_shown in kept else chart


def _findings_of(ds: xr.Dataset, split: str, epoch: int) -> pd.DataFrame:
    """The diagnosis of a run at one epoch, as a frame (see ``probekit.diagnose``)."""
    from probekit.diagnosis import diagnose

    return diagnose(ds, split=split, epoch=epoch).to_frame()


def _baselines_asked(baselines: str | Sequence[str], known: Sequence[str]) -> tuple[str, ...] | None:
    """A ``baselines=`` selection: ``"all"`` (None: whatever the run has), or names it has."""
    if baselines == "all":
        return None
    names = (baselines,) if isinstance(baselines, str) else tuple(baselines)
    for name in names:
        if not known:
            raise ValueError(f"baseline {name!r} is not in this run, which has no baselines; "
                             "probe with baselines=['random_init', 'control'] to get them")
        check_in_run("baseline", name, list(known))
    return names


class Explorer(LiveApp):
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
            buttons ``all``, ``merges`` and ``every`` with the box ``k``,
            ``measure``, ``split``, ``baselines`` (a SelectMultiple of the run's
            baselines, hidden without any), ``epoch.widget`` (a SelectionSlider) and
            ``status``. Setting their values acts as a user would.
        widget: The app's root widget.

    Example:
        >>> ex = pk.explore(ds)
        >>> ex.select(every=2, measure="loss")
        >>> ex.charts["curves"].chart          # an Altair chart: save it, change it
    """

    def __init__(
        self,
        runs: RunLike,
        *,
        run: str | None = None,
        live: bool = False,
        interval: float = DEFAULT_INTERVAL,
        layers: str | Sequence[str] | None = None,
        every: int | None = None,
        measure: str = "error",
        split: str | None = None,
        epoch: int = -1,
    ):
        self._runs: xr.Dataset | None = None  # many runs (a ``run`` dimension), of which one is shown
        self._loaded: dict[str, xr.Dataset] = {}
        if isinstance(runs, xr.Dataset) and RUN_DIM in runs.dims:
            self._runs = runs
            names = run_names(runs)
            run = names[0] if run is None else run
            if run not in names:
                raise ValueError(f"run={run!r} is not in this dataset; choose from: {', '.join(names)}")
            self._source = Source(run, None, self._run_named(run))
        elif run is not None:
            raise ValueError("run= picks one of many runs (pk.open_runs' dataset, with a 'run' dimension); "
                             "this is a single run: leave run= out")
        else:
            self._source = as_source(runs, None, wait=live)
        self._poller = Poller([self._source], interval, self._data_arrived, self._set_status)
        if live and self._source.path is None:
            raise ValueError(
                "live=True follows a run store on disk, but an in-memory dataset was given; "
                "pass the store's path (e.g. 'runs/b.zarr') or leave live=False"
            )
        self._request = {"layers": layers, "every": every, "measure": measure, "split": split, "epoch": epoch}
        self._findings: dict[tuple[int, str, int], tuple[pd.DataFrame | None, str | None]] = {}
        plots.enable_offline(renderer=False)
        self.controls = ExploreControls(self._user_change)
        self._header = widgets.HTML()
        self._findings_view = widgets.HTML()
        self._findings_view.add_class("probekit-findings")
        self._panels = {name: ChartPanel(name) for name in ("profile", "curves", "heatmap", "diagnosis")}
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
            if self._runs is not None:
                self.state = replace(self.state, run_name=self._source.label)
        if live:
            self._poller.start()
        self._render()

    # -- selections ------------------------------------------------------------
    @property
    def dataset(self) -> xr.Dataset | None:
        """The run as last read (None while a live store has not appeared)."""
        return self.state.run

    @property
    def runs(self) -> list[str]:
        """The names of the runs to pick from (empty for an explorer of one run)."""
        return [] if self._runs is None else run_names(self._runs)

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
        """The diagnosis shown, ``pk.diagnose(run, split=split, epoch=epoch).to_frame()``."""
        key = self._findings_key()
        return None if key is None else self._findings_for(key)[0]

    def select(
        self,
        *,
        run: str | None = None,
        layers: str | Sequence[str] | None = None,
        every: int | None = None,
        measure: str | None = None,
        split: str | None = None,
        epoch: int | None = None,
        baselines: str | Sequence[str] | None = None,
    ) -> Explorer:
        """Change the selection from code, as the widgets do; unset arguments stay.

        Args:
            run: The run shown, by name, when the explorer was given many runs;
                the other selections carry over where the run has them.
            layers: Layer names, ``"all"`` or ``"merges"`` (see
                :func:`probekit.explorers.selection.merge_layers`).
            every: Keep every k-th layer from the input (and the last layer).
            measure: ``"error"``, ``"loss"`` or ``"top5"``.
            split: ``"train"``, ``"valid"`` or ``"test"``.
            epoch: An epoch number, or negative to count from the end: ``-1``
                follows the latest epoch, ``-2`` the one before it, ...
            baselines: The baselines drawn as dashed curves: names the run has
                (``"random_init"``, ``"control"``), ``"all"`` or ``()`` for none.

        Returns:
            The explorer, so calls chain.

        Raises:
            ValueError: A name, measure, split or epoch the run does not have
                (the message lists those it has).

        Example:
            >>> ex.select(layers=["conv1", "fc1"], split="test", epoch=0)
        """
        if run is not None:
            self._show_run(run)
        ds = self.state.run
        if ds is None:
            raise ValueError(f"the run store {self._source.path} has not appeared yet; select once it has epochs")
        changes: dict[str, object] = {}
        if layers is not None or every is not None:
            changes["layers"] = resolve_layers(ds, layers, every)
        if measure is not None:
            check_in_run("measure", measure, measures_of(ds))
            changes["measure"] = str(measure)
        if split is not None:
            check_in_run("split", split, splits_of(ds))
            changes["split"] = str(split)
        if epoch is not None:
            epoch_position(ds, epoch)
            changes["epoch"] = int(epoch)
        if baselines is not None:
            changes["baselines"] = _baselines_asked(baselines, plots.baselines_of(ds))
        self.state = replace(self.state, status="", alert=False, **changes)
        self._render()
        return self

    def _user_change(self, **change: object) -> None:
        try:
            self.select(**change)
        except (TypeError, ValueError) as error:
            self._set_status(str(error), True)

    # -- data ------------------------------------------------------------------
    def _run_named(self, name: str) -> xr.Dataset:
        """One of the many runs, read into memory the first time it is shown."""
        if name not in self._loaded:
            self._loaded[name] = select_run(self._runs, name).load()
        return self._loaded[name]

    def _show_run(self, name: str) -> None:
        """Show another of the many runs, keeping the layers, measure, split and epoch where it has them."""
        if self._runs is None:
            raise ValueError("run= picks one of many runs, but this explorer shows a single run; "
                             "open several with pk.open_runs and explore that")
        names = run_names(self._runs)
        if name not in names:
            raise ValueError(f"run={name!r} is not in this dataset; choose from: {', '.join(names)}")
        if name == self.state.run_name:
            return
        ds, old = self._run_named(name), self.state
        layers = set(run_layers(ds))
        self._request = {
            "layers": list(old.layers) if old.layers and set(old.layers) <= layers else None, "every": None,
            "measure": old.measure if old.measure in measures_of(ds) else "error",
            "split": old.split if old.split in splits_of(ds) else None,
            "epoch": old.epoch if fits_epoch(epoch_numbers(ds), old.epoch) else -1,
        }
        self._source = Source(name, None, ds)
        self._poller.sources = [self._source]
        self.state = replace(self._first_state(ds, version=old.version + 1), run_name=name,
                             baselines=old.baselines)
        self._findings.clear()

    def _first_state(self, ds: xr.Dataset, *, version: int) -> ExploreState:
        request = self._request
        if request["layers"] is None and request["every"] is None:
            layers = tuple(default_layers(run_layers(ds)))
        else:
            layers = resolve_layers(ds, request["layers"], request["every"])
        split = request["split"] or default_split(splits_of(ds))
        check_in_run("measure", request["measure"], measures_of(ds))
        check_in_run("split", split, splits_of(ds))
        if ds.sizes["epoch"]:
            epoch_position(ds, request["epoch"])
        return ExploreState(run=ds, layers=layers, measure=str(request["measure"]), split=str(split),
                            epoch=int(request["epoch"]), version=version)

    def _data_arrived(self) -> None:
        ds = self._source.dataset
        old = self.state
        if old.run is None or run_layers(old.run) != run_layers(ds):
            try:
                self.state = self._first_state(ds, version=old.version + 1)
            except (TypeError, ValueError) as error:
                self._request = {"layers": None, "every": None, "measure": "error", "split": None, "epoch": -1}
                self.state = replace(self._first_state(ds, version=old.version + 1), status=str(error), alert=True)
        else:
            epoch = old.epoch if not ds.sizes["epoch"] or fits_epoch(epoch_numbers(ds), old.epoch) else -1
            self.state = replace(old, run=ds, epoch=epoch, version=old.version + 1, status="", alert=False)
        self._findings.clear()
        self._render()

    def _set_status(self, text: str, alert: bool = False) -> None:
        self.state = replace(self.state, status=text, alert=alert)
        self._show_controls()
        self._header.value = self._header_html()

    def refresh(self) -> Explorer:
        """Read the run's store again now and redraw (a dataset given in memory is redrawn as is).

        Returns:
            The explorer.

        Example:
            >>> ex.refresh().epoch
        """
        problems = read_now([self._source])
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
            *([f"run <b>{html.escape(state.run_name)}</b>"] if state.run_name is not None else []),
            f"<b>{html.escape(str(attrs.get('model', 'run')))}</b> on {html.escape(str(attrs.get('dataset', '?')))}",
            f"{ds.sizes['layer']} layers, {len(state.layers)} selected",
            f"{n_epochs} epoch{'s' if n_epochs != 1 else ''}",
            f"{html.escape(str(attrs.get('mode', '?')))} probes",
        ]
        return " &middot; ".join(parts) + live

    def _show_controls(self) -> None:
        state, ds = self.state, self.state.run
        self.controls.show(
            names=run_layers(ds) if ds is not None else None,
            layers=state.layers,
            measures=measures_of(ds) if ds is not None else [state.measure],
            measure=state.measure,
            splits=splits_of(ds) if ds is not None else [state.split],
            split=state.split,
            epochs=epoch_numbers(ds) if ds is not None else [],
            epoch=state.epoch_shown,
            status=state.status,
            alert=state.alert,
            baselines=plots.baselines_of(ds) if ds is not None else (),
            shown_baselines=state.baselines_shown,
            runs=self.runs,
            run=state.run_name,
        )

    def _render(self) -> None:
        state = self.state
        self._show_controls()
        self._header.value = self._header_html()
        if state.epoch_shown is None:
            for panel in self._panels.values():
                panel.show(None, lambda: None)
            self._findings_view.value = status_html("waiting for the first epoch" if state.run is not None else "")
            return
        view = (state.version, state.layers, state.measure, state.split, state.epoch_shown, state.baselines_shown)
        self._panels["profile"].show(view, lambda: _profile_chart(state))
        self._panels["curves"].show(view, lambda: _curves_chart(state))
        self._panels["heatmap"].show(view, lambda: _heatmap_chart(state))
        findings, error = self._findings_for(self._findings_key())
        overlay = findings if findings is not None else pd.DataFrame(columns=list(plots.FINDING_COLUMNS))
        self._panels["diagnosis"].show(
            (state.version, state.measure, state.split, state.epoch_shown, error is None),
            lambda: plots.diagnosis_overlay(state.run, overlay, measure=state.measure, split=state.split,
                                            epoch=state.epoch_shown),
        )
        self._findings_view.value = findings_html(findings, error, state.epoch_shown)

    def __repr__(self) -> str:
        state = self.state
        where = self._source.path or (f"run {self.state.run_name!r} of {len(self.runs)}" if self._runs is not None
                                      else "an in-memory run")
        return (
            f"<Explorer of {where}: {len(state.layers)} layers selected, {state.split} {state.measure}, "
            f"epoch {state.epoch_shown}{', live' if self.live else ''}>"
        )


def explore(
    runs: RunLike,
    *,
    run: str | None = None,
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
    it), drawn on the profile and listed below it. A run's baselines are
    dashed curves in the profile and the training curves, each one an entry
    of the *baselines* menu (deselect it to hide it); repeated fits are drawn
    as their mean with a band.

    Args:
        runs: A run dataset, the path of its store, or many runs:
            :func:`probekit.open_runs`' dataset (with a ``run`` dimension), of
            which a menu picks the one shown.
        run: With many runs, the one shown first (by default the first);
            :meth:`Explorer.select` (``run=``) and the menu change it.
        live: Follow a store that a run is still writing: check it every
            ``interval`` seconds and redraw as each epoch lands, without
            blocking the kernel. The store may not exist yet. Stop with
            :meth:`Explorer.stop`.
        interval: Seconds between two checks of a live store.
        layers: Layers selected at first: names, ``"all"`` or ``"merges"``
            (the merge points: residual sums and concatenations, see
            :func:`probekit.explorers.selection.merge_layers`); by default all
            of them, or every k-th for runs of more than 24.
        every: Select every k-th layer instead (the last layer is always kept).
        measure: ``"error"``, ``"loss"`` or ``"top5"``.
        split: The split shown; by default ``valid`` when the run has it.
        epoch: The epoch shown: an epoch number, or negative to count from the
            end; ``-1`` (the default) follows the latest.

    Returns:
        The :class:`Explorer`; end a cell with it to show it.

    Raises:
        FileNotFoundError: No store at ``run`` (and ``live`` is False).
        ValueError: A selection the run does not have (the message lists
            what it has).
        RuntimeError: ``live=True`` outside a running event loop (not in Jupyter).

    Example:
        >>> ex = pk.explore("runs/demo.zarr", layers="merges")
        >>> ex                                   # shows the app
        >>> pk.explore("runs/b.zarr", live=True) # follows a run still writing
        >>> pk.explore(pk.open_runs("runs/sweep/*.zarr"), run="seed=1")
    """
    return Explorer(runs, run=run, live=live, interval=interval, layers=layers, every=every, measure=measure,
                    split=split, epoch=epoch)
