"""Fixed models: ``probe`` (one model, probed to convergence) and ``probe_checkpoints`` (a series of snapshots).

Both run one :class:`~probekit.engine.monitor.ProbeMonitor` in snapshot mode and
take its parameters by name; this module owns only placing the model on its
device for the call and walking the checkpoints. It never imports the
diagnosis, the charts or the explorers.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import xarray as xr
from torch import nn

from probekit.engine.batch import MASK_KEY
from probekit.engine import distributed
from probekit.engine.checkpoints import load_checkpoint
from probekit.engine.devices import placed, resolve_device, wants_channels_last
from probekit.engine.features import DEFAULT_CACHE_BYTES
from probekit.engine.monitor import MONITOR_CONSTRAINTS, UPDATE_CONSTRAINTS, ProbeMonitor
from probekit.engine.reduce import DEFAULT_BUDGET, DEFAULT_MAX_FLATTEN
from probekit.params import check_params

__all__ = ["probe", "probe_checkpoints"]

#: The monitor's checks, less its mode (these calls fit every probe to its optimum, so they
#: have no online probes and no probe_lr), with the device and the row's labels.
_SHARED = {k: v for k, v in MONITOR_CONSTRAINTS.items() if k not in ("mode", "probe_lr", "channels_last")}
_PLACEMENT = {"device": [str, torch.device, None], "channels_last": [bool, None]}
_PROBE_CONSTRAINTS = {**_SHARED, **_PLACEMENT, **UPDATE_CONSTRAINTS}
_CHECKPOINTS_CONSTRAINTS = {
    **{k: v for k, v in _SHARED.items() if k != "model"}, **_PLACEMENT,
    "build_model": [Callable],
}


def probe(
    model: nn.Module,
    data: object,
    *,
    layers: str | Sequence[str] | None = None,
    reduce: str | Mapping[str, str] | None = None,
    store: str | os.PathLike | None = None,
    storage_options: Mapping[str, object] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    num_classes: int | None = None,
    l2: float | str = "auto",
    baselines: str | Sequence[str] | None = None,
    groups: Mapping[str, object] | None = None,
    repeats: int = 1,
    metrics: str | Sequence[str] | None = None,
    batch_size: int = 256,
    budget: int = DEFAULT_BUDGET,
    max_flatten: int = DEFAULT_MAX_FLATTEN,
    seed: int = 0,
    max_iter: int = 1000,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    quiet: bool = False,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tracer_kwargs: Mapping[str, object] | None = None,
    layouts: Mapping[str, str] | None = None,
    label_key: str | None = None,
    mask_key: str = MASK_KEY,
    device: str | torch.device | None = None,
    channels_last: bool | None = None,
    autocast: str | torch.dtype | None = None,
    epoch: int = 0,
    step: int | None = None,
) -> xr.Dataset:
    """Probe a fixed model to convergence: one forward pass over the data, every probe fitted.

    Args:
        model: any ``nn.Module``; it is moved to ``device`` for the call and put
            back, with its parameters, buffers and train/eval flags unchanged.
        data: train/valid(/test) splits (see :mod:`probekit.engine.features`).
        layers: probe point names (see :func:`probekit.list_layers`), ``"blocks"`` or ``"all"``;
            default: the model's ``probe_layers`` attribute, else ``"blocks"``.
        reduce: one reduction for every layer or ``{layer: spec}`` (see :mod:`probekit.engine.reduce`).
        store: Zarr store to write: a folder, or an fsspec URL (``s3://bucket/run.zarr``,
            ``memory://run.zarr``; see docs/store.md); ``None`` keeps the run in memory only.
        storage_options: the fsspec filesystem's options for a URL ``store`` (see :class:`ProbeMonitor`).
        resume: with an existing complete store, return it without recomputing.
        overwrite: replace an existing store.
        num_classes: classes of the probing task; when not given, ``data.info.num_classes``,
            else inferred from the labels.
        l2: probe L2 strength (per example, standardised features), or ``"auto"`` (the default):
            chosen per layer on a held-out fold of the training split (see :class:`ProbeMonitor`).
        baselines: ``["random_init", "control"]`` or a subset: the run's baselines (see :class:`ProbeMonitor`).
        groups: the control task's example types, ``{split: one integer per example}``.
        repeats: fits per probe on bootstrap resamples (more than 1 adds ``probe_repeat``).
        metrics: optional measures, e.g. ``["mdl"]`` (online code length and compression).
        batch_size: extraction batch size for splits that are not DataLoaders.
        budget: the ``"auto"`` reduction's feature budget per probe.
        max_flatten: largest layer ``"flatten"`` accepts.
        seed: seed of random reductions (recorded in the store).
        max_iter: most L-BFGS iterations per probe fit.
        cache_bytes: above this many bytes, cached features go to disk (on a GPU the default is half its
            free memory, so that features stay on the device when they fit).
        quiet: no progress display and no plan printout.
        model_name: the model's name recorded in the run (default: its class name).
        dataset_name: the data's name recorded in the run (default: ``data.info.name``, else ``"user data"``).
        tracer_kwargs: added to the tracer's defaults (see :func:`probekit.list_layers`).
        layouts: ``{layer: "map" | "tokens" | "vector"}`` where the inferred layout is wrong or unknown.
        label_key: the key of a row's label, for data whose items are mappings (e.g. Hugging Face
            ``datasets`` rows); the model's keyword arguments are all the other keys.
        mask_key: the key of a mapping batch's mask of real tokens (``"attention_mask"``).
        device: ``"cuda"`` when available, else ``"cpu"``, by default.
        channels_last: channels-last memory for conv nets; default on CPU (faster there).
        autocast: run the forward pass under ``torch.autocast``: ``"bf16"``, ``"fp16"`` (or the
            dtype); ``None`` (the default) is off. The probes are fitted on float32 features either
            way; the run's ``autocast`` attribute records the setting (see :class:`ProbeMonitor`).
        epoch: the row's epoch number (0 or more).
        step: the row's training step; ``None`` when unknown.

    Under ``torch.distributed`` (an initialised group, or ``torchrun``'s
    environment) every rank calls ``probe`` with the same model and data and
    probes its own shard; every rank returns the run, which only rank 0 writes
    (see :class:`ProbeMonitor`).

    Returns:
        The run: an ``xarray.Dataset`` with one epoch.

    Example:
        >>> ds = pk.probe(model, (train, valid, test), store="runs/a.zarr", reduce="pool")
        >>> ds.probe.sel(metric="valid_error").squeeze("epoch").to_series()
    """
    check_params(
        _PROBE_CONSTRAINTS, model=model, tracer_kwargs=tracer_kwargs, layouts=layouts, num_classes=num_classes, budget=budget,
        max_flatten=max_flatten, seed=seed, store=store, storage_options=storage_options, resume=resume,
        overwrite=overwrite, l2=l2, baselines=baselines, groups=groups, repeats=repeats, metrics=metrics,
        batch_size=batch_size, max_iter=max_iter, cache_bytes=cache_bytes, quiet=quiet, model_name=model_name,
        dataset_name=dataset_name, device=device, channels_last=channels_last, epoch=epoch, step=step,
        label_key=label_key, mask_key=mask_key, autocast=autocast,
    )
    distributed.current()  # under torchrun: the group (and each rank's GPU) before the model is placed
    device = resolve_device(device)
    use_cl = wants_channels_last(model, device, channels_last)
    with placed(model, device, use_cl):
        with ProbeMonitor(
            model, data, layers=layers, reduce=reduce, store=store, storage_options=storage_options, resume=resume,
            overwrite=overwrite,
            num_classes=num_classes, l2=l2, baselines=baselines, groups=groups, repeats=repeats, metrics=metrics,
            batch_size=batch_size, budget=budget, max_flatten=max_flatten, seed=seed,
            max_iter=max_iter, cache_bytes=cache_bytes, quiet=quiet, model_name=model_name, dataset_name=dataset_name,
            channels_last=use_cl, tracer_kwargs=tracer_kwargs, layouts=layouts, label_key=label_key, mask_key=mask_key,
            autocast=autocast,
        ) as monitor:
            if not monitor.rows:
                monitor.update(epoch=epoch, step=step)
            return monitor.dataset


def probe_checkpoints(
    build_model: Callable[[], nn.Module],
    checkpoints: Sequence[str | os.PathLike],
    data: object,
    *,
    epochs: Sequence[int] | None = None,
    steps: Sequence[int | None] | None = None,
    layers: str | Sequence[str] | None = None,
    reduce: str | Mapping[str, str] | None = None,
    store: str | os.PathLike | None = None,
    storage_options: Mapping[str, object] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    num_classes: int | None = None,
    l2: float | str = "auto",
    baselines: str | Sequence[str] | None = None,
    groups: Mapping[str, object] | None = None,
    repeats: int = 1,
    metrics: str | Sequence[str] | None = None,
    batch_size: int = 256,
    budget: int = DEFAULT_BUDGET,
    max_flatten: int = DEFAULT_MAX_FLATTEN,
    seed: int = 0,
    max_iter: int = 1000,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    quiet: bool = False,
    model_name: str | None = None,
    dataset_name: str | None = None,
    tracer_kwargs: Mapping[str, object] | None = None,
    layouts: Mapping[str, str] | None = None,
    label_key: str | None = None,
    mask_key: str = MASK_KEY,
    device: str | torch.device | None = None,
    channels_last: bool | None = None,
    autocast: str | torch.dtype | None = None,
) -> xr.Dataset:
    """Probe a series of saved snapshots of one model, one epoch row each.

    Each checkpoint is read by :func:`probekit.engine.checkpoints.load_checkpoint`
    (``torch.load(weights_only=True)``: a file that carries code is refused).

    Args:
        build_model: returns a fresh model of the right architecture.
        checkpoints: paths, in training order.
        epochs: each checkpoint's epoch number (default 0, 1, 2, ...).
        steps: each checkpoint's training step (default: unknown, ``None``).
        store, storage_options, resume: as for :func:`probe`; resuming skips checkpoints already written.

    The other arguments (``layers``, ``reduce``, ``overwrite``, ``num_classes``, ``l2``, ``baselines``, ``groups``,
    ``repeats``, ``metrics``, ``batch_size``, ``budget``, ``max_flatten``, ``seed``, ``max_iter``, ``cache_bytes``,
    ``quiet``, ``model_name``, ``dataset_name``, ``tracer_kwargs``, ``layouts``, ``label_key``, ``mask_key``,
    ``device``, ``channels_last``, ``autocast``) are as for :func:`probe`.

    Example:
        >>> ds = pk.probe_checkpoints(lambda: pk.zoo.paper_convnet(), ["c0.pt", "c1.pt"], data, steps=[0, 500])
    """
    check_params(
        _CHECKPOINTS_CONSTRAINTS, build_model=build_model, tracer_kwargs=tracer_kwargs, layouts=layouts,
        num_classes=num_classes, budget=budget, max_flatten=max_flatten, seed=seed, store=store,
        storage_options=storage_options, resume=resume,
        overwrite=overwrite, l2=l2, baselines=baselines, groups=groups, repeats=repeats, metrics=metrics,
        batch_size=batch_size, max_iter=max_iter, cache_bytes=cache_bytes, quiet=quiet,
        model_name=model_name, dataset_name=dataset_name, device=device, channels_last=channels_last,
        label_key=label_key, mask_key=mask_key, autocast=autocast,
    )
    checkpoints = [Path(c) for c in checkpoints]
    if not checkpoints:
        raise ValueError("checkpoints= is empty; pass the paths of saved state dicts, in training order")
    missing = [str(c) for c in checkpoints if not c.is_file()]
    if missing:
        raise FileNotFoundError(f"checkpoint files not found: {missing[:3]}; check the paths")
    epochs = list(range(len(checkpoints))) if epochs is None else list(epochs)
    distributed.current()  # under torchrun: the group (and each rank's GPU) before the model is placed
    steps = [None] * len(checkpoints) if steps is None else list(steps)
    if len(epochs) != len(checkpoints) or len(steps) != len(checkpoints):
        raise ValueError(
            f"epochs= and steps= need one entry per checkpoint ({len(checkpoints)}); got {len(epochs)} and {len(steps)}"
        )
    device = resolve_device(device)
    model = build_model()
    load_checkpoint(model, checkpoints[0])
    model.to(device)
    use_cl = wants_channels_last(model, device, channels_last)
    if use_cl:
        model.to(memory_format=torch.channels_last)
    with ProbeMonitor(
        model, data, layers=layers, reduce=reduce, store=store, storage_options=storage_options, resume=resume,
        overwrite=overwrite,
        num_classes=num_classes, l2=l2, baselines=baselines, groups=groups, repeats=repeats, metrics=metrics,
        batch_size=batch_size, budget=budget, max_flatten=max_flatten, seed=seed,
        max_iter=max_iter, cache_bytes=cache_bytes, quiet=quiet, model_name=model_name, dataset_name=dataset_name,
        channels_last=use_cl, tracer_kwargs=tracer_kwargs, layouts=layouts, label_key=label_key, mask_key=mask_key,
        autocast=autocast,
    ) as monitor:
        for path, epoch, step in zip(checkpoints, epochs, steps):
            if monitor.rows and epoch <= monitor.rows[-1].epoch:
                continue
            load_checkpoint(model, path)
            monitor.update(epoch=epoch, step=step)
        return monitor.dataset
