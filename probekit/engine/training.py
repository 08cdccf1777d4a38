"""The package's one training loop, and :func:`train_and_probe`: train a model while a monitor probes it, resumably.

:func:`train_epoch` is the loop itself: one pass of minibatch training over a
loader, with an optional callback after every minibatch and an optional step
to stop at. :func:`train_and_probe` (behind ``probekit demo`` and ``probekit
run``) and the paper's reproductions (:mod:`probekit.experiments`, which probe
at given minibatch steps) both train through it; your own loop can do the same
with a :class:`~probekit.engine.ProbeMonitor` and a few lines.

Each epoch ``e`` of :func:`train_and_probe` (0 is the untrained model) ends
with a checkpoint of the model and optimiser, written atomically beside the
store by :func:`probekit.run.store.write_atomic`, and only then with the
monitor's epoch row. A run killed at any moment therefore resumes
(``resume=True``) from its last checkpoint, and because shuffling and dropout
are seeded per epoch, the resumed run writes the same values as one that was
never interrupted.

Under ``torch.distributed`` (e.g. ``torchrun -m probekit run``) every rank
trains the same replica of the model from the same seeds (the training loop
itself is not data-parallel: wrap the model in ``DistributedDataParallel`` in
your own loop for that) and rank 0's parameters are copied to every rank
before each epoch's probes, which are data-parallel. Only rank 0 writes the
checkpoint and reads it on resume; it sends its state to the other ranks. This module never imports the diagnosis, the charts, the
explorers, the data or the zoo.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import xarray as xr
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from probekit.engine import distributed
from probekit.engine.batch import MASK_KEY
from probekit.engine.checkpoints import safe_load
from probekit.engine.devices import resolve_device
from probekit.engine.features import DEFAULT_CACHE_BYTES, as_splits
from probekit.engine.monitor import ProbeMonitor
from probekit.engine.reduce import DEFAULT_BUDGET, DEFAULT_MAX_FLATTEN
from probekit.params import Interval, Options, check_params
from probekit.run.store import exists, remove, store_location, write_atomic

__all__ = ["EpochResult", "Minibatch", "resume_path", "train_and_probe", "train_epoch"]

#: What :func:`train_and_probe`'s own arguments may be (the monitor checks the ones it receives).
_CONSTRAINTS = {
    "epochs": [Interval(int, 0, None)],
    "optimizer": [Options("sgd", "adam")],
    "lr": [Interval(float, 0, None, closed="neither")],
    "momentum": [Interval(float, 0, None)],
    "train_batch_size": [Interval(int, 1, None)],
}


@dataclass(frozen=True)
class Minibatch:
    """One minibatch just trained on, as :func:`train_epoch` passes it to its ``on_step`` callback."""

    step: int
    """Global step after this minibatch (minibatches trained on so far)."""
    loss: float
    """The model's mean loss on the minibatch."""
    error: float
    """Share of the minibatch the model misclassified."""
    labels: torch.Tensor
    """The minibatch's labels (on the training device)."""


