"""The ``ds.probekit`` accessor: run-store methods on any dataset that follows the schema.

Importing this module registers the accessor with xarray (``import probekit``
does). Every method is a thin wrapper over :func:`probekit.diagnosis.diagnose`
or a chart of :mod:`probekit.plots`, with the run already passed:

    >>> ds = pk.open_run("runs/demo.zarr")
    >>> ds.probekit.errors()                 # valid error per layer, last epoch
    >>> ds.probekit.diagnose()               # findings (a table in a notebook)
    >>> ds.probekit.depth_profile(epoch=0)   # the paper's figure for one epoch

As in xarray's accessor pattern, the constructor only stores the dataset, so
``hasattr(ds, "probekit")``, ``dir(ds)`` and completion work on every dataset;
each method checks the run (:func:`probekit.run.schema.check_run`) when it is
called, and a dataset that is not a run raises one line saying what it lacks.

This module imports numpy, pandas and xarray (and Altair when a chart is
asked for): never torch, never zarr, never ipywidgets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import pandas as pd
import xarray as xr

from probekit.diagnosis import Findings, diagnose
from probekit.run.schema import check_run, epoch_position, forward_order, metric_name, splits_of

__all__ = ["ProbekitAccessor"]


@xr.register_dataset_accessor("probekit")
class ProbekitAccessor:
    """Run-store methods, as ``ds.probekit.<method>``; see the module docstring.

    Args:
        ds: any dataset; the methods refuse one that is not a run (see ``docs/store.md``)
            with a ``TypeError`` or ``ValueError``.

    Example:
        >>> pk.open_run("data/runs/bypass.zarr").probekit.diagnose().of("dead_segment")
    """

    def __init__(self, ds: xr.Dataset):
        self._obj = ds

    def _run(self) -> xr.Dataset:
        check_run(self._obj)
        return self._obj

    def errors(self, split: str = "valid", epoch: int = -1) -> pd.Series:
        """The probes' error on ``split`` at ``epoch``, one value per layer in forward order.

        Args:
            split: ``"train"``, ``"valid"`` or ``"test"``.
            epoch: an epoch number, or negative to count from the end (-1, the last epoch).

        Returns:
            A Series indexed by layer name, named ``"{split}_error"``; NaN where
            the layer's features were nonfinite.

        Example:
            >>> ds.probekit.errors("test", epoch=0).idxmin()
            'relu1'
        """
        ds = self._run()
        name = metric_name(split, "error")
        metrics = [str(m) for m in ds["metric"].values]
        if name not in metrics:
            with_error = [s for s in splits_of(ds) if metric_name(s, "error") in metrics]
            raise ValueError(f"split={split!r} has no error in this run; choose from: {', '.join(with_error)}")
        values = ds["probe"].sel(metric=name).isel(epoch=epoch_position(ds, epoch), layer=forward_order(ds))
        series = values.to_series().astype(float)
        series.index = pd.Index([str(v) for v in series.index], name="layer")
        series.name = name
        return series

    def diagnose(
        self,
        *,
        split: str = "valid",
        epoch: int = -1,
        z: float = 3.0,
        min_delta: float = 0.01,
        min_layers: int = 2,
        overfit_gap: float = 0.10,
        overfit_ratio: float = 0.5,
        stall_epochs: int = 3,
        loss_drop: float = 0.05,
        n_examples: int | None = None,
    ) -> Findings:
        """The run's findings: :func:`probekit.diagnosis.diagnose` of this run (same arguments).

        Example:
            >>> ds.probekit.diagnose(split="test", z=2.5)
        """
        return diagnose(self._run(), split=split, epoch=epoch, z=z, min_delta=min_delta, min_layers=min_layers,
                        overfit_gap=overfit_gap, overfit_ratio=overfit_ratio, stall_epochs=stall_epochs,
                        loss_drop=loss_drop, n_examples=n_examples)

    def depth_profile(
        self,
        *,
        measure: str = "error",
        epoch: int = -1,
        splits: Sequence[str] = ("train", "valid"),
        x: Literal["layer", "relative_depth"] = "layer",
        layers: str | Sequence[str] | None = None,
        baselines: bool | str | Sequence[str] = True,
        interval: bool = True,
    ):
        """:func:`probekit.plots.depth_profile` of this run (a metric across layers at one epoch;
        baselines dashed, repeats as a band).

        Example:
            >>> ds.probekit.depth_profile(epoch=0, splits=("train", "valid", "test"))
        """
        from probekit import plots

        return plots.depth_profile(self._run(), measure=measure, epoch=epoch, splits=splits, x=x, layers=layers,
                                   baselines=baselines, interval=interval)

    def heatmap(
        self,
        *,
        measure: str = "error",
        split: str = "valid",
        layers: str | Sequence[str] | None = None,
        max_rows: int | None = None,
    ):
        """:func:`probekit.plots.heatmap` of this run (layer x epoch cells).

        Args:
            max_rows: the chart's cell budget; None for its default.

        Example:
            >>> ds.probekit.heatmap(measure="loss")
        """
        from probekit import plots

        budget = {} if max_rows is None else {"max_rows": max_rows}
        return plots.heatmap(self._run(), measure=measure, split=split, layers=layers, **budget)

    def training_curves(
        self,
        *,
        measure: str = "error",
        split: str = "valid",
        layers: str | Sequence[str] | None = None,
        x: Literal["epoch", "step"] = "epoch",
        max_rows: int | None = None,
        baselines: bool | str | Sequence[str] = True,
        interval: bool = True,
    ):
        """:func:`probekit.plots.training_curves` of this run (one line per layer over training;
        baselines dashed, repeats as a band).

        Args:
            max_rows: the chart's row budget; None for its default.

        Example:
            >>> ds.probekit.training_curves(x="step")
        """
        from probekit import plots

        budget = {} if max_rows is None else {"max_rows": max_rows}
        return plots.training_curves(self._run(), measure=measure, split=split, layers=layers, x=x, baselines=baselines,
                                     interval=interval, **budget)

    def diagnosis_overlay(
        self,
        findings: Findings | pd.DataFrame | None = None,
        *,
        measure: str = "error",
        split: str = "valid",
        epoch: int = -1,
    ):
        """:func:`probekit.plots.diagnosis_overlay` of this run, with its own findings by default.

        Args:
            findings: findings to draw (``Findings`` or their frame); default
                ``self.diagnose(split=split, epoch=epoch)``.
            measure: the measure drawn.
            split: the split drawn (and diagnosed by default).
            epoch: an epoch number, or negative to count from the end (-1, the last epoch).

        Example:
            >>> ds.probekit.diagnosis_overlay(epoch=0)
        """
        from probekit import plots

        ds = self._run()
        if findings is None:
            findings = diagnose(ds, split=split, epoch=epoch)
        frame = findings.to_frame() if isinstance(findings, Findings) else findings
        return plots.diagnosis_overlay(ds, frame, measure=measure, split=split, epoch=epoch)
