"""probekit.engine.training: the one training loop (train_epoch) and train_and_probe's use of it."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from probekit.engine.training import Minibatch, train_and_probe, train_epoch
from tests.conftest import tiny_convnet


def _loader(digits_tensors, batch_size=100):
    return DataLoader(TensorDataset(*digits_tensors["train"]), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def test_train_epoch_steps_calls_back_and_stops_at_the_step_asked(digits_tensors):
    model = tiny_convnet()
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    seen: list[Minibatch] = []
    result = train_epoch(model, optimizer, _loader(digits_tensors), device=torch.device("cpu"), step=5,
                         stop_at=12, on_step=seen.append)
    assert model.training
    assert result.step == 12 and [b.step for b in seen] == list(range(6, 13))  # mid-epoch: 7 of 10 minibatches
    assert all(b.labels.shape == (100,) and 0 <= b.error <= 1 and math.isfinite(b.loss) for b in seen)
    assert result.loss == pytest.approx(sum(b.loss for b in seen) / len(seen))
    full = train_epoch(model, optimizer, _loader(digits_tensors), device=torch.device("cpu"), step=result.step)
    assert full.step == 22
    untouched = [p.clone() for p in model.parameters()]
    none = train_epoch(model, optimizer, _loader(digits_tensors), device=torch.device("cpu"), step=22, stop_at=22)
    assert none.step == 22 and math.isnan(none.loss)
    assert all(torch.equal(a, b) for a, b in zip(untouched, model.parameters()))


def test_train_epoch_refuses_a_loss_that_is_not_finite(digits_tensors):
    model = tiny_convnet()
    with pytest.raises(FloatingPointError, match="training loss became nan at step 3; lower the learning rate"):
        train_epoch(model, torch.optim.SGD(model.parameters(), lr=0.05), _loader(digits_tensors),
                    device=torch.device("cpu"), step=3, loss_fn=lambda logits, y: logits.sum() * float("nan"))


def test_train_and_probe_online_steps_the_probes_with_probe_lr(digits_tensors):
    runs = {}
    for probe_lr in (1e-3, 1e-1):
        torch.manual_seed(0)
        runs[probe_lr] = train_and_probe(tiny_convnet(), digits_tensors, epochs=1, mode="online", probe_lr=probe_lr,
                                         layers=["input", "fc1"], lr=0.05, train_batch_size=100, device="cpu",
                                         quiet=True)
    ds = runs[1e-3]
    assert ds.attrs["mode"] == "online"
    assert ds.iterations.values[:, -1].tolist() == [10, 10]  # one probe step per training minibatch
    assert not np.allclose(ds.probe.values[:, -1], runs[1e-1].probe.values[:, -1])  # probe_lr reaches the probes
    np.testing.assert_array_equal(ds.model_loss.values[1:], runs[1e-1].model_loss.values[1:])  # lr is the model's alone


def test_an_explicit_num_classes_wins_over_the_data(digits_tensors):
    class Info:
        num_classes = 12

    class Splits(dict):
        info = Info()

    data = Splits(digits_tensors)
    ds = train_and_probe(tiny_convnet(), data, epochs=0, num_classes=10, layers=["fc2"], device="cpu", quiet=True)
    assert ds.attrs["num_classes"] == 10


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"epochs": -1}, "epochs must be an integer >= 0; got -1"),
    ({"epochs": 1, "optimizer": "rmsprop"}, "optimizer must be one of 'sgd', 'adam'; got 'rmsprop'"),
    ({"epochs": 1, "lr": 0}, r"lr must be a finite number > 0; got 0"),
    ({"epochs": 1, "train_batch_size": 0}, "train_batch_size must be an integer >= 1; got 0"),
])
def test_train_and_probe_rejects_bad_arguments_before_any_work(digits_tensors, kwargs, message):
    with pytest.raises(ValueError, match=message):
        train_and_probe(tiny_convnet(), digits_tensors, quiet=True, **kwargs)
