"""The run store: schema, refusals, locking, concurrent readers, SIGKILL and resume."""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import signal
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import probekit as pk
from probekit.run.schema import EpochRow, RunLayout, metric_names
from probekit.run.store import EPOCH_BLOCK, RunWriter, StoreError, StoreLockedError, open_run
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
    assert len(calls) <= 2  # only the discovery pass ran, no extraction
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
    meta.write_text(meta.read_text().replace('"probekit_schema": 1', '"probekit_schema": 99'))
    with pytest.raises(StoreError, match="schema version 99; this probekit reads version 1"):
        open_run(tmp_path / "r.zarr")
    with pytest.raises(StoreError, match="schema version 99"):
        RunWriter(tmp_path / "r.zarr", layout, resume=True)


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


def _write_epochs(path, count, pause):
    layout = _layout()
    with RunWriter(path, layout) as writer:
        for epoch in range(count):
            writer.append(_row(layout, epoch))
            time.sleep(pause)


def test_reader_in_another_process_never_errors_nor_sees_half_an_epoch(tmp_path):
    path = tmp_path / "live.zarr"
    writer = FORK.Process(target=_write_epochs, args=(path, 2 * EPOCH_BLOCK + 10, 0.01))
    writer.start()
    reads, seen, errors = 0, [], []
    layout = _layout()
    while writer.is_alive() or reads == 0:
        if not path.exists():
            continue
        try:
            ds = open_run(path)
        except Exception as error:  # noqa: BLE001 - counted, the test fails on any
            errors.append(repr(error))
            continue
        reads += 1
        n = ds.sizes["epoch"]
        seen.append(n)
        if n:
            np.testing.assert_array_equal(ds.probe.values[:, -1], _row(layout, n - 1).probe)
            assert ds.epoch.values.tolist() == list(range(n))
    writer.join()
    assert errors == []
    assert reads >= 100 and seen == sorted(seen) and open_run(path).sizes["epoch"] == 2 * EPOCH_BLOCK + 10


# ----------------------------------------------------------------------------- SIGKILL
RUN = ["run", "--model", "paper_convnet", "--dataset", "digits", "--limit", "120", "--epochs", "3",
       "--layers", "input,relu1,fc2", "--device", "cpu", "--quiet"]


def _run_cli(path, *extra):
    from probekit import cli

    torch.set_num_threads(1)
    os._exit(cli.main([*RUN, "--out", str(path), *extra]))


@pytest.mark.slow
def test_sigkill_at_random_moments_keeps_every_completed_epoch_and_resume_completes(tmp_path):
    """``probekit run`` killed 20 times at random moments; every store opens, equals the reference, resumes."""
    reference = tmp_path / "reference.zarr"
    run = FORK.Process(target=_run_cli, args=(reference,))
    run.start()
    run.join()
    assert run.exitcode == 0
    expected = open_run(reference)
    assert expected.sizes["epoch"] == 4
    rng = random.Random(0)
    survived, resumed, partial, absent = 0, 0, 0, 0
    start = time.monotonic()
    for trial in range(20):
        path = tmp_path / f"killed{trial}.zarr"
        proc = FORK.Process(target=_run_cli, args=(path,))
        proc.start()
        time.sleep(rng.uniform(0.05, 2.0))
        os.kill(proc.pid, signal.SIGKILL)
        proc.join()
        if path.exists():
            ds = open_run(path)  # always opens
            n = ds.sizes["epoch"]
            partial += n < 4
            for name in ("probe", "step", "epoch", "iterations", "nonfinite", "model_loss", "model_error"):
                np.testing.assert_array_equal(ds[name].values, expected[name].isel(epoch=slice(0, n)).values)
        else:
            absent += 1
        survived += 1
        if trial % 4 == 0:
            proc = FORK.Process(target=_run_cli, args=(path, "--resume"))
            proc.start()
            proc.join()
            assert proc.exitcode == 0
            done = open_run(path)
            for name in ("probe", "step", "epoch", "model_loss", "model_error"):
                np.testing.assert_array_equal(done[name].values, expected[name].values)
            resumed += 1
    assert survived == 20 and resumed == 5 and partial >= 5, (partial, absent)
    assert time.monotonic() - start < 150
