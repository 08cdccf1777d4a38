"""autocast= through pk.probe, pk.probe_checkpoints, ProbeMonitor (both modes), train_and_probe and the CLI, on the CPU (bf16)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import probekit as pk
from probekit import cli
from probekit.engine import monitor as monitor_module
from probekit.engine.features import autocast_dtype, autocast_name
from probekit.engine.training import train_and_probe
from tests.conftest import tiny_convnet


def _trained(digits_tensors, steps: int = 20):
    """The tiny convnet after a few SGD steps, so that its layers differ in how well they separate the digits."""
    model = tiny_convnet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = digits_tensors["train"]
    for i in range(steps):
        rows = slice((i * 50) % 1000, (i * 50) % 1000 + 50)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[rows]), y[rows]).backward()
        opt.step()
    return model


def test_bf16_probe_matches_float32_per_layer_and_records_the_setting(digits_tensors):
    model = _trained(digits_tensors)
    options = dict(layers=["input", "pool1", "fc1", "fc2"], reduce="pool2", l2=1e-2, quiet=True, device="cpu")
    full = pk.probe(model, digits_tensors, **options)
    mixed = pk.probe(model, digits_tensors, autocast="bf16", **options)
    assert full.attrs["autocast"] == "none" and mixed.attrs["autocast"] == "bf16"
    errors = {name: ds.probe.sel(metric="valid_error").squeeze("epoch").values for name, ds in (("f", full), ("m", mixed))}
    assert np.all(np.isfinite(errors["m"]))
    np.testing.assert_allclose(errors["m"], errors["f"], atol=0.02)  # within two points, layer by layer


def test_features_are_float32_though_the_forward_ran_in_bf16(digits_tensors, monkeypatch):
    model = tiny_convnet()
    seen = {"forward": set(), "fit": set()}
    model.conv1.register_forward_hook(lambda m, a, out: seen["forward"].add(out.dtype))
    fit = monitor_module.fit_probes

    def spy(features, *args, **kwargs):
        seen["fit"].update(v.dtype for v in features.values())
        return fit(features, *args, **kwargs)

    monkeypatch.setattr(monitor_module, "fit_probes", spy)
    mon = pk.ProbeMonitor(model, digits_tensors, layers=["conv1", "fc1"], reduce="pool", l2=1e-3, quiet=True,
                          autocast=torch.bfloat16)
    cached = mon._extract_all(mon._extractor(), ["valid"])
    assert {v.dtype for v in cached["valid"].features.values()} == {torch.float32}
    mon.update(epoch=0)
    mon.close()
    assert torch.bfloat16 in seen["forward"]  # the extraction passes ran under autocast
    assert seen["fit"] == {torch.float32}
    assert mon.dataset.attrs["autocast"] == "bf16"


def test_online_monitor_scores_under_autocast(digits_tensors):
    model = tiny_convnet()
    mon = pk.ProbeMonitor(model, digits_tensors, mode="online", layers=["relu1", "fc1"], quiet=True, probe_lr=1e-2,
                          autocast="bfloat16")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = digits_tensors["train"]
    model.train()
    for i in range(0, 1000, 100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
        opt.step()
        mon.step(y[i:i + 100])
    ds = mon.update(epoch=1)
    mon.close()
    assert mon.dataset.attrs["autocast"] == "bf16" and mon.dataset.attrs["mode"] == "online"
    assert np.isfinite(ds.probe.sel(metric="valid_error").values).all()


def test_probe_checkpoints_and_train_and_probe_record_autocast(digits_tensors, tmp_path):
    path = tmp_path / "c0.pt"
    torch.save(tiny_convnet().state_dict(), path)
    ds = pk.probe_checkpoints(tiny_convnet, [path], digits_tensors, layers=["fc1"], reduce="flatten", quiet=True,
                              device="cpu", autocast="fp16")
    assert ds.attrs["autocast"] == "fp16"
    small = {k: (x[:200], y[:200]) for k, (x, y) in digits_tensors.items()}
    ds = train_and_probe(tiny_convnet(), small, epochs=1, layers=["fc1"], reduce="flatten", l2=1e-3, quiet=True,
                         device="cpu", autocast="bf16")
    assert ds.attrs["autocast"] == "bf16" and ds.sizes["epoch"] == 2


def test_a_store_records_autocast_as_a_string_and_resume_checks_it(digits_tensors, tmp_path):
    store = tmp_path / "a.zarr"
    options = dict(layers=["fc1"], reduce="flatten", l2=1e-3, quiet=True, device="cpu", store=store)
    pk.probe(tiny_convnet(), digits_tensors, autocast="bf16", **options)
    assert pk.open_run(store).attrs["autocast"] == "bf16"
    with pytest.raises(ValueError, match="autocast"):
        pk.probe(tiny_convnet(), digits_tensors, resume=True, **options)


@pytest.mark.parametrize("bad", ["int8", "BF16", torch.float32, 16, True])
def test_a_bad_autocast_is_a_one_line_error_everywhere(digits_tensors, bad):
    with pytest.raises(ValueError, match=r"^autocast must be one of 'bf16', 'bfloat16', 'fp16', 'float16' or "
                                         r"torch.bfloat16 or torch.float16 or None; got ") as error:
        pk.probe(tiny_convnet(), digits_tensors, autocast=bad, quiet=True)
    assert "\n" not in str(error.value)
    for call in (lambda: pk.ProbeMonitor(tiny_convnet(), digits_tensors, autocast=bad, quiet=True),
                 lambda: pk.ProbeMonitor(tiny_convnet(), digits_tensors, mode="online", autocast=bad, quiet=True),
                 lambda: train_and_probe(tiny_convnet(), digits_tensors, epochs=0, autocast=bad, quiet=True),
                 lambda: pk.probe_checkpoints(tiny_convnet, [__file__], digits_tensors, autocast=bad, quiet=True)):
        with pytest.raises(ValueError, match="^autocast must be"):
            call()


def test_autocast_names():
    assert autocast_dtype(None) is None and autocast_dtype("fp16") is torch.float16
    assert [autocast_name(v) for v in (None, "bfloat16", torch.float16)] == ["none", "bf16", "fp16"]


def test_cli_run_takes_autocast(tmp_path, capsys):
    out = str(tmp_path / "r.zarr")
    assert cli.main(["run", "--model", "tests.conftest:tiny_convnet", "--dataset", "digits", "--out", out,
                     "--reduce", "pool", "--layers", "fc1,fc2", "--l2", "0.001", "--autocast", "bf16", "--quiet"]) == 0
    assert pk.open_run(out).attrs["autocast"] == "bf16"
    with pytest.raises(SystemExit):
        cli.main(["run", "--out", out, "--autocast", "int8"])
    assert "--autocast: invalid choice: 'int8'" in capsys.readouterr().err
