"""probekit sweep: a grid of `probekit run` cells on a real dask LocalCluster, a failing cell, and a resume."""

from __future__ import annotations

import json
import re
import sys

import pytest

import probekit as pk
from probekit import cli
from probekit.sweep import SUMMARY_FILE, cells_of, load_spec, open_sweep, option_argv, parse_grid

#: Shared arguments of the sweep's cells: the paper's convnet on 60 embedded digits, three probe points.
SHARED = ["--", "--epochs", "2", "--limit", "60", "--layers", "input,pool1,fc2", "--device", "cpu"]
#: The store's test hook (docs/store.md): a writer dies by SIGKILL after this many file writes, here
#: halfway through writing epoch 1 (the store's creation is 1 write, each epoch 11 arrays and 2 commits).
KILL_IN_EPOCH_1 = "20"


@pytest.mark.slow
def test_a_sweep_reports_its_failing_cell_finishes_the_others_and_resumes(tmp_path, capsys, monkeypatch):
    from dask.distributed import LocalCluster

    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out), "--grid", "reduce=pool,nope", "--workers", "2", *SHARED]

    # 1. every writer is killed halfway through epoch 1; the cell with a bad reduction fails on its own
    monkeypatch.setenv("PROBEKIT_KILL_AFTER_WRITES", KILL_IN_EPOCH_1)
    assert cli.main(argv) == 1
    printed = capsys.readouterr().out
    summary = json.loads((out / SUMMARY_FILE).read_text())["cells"]
    assert set(summary) == {"reduce=pool", "reduce=nope"}
    assert summary["reduce=nope"]["status"] == "failed"
    assert summary["reduce=nope"]["error"].startswith("unknown reduction 'nope'; use one of 'auto', 'flatten'")
    assert summary["reduce=pool"]["status"] == "failed" and summary["reduce=pool"]["error"].startswith("killed by SIGKILL")
    assert "\n" not in summary["reduce=nope"]["error"] and "unknown reduction 'nope'" in printed
    assert pk.open_run(out / "reduce=pool.zarr").sizes["epoch"] == 1  # epoch 0 is in, epoch 1 was cut short
    assert not (out / "reduce=nope.zarr").exists()
    monkeypatch.delenv("PROBEKIT_KILL_AFTER_WRITES")

    # 2. the same sweep on a scheduler given by address: the unfinished cell resumes from its store
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, protocol="tcp", dashboard_address=None) as cluster:
        assert cluster.scheduler_address.startswith("tcp://")
        assert cli.main([*argv[:5], "--scheduler", cluster.scheduler_address, *SHARED]) == 1
    printed = capsys.readouterr().out
    summary = json.loads((out / SUMMARY_FILE).read_text())["cells"]
    assert summary["reduce=pool"]["status"] == "done" and summary["reduce=pool"]["resumed"] is True
    assert summary["reduce=nope"]["status"] == "failed" and "(resumed)" in printed
    done = pk.open_run(out / "reduce=pool.zarr")
    assert done.epoch.values.tolist() == [0, 1, 2] and set(done.reduction.values) <= {"pool", "flatten"}
    finished = (out / "reduce=pool.zarr" / ".zmetadata").stat().st_mtime_ns

    # 3. again: the finished cell is skipped, the failing one tried again and reported again
    assert cli.main(argv) == 1
    printed = capsys.readouterr().out
    assert "skipped  reduce=pool" in printed and "failed  reduce=nope" in printed
    assert "2 cells: 0 done, 1 skipped (done before), 1 failed" in printed
    assert (out / "reduce=pool.zarr" / ".zmetadata").stat().st_mtime_ns == finished
    ds = pk.open_runs(str(out / "*.zarr"))
    assert ds.sizes["run"] == 1 and ds.run.values.tolist() == ["reduce=pool"]
    swept = open_sweep(out)  # the done cells, with the grid's values along run
    assert swept.run.values.tolist() == ["reduce=pool"] and swept.grid_reduce.values.tolist() == ["pool"]
    assert float(swept.probe.sel(run="reduce=pool", layer="fc2", metric="valid_error").isel(epoch=-1)) == float(
        done.probe.sel(layer="fc2", metric="valid_error").isel(epoch=-1))


