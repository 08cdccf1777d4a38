"""ProbeMonitor (snapshot and online) inside a training loop; its argument checks and progress display."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import probekit as pk
from probekit.engine.extract import build_extractor
from tests.conftest import tiny_convnet


def test_probe_features_are_detached_from_the_model(digits_tensors):
    model = tiny_convnet()
    mon = pk.ProbeMonitor(model, digits_tensors, layers=["relu1", "fc2"], quiet=True)
    out = build_extractor(mon.graph, mon.plan.reducers)(digits_tensors["train"][0][:8])  # even outside no_grad
    assert all(not v.requires_grad for v in out.values())


def test_error_falls_with_training_under_the_monitor(digits_tensors, tmp_path):
    model = tiny_convnet()
    mon = pk.ProbeMonitor(model, digits_tensors, store=tmp_path / "m.zarr", quiet=True, layers=["input", "relu2", "fc2"])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = digits_tensors["train"]
    mon.update(epoch=0, step=0)
    for epoch in (1, 2):
        model.train()
        for i in range(0, 1000, 50):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x[i:i + 50]), y[i:i + 50])
            loss.backward()
            opt.step()
        mon.update(epoch=epoch, step=epoch * 20, model_loss=loss.item(), model_error=0.5)
        assert model.training  # the monitor restored the training mode
    ds = mon.dataset
    mon.close()
    fc2 = ds.probe.sel(layer="fc2", metric="valid_error").values
    assert fc2[-1] < fc2[0] - 0.1
    assert ds.step.values.tolist() == [0, 20, 40] and np.isnan(ds.model_loss.values[0]) and ds.model_error.values[-1] == 0.5
    np.testing.assert_array_equal(pk.open_run(tmp_path / "m.zarr").probe.values, ds.probe.values)
    with pytest.raises(ValueError, match="epoch 2 is not after the last written epoch 2"):
        mon.update(epoch=2)


def test_online_mode_steps_with_training_and_records_its_mode(digits_tensors):
    model = tiny_convnet()
    mon = pk.ProbeMonitor(model, digits_tensors, mode="online", layers=["input", "relu1", "fc1"], quiet=True, probe_lr=1e-2)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = digits_tensors["train"]
    params_before = [p.clone() for p in mon._online.parameters()]
    for epoch in range(2):
        model.train()
        for i in range(0, 1000, 50):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i:i + 50]), y[i:i + 50]).backward()
            opt.step()
            mon.step(y[i:i + 50])
        mon.update(epoch=epoch)
    ds = mon.dataset
    mon.close()
    assert ds.attrs["mode"] == "online" and ds.iterations.values[0, -1] == 40
    assert any(not torch.equal(a, b) for a, b in zip(params_before, mon._online.parameters()))
    assert (ds.probe.sel(metric="valid_error").isel(epoch=-1) < 0.5).all()
    assert not model.relu1._forward_hooks  # hooks removed on close


def test_online_mode_refuses_functional_nodes():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(20, 3, 32, 32)
    y = torch.arange(20) % 10
    with pytest.raises(ValueError, match="online mode reads module outputs.*'layer1.0.add' is a functional node \\(add\\); probe 'layer1.0' instead"):
        pk.ProbeMonitor(model, {"train": (x, y), "valid": (x, y)}, mode="online", layers=["layer1.0.add"], quiet=True)
