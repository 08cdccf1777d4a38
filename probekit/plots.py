"""Altair charts of probe runs: pure functions from a run dataset to a chart.

Every chart reads a run as described in ``docs/store.md`` (an
:class:`xarray.Dataset` with the ``probe`` variable over ``layer``, ``epoch``
and ``metric``) through :func:`tidy`, and returns an Altair chart value:
nothing is drawn or written until the caller displays it or passes it to
:func:`save`.
Interaction (legend highlighting) is declared with Altair params, so charts
work the same in JupyterLab, in exported HTML and inside the explorers.

    >>> from probekit import plots
    >>> plots.depth_profile(ds)                  # the paper's main figure
    >>> plots.heatmap(ds)                        # layer x epoch in one picture
    >>> plots.cka_heatmap(pk.cka(model_a, model_b, data))   # two models' layers, alike or not
    >>> plots.save(plots.training_curves(ds), "curves.svg")

Charts stay under Altair's 5,000-row limit: :func:`training_curves` and
:func:`heatmap` thin the epoch axis (see :func:`thin_epochs`) when
layers x epochs would exceed ``max_rows``. Layers whose features were
nonfinite have NaN metrics; they appear as gaps (lines) or grey cells
(heatmap), never as errors.

Run validation, split and measure names, measure labels, epoch positions and
layer order come from :mod:`probekit.run.schema`.

This module imports numpy, pandas, xarray and altair only: never torch, never
zarr, never ipywidgets.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

import altair as alt
import numpy as np
import pandas as pd
import xarray as xr

from probekit.params import Interval, Options, check_params, choices
from probekit.run.schema import (
    MEASURE_LABELS, check_in_run, check_run, epoch_position, forward_order, measures_of, splits_of,
)

__all__ = [
    "FINDING_COLUMNS",
    "INTERVAL_MIN_REPEATS",
    "INTERVAL_QUANTILES",
    "MAX_ROWS",
    "TIDY_COLUMNS",
    "baselines_of",
    "cka_heatmap",
    "comparison",
    "depth_profile",
    "diagnosis_overlay",
    "enable_offline",
    "heatmap",
    "interval_bounds",
    "save",
    "thin_epochs",
    "tidy",
    "tidy_baselines",
    "tidy_interval",
    "training_curves",
]

#: Columns of :func:`tidy`'s frame, in order.
TIDY_COLUMNS = (
    "layer",
    "depth",
    "relative_depth",
    "shape",
    "feature_dim",
    "reduction",
    "epoch",
    "step",
    "split",
    "measure",
    "value",
)
#: Altair's default data transformer refuses datasets with more rows.
MAX_ROWS = 5000
#: Columns a findings frame needs (see ``probekit.diagnose``).
FINDING_COLUMNS = ("kind", "layers", "evidence", "suggestion")

#: What each chart's arguments may be, besides the names a run must have (see :func:`probekit.params.check_params`).
_CURVES_CONSTRAINTS = {"x": [Options("epoch", "step")], "max_rows": [Interval(int, 1, None)], "interval": [bool]}
_PROFILE_CONSTRAINTS = {"x": [Options("layer", "relative_depth")], "interval": [bool]}
_HEATMAP_CONSTRAINTS = {"max_rows": [Interval(int, 1, None)]}
_DEPTH_SCHEME = alt.SchemeParams(name="viridis", extent=[0.0, 0.85])
_MISSING_COLOUR = "#d9d9d9"
_LINE_COLOUR = "#333333"
_WIDTH = 420
_HEIGHT = 260


# --------------------------------------------------------------------------
# Reading a run


def _strings(ds: xr.Dataset, name: str) -> np.ndarray:
    return np.asarray(ds[name].values).astype(str)


def _as_list(value: str | Sequence[str] | None) -> list[str] | None:
    if value is None:
        return None
    return [value] if isinstance(value, str) else list(value)


def _pick(name: str, wanted: list[str] | None, available: list[str]) -> list[str]:
    if wanted is None:
        return available
    for value in wanted:
        check_in_run(name, value, available)
    return list(dict.fromkeys(wanted))


def _layer_indices(ds: xr.Dataset, layers: str | Sequence[str] | None) -> np.ndarray:
    """Indices of the chosen layers (all when None), in forward (depth) order."""
    chosen = _pick("layer", _as_list(layers), _strings(ds, "layer").tolist())
    return forward_order(ds, chosen)


def _epoch_indices(ds: xr.Dataset, epoch: int | Sequence[int] | None) -> np.ndarray:
    if epoch is None:
        return np.arange(ds.sizes["epoch"])
    if np.ndim(epoch) == 0:
        return np.array([epoch_position(ds, epoch)])
    return np.array(list(dict.fromkeys(epoch_position(ds, e) for e in epoch)), dtype=int)


def _metric_indices(
    ds: xr.Dataset, measure: str | Sequence[str] | None, split: str | Sequence[str] | None
) -> np.ndarray:
    splits, measures = _strings(ds, "split"), _strings(ds, "measure")
    chosen_measures = _pick("measure", _as_list(measure), measures_of(ds))
    chosen_splits = _pick("split", _as_list(split), splits_of(ds))
    keep = np.isin(splits, chosen_splits) & np.isin(measures, chosen_measures)
    return np.flatnonzero(keep)


def tidy(
    ds: xr.Dataset,
    *,
    measure: str | Sequence[str] | None = None,
    split: str | Sequence[str] | None = None,
    layers: str | Sequence[str] | None = None,
    epoch: int | Sequence[int] | None = None,
) -> pd.DataFrame:
    """One row per layer, epoch and metric: the long format every chart draws.

    Args:
        ds: A run (see ``docs/store.md``).
        measure: ``"error"``, ``"loss"``, ``"top5"`` or a list of them; None for all.
        split: ``"train"``, ``"valid"``, ``"test"`` or a list of them; None for all.
        layers: Layer names to keep (None for all). Rows follow forward
            (depth) order whatever order the names are given in.
        epoch: An epoch number, a list of them, or a negative position
            (``-1`` is the last epoch); None for all epochs.

    Returns:
        A frame with columns ``layer, depth, relative_depth, shape,
        feature_dim, reduction, epoch, step, split, measure, value``, ordered by
        layer depth, then epoch, then metric. Nonfinite values are NaN.

    Raises:
        ValueError: A measure, split, layer or epoch that the run does not have
            (the message lists the ones it has).

    Example:
        >>> tidy(ds, measure="error", split="valid", epoch=-1).head()
    """
    check_run(ds)
    li, ei, mi = _layer_indices(ds, layers), _epoch_indices(ds, epoch), _metric_indices(ds, measure, split)
    values = ds["probe"].isel(layer=li, epoch=ei, metric=mi).transpose("layer", "epoch", "metric").values
    return _long(ds, li, ei, mi, {"value": values})


def _long(ds: xr.Dataset, li: np.ndarray, ei: np.ndarray, mi: np.ndarray, columns: Mapping[str, np.ndarray]) -> pd.DataFrame:
    """The tidy frame of ``(layer, epoch, metric)`` arrays, one value column each (NaN where nonfinite)."""
    n_layers, n_epochs, n_metrics = len(li), len(ei), len(mi)
    rows_l = np.repeat(li, n_epochs * n_metrics)
    rows_e = np.tile(np.repeat(ei, n_metrics), n_layers)
    rows_m = np.tile(mi, n_layers * n_epochs)
    values = {name: np.where(np.isfinite(v), v, np.nan).astype(float).reshape(-1) for name, v in columns.items()}
    return pd.DataFrame(
        {
            "layer": _strings(ds, "layer")[rows_l],
            "depth": np.asarray(ds["depth"].values, dtype=np.int64)[rows_l],
            "relative_depth": np.asarray(ds["relative_depth"].values, dtype=float)[rows_l],
            "shape": _strings(ds, "shape")[rows_l],
            "feature_dim": np.asarray(ds["feature_dim"].values, dtype=np.int64)[rows_l],
            "reduction": _strings(ds, "reduction")[rows_l],
            "epoch": np.asarray(ds["epoch"].values, dtype=np.int64)[rows_e],
            "step": np.asarray(ds["step"].values, dtype=np.int64)[rows_e],
            "split": _strings(ds, "split")[rows_m],
            "measure": _strings(ds, "measure")[rows_m],
            **values,
        },
        columns=[*TIDY_COLUMNS[:-1], *values],
    )


def baselines_of(ds: xr.Dataset) -> list[str]:
    """The baselines a run carries (``random_init``, ``control``), in stored order; ``[]`` for none.

    Example:
        >>> baselines_of(pk.open_run("runs/a.zarr"))
        ['random_init', 'control']
    """
    if "baselines" not in ds.data_vars or "baseline" not in ds.coords:
        return []
    return _strings(ds, "baseline").tolist()


def tidy_baselines(
    ds: xr.Dataset,
    *,
    measure: str | Sequence[str] | None = None,
    split: str | Sequence[str] | None = None,
    layers: str | Sequence[str] | None = None,
    epoch: int | Sequence[int] | None = None,
    baselines: str | Sequence[str] | None = None,
) -> pd.DataFrame:
    """The baselines' metrics in :func:`tidy`'s long format, with a ``baseline`` column.

    Rows whose value is missing for every layer and epoch of a baseline (the
    ``selectivity`` of a baseline, which has none) are left out. A run without
    baselines gives an empty frame with the same columns.

    Args:
        ds: A run (see ``docs/store.md``).
        measure, split, layers, epoch: as for :func:`tidy`.
        baselines: baseline names to keep (``"random_init"``, ``"control"``); None for all the run has.

    Example:
        >>> tidy_baselines(ds, measure="error", split="valid", epoch=-1)
    """
    check_run(ds)
    li, ei, mi = _layer_indices(ds, layers), _epoch_indices(ds, epoch), _metric_indices(ds, measure, split)
    names = baselines_of(ds)
    chosen = _pick("baseline", _as_list(baselines), names) if names or baselines is not None else []
    frames = []
    for name in chosen:
        values = ds["baselines"].sel(baseline=name).isel(layer=li, epoch=ei, metric=mi).transpose("layer", "epoch", "metric")
        frame = _long(ds, li, ei, mi, {"value": values.values}).assign(baseline=name)
        present = frame.groupby(["split", "measure"])["value"].transform(lambda v: v.notna().any())
        frames.append(frame[present.astype(bool)])
    if not frames:
        return pd.DataFrame(columns=[*TIDY_COLUMNS, "baseline"])
    return pd.concat(frames, ignore_index=True)


#: With this many repeats or more, the band runs between these quantiles of the repeats;
#: with fewer, from the smallest to the largest repeat.
INTERVAL_QUANTILES = (0.025, 0.975)
INTERVAL_MIN_REPEATS = 10


def interval_bounds(values: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """The band of repeated fits along ``axis``: the 2.5 % and 97.5 % quantiles with 10 or more
    repeats, else the smallest and the largest (NaN repeats ignored).

    Example:
        >>> interval_bounds(np.array([0.2, 0.25, 0.3]))
        (array(0.2), array(0.3))
    """
    values = np.asarray(values, dtype=float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN repeats (nonfinite layers) give NaN bounds, as meant
        if values.shape[axis] >= INTERVAL_MIN_REPEATS:
            low, high = np.nanquantile(values, INTERVAL_QUANTILES, axis=axis)
        else:
            low, high = np.nanmin(values, axis=axis), np.nanmax(values, axis=axis)
    return low, high


def tidy_interval(
    ds: xr.Dataset,
    *,
    measure: str | Sequence[str] | None = None,
    split: str | Sequence[str] | None = None,
    layers: str | Sequence[str] | None = None,
    epoch: int | Sequence[int] | None = None,
) -> pd.DataFrame:
    """The band of a run's repeated fits (``probe_repeat``) in :func:`tidy`'s long format.

    Columns: :func:`tidy`'s, with ``value`` (the mean, as ``probe`` holds it),
    ``low`` and ``high`` (see :func:`interval_bounds`). A run without repeats
    gives an empty frame with the same columns.

    Example:
        >>> tidy_interval(ds, measure="error", split="valid", epoch=-1)[["layer", "low", "value", "high"]]
    """
    check_run(ds)
    li, ei, mi = _layer_indices(ds, layers), _epoch_indices(ds, epoch), _metric_indices(ds, measure, split)
    if "probe_repeat" not in ds.data_vars:
        return pd.DataFrame(columns=[*TIDY_COLUMNS, "low", "high"])
    repeats = ds["probe_repeat"].isel(layer=li, epoch=ei, metric=mi).transpose("layer", "epoch", "metric", "repeat").values
    low, high = interval_bounds(repeats, axis=-1)
    mean = ds["probe"].isel(layer=li, epoch=ei, metric=mi).transpose("layer", "epoch", "metric").values
    return _long(ds, li, ei, mi, {"value": mean, "low": low, "high": high})


def thin_epochs(n_epochs: int, n_layers: int, *, max_rows: int = MAX_ROWS) -> np.ndarray:
    """Which epoch positions a layer x epoch chart keeps to stay under ``max_rows``.

    The rule: keep every epoch when ``n_layers * n_epochs <= max_rows``;
    otherwise keep ``k = max_rows // n_layers`` evenly spaced positions,
    ``round(linspace(0, n_epochs - 1, k))``, which always include the first
    and the last epoch (only the last when ``k == 1``).

    Args:
        n_epochs: Epochs in the run.
        n_layers: Layers drawn (one row per layer and epoch).
        max_rows: Row budget; Altair's default data transformer allows 5,000.

    Returns:
        Sorted epoch positions (not epoch numbers).

    Raises:
        ValueError: When even one epoch of ``n_layers`` rows exceeds ``max_rows``.

    Example:
        >>> thin_epochs(300, 300)  # 16 of 300 epochs: 0, 20, 40, ..., 299
    """
    if n_layers * n_epochs <= max_rows:
        return np.arange(n_epochs)
    keep = max_rows // max(n_layers, 1)
    if keep < 1:
        raise ValueError(
            f"{n_layers} layers exceed max_rows={max_rows} even at one epoch; pass layers= to draw fewer, "
            "or raise max_rows together with alt.data_transformers.disable_max_rows()"
        )
    if keep == 1:
        return np.array([n_epochs - 1])
    return np.unique(np.round(np.linspace(0, n_epochs - 1, keep)).astype(int))


# --------------------------------------------------------------------------
# Shared chart pieces


def _value_title(split: str, measure: str) -> str:
    return f"{split} {MEASURE_LABELS.get(measure, measure)}"


def _title(ds: xr.Dataset, text: str, subtitle: str | None = None) -> alt.TitleParams:
    model = ds.attrs.get("model")
    full = f"{model}: {text}" if model else text
    return alt.TitleParams(full, subtitle=subtitle) if subtitle else alt.TitleParams(full)


def _thinning_note(shown: int, total: int) -> str | None:
    if shown == total:
        return None
    return f"{shown} of {total} epochs shown, evenly spaced (first and last kept)"


def _layer_order(ds: xr.Dataset, layers: str | Sequence[str] | None) -> list[str]:
    """Names of the chosen layers in forward (depth) order."""
    return _strings(ds, "layer")[_layer_indices(ds, layers)].tolist()


def _layer_x(order: list[str]) -> alt.X:
    many = len(order) > 40
    return alt.X(
        "layer:O",
        sort=order,
        title="layer (forward order)",
        axis=alt.Axis(labelAngle=-45, labelOverlap="greedy" if many else False, ticks=not many, labelLimit=120),
    )


def _chance(ds: xr.Dataset, measure: str) -> float | None:
    """The run's chance error when ``measure`` is error and the run records it."""
    if measure != "error":
        return None
    chance = ds.attrs.get("chance_error")
    if chance is None or not np.isfinite(float(chance)):
        return None
    return float(chance)


