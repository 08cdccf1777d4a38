"""The run schema: the one owner of what a probekit run is.

A run is an ``xarray.Dataset`` with a data variable ``probe`` of dims
``(layer, epoch, metric)``, the L2 strength of each fit (``l2``), and, when a
run asks for them, its baselines (``baselines``) and repeated fits
(``probe_repeat``); ``docs/store.md`` documents every variable,
coordinate and attribute. This module owns the names (splits, measures and
metric naming), the layout and row types the engine fills, building a run
dataset from rows, validating one (:func:`check_run`), the position of an epoch
on the epoch axis (:func:`epoch_position`, :func:`epoch_index`), the forward
order of layers (:func:`forward_order`), the splits and measures a run has
(:func:`splits_of`, :func:`measures_of`) and the one "not in this run" error
(:func:`check_in_run`). Every reader (the store, charts, diagnosis, explorers
and the accessor) takes these from here.

This module imports numpy and xarray only: never torch, never zarr.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import xarray as xr

from probekit.params import choices

__all__ = [
    "ATTR_DEFAULTS", "BASELINES", "EPOCH_VARIABLES", "REDUCTION_WIDTH", "EXAMPLE_KINDS", "LAYOUTS", "MDL_SPLIT", "MEASURES", "MEASURE_LABELS", "RUN_COORDS",
    "RUN_VARIABLES", "SCHEMA_VERSION", "SESSION_ATTRS", "SPLITS", "SPLITS_SHOWN_FIRST", "SPLIT_MEASURES", "VARIABLE_DEFAULTS",
    "VARIABLE_DIMS", "EpochRow", "RunLayout", "build_dataset", "check_in_run", "check_run", "epoch_arrays", "epoch_index",
    "epoch_position", "forward_order", "layout_for_shape", "layout_of", "measures_of", "metric_name", "metric_names",
    "row_values", "rows_of", "splits_of", "with_added_variables",
]

SCHEMA_VERSION = 2
SPLITS = ("train", "valid", "test")
#: The split a reader shows when none is asked for: the first of these that the run has
#: (the held-out split the paper reads, then test, then train).
SPLITS_SHOWN_FIRST = ("valid", "test", "train")
MEASURES = ("error", "loss", "top5", "selectivity", "mdl", "compression")
#: Axis titles of each measure, for charts and widgets.
MEASURE_LABELS = {
    "error": "error", "loss": "loss (nats)", "top5": "top-5 error",
    "selectivity": "selectivity (accuracy - control accuracy)", "mdl": "MDL code length (bits)",
    "compression": "compression (uniform code / MDL)",
}
#: The measures that exist on every split; the others exist where a run asks for them
#: (``selectivity`` with the control baseline, ``mdl`` and ``compression`` on the train split).
SPLIT_MEASURES = ("error", "loss", "top5")
#: The split the online code length is measured on.
MDL_SPLIT = "train"
#: What a probe's examples are: whole examples, or labelled tokens (a token-level run).
EXAMPLE_KINDS = ("examples", "tokens")
#: Layouts of a probe point's output: a channels-first feature map, a token sequence
#: (tokens x hidden, channels last) or a vector.
LAYOUTS = ("map", "tokens", "vector")
#: The baselines a run can carry (see docs/methodology.md).
BASELINES = ("random_init", "control")
#: Data variables every run has.
RUN_VARIABLES = ("probe", "l2", "reduction_used", "nonfinite", "iterations", "converged", "model_loss", "model_valid_loss",
                 "model_error", "wall_time")
#: Coordinates every run has.
RUN_COORDS = (
    "layer", "depth", "relative_depth", "op", "shape", "layout", "feature_dim", "reduction",
    "epoch", "step", "metric", "split", "measure",
)
#: Variables indexed by epoch, written one region per epoch, with their dims: every run's,
#: then the optional ones (``baselines`` with baselines, ``probe_repeat`` with repeats > 1).
VARIABLE_DIMS = {
    "probe": ("layer", "epoch", "metric"),
    "l2": ("layer", "epoch"),
    "reduction_used": ("layer", "epoch"),
    "nonfinite": ("layer", "epoch"),
    "iterations": ("layer", "epoch"),
    "converged": ("layer", "epoch"),
    "model_loss": ("epoch",),
    "model_valid_loss": ("epoch",),
    "model_error": ("epoch",),
    "wall_time": ("epoch",),
    "step": ("epoch",),
    "epoch": ("epoch",),
    "baselines": ("layer", "epoch", "baseline", "metric"),
    "probe_repeat": ("layer", "epoch", "repeat", "metric"),
}
#: Widest reduction text ``reduction_used`` holds (its fixed-width string dtype).
REDUCTION_WIDTH = 48
#: The epoch-indexed variables every run has.
EPOCH_VARIABLES = ("probe", "l2", "reduction_used", "nonfinite", "iterations", "converged", "model_loss", "model_valid_loss",
                   "model_error", "wall_time", "step", "epoch")
#: Run variables added after stores were first written (each indexed by epoch alone), and the value every epoch of
#: a run without one holds: readers fill it in (:func:`with_added_variables`), and a store continued with
#: ``resume=True`` gains it. ``model_valid_loss``: the model's validation loss, as a trainer logged it.
VARIABLE_DEFAULTS = {"model_valid_loss": float("nan")}
#: Attributes that describe one process's session, not the run: they may differ on resume.
SESSION_ATTRS = ("command", "started", "device", "wall_time", "completed_epochs", "probekit_version", "torch_version", "python_version")
#: Run attributes added after stores were first written, and the value a store without one was written with.
#: ``world_size``: the processes a run was probed by, data-parallel (1: one process).
ATTR_DEFAULTS = {"autocast": "none", "world_size": 1}


def metric_name(split: str, measure: str) -> str:
    """The name on the ``metric`` coordinate of ``measure`` on ``split``.

    Example:
        >>> metric_name("valid", "error")
        'valid_error'
    """
    return f"{split}_{measure}"


def metric_names(splits: Sequence[str], num_classes: int, *, control: bool = False, mdl: bool = False) -> list[str]:
    """The metric coordinate for a run over ``splits`` with ``num_classes`` classes.

    Every split has ``error`` and ``loss`` (and ``top5`` above 5 classes); with
    the control baseline, every split also has ``selectivity``; with ``mdl``,
    the train split has ``mdl`` and ``compression``.

    Example:
        >>> metric_names(["train", "valid"], 3, control=True)
        ['train_error', 'train_loss', 'train_selectivity', 'valid_error', 'valid_loss', 'valid_selectivity']
    """
    measures = list(SPLIT_MEASURES if num_classes > 5 else SPLIT_MEASURES[:2])
    if control:
        measures.append("selectivity")
    names = []
    for split in SPLITS:
        if split not in splits:
            continue
        names += [metric_name(split, measure) for measure in measures]
        if mdl and split == MDL_SPLIT:
            names += [metric_name(split, "mdl"), metric_name(split, "compression")]
    return names


def layout_for_shape(shape: str | Sequence[int]) -> str:
    """The layout a per-example shape implies when nothing else says: a vector, else a feature map.

    Token sequences cannot be told from feature maps by shape alone; the engine
    infers them from the module that produces a point (see :mod:`probekit.engine.points`).
    """
    rank = len([part for part in shape.split("x") if part]) if isinstance(shape, str) else len(shape)
    return "vector" if rank <= 1 else "map"


@dataclass
class RunLayout:
    """What fixes the shape of a run: its layers, metrics and provenance.

    Two runs can share a store only if their layouts agree on every field
    but the per-session attributes (``SESSION_ATTRS``).
    """

    layers: list[str]
    depth: list[int]
    relative_depth: list[float]
    op: list[str]
    shape: list[str]
    feature_dim: list[int]
    reduction: list[str]
    metrics: list[str]
    attrs: dict = field(default_factory=dict)
    #: Each layer's layout (see :data:`LAYOUTS`); None: inferred from the shapes (:func:`layout_for_shape`).
    layouts: list[str] | None = None
    #: The baselines the run carries (see :data:`BASELINES`), in order.
    baselines: tuple[str, ...] = ()
    #: Fits per probe; above 1 the run has ``probe_repeat`` and ``probe`` is their mean.
    repeats: int = 1

    def __post_init__(self) -> None:
        if self.layouts is None:
            self.layouts = [layout_for_shape(shape) for shape in self.shape]
        self.layouts = list(self.layouts)
        self.baselines = tuple(self.baselines)
        bad = sorted(set(self.layouts) - set(LAYOUTS))
        if bad:
            raise ValueError(f"unknown layouts {bad}; a layer's layout is one of {choices(LAYOUTS)}")
        unknown = [b for b in self.baselines if b not in BASELINES]
        if unknown:
            raise ValueError(f"unknown baselines {unknown}; choose from {choices(BASELINES)}")
        if int(self.repeats) < 1:
            raise ValueError(f"repeats={self.repeats} is below 1; pass repeats=1 for one fit per probe, or more")
        self.repeats = int(self.repeats)

    def epoch_variables(self) -> tuple[str, ...]:
        """The epoch-indexed variables of this run: every run's, then the optional ones it has."""
        extra = (("baselines",) if self.baselines else ()) + (("probe_repeat",) if self.repeats > 1 else ())
        return (*EPOCH_VARIABLES, *extra)

    def coords(self) -> dict:
        metrics = self.metrics
        extra = {}
        if self.baselines:
            extra["baseline"] = ("baseline", np.array(self.baselines, dtype=str))
        if self.repeats > 1:
            extra["repeat"] = ("repeat", np.arange(self.repeats, dtype=np.int64))
        return {
            **extra,
            "layer": ("layer", np.array(self.layers, dtype=str)),
            "depth": ("layer", np.array(self.depth, dtype=np.int64)),
            "relative_depth": ("layer", np.array(self.relative_depth, dtype=np.float64)),
            "op": ("layer", np.array(self.op, dtype=str)),
            "shape": ("layer", np.array(self.shape, dtype=str)),
            "layout": ("layer", np.array(self.layouts, dtype=str)),
            "feature_dim": ("layer", np.array(self.feature_dim, dtype=np.int64)),
            "reduction": ("layer", np.array(self.reduction, dtype=str)),
            "metric": ("metric", np.array(metrics, dtype=str)),
            "split": ("metric", np.array([m.rsplit("_", 1)[0] for m in metrics], dtype=str)),
            "measure": ("metric", np.array([m.rsplit("_", 1)[1] for m in metrics], dtype=str)),
        }

    def fixed_attrs(self) -> dict:
        """The attributes a resumed run must share with its store (those a store predates at their defaults)."""
        return {**ATTR_DEFAULTS, **{k: v for k, v in self.attrs.items() if k not in SESSION_ATTRS}}


