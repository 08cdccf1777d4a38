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


@pytest.mark.parametrize(("argv", "message"), [
    (["show", "nowhere.zarr"], "no run store at"),
    (["run", "--model", "paper_convnet", "--layers", "conv9", "--out", "x.zarr", "--quiet"], "unknown layer 'conv9'"),
    (["run", "--model", "no_such_model", "--out", "x.zarr", "--quiet"], "no_such_model"),
])
def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("probekit: error:") and message in err and "\n" not in err