def _chance_rule(chance: float) -> alt.LayerChart:
    frame = pd.DataFrame({"chance_error": [chance], "label": ["chance"]})
    base = alt.Chart(frame)
    rule = base.mark_rule(strokeDash=[6, 4], color="#888888").encode(
        y=alt.Y("chance_error:Q"),
        tooltip=[alt.Tooltip("chance_error:Q", title="chance error", format=".4f")],
    )
    label = base.mark_text(align="left", dx=4, dy=-6, color="#666666", fontSize=10).encode(
        y=alt.Y("chance_error:Q"), x=alt.value(0), text="label:N"
    )
    return alt.layer(rule, label)


_BASELINE_DASHES = {"random_init": [6, 3], "control": [2, 2]}
_BAND_OPACITY = 0.18


def _chosen_baselines(ds: xr.Dataset | None, baselines: bool | str | Sequence[str] | None) -> list[str] | None:
    """``baselines=`` of a chart: True for all the run has, False/None/() for none, or names."""
    if baselines is True:
        return None
    if baselines is False or baselines is None or (not isinstance(baselines, str) and len(baselines) == 0):
        return []
    return _as_list(baselines)


def _baseline_rows(ds: xr.Dataset, baselines, **where) -> pd.DataFrame:
    chosen = _chosen_baselines(ds, baselines)
    if chosen == [] or (chosen is None and not baselines_of(ds)):
        return pd.DataFrame(columns=[*TIDY_COLUMNS, "baseline"])
    return tidy_baselines(ds, baselines=chosen, **where)