@dataclass
class EpochRow:
    """One epoch of a run: every layer's metrics, as the engine computed them."""

    epoch: int
    step: int
    probe: np.ndarray  # (layer, metric)
    nonfinite: np.ndarray  # (layer,)
    iterations: np.ndarray  # (layer,)
    converged: np.ndarray  # (layer,)
    model_loss: float = float("nan")
    model_error: float = float("nan")
    wall_time: float = float("nan")
    model_valid_loss: float = float("nan")  # the model's validation loss, when the trainer logged one
    l2: np.ndarray | None = None  # (layer,): the L2 strength of each fit; None: not recorded (NaN)
    reduction_used: Sequence[str] | None = None  # (layer,): the reduction each fit read; None: the layer's ``reduction``
    baseline: np.ndarray | None = None  # (layer, baseline, metric), when the run has baselines
    repeat: np.ndarray | None = None  # (layer, repeat, metric), when the run has repeats > 1


def epoch_arrays(layout: RunLayout, rows: Sequence[EpochRow], capacity: int | None = None) -> dict:
    n_layers, n_metrics = len(layout.layers), len(layout.metrics)
    size = len(rows) if capacity is None else capacity
    probe = np.full((n_layers, size, n_metrics), np.nan)
    arrays = {
        "probe": probe,
        "l2": np.full((n_layers, size), np.nan),
        "reduction_used": np.full((n_layers, size), "", dtype=f"<U{REDUCTION_WIDTH}"),
        "nonfinite": np.zeros((n_layers, size), dtype=bool),
        "iterations": np.zeros((n_layers, size), dtype=np.int64),
        "converged": np.zeros((n_layers, size), dtype=bool),
        "model_loss": np.full(size, np.nan),
        "model_valid_loss": np.full(size, np.nan),
        "model_error": np.full(size, np.nan),
        "wall_time": np.full(size, np.nan),
        "step": np.full(size, -1, dtype=np.int64),
        "epoch": np.full(size, -1, dtype=np.int64),
    }
    if layout.baselines:
        arrays["baselines"] = np.full((n_layers, size, len(layout.baselines), n_metrics), np.nan)
    if layout.repeats > 1:
        arrays["probe_repeat"] = np.full((n_layers, size, layout.repeats, n_metrics), np.nan)
    for i, row in enumerate(rows):
        for name, value in row_values(row, layout).items():
            index = [slice(None)] * arrays[name].ndim
            index[VARIABLE_DIMS[name].index("epoch")] = i
            arrays[name][tuple(index)] = value
    return arrays


