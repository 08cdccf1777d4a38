"""probekit: linear classifier probes for the intermediate layers of PyTorch models.

The method is Alain & Bengio, "Understanding intermediate layers using linear
classifier probes" (2016): one softmax classifier per probed layer, trained on
that layer's frozen features, shows how linearly separable each layer is,
across depth and across training time.

    >>> import probekit as pk
    >>> pk.list_layers(model, example_input)
    >>> ds = pk.probe(model, (train, valid, test), store="runs/a.zarr")
    >>> pk.open_run("runs/a.zarr")

Heavy modules (torch) load on first use, so ``probekit.plots``, the explorers
and the run store readers work without importing torch. Importing the package
registers the ``ds.probekit`` accessor on xarray datasets (``ds.probekit.diagnose()``).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "list_layers": "probekit.layers",
    "plan": "probekit.engine",
    "probe": "probekit.engine",
    "ProbeMonitor": "probekit.engine",
    "probe_checkpoints": "probekit.engine",
    "open_run": "probekit.store",
    "train_and_probe": "probekit.training",
    "diagnose": "probekit.diagnosis",
    "Findings": "probekit.diagnosis",
    "explore": "probekit.explorers",
    "compare": "probekit.explorers",
    "reproduce": "probekit.reproductions",
}
#: Submodules reachable as attributes (``pk.data.digits()``, ``pk.zoo.resnet50()``).
_SUBMODULES = ("data", "zoo", "plots", "reduce", "store", "layers", "engine", "training", "diagnosis", "explorers",
               "reproductions")

__all__ = sorted(_LAZY)

from probekit import accessor  # noqa: E402,F401 - registers ds.probekit (xarray and pandas only)


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"probekit.{name}")
    raise AttributeError(f"module 'probekit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY) + list(_SUBMODULES))