def _no_band() -> pd.DataFrame:
    return pd.DataFrame(columns=[*TIDY_COLUMNS, "low", "high"])


def _dash(names: list[str]) -> alt.StrokeDash:
    """Dashes by baseline: the legend says which dashed curve is which."""
    return alt.StrokeDash(
        "baseline:N", sort=names, legend=alt.Legend(title="baseline (dashed)"),
        scale=alt.Scale(domain=names, range=[_BASELINE_DASHES.get(name, [4, 4]) for name in names]),
    )


def _band_tooltip(title: str) -> list[alt.Tooltip]:
    return [
        alt.Tooltip("low:Q", title=f"{title}, interval low", format=".4f"),
        alt.Tooltip("value:Q", title=f"{title}, mean of repeats", format=".4f"),
        alt.Tooltip("high:Q", title=f"{title}, interval high", format=".4f"),
    ]


# --------------------------------------------------------------------------
# Charts


def training_curves(
    ds: xr.Dataset,
    *,
    measure: str = "error",
    split: str = "valid",
    layers: str | Sequence[str] | None = None,
    x: Literal["epoch", "step"] = "epoch",
    max_rows: int = MAX_ROWS,
    baselines: bool | str | Sequence[str] = True,
    interval: bool = True,
) -> alt.LayerChart:
    """A metric over training time, one line per layer, coloured by depth.

    Colours run along a sequential scale in forward order (dark at the
    input, light at the output) and the legend lists layers in that order;
    click a legend entry to highlight its layer (shift-click for several).
    A run's baselines are dashed curves in their layer's colour (one dash
    pattern per baseline); with repeated fits the line is their mean and a
    band in the layer's colour spans them (see :func:`interval_bounds`).

    Args:
        ds: A run (see ``docs/store.md``).
        measure: ``"error"``, ``"loss"`` or ``"top5"``.
        split: ``"train"``, ``"valid"`` or ``"test"``.
        layers: Layer names to draw; None for all.
        x: ``"epoch"`` or ``"step"`` (minibatches seen; epochs whose step is
            unknown, ``-1``, are left out).
        max_rows: Row budget; epochs are thinned with :func:`thin_epochs`
            when layers x epochs exceed it.
        baselines: draw the run's baselines (True: all it has; a name or
            list of names; False: none).
        interval: draw the repeats' band when the run has repeated fits.

    Returns:
        A layered chart: bands, lines plus points carrying the tooltips
        (layer, depth, epoch, step, value), dashed baseline curves.

    Example:
        >>> training_curves(ds, measure="loss", layers=["conv1", "fc1"])
    """
    check_params(_CURVES_CONSTRAINTS, x=x, max_rows=max_rows, interval=interval)
    frame = tidy(ds, measure=measure, split=split, layers=layers)
    base = _baseline_rows(ds, baselines, measure=measure, split=split, layers=layers)
    band = tidy_interval(ds, measure=measure, split=split, layers=layers) if interval else _no_band()
    order = _layer_order(ds, layers)
    if x == "step":
        frame = frame[frame["step"] >= 0]
        if frame.empty and ds.sizes["epoch"] > 0:
            raise ValueError("x='step' needs training steps, but this run records none (step is -1); use x='epoch'")
    epochs = frame["epoch"].unique()
    keep = epochs[thin_epochs(len(epochs), len(order), max_rows=max_rows)]
    frame = frame[frame["epoch"].isin(keep)][["layer", "depth", "relative_depth", "epoch", "step", "value"]]
    base = base[base["epoch"].isin(keep) & ((base["step"] >= 0) | (x == "epoch"))]
    band = band[band["epoch"].isin(keep) & ((band["step"] >= 0) | (x == "epoch"))]

    pick = alt.selection_point(fields=["layer"], bind="legend")
    colour = alt.Color(
        "layer:O",
        sort=order,
        scale=alt.Scale(scheme=_DEPTH_SCHEME),
        legend=alt.Legend(title="layer (by depth)", symbolLimit=30),
    )
    time_x = alt.X(f"{x}:Q", title="epoch" if x == "epoch" else "step (minibatches seen)")
    value_y = alt.Y("value:Q", title=_value_title(split, measure))
    opacity = alt.when(pick).then(alt.value(1.0)).otherwise(alt.value(0.12))
    lines = (
        alt.Chart()
        .mark_line(strokeWidth=1.5)
        .encode(x=time_x, y=value_y, color=colour, opacity=opacity)
        .add_params(pick)
    )
    points = (
        alt.Chart()
        .mark_point(filled=True, size=18)
        .encode(
            x=time_x,
            y=value_y,
            color=colour,
            opacity=opacity,
            tooltip=[
                alt.Tooltip("layer:N"),
                alt.Tooltip("depth:Q"),
                alt.Tooltip("epoch:Q"),
                alt.Tooltip("step:Q"),
                alt.Tooltip("value:Q", title=_value_title(split, measure), format=".4f"),
            ],
        )
    )
    charts: list[alt.Chart] = [lines, points]
    title = _value_title(split, measure)
    if len(band):  # after the lines, so that the legend keeps their symbols
        charts.append(alt.Chart(band[["layer", "epoch", "step", "low", "value", "high"]]).mark_area(opacity=_BAND_OPACITY).encode(
            x=time_x, y=alt.Y("low:Q", title=title), y2="high:Q", color=colour,
            tooltip=[alt.Tooltip("layer:N"), alt.Tooltip("epoch:Q"), *_band_tooltip(title)],
        ))
    if len(base):
        names = list(dict.fromkeys(base["baseline"]))
        charts.append(alt.Chart(base[["layer", "epoch", "step", "baseline", "value"]]).mark_line(strokeWidth=1.2).encode(
            x=time_x, y=value_y, color=colour, strokeDash=_dash(names), opacity=opacity,
            tooltip=[alt.Tooltip("layer:N"), alt.Tooltip("baseline:N"), alt.Tooltip("epoch:Q"),
                     alt.Tooltip("value:Q", title=f"{title} (baseline)", format=".4f")],
        ))
    return alt.layer(*charts, data=frame).properties(
        width=_WIDTH,
        height=_HEIGHT,
        title=_title(ds, f"{title} over training", _thinning_note(len(keep), len(epochs))),
    )


