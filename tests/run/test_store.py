"""The run store: schema, refusals, locking, concurrent readers, SIGKILL and resume."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import probekit as pk
from probekit.run.schema import EPOCH_VARIABLES, EpochRow, RunLayout, metric_names
from probekit.run.store import EPOCH_BLOCK, RunWriter, StoreError, StoreLockedError, open_run, open_run_lazy
from tests.conftest import tiny_convnet

FORK = multiprocessing.get_context("fork")


def _layout(layers=("input", "a", "b"), classes=10, **attrs) -> RunLayout:
    n = len(layers)
    return RunLayout(
        layers=list(layers), depth=list(range(n)), relative_depth=[i / max(n - 1, 1) for i in range(n)],
        op=["input"] + ["Linear"] * (n - 1), shape=["8"] * n, feature_dim=[8] * n, reduction=["flatten"] * n,
        metrics=metric_names(["train", "valid"], classes), attrs={"model": "toy", "seed": 0, **attrs},
    )


def _row(layout: RunLayout, epoch: int) -> EpochRow:
    n, m = len(layout.layers), len(layout.metrics)
    values = epoch + np.arange(n)[:, None] / 100 + np.arange(m)[None, :] / 10_000
    return EpochRow(epoch=epoch, step=epoch * 10, probe=values, nonfinite=np.zeros(n, bool),
                    iterations=np.full(n, epoch), converged=np.ones(n, bool), model_loss=epoch / 2, wall_time=epoch)


def _digest(path: Path) -> dict:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file() and p.name != ".writer.lock"}


def test_rows_round_trip_across_block_growth(tmp_path):
    layout = _layout()
    with RunWriter(tmp_path / "r.zarr", layout) as writer:
        for epoch in range(EPOCH_BLOCK + 5):
            writer.append(_row(layout, epoch))
    ds = open_run(tmp_path / "r.zarr")
    assert ds.sizes["epoch"] == EPOCH_BLOCK + 5 and ds.epoch.values[-1] == EPOCH_BLOCK + 4
    np.testing.assert_array_equal(ds.probe.values[:, 7], _row(layout, 7).probe)
    assert ds.step.values[3] == 30 and ds.model_loss.values[4] == 2.0 and np.isnan(ds.model_error.values[0])
    assert "completed_epochs" not in ds.attrs


def test_store_holds_no_pickles_and_writes_without_warnings(tmp_path):
    layout = _layout()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with RunWriter(tmp_path / "r.zarr", layout) as writer:
            writer.append(_row(layout, 0))
        open_run(tmp_path / "r.zarr")
    for path in (tmp_path / "r.zarr").rglob("*"):
        if path.is_file():
            assert not path.read_bytes().startswith(b"\x80"), f"{path} looks like a pickle"
    assert '"dtype": "|O"' not in (tmp_path / "r.zarr" / ".zmetadata").read_text()


def test_existing_store_needs_resume_or_overwrite(tmp_path):
    layout = _layout()
    with RunWriter(tmp_path / "r.zarr", layout) as writer:
        writer.append(_row(layout, 0))
    with pytest.raises(FileExistsError, match=r"already exists \(1 epochs of toy\); pass resume=True"):
        RunWriter(tmp_path / "r.zarr", layout)
    with RunWriter(tmp_path / "r.zarr", layout, resume=True) as writer:
        assert [r.epoch for r in writer.rows] == [0]
        writer.append(_row(layout, 1))
    with RunWriter(tmp_path / "r.zarr", layout, overwrite=True) as writer:
        assert writer.rows == []
    assert open_run(tmp_path / "r.zarr").sizes["epoch"] == 0


@pytest.mark.parametrize(("other", "message"), [
    (_layout(layers=("input", "a", "c")), r"its layers differ \(new layers \['c'\]; missing \['b'\]\)"),
    (_layout(classes=3), "its metrics differ"),
    (_layout(model="other"), "its 'model' differs"),
])
def test_store_of_another_run_is_refused_and_untouched(tmp_path, other, message):
    layout = _layout()
    with RunWriter(tmp_path / "r.zarr", layout) as writer:
        writer.append(_row(layout, 0))
    before = _digest(tmp_path / "r.zarr")
    with pytest.raises(StoreError, match=message + ".*nothing was written"):
        RunWriter(tmp_path / "r.zarr", other, resume=True)
    assert _digest(tmp_path / "r.zarr") == before


def test_paths_that_are_not_stores_are_refused_before_any_work(tmp_path, digits_tensors):
    (tmp_path / "file.zarr").write_text("x")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("keep me")
    model = tiny_convnet()
    calls = []
    model.conv1.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(StoreError, match="is a file; pass a folder path"):
        pk.probe(model, digits_tensors, store=tmp_path / "file.zarr", quiet=True)
    with pytest.raises(StoreError, match="is a folder that is not a probekit run store; refusing to write into it"):
        pk.probe(model, digits_tensors, store=tmp_path / "folder", quiet=True)
    assert (tmp_path / "folder" / "notes.txt").read_text() == "keep me"
    assert len(calls) <= 4  # each call ran only its two shape-discovery passes, no extraction
    with pytest.raises(FileNotFoundError, match="no run store at"):
        open_run(tmp_path / "missing.zarr")
    with pytest.raises(StoreError, match="is a file, not a run store"):
        open_run(tmp_path / "file.zarr")
    with pytest.raises(StoreError, match="not a probekit run store"):
        open_run(tmp_path / "folder")


def test_store_of_another_schema_version_is_refused(tmp_path):
    layout = _layout()
    with RunWriter(tmp_path / "r.zarr", layout) as writer:
        writer.append(_row(layout, 0))
    meta = tmp_path / "r.zarr" / ".zmetadata"
    meta.write_text(meta.read_text().replace('"probekit_schema": 2', '"probekit_schema": 99'))
    with pytest.raises(StoreError, match="schema version 99; this probekit reads versions 1, 2"):
        open_run(tmp_path / "r.zarr")
    with pytest.raises(StoreError, match="schema version 99"):
        RunWriter(tmp_path / "r.zarr", layout, resume=True)


def test_a_schema_1_store_is_read_upgraded_in_memory_and_never_resumed(tmp_path):
    """A store written before layouts and per-fit L2 strengths (schema 1) still opens, unchanged on disk."""
    from probekit.run.schema import build_dataset

    layout = _layout(l2=1e-3)
    layout.shape = ["8", "4x2x2", "8"]
    rows = [_row(layout, e) for e in range(2)]
    rows[1].nonfinite = np.array([False, True, False])
    old = build_dataset(layout, rows).drop_vars(["l2", "reduction_used", "layout"])
    old.attrs.update(probekit_schema=1, completed_epochs=2)
    path = tmp_path / "old.zarr"
    old.to_zarr(path, zarr_format=2, consolidated=True)
    before = _digest(path)
    ds = open_run(path)
    assert ds.attrs["probekit_schema"] == 2 and ds.attrs["upgraded_from_schema"] == 1
    assert ds["layout"].values.tolist() == ["vector", "map", "vector"]  # from each layer's shape
    l2 = ds["l2"].values  # the run's one fixed value, NaN where a layer was not fitted
    assert np.isnan(l2[1, 1]) and (np.delete(l2.ravel(), 3) == 1e-3).all()
    assert ds["reduction_used"].values.tolist() == [["flatten"] * 2] * 3
    np.testing.assert_array_equal(ds["probe"].values, old["probe"].values)
    with pytest.raises(StoreError, match="schema version 1 .*can be read but not continued. Pass overwrite=True"):
        RunWriter(path, layout, resume=True)
    assert _digest(path) == before  # read and refused: nothing on disk changed
    RunWriter(path, layout, overwrite=True).close()  # overwriting is the way forward
    assert open_run(path).attrs["probekit_schema"] == 2


def _hold_lock(path, ready, release):
    writer = RunWriter(path, _layout(), resume=True)
    ready.set()
    release.wait(30)
    writer.close()


def test_second_writer_is_refused_naming_the_holder_and_a_killed_holder_does_not_block(tmp_path):
    path = tmp_path / "r.zarr"
    RunWriter(path, _layout()).close()
    ready, release = FORK.Event(), FORK.Event()
    holder = FORK.Process(target=_hold_lock, args=(path, ready, release))
    holder.start()
    assert ready.wait(30)
    with pytest.raises(StoreLockedError, match=rf"is being written by process {holder.pid} on .*; wait for it to finish"):
        RunWriter(path, _layout(), resume=True)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    RunWriter(path, _layout(), resume=True).close()  # the lock died with its process


def _write_epochs(path, count, seen):
    """Write ``count`` epochs; after each, wait until the reader has seen it in the store (a generous timeout for hangs)."""
    layout = _layout()
    with RunWriter(path, layout) as writer:
        for epoch in range(count):
            writer.append(_row(layout, epoch))
            observed = 0
            while observed < epoch + 1:
                if not seen.poll(120):
                    raise TimeoutError(f"the reader did not see epoch {epoch} within 120 s")
                observed = seen.recv()


def test_reader_in_another_process_never_errors_nor_sees_half_an_epoch(tmp_path):
    """The writer waits for the reader to see each epoch, so the reader reads across every one of them.

    Every state a reader can meet between two file writes is checked by the kill-point test below.
    """
    path = tmp_path / "live.zarr"
    count = 2 * EPOCH_BLOCK + 10
    seen_by_reader, seen_by_writer = FORK.Pipe()
    writer = FORK.Process(target=_write_epochs, args=(path, count, seen_by_writer))
    writer.start()
    seen, errors = [], []
    layout = _layout()
    deadline = time.monotonic() + 600  # only to catch a hang
    while not seen or seen[-1] < count:
        assert time.monotonic() < deadline, f"the reader saw {seen[-1:]} of {count} epochs before the deadline"
        assert writer.is_alive() or writer.exitcode == 0, f"the writer died (exit code {writer.exitcode})"
        if not path.exists():
            continue
        try:
            ds = open_run(path)
        except Exception as error:  # noqa: BLE001 - counted, the test fails on any
            errors.append(repr(error))
            continue
        n = ds.sizes["epoch"]
        if n:
            np.testing.assert_array_equal(ds.probe.values[:, -1], _row(layout, n - 1).probe)
            assert ds.epoch.values.tolist() == list(range(n))
        if not seen or n > seen[-1]:
            seen_by_reader.send(n)
        seen.append(n)
    writer.join()
    assert writer.exitcode == 0 and errors == []
    assert seen == sorted(seen) and set(range(1, count + 1)) <= set(seen)  # every epoch count, in order
    assert open_run(path).sizes["epoch"] == count


# ----------------------------------------------------------------------------- SIGKILL
RUN = ["run", "--model", "paper_convnet", "--dataset", "digits", "--limit", "120", "--epochs", "3",
       "--layers", "input,relu1,fc2", "--device", "cpu", "--quiet"]
#: File writes of that run: the store's creation, then per epoch one chunk per epoch variable,
#: ``.zattrs`` and ``.zmetadata`` (which counts the epoch for readers).
EPOCHS = 4
WRITES_PER_EPOCH = len(EPOCH_VARIABLES) + 2
WRITES = 1 + EPOCHS * WRITES_PER_EPOCH


def _run_cli(path, kill_after, *extra):
    from probekit import cli

    torch.set_num_threads(1)
    os.environ["PROBEKIT_KILL_AFTER_WRITES"] = str(kill_after)
    os._exit(cli.main([*RUN, "--out", str(path), *extra]))


def _cli(path, *extra, kill_after=0) -> int:
    proc = FORK.Process(target=_run_cli, args=(path, kill_after, *extra))
    proc.start()
    proc.join(600)  # only to catch a hang
    assert proc.exitcode is not None, "probekit run hung"
    return proc.exitcode


def _kill_points() -> list[int]:
    """Right after the creation, then in each epoch after a middle chunk, after ``.zattrs`` (ahead of the
    metadata readers use) and after ``.zmetadata``: every kind of state a kill can leave."""
    within = (WRITES_PER_EPOCH // 2, WRITES_PER_EPOCH - 1, WRITES_PER_EPOCH)
    return [1] + [1 + epoch * WRITES_PER_EPOCH + j for epoch in range(EPOCHS) for j in within]


@pytest.mark.slow
def test_sigkill_after_any_file_write_keeps_every_completed_epoch_and_resume_completes(tmp_path):
    """``probekit run`` killed right after chosen file writes (spanning the whole run, mid-epoch included):
    every store opens with exactly the epochs counted before the kill, equal to the reference, and resumes."""
    reference = tmp_path / "reference.zarr"
    assert _cli(reference, kill_after=WRITES + 1) == 0  # the run makes no more than WRITES writes
    expected = open_run(reference)
    assert expected.sizes["epoch"] == EPOCHS
    points = _kill_points()
    assert points[-1] == WRITES
    partial, resumed = 0, 0
    for trial, k in enumerate(points):
        path = tmp_path / f"killed{k}.zarr"
        assert _cli(path, kill_after=k) == -signal.SIGKILL, f"the run was not killed after write {k}"
        ds = open_run(path)  # always opens
        n = ds.sizes["epoch"]
        assert n == (k - 1) // WRITES_PER_EPOCH, (k, n)  # the epochs whose .zmetadata was written, no more
        partial += n < EPOCHS
        for name in ("probe", "step", "epoch", "iterations", "nonfinite", "model_loss", "model_error"):
            np.testing.assert_array_equal(ds[name].values, expected[name].isel(epoch=slice(0, n)).values)
        if trial % 3 == 0:
            if trial == 3:  # a resume killed mid-epoch (after healing the store and one chunk) resumes again
                assert _cli(path, "--resume", kill_after=3) == -signal.SIGKILL
            assert _cli(path, "--resume") == 0
            done = open_run(path)
            for name in ("probe", "step", "epoch", "model_loss", "model_error"):
                np.testing.assert_array_equal(done[name].values, expected[name].values)
            resumed += 1
    assert len(points) == 13 and partial == 12 and resumed == 5


def test_a_store_written_before_an_attribute_existed_resumes_at_its_default(tmp_path):
    """A store without ``autocast`` was written without autocast: a run with autocast='none' resumes it, a bf16 one
    is refused and the store untouched."""
    old = _layout()
    assert "autocast" not in old.attrs
    with RunWriter(tmp_path / "r.zarr", old) as writer:
        writer.append(_row(old, 0))
    before = _digest(tmp_path / "r.zarr")
    with pytest.raises(StoreError, match=r"its 'autocast' differs \(store: 'none', this run: 'bf16'\)"):
        RunWriter(tmp_path / "r.zarr", _layout(autocast="bf16"), resume=True)
    assert _digest(tmp_path / "r.zarr") == before
    with RunWriter(tmp_path / "r.zarr", _layout(autocast="none"), resume=True) as writer:
        assert [r.epoch for r in writer.rows] == [0]
        writer.append(_row(old, 1))
    assert open_run(tmp_path / "r.zarr").sizes["epoch"] == 2


def _consolidated(path: Path):
    """The store as its consolidated metadata names its variables, read without probekit's reader."""
    import xarray as xr

    return xr.open_zarr(path, consolidated=True, zarr_format=2)


