"""The ``ds.probekit`` accessor: run-store methods on any dataset that follows the schema.

Importing this module registers the accessor with xarray (``import probekit``
does). Every method is a thin wrapper over :func:`probekit.diagnosis.diagnose`
or a chart of :mod:`probekit.plots`, with the run already passed:

    >>> ds = pk.open_run("runs/demo.zarr")
    >>> ds.probekit.errors()                 # valid error per layer, last epoch
    >>> ds.probekit.diagnose()               # findings (a table in a notebook)
    >>> ds.probekit.depth_profile(epoch=0)   # the paper's figure for one epoch

The accessor checks the dataset it wraps when it is first used: a dataset
that is not a run raises one line saying what is missing.

This module imports numpy, pandas and xarray (and Altair when a chart is
asked for), never torch.
"""

from __future__ import annotations

import pandas as pd
import xarray as xr

from probekit.diagnosis import Findings, check_run, diagnose
from probekit.run.schema import epoch_position

__all__ = ["ProbekitAccessor"]


@xr.register_dataset_accessor("probekit")
class ProbekitAccessor:
    """Run-store methods, as ``ds.probekit.<method>``; see the module docstring.

    Args:
        ds: a run (see ``docs/store.md``); anything else raises ``TypeError`` or ``ValueError``.

    Example:
        >>> pk.open_run("data/runs/bypass.zarr").probekit.diagnose().of("dead_segment")
    """

    def __init__(self, ds: xr.Dataset):
        check_run(ds)
        self._ds = ds

    def errors(self, split: str = "valid", epoch: int = -1) -> pd.Series:
        """The probes' error on ``split`` at ``epoch``, one value per layer in forward order.

        Args:
            split: ``"train"``, ``"valid"`` or ``"test"``.
            epoch: an epoch number, or a negative position (-1, the last epoch).

        Returns:
            A Series indexed by layer name, named ``"{split}_error"``; NaN where
            the layer's features were nonfinite.

        Example:
            >>> ds.probekit.errors("test", epoch=0).idxmin()
            'relu1'
        """
        ds = self._ds
        name = f"{split}_error"
        metrics = [str(m) for m in ds["metric"].values]
        if name not in metrics:
            splits = [m.rsplit("_", 1)[0] for m in metrics if m.endswith("_error")]
            raise ValueError(f"split={split!r} has no error in this run; choose from: {', '.join(splits)}")
        values = ds["probe"].sel(metric=name).isel(epoch=epoch_position(ds, epoch))
        series = values.to_series().astype(float)
        order = ds["depth"].to_series().sort_values(kind="stable").index
        series = series.reindex(order)
        series.index = pd.Index([str(v) for v in series.index], name="layer")
        series.name = name
        return series

    def diagnose(self, **options) -> Findings:
        """The run's findings: :func:`probekit.diagnosis.diagnose` with ``**options``.

        Example:
            >>> ds.probekit.diagnose(split="test", z=2.5)
        """
        return diagnose(self._ds, **options)

    def depth_profile(self, **options):
        """:func:`probekit.plots.depth_profile` of this run (a metric across layers at one epoch).

        Example:
            >>> ds.probekit.depth_profile(epoch=0, splits=("train", "valid", "test"))
        """
        from probekit import plots

        return plots.depth_profile(self._ds, **options)

    def heatmap(self, **options):
        """:func:`probekit.plots.heatmap` of this run (layer x epoch cells).

        Example:
            >>> ds.probekit.heatmap(measure="loss")
        """
        from probekit import plots

        return plots.heatmap(self._ds, **options)

    def training_curves(self, **options):
        """:func:`probekit.plots.training_curves` of this run (one line per layer over training).

        Example:
            >>> ds.probekit.training_curves(x="step")
        """
        from probekit import plots

        return plots.training_curves(self._ds, **options)

    def diagnosis_overlay(self, findings: Findings | pd.DataFrame | None = None, **options):
        """:func:`probekit.plots.diagnosis_overlay` of this run, with its own findings by default.

        Args:
            findings: findings to draw (``Findings`` or their frame); default
                ``self.diagnose(split=..., epoch=...)`` with the chart's split and epoch.
            **options: the chart's ``measure``, ``split`` and ``epoch``.

        Example:
            >>> ds.probekit.diagnosis_overlay(epoch=0)
        """
        from probekit import plots

        if findings is None:
            findings = diagnose(self._ds, split=options.get("split", "valid"), epoch=options.get("epoch", -1))
        frame = findings.to_frame() if isinstance(findings, Findings) else findings
        return plots.diagnosis_overlay(self._ds, frame, **options)
