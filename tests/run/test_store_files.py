"""A new store's files are made in memory and written in one pass: they must be the store xarray.to_zarr writes.

The reference is ``Dataset.to_zarr(zarr_format=2, consolidated=True)`` with
the store's encoding (the epoch axis chunked in blocks, no fill value for
integers, booleans and strings): the same metadata, entry for entry, the same
files, and arrays that decode to the same values through zarr and xarray.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr

from probekit.run import store
from probekit.run.schema import EpochRow, RunLayout, build_dataset, metric_names
from probekit.run.store import EPOCH_BLOCK, RunWriter, open_run


def _layout(classes=10, baselines=(), repeats=1, names=("input", "conv1", "layer1.0.relu_2"), **attrs) -> RunLayout:
    n = len(names)
    return RunLayout(
        layers=list(names), depth=[0, 3, 17][:n], relative_depth=[0.0, 0.25, 1.0][:n], op=["input", "Conv2d", "relu"][:n],
        shape=["3x8x8", "16x8x8", "32x4x4"][:n], feature_dim=[192, 1024, 512][:n],
        reduction=["flatten", "auto(pool|pool2|flatten)", "pool4"][:n], layouts=["map"] * n,
        metrics=metric_names(["train", "valid", "test"][: 2 + (classes > 5)], classes, control="control" in baselines),
        attrs={"model": "toy", "seed": 0, "l2": "auto", "n_train": np.int64(40), "chance_error": np.float32(0.9),
               "baselines": ", ".join(baselines), "repeats": repeats, **attrs},
        baselines=baselines, repeats=repeats,
    )


def _row(layout: RunLayout, epoch: int) -> EpochRow:
    n, m = len(layout.layers), len(layout.metrics)
    return EpochRow(
        epoch=epoch, step=epoch * 7, probe=np.full((n, m), epoch + 0.5), nonfinite=np.arange(n) == 1,
        iterations=np.full(n, 3 + epoch), converged=np.ones(n, bool), wall_time=float(epoch), l2=np.full(n, 1e-3),
        reduction_used=["flatten", "pool2", "pool4"][:n],
        baseline=np.full((n, len(layout.baselines), m), 0.25) if layout.baselines else None,
        repeat=np.full((n, layout.repeats, m), 0.75) if layout.repeats > 1 else None,
    )


def _xarray_store(ds: xr.Dataset, path: Path) -> None:
    encoding = {}
    for name, variable in ds.variables.items():
        entry = {"chunks": tuple(EPOCH_BLOCK if dim == "epoch" else n for dim, n in variable.sizes.items())}
        if variable.dtype.kind in "iub":
            entry["_FillValue"] = None
        encoding[name] = entry
    ds.to_zarr(path, mode="w-", zarr_format=2, consolidated=True, encoding=encoding)


def _files(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}


CASES = {
    "plain": (_layout(), 0, EPOCH_BLOCK),
    "five classes, no test split": (_layout(classes=5), 0, EPOCH_BLOCK),
    "baselines and repeats": (_layout(baselines=("random_init", "control"), repeats=3), 0, EPOCH_BLOCK),
    "one layer": (_layout(names=("input",)), 0, EPOCH_BLOCK),
    "rows, several blocks and an edge chunk": (_layout(baselines=("control",)), 3, 2 * EPOCH_BLOCK + 5),
    "rows, fewer epochs than a block": (_layout(repeats=2), 2, None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_store_files_are_what_xarray_writes(tmp_path, case):
    layout, rows, capacity = CASES[case]
    ds = build_dataset(layout, [_row(layout, e) for e in range(rows)], capacity=capacity)
    ds.attrs["completed_epochs"] = rows
    reference, made = tmp_path / "xarray.zarr", tmp_path / "made.zarr"
    _xarray_store(ds, reference)
    store._write_tree(made, store._store_files(ds))

    assert _files(made) == _files(reference)
    ours, theirs = (json.loads((p / ".zmetadata").read_text()) for p in (made, reference))
    assert ours == theirs
    for key in theirs["metadata"]:
        assert json.loads((made / key).read_text()) == json.loads((reference / key).read_text()), key
    a, b = (zarr.open_group(p, mode="r", zarr_format=2, use_consolidated=False) for p in (made, reference))
    for name in ds.variables:
        np.testing.assert_array_equal(a[name][...], b[name][...], err_msg=name)
    with xr.open_zarr(made, consolidated=True, chunks=None) as mine, xr.open_zarr(reference, consolidated=True, chunks=None) as ref:
        xr.testing.assert_identical(mine.load(), ref.load())


def test_a_store_made_in_one_pass_is_written_resumed_and_read(tmp_path):
    layout = _layout(baselines=("control",), repeats=2)
    path = tmp_path / "r.zarr"
    with RunWriter(path, layout) as writer:
        for epoch in range(3):
            writer.append(_row(layout, epoch))
    with RunWriter(path, layout, resume=True) as writer:
        assert [r.epoch for r in writer.rows] == [0, 1, 2]
        writer.append(_row(layout, 3))
    ds = open_run(path)
    assert ds.epoch.values.tolist() == [0, 1, 2, 3] and ds.step.values.tolist() == [0, 7, 14, 21]
    np.testing.assert_array_equal(ds.probe.values[:, 3], _row(layout, 3).probe)
    np.testing.assert_array_equal(ds.probe_repeat.values[:, 1], _row(layout, 1).repeat)
    assert ds.reduction_used.values[:, 2].tolist() == ["flatten", "pool2", "pool4"]
    assert ds.attrs["n_train"] == 40 and ds.attrs["chance_error"] == pytest.approx(0.9)


def test_overwrite_sets_the_old_store_aside_and_removes_it(tmp_path):
    layout = _layout()
    path = tmp_path / "r.zarr"
    with RunWriter(path, layout) as writer:
        writer.append(_row(layout, 0))
    stale = tmp_path / f".r.zarr{store._TRASH}1-dead"  # left by a process killed while removing it
    stale.mkdir()
    (stale / ".zgroup").write_text("{}")
    other = tmp_path / f".other.zarr{store._TRASH}1-dead"  # another store's: not this writer's to remove
    other.mkdir()
    with RunWriter(path, layout, overwrite=True) as writer:
        assert writer.rows == []
    store._wait_discarded()
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, "r.zarr"]
    assert open_run(path).sizes["epoch"] == 0


def test_attributes_that_are_not_json_are_refused_before_anything_is_written(tmp_path):
    layout = _layout(when=object())
    with pytest.raises(TypeError, match="run attribute 'when' is of type object, which a store cannot hold"):
        RunWriter(tmp_path / "r.zarr", layout)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("epochs", [1, EPOCH_BLOCK + 3])
def test_epochs_appended_chunk_by_chunk_read_as_what_xarray_writes(tmp_path, epochs):
    """Each epoch is written into its chunk directly; the store then reads exactly as xarray's store of the same rows."""
    layout = _layout(baselines=("random_init",), repeats=2)
    rows = [_row(layout, e) for e in range(epochs)]
    path = tmp_path / "r.zarr"
    with RunWriter(path, layout) as writer:
        for row in rows:
            writer.append(row)
    reference = tmp_path / "xarray.zarr"
    capacity = EPOCH_BLOCK * (1 + (epochs - 1) // EPOCH_BLOCK)
    ds = build_dataset(layout, rows, capacity=capacity)
    _xarray_store(ds, reference)
    a, b = (zarr.open_group(p, mode="r", zarr_format=2, use_consolidated=False) for p in (path, reference))
    for name in layout.epoch_variables():
        axis = ds[name].dims.index("epoch")
        where = tuple(slice(0, epochs) if i == axis else slice(None) for i in range(ds[name].ndim))
        assert a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(a[name][where], b[name][where], err_msg=name)
    xr.testing.assert_identical(open_run(path), build_dataset(layout, rows).assign_attrs(probekit_schema=2))
    assert not list(path.rglob(".*partial*"))  # no temporary chunk is left behind