def depth_profile(
    ds: xr.Dataset,
    *,
    measure: str = "error",
    epoch: int = -1,
    splits: Sequence[str] = ("train", "valid"),
    x: Literal["layer", "relative_depth"] = "layer",
    layers: str | Sequence[str] | None = None,
    baselines: bool | str | Sequence[str] = True,
    interval: bool = True,
) -> alt.LayerChart:
    """A metric across layers at one epoch: the paper's central figure.

    One line per split; with two or more splits the band between the lowest
    and the highest split (for train/valid: the generalisation gap) is shaded.
    For ``measure="error"`` the run's chance error (attribute
    ``chance_error``) is a dashed rule. A run's baselines are dashed lines in
    their split's colour (one dash pattern per baseline); with repeated fits
    each split's line is their mean, and a band in its colour spans them.

    Args:
        ds: A run (see ``docs/store.md``).
        measure: ``"error"``, ``"loss"`` or ``"top5"``.
        epoch: An epoch number, or a negative position (``-1``, the default,
            is the last epoch).
        splits: Splits to draw, e.g. ``("train", "valid", "test")``.
        x: ``"layer"`` (an ordinal axis in forward order) or
            ``"relative_depth"`` (0 at the input, 1 at the output).
        layers: Layer names to draw; None for all.
        baselines: draw the run's baselines (True: all it has; a name or
            list of names; False: none).
        interval: draw the repeats' band when the run has repeated fits.

    Returns:
        A layered chart: gap band, repeats' bands, one line with points per
        split, dashed baseline lines, chance rule.

    Example:
        >>> depth_profile(ds, epoch=0, splits=("train", "valid", "test"))
    """
    check_params(_PROFILE_CONSTRAINTS, x=x, interval=interval)
    check_run(ds)
    splits = _as_list(splits)
    if not splits:
        raise ValueError("splits is empty; choose from: " + choices(splits_of(ds)))
    frame = tidy(ds, measure=measure, split=splits, layers=layers, epoch=epoch)
    frame = frame.drop(columns=["measure"])
    order = _layer_order(ds, layers)
    epoch_number = int(ds["epoch"].values[epoch_position(ds, epoch)])
    depth_x = _layer_x(order) if x == "layer" else alt.X(
        "relative_depth:Q", title="relative depth (0 = input, 1 = output)", scale=alt.Scale(domain=[0, 1])
    )
    value_title = _value_title("", measure).strip()
    charts: list[alt.Chart | alt.LayerChart] = []
    if len(splits) >= 2:
        gap = (
            frame.groupby(["layer", "depth", "relative_depth"], sort=False)["value"]
            .agg(low="min", high="max")
            .reset_index()
        )
        gap["gap"] = gap["high"] - gap["low"]
        charts.append(
            alt.Chart(gap)
            .mark_area(opacity=0.18, color="#888888")
            .encode(
                x=depth_x,
                y=alt.Y("low:Q", title=value_title),
                y2="high:Q",
                tooltip=[alt.Tooltip("layer:N"), alt.Tooltip("gap:Q", title=f"gap ({' vs '.join(splits)})", format=".4f")],
            )
        )
    charts.append(
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=depth_x,
            y=alt.Y("value:Q", title=value_title),
            color=alt.Color("split:N", sort=splits, legend=alt.Legend(title="split")),
            tooltip=[
                alt.Tooltip("layer:N"),
                alt.Tooltip("split:N"),
                alt.Tooltip("value:Q", title=value_title, format=".4f"),
                alt.Tooltip("relative_depth:Q", title="relative depth", format=".3f"),
                alt.Tooltip("shape:N", title="shape"),
                alt.Tooltip("feature_dim:Q", title="features"),
                alt.Tooltip("reduction:N"),
            ],
        )
    )
    split_colour = alt.Color("split:N", sort=splits, legend=alt.Legend(title="split"))
    band = tidy_interval(ds, measure=measure, split=splits, layers=layers, epoch=epoch) if interval else _no_band()
    if len(band):
        charts.append(
            alt.Chart(band[["layer", "relative_depth", "split", "low", "value", "high"]])
            .mark_area(opacity=_BAND_OPACITY)
            .encode(x=depth_x, y=alt.Y("low:Q", title=value_title), y2="high:Q", color=split_colour,
                    tooltip=[alt.Tooltip("layer:N"), alt.Tooltip("split:N"), *_band_tooltip(value_title)])
        )
    base = _baseline_rows(ds, baselines, measure=measure, split=splits, layers=layers, epoch=epoch)
    if len(base):
        names = list(dict.fromkeys(base["baseline"]))
        charts.append(
            alt.Chart(base[["layer", "relative_depth", "split", "baseline", "value"]])
            .mark_line()
            .encode(
                x=depth_x, y=alt.Y("value:Q", title=value_title), color=split_colour, strokeDash=_dash(names),
                detail="baseline:N",
                tooltip=[alt.Tooltip("layer:N"), alt.Tooltip("split:N"), alt.Tooltip("baseline:N"),
                         alt.Tooltip("value:Q", title=f"{value_title} (baseline)", format=".4f")],
            )
        )
    chance = _chance(ds, measure)
    if chance is not None:
        charts.append(_chance_rule(chance))
    return alt.layer(*charts).properties(
        width=_WIDTH, height=_HEIGHT, title=_title(ds, f"{value_title} by layer at epoch {epoch_number}")
    )


