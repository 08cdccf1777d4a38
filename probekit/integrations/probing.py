"""What the trainer callbacks share: one :class:`~probekit.ProbeMonitor` driven by a trainer's events.

:class:`TrainerProbes` owns the monitor of a callback
(:mod:`probekit.integrations.lightning`, :mod:`probekit.integrations.hf`): it
checks before training that the callback's data fits the model, writes epoch 0,
decides which epochs (or steps) get a row, writes each row with the model's
training and validation losses as the trainer logged them, and gives the best layer's error for the
trainer's logs. Every probing call runs inside :func:`left_as_found`, so that
the trainer's model and random streams are exactly as they were before it.

Under a trainer's data parallelism (Lightning's DDP, transformers' Trainer
under ``torchrun``) every rank drives its own monitor in the trainer's process
group, as :mod:`probekit.engine.distributed` describes for ``ProbeMonitor``:
each extracts its shard, the sums are all-reduced, rank 0 alone writes the
store, and every rank gets the same rows. A refusal on one rank before the
monitor exists (data that does not fit the model) stops every rank.

This module imports the engine and the run schema; it never imports Lightning
or transformers (each callback module does, alone), the diagnosis, the charts
or the explorers.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np
import torch
import xarray as xr
from torch import nn

from probekit.engine import distributed
from probekit.engine.batch import batch_size, call_model, first_tensor, take, to_device
from probekit.engine.devices import model_device
from probekit.engine.features import as_splits, batches, check_inputs
from probekit.engine.monitor import Mode, ProbeMonitor
from probekit.engine.points import preserved_state
from probekit.params import Interval, check_params, shape_text
from probekit.run.schema import SPLITS_SHOWN_FIRST, metric_name

__all__ = ["BEST_PREFIX", "SCHEDULE_CONSTRAINTS", "TrainerProbes", "best_error", "check_data_fits", "labels_from_batch", "left_as_found"]

#: Argument checks of a callback's schedule (the monitor checks the arguments it receives).
SCHEDULE_CONSTRAINTS = {
    "every_n_epochs": [Interval(int, 1, None)],
    "every_n_steps": [Interval(int, 1, None), None],
}

#: The names the callbacks log the best layer's error under start with this (``probe_best_valid_error``).
BEST_PREFIX = "probe_best_"


@contextmanager
def left_as_found(model: nn.Module) -> Iterator[None]:
    """Leave ``model`` and the process's random streams exactly as they were on entry.

    On top of :func:`probekit.engine.points.preserved_state` (train/eval flags,
    parameter and buffer values), every parameter's ``requires_grad`` flag and
    the random states of torch (CPU and every initialised CUDA device), NumPy
    and Python's ``random`` are restored, so that a run trained with a callback
    draws the same shuffles and dropout masks as one trained without it.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    python_state, numpy_state = random.getstate(), np.random.get_state()
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=cuda), preserved_state(model):
            yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
        random.setstate(python_state)
        np.random.set_state(numpy_state)


def check_data_fits(model: nn.Module, data: object, *, label_key: str | None = None) -> None:
    """Run the model once on the first two examples of every split; a one-line ValueError says what does not fit.

    Checks each split's inputs against the model's forward (its keyword
    arguments, then one forward pass under ``torch.no_grad`` in eval mode) and
    the number of labels of that first batch against its inputs, so that a
    callback given the wrong data stops before the trainer trains.
    """
    device = model_device(model)
    for name, split in as_splits(data).items():
        for inputs, labels in batches(split, 2, label_key=label_key, name=name):
            n_inputs, n_labels = batch_size(inputs), int(torch.as_tensor(labels).shape[0])
            if n_inputs != n_labels:
                raise ValueError(f"the {name} split's first batch holds {n_inputs} inputs but {n_labels} labels; "
                                 "give the callback one label per example")
            check_inputs(model, inputs, name=name)
            try:
                with torch.no_grad():
                    model.eval()
                    call_model(model, to_device(take(inputs, min(2, n_inputs)), device))
            except Exception as error:  # noqa: BLE001 - any failure of the user's forward is reported in one line
                first = first_tensor(inputs)
                shape = shape_text(first.shape[1:]) if first is not None else type(inputs).__name__
                message = str(error).strip().splitlines()[0][:300] if str(error).strip() else "(no message)"
                raise ValueError(
                    f"the callback's {name} split does not fit {type(model).__name__}: its inputs (per-example shape "
                    f"{shape}) make the model raise {type(error).__name__}: {message}; give data= inputs as the model "
                    "takes them in training"
                ) from error
            break


