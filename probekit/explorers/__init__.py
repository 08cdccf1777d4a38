"""Explorers: small ipywidgets apps over probe runs, for JupyterLab.

:func:`explore` opens one run and :func:`compare` puts several on a common depth
axis; both take many runs opened together (:func:`probekit.open_runs`, a ``run``
dimension): explore shows one at a time, with a run menu. Each explorer is a state object with one owner, the explorer, which is also
the controller; views hold no data, and charts come from :mod:`probekit.plots`.

The package follows the app's parts: ``selection`` (which layers a shortcut
keeps), ``live`` (reading stores, live off the event loop), ``widgets`` (the
views), ``explorer`` (one run), ``compare`` (several runs) and ``board`` (a run
picker over one run's explorer, with the comparison: the dashboard's page).

This package imports numpy, pandas, xarray, altair and ipywidgets: never torch.
"""

from probekit.explorers.compare import CompareState, Comparison, compare
from probekit.explorers.explorer import ExploreState, Explorer, explore
from probekit.explorers.selection import merge_layers

__all__ = ["CompareState", "Comparison", "ExploreState", "Explorer", "compare", "explore", "merge_layers"]
