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


def test_explicit_arguments_win_over_what_the_data_implies(digits_tensors):
    from types import SimpleNamespace

    data = SimpleNamespace(train=digits_tensors["train"], valid=digits_tensors["valid"],
                           info=SimpleNamespace(num_classes=12, name="digits-12"))
    with pytest.raises(ValueError, match="the train split holds 10 of the 12 declared classes"):
        pk.ProbeMonitor(tiny_convnet(), data, layers=["fc2"], quiet=True)  # the data's own figure, when none is given
    mon = pk.ProbeMonitor(tiny_convnet(), data, layers=["fc2"], quiet=True, num_classes=10, dataset_name="my digits")
    assert mon.num_classes == 10 and mon.layout.attrs["num_classes"] == 10
    assert mon.layout.attrs["dataset"] == "my digits"
    data.info.num_classes = 10
    assert pk.ProbeMonitor(tiny_convnet(), data, layers=["fc2"], quiet=True).layout.attrs["dataset"] == "digits-12"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"mode": "both"}, "mode must be one of 'snapshot', 'online'; got 'both'"),
    ({"l2": -1.0}, "l2 must be a finite number >= 0 or one of 'auto'; got -1.0"),
    ({"l2": float("nan")}, "l2 must be a finite number >= 0 or one of 'auto'; got nan"),
    ({"probe_lr": 0}, "probe_lr must be a finite number > 0; got 0"),
    ({"batch_size": 0}, "batch_size must be an integer >= 1; got 0"),
    ({"max_iter": 2.5}, "max_iter must be an integer >= 1; got 2.5"),
    ({"budget": 0}, "budget must be an integer >= 1; got 0"),
    ({"num_classes": 1}, "num_classes must be an integer >= 2 or None; got 1"),
    ({"model_name": 3}, "model_name must be a str or None; got 3"),
    ({"quiet": "yes"}, "quiet must be a bool; got 'yes'"),
    ({"tracer_kwargs": ["leaf_modules"]}, "tracer_kwargs must be a Mapping or None; got ['leaf_modules']"),
    ({"model": "convnet"}, "model must be a Module; got 'convnet'"),
])
def test_argument_checks_name_the_argument_what_it_must_be_and_what_it_got(digits_tensors, kwargs, message):
    import re

    model = kwargs.pop("model", tiny_convnet())
    with pytest.raises(ValueError, match=re.escape(message)):
        pk.ProbeMonitor(model, digits_tensors, **{"quiet": True, **kwargs})


def test_epochs_are_never_negative_and_an_unknown_step_is_none(digits_tensors):
    mon = pk.ProbeMonitor(tiny_convnet(), digits_tensors, layers=["fc2"], quiet=True)
    with pytest.raises(ValueError, match=r"epoch must be an integer >= 0 or None; got -1"):
        mon.update(epoch=-1)
    with pytest.raises(ValueError, match=r"step must be an integer >= 0 or None; got -1"):
        mon.update(step=-1)
    mon.update()
    mon.update(step=7)
    assert mon.dataset.epoch.values.tolist() == [0, 1]
    assert mon.dataset.step.values.tolist() == [-1, 7]  # the store's value for an unknown step


def test_progress_is_one_line_per_stage_when_stderr_is_not_a_terminal(digits_tensors, capsys):
    pk.probe(tiny_convnet(), digits_tensors, layers=["fc2"])
    out, err = capsys.readouterr()
    assert out.startswith("probe plan: 1 layer of Sequential, 10 classes")
    assert "\r" not in err
    assert err.splitlines() == [line for line in err.splitlines() if line.endswith(" s")]
    assert [line.split(":")[0] for line in err.splitlines()] == ["train features", "valid features", "test features"]
    assert "train features: 1,000 examples in " in err
    pk.probe(tiny_convnet(), digits_tensors, layers=["fc2"], quiet=True)
    assert capsys.readouterr() == ("", "")


def test_progress_on_a_terminal_is_a_bar():
    import io

    from probekit.engine.monitor import _progress

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    screen = Terminal()
    with _progress(100, "train features", quiet=False, file=screen) as bar:
        bar.update(50)
        bar.update(50)
    assert "\r" in screen.getvalue() and "train features" in screen.getvalue()


def test_the_extractors_are_built_once_per_run_and_again_only_when_a_module_is_replaced(digits_tensors, monkeypatch):
    import probekit.engine.monitor as monitor_module

    built = []
    real = monitor_module.build_extractor
    monkeypatch.setattr(monitor_module, "build_extractor", lambda *a, **k: built.append(1) or real(*a, **k))
    model = tiny_convnet()
    mon = pk.ProbeMonitor(model, digits_tensors, layers=["relu1", "fc2"], l2=1e-3, repeats=2, quiet=True)
    first = len(built)  # the run's extractor, and the repeats' seeded ones once needed
    mon.update(epoch=0)
    after_one = len(built)
    mon.update(epoch=1)
    assert len(built) == after_one >= first
    # A replaced module must be read, not the one the extractor was built with: fc2 now outputs a constant.
    model.fc2 = nn.Linear(32, 10)
    nn.init.zeros_(model.fc2.weight)
    nn.init.zeros_(model.fc2.bias)
    mon.update(epoch=2)
    assert len(built) > after_one
    ds = mon.dataset
    mon.close()
    errors = ds.probe.sel(layer="fc2", metric="valid_error").values
    assert errors[2] > 0.5 > errors[1]  # a constant carries no class: chance error