def heatmap(
    ds: xr.Dataset,
    *,
    measure: str = "error",
    split: str = "valid",
    layers: str | Sequence[str] | None = None,
    max_rows: int = MAX_ROWS,
) -> alt.LayerChart:
    """Layer x epoch cells coloured by the metric: depth and training time at once.

    The paper's Inception v3 figure in one picture: rows are layers in
    forward order (input at the top), columns are epochs. Cells whose value
    is missing (nonfinite features) are grey.

    Args:
        ds: A run (see ``docs/store.md``).
        measure: ``"error"``, ``"loss"`` or ``"top5"``.
        split: ``"train"``, ``"valid"`` or ``"test"``.
        layers: Layer names to draw; None for all.
        max_rows: Cell budget; when layers x epochs exceed it, evenly spaced
            epochs are kept with :func:`thin_epochs` (always the first and
            the last), and the subtitle says so. A 300-layer run keeps 16
            epochs at the default 5,000.

    Returns:
        A layered chart: grey cells where the value is missing under the
        coloured cells, with tooltips (layer, depth, epoch, step, value).

    Example:
        >>> heatmap(ds, measure="loss", split="train")
    """
    check_params(_HEATMAP_CONSTRAINTS, max_rows=max_rows)
    frame = tidy(ds, measure=measure, split=split, layers=layers)
    order = _layer_order(ds, layers)
    epochs = np.asarray(ds["epoch"].values, dtype=np.int64)
    keep = epochs[thin_epochs(len(epochs), len(order), max_rows=max_rows)]
    frame = frame[frame["epoch"].isin(keep)][["layer", "depth", "epoch", "step", "value"]]
    title = _value_title(split, measure)
    layer_y = alt.Y(
        "layer:O",
        sort=order,
        title="layer (forward order)",
        axis=alt.Axis(labelOverlap="greedy" if len(order) > 40 else False, ticks=len(order) <= 40, labelLimit=120),
    )
    epoch_x = alt.X(
        "epoch:O",
        title="epoch",
        axis=alt.Axis(labelAngle=0, labelOverlap="greedy"),
    )
    tooltip = [
        alt.Tooltip("layer:N"),
        alt.Tooltip("depth:Q"),
        alt.Tooltip("epoch:Q"),
        alt.Tooltip("step:Q"),
        alt.Tooltip("value:Q", title=title, format=".4f"),
    ]
    missing = (
        alt.Chart()
        .mark_rect(color=_MISSING_COLOUR)
        .encode(x=epoch_x, y=layer_y, tooltip=tooltip)
        .transform_filter("!isValid(datum.value)")
    )
    cells = (
        alt.Chart()
        .mark_rect()
        .encode(
            x=epoch_x,
            y=layer_y,
            color=alt.Color("value:Q", title=title, scale=alt.Scale(scheme="viridis")),
            tooltip=tooltip,
        )
    )
    return alt.layer(missing, cells, data=frame).properties(
        width=_WIDTH,
        height=min(max(12 * len(order), 120), 600),
        title=_title(ds, f"{title} by layer and epoch", _thinning_note(len(keep), len(epochs))),
    )