def row_values(row: EpochRow, layout: RunLayout) -> dict:
    """One row's value of each epoch-indexed variable of ``layout``'s run (without the epoch axis).

    Raises a one-line ValueError when the row lacks what the run has (baselines,
    repeats) or has the wrong shape for it.
    """
    n_layers, n_metrics = len(layout.layers), len(layout.metrics)
    values = {
        "probe": row.probe, "l2": np.full(n_layers, np.nan) if row.l2 is None else row.l2,
        "reduction_used": np.array(layout.reduction if row.reduction_used is None else list(row.reduction_used),
                                   dtype=f"<U{REDUCTION_WIDTH}"),
        "nonfinite": row.nonfinite, "iterations": row.iterations, "converged": row.converged,
        "model_loss": row.model_loss, "model_valid_loss": row.model_valid_loss, "model_error": row.model_error,
        "wall_time": row.wall_time,
        "step": row.step, "epoch": row.epoch,
    }
    expected = {"baselines": (n_layers, len(layout.baselines), n_metrics), "probe_repeat": (n_layers, layout.repeats, n_metrics)}
    for name, given in (("baselines", row.baseline), ("probe_repeat", row.repeat)):
        if name not in layout.epoch_variables():
            continue
        if given is None or np.shape(given) != expected[name]:
            got = "none" if given is None else f"shape {np.shape(given)}"
            raise ValueError(f"epoch {row.epoch}'s row has {got} for {name!r}; this run needs shape {expected[name]}")
        values[name] = given
    return values


