"""Train a model while a :class:`~probekit.engine.ProbeMonitor` probes it, resumably.

This is the loop behind ``probekit demo`` and ``probekit run``; your own loop
can do the same with a monitor and a few lines. Each epoch ``e`` (0 is the
untrained model) ends with a checkpoint of the model and optimiser, written
atomically beside the store, and only then with the monitor's epoch row. A
run killed at any moment therefore resumes (``resume=True``) from its last
checkpoint, and because shuffling and dropout are seeded per epoch, the
resumed run writes the same values as one that was never interrupted.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch
import xarray as xr
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset

from probekit.engine.devices import resolve_device
from probekit.engine.monitor import ProbeMonitor
from probekit.engine.features import as_splits


def resume_path(store: str | os.PathLike) -> Path:
    """Where the training checkpoint of the run in ``store`` lives (beside it, not in it)."""
    store = Path(store)
    return store.with_name(f".{store.name}.resume.pt")


def _train_dataset(split: object) -> Dataset:
    if isinstance(split, Dataset):
        return split
    if isinstance(split, DataLoader):
        return split.dataset
    x, y = split
    return TensorDataset(torch.as_tensor(x), torch.as_tensor(y))


def _save_atomic(state: dict, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_resume(path: Path) -> dict:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not {"model", "optimizer", "epoch", "step"} <= set(state):
        raise ValueError(f"{str(path)!r} is not a probekit training checkpoint; delete it and run without --resume")
    return state


def train_and_probe(
    model: nn.Module,
    data: object,
    *,
    epochs: int,
    store: str | os.PathLike | None = None,
    resume: bool = False,
    overwrite: bool = False,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.9,
    train_batch_size: int = 64,
    seed: int = 0,
    device: str | torch.device | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    **monitor_options,
) -> xr.Dataset:
    """Train ``model`` for ``epochs`` epochs, probing it before training and after each epoch.

    Args:
        model: the model to train (trained in place).
        data: train/valid(/test) splits; the model trains on ``train``.
        epochs: training epochs; the run has ``epochs + 1`` rows (0 = untrained).
        store: Zarr store of the run; its checkpoint is kept beside it for resuming.
        resume: continue a killed or finished run from its checkpoint.
        overwrite: replace an existing store.
        optimizer: ``"sgd"`` (with ``momentum``; 0 gives plain SGD) or ``"adam"``.
        lr: learning rate.
        train_batch_size: training minibatch size.
        seed: seeds shuffling and dropout per epoch (and the probes' reductions).
        device: where the model trains (default: CUDA when available).
        loss_fn: the model's loss, ``F.cross_entropy`` by default (a model returning
            a tuple, like Inception v3 in training mode, is scored on its first output).
        **monitor_options: options of :class:`~probekit.engine.ProbeMonitor`.

    Returns:
        The run dataset.

    Example:
        >>> ds = train_and_probe(pk.zoo.paper_convnet(input_size=8), pk.data.digits(), epochs=3, store="runs/c.zarr")
    """

    if epochs < 0:
        raise ValueError(f"epochs must be >= 0; got {epochs}")
    if optimizer not in ("sgd", "adam"):
        raise ValueError(f"optimizer must be 'sgd' or 'adam'; got {optimizer!r}")
    device = resolve_device(device)
    loss_fn = loss_fn or F.cross_entropy
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.SGD(params, lr=lr, momentum=momentum) if optimizer == "sgd"
           else torch.optim.Adam(params, lr=lr))
    splits = as_splits(data)
    train_set = _train_dataset(splits["train"])
    checkpoint = resume_path(store) if store is not None else None
    if checkpoint is not None and not resume and checkpoint.exists() and not Path(store).exists():
        checkpoint.unlink()

    with ProbeMonitor(model, data, store=store, resume=resume, overwrite=overwrite, seed=seed, **monitor_options) as monitor:
        start, step = 0, 0
        if monitor.rows:
            if checkpoint is None or not checkpoint.exists():
                raise ValueError(
                    f"cannot resume training of {str(store)!r}: its checkpoint {str(checkpoint)!r} is missing; "
                    "start again with overwrite=True (--overwrite)"
                )
            state = _load_resume(checkpoint)
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
            _checkpoint(checkpoint, model, opt, epoch=0, step=0)
            monitor.update(epoch=0, step=0)
            start = 1
        for epoch in range(start, epochs + 1):
            loss, error, step = _train_epoch(model, opt, train_set, loss_fn, epoch=epoch, seed=seed, step=step,
                                             batch_size=train_batch_size, device=device)
            _checkpoint(checkpoint, model, opt, epoch=epoch, step=step, model_loss=loss, model_error=error)
            row = monitor.update(epoch=epoch, step=step, model_loss=loss, model_error=error)
            if not monitor.quiet:
                print(_epoch_line(row, epochs))
        return monitor.dataset


def _epoch_line(row: xr.Dataset, epochs: int) -> str:
    """One line per epoch: the model's own figures and the best probe."""
    metric = "valid_error" if "valid_error" in row["metric"].values else "train_error"
    errors = row["probe"].sel(metric=metric).isel(epoch=0)
    best = errors.fillna(float("inf")).argmin().item()
    return (
        f"epoch {int(row.epoch.values[0])}/{epochs}: model loss {float(row.model_loss.values[0]):.4f}, "
        f"model training error {float(row.model_error.values[0]):.3f}; lowest probe {metric} "
        f"{float(errors.values[best]):.3f} at {str(row.layer.values[best])!r}"
    )


def _checkpoint(path: Path | None, model: nn.Module, opt: torch.optim.Optimizer, **info) -> None:
    if path is not None:
        _save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(), **info}, path)


def _train_epoch(model, opt, dataset, loss_fn, *, epoch, seed, step, batch_size, device) -> tuple[float, float, int]:
    """One epoch of minibatch training; returns mean loss, training error and the new global step."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    torch.manual_seed(seed * 100_003 + epoch)
    model.train()
    total_loss = total_error = seen = 0.0
    for x, y in loader:
        x, y = x.to(device), y.to(device).long()
        opt.zero_grad()
        out = model(x)
        logits = out[0] if isinstance(out, (tuple, list)) else out
        loss = loss_fn(logits, y)
        if not math.isfinite(loss.item()):
            raise FloatingPointError(
                f"the model's training loss became {loss.item()} at epoch {epoch}, step {step}; lower the learning rate"
            )
        loss.backward()
        opt.step()
        step += 1
        total_loss += loss.item() * y.shape[0]
        total_error += (logits.argmax(1) != y).sum().item()
        seen += y.shape[0]
    return total_loss / max(seen, 1), total_error / max(seen, 1), step

