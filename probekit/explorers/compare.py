"""The comparison of several runs: :func:`compare`, its state and its controller.

:func:`compare` puts several runs of different architectures on one
relative-depth axis (Inception v3 against ResNet-50) with the same selections
applied to every run: a layer rule (*all*, *merge points only*, *every k-th*),
a relative-depth window, the metric, the split and an epoch. The comparison
owns one :class:`CompareState` and is its controller; its views are
:mod:`probekit.explorers.widgets`' and its chart is
:func:`probekit.plots.comparison` (each run's baselines dashed, as its
*baselines* menu selects them), with, when it is given one, the layer
similarity of two models (:func:`probekit.cka`) as a heatmap beside it
(:func:`probekit.plots.cka_heatmap`). Many runs opened together
(:func:`probekit.open_runs`' dataset, with a ``run`` dimension) are compared
run by run, each named by its ``run`` coordinate.

This module imports pandas, xarray, altair and ipywidgets: never torch.
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import altair as alt
import ipywidgets as widgets
import pandas as pd
import xarray as xr

from probekit import plots
from probekit.explorers.live import DEFAULT_INTERVAL, LiveApp, Poller, RunLike, Source, as_source, read_now
from probekit.explorers.selection import (
    SELECTION_CONSTRAINTS, LayerRule, default_split, epoch_numbers, fits_epoch, rule_layers,
)
from probekit.explorers.widgets import ChartPanel, CompareControls, table_html
from probekit.params import Interval, Options, check_params
from probekit.run.many import RUN_DIM, split_runs
from probekit.run.schema import check_in_run, epoch_index, measures_of, splits_of

__all__ = ["CompareState", "Comparison", "compare"]


class _DepthRange:
    """A ``(low, high)`` pair with ``0 <= low <= high <= 1`` (a constraint for :func:`probekit.params.check_params`)."""

    def accepts(self, value: object) -> bool:
        try:
            low, high = (float(v) for v in value)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            return False
        return 0.0 <= low <= high <= 1.0

    def describe(self) -> str:
        return "a pair (low, high) with 0 <= low <= high <= 1"


#: What :meth:`Comparison.select`'s arguments may be (see :func:`probekit.params.check_params`).
_CONSTRAINTS = {
    **SELECTION_CONSTRAINTS,
    "layers": [Options("all", "merges"), None],
    "depth_range": [_DepthRange(), None],
    "epoch": [Interval(int), None],
}


@dataclass(frozen=True)
class CompareState:
    """Everything a :class:`Comparison` shows; the comparison is its one owner.

    Attributes:
        runs: ``(name, run)`` pairs; a run is None while its live store has
            not appeared.
        rule: Which layers of each run: ``"all"``, ``"merges"`` (merge points)
            or ``"every"``.
        every: k of the ``"every"`` rule.
        depth_range: Keep layers whose relative depth lies in this interval.
        measure: The measure drawn; every run has it.
        split: The split drawn; every run has it.
        epoch: The epoch asked for on the runs' epochs taken together: an
            epoch number, or negative to count from the end (``-1``, the
            latest). Each run is drawn at its last epoch up to it.
        baselines: The baselines drawn as dashed lines; None: every one the runs have.
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
    epoch: int = -1
    baselines: tuple[str, ...] | None = None
    version: int = 0
    status: str = ""
    alert: bool = False

    @property
    def known_baselines(self) -> list[str]:
        """The baselines any ready run has, in the order they first appear."""
        return list(dict.fromkeys(b for _, ds in self.ready for b in plots.baselines_of(ds)))

    @property
    def baselines_shown(self) -> tuple[str, ...]:
        """The baselines drawn, those of the runs that are selected."""
        known = self.known_baselines
        return tuple(known) if self.baselines is None else tuple(b for b in known if b in self.baselines)

    @property
    def ready(self) -> list[tuple[str, xr.Dataset]]:
        """The runs that have been read and have at least one epoch."""
        return [(name, ds) for name, ds in self.runs if ds is not None and ds.sizes["epoch"]]

    @property
    def epochs(self) -> list[int]:
        """The epoch numbers of the ready runs, taken together, in order."""
        return sorted({number for _, ds in self.ready for number in epoch_numbers(ds)})

    @property
    def epoch_shown(self) -> int | None:
        """The epoch number each run is drawn up to (None while no run has an epoch)."""
        epochs = self.epochs
        return epochs[epoch_index(epochs, self.epoch)] if epochs else None


