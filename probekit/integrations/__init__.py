"""Callbacks that probe a model while a training framework trains it (optional extras).

- :mod:`probekit.integrations.lightning`: ``ProbeCallback`` for PyTorch Lightning 2.x
  (``pip install "probekit[lightning]"``);
- :mod:`probekit.integrations.hf`: ``ProbeCallback`` for Hugging Face ``transformers.Trainer``
  (``pip install "probekit[hf]"``);
- :mod:`probekit.integrations.probing`: what both share, one :class:`~probekit.ProbeMonitor`
  driven by a trainer's events.

Each callback module imports its framework on import, and only then: importing
:mod:`probekit` or this package imports neither Lightning nor transformers. The
integrations sit beside the data's path: they import the engine and the run,
and nothing imports them.
"""

__all__: list[str] = []
