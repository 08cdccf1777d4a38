"""pk.open_runs: many stores as one lazy dataset along ``run``, and one run back out of it."""

from __future__ import annotations

from pathlib import Path

import dask.array
import numpy as np
import pytest
import xarray as xr
from conftest import make_run

import probekit as pk
from probekit.run.many import RUN_ATTR, open_runs, run_names, select_run, split_runs
from probekit.run.schema import check_run, layout_of, rows_of
from probekit.run.store import RunWriter, StoreError


def _write(path: Path, ds: xr.Dataset) -> Path:
    with RunWriter(path, layout_of(ds)) as writer:
        for row in rows_of(ds):
            writer.append(row)
    return path


def _seeded(seed: int, **options) -> xr.Dataset:
    ds = make_run(**options)
    ds.attrs["seed"] = seed
    ds["probe"] = ds["probe"] + 0.01 * seed
    return ds


@pytest.fixture
def stores(tmp_path) -> Path:
    """Three runs of one model: seeds 0 and 1 (4 epochs), seed 2 with 2 epochs and another reduction."""
    _write(tmp_path / "s0.zarr", _seeded(0))
    _write(tmp_path / "s1.zarr", _seeded(1))
    other = _seeded(2, n_epochs=2)
    other = other.assign_coords(reduction=("layer", np.array(["flatten"] + ["pool2"] * 4 + ["flatten"], dtype=object)))
    _write(tmp_path / "s2.zarr", other)
    return tmp_path


def test_a_glob_opens_every_run_along_run_with_attributes_as_coordinates(stores):
    ds = open_runs(str(stores / "*.zarr"))
    assert run_names(ds) == ["s0", "s1", "s2"]
    assert dict(ds.sizes) == {"run": 3, "layer": 6, "epoch": 4, "metric": 6}
    assert list(ds.seed.values) == [0, 1, 2] and ds.seed.dims == ("run",) and ds.seed.attrs[RUN_ATTR] == "seed"
    assert list(ds.model.values) == ["toynet"] * 3 and ds.attrs["model"] == "toynet"  # shared: an attribute too
    assert "seed" not in ds.attrs
    assert ds["attr_l2"].attrs[RUN_ATTR] == "l2" and ds["l2"].dims == ("run", "layer", "epoch")  # no clash
    assert ds.reduction.dims == ("run", "layer") and ds.reduction.sel(run="s2", layer="conv1") == "pool2"
    assert ds.depth.dims == ("layer",)  # the same in every run
    assert list(ds.store.values) == [str(stores / f"s{i}.zarr") for i in range(3)]
    # the shorter run is padded with the store's fill values and marked
    assert ds.completed.sel(run="s2").values.tolist() == [True, True, False, False]
    assert np.isnan(ds.probe.sel(run="s2").isel(epoch=3).values).all()
    assert ds.step.sel(run="s2").values.tolist() == [0, 100, -1, -1] and ds.converged.dtype == bool
    for name in ("probe", "l2", "converged", "reduction_used", "wall_time"):
        assert isinstance(ds[name].data, dask.array.Array), name
    errors = ds.probe.sel(metric="valid_error").isel(epoch=1).compute()
    expected = [pk.open_run(stores / f"s{i}.zarr").probe.sel(metric="valid_error").isel(epoch=1).values for i in range(3)]
    np.testing.assert_array_equal(errors.values, np.stack(expected))


def test_select_run_gives_back_what_open_run_reads(stores):
    ds = open_runs([stores / "s2.zarr", stores / "s0.zarr"])
    assert run_names(ds) == ["s2", "s0"]
    for name in ("s2", "s0"):
        one = select_run(ds, name)
        assert isinstance(one.probe.data, dask.array.Array)
        one = one.load()
        check_run(one)
        assert one.identical(pk.open_run(stores / f"{name}.zarr"))
    assert list(split_runs(ds)) == ["s2", "s0"]
    with pytest.raises(ValueError, match=r"run='s9' is not in this dataset; choose from: s2, s0"):
        select_run(ds, "s9")
    with pytest.raises(ValueError, match="has no 'run' dimension; open several runs with probekit.open_runs"):
        run_names(pk.open_run(stores / "s0.zarr"))