def build_dataset(layout: RunLayout, rows: Sequence[EpochRow], capacity: int | None = None) -> xr.Dataset:
    """The run as an ``xarray.Dataset`` (see docs/store.md)."""
    arrays = epoch_arrays(layout, rows, capacity)
    coords = layout.coords()
    coords["epoch"] = ("epoch", arrays.pop("epoch"))
    coords["step"] = ("epoch", arrays.pop("step"))
    data_vars = {name: (VARIABLE_DIMS[name], value) for name, value in arrays.items()}
    attrs = {"probekit_schema": SCHEMA_VERSION, **layout.attrs}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def layout_of(ds: xr.Dataset) -> RunLayout:
    """The layout a run dataset (or an opened store) was made with."""
    return RunLayout(
        layers=[str(v) for v in ds["layer"].values], depth=[int(v) for v in ds["depth"].values],
        relative_depth=[float(v) for v in ds["relative_depth"].values], op=[str(v) for v in ds["op"].values],
        shape=[str(v) for v in ds["shape"].values], feature_dim=[int(v) for v in ds["feature_dim"].values],
        reduction=[str(v) for v in ds["reduction"].values], metrics=[str(v) for v in ds["metric"].values],
        attrs={k: v for k, v in ds.attrs.items() if k != "probekit_schema"},
        layouts=[str(v) for v in ds["layout"].values],
        baselines=tuple(str(v) for v in ds["baseline"].values) if "baseline" in ds.coords else (),
        repeats=int(ds.sizes["repeat"]) if "repeat" in ds.dims else 1,
    )


