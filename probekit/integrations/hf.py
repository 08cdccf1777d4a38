"""A Hugging Face ``transformers`` callback that probes a model's layers while ``Trainer`` trains it.

:class:`ProbeCallback` is a ``transformers.TrainerCallback`` driving one
:class:`~probekit.ProbeMonitor` (through
:class:`~probekit.integrations.probing.TrainerProbes`): epoch 0 at
``on_train_begin``, then a row after every ``every_n_epochs``-th epoch (or
every ``every_n_steps`` optimiser steps). It needs transformers and accelerate
(``pip install "probekit[hf]"``). Importing :mod:`probekit` never imports this
module; this module is the only one of the package that imports transformers.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Literal

try:
    from transformers import TrainerCallback
    from transformers.trainer_callback import CallbackHandler
except ImportError:
    raise ImportError(
        'probekit.integrations.hf needs transformers (and accelerate, for its Trainer), which are not installed; '
        'pip install "probekit[hf]"'
    ) from None

import torch
import xarray as xr

from probekit.engine.monitor import Mode
from probekit.integrations.probing import TrainerProbes

__all__ = ["ProbeCallback"]

#: The key of the Trainer's end-of-training summary log; the model is still the last step's when it is logged
#: (``load_best_model_at_end`` replaces it right after).
_SUMMARY_KEY = "train_runtime"


class ProbeCallback(TrainerCallback):
    """Probe a model's layers while a Hugging Face ``Trainer`` trains it.

    Epoch 0 (the model before training) is probed at ``on_train_begin``, then
    the model after every ``every_n_epochs``-th epoch (rows numbered by the
    epoch, 1, 2, ...; an epoch cut short by ``max_steps`` gets no row), or, with
    ``every_n_steps=N``, after every N-th optimiser step (rows numbered 0, 1,
    2, ..., the global step in the run's ``step`` coordinate). Training resumed
    from a checkpoint (``resume_from_checkpoint=``) continues the rows of the
    store with ``resume=True``. Before training starts, every split of ``data`` is run through
    the model once: data that does not fit stops ``train()`` with one line
    saying what is wrong, before any step.

    The Trainer logs an epoch's loss and evaluates it only after
    ``on_epoch_end`` (``logging_strategy="epoch"``, ``eval_strategy="epoch"``),
    so a row is written at the next event that follows those logs, with the
    model unchanged since the epoch ended: the next epoch's (or step's) start,
    or the end-of-training summary log (before ``load_best_model_at_end`` swaps
    the model). Each row records the last ``loss`` the Trainer logged since the
    previous row in the run's ``model_loss``, and the last ``eval_loss`` in its
    ``model_valid_loss`` (both side by side in :attr:`model_losses`); NaN where
    none was logged (raise the logging frequency: ``logging_strategy="epoch"``). The best layer's error
    (``probe_best_valid_error``; ``_test_`` or ``_train_`` without a valid
    split) is logged as the Trainer logs its own figures: appended to
    ``state.log_history`` with the row's epoch and step, then passed to every
    callback's ``on_log`` (the ``report_to`` loggers, TensorBoard, W&B, ...,
    among them), through the Trainer's callback handler.

    Every probing call leaves the model as it found it: train/eval flags,
    ``requires_grad``, parameters, buffers and device, and the random streams
    (torch, CUDA, NumPy, Python). In online mode, forward hooks read each
    training batch's features as the model computes them, and after each
    training forward pass every probe takes one step on the batch's labels
    (the ``batch_label_key`` keyword argument the Trainer passes the model).

    Distributed (DDP, the Trainer under ``torchrun``): every process takes
    part, with the same ``data``. Each builds its monitor in the Trainer's
    process group, extracts its own shard of every split (examples ``rank,
    rank + W, ...``) and fits the probes with sums all-reduced over the
    processes (see :mod:`probekit.engine.distributed`), so every process holds
    the same rows, equal to one process's to within one example of error; the
    world's process zero alone writes the store (the others never touch it),
    and the run records ``world_size``. In online mode each process's probes
    step on its own training batches, their gradients all-reduced. The best
    layer's error is logged the same on every process, as the Trainer logs its
    own figures (its ``report_to`` loggers write process zero's); the losses a
    row records are those the Trainer logged, gathered over the processes and
    alike on every one. Data that does not fit the model on one process stops
    every process with one line.

    Args:
        data: the probes' train/valid(/test) splits (see :class:`~probekit.ProbeMonitor`), e.g.
            ``({"input_ids": ids, "attention_mask": mask}, labels)`` pairs.
        store: Zarr store folder of the run; ``None`` keeps it in memory (:attr:`dataset`).
        layers: probe point names, ``"blocks"`` or ``"all"``; default: the model's blocks.
        reduce: reduction for every layer, or ``{layer: spec}`` (token sequences: ``"mean"``, ``"first"``, ...).
        every_n_epochs: probe after every n-th epoch.
        every_n_steps: probe every N optimiser steps instead of at epoch ends.
        mode: ``"snapshot"`` (probes fitted to their optimum at each row) or ``"online"``.
        batch_label_key: online mode: the keyword argument holding a training batch's labels.
        label_key: the labels' key of ``data``'s rows, when they are mappings (a ``datasets`` row).
        resume: continue the rows of an existing store, when the trainer resumes from a checkpoint
            (a trainer starting past step 0 with no rows to continue is refused: its epoch 0 would be trained).
        overwrite: replace an existing store.
        num_classes, l2, probe_lr, batch_size, seed, quiet, model_name, dataset_name: as for
            :class:`~probekit.ProbeMonitor`.

    Example:
        >>> from probekit.integrations.hf import ProbeCallback
        >>> trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=valid,
        ...                                callbacks=[ProbeCallback(data, store="runs/bert.zarr", reduce="first")])
        >>> trainer.train()
    """

    def __init__(
        self,
        data: object,
        *,
        store: str | os.PathLike | None = None,
        layers: str | Sequence[str] | None = None,
        reduce: str | Mapping[str, str] | None = None,
        every_n_epochs: int = 1,
        every_n_steps: int | None = None,
        mode: Mode = "snapshot",
        batch_label_key: str = "labels",
        label_key: str | None = None,
        resume: bool = False,
        overwrite: bool = False,
        num_classes: int | None = None,
        l2: float | Literal["auto"] = "auto",
        probe_lr: float = 1e-3,
        batch_size: int = 256,
        seed: int = 0,
        quiet: bool = False,
        model_name: str | None = None,
        dataset_name: str | None = None,
    ):
        self.probes = TrainerProbes(
            data, store=store, layers=layers, reduce=reduce, mode=mode, every_n_epochs=every_n_epochs,
            every_n_steps=every_n_steps,
            monitor_options=dict(resume=resume, overwrite=overwrite, num_classes=num_classes, l2=l2, probe_lr=probe_lr,
                                 batch_size=batch_size, seed=seed, quiet=quiet, model_name=model_name,
                                 dataset_name=dataset_name, label_key=label_key),
        )
        self.batch_label_key = batch_label_key
        self._pending: tuple[int | None, int] | None = None  # (epoch or None for a step row, global step) to write
        self._logged_upto = 0  # entries of state.log_history already read by a row
        self._hook = None
        self._handler: CallbackHandler | None = None  # the Trainer's, which calls every callback's on_log

    # ---------------------------------------------------------------- what it made
    @property
    def dataset(self) -> xr.Dataset:
        """The run so far, as an ``xarray.Dataset`` (see docs/store.md)."""
        if self.probes.monitor is None:
            raise RuntimeError("the callback has not probed yet: pass it to a Trainer and call trainer.train()")
        return self.probes.monitor.dataset

    @property
    def model_losses(self) -> xr.DataArray:
        """The Trainer's logged losses at each row, dims ``(epoch, split)`` with split ``train`` and ``valid`` (NaN where not logged)."""
        return self.probes.model_losses

    # ---------------------------------------------------------------- events
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # Every process: under torchrun the monitor's sums are collectives of the Trainer's process group.
        if model is None:
            raise ValueError("the Trainer passed no model to on_train_begin; give Trainer(model=...) a model")
        self._handler = _calling_handler(self)
        self.probes.start(model)
        figures = self.probes.begin(step=state.global_step)
        self._logged_upto = len(state.log_history)
        self._record(args, state, control, figures)
        if self.probes.mode == "online":
            self._hook = model.register_forward_hook(self._after_forward, with_kwargs=True)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._flush(args, state, control)

    def on_step_begin(self, args, state, control, **kwargs):
        self._flush(args, state, control)

    def on_step_end(self, args, state, control, **kwargs):
        if self.probes.step_due(state.global_step):
            self._pending = (None, state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        self._flush(args, state, control)
        epoch = round(state.epoch)
        if abs(state.epoch - epoch) > 1e-6:
            return  # cut short (max_steps): not a whole epoch, so no row is numbered as one
        if self.probes.epoch_due(epoch):
            self._pending = (epoch, state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and _SUMMARY_KEY in logs:
            self._flush(args, state, control)

    def on_train_end(self, args, state, control, **kwargs):
        try:
            self._flush(args, state, control)
        finally:
            self._close()

    # ---------------------------------------------------------------- helpers
    def _after_forward(self, module, args, kwargs, output) -> None:
        """Online mode: after each training forward pass, one probe step on its batch's labels."""
        if not (module.training and torch.is_grad_enabled()):
            return  # evaluation, prediction, and the monitor's own passes (eval mode)
        labels = kwargs.get(self.batch_label_key)
        if labels is None:
            raise ValueError(f"online probes need each training batch's labels, and the model was called without "
                             f"{self.batch_label_key!r} (keywords: {', '.join(kwargs) or 'none'}); pass "
                             "batch_label_key= naming them, or use mode='snapshot'")
        self.probes.step(labels)

    def _flush(self, args, state, control) -> None:
        """Write the row that is due, with the losses logged since the previous row."""
        if self._pending is None or self.probes.monitor is None:
            return
        epoch, step = self._pending
        self._pending = None
        new = state.log_history[self._logged_upto:]
        train = next((entry["loss"] for entry in reversed(new) if "loss" in entry), None)
        valid = next((entry["eval_loss"] for entry in reversed(new) if "eval_loss" in entry), None)
        figures = self.probes.write(epoch=epoch, step=step, model_loss=train, valid_loss=valid)
        self._record(args, state, control, figures)

    def _record(self, args, state, control, figures: Mapping[str, float]) -> None:
        """Log the best layer's figures as ``Trainer.log`` logs the Trainer's own, at the epoch and step of the row
        just written: one entry of the log history, then every callback's ``on_log``.

        Without the Trainer's callback handler (the callback driven by something
        else), the entry of the log history alone. The handler's ``on_log``
        clears ``control.should_log``; it is set back, so that a row written at
        ``on_epoch_end`` does not cancel the Trainer's own log of that epoch.
        """
        if figures:
            step = int(self.probes.monitor.rows[-1].step)
            logs = {**figures, "epoch": float(state.epoch or 0.0)}
            state.log_history.append({**logs, "step": step})
            if self._handler is not None:
                should_log = control.should_log
                self._handler.on_log(args, state, control, logs)
                control.should_log = should_log
        self._logged_upto = len(state.log_history)

    def _close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._handler = None
        self.probes.close()


def _calling_handler(callback: TrainerCallback) -> CallbackHandler | None:
    """The ``CallbackHandler`` whose event is calling ``callback`` now (the Trainer's), or ``None``.

    A TrainerCallback is given neither the Trainer nor its handler, and the
    handler alone reaches every callback's ``on_log`` (the ``report_to``
    loggers come before the user's callbacks, so changing the ``logs`` a
    later event passes would miss them). The handler calls each callback from
    its ``call_event``: it is the caller a few frames up that holds this very
    callback.
    """
    frame = inspect.currentframe()
    try:
        for _ in range(6):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            holder = frame.f_locals.get("self")
            if isinstance(holder, CallbackHandler) and any(c is callback for c in holder.callbacks):
                return holder
        return None
    finally:
        del frame
