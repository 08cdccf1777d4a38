"""The Lightning callback under a real Trainer on the CPU: rows, logged losses, the logger, the module left as found."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import lightning.pytorch as L
from lightning.pytorch.loggers import CSVLogger

import probekit as pk
from probekit.integrations.lightning import ProbeCallback

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ["input", "relu1", "fc1", "fc2"]


class DigitsModule(L.LightningModule):
    """The paper's convnet (small) on the digits, logging its losses as Lightning modules do."""

    def __init__(self):
        super().__init__()
        self.net = pk.zoo.paper_convnet(input_size=8, width=(8, 16), hidden=32)
        self.losses: list[float] = []  # every training step's loss, to compare with what the callback records

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        self.losses.append(loss.item())
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


@pytest.fixture(scope="module")
def digits():
    return pk.data.digits(limit=200)


def _loaders(digits):
    train = DataLoader(TensorDataset(*digits.train), batch_size=50, shuffle=True)
    return train, DataLoader(TensorDataset(*digits.valid), batch_size=100)


def _trainer(tmp_path, callbacks, max_epochs=2, **options):
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=max_epochs, logger=CSVLogger(tmp_path, name="logs"),
                     enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False,
                     callbacks=callbacks, **options)


def _csv_rows(trainer) -> list[dict]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_a_trainer_run_writes_epochs_0_to_2_with_the_logged_losses_and_logs_the_best_layer(digits, tmp_path):
    L.seed_everything(0, verbose=False)
    callback = ProbeCallback(digits, store=tmp_path / "l.zarr", module="net", layers=LAYERS, quiet=True)
    trainer = _trainer(tmp_path, [callback])
    trainer.fit(DigitsModule(), *_loaders(digits))

    ds = pk.open_run(tmp_path / "l.zarr")
    assert ds.epoch.values.tolist() == [0, 1, 2] and ds.step.values.tolist() == [0, 4, 8]
    assert ds.layer.values.tolist() == LAYERS
    rows = _csv_rows(trainer)
    logged_train = [float(r["train_loss"]) for r in rows if r.get("train_loss")]
    logged_valid = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
    assert np.isnan(ds.model_loss.values[0])  # the untrained model has no training loss yet
    np.testing.assert_allclose(ds.model_loss.values[1:], logged_train, rtol=1e-6)
    assert np.isnan(ds.model_valid_loss.values[0])  # the sanity check's val_loss is no epoch's
    np.testing.assert_allclose(ds.model_valid_loss.values[1:], logged_valid[-2:], rtol=1e-6)
    losses = callback.model_losses
    assert losses.epoch.values.tolist() == [0, 1, 2] and np.isnan(losses.sel(split="valid").values[0])
    np.testing.assert_allclose(losses.sel(split="valid").values[1:], logged_valid[-2:], rtol=1e-6)
    best = {int(r["step"]): float(r["probe_best_valid_error"]) for r in rows if r.get("probe_best_valid_error")}
    expected = ds.probe.sel(metric="valid_error").min("layer").values
    assert sorted(best) == [0, 4, 8]
    np.testing.assert_allclose([best[s] for s in (0, 4, 8)], expected, rtol=1e-6)
    assert float(trainer.callback_metrics["probe_best_valid_error"]) == pytest.approx(expected[-1])
    fc1 = ds.probe.sel(layer="fc1", metric="valid_loss").values
    assert fc1[0] != fc1[1] != fc1[2]  # each row probed the model as it was then


@pytest.mark.slow
def test_the_module_trains_exactly_as_it_would_without_the_callback(digits, tmp_path):
    """Probing (here over a shuffling loader, which draws from torch's random stream) changes nothing in training."""
    def fit(callbacks):
        L.seed_everything(0, verbose=False)
        module = DigitsModule()
        module.net.conv1.bias.requires_grad_(False)
        trainer = _trainer(tmp_path, callbacks)
        trainer.fit(module, *_loaders(digits))
        return module

    probe_train = DataLoader(TensorDataset(*digits.train), batch_size=64, shuffle=True)
    callback = ProbeCallback({"train": probe_train, "valid": digits.valid}, module="net", layers=LAYERS, quiet=True)
    with_probes, without = fit([callback]), fit([])
    assert callback.dataset.sizes["epoch"] == 3
    for (name, a), (_, b) in zip(with_probes.state_dict().items(), without.state_dict().items()):
        assert torch.equal(a, b), name
    assert [m.training for m in with_probes.modules()] == [m.training for m in without.modules()]
    assert not with_probes.net.conv1.bias.requires_grad and with_probes.net.conv1.weight.requires_grad
    assert with_probes.device == torch.device("cpu")


