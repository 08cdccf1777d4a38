"""Runs: the schema every reader shares, and the Zarr store that holds a run.

- :mod:`~probekit.run.schema`: names (splits, measures, metrics), the layout and
  row types, validation of a run dataset, epoch positions and layer order; it
  imports neither torch nor zarr.
- :mod:`~probekit.run.store`: the only module that touches files: Zarr, the
  writer's lock and atomic writes. It loads on first use, so readers of the
  schema alone never import zarr.
- :mod:`~probekit.run.many`: many runs as one lazy dataset along a ``run``
  dimension (:func:`open_runs`), built on the store's lazy reader.
"""

from __future__ import annotations

import importlib as _importlib

__all__ = ["StoreError", "StoreFullError", "StoreLockedError", "open_run", "open_runs"]


def __getattr__(name: str):
    if name == "open_runs":
        return _importlib.import_module("probekit.run.many").open_runs
    if name in __all__:
        return getattr(_importlib.import_module("probekit.run.store"), name)
    raise AttributeError(f"module 'probekit.run' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