def _run_names(
    runs: Sequence[xr.Dataset] | Mapping[str, xr.Dataset], names: Sequence[str] | None
) -> list[tuple[str, xr.Dataset]]:
    if isinstance(runs, xr.Dataset):
        raise TypeError("comparison takes several runs (a list or a dict of datasets); for one run use depth_profile")
    if isinstance(runs, Mapping):
        if names is not None:
            raise TypeError("names= is for a list of runs; the keys of a dict already name them")
        pairs = [(str(name), ds) for name, ds in runs.items()]
    else:
        datasets = list(runs)
        for i, ds in enumerate(datasets):
            if not isinstance(ds, xr.Dataset):
                raise TypeError(f"runs[{i}] is a {type(ds).__name__}, not a run (an xarray.Dataset, see docs/store.md)")
        if names is None:
            labels = [str(ds.attrs.get("model") or f"run {i}") for i, ds in enumerate(datasets)]
            seen: dict[str, int] = {}
            for i, label in enumerate(labels):
                seen[label] = seen.get(label, 0) + 1
                if seen[label] > 1:
                    labels[i] = f"{label} ({seen[label]})"
        else:
            labels = [str(name) for name in names]
            if len(labels) != len(datasets):
                raise ValueError(f"names has {len(labels)} entries for {len(datasets)} runs; give one name per run")
            if len(set(labels)) != len(labels):
                raise ValueError(f"names must be distinct; got {', '.join(labels)}")
        pairs = list(zip(labels, datasets))
    if not pairs:
        raise ValueError("comparison needs at least one run; got none")
    return pairs


def comparison(
    runs: Sequence[xr.Dataset] | Mapping[str, xr.Dataset],
    *,
    measure: str = "error",
    split: str = "valid",
    epoch: int = -1,
    names: Sequence[str] | None = None,
    baselines: bool | str | Sequence[str] = True,
    interval: bool = True,
) -> alt.LayerChart:
    """Depth profiles of several runs on the shared relative-depth axis.

    Models of different depth (Inception v3 against ResNet-50, a trained
    model against its random-initialisation baseline) line up because
    ``relative_depth`` runs from 0 at the input to 1 at the output. Each run
    has its own colour, and its chance error (when ``measure="error"``) is a
    dashed rule in that colour. Click a legend entry to highlight a run.
    Each run's baselines are dashed lines in its colour, and its repeats'
    band (when it has repeated fits) is shaded in its colour.

    Args:
        runs: A list of runs, or a dict from name to run.
        measure: ``"error"``, ``"loss"`` or ``"top5"``; every run must have it.
        split: ``"train"``, ``"valid"`` or ``"test"``; every run must have it.
        epoch: An epoch number present in every run, or a negative position
            (``-1``, the default, is each run's last epoch).
        names: Names for a list of runs; by default each run's ``model``
            attribute (numbered when two runs share one).
        baselines: draw each run's baselines (True: all it has; a name or
            list of names, drawn where a run has them; False: none).
        interval: draw each run's repeats' band when it has repeated fits.

    Returns:
        A layered chart with tooltips naming each layer with its ``shape``,
        ``feature_dim`` and ``reduction``.

    Example:
        >>> comparison({"Inception v3": inception, "ResNet-50": resnet})
    """
    check_params({"interval": [bool]}, interval=interval)
    frames, chances, bases, bands = [], [], [], []
    chosen = _chosen_baselines(None, baselines)
    for name, ds in _run_names(runs, names):
        try:
            frame = tidy(ds, measure=measure, split=split, epoch=epoch)
            present = [b for b in baselines_of(ds) if chosen is None or b in chosen]
            if present:
                bases.append(tidy_baselines(ds, measure=measure, split=split, epoch=epoch, baselines=present).assign(run=name))
            if interval:
                bands.append(tidy_interval(ds, measure=measure, split=split, epoch=epoch).assign(run=name))
        except (TypeError, ValueError) as error:
            raise type(error)(f"run {name!r}: {error}") from error
        frames.append(frame.assign(run=name))
        chance = _chance(ds, measure)
        if chance is not None:
            chances.append({"run": name, "chance_error": chance})
    frame = pd.concat(frames, ignore_index=True).drop(columns=["split", "measure"])
    order = list(dict.fromkeys(frame["run"]))
    title = _value_title(split, measure)
    pick = alt.selection_point(fields=["run"], bind="legend")
    colour = alt.Color("run:N", sort=order, legend=alt.Legend(title="run"))
    opacity = alt.when(pick).then(alt.value(1.0)).otherwise(alt.value(0.15))
    profiles = (
        alt.Chart(frame)
        .mark_line(point=True)
        .encode(
            x=alt.X("relative_depth:Q", title="relative depth (0 = input, 1 = output)", scale=alt.Scale(domain=[0, 1])),
            y=alt.Y("value:Q", title=title),
            color=colour,
            opacity=opacity,
            tooltip=[
                alt.Tooltip("run:N"),
                alt.Tooltip("layer:N"),
                alt.Tooltip("value:Q", title=title, format=".4f"),
                alt.Tooltip("epoch:Q"),
                alt.Tooltip("relative_depth:Q", title="relative depth", format=".3f"),
                alt.Tooltip("shape:N", title="shape"),
                alt.Tooltip("feature_dim:Q", title="features"),
                alt.Tooltip("reduction:N"),
            ],
        )
        .add_params(pick)
    )
    depth_x = alt.X("relative_depth:Q", title="relative depth (0 = input, 1 = output)", scale=alt.Scale(domain=[0, 1]))
    charts: list[alt.Chart] = [profiles]
    band = pd.concat(bands, ignore_index=True) if bands else _no_band()
    if len(band):  # after the profiles, so that the legend keeps their symbols
        charts.append(alt.Chart(band[["run", "layer", "relative_depth", "low", "value", "high"]])
                      .mark_area(opacity=_BAND_OPACITY)
                      .encode(x=depth_x, y=alt.Y("low:Q", title=title), y2="high:Q", color=colour,
                              tooltip=[alt.Tooltip("run:N"), alt.Tooltip("layer:N"), *_band_tooltip(title)]))
    base = pd.concat(bases, ignore_index=True) if bases else pd.DataFrame()
    if len(base):
        dashes = list(dict.fromkeys(base["baseline"]))
        charts.append(
            alt.Chart(base[["run", "layer", "relative_depth", "baseline", "value"]])
            .mark_line()
            .encode(x=depth_x, y=alt.Y("value:Q", title=title), color=colour, strokeDash=_dash(dashes),
                    detail="baseline:N", opacity=opacity,
                    tooltip=[alt.Tooltip("run:N"), alt.Tooltip("layer:N"), alt.Tooltip("baseline:N"),
                             alt.Tooltip("value:Q", title=f"{title} (baseline)", format=".4f")])
        )
    if chances:
        charts.append(
            alt.Chart(pd.DataFrame(chances))
            .mark_rule(strokeDash=[6, 4])
            .encode(
                y=alt.Y("chance_error:Q"),
                color=colour,
                opacity=opacity,
                tooltip=[alt.Tooltip("run:N"), alt.Tooltip("chance_error:Q", title="chance error", format=".4f")],
            )
        )
    return alt.layer(*charts).properties(
        width=_WIDTH, height=_HEIGHT, title=alt.TitleParams(f"{title} by relative depth")
    )


