"""One process of the trainer callbacks' multi-process tests (``test_callbacks_distributed.py`` starts it).

``python ddp_worker.py lightning SCENARIO OUT`` is rank 0 of a Lightning fit under ``strategy="ddp"``
with 2 CPU processes: Lightning starts rank 1 itself, by running the same command again.
``python -m torch.distributed.run --standalone --nproc_per_node=2 ddp_worker.py hf SCENARIO OUT`` runs
transformers' Trainer on 2 CPU processes (gloo). Each rank writes what it found under ``OUT``: ``rank{r}.npz``,
or ``error{r}.txt`` with its error in one line. A rank other than 0 that tries to write the run store fails.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

import probekit as pk
from tests.engine.distributed_worker import forbid_store_writes

#: The probes' fixed L2 strength: with l2="auto" a layer can choose another L2 value in two processes than in one.
L2 = 1e-3
#: The layers the Lightning scenarios probe (``tests/integrations/test_lightning.py``'s).
LAYERS = ["input", "relu1", "fc1", "fc2"]


def _rank() -> int:
    """This process's rank, from the environment its launcher gave it (Lightning's children: ``LOCAL_RANK``)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def found(ds) -> dict:
    """What a test compares of a callback's run."""
    return {"probe": ds.probe.values, "epoch": ds.epoch.values, "step": ds.step.values,
            "metrics": np.array(ds.metric.values, dtype=str), "iterations": ds.iterations.values,
            "model_loss": ds.model_loss.values, "model_valid_loss": ds.model_valid_loss.values,
            "world_size": ds.attrs.get("world_size", -1)}


# ----------------------------------------------------------------------------- Lightning
def frozen_module():
    """The Lightning tests' digits module, trained with a learning rate of 0: the model two processes train stays the
    one a single process trains (each rank's loader holds other batches), so that every row compares."""
    from tests.integrations.test_lightning import DigitsModule

    class Frozen(DigitsModule):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    torch.manual_seed(0)
    return Frozen()


def lightning_trainer(callbacks, out: Path, *, devices: int):
    import lightning.pytorch as L
    from lightning.pytorch.loggers import CSVLogger

    options = {"strategy": "ddp"} if devices > 1 else {}
    return L.Trainer(accelerator="cpu", devices=devices, max_epochs=2, logger=CSVLogger(out, name="logs"),
                     enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                     callbacks=callbacks, **options)


def lightning_loaders(data):
    from torch.utils.data import DataLoader, TensorDataset

    return (DataLoader(TensorDataset(*data.train), batch_size=50, shuffle=True),
            DataLoader(TensorDataset(*data.valid), batch_size=100))


def lightning_callbacks(data, store: Path | None):
    """A snapshot callback writing ``store`` and an online one kept in memory, side by side in one Trainer."""
    from probekit.integrations.lightning import ProbeCallback

    snapshot = ProbeCallback(data, store=store, module="net", layers=LAYERS, l2=L2, quiet=True)
    online = ProbeCallback(data, module="net", layers=LAYERS, mode="online", probe_lr=1e-2, quiet=True)
    return snapshot, online


def lightning_fit(out: Path, devices: int = 2) -> dict:
    data = pk.data.digits(limit=200)
    snapshot, online = lightning_callbacks(data, out / "l.zarr")
    trainer = lightning_trainer([snapshot, online], out, devices=devices)
    trainer.fit(frozen_module(), *lightning_loaders(data))
    if trainer.world_size != devices:
        raise RuntimeError(f"the Trainer ran {trainer.world_size} processes, not {devices}")
    best = float(trainer.callback_metrics["probe_best_valid_error"])
    return {**found(snapshot.dataset), **{f"online_{k}": v for k, v in found(online.dataset).items()},
            "best": best, "global_rank": trainer.global_rank}


def lightning_bad(out: Path, ranks: tuple[int, ...]) -> dict:
    """On ``ranks``, the probe data does not fit the model (3 channels for a 1-channel convnet); elsewhere it does."""
    from probekit.integrations.lightning import ProbeCallback

    data = pk.data.digits(limit=200)
    x, y = data.train
    splits = {"train": (x.repeat(1, 3, 1, 1), y) if _rank() in ranks else (x, y), "valid": data.valid}
    trainer = lightning_trainer([ProbeCallback(splits, module="net", quiet=True)], out, devices=2)
    try:
        trainer.fit(frozen_module(), *lightning_loaders(data))
    finally:
        (out / f"steps{_rank()}.txt").write_text(str(trainer.global_step))
    return {}


# ----------------------------------------------------------------------------- transformers
def hf_splits() -> dict:
    from tests.integrations.test_hf import _tokens

    return {"train": _tokens(160, 0), "valid": _tokens(80, 1)}


def hf_fit(out: Path, processes: int = 2) -> dict:
    """The Hugging Face tests' tiny BERT under the Trainer, with a learning rate of 0 (see :func:`frozen_module`)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from probekit.integrations.hf import ProbeCallback
    from tests.integrations.test_hf import _model, _rows

    class Recorder(TrainerCallback):
        def __init__(self):
            self.best: list[float] = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "probe_best_valid_error" in logs:
                self.best.append(logs["probe_best_valid_error"])

    splits = hf_splits()
    snapshot = ProbeCallback(splits, store=out / "hf.zarr", reduce="first", l2=L2, quiet=True)
    online = ProbeCallback(splits, mode="online", reduce="first", probe_lr=1e-2, quiet=True)
    recorder = Recorder()
    args = TrainingArguments(output_dir=str(out / "out"), use_cpu=True, report_to=[], num_train_epochs=2,
                             per_device_train_batch_size=32, per_device_eval_batch_size=40, learning_rate=0.0,
                             seed=0, disable_tqdm=True, logging_strategy="epoch", eval_strategy="epoch",
                             save_strategy="no")
    trainer = Trainer(model=_model(), args=args, train_dataset=_rows(splits["train"]),
                      eval_dataset=_rows(splits["valid"]), callbacks=[snapshot, online, recorder])
    trainer.train()
    if args.world_size != processes:
        raise RuntimeError(f"the Trainer ran {args.world_size} processes, not {processes}")
    valid = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry]
    return {**found(snapshot.dataset), **{f"online_{k}": v for k, v in found(online.dataset).items()},
            "best": np.array(recorder.best), "logged_valid": np.array(valid)}


SCENARIOS = {
    ("lightning", "fit"): lightning_fit, ("hf", "fit"): hf_fit,
    ("lightning", "bad_on_rank_1"): lambda out: lightning_bad(out, (1,)),
    ("lightning", "bad_on_every_rank"): lambda out: lightning_bad(out, (0, 1)),
}


def main(framework: str, scenario: str, out: Path) -> None:
    torch.set_num_threads(1)
    rank = _rank()
    if rank:
        forbid_store_writes()
    try:
        result = SCENARIOS[framework, scenario](out)
    except Exception as error:  # noqa: BLE001 - written for the test to read
        (out / f"error{rank}.txt").write_text(f"{type(error).__name__}: {error}")
        return
    np.savez(out / f"rank{rank}.npz", **result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