def _position_up_to(ds: xr.Dataset, epoch: int | None) -> int | None:
    """Position of the run's last epoch at or before ``epoch`` (None: none that early)."""
    earlier = [i for i, number in enumerate(epoch_numbers(ds)) if epoch is None or number <= epoch]
    return earlier[-1] if earlier else None


def _compared_runs(state: CompareState) -> tuple[dict[str, xr.Dataset], list[dict]]:
    """Each run cut to the selected layers and epochs, and a summary row per run."""
    shown, rows = {}, []
    limit = state.epoch_shown
    for name, ds in state.runs:
        row = {"run": name, "model": None, "layers shown": 0, "layers": 0, "epoch shown": None, "reductions": ""}
        if ds is None:
            rows.append({**row, "note": "waiting for its store"})
            continue
        row.update(model=str(ds.attrs.get("model", "?")), layers=ds.sizes["layer"])
        position = _position_up_to(ds, limit) if ds.sizes["epoch"] else None
        layers = rule_layers(ds, state.rule, state.every, state.depth_range)
        note = ""
        if position is None:
            note = "no epoch yet" if not ds.sizes["epoch"] else f"no epoch at or before {limit}"
        elif not layers:
            note = "no layer in the selection"
        if not note:
            index = {str(n): i for i, n in enumerate(ds["layer"].values)}
            cut = ds.isel(layer=[index[n] for n in layers], epoch=slice(0, position + 1))
            shown[name] = cut
            reductions = list(dict.fromkeys(str(v) for v in cut["reduction"].values))
            row.update({"layers shown": len(layers), "epoch shown": epoch_numbers(cut)[-1],
                        "reductions": ", ".join(reductions)})
        rows.append({**row, "note": note})
    return shown, rows


def _comparison_chart(state: CompareState, shown: dict[str, xr.Dataset]) -> alt.LayerChart | None:
    if not shown:
        return None
    return plots.comparison(shown, measure=state.measure, split=state.split, epoch=-1,
                            baselines=list(state.baselines_shown))


def _common(values: list[list[str]]) -> list[str]:
    if not values:
        return []
    return [v for v in values[0] if all(v in other for other in values[1:])]