def cka_heatmap(sim: xr.DataArray, *, names: Sequence[str] | None = None) -> alt.LayerChart:
    """Layer-by-layer similarity of two models, as :func:`probekit.cka` computes it, as a heatmap.

    Rows are ``model_a``'s layers (input at the top), columns ``model_b``'s,
    both in forward order; colour is CKA on a fixed 0 to 1 scale, so two
    heatmaps read alike. Missing values (nonfinite features) are grey.

    Args:
        sim: a DataArray with dims ``(layer_a, layer_b)`` (``pk.cka``'s result, or one read back from Zarr).
        names: the two models' names for the axes; default the ``model_a``/``model_b`` attributes.

    Example:
        >>> cka_heatmap(pk.cka(resnet, inception, data), names=("ResNet-50", "Inception v3"))
    """
    if not isinstance(sim, xr.DataArray) or set(sim.dims) != {"layer_a", "layer_b"}:
        got = f"dims {tuple(sim.dims)}" if isinstance(sim, xr.DataArray) else type(sim).__name__
        raise TypeError(f"cka_heatmap takes pk.cka's result, a DataArray with dims (layer_a, layer_b); got {got}")
    sim = sim.transpose("layer_a", "layer_b")
    if sim.size > MAX_ROWS:
        raise ValueError(
            f"{sim.sizes['layer_a']} x {sim.sizes['layer_b']} layers exceed {MAX_ROWS} cells; "
            "select fewer, e.g. sim.isel(layer_a=slice(None, None, 2))"
        )
    label_a, label_b = (names if names is not None else
                        (sim.attrs.get("model_a", "model a"), sim.attrs.get("model_b", "model b")))
    rows, cols = np.asarray(sim["layer_a"].values).astype(str), np.asarray(sim["layer_b"].values).astype(str)
    values = np.asarray(sim.values, dtype=float)
    frame = pd.DataFrame({
        "layer_a": np.repeat(rows, len(cols)), "layer_b": np.tile(cols, len(rows)),
        "cka": np.where(np.isfinite(values), values, np.nan).reshape(-1),
    })
    y = alt.Y("layer_a:O", sort=rows.tolist(), title=f"{label_a} layer",
              axis=alt.Axis(labelOverlap="greedy" if len(rows) > 40 else False, labelLimit=120))
    x = alt.X("layer_b:O", sort=cols.tolist(), title=f"{label_b} layer",
              axis=alt.Axis(labelAngle=-45, labelOverlap="greedy" if len(cols) > 40 else False, labelLimit=120))
    tooltip = [alt.Tooltip("layer_a:N", title=f"{label_a} layer"), alt.Tooltip("layer_b:N", title=f"{label_b} layer"),
               alt.Tooltip("cka:Q", title="CKA", format=".3f")]
    missing = alt.Chart().mark_rect(color=_MISSING_COLOUR).encode(x=x, y=y, tooltip=tooltip).transform_filter(
        "!isValid(datum.cka)")
    cells = alt.Chart().mark_rect().encode(
        x=x, y=y, tooltip=tooltip,
        color=alt.Color("cka:Q", title="linear CKA", scale=alt.Scale(scheme="viridis", domain=[0, 1], clamp=True)),
    )
    estimator, n = sim.attrs.get("estimator"), sim.attrs.get("n_examples")
    subtitle = ", ".join(part for part in (
        f"{estimator} estimator" if estimator else "", f"{n} examples" if n is not None else "") if part)
    title = f"linear CKA: {label_a} vs {label_b}"
    return alt.layer(missing, cells, data=frame).properties(
        width=min(max(14 * len(cols), 160), 600), height=min(max(14 * len(rows), 160), 600),
        title=alt.TitleParams(title, subtitle=subtitle) if subtitle else alt.TitleParams(title),
    )


def _finding_layers(value: object) -> list[str]:
    """A finding's ``layers`` cell as a list; a scalar other than a name means none."""
    if isinstance(value, str):
        return [value]
    if np.ndim(value) == 0:
        return []
    return [str(layer) for layer in value]