@pytest.mark.slow
def test_online_mode_steps_the_probes_every_batch_and_writes_every_n_steps(digits, tmp_path):
    callback = ProbeCallback(digits, module="net", layers=LAYERS, mode="online", every_n_steps=5, probe_lr=1e-2,
                             quiet=True)
    module = DigitsModule()
    _trainer(tmp_path, [callback], max_epochs=3).fit(module, *_loaders(digits))  # 4 steps an epoch: 12 steps
    ds = callback.dataset
    assert ds.attrs["mode"] == "online"
    assert ds.epoch.values.tolist() == [0, 1, 2] and ds.step.values.tolist() == [0, 5, 10]
    assert ds.iterations.values[:, -1].tolist() == [10] * len(LAYERS)  # one probe step per training batch
    np.testing.assert_allclose(ds.model_loss.values[1:], [np.mean(module.losses[:5]), np.mean(module.losses[5:10])],
                               rtol=1e-6)  # the mean of the steps since the previous row, not an epoch's stale mean
    assert not any(m._forward_hooks for m in module.modules())  # the hooks went with the end of fit


@pytest.mark.slow
def test_data_that_does_not_fit_the_model_stops_fit_before_any_step(digits, tmp_path):
    module = DigitsModule()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    x, y = digits.train
    wrong = {"train": (x.repeat(1, 3, 1, 1), y), "valid": digits.valid}
    trainer = _trainer(tmp_path, [ProbeCallback(wrong, module="net", quiet=True)])
    with pytest.raises(ValueError, match=r"^the callback's train split does not fit Sequential: its inputs \(per-example "
                                         r"shape 3x8x8\) make the model raise RuntimeError: .*channels"):
        trainer.fit(module, *_loaders(digits))
    assert trainer.global_step == 0
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())

    short = {"train": digits.train, "valid": (digits.valid[0], digits.valid[1][:30])}
    with pytest.raises(ValueError, match="the valid split has 200 inputs but 30 labels"):
        _trainer(tmp_path, [ProbeCallback(short, module="net", quiet=True)]).fit(module, *_loaders(digits))


@pytest.mark.slow
def test_a_fit_resumed_from_a_checkpoint_continues_the_rows_of_its_store(digits, tmp_path):
    store, checkpoint = tmp_path / "r.zarr", tmp_path / "one.ckpt"
    module = DigitsModule()
    first = _trainer(tmp_path, [ProbeCallback(digits, store=store, module="net", layers=LAYERS, quiet=True)], max_epochs=1)
    first.fit(module, *_loaders(digits))
    first.save_checkpoint(checkpoint)

    with pytest.raises(ValueError, match=r"^the trainer resumes from a checkpoint at step 4, and the run \(kept in memory"):
        _trainer(tmp_path, [ProbeCallback(digits, module="net", quiet=True)]).fit(module, *_loaders(digits),
                                                                                    ckpt_path=checkpoint)
    callback = ProbeCallback(digits, store=store, module="net", layers=LAYERS, resume=True, quiet=True)
    _trainer(tmp_path, [callback], max_epochs=2).fit(DigitsModule(), *_loaders(digits), ckpt_path=checkpoint)
    ds = pk.open_run(store)
    assert ds.epoch.values.tolist() == [0, 1, 2] and ds.step.values.tolist() == [0, 4, 8]
    assert np.isfinite(ds.model_loss.values[1:]).all()


@pytest.mark.slow
def test_an_epoch_cut_short_by_max_steps_gets_no_row(digits, tmp_path):
    callback = ProbeCallback(digits, module="net", layers=LAYERS, quiet=True)
    _trainer(tmp_path, [callback], max_epochs=3, max_steps=6).fit(DigitsModule(), *_loaders(digits))
    assert callback.dataset.epoch.values.tolist() == [0, 1]