def rows_of(ds: xr.Dataset) -> list[EpochRow]:
    """The epochs of a run dataset, as rows an engine can continue from (a variable it predates at its default)."""
    ds = with_added_variables(ds)
    return [
        EpochRow(
            epoch=int(ds["epoch"].values[i]), step=int(ds["step"].values[i]), probe=ds["probe"].values[:, i, :].copy(),
            nonfinite=ds["nonfinite"].values[:, i].copy(), iterations=ds["iterations"].values[:, i].copy(),
            converged=ds["converged"].values[:, i].copy(), model_loss=float(ds["model_loss"].values[i]),
            model_valid_loss=float(ds["model_valid_loss"].values[i]), model_error=float(ds["model_error"].values[i]),
            wall_time=float(ds["wall_time"].values[i]),
            l2=ds["l2"].values[:, i].copy(), reduction_used=[str(v) for v in ds["reduction_used"].values[:, i]],
            baseline=ds["baselines"].values[:, i].copy() if "baselines" in ds.data_vars else None,
            repeat=ds["probe_repeat"].values[:, i].copy() if "probe_repeat" in ds.data_vars else None,
        )
        for i in range(ds.sizes["epoch"])
    ]


def with_added_variables(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` with every variable of :data:`VARIABLE_DEFAULTS` it lacks, at its default on every epoch (``ds`` itself
    when it has them all).

    A run written before a variable existed is read as if every epoch had
    recorded the default (NaN: "not logged"), so that readers never need to
    ask whether a run has it.
    """
    missing = {name: value for name, value in VARIABLE_DEFAULTS.items() if name not in ds.variables}
    if not missing:
        return ds
    return ds.assign({name: (VARIABLE_DIMS[name], np.full(ds.sizes["epoch"], value)) for name, value in missing.items()})


def epoch_index(epochs: Sequence[int], epoch: int) -> int:
    """The position of ``epoch`` on an epoch axis: an epoch number, or negative to count from the end.

    The one meaning of an ``epoch=`` argument: a number ``>= 0`` is an epoch
    number present on the axis; ``-1`` is the last position, ``-2`` the one
    before, and so on.

    Args:
        epochs: the epoch numbers of the axis, in order (a run's ``epoch``
            coordinate, or the epochs several runs share).
        epoch: an epoch number on it, or a negative position.

    Example:
        >>> epoch_index([0, 5, 10], 5), epoch_index([0, 5, 10], -1)
        (1, 2)
    """
    epochs = np.asarray(epochs)
    if isinstance(epoch, bool) or not isinstance(epoch, (int, np.integer)):
        raise TypeError(f"epoch must be an int (an epoch number, or -1 for the last); got {epoch!r}")
    if epochs.size == 0:
        raise ValueError("this run has no completed epochs yet; wait for the first one to be written")
    if epoch < 0:
        if -epoch > epochs.size:
            raise ValueError(f"epoch={epoch} reaches before the first epoch; this run has {epochs.size} epochs")
        return int(epochs.size + epoch)
    hits = np.flatnonzero(epochs == epoch)
    if hits.size == 0:
        raise ValueError(f"epoch={epoch} is not in this run; choose from: {choices(epochs.tolist())} (or -1 for the last)")
    return int(hits[0])


def epoch_position(ds: xr.Dataset, epoch: int) -> int:
    """The position on the epoch axis of ``epoch`` (an epoch number, or negative to count from the end).

    Args:
        ds: a run.
        epoch: an epoch number present in the run, or ``-1`` for the last, ``-2``
            for the one before, ... (see :func:`epoch_index`).

    Example:
        >>> ds.probe.isel(epoch=epoch_position(ds, -1))
    """
    return epoch_index(ds["epoch"].values, epoch)


def check_run(ds: object) -> None:
    """Raise a one-line error unless ``ds`` follows the run schema of ``docs/store.md``.

    Args:
        ds: the object to check.

    Raises:
        TypeError: ``ds`` is not an ``xarray.Dataset``.
        ValueError: it lacks a variable (but those of :data:`VARIABLE_DEFAULTS`, which a
            run made before them lacks), a coordinate or the schema attribute, or has
            another schema version.

    Example:
        >>> check_run(pk.open_run("runs/demo.zarr"))
    """
    if not isinstance(ds, xr.Dataset):
        raise TypeError(
            f"expected a probekit run (an xarray.Dataset, see docs/store.md); got {type(ds).__name__}. "
            "Open runs with probekit.open_run"
        )
    missing = [name for name in (*RUN_VARIABLES, *RUN_COORDS)
               if name not in ds.variables and name not in VARIABLE_DEFAULTS]
    if missing:
        raise ValueError(
            f"this dataset is not a probekit run: it lacks {', '.join(missing)}; open runs with probekit.open_run "
            "(see docs/store.md for the schema)"
        )
    for name, dims in VARIABLE_DIMS.items():
        if name in ds.data_vars and ds[name].dims != dims:
            raise ValueError(
                f"this dataset's {name!r} has dims {ds[name].dims}, not {dims}; "
                "do not transpose a run before passing it (see docs/store.md)"
            )
    version = ds.attrs.get("probekit_schema")
    if version != SCHEMA_VERSION:
        what = "no 'probekit_schema' attribute" if version is None else f"schema version {version!r}"
        raise ValueError(
            f"this dataset has {what}; this probekit reads schema version {SCHEMA_VERSION}. "
            "Open runs with probekit.open_run, or re-run with this probekit"
        )


def forward_order(ds: xr.Dataset, layers: Sequence[str] | None = None) -> np.ndarray:
    """Positions on the layer axis of ``layers`` (all when None), sorted by depth: forward order.

    Example:
        >>> ds["layer"].values[forward_order(ds)]
    """
    names = [str(v) for v in ds["layer"].values]
    if layers is None:
        positions = np.arange(len(names))
    else:
        index = {name: i for i, name in enumerate(names)}
        positions = np.array([index[name] for name in layers], dtype=int)
    depth = np.asarray(ds["depth"].values)
    return positions[np.argsort(depth[positions], kind="stable")]


def splits_of(ds: xr.Dataset) -> list[str]:
    """The splits a run has, in :data:`SPLITS` order (others, if any, after them).

    Example:
        >>> splits_of(pk.open_run("runs/demo.zarr"))
        ['train', 'valid', 'test']
    """
    present = list(dict.fromkeys(str(v) for v in np.asarray(ds["split"].values).tolist()))
    return sorted(present, key=lambda split: SPLITS.index(split) if split in SPLITS else len(SPLITS))


def measures_of(ds: xr.Dataset) -> list[str]:
    """The measures a run has, in :data:`MEASURES` order (others, if any, after them).

    Example:
        >>> measures_of(pk.open_run("runs/demo.zarr"))
        ['error', 'loss', 'top5']
    """
    present = list(dict.fromkeys(str(v) for v in np.asarray(ds["measure"].values).tolist()))
    return sorted(present, key=lambda measure: MEASURES.index(measure) if measure in MEASURES else len(MEASURES))


def check_in_run(name: str, value: object, present: Sequence[object]) -> None:
    """Raise the one-line error for a ``name=value`` that the run does not have, listing what it has.

    Example:
        >>> check_in_run("split", "dev", splits_of(ds))
        Traceback (most recent call last):
        ValueError: split='dev' is not in this run; choose from: train, valid, test
    """
    if value not in present:
        raise ValueError(f"{name}={value!r} is not in this run; choose from: {choices(present)}")