def test_a_mapping_names_the_runs_and_the_package_exports_open_runs(stores):
    ds = pk.open_runs({"first": stores / "s0.zarr", "second": stores / "s1.zarr"})
    assert run_names(ds) == ["first", "second"] and list(ds.seed.values) == [0, 1]


def test_opening_reads_no_data_variable(stores):
    """Every data chunk of the stores is garbage: opening still works (it reads metadata and coordinates only),
    and computing a variable is what fails."""
    for chunk in stores.glob("*.zarr/*/0*"):
        if chunk.parent.name in ("probe", "l2", "nonfinite", "converged", "iterations", "wall_time", "model_loss",
                                 "model_error", "reduction_used"):
            chunk.write_bytes(b"not a blosc chunk")
    with pytest.raises(StoreError, match="is damaged: cannot read"):
        pk.open_run(stores / "s0.zarr")  # the single-run reader reads everything
    ds = open_runs(str(stores / "*.zarr"))
    assert ds.sizes["run"] == 3 and list(ds.seed.values) == [0, 1, 2]
    with pytest.raises(Exception):  # noqa: B017 - the codec's own error, raised only when data is read
        ds.probe.compute()


def test_a_run_still_being_written_is_read_up_to_its_completed_epochs(tmp_path):
    full = _seeded(0, n_epochs=5)
    _write(tmp_path / "done.zarr", _seeded(1, n_epochs=5))
    rows = rows_of(full)
    with RunWriter(tmp_path / "live.zarr", layout_of(full)) as writer:
        for row in rows[:2]:
            writer.append(row)
        ds = open_runs(str(tmp_path / "*.zarr"))
        for row in rows[2:]:  # the writer goes on after the open
            writer.append(row)
        assert ds.completed.sel(run="live").values.tolist() == [True, True, False, False, False]
        live = select_run(ds, "live").load()
        assert live.sizes["epoch"] == 2
        np.testing.assert_array_equal(live.probe.values, full.probe.isel(epoch=slice(0, 2)).values)
    whole = open_runs(str(tmp_path / "*.zarr"))
    assert whole.completed.dims == ("run", "epoch") and whole.completed.all()


def test_bad_inputs_are_one_line_errors(tmp_path, stores):
    with pytest.raises(FileNotFoundError, match=r"no run store matches '.*nothing-\*\.zarr'.*check the pattern"):
        open_runs(str(tmp_path / "nothing-*.zarr"))
    (tmp_path / "notes.zarr").mkdir()
    (tmp_path / "notes.zarr" / "a.txt").write_text("x")
    with pytest.raises(StoreError, match=r"notes.zarr' is not a probekit run store"):
        open_runs(str(tmp_path / "*.zarr"))
    with pytest.raises(StoreError, match=r"is a folder holding 4 '\*\.zarr' folders, not a run store itself; pass '.*/\*\.zarr' to open"):
        open_runs(stores)
    with pytest.raises(FileNotFoundError, match="no run store at"):
        open_runs([stores / "s0.zarr", stores / "gone.zarr"])
    with pytest.raises(TypeError, match="open_runs takes a glob pattern"):
        open_runs(3)
    with pytest.raises(ValueError, match="join must be one of 'exact', 'inner'; got 'outer'"):
        open_runs(str(stores / "s*.zarr"), join="outer")
    with pytest.raises(ValueError, match=r"layers nope are not in run 's0'; it has: input, conv1"):
        open_runs(str(stores / "s*.zarr"), layers=["input", "nope"])