class TrainerProbes:
    """A :class:`~probekit.ProbeMonitor` driven by a trainer's events; what both callbacks share.

    Call :meth:`start` before training (it checks the data and builds the
    monitor), :meth:`begin` just before the first step (epoch 0),
    :meth:`epoch_due` / :meth:`step_due` to ask whether an epoch or step gets
    a row, :meth:`write` to write it, and :meth:`close` when training ends. In online mode, :meth:`step` gives every probe one step
    on the training batch the model just ran.

    Rows: with ``every_n_steps=None``, epoch 0 and every ``every_n_epochs``-th
    training epoch, numbered by the training epoch. With ``every_n_steps=N``,
    epoch 0 and every N-th optimiser step, numbered 0, 1, 2, ... (the row's
    ``step`` coordinate holds the global step), as the paper probes "after 0,
    500, 2000 minibatches".
    """

    def __init__(self, data: object, *, store: str | os.PathLike | None, layers: str | Sequence[str] | None,
                 reduce: str | Mapping[str, str] | None, mode: Mode, every_n_epochs: int, every_n_steps: int | None,
                 monitor_options: Mapping[str, object]):
        check_params(SCHEDULE_CONSTRAINTS, every_n_epochs=every_n_epochs, every_n_steps=every_n_steps)
        self.data, self.store, self.layers, self.reduce, self.mode = data, store, layers, reduce, mode
        self.every_n_epochs, self.every_n_steps = int(every_n_epochs), every_n_steps
        self.options = dict(monitor_options)
        self.monitor: ProbeMonitor | None = None
        self.model: nn.Module | None = None

    # ---------------------------------------------------------------- lifetime
    def start(self, model: nn.Module) -> None:
        """Check the data against ``model`` and build the monitor (a one-line error, before training, if they do not fit).

        Data-parallel, every rank calls it: data that does not fit on one rank
        raises there, and every other rank raises "rank R of W stopped: ..."
        instead of waiting for it in the monitor's first collective.
        """
        self.close()  # a callback reused by a second fit starts a new monitor
        self.model = model
        comm = distributed.current()
        with left_as_found(model):
            failure = None
            try:
                check_data_fits(model, self.data, label_key=self.options.get("label_key"))
            except Exception as error:
                if comm is None:
                    raise
                failure = error
            if comm is not None:
                comm.settle(failure)
            self.monitor = ProbeMonitor(model, self.data, layers=self.layers, reduce=self.reduce, store=self.store,
                                        mode=self.mode, **self.options)

    def begin(self, *, step: int) -> dict[str, float]:
        """Training is about to start at global step ``step``: write epoch 0; the figures to log.

        Above step 0 the trainer resumes from a checkpoint: the run continues
        the rows of its store (``resume=True``) instead of writing an epoch 0
        that would be a trained model, and a store with no rows, or with rows
        past ``step``, is refused in one line.
        """
        rows = self.monitor.rows
        where = f"run store {str(self.store)!r}" if self.store is not None else "the run (kept in memory: store=None)"
        if not rows and step > 0:
            self.close()
            raise ValueError(
                f"the trainer resumes from a checkpoint at step {step}, and {where} has no rows, so its epoch 0 would "
                "be a trained model; pass store= the first run's store with resume=True, or train from the start"
            )
        if rows and rows[-1].step > step:
            last = rows[-1]
            self.close()
            raise ValueError(
                f"{where} holds rows up to step {last.step} (epoch {last.epoch}), after the trainer's step {step}; "
                "resume from the last checkpoint of that run, or write to a new store"
            )
        return self.write(epoch=0, step=0) if not rows else {}

    def close(self) -> None:
        """Remove the monitor's hooks and release the store; the run stays readable (:attr:`monitor`'s ``dataset``)."""
        if self.monitor is not None:
            self.monitor.close()

    # ---------------------------------------------------------------- schedule
    @property
    def by_steps(self) -> bool:
        """Rows come every N optimiser steps (``every_n_steps``), not at epoch ends."""
        return self.every_n_steps is not None

    def epoch_due(self, epoch: int) -> bool:
        """Training epoch ``epoch`` (1, 2, ...) just ended: does it get a row?"""
        return self.monitor is not None and not self.by_steps and epoch % self.every_n_epochs == 0

    def step_due(self, step: int) -> bool:
        """Global step ``step`` was just reached: does it get a row?"""
        last = self.monitor.rows[-1].step if self.monitor is not None and self.monitor.rows else None
        return self.by_steps and self.monitor is not None and step > 0 and step % self.every_n_steps == 0 and step != last

    # ---------------------------------------------------------------- rows
    def step(self, labels: object) -> None:
        """Online mode: one step of every probe on the training batch the model just ran (labels of that batch)."""
        if self.monitor is None or self.mode != "online":
            return
        with torch.autocast(model_device(self.model).type, enabled=False):
            self.monitor.step(torch.as_tensor(labels))

    def write(self, *, epoch: int, step: int, model_loss: float | None = None,
              valid_loss: float | None = None) -> dict[str, float]:
        """Probe the model now and write one row; returns ``{name: value}`` of the best layer's error to log."""
        if self.by_steps:
            epoch = self.monitor.next_epoch
        with left_as_found(self.model):
            row = self.monitor.update(epoch=epoch, step=step, model_loss=_number(model_loss),
                                      model_valid_loss=_number(valid_loss))
        return best_error(row)

    @property
    def model_losses(self) -> xr.DataArray:
        """The model's own losses at each row, as logged, dims ``(epoch, split)`` with split ``train`` and ``valid``.

        Read from the run: its ``model_loss`` (training) and
        ``model_valid_loss`` (validation), so that a resumed run's earlier rows
        hold what was logged then; empty before the callback has probed.
        """
        if self.monitor is None:
            return xr.DataArray(np.zeros((0, 2)), dims=("epoch", "split"), name="model_loss",
                                coords={"epoch": np.zeros(0, np.int64), "step": ("epoch", np.zeros(0, np.int64)),
                                        "split": ["train", "valid"]})
        ds = self.monitor.dataset
        values = np.stack([ds["model_loss"].values, ds["model_valid_loss"].values], axis=1).astype(np.float64)
        return xr.DataArray(values, dims=("epoch", "split"), name="model_loss",
                            coords={"epoch": ds["epoch"].values, "step": ("epoch", ds["step"].values),
                                    "split": ["train", "valid"]})


