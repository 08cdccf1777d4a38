"""probekit: linear classifier probes for the intermediate layers of PyTorch models.

The method is Alain & Bengio, "Understanding intermediate layers using linear
classifier probes" (2016): one softmax classifier per probed layer, trained on
that layer's frozen features, shows how linearly separable each layer is,
across depth and across training time.

    >>> import probekit as pk
    >>> pk.list_layers(model, example_input)
    >>> ds = pk.probe(model, (train, valid, test), store="runs/a.zarr")
    >>> pk.open_run("runs/a.zarr")
    >>> pk.open_runs("runs/*.zarr")                 # many runs, lazily, along a ``run`` dimension

Heavy modules (torch) load on first use, so ``probekit.plots``, the explorers
and the run store readers work without importing torch. The package follows
the data's path: :mod:`probekit.engine` (model to epoch rows), :mod:`probekit.run`
(schema and store), :mod:`probekit.diagnosis`, :mod:`probekit.plots`,
:mod:`probekit.explorers`, with :mod:`probekit.data`, :mod:`probekit.zoo` and
:mod:`probekit.experiments` beside them (see ``docs/architecture.md``). Importing the package
registers the ``ds.probekit`` accessor on xarray datasets (``ds.probekit.diagnose()``).
"""

from __future__ import annotations

import importlib as _importlib

from probekit import accessor as _accessor  # noqa: F401 - registers ds.probekit (xarray and pandas only)

__version__ = "0.1.0"

_LAZY = {
    "list_layers": "probekit.engine",
    "plan": "probekit.engine",
    "Plan": "probekit.engine",
    "probe": "probekit.engine",
    "ProbeMonitor": "probekit.engine",
    "probe_checkpoints": "probekit.engine",
    "train_and_probe": "probekit.engine",
    "open_run": "probekit.run",
    "open_runs": "probekit.run",
    "StoreError": "probekit.run",
    "diagnose": "probekit.diagnosis",
    "Findings": "probekit.diagnosis",
    "explore": "probekit.explorers",
    "compare": "probekit.explorers",
    "Explorer": "probekit.explorers",
    "Comparison": "probekit.explorers",
    "cka": "probekit.engine.similarity",
}
#: Subpackages and modules reachable as attributes (``pk.data.digits()``, ``pk.experiments.reproduce("bypass")``).
_SUBMODULES = ("data", "diagnosis", "engine", "experiments", "explorers", "plots", "run", "zoo")

__all__ = sorted(_LAZY) + list(_SUBMODULES)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(_importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return _importlib.import_module(f"probekit.{name}")
    raise AttributeError(f"module 'probekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})
