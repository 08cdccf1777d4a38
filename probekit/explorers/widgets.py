"""The explorers' views: widgets that show what they are given and report user changes.

Views hold no data: a controller (the explorer or the comparison) pushes values
into them with ``show(...)`` and hears back, through one callback, what the
user changed. This module owns the chart panels (an :class:`altair.JupyterChart`
whose chart is replaced in place), the guard that keeps observers quiet while a
controller pushes values, the epoch slider, the controls of each app, and the
small HTML pieces (status line, tables, the findings list). Measure labels come
from :mod:`probekit.run.schema`.

This module imports pandas, altair and ipywidgets: never torch, never the run store.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

import altair as alt
import ipywidgets as widgets
import numpy as np
import pandas as pd

from probekit.plots import FINDING_COLUMNS
from probekit.run.schema import MEASURE_LABELS

__all__ = [
    "ChartPanel", "CompareControls", "EpochSlider", "ExploreControls", "close_tree", "findings_html", "status_html",
    "table_html",
]

_EMBED_OPTIONS = {"renderer": "svg", "actions": False}


class ChartPanel:
    """One JupyterChart whose chart is replaced in place when its inputs change.

    Example:
        >>> panel = ChartPanel("profile")
        >>> panel.show(key, lambda: plots.depth_profile(ds))   # rebuilt only when key changes
    """

    def __init__(self, name: str):
        self.name = name
        self.widget = alt.JupyterChart(None, embed_options=dict(_EMBED_OPTIONS))
        self.widget.add_class(f"probekit-{name}")
        self._key: object = None

    def show(self, key: object, build: Callable[[], alt.TopLevelMixin | None]) -> None:
        if key == self._key:
            return
        self.widget.chart = build()
        self._key = key


class _Guard:
    """Set while the controller pushes values into widgets, so their observers stay quiet."""

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
    return [(MEASURE_LABELS.get(m, m), m) for m in measures]


class EpochSlider:
    """An epoch slider over epoch numbers (they need not be consecutive).

    Moving it to the last epoch asks for ``-1`` (the latest, which follows a
    live run); any other position asks for that epoch number.

    Example:
        >>> slider = EpochSlider()
        >>> slider.show([0, 5, 10], 5)
    """

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

    def requested(self, value: object) -> int | None:
        """The ``epoch=`` a slider value asks for (None: the placeholder of an empty slider)."""
        if value is None or value == -1:
            return None
        return -1 if value == self.widget.options[-1][1] else int(value)


def status_html(text: str, *, error: bool = False) -> str:
    """A one-line status message as HTML (red when it reports a problem); empty text gives ``""``.

    Example:
        >>> status_html("cannot read the store", error=True)
        '<span style="color:#b00020">cannot read the store</span>'
    """
    colour = "#b00020" if error else "#555555"
    return f'<span style="color:{colour}">{html.escape(text)}</span>' if text else ""


def table_html(frame: pd.DataFrame) -> str:
    """A small left-aligned HTML table (widgets do not get JupyterLab's table styles); cells are escaped.

    Example:
        >>> table_html(pd.DataFrame({"run": ["a"]}))
    """
    cell = "padding:2px 10px 2px 0;text-align:left;vertical-align:top"
    head = "".join(f'<th style="{cell};border-bottom:1px solid #999">{html.escape(str(c))}</th>' for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f'<td style="{cell}">{"" if v is None else html.escape(str(v))}</td>' for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    return f'<table style="border-collapse:collapse;font-size:12px"><tr>{head}</tr>{body}</table>'


def _names_text(value: object) -> str:
    """A finding's ``layers`` cell (a name or a list of names) as short text."""
    if isinstance(value, str):
        return value
    names = [] if np.ndim(value) == 0 else [str(name) for name in value]
    if len(names) > 3:
        return f"{names[0]} ... {names[-1]} ({len(names)} layers)"
    return ", ".join(names)


def findings_html(findings: pd.DataFrame | None, error: str | None, epoch: int | None) -> str:
    """The findings list under the charts: a table of ``findings`` at ``epoch``, or ``error`` in red.

    Example:
        >>> findings_html(pk.diagnose(ds).to_frame(), None, 3)
    """
    if error:
        return status_html(error, error=True)
    if findings is None:
        return ""
    if not len(findings):
        return f"<b>diagnosis at epoch {epoch}</b>: no findings."
    frame = findings[list(FINDING_COLUMNS)].copy()
    frame["layers"] = [_names_text(value) for value in frame["layers"]]
    table = table_html(frame)
    return f"<b>diagnosis at epoch {epoch}</b>: {len(frame)} finding{'s' if len(frame) != 1 else ''}{table}"


def close_tree(widget: widgets.Widget) -> None:
    """Close a widget and every widget inside it (``Widget.close_all`` would close every widget of the kernel).

    Example:
        >>> close_tree(ex.widget)
    """
    for child in getattr(widget, "children", ()):
        close_tree(child)
    widget.close()


def _k_box() -> widgets.BoundedIntText:
    return widgets.BoundedIntText(value=2, min=1, max=1000, description="k", layout=widgets.Layout(width="110px"),
                                  style={"description_width": "16px"})


def _measure_dropdown() -> widgets.Dropdown:
    return widgets.Dropdown(options=[("error", "error")], description="metric", layout=widgets.Layout(width="96%"))


def _split_buttons() -> widgets.ToggleButtons:
    return widgets.ToggleButtons(options=["valid"], description="split", style={"button_width": "64px"})


def _baselines_menu() -> widgets.SelectMultiple:
    """The run's baselines, each drawn as dashed curves while selected; hidden for runs without any."""
    menu = widgets.SelectMultiple(options=[], rows=2, description="baselines", layout=widgets.Layout(width="96%"))
    menu.add_class("probekit-baselines")
    return menu


def _show_baselines(menu: widgets.SelectMultiple, names: Sequence[str], chosen: Sequence[str]) -> None:
    _set_options(menu, list(names), tuple(chosen))
    menu.layout.display = None if names else "none"


class _Controls:
    """What both explorers' controls share: widget changes reach the owner unless the owner is setting them."""

    _guard: _Guard
    _on_change: Callable[..., None]
    epoch: EpochSlider

    def _changed(self, **change: object) -> None:
        if not self._guard.active:
            self._on_change(**change)

    def _epoch_changed(self, change: dict) -> None:
        epoch = self.epoch.requested(change["new"])
        if epoch is not None:
            self._changed(epoch=epoch)


class ExploreControls(_Controls):
    """Layer list with shortcuts, metric, split and epoch for one run (and a run menu over several).

    Args:
        on_change: Called with the user's change as keyword arguments of
            :meth:`probekit.explorers.Explorer.select` (``run=``, ``layers=``, ``every=``,
            ``measure=``, ``split=``, ``baselines=`` or ``epoch=``).

    Example:
        >>> controls = ExploreControls(explorer._user_change)
    """

    def __init__(self, on_change: Callable[..., None]):
        self._guard = _Guard()
        self._on_change = on_change
        self.layers = widgets.SelectMultiple(options=[], rows=12, layout=widgets.Layout(width="96%"))
        self.layers.add_class("probekit-layers")
        self.all = widgets.Button(description="all", layout=widgets.Layout(width="auto"))
        self.merges = widgets.Button(description="merge points only", layout=widgets.Layout(width="auto"))
        self.every = widgets.Button(description="every k-th", layout=widgets.Layout(width="auto"))
        self.k = _k_box()
        for button, name in ((self.all, "all"), (self.merges, "merges"), (self.every, "every")):
            button.add_class(f"probekit-{name}")
        self.run = widgets.Dropdown(options=[], description="run", layout=widgets.Layout(width="96%", display="none"))
        self.run.add_class("probekit-run")
        self.measure = _measure_dropdown()
        self.split = _split_buttons()
        self.baselines = _baselines_menu()
        self.epoch = EpochSlider()
        self.status = widgets.HTML()
        self.run.observe(lambda change: self._changed(run=change["new"]) if change["new"] is not None else None,
                         names="value")
        self.baselines.observe(lambda change: self._changed(baselines=tuple(change["new"])), names="value")
        self.layers.observe(lambda change: self._changed(layers=tuple(change["new"])), names="value")
        self.measure.observe(lambda change: self._changed(measure=change["new"]), names="value")
        self.split.observe(lambda change: self._changed(split=change["new"]), names="value")
        self.epoch.widget.observe(self._epoch_changed, names="value")
        self.all.on_click(lambda _: self._changed(layers="all"))
        self.merges.on_click(lambda _: self._changed(layers="merges"))
        self.every.on_click(lambda _: self._changed(every=self.k.value))
        self.widget = widgets.VBox(
            [
                self.run,
                widgets.HTML("<b>layers</b> (shift/ctrl-click for several)"),
                self.layers,
                widgets.HBox([self.all, self.merges], layout=widgets.Layout(flex_flow="row wrap")),
                widgets.HBox([self.every, self.k]),
                self.measure,
                self.split,
                self.baselines,
                self.epoch.widget,
                self.status,
            ],
            layout=widgets.Layout(width="320px", min_width="280px"),
        )

    def show(
        self,
        *,
        names: Sequence[str] | None,
        layers: Sequence[str],
        measures: Sequence[str],
        measure: str,
        splits: Sequence[str],
        split: str,
        epochs: Sequence[int],
        epoch: int | None,
        status: str,
        alert: bool,
        baselines: Sequence[str] = (),
        shown_baselines: Sequence[str] = (),
        runs: Sequence[str] = (),
        run: str | None = None,
    ) -> None:
        """Show these values; ``names`` None (no run read yet) disables the controls.

        ``baselines`` are the run's (the menu is hidden without any), ``shown_baselines`` those drawn;
        ``runs`` are the runs to pick from (the menu is hidden without any), ``run`` the one shown.
        """
        with self._guard:
            _set_options(self.run, list(runs), run if runs else None)
            self.run.layout.display = None if runs else "none"
            _show_baselines(self.baselines, baselines, shown_baselines)
            options = list(names or [])
            _set_options(self.layers, options, tuple(layers))
            self.layers.rows = max(4, min(12, len(options)))
            self.k.max = max(1, len(options))
            _set_options(self.measure, _measure_options(measures), measure)
            _set_options(self.split, list(splits), split)
            self.epoch.show(epochs, epoch)
            for control in (self.layers, self.all, self.merges, self.every, self.k, self.measure, self.split):
                control.disabled = names is None
            self.status.value = status_html(status, error=alert)


class CompareControls(_Controls):
    """Layer rule, relative-depth window, metric, split and epoch for several runs.

    Args:
        on_change: Called with the user's change as keyword arguments (``rule=``,
            ``every=``, ``depth_range=``, ``measure=``, ``split=``, ``baselines=`` or ``epoch=``).

    Example:
        >>> controls = CompareControls(comparison._user_change)
    """

    def __init__(self, on_change: Callable[..., None]):
        self._guard = _Guard()
        self._on_change = on_change
        self.rule = widgets.ToggleButtons(
            options=[("all", "all"), ("merge points only", "merges"), ("every k-th", "every")], description="layers",
            style={"button_width": "120px", "description_width": "60px"},
        )
        self.rule.add_class("probekit-rule")
        self.k = _k_box()
        self.depth = widgets.FloatRangeSlider(value=(0.0, 1.0), min=0.0, max=1.0, step=0.05, description="rel. depth",
                                              continuous_update=False, readout_format=".2f")
        self.measure = _measure_dropdown()
        self.split = _split_buttons()
        self.baselines = _baselines_menu()
        self.epoch = EpochSlider()
        self.status = widgets.HTML()
        self.baselines.observe(lambda change: self._changed(baselines=tuple(change["new"])), names="value")
        self.rule.observe(lambda change: self._changed(rule=change["new"]), names="value")
        self.k.observe(lambda change: self._changed(every=change["new"]), names="value")
        self.depth.observe(lambda change: self._changed(depth_range=tuple(change["new"])), names="value")
        self.measure.observe(lambda change: self._changed(measure=change["new"]), names="value")
        self.split.observe(lambda change: self._changed(split=change["new"]), names="value")
        self.epoch.widget.observe(self._epoch_changed, names="value")
        self.widget = widgets.VBox([self.rule, self.k, self.depth, self.measure, self.split, self.baselines,
                                    self.epoch.widget, self.status],
                                   layout=widgets.Layout(width="380px", min_width="320px"))

    def show(
        self,
        *,
        rule: str,
        every: int,
        depth_range: tuple[float, float],
        measures: Sequence[str],
        measure: str,
        splits: Sequence[str],
        split: str,
        epochs: Sequence[int],
        epoch: int | None,
        status: str,
        alert: bool,
        baselines: Sequence[str] = (),
        shown_baselines: Sequence[str] = (),
    ) -> None:
        """Show these values (``epoch``: the epoch number the slider points at, None for the last).

        ``baselines`` are those any run has (the menu is hidden without any), ``shown_baselines`` those drawn.
        """
        with self._guard:
            _show_baselines(self.baselines, baselines, shown_baselines)
            self.rule.value = rule
            self.k.value = every
            self.k.disabled = rule != "every"
            self.depth.value = depth_range
            _set_options(self.measure, _measure_options(measures or [measure]), measure)
            _set_options(self.split, list(splits or [split]), split)
            self.epoch.show(epochs, epoch)
            self.status.value = status_html(status, error=alert)