def best_error(row: xr.Dataset) -> dict[str, float]:
    """``{"probe_best_valid_error": e}``: the lowest probe error of one row, on the split a reader reads first.

    Empty when every layer's error is NaN (e.g. every layer's features held NaN).
    """
    metrics = [str(m) for m in row["metric"].values]
    split = next(s for s in SPLITS_SHOWN_FIRST if metric_name(s, "error") in metrics)
    errors = np.asarray(row["probe"].sel(metric=metric_name(split, "error")).values, dtype=np.float64).reshape(-1)
    if not np.isfinite(errors).any():
        return {}
    return {f"{BEST_PREFIX}{split}_error": float(np.nanmin(errors))}


def _number(value: object) -> float:
    """A logged figure (a float, a 0-d tensor or array) as a float; NaN when absent."""
    if value is None:
        return math.nan
    if isinstance(value, torch.Tensor):
        value = value.detach().float().cpu().item()
    return float(value)


def labels_from_batch(batch: object, *, label_key: str | None, where: str) -> torch.Tensor:
    """The labels of a training batch: ``batch[label_key]`` of a mapping (``"labels"`` by default), else ``batch[1]``.

    ``where`` names the trainer for the error message.
    """
    if isinstance(batch, Mapping):
        key = label_key or "labels"
        if key not in batch:
            raise ValueError(f"online probes need each training batch's labels, and the {where}'s batches hold no "
                             f"{key!r} key (keys: {', '.join(map(str, batch))}); pass label_key= naming it")
        return torch.as_tensor(batch[key])
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return torch.as_tensor(batch[1])
    raise ValueError(f"online probes need each training batch's labels, and the {where}'s batches are "
                     f"{type(batch).__name__}s, not (inputs, labels) pairs or mappings; pass batches of that form, "
                     "or use mode='snapshot'")