def test_runs_of_other_layers_or_metrics_are_refused_naming_them_and_the_way_out(tmp_path, stores):
    _write(stores / "short.zarr", _seeded(3, n_layers=4))
    pattern = str(stores / "*.zarr")
    with pytest.raises(ValueError) as caught:
        open_runs(pattern)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("the runs differ in their layers: 's0', 's1', 's2' have ")
    assert "'short' has " in message and "pass layers=['input', 'conv1', 'relu2', 'logits']" in message
    assert "join='inner'" in message and "subset of the stores" in message
    inner = open_runs(pattern, join="inner")
    assert list(inner.layer.values) == ["input", "conv1", "relu2", "logits"] and inner.sizes["run"] == 4
    chosen = open_runs(pattern, layers=["input", "logits"])
    assert list(chosen.layer.values) == ["input", "logits"]
    np.testing.assert_array_equal(select_run(chosen, "short").probe.values,
                                  pk.open_run(stores / "short.zarr").probe.sel(layer=["input", "logits"]).values)

    _write(tmp_path / "m" / "a.zarr", _seeded(0))
    _write(tmp_path / "m" / "b.zarr", _seeded(1, splits=("train", "valid")))
    with pytest.raises(ValueError, match=r"the runs differ in their metrics: .* pass metrics=\['train_error', "):
        open_runs(str(tmp_path / "m" / "*.zarr"))
    assert open_runs(str(tmp_path / "m" / "*.zarr"), join="inner").sizes["metric"] == 4

    _write(tmp_path / "b" / "a.zarr", _seeded(0))
    _write(tmp_path / "b" / "b.zarr", _seeded(1, baselines=("random_init",), n_epochs=2))
    with pytest.raises(ValueError, match=r"the runs differ in their baselines \('a': none; 'b': random_init\)"):
        open_runs(str(tmp_path / "b" / "*.zarr"))


def test_list_attributes_and_attributes_some_runs_lack_come_back_as_they_were(tmp_path):
    """make_run with baselines records them as a list attribute; a run without them lacks the attribute."""
    with_lists = _seeded(0, baselines=("random_init", "control"))
    with_lists.attrs["note"] = "first"
    _write(tmp_path / "a.zarr", with_lists)
    _write(tmp_path / "b.zarr", _seeded(1, baselines=("random_init", "control"), n_epochs=3))
    ds = open_runs(str(tmp_path / "*.zarr"))
    assert ds["attr_baselines"].values.tolist() == ['["random_init", "control"]'] * 2  # 'baselines' is a variable
    assert ds["note"].values[0] == "first" and np.isnan(ds["note"].values[1]) and "note" not in ds.attrs
    for name in ("a", "b"):
        one = select_run(ds, name).load()
        assert one.identical(pk.open_run(tmp_path / f"{name}.zarr"))
    assert select_run(ds, "a").attrs["baselines"] == ["random_init", "control"]
    assert "note" not in select_run(ds, "b").attrs


def test_runs_at_fsspec_urls_open_by_glob_and_by_list():
    """Stores at URLs (here the in-memory filesystem): a URL glob finds them, named by their stores as locally."""
    import uuid

    import fsspec

    folder = f"/probekit-many-{uuid.uuid4().hex[:8]}"
    try:
        for seed in (0, 1):
            with RunWriter(f"memory://{folder}/s{seed}.zarr", layout_of(ds := _seeded(seed))) as writer:
                for row in rows_of(ds):
                    writer.append(row)
        ds = open_runs(f"memory://{folder}/*.zarr")
        assert run_names(ds) == ["s0", "s1"] and list(ds.seed.values) == [0, 1]
        assert list(ds.store.values) == [f"memory://{folder}/s{i}.zarr" for i in range(2)]
        assert isinstance(ds.probe.data, dask.array.Array)
        expected = pk.open_run(f"memory://{folder}/s1.zarr").probe
        np.testing.assert_array_equal(ds.probe.sel(run="s1").compute().values, expected.values)
        listed = open_runs([f"memory://{folder}/s1.zarr", f"memory://{folder}/s0.zarr"])
        assert run_names(listed) == ["s1", "s0"]
        with pytest.raises(FileNotFoundError, match="no run store matches"):
            open_runs(f"memory://{folder}/none-*.zarr")
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists(folder):
            fs.rm(folder, recursive=True)