@dataclass(frozen=True)
class EpochResult:
    """What one call of :func:`train_epoch` did."""

    loss: float
    """Mean loss per example over the minibatches trained on (NaN if none)."""
    error: float
    """Share of those examples the model misclassified (NaN if none)."""
    step: int
    """Global step after the last minibatch."""


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loader: Iterable,
    *,
    device: torch.device,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    step: int = 0,
    stop_at: int | None = None,
    on_step: Callable[[Minibatch], None] | None = None,
) -> EpochResult:
    """One pass of minibatch training over ``loader``: the package's one training loop.

    The model is put in training mode; each ``(x, y)`` minibatch is moved to
    ``device``, scored by ``loss_fn`` (a model returning a tuple, like Inception
    v3 in training mode, is scored on its first output) and stepped by
    ``optimizer``. A loss that is not finite stops training with a
    ``FloatingPointError``.

    Args:
        model: the model to train (in place).
        optimizer: its optimiser.
        loader: an iterable of ``(x, y)`` minibatches, e.g. a shuffling ``DataLoader``.
        device: where the model is.
        loss_fn: the model's loss; ``F.cross_entropy`` by default.
        step: the global step before this pass (minibatches already trained on).
        stop_at: stop as soon as the global step reaches this, mid-pass if need be.
        on_step: called after every minibatch with a :class:`Minibatch` (to probe
            at chosen steps, or step online probes).

    Returns:
        An :class:`EpochResult`: mean loss and error per example, and the new global step.

    Example:
        >>> loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
        >>> result = train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.01), loader, device=torch.device("cpu"))
        >>> result.loss, result.step
    """
    loss_fn = loss_fn or F.cross_entropy
    model.train()
    total_loss = total_error = seen = 0.0
    for x, y in ([] if stop_at is not None and step >= stop_at else loader):
        x, y = x.to(device), y.to(device).long()
        optimizer.zero_grad()
        out = model(x)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        loss = loss_fn(logits, y)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"the model's training loss became {value} at step {step}; lower the learning rate")
        loss.backward()
        optimizer.step()
        step += 1
        wrong = (logits.argmax(1) != y).sum().item()
        total_loss += value * y.shape[0]
        total_error += wrong
        seen += y.shape[0]
        if on_step is not None:
            on_step(Minibatch(step=step, loss=value, error=wrong / y.shape[0], labels=y))
        if stop_at is not None and step >= stop_at:
            break
    if not seen:
        return EpochResult(loss=float("nan"), error=float("nan"), step=step)
    return EpochResult(loss=total_loss / seen, error=total_error / seen, step=step)


def resume_path(store: str | os.PathLike) -> Path | str:
    """Where the training checkpoint of the run in ``store`` lives (beside it, not in it): a path, or a URL beside a URL.

    Example:
        >>> resume_path("runs/demo.zarr"), resume_path("s3://bucket/runs/demo.zarr")
        (PosixPath('runs/.demo.zarr.resume.pt'), 's3://bucket/runs/.demo.zarr.resume.pt')
    """
    location = store_location(store)
    if isinstance(location, Path):
        return location.with_name(f".{location.name}.resume.pt")
    parent, _, name = location.rpartition("/")
    return f"{parent}/.{name}.resume.pt"


def _train_dataset(split: object) -> Dataset:
    if isinstance(split, Dataset):
        return split
    if isinstance(split, DataLoader):
        return split.dataset
    x, y = split
    return TensorDataset(torch.as_tensor(x), torch.as_tensor(y))


def _load_resume(path: Path | str, storage_options: Mapping[str, object] | None) -> dict:
    state = safe_load(path, storage_options=storage_options)
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "step"} <= set(state):
        raise ValueError(f"{str(path)!r} is not a probekit training checkpoint; delete it and run without --resume")
    return state