def _without_variable(path: Path, name: str) -> None:
    """The store as a writer from before variable ``name`` existed left it: no array, no entry in the metadata."""
    shutil.rmtree(path / name)
    meta = json.loads((path / ".zmetadata").read_text())
    meta["metadata"] = {key: value for key, value in meta["metadata"].items() if not key.startswith(f"{name}/")}
    (path / ".zmetadata").write_text(json.dumps(meta, indent=4))


def test_a_store_written_before_model_valid_loss_existed_opens_and_resumes_gaining_it(tmp_path):
    """Read: NaN at every epoch. Continued: the store gains the array (NaN at its earlier epochs), across the growth
    of the epoch axis."""
    layout, path = _layout(), tmp_path / "r.zarr"
    with RunWriter(path, layout) as writer:
        for epoch in range(2):
            writer.append(_row(layout, epoch))
    _without_variable(path, "model_valid_loss")
    assert "model_valid_loss" not in _consolidated(path).variables  # as an older writer left it
    for ds in (open_run(path), open_run_lazy(path).compute(), pk.open_runs([path]).isel(run=0)):
        assert ds["model_valid_loss"].dims[-1] == "epoch" and np.isnan(ds["model_valid_loss"].values).all()
        assert ds["model_loss"].values.tolist() == [0.0, 0.5]
    pk.run.schema.check_run(open_run(path))

    with RunWriter(path, layout, resume=True) as writer:
        assert [np.isnan(r.model_valid_loss) for r in writer.rows] == [True, True]
        for epoch in range(2, EPOCH_BLOCK + 3):
            row = _row(layout, epoch)
            row.model_valid_loss = epoch / 4
            writer.append(row)
    assert "model_valid_loss" in _consolidated(path).variables
    ds = open_run(path)
    assert ds.sizes["epoch"] == EPOCH_BLOCK + 3
    valid = ds["model_valid_loss"].values
    assert np.isnan(valid[:2]).all() and valid[2:].tolist() == [e / 4 for e in range(2, EPOCH_BLOCK + 3)]
    np.testing.assert_array_equal(ds.probe.values[:, 1], _row(layout, 1).probe)
    with RunWriter(path, layout, resume=True) as writer:  # a store that has it resumes as any other
        assert writer.rows[-1].model_valid_loss == (EPOCH_BLOCK + 2) / 4