def _explode_findings(findings: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """One row per finding and covered layer, with the finding's size."""
    if hasattr(findings, "to_frame") and not isinstance(findings, pd.DataFrame):
        findings = findings.to_frame()  # pk.diagnose's Findings
    if not isinstance(findings, pd.DataFrame):
        raise TypeError(
            f"findings must be pk.diagnose's result or a DataFrame of findings; got {type(findings).__name__}"
        )
    rows = []
    known = set(names)
    if len(findings):
        missing = [column for column in FINDING_COLUMNS if column not in findings.columns]
        if missing:
            raise ValueError(
                f"findings lacks the columns {', '.join(missing)}; it needs {', '.join(FINDING_COLUMNS)}"
            )
    for number, finding in enumerate(findings.itertuples(index=False)):
        covered = _finding_layers(finding.layers)
        unknown = [layer for layer in covered if layer not in known]
        if unknown:
            raise ValueError(
                f"finding {number} ({finding.kind}) names layers not in this run: {choices(unknown)}; "
                f"this run has: {choices(names)}"
            )
        for layer in covered:
            rows.append(
                {
                    "finding": number,
                    "kind": str(finding.kind),
                    "layer": layer,
                    "covers": len(covered),
                    "evidence": str(finding.evidence),
                    "suggestion": str(finding.suggestion),
                }
            )
    return pd.DataFrame(rows, columns=["finding", "kind", "layer", "covers", "evidence", "suggestion"])


def diagnosis_overlay(
    ds: xr.Dataset,
    findings: pd.DataFrame,
    *,
    measure: str = "error",
    split: str = "valid",
    epoch: int = -1,
) -> alt.LayerChart:
    """The depth profile with diagnosis findings marked on it.

    A finding that covers several layers (a dead segment, a probe-overfitting
    stretch) shades those layers' columns; a finding on one layer (a
    non-monotonic step, a chance-level or stalled layer) is a point on the
    profile (at the axis floor when that layer's value is missing).
    Findings without layers are not drawn. Colours name the kind of finding;
    tooltips show its kind, evidence and suggestion.

    Args:
        ds: A run (see ``docs/store.md``).
        findings: A frame with at least the columns ``kind``, ``layers`` (a
            list of layer names), ``evidence`` and ``suggestion``, as
            ``probekit.diagnose`` returns; it may be empty.
        measure: ``"error"``, ``"loss"`` or ``"top5"``.
        split: ``"train"``, ``"valid"`` or ``"test"``.
        epoch: An epoch number, or a negative position (``-1``, the default,
            is the last epoch).

    Returns:
        A layered chart: finding spans, the profile line, finding points and,
        for ``measure="error"``, the chance rule.

    Example:
        >>> diagnosis_overlay(ds, pk.diagnose(ds))
    """
    frame = tidy(ds, measure=measure, split=split, epoch=epoch).drop(columns=["split", "measure"])
    order = _layer_order(ds, None)
    marks = _explode_findings(findings, order)
    depth_x = _layer_x(order)
    title = _value_title(split, measure)
    kinds = list(dict.fromkeys(marks["kind"]))
    kind_colour = alt.Color("kind:N", sort=kinds, scale=alt.Scale(scheme="tableau10"), legend=alt.Legend(title="finding"))
    finding_tips = [
        alt.Tooltip("kind:N"),
        alt.Tooltip("layer:N"),
        alt.Tooltip("evidence:N"),
        alt.Tooltip("suggestion:N"),
    ]
    charts: list[alt.Chart | alt.LayerChart] = []
    spans = marks[marks["covers"] > 1]
    if len(spans):
        charts.append(
            alt.Chart(spans).mark_rect(opacity=0.22).encode(x=depth_x, color=kind_colour, tooltip=finding_tips)
        )
    charts.append(
        alt.Chart(frame)
        .mark_line(point=alt.OverlayMarkDef(color=_LINE_COLOUR), color=_LINE_COLOUR)
        .encode(
            x=depth_x,
            y=alt.Y("value:Q", title=title),
            tooltip=[
                alt.Tooltip("layer:N"),
                alt.Tooltip("value:Q", title=title, format=".4f"),
                alt.Tooltip("shape:N", title="shape"),
                alt.Tooltip("feature_dim:Q", title="features"),
                alt.Tooltip("reduction:N"),
            ],
        )
    )
    points = marks[marks["covers"] == 1].merge(frame[["layer", "value"]], on="layer", how="left")
    if len(points):
        points["value"] = points["value"].fillna(0.0)
        charts.append(
            alt.Chart(points)
            .mark_point(filled=True, size=140, stroke="black", strokeWidth=1, opacity=0.9)
            .encode(
                x=depth_x,
                y=alt.Y("value:Q", title=title),
                color=kind_colour,
                tooltip=finding_tips,
            )
        )
    chance = _chance(ds, measure)
    if chance is not None:
        charts.append(_chance_rule(chance))
    epoch_number = int(ds["epoch"].values[epoch_position(ds, epoch)])
    subtitle = f"{len(findings)} findings" if len(findings) else "no findings"
    return alt.layer(*charts).properties(
        width=_WIDTH,
        height=_HEIGHT,
        title=_title(ds, f"{title} by layer at epoch {epoch_number}", subtitle),
    )


# --------------------------------------------------------------------------
# Output


def _vl_version() -> str:
    """vl-convert's name for the Vega-Lite version Altair writes (e.g. ``v6_4``)."""
    return "_".join(alt.SCHEMA_VERSION.split(".")[:2])


def save(chart: alt.TopLevelMixin, path: str | Path, *, scale: float = 2.0) -> Path:
    """Write a chart to ``.html``, ``.png`` or ``.svg``, chosen by the suffix.

    Rendering uses vl-convert (no browser, no network). HTML files are
    self-contained: the Vega, Vega-Lite and vega-embed JavaScript is inlined,
    so they open offline.

    Args:
        chart: Any Altair chart (e.g. from this module).
        path: Destination; its suffix picks the format.
        scale: Pixel scale of PNG images (2 suits high-density screens).

    Returns:
        The path written.

    Raises:
        ValueError: An unsupported suffix.

    Example:
        >>> save(depth_profile(ds), "profile.png")
    """
    import vl_convert as vlc

    path = Path(path)
    suffix = path.suffix.lower()
    writers = {".html", ".png", ".svg"}
    if suffix not in writers:
        raise ValueError(f"cannot save a chart as {suffix or 'a file without suffix'!r}; use one of: .html, .png, .svg")
    spec = chart.to_dict()
    if suffix == ".png":
        path.write_bytes(vlc.vegalite_to_png(spec, vl_version=_vl_version(), scale=scale))
    elif suffix == ".svg":
        path.write_text(vlc.vegalite_to_svg(spec, vl_version=_vl_version()), encoding="utf-8")
    else:
        path.write_text(vlc.vegalite_to_html(spec, vl_version=_vl_version(), bundle=True), encoding="utf-8")
    return path


def enable_offline(*, renderer: bool = True) -> None:
    """Show Altair charts in Jupyter without a network connection.

    Inlines the Vega JavaScript into :class:`altair.JupyterChart` (from
    vl-convert, about 900 KB) and, with ``renderer=True``, makes Altair's
    ``jupyter`` renderer (a JupyterChart widget) the default, so plain
    ``chart`` display works offline too. It never turns on the ``mimetype``
    renderer, whose output JupyterLab 4.6 cannot show and nbclient rejects.

    Args:
        renderer: Also switch Altair's default renderer to ``jupyter``;
            False leaves the renderer alone (display charts with
            ``alt.JupyterChart(chart)``).

    Raises:
        ImportError: anywidget is missing (JupyterChart needs it).

    Example:
        >>> from probekit import plots
        >>> plots.enable_offline()
    """
    try:
        import anywidget  # noqa: F401
    except ImportError as error:
        raise ImportError("enable_offline needs anywidget for alt.JupyterChart; install it with pip install anywidget") from error
    alt.JupyterChart.enable_offline()
    if renderer:
        alt.renderers.enable("jupyter", offline=True)
