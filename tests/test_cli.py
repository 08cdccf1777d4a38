"""The probekit command end to end on the embedded digits."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import probekit as pk
from probekit import cli


def test_demo_end_to_end_as_a_console_script(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "probekit"), "demo", "--epochs", "1", "--quiet"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "valid_error per layer:" in result.stdout and "epoch 0" in result.stdout and "epoch 1" in result.stdout
    ds = pk.open_run(tmp_path / "runs" / "demo.zarr")
    assert ds.sizes["epoch"] == 2 and ds.attrs["model"] == "paper_convnet" and ds.attrs["dataset"] == "digits"
    assert list(ds.layer.values) == ["input", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "relu3", "fc2"]
    logits = ds.probe.sel(layer="fc2", metric="valid_error").values
    assert logits[1] < logits[0]  # one epoch of training already helps the last layer


def test_run_then_show_then_resume(tmp_path, capsys):
    out = str(tmp_path / "r.zarr")
    args = ["run", "--model", "paper_convnet", "--dataset", "digits", "--limit", "100", "--epochs", "2",
            "--layers", "input,pool1,fc2", "--out", out, "--quiet"]
    assert cli.main(args) == 0
    ds = pk.open_run(out)
    assert ds.sizes["epoch"] == 3 and list(ds.layer.values) == ["input", "pool1", "fc2"]
    assert np.isfinite(ds.model_loss.values[1:]).all()
    capsys.readouterr()
    assert cli.main(["show", out]) == 0
    shown = capsys.readouterr().out
    assert "3 epochs completed" in shown and "pool1" in shown and "best" in shown
    assert cli.main(args) == 2  # exists: refused
    assert "already exists" in capsys.readouterr().err
    assert cli.main([*args[:8], "3", *args[9:], "--resume"]) == 0  # one more epoch
    assert pk.open_run(out).sizes["epoch"] == 4


def test_run_a_fixed_model_from_a_package_path(tmp_path, capsys):
    out = str(tmp_path / "f.zarr")
    assert cli.main(["run", "--model", "tests.conftest:tiny_convnet", "--dataset", "digits", "--out", out,
                     "--reduce", "pool", "--quiet"]) == 0
    ds = pk.open_run(out)
    assert ds.sizes["epoch"] == 1 and set(ds.reduction.values) <= {"pool", "flatten"}


def small_net(num_classes: int = 10, width: int = 8, act: str = "relu"):
    """A factory for ``--model tests.test_cli:small_net``: 1x8x8 inputs, its arguments readable from the run's shapes."""
    from torch import nn

    activation = {"relu": nn.ReLU, "gelu": nn.GELU}[act]
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), activation(), nn.Linear(width, num_classes))


def _shapes(ds) -> dict[str, str]:
    return dict(zip(map(str, ds.layer.values), map(str, ds.shape.values)))


def test_run_a_factory_with_model_args_and_num_classes(tmp_path):
    out = str(tmp_path / "f.zarr")
    assert cli.main(["run", "--model", "tests.test_cli:small_net", "--model-arg", "width=5", "--model-arg", "act=gelu",
                     "--num-classes", "12", "--limit", "60", "--layers", "all", "--out", out, "--quiet"]) == 0
    ds = pk.open_run(out)
    shapes = _shapes(ds)
    assert shapes["1"] == "5" and shapes["3"] == "12"  # width=5 and --num-classes 12 reached the factory
    assert "GELU" in set(map(str, ds.op.values)) and ds.attrs["model"] == "small_net"
    assert ds.attrs["num_classes"] == 10  # the probes keep the dataset's classes