class Comparison(LiveApp):
    """Several runs on one relative-depth axis, with one set of selections for all.

    Build it with :func:`compare`. The layer rule (*all*, *merge points
    only*, *every k-th*) and the relative-depth window apply to each run; the
    epoch slider runs over every run's epochs and each run is drawn at its
    last epoch up to the chosen one (a model probed once, such as a
    pretrained ResNet-50, stays at its only epoch).

    Attributes:
        state: The current :class:`CompareState`.
        charts: ``{"comparison": JupyterChart}``, and ``"cka"`` (the CKA heatmap) when given ``cka=``.
        controls: The control widgets: ``rule`` (all / merge points only /
            every k-th), ``k``, ``depth`` (a FloatRangeSlider), ``measure``,
            ``split``, ``baselines`` (a SelectMultiple, hidden when no run has
            one), ``epoch.widget`` and ``status``.
        widget: The app's root widget.

    Example:
        >>> cmp = pk.compare({"Inception v3": "data/runs/inception_v3.zarr", "ResNet-50": "data/runs/resnet50.zarr"})
        >>> cmp.select(layers="merges", depth_range=(0.5, 1.0))
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
        cka: xr.DataArray | None = None,
    ):
        similarity = None if cka is None else plots.cka_heatmap(cka)  # refuses what is not pk.cka's result, at once
        self._sources = _compare_sources(runs, names, wait=live)
        self._poller = Poller([s for s in self._sources if s.path is not None], interval, self._data_arrived,
                              self._set_status)
        if live and not any(source.path for source in self._sources):
            raise ValueError(
                "live=True follows run stores on disk, but only in-memory datasets were given; "
                "pass store paths or leave live=False"
            )
        plots.enable_offline(renderer=False)
        self.controls = CompareControls(self._user_change)
        self._header = widgets.HTML()
        self._table = widgets.HTML()
        self._table.add_class("probekit-runs")
        self._panel = ChartPanel("comparison")
        self.charts: dict[str, alt.JupyterChart] = {"comparison": self._panel.widget}
        views = [self._panel.widget]
        if similarity is not None:
            self._cka_panel = ChartPanel("cka")
            self._cka_panel.show("cka", lambda: similarity)
            self.charts["cka"] = self._cka_panel.widget
            views.append(self._cka_panel.widget)
        charts = widgets.HBox(views, layout=widgets.Layout(flex_flow="row wrap", align_items="flex-start"))
        self.widget = widgets.VBox(
            [self._header, widgets.HBox([self.controls.widget, widgets.VBox([charts, self._table])])]
        )
        self.widget.add_class("probekit-compare")
        self.state = CompareState(runs=tuple((s.label, s.dataset) for s in self._sources), version=1)
        _, splits = self._shared_choices()
        self.select(
            layers=None if every is not None else layers, every=every, depth_range=depth_range, measure=measure,
            split=split or (default_split(splits) if splits else None), epoch=epoch,
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
            name: rule_layers(ds, self.state.rule, self.state.every, self.state.depth_range)
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
        """The epoch number each run is drawn up to (None while no run has an epoch)."""
        return self.state.epoch_shown

    @property
    def epochs_shown(self) -> dict[str, int | None]:
        """The epoch each run is drawn at, by run name (None when it has none that early)."""
        shown = {}
        limit = self.state.epoch_shown
        for name, ds in self.state.runs:
            position = _position_up_to(ds, limit) if ds is not None and ds.sizes["epoch"] else None
            shown[name] = None if position is None else epoch_numbers(ds)[position]
        return shown

    def _shared_choices(self) -> tuple[list[str], list[str]]:
        ready = [ds for _, ds in self.state.ready]
        return _common([measures_of(ds) for ds in ready]), _common([splits_of(ds) for ds in ready])

    def select(
        self,
        *,
        layers: str | None = None,
        every: int | None = None,
        depth_range: tuple[float, float] | None = None,
        measure: str | None = None,
        split: str | None = None,
        epoch: int | None = None,
        baselines: str | Sequence[str] | None = None,
    ) -> Comparison:
        """Change the selection from code, as the widgets do; unset arguments stay.

        Args:
            layers: ``"all"`` or ``"merges"`` (the merge points, see
                :func:`probekit.explorers.selection.merge_layers`), for every run.
            every: Keep every k-th layer of each run (and its last layer).
            depth_range: ``(low, high)`` relative depths to keep, within [0, 1].
            measure: A measure every run has.
            split: A split every run has.
            epoch: An epoch number of the runs taken together, or negative to
                count from the end (``-1``: each run's latest); each run is
                drawn at its last epoch up to it.
            baselines: The baselines drawn as dashed lines: names some run has,
                ``"all"``, or ``()`` for none.

        Returns:
            The comparison, so calls chain.

        Raises:
            ValueError: A value outside what the runs share (the message lists it).

        Example:
            >>> cmp.select(every=2, split="test")
        """
        check_params(_CONSTRAINTS, layers=layers, every=every, depth_range=depth_range, epoch=epoch)
        if layers is not None and every is not None:
            raise ValueError("pass layers= or every=, not both (every=k keeps every k-th layer of each run)")
        measures, splits = self._shared_choices()
        changes: dict[str, object] = {}
        if layers is not None:
            changes["rule"] = layers
        if every is not None:
            changes.update(rule="every", every=int(every))
        if depth_range is not None:
            changes["depth_range"] = tuple(float(v) for v in depth_range)
        if measure is not None:  # checked once runs have been read
            if measures:
                check_in_run("measure", measure, measures)
            changes["measure"] = measure
        if split is not None:
            if splits:
                check_in_run("split", split, splits)
            changes["split"] = split
        if epoch is not None:
            if self.state.epochs:
                epoch_index(self.state.epochs, epoch)
            changes["epoch"] = int(epoch)
        if baselines is not None:
            if baselines == "all":
                changes["baselines"] = None
            else:
                names = (baselines,) if isinstance(baselines, str) else tuple(baselines)
                known = self.state.known_baselines
                for name in names:
                    if not known:
                        raise ValueError(f"baseline {name!r} is not in these runs, which have no baselines; "
                                         "probe with baselines=['random_init', 'control'] to get them")
                    check_in_run("baseline", name, known)
                changes["baselines"] = names
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
        measures, splits = self._shared_choices()
        fixes = {}
        if measures and state.measure not in measures:
            fixes["measure"] = measures[0]
        if splits and state.split not in splits:
            fixes["split"] = default_split(splits)
        if state.epochs and not fits_epoch(state.epochs, state.epoch):
            fixes["epoch"] = -1
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

        Example:
            >>> cmp.refresh().epochs_shown
        """
        problems = read_now(self._sources)
        self._data_arrived()
        if problems:
            self._set_status("; ".join(problems), True)
        return self

    # -- rendering -------------------------------------------------------------
    def _render(self) -> None:
        state = self.state
        measures, splits = self._shared_choices()
        self.controls.show(
            rule=state.rule, every=state.every, depth_range=state.depth_range, measures=measures,
            measure=state.measure, splits=splits, split=state.split, epochs=state.epochs, epoch=state.epoch_shown,
            status=state.status, alert=state.alert, baselines=state.known_baselines, shown_baselines=state.baselines_shown,
        )
        shown, rows = _compared_runs(state)
        live = " &middot; <b style='color:#2e7d32'>live</b>" if self.live else ""
        self._header.value = (
            f"<b>{len(state.runs)} runs</b> by relative depth: {html.escape(', '.join(n for n, _ in state.runs))}{live}"
        )
        key = (state.version, state.rule, state.every, state.depth_range, state.measure, state.split, state.epoch,
               state.baselines_shown)
        self._panel.show(key, lambda: _comparison_chart(state, shown))
        self._table.value = table_html(pd.DataFrame(rows))

    def __repr__(self) -> str:
        return f"<Comparison of {', '.join(name for name, _ in self.state.runs)}{', live' if self.live else ''}>"


def _compare_sources(runs: object, names: Sequence[str] | None, *, wait: bool) -> list[Source]:
    if isinstance(runs, xr.Dataset) and RUN_DIM in runs.dims:
        if names is not None:
            raise TypeError("names= is for a list of runs; the 'run' coordinate of pk.open_runs' dataset already names them")
        return [Source(name, None, one.load()) for name, one in split_runs(runs).items()]
    if isinstance(runs, (xr.Dataset, str, os.PathLike)):
        raise TypeError("compare takes several runs (a list, a dict from name to run, or pk.open_runs' dataset); "
                        "for one run use pk.explore")
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
            sources.append(as_source(run, name, wait=wait))
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
    cka: xr.DataArray | None = None,
) -> Comparison:
    """An app over several runs of different architectures, aligned by relative depth.

    Relative depth runs from 0 at a model's input to 1 at its output, so a
    17-point Inception v3 run and a 17-point ResNet-50 run (or a trained
    model and its untrained copy) share one axis. One layer rule and one
    relative-depth window apply to every run; the table under the chart
    lists, per run, what is drawn, at which epoch and with which reductions
    (a reduction is part of the result).

    Args:
        runs: A list of runs (datasets or store paths), a dict from name to
            run, or :func:`probekit.open_runs`' dataset (each run read as it is
            compared, named by its ``run`` coordinate).
        names: Names for a list of runs; by default each run's ``model``
            attribute (numbered when two share one).
        live: Follow stores that runs are still writing (see :func:`probekit.explorers.explore`).
        interval: Seconds between two checks of live stores.
        layers: ``"all"`` or ``"merges"`` (the merge points, see
            :func:`probekit.explorers.selection.merge_layers`).
        every: Keep every k-th layer of each run instead.
        depth_range: ``(low, high)``: keep layers at these relative depths.
        measure: A measure every run has.
        split: A split every run has; by default ``valid`` when all have it.
        epoch: An epoch number of the runs taken together, or negative to count
            from the end; each run is drawn at its last epoch up to it. ``-1``
            (the default) draws each run's latest.
        cka: The layer similarity of two models, :func:`probekit.cka`'s result
            (or one read back with ``xr.open_zarr(path)["cka"]``), shown as a
            heatmap beside the comparison.

    Returns:
        The :class:`Comparison`; end a cell with it to show it.

    Example:
        >>> pk.compare({"Inception v3": "data/runs/inception_v3.zarr", "ResNet-50": "data/runs/resnet50.zarr"})
        >>> pk.compare([resnet_run, inception_run], cka=pk.cka(resnet, inception, data))
        >>> pk.compare(pk.open_runs("runs/sweep/*.zarr"))
    """
    return Comparison(runs, names=names, live=live, interval=interval, layers=layers, every=every,
                      depth_range=depth_range, measure=measure, split=split, epoch=epoch, cka=cka)
