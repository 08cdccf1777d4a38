"""The probing engine: from a model and data to one epoch row of a run.

Data flows one way through its modules:

- :mod:`~probekit.engine.points`: probe points of a model (tracing or hooks), their
  names, shapes and depth, and the tracer's configuration (``tracer_kwargs=``);
- :mod:`~probekit.engine.reduce`: per-layer reductions of large feature maps;
- :mod:`~probekit.engine.extract`: one forward pass feeding every probe (graph or hooks);
- :mod:`~probekit.engine.features`: data splits in, cached reduced features out;
- :mod:`~probekit.engine.solver`: the batched L-BFGS every probe is fitted with;
- :mod:`~probekit.engine.probes`: softmax probes fitted to their optimum;
- :mod:`~probekit.engine.online`: online probes, one step per training step;
- :mod:`~probekit.engine.plan`: what a run will do, per layer, before any work;
- :mod:`~probekit.engine.monitor`: :class:`ProbeMonitor`, one epoch row at a time;
- :mod:`~probekit.engine.fixed`: :func:`probe` and :func:`probe_checkpoints` for fixed models;
- :mod:`~probekit.engine.training`: :func:`train_and_probe`, the one training loop;
- beside them, :mod:`~probekit.engine.devices` (device, threads, channels-last),
  :mod:`~probekit.engine.distributed` (data-parallel runs on ``torch.distributed``) and
  :mod:`~probekit.engine.checkpoints` (the one checkpoint loader).

The engine writes runs through :mod:`probekit.run` and never imports the
diagnosis, the charts or the explorers.
"""

from probekit.engine.checkpoints import load_checkpoint
from probekit.engine.fixed import probe, probe_checkpoints
from probekit.engine.monitor import ProbeMonitor
from probekit.engine.plan import Plan, plan
from probekit.engine.points import list_layers
from probekit.engine.training import train_and_probe

__all__ = ["Plan", "ProbeMonitor", "list_layers", "load_checkpoint", "plan", "probe", "probe_checkpoints", "train_and_probe"]
