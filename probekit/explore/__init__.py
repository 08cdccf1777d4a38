"""Explorers: small ipywidgets apps over probe runs, for JupyterLab.

:func:`explore` opens one run and :func:`compare` puts several on a common depth
axis. Each explorer is a state object with one owner, the explorer, which is also
the controller; views hold no data, and charts come from :mod:`probekit.plots`.

This package imports numpy, pandas, xarray, altair and ipywidgets, never torch.
"""

from probekit.explore.explorer import (
    CompareState, Comparison, ExploreState, Explorer, block_layers, compare, explore,
)

__all__ = ["CompareState", "Comparison", "ExploreState", "Explorer", "block_layers", "compare", "explore"]