def train_and_probe(
    model: nn.Module,
    data: object,
    *,
    epochs: int,
    store: str | os.PathLike | None = None,
    storage_options: Mapping[str, object] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    optimizer: Literal["sgd", "adam"] = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    train_batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    layers: str | Sequence[str] | None = None,
    reduce: str | Mapping[str, str] | None = None,
    mode: Literal["snapshot", "online"] = "snapshot",
    num_classes: int | None = None,
    l2: float | str = "auto",
    baselines: str | Sequence[str] | None = None,
    groups: Mapping[str, object] | None = None,
    repeats: int = 1,
    metrics: str | Sequence[str] | None = None,
    probe_lr: float = 1e-3,
    batch_size: int = 256,
    budget: int = DEFAULT_BUDGET,
    max_flatten: int = DEFAULT_MAX_FLATTEN,
    max_iter: int = 1000,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    quiet: bool = False,
    model_name: str | None = None,
    dataset_name: str | None = None,
    channels_last: bool = False,
    tracer_kwargs: Mapping[str, object] | None = None,
    label_key: str | None = None,
    mask_key: str = MASK_KEY,
    autocast: str | torch.dtype | None = None,
) -> xr.Dataset:
    """Train ``model`` for ``epochs`` epochs, probing it before training and after each epoch.

    Two learning rates, two optimisers: ``lr`` (with ``optimizer`` and
    ``momentum``) trains the model; ``probe_lr`` trains the online probes
    (``mode="online"``; snapshot probes are fitted to their optimum and need none).

    Args:
        model: the model to train (trained in place).
        data: train/valid(/test) splits; the model trains on ``train``.
        epochs: training epochs; the run has ``epochs + 1`` rows (0 = untrained).
        store: Zarr store of the run, a folder or an fsspec URL; its checkpoint is kept beside it for resuming.
        storage_options: the fsspec filesystem's options for a URL ``store`` (see :class:`~probekit.engine.ProbeMonitor`).
        resume: continue a killed or finished run from its checkpoint.
        overwrite: replace an existing store.
        optimizer: the model's optimiser, ``"sgd"`` (with ``momentum``; 0 gives plain SGD) or ``"adam"``.
        lr: the model's learning rate (not the probes': see ``probe_lr``).
        momentum: SGD momentum of the model's optimiser.
        train_batch_size: the model's training minibatch size.
        seed: seeds shuffling and dropout per epoch, and the probes' random reductions.
        device: where the model trains (default: CUDA when available).
        loss_fn: the model's loss, ``F.cross_entropy`` by default (a model returning
            a tuple, like Inception v3 in training mode, is scored on its first output).
        layers: probe points (see :class:`~probekit.engine.ProbeMonitor`); default the model's ``probe_layers``.
        reduce: reduction for every layer, or ``{layer: spec}``.
        mode: ``"snapshot"`` (probes fitted after each epoch) or ``"online"`` (one probe
            step per training minibatch, with ``probe_lr``).
        num_classes: classes; when given it wins over the number the data implies.
        l2: the probes' L2 strength, or ``"auto"`` (the default): chosen per layer and epoch on a
            held-out fold of the training split (online: parallel heads; see :class:`~probekit.engine.ProbeMonitor`).
        baselines, groups, repeats, metrics: the run's controls (snapshot mode; see
            :class:`~probekit.engine.ProbeMonitor`): ``baselines=["random_init", "control"]``,
            the control task's ``groups=``, ``repeats=K`` bootstrap refits, ``metrics=["mdl"]``.
        probe_lr: the online probes' learning rate (never the model's: see ``lr``).
        batch_size: the probes' feature-extraction batch size (not the training one: see ``train_batch_size``).
        budget, max_flatten: limits of the automatic reduction.
        max_iter: most L-BFGS iterations per probe fit.
        cache_bytes: above this, cached features go to disk.
        quiet: no progress bars, plan printout or epoch lines.
        model_name, dataset_name: names recorded in the run.
        channels_last: the model's tensors are in channels-last memory.
        tracer_kwargs: options of torchvision's FX tracer (e.g. ``leaf_modules``), passed to the monitor.
        label_key, mask_key: the probes' label key of mapping rows and the mask key of mapping
            batches (see :class:`~probekit.engine.ProbeMonitor`); the training loop itself takes
            ``(x, y)`` minibatches.
        autocast: the probes' forward passes (not the training steps) under ``torch.autocast``:
            ``"bf16"``, ``"fp16"`` (or the dtype), ``None`` (the default) off; fits read float32
            features either way (see :class:`~probekit.engine.ProbeMonitor`).

    Returns:
        The run dataset.

    Example:
        >>> ds = train_and_probe(pk.zoo.paper_convnet(input_size=8), pk.data.digits(), epochs=3, store="runs/c.zarr",
        ...                      lr=0.05, probe_lr=1e-3, mode="online")
    """
    check_params(_CONSTRAINTS, epochs=epochs, optimizer=optimizer, lr=lr, momentum=momentum,
                 train_batch_size=train_batch_size)
    comm = distributed.current()  # under torchrun: the group (and each rank's GPU) before the model is placed
    device = resolve_device(device)
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=lr, momentum=momentum) if optimizer == "sgd"
           else torch.optim.Adam(params, lr=lr))
    train_set = _train_dataset(as_splits(data)["train"])
    checkpoint = resume_path(store) if store is not None else None
    files = {"storage_options": storage_options}
    writes = comm is None or comm.root  # rank 0 alone writes and reads the checkpoint
    if writes and checkpoint is not None and not resume and exists(checkpoint, **files) and not exists(store, **files):
        remove(checkpoint, **files)
    own_checkpoint = checkpoint if writes else None

    def save(**fields) -> None:  # rank 0 writes; a failure there (a full disk) stops every rank at this call
        def work() -> None:
            _checkpoint(own_checkpoint, storage_options, model, opt, **fields)

        if comm is None:
            work()
        else:
            comm.on_root(work)

    def sync() -> None:
        if comm is not None:
            comm.copy_module(model)

    with ProbeMonitor(
        model, data, layers=layers, reduce=reduce, store=store, storage_options=storage_options, mode=mode,
        resume=resume, overwrite=overwrite,
        num_classes=num_classes, l2=l2, baselines=baselines, groups=groups, repeats=repeats, metrics=metrics,
        probe_lr=probe_lr, batch_size=batch_size, budget=budget,
        max_flatten=max_flatten, seed=seed, max_iter=max_iter, cache_bytes=cache_bytes, quiet=quiet,
        model_name=model_name, dataset_name=dataset_name, channels_last=channels_last, tracer_kwargs=tracer_kwargs,
        label_key=label_key, mask_key=mask_key, autocast=autocast,
    ) as monitor:
        start, step = 0, 0
        if monitor.rows:
            def read() -> dict:
                if checkpoint is None or not exists(checkpoint, **files):
                    raise ValueError(
                        f"cannot resume training of {str(store)!r}: its checkpoint {str(checkpoint)!r} is missing; "
                        "start again with overwrite=True (--overwrite)"
                    )
                return _load_resume(checkpoint, storage_options)

            state = read() if comm is None else comm.broadcast(comm.on_root(read))
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            start, step = int(state["epoch"]), int(state["step"])
            if start < monitor.rows[-1].epoch:
                raise ValueError(f"checkpoint {str(checkpoint)!r} is older (epoch {start}) than the store; start again with overwrite=True")
            if start == monitor.rows[-1].epoch:
                start += 1
            else:  # killed between the checkpoint and its row: write that row now
                monitor.update(epoch=start, step=step, model_loss=state.get("model_loss"), model_error=state.get("model_error"))
                start += 1
        else:
            sync()
            save(epoch=0, step=0)
            monitor.update(epoch=0, step=0)
            start = 1
        on_step = (lambda batch: monitor.step(batch.labels)) if mode == "online" else None
        for epoch in range(start, epochs + 1):
            epoch_seed = seed * 100_003 + epoch
            loader = DataLoader(train_set, batch_size=train_batch_size, shuffle=True,
                                generator=torch.Generator().manual_seed(epoch_seed))
            torch.manual_seed(epoch_seed)  # dropout
            result = train_epoch(model, opt, loader, device=device, loss_fn=loss_fn, step=step, on_step=on_step)
            step = result.step
            sync()
            save(epoch=epoch, step=step, model_loss=result.loss, model_error=result.error)
            row = monitor.update(epoch=epoch, step=step, model_loss=result.loss, model_error=result.error)
            if not monitor.quiet:
                print(_epoch_line(row, epochs))
        return monitor.dataset


def _epoch_line(row: xr.Dataset, epochs: int) -> str:
    """One line per epoch: the model's own figures and the best probe."""
    metric = "valid_error" if "valid_error" in row["metric"].values else "train_error"
    errors = row["probe"].sel(metric=metric).isel(epoch=0)
    best = errors.fillna(float("inf")).argmin("layer").item()
    return (
        f"epoch {int(row.epoch.values[0])}/{epochs}: model loss {float(row.model_loss.values[0]):.4f}, "
        f"model training error {float(row.model_error.values[0]):.3f}; lowest probe {metric} "
        f"{float(errors.values[best]):.3f} at {str(row.layer.values[best])!r}"
    )


def _checkpoint(path: Path | str | None, storage_options: Mapping[str, object] | None, model: nn.Module,
                opt: torch.optim.Optimizer, **info) -> None:
    if path is not None:
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), **info}, buffer)
        write_atomic(path, buffer.getvalue(), storage_options=storage_options)
