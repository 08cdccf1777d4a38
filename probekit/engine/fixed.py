"""Fixed models: ``probe`` (one model, probed to convergence) and ``probe_checkpoints`` (a series of snapshots)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import torch
import xarray as xr
from torch import nn

from probekit.engine.checkpoints import load_checkpoint
from probekit.engine.devices import placed, resolve_device, wants_channels_last
from probekit.engine.monitor import ProbeMonitor

Mode = Literal["snapshot", "online"]



def probe(
    model: nn.Module,
    data: object,
    *,
    layers: str | Sequence[str] | None = None,
    reduce: str | Mapping[str, str] | None = None,
    store: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    channels_last: bool | None = None,
    epoch: int = 0,
    step: int = -1,
    **options,
) -> xr.Dataset:
    """Probe a fixed model to convergence: one forward pass over the data, every probe fitted.

    Args:
        model: any ``nn.Module``; it is moved to ``device`` for the call and put
            back, with its parameters, buffers and train/eval flags unchanged.
        data: train/valid(/test) splits.
        layers, reduce: see :class:`ProbeMonitor`.
        store: Zarr store to write (optional).
        resume: with an existing complete store, return it without recomputing.
        overwrite: replace an existing store.
        device: ``"cuda"`` when available, else ``"cpu"``, by default.
        channels_last: channels-last memory for conv nets; default on CPU (faster there).
        epoch, step: the row's epoch and step labels.
        **options: any other :class:`ProbeMonitor` option (``num_classes``, ``l2``,
            ``batch_size``, ``budget``, ``seed``, ``quiet``, ...).

    Returns:
        The run: an ``xarray.Dataset`` with one epoch.

    Example:
        >>> ds = pk.probe(model, (train, valid, test), store="runs/a.zarr", reduce="pool")
        >>> ds.probe.sel(metric="valid_error").squeeze("epoch").to_series()
    """
    device = resolve_device(device)
    use_cl = wants_channels_last(model, device, channels_last)
    with placed(model, device, use_cl):
        with ProbeMonitor(model, data, layers=layers, reduce=reduce, store=store, resume=resume, overwrite=overwrite,
                          channels_last=use_cl, **options) as monitor:
            if not monitor.rows:
                monitor.update(epoch=epoch, step=step)
            return monitor.dataset


def probe_checkpoints(
    build_model: Callable[[], nn.Module],
    checkpoints: Sequence[str | os.PathLike],
    data: object,
    *,
    epochs: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    store: str | os.PathLike | None = None,
    resume: bool = False,
    device: str | torch.device | None = None,
    **options,
) -> xr.Dataset:
    """Probe a series of saved snapshots of one model, one epoch row each.

    Each checkpoint is a state dict (or a dict holding one under ``"model"``,
    ``"state_dict"`` or ``"model_state_dict"``), loaded with
    ``torch.load(weights_only=True)``: a file that carries code is refused.

    Args:
        build_model: returns a fresh model of the right architecture.
        checkpoints: paths, in training order.
        epochs, steps: labels of each checkpoint's row (default 0, 1, 2, ... and unknown).
        store, resume: as for :func:`probe`; resuming skips checkpoints already written.
        **options: any :class:`ProbeMonitor` option.

    Example:
        >>> ds = pk.probe_checkpoints(lambda: pk.zoo.paper_convnet(), ["c0.pt", "c1.pt"], data)
    """
    checkpoints = [Path(c) for c in checkpoints]
    if not checkpoints:
        raise ValueError("checkpoints= is empty; pass the paths of saved state dicts, in training order")
    missing = [str(c) for c in checkpoints if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint files not found: {missing[:3]}; check the paths")
    epochs = list(range(len(checkpoints))) if epochs is None else list(epochs)
    steps = [-1] * len(checkpoints) if steps is None else list(steps)
    if len(epochs) != len(checkpoints) or len(steps) != len(checkpoints):
        raise ValueError(f"epochs= and steps= need one entry per checkpoint ({len(checkpoints)})")
    device = resolve_device(device)
    model = build_model()
    load_checkpoint(model, checkpoints[0])
    model.to(device)
    use_cl = wants_channels_last(model, device, options.pop("channels_last", None))
    if use_cl:
        model.to(memory_format=torch.channels_last)
    with ProbeMonitor(model, data, store=store, resume=resume, channels_last=use_cl, **options) as monitor:
        for path, epoch, step in zip(checkpoints, epochs, steps):
            if monitor.rows and epoch <= monitor.rows[-1].epoch:
                continue
            load_checkpoint(model, path)
            monitor.update(epoch=epoch, step=step)
        return monitor.dataset


