"""Layer selection for the explorers: pure functions of a run's layers, splits and epochs.

This module owns what the explorers' layer shortcuts mean: *all*, *merge points
only* (:func:`merge_layers`) and *every k-th* (:func:`every_kth`), how a
``layers=`` / ``every=`` request becomes layer names in forward order
(:func:`resolve_layers`, :func:`rule_layers`), the layers an explorer starts
on (:func:`default_layers`) and the split it shows first
(:func:`default_split`), and whether an ``epoch=`` still fits a grown run
(:func:`fits_epoch`). Split and measure names, epoch positions and layer order
come from :mod:`probekit.run.schema`.

This module imports numpy and xarray only: never torch, never altair or ipywidgets.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import xarray as xr

from probekit.params import Interval, check_params, choices
from probekit.run.schema import SPLITS_SHOWN_FIRST, epoch_index, forward_order

__all__ = [
    "DEFAULT_MAX_LAYERS", "LayerRule", "MERGE_OPS", "SELECTION_CONSTRAINTS", "default_layers", "default_split",
    "epoch_numbers", "every_kth", "fits_epoch", "merge_layers", "resolve_layers", "rule_layers", "run_layers",
]

#: Layers selected by default; runs with more start on every k-th layer.
DEFAULT_MAX_LAYERS = 24
#: ``op`` values of probe points where paths merge: residual sums, concatenations.
MERGE_OPS = ("add", "cat")
#: What the layer-selection arguments may be (see :func:`probekit.params.check_params`).
SELECTION_CONSTRAINTS = {"every": [Interval(int, 1, None), None]}
#: How the explorers pick layers by rule: every layer, the merge points, or every k-th.
LayerRule = Literal["all", "merges", "every"]

_INDEXED = re.compile(r"\.\d+$")


def merge_layers(names: Sequence[str], ops: Sequence[str] | None = None) -> list[str]:
    """The layers the *merge points only* shortcut keeps, in the order given.

    A merge point is where paths join: a probe point whose ``op`` is ``add``
    or ``cat`` (a residual sum, an Inception concatenation), or an indexed
    child of a container (``layer1.0``, ``layers.63``, ``blocks.2``), whose
    output is a residual block's sum. The first layer (the input) and the last
    (the output) are always kept; a run with no merge point between its ends
    keeps every layer. (The engine's ``"blocks"`` layer selection is another
    thing: the input and each top-level child of the model.)

    Args:
        names: Layer names in forward order (a run's ``layer`` coordinate).
        ops: Their ``op`` coordinate, the same length; None to judge by names only.

    Returns:
        The merge points with the input and the output, in the order of ``names``.

    Example:
        >>> merge_layers(["input", "conv1", "layer1.0", "layer1.1", "fc"])
        ['input', 'layer1.0', 'layer1.1', 'fc']
    """
    names = [str(name) for name in names]
    ops = [str(op) for op in ops] if ops is not None else [""] * len(names)
    if len(ops) != len(names):
        raise ValueError(f"merge_layers got {len(names)} names but {len(ops)} ops; give one op per layer")
    inner = [name for name, op in zip(names[1:-1], ops[1:-1]) if _INDEXED.search(name) or op in MERGE_OPS]
    if not inner:
        return names
    keep = {names[0], names[-1], *inner}
    return [name for name in names if name in keep]


def every_kth(names: Sequence[str], k: int) -> list[str]:
    """Every ``k``-th layer from the first, and the last one too.

    Example:
        >>> every_kth(["input", "conv1", "relu2", "pool3", "fc"], 3)
        ['input', 'pool3', 'fc']
    """
    chosen = list(names[::k])
    if names and names[-1] not in chosen:
        chosen.append(names[-1])
    return chosen


def default_layers(names: list[str]) -> list[str]:
    """The layers an explorer starts on: all of them, or every k-th for more than :data:`DEFAULT_MAX_LAYERS`.

    Example:
        >>> len(default_layers([f"l{i}" for i in range(60)]))
        21
    """
    if len(names) <= DEFAULT_MAX_LAYERS:
        return names
    return every_kth(names, math.ceil(len(names) / DEFAULT_MAX_LAYERS))


def run_layers(ds: xr.Dataset) -> list[str]:
    """A run's layer names in forward (depth) order.

    Example:
        >>> run_layers(pk.open_run("runs/demo.zarr"))[:2]
        ['input', 'conv1']
    """
    return [str(name) for name in np.asarray(ds["layer"].values)[forward_order(ds)]]


def _run_merges(ds: xr.Dataset) -> list[str]:
    order = forward_order(ds)
    ops = np.asarray(ds["op"].values)[order].tolist() if "op" in ds.coords else None
    return merge_layers(np.asarray(ds["layer"].values)[order].tolist(), ops)


def resolve_layers(ds: xr.Dataset, layers: str | Sequence[str] | None, every: int | None) -> tuple[str, ...]:
    """A ``layers=`` / ``every=`` request as layer names in forward order.

    Args:
        ds: A run.
        layers: Layer names, ``"all"`` or ``"merges"`` (see :func:`merge_layers`).
        every: Keep every k-th layer instead (and the last one); ``layers`` must then be None.

    Example:
        >>> resolve_layers(ds, ["logits", "conv1"], None)
        ('conv1', 'logits')
    """
    check_params(SELECTION_CONSTRAINTS, every=every)
    names = run_layers(ds)
    if every is not None:
        if layers is not None:
            raise ValueError("pass layers= or every=, not both (every=k keeps every k-th layer of the run)")
        return tuple(every_kth(names, int(every)))
    if isinstance(layers, str):
        if layers == "all":
            return tuple(names)
        if layers == "merges":
            return tuple(_run_merges(ds))
        if layers in names:
            return (layers,)
        raise ValueError(
            f"layers={layers!r} is neither a layer of this run nor a shortcut; use 'all', 'merges', "
            f"every=k, or names from: {choices(names)}"
        )
    wanted = [str(name) for name in layers]
    unknown = [name for name in wanted if name not in names]
    if unknown:
        raise ValueError(f"layers {choices(unknown)} are not in this run; choose from: {choices(names)}")
    keep = set(wanted)
    return tuple(name for name in names if name in keep)


def rule_layers(ds: xr.Dataset, rule: LayerRule, every: int, depth_range: tuple[float, float]) -> list[str]:
    """The layers a rule keeps in one run, within a relative-depth window, in forward order.

    Example:
        >>> rule_layers(ds, "every", 2, (0.5, 1.0))
        ['conv4', 'logits']
    """
    if rule == "all":
        chosen = run_layers(ds)
    elif rule == "merges":
        chosen = _run_merges(ds)
    else:
        chosen = every_kth(run_layers(ds), every)
    relative = dict(zip((str(n) for n in ds["layer"].values), np.asarray(ds["relative_depth"].values, dtype=float)))
    low, high = depth_range
    return [name for name in chosen if low - 1e-9 <= relative[name] <= high + 1e-9]


def default_split(splits: Sequence[str]) -> str:
    """The split shown when none is asked for: the first of ``SPLITS_SHOWN_FIRST`` present, else the first.

    Example:
        >>> default_split(["train", "test"])
        'test'
    """
    return next(split for split in (*SPLITS_SHOWN_FIRST, *splits) if split in splits)


def epoch_numbers(ds: xr.Dataset) -> list[int]:
    """A run's epoch numbers, in order.

    Example:
        >>> epoch_numbers(ds)
        [0, 1, 2, 3]
    """
    return [int(e) for e in np.asarray(ds["epoch"].values)]


def fits_epoch(epochs: Sequence[int], epoch: int) -> bool:
    """Whether ``epoch`` (an epoch number, or negative to count from the end) is on this epoch axis.

    Example:
        >>> fits_epoch([0, 1, 2], -3), fits_epoch([0, 1, 2], 5)
        (True, False)
    """
    try:
        epoch_index(epochs, epoch)
    except ValueError:
        return False
    return True