@pytest.mark.parametrize("argv, message", [
    (["--grid", "bogus=1"], "--grid 'bogus' is not an option of probekit run; choose from: model, model-arg"),
    (["--grid", "seed"], "--grid 'seed' is not KEY=V1,V2,...; e.g. --grid seed=0,1"),
    (["--grid", "seed=0,"], "--grid 'seed=0,' is not KEY=V1,V2,..."),
    (["--grid", "seed=0", "--grid", "seed=1"], "--grid names 'seed' twice; give all its values at once"),
    (["--grid", "seed=0,0"], "--grid 'seed' repeats a value (0, 0); give each value once"),
    (["--grid", "out=a,b"], "--out is set by the sweep for each cell"),
    (["--grid", "seed=0", "--", "--overwrite"], "--overwrite is set by the sweep for each cell"),
    (["--grid", "epochs=1,-1"], "sweep cell 'epochs=-1': --epochs must be an integer >= 0; got -1; fix the grid"),
    (["--grid", "seed=0", "--", "--limti", "5"], "sweep cell 'seed=0': unrecognized arguments: --limti 5"),
    (["--grid", "mode=fast"], "sweep cell 'mode=fast': argument --mode: invalid choice: 'fast'"),
    (["--grid", "seed=0", "--workers", "0"], "--workers must be an integer >= 1; got 0"),
    (["--spec", "missing.json"], "cannot read the sweep spec 'missing.json'"),
    (["--grid", "seed=0", "--workers", "2", "--scheduler", "tcp://h:1"], "--workers sizes the LocalCluster made here"),
])
def test_a_bad_grid_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["sweep", "--out", "sweep", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("probekit: error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "sweep").exists()


def test_cells_are_the_grid_product_named_from_their_values():
    cells = cells_of({"model": ["timm:resnet18", "paper_convnet"], "seed": ["0", "1"]}, ["--epochs", "1"])
    assert [c.name for c in cells] == ["model=timm_resnet18,seed=0", "model=timm_resnet18,seed=1",
                                       "model=paper_convnet,seed=0", "model=paper_convnet,seed=1"]
    assert cells[1].argv == ("--epochs", "1", "--model", "timm:resnet18", "--seed", "1")
    assert cells[1].values == (("model", "timm:resnet18"), ("seed", "1"))
    twins = cells_of({"layers": ["a/b", "a:b"]})
    assert len({c.name for c in twins}) == 2 and all(c.name.startswith("layers=a_b-") for c in twins)
    assert [c.name for c in cells_of({})] == ["cell"]
    assert parse_grid(["--model_arg=width=8,width=16"]) == {"model-arg": ["width=8", "width=16"]}
    assert option_argv({"epochs": 2, "resume": False, "quiet": True, "model_arg": ["a=1", "b=2"]}) == [
        "--epochs", "2", "--quiet", "--model-arg", "a=1", "--model-arg", "b=2"]


def test_a_spec_file_holds_the_grid_and_the_shared_arguments(tmp_path, capsys):
    spec = {"grid": {"seed": [0, 1], "layers": ["input,fc2", "all"]}, "args": {"epochs": 2, "model_arg": ["w=8"]}}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(spec))
    grid, shared = load_spec(path)
    assert grid == {"seed": ["0", "1"], "layers": ["input,fc2", "all"]}
    assert shared == ["--epochs", "2", "--model-arg", "w=8"]
    assert cells_of(grid, shared)[0].name == "seed=0,layers=input,fc2"
    if sys.version_info >= (3, 11):
        toml = tmp_path / "sweep.toml"
        toml.write_text('[grid]\nseed = [0, 1]\n[args]\nepochs = 2\n')
        assert load_spec(toml) == ({"seed": ["0", "1"]}, ["--epochs", "2"])
    bad = tmp_path / "bad.json"
    for text, message in (("{", "cannot be read"), ('{"grid": {"seed": []}}', "must be a non-empty list"),
                          ('{"args": {}}', "has no 'grid' table"), ('{"grid": {}, "x": 1}', "unknown tables ['x']")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            load_spec(bad)
    assert cli.main(["sweep", "--out", str(tmp_path / "s"), "--spec", str(path), "--grid", "seed=3"]) == 2
    assert "--grid seed is also in the spec" in capsys.readouterr().err


def test_open_sweep_needs_a_sweep_with_a_done_cell(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no sweep in '.*' \(it has no sweep.json\); run probekit sweep"):
        open_sweep(tmp_path)
    (tmp_path / SUMMARY_FILE).write_text(json.dumps({"cells": {"seed=0": {"status": "failed", "store": "seed=0.zarr"}}}))
    with pytest.raises(ValueError, match=r"no cell of the sweep in '.*' is done yet \(1 cells, failed\)"):
        open_sweep(tmp_path)
    (tmp_path / SUMMARY_FILE).write_text("{")
    with pytest.raises(ValueError, match="sweep.json' cannot be read .*move it aside"):
        open_sweep(tmp_path)