@pytest.mark.slow
def test_an_epoch_without_a_validation_pass_records_no_stale_validation_loss(digits, tmp_path):
    callback = ProbeCallback(digits, module="net", layers=["input", "fc2"], quiet=True)
    _trainer(tmp_path, [callback], max_epochs=2, check_val_every_n_epoch=2).fit(DigitsModule(), *_loaders(digits))
    valid = callback.model_losses.sel(split="valid").values
    assert np.isnan(valid[:2]).all() and np.isfinite(valid[2])  # the sanity check's val_loss is not epoch 1's


@pytest.mark.slow
def test_bad_arguments_are_refused_in_one_line(digits, tmp_path):
    with pytest.raises(ValueError, match="every_n_epochs must be an integer >= 1; got 0"):
        ProbeCallback(digits, every_n_epochs=0)
    with pytest.raises(ValueError, match="^module='nett' is not a submodule of DigitsModule; its children are net "):
        _trainer(tmp_path, [ProbeCallback(digits, module="nett", quiet=True)]).fit(DigitsModule(), *_loaders(digits))

    class NoForward(L.LightningModule):  # only training_step runs the network
        def __init__(self):
            super().__init__()
            self.net = pk.zoo.paper_convnet(input_size=8, width=(8, 16), hidden=32)

        def training_step(self, batch, batch_idx):
            return F.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="^NoForward defines no forward, so it cannot be probed as a whole; pass "
                                         "module= naming the network to probe \\(its children: net\\)$"):
        _trainer(tmp_path, [ProbeCallback(digits, quiet=True)]).fit(NoForward(), *_loaders(digits))


@pytest.mark.slow
def test_a_module_that_logs_no_training_loss_under_that_name_is_named_in_a_warning(digits, tmp_path):
    callback = ProbeCallback(digits, module="net", layers=["input", "fc2"], train_loss_key="loss", quiet=True)
    with pytest.warns(RuntimeWarning, match="the module logs no 'loss' \\(trainer.callback_metrics holds 'train_loss', "
                                            "'val_loss'\\); the run's model_loss stays NaN"):
        _trainer(tmp_path, [callback], max_epochs=1).fit(DigitsModule(), *_loaders(digits))
    assert np.isnan(callback.dataset.model_loss.values).all()


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)


def test_without_lightning_the_import_names_the_extra_in_one_line():
    result = _run("import sys; sys.modules['lightning'] = sys.modules['pytorch_lightning'] = None\n"
                  "import probekit.integrations.lightning")
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode != 0
    assert last == ('ImportError: probekit.integrations.lightning needs PyTorch Lightning 2.x, which is not installed; '
                    'pip install "probekit[lightning]"')


_STANDALONE_FIT = """
import sys
sys.modules["lightning"] = None  # as if only the standalone pytorch_lightning were installed
import torch, pytorch_lightning as pl
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
import probekit as pk
from probekit.integrations.lightning import ProbeCallback

class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = pk.zoo.paper_convnet(input_size=8, width=(8, 16), hidden=32)
    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss, on_epoch=True)
        return loss
    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

assert issubclass(ProbeCallback, pl.Callback)
data = pk.data.digits(limit=100)
callback = ProbeCallback(data, module="net", layers=["input", "fc2"], quiet=True)
pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
           enable_model_summary=False, callbacks=[callback]).fit(Module(), DataLoader(TensorDataset(*data.train), batch_size=50))
print(callback.dataset.epoch.values.tolist(), bool(callback.dataset.model_loss[1] > 0))
"""


@pytest.mark.slow
def test_standalone_pytorch_lightning_is_used_when_lightning_is_not_installed():
    result = _run(_STANDALONE_FIT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[0, 1] True"


def test_importing_probekit_and_its_integrations_package_imports_no_framework():
    result = _run("import sys, probekit, probekit.integrations\n"
                  "sys.exit(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers') if m in sys.modules) or 0)")
    assert result.returncode == 0, result.stderr or result.stdout
