"""A PyTorch Lightning callback that probes a LightningModule's layers while a ``Trainer`` trains it.

:class:`ProbeCallback` drives one :class:`~probekit.ProbeMonitor` (through
:class:`~probekit.integrations.probing.TrainerProbes`) from the Trainer's
events: the data checked at ``on_fit_start``, epoch 0 at ``on_train_start``,
before the first step, then a row after every ``every_n_epochs``-th training epoch (or every
``every_n_steps`` optimiser steps). It needs PyTorch Lightning 2.x
(``pip install "probekit[lightning]"``): ``lightning.pytorch``, else the
standalone ``pytorch_lightning``. Importing :mod:`probekit` never imports this
module; this module is the only one of the package that imports Lightning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import xarray as xr

try:
    import lightning.pytorch as _pl
except ImportError:
    try:
        import pytorch_lightning as _pl
    except ImportError:
        raise ImportError(
            'probekit.integrations.lightning needs PyTorch Lightning 2.x, which is not installed; '
            'pip install "probekit[lightning]"'
        ) from None

from probekit.engine.monitor import Mode
from probekit.integrations.probing import BEST_PREFIX, TrainerProbes, labels_from_batch
from probekit.params import choices

__all__ = ["ProbeCallback"]

if int(_pl.__version__.split(".")[0]) < 2:
    raise ImportError(f"probekit.integrations.lightning needs PyTorch Lightning 2.x and found {_pl.__version__}; "
                      'pip install "probekit[lightning]"')


class ProbeCallback(_pl.Callback):
    """Probe a LightningModule's layers while a Lightning ``Trainer`` trains it.

    At ``on_fit_start`` every split of ``data`` is run through the model once
    and the monitor is built: data that does not fit stops ``fit`` with one line
    saying what is wrong, before the sanity check and any step. Epoch 0 (the
    model before training) is probed at ``on_train_start``, then the model after
    every ``every_n_epochs``-th training epoch (rows numbered by the training
    epoch, 1, 2, ...; an epoch cut short by ``max_steps`` gets no row), or, with
    ``every_n_steps=N``, after every N-th optimiser step (rows numbered 0, 1,
    2, ..., the global step in the run's ``step`` coordinate). A fit resumed
    from a checkpoint (``ckpt_path=``) continues the rows of its store with
    ``resume=True``.

    Each epoch row records the model's own training loss, as the module logged
    it (``trainer.callback_metrics[train_loss_key]``, the epoch mean when it
    was logged with ``on_epoch=True``), in the run's ``model_loss``; a step row
    (``every_n_steps``), whose step may fall mid-epoch where the logged value
    can still be the previous epoch's mean, records instead the mean of the
    losses ``training_step`` returned since the previous row. The validation
    loss (``val_loss_key``), when a validation pass ran since the previous row,
    goes to the run's ``model_valid_loss`` (NaN otherwise); :attr:`model_losses`
    holds both side by side. The best layer's error
    (``probe_best_valid_error``; ``_test_`` or ``_train_`` without a valid
    split) goes to every logger of the Trainer at the row's global step, and to
    ``trainer.callback_metrics``.

    Every probing call leaves the module as it found it: train/eval flags,
    ``requires_grad``, parameters, buffers and device, and the random streams
    (torch, CUDA, NumPy, Python), so training draws the same shuffles and
    dropout masks as without the callback. In online mode, forward hooks read
    each training batch's features as the module computes them and every probe
    takes one step per training batch (``on_train_batch_end``).

    The callback derives from ``lightning.pytorch.Callback`` when the ``lightning``
    package is installed, else from ``pytorch_lightning.Callback``; either
    package's ``Trainer`` runs it.

    Distributed (DDP): every rank takes part, with the same ``data``. Each
    builds its monitor in the Trainer's process group, extracts its own shard
    of every split (examples ``rank, rank + W, ...``) and fits the probes with
    sums all-reduced over the ranks (see :mod:`probekit.engine.distributed`),
    so every rank holds the same rows, equal to one process's to within one
    example of error; rank 0 alone writes the store (the others never touch
    it), and the run records ``world_size``. In online mode each rank's probes
    step on its own training batches, their gradients all-reduced. The best
    layer's error is the same on every rank, in every rank's
    ``callback_metrics``; Lightning's loggers write rank 0's. The losses a row
    records are rank 0's as the module logged them (``self.log(...,
    sync_dist=True)`` logs their mean over the ranks). Data that does not fit
    the model on one rank stops every rank with one line.

    Args:
        data: the probes' train/valid(/test) splits (see :class:`~probekit.ProbeMonitor`), as the module's
            forward takes them.
        store: Zarr store folder of the run; ``None`` keeps it in memory (:attr:`dataset`).
        layers: probe point names, ``"blocks"`` or ``"all"``; default: the probed module's ``probe_layers``.
        reduce: reduction for every layer, or ``{layer: spec}``.
        every_n_epochs: probe after every n-th training epoch.
        every_n_steps: probe every N optimiser steps instead of at epoch ends.
        mode: ``"snapshot"`` (probes fitted to their optimum at each row) or ``"online"``.
        module: the submodule to probe, as an attribute path of the LightningModule (``"net"``);
            default the LightningModule itself.
        train_loss_key, val_loss_key: the names the module logs its losses under.
        batch_label_key: online mode: the labels' key of mapping training batches (``(x, y)`` batches
            give ``y``).
        label_key: the labels' key of ``data``'s rows, when they are mappings.
        resume: continue the rows of an existing store, when the trainer resumes from a checkpoint
            (a trainer starting past step 0 with no rows to continue is refused: its epoch 0 would be trained).
        overwrite: replace an existing store.
        num_classes, l2, probe_lr, batch_size, seed, quiet, model_name, dataset_name: as for
            :class:`~probekit.ProbeMonitor`.

    Example:
        >>> from probekit.integrations.lightning import ProbeCallback
        >>> trainer = lightning.pytorch.Trainer(max_epochs=5, callbacks=[ProbeCallback(data, store="runs/l.zarr")])
        >>> trainer.fit(module, train_loader, valid_loader)
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
        module: str | None = None,
        train_loss_key: str = "train_loss",
        val_loss_key: str = "val_loss",
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
        self.module, self.train_loss_key, self.val_loss_key = module, train_loss_key, val_loss_key
        self.batch_label_key = batch_label_key
        self._validated = False  # a validation pass (not the sanity check) ended since the last row
        self._step_losses, self._step_batches = None, 0  # step rows: training_step's losses since the last row
        self._missing_warned = False

    # ---------------------------------------------------------------- what it made
    @property
    def dataset(self) -> xr.Dataset:
        """The run so far, as an ``xarray.Dataset`` (see docs/store.md)."""
        if self.probes.monitor is None:
            raise RuntimeError("the callback has not probed yet: pass it to a Trainer and call trainer.fit(...)")
        return self.probes.monitor.dataset

    @property
    def model_losses(self) -> xr.DataArray:
        """The module's logged losses at each row, dims ``(epoch, split)`` with split ``train`` and ``valid`` (NaN where not logged)."""
        return self.probes.model_losses

    # ---------------------------------------------------------------- events
    def on_fit_start(self, trainer, pl_module) -> None:
        # Every rank: under DDP the monitor's sums are collectives of the Trainer's process group.
        self.probes.start(self._target(pl_module))

    def on_train_start(self, trainer, pl_module) -> None:
        # After the sanity check and after a checkpoint's training state is restored (global_step), before any step.
        if self.probes.monitor is not None:
            self._log(trainer, self.probes.begin(step=trainer.global_step))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._validated = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.probes.monitor is None:
            return
        if self.probes.mode == "online":
            self.probes.step(labels_from_batch(batch, label_key=self.batch_label_key, where="Trainer"))
        if self.probes.by_steps:
            self._add_step_loss(trainer, outputs)
            if self.probes.step_due(trainer.global_step):
                self._write(trainer, epoch=None)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.probes.monitor is None:
            return
        epoch = trainer.current_epoch + 1  # the epoch that just ended, counting from 1 (0 is the untrained model)
        seen, total = trainer.fit_loop.epoch_loop.batch_progress.current.completed, trainer.num_training_batches
        if seen < total:
            return  # cut short (max_steps): not a whole epoch, so no row is numbered as one
        if self.probes.epoch_due(epoch):
            self._write(trainer, epoch=epoch)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.probes.close()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self.probes.close()

    # ---------------------------------------------------------------- helpers
    def _target(self, pl_module):
        """The module to probe: the LightningModule, or its submodule at ``module``."""
        names = [name for name, _ in pl_module.named_children()]
        if not self.module:
            if type(pl_module).forward is _pl.LightningModule.forward:
                raise ValueError(f"{type(pl_module).__name__} defines no forward, so it cannot be probed as a whole; pass "
                                 f"module= naming the network to probe (its children: {choices(names) or 'none'})")
            return pl_module
        try:
            return pl_module.get_submodule(self.module)
        except AttributeError:
            raise ValueError(f"module={self.module!r} is not a submodule of {type(pl_module).__name__}; its children "
                             f"are {choices(names) or 'none'} (pass an attribute path such as 'net' or 'net.encoder')") from None

    def _add_step_loss(self, trainer, outputs) -> None:
        """Step rows: add the loss ``training_step`` returned (Lightning divides it by ``accumulate_grad_batches``)."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().float() * trainer.accumulate_grad_batches
            self._step_losses = loss if self._step_losses is None else self._step_losses + loss
            self._step_batches += 1

    def _write(self, trainer, *, epoch: int | None) -> None:
        metrics = trainer.callback_metrics
        if epoch is None:  # a step row: what callback_metrics holds mid-epoch may be the last epoch's mean
            train = None if self._step_losses is None else self._step_losses / self._step_batches
            self._step_losses, self._step_batches = None, 0
        else:
            train = self._logged(metrics, self.train_loss_key)
        if train is None and epoch is not None and not self._missing_warned:
            self._missing_warned = True
            warnings.warn(
                f"the module logs no {self.train_loss_key!r} (trainer.callback_metrics holds "
                f"{', '.join(repr(k) for k in sorted(metrics) if not k.startswith(BEST_PREFIX)) or 'nothing'}); "
                f"the run's model_loss stays NaN. Log it with self.log({self.train_loss_key!r}, loss) or pass "
                "train_loss_key= naming yours",
                RuntimeWarning, stacklevel=2,
            )
        valid = self._logged(metrics, self.val_loss_key) if self._validated else None
        self._validated = False
        self._log(trainer, self.probes.write(epoch=epoch, step=trainer.global_step, model_loss=train, valid_loss=valid))

    @staticmethod
    def _logged(metrics: Mapping, key: str):
        """A logged figure: its epoch aggregate (``key_epoch``, logged with both on_step and on_epoch) first."""
        for name in (f"{key}_epoch", key):
            if name in metrics:
                return metrics[name]
        return None

    @staticmethod
    def _log(trainer, figures: Mapping[str, float]) -> None:
        """The figures to every logger of the Trainer, and to ``callback_metrics`` (so ``ModelCheckpoint`` can monitor them)."""
        if figures:
            for logger in trainer.loggers:
                logger.log_metrics(dict(figures), step=trainer.global_step)
            trainer.callback_metrics.update({name: torch.tensor(value) for name, value in figures.items()})