def test_run_timm_and_torchvision_models_by_name(tmp_path):
    vit = str(tmp_path / "vit.zarr")
    assert cli.main(["run", "--model", "timm:vit_tiny_patch16_224", "--model-arg", "img_size=8", "--model-arg", "patch_size=4",
                     "--model-arg", "depth=2", "--model-arg", "pretrained=false", "--limit", "60",
                     "--layers", "blocks.0,blocks.1,head", "--out", vit, "--quiet"]) == 0
    ds = pk.open_run(vit)
    assert ds.attrs["model"] == "vit_tiny_patch16_224" and list(ds.layer.values) == ["blocks.0", "blocks.1", "head"]
    assert _shapes(ds)["head"] == "10"  # the dataset's classes; in_chans=1 from the grey digits
    assert np.isfinite(ds.probe.sel(metric="valid_error").values).all()

    resnet = str(tmp_path / "tv.zarr")
    assert cli.main(["run", "--model", "torchvision:resnet18", "--num-classes", "7", "--channels", "3", "--limit", "60",
                     "--layers", "input,layer1.0,fc", "--out", resnet, "--quiet"]) == 0
    ds = pk.open_run(resnet)
    assert _shapes(ds) == {"input": "3x8x8", "layer1.0": "64x2x2", "fc": "7"} and ds.attrs["model"] == "resnet18"


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--model", "no_such_module_pk:make", "--out", "x.zarr", "--quiet"],
     "cannot import module 'no_such_module_pk' for --model no_such_module_pk:make: No module named 'no_such_module_pk'; "
     "check the spelling or pip install it"),
    (["run", "--model", "probekit.zoo:nothing", "--out", "x.zarr", "--quiet"],
     "has no attribute 'nothing' for --model probekit.zoo:nothing"),
    (["run", "--model", "timm:resnet19", "--out", "x.zarr", "--quiet"],
     "unknown timm model 'resnet19' in --model timm:resnet19; did you mean 'resnet18'"),
    (["run", "--model", "torchvision:resnt18", "--out", "x.zarr", "--quiet"], "did you mean 'resnet18'"),
    (["run", "--model", "timm:resnet18", "--model-arg", "depth", "--out", "x.zarr", "--quiet"],
     "--model-arg takes key=value"),
    (["run", "--model", "timm:resnet18", "--model-arg", "a=1", "--model-arg", "a=2", "--out", "x.zarr", "--quiet"],
     "--model-arg a is given twice"),
    (["run", "--model", "timm:resnet18", "--model-arg", "foo=1", "--limit", "20", "--out", "x.zarr", "--quiet"],
     "unexpected keyword argument 'foo'; fix or drop the --model-arg it names"),
    (["run", "--num-classes", "0", "--out", "x.zarr", "--quiet"], "--num-classes must be an integer >= 1; got 0"),
    (["show", "nowhere.zarr"], "no run store at"),
    (["run", "--model", "paper_convnet", "--layers", "conv9", "--out", "x.zarr", "--quiet"], "unknown layer 'conv9'"),
    (["run", "--model", "no_such_model", "--out", "x.zarr", "--quiet"], "no_such_model"),
    (["run", "--epochs", "-1", "--out", "x.zarr", "--quiet"], "--epochs must be an integer >= 0; got -1"),
    (["run", "--probe-lr", "0", "--out", "x.zarr", "--quiet"], "--probe-lr must be a finite number > 0; got 0.0"),
    (["run", "--channels", "2", "--out", "x.zarr", "--quiet"], "--channels must be one of 1, 3; got 2"),
])
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("probekit: error:") and message in err and "\n" not in err


def test_reproduce_arguments():
    parser = cli.parser()
    args = parser.parse_args(
        ["reproduce", "resnet-vs-inception", "--dataset", "imagenette", "--pretrained", "--out", "r", "--device", "cpu"]
    )
    assert (args.name, args.dataset, args.pretrained, args.full, args.quick, args.out, args.device) == (
        "resnet-vs-inception", "imagenette", True, False, False, "r", "cpu")
    assert args.func is cli.cmd_reproduce
    with pytest.raises(SystemExit):
        parser.parse_args(["reproduce", "nope"])


def test_lr_trains_the_model_and_probe_lr_the_probes(tmp_path, monkeypatch):
    from probekit.engine import training

    received = {}

    def fake_train_and_probe(model, data, **kwargs):
        received.update(kwargs)
        raise KeyboardInterrupt  # stop before any work: the arguments are what this test checks

    monkeypatch.setattr(training, "train_and_probe", fake_train_and_probe)
    argv = ["run", "--epochs", "2", "--mode", "online", "--lr", "0.2", "--probe-lr", "0.01", "--limit", "50",
            "--out", str(tmp_path / "o.zarr"), "--quiet"]
    assert cli.main(argv) == 130
    assert (received["lr"], received["probe_lr"], received["mode"], received["epochs"]) == (0.2, 0.01, "online", 2)
    assert received["model_name"] == "paper_convnet"

