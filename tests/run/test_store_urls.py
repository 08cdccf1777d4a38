"""Run stores on fsspec URLs: file://, memory:// and an S3-compatible server, end to end, and their refusals."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import uuid

import fsspec
import numpy as np
import pytest

import probekit as pk
from probekit import cli
from probekit.engine.training import resume_path, train_and_probe
from probekit.run.store import (
    CREATING_MARKER, EPOCH_BLOCK, LOCK_FILE, RunWriter, StoreError, StoreLockedError, open_run,
)
from tests.conftest import tiny_convnet
from tests.run.test_store import EPOCHS, FORK, RUN, WRITES, WRITES_PER_EPOCH, _layout, _row

#: Small and fast: three probe points, pooled features, one fixed L2.
FAST = {"layers": ["input", "pool1", "fc2"], "reduce": "pool", "l2": 1e-3, "quiet": True}


@pytest.fixture
def memory_url():
    """A fresh ``memory://`` store URL; the in-process memory filesystem is cleared of it afterwards."""
    folder = f"/probekit-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{folder}/run.zarr"
    fs = fsspec.filesystem("memory")
    if fs.exists(folder):
        fs.rm(folder, recursive=True)


@pytest.fixture(params=["file", "memory"])
def url(request, tmp_path, memory_url):
    return (tmp_path / "run.zarr").as_uri() if request.param == "file" else memory_url


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server on 127.0.0.1 (moto) with one bucket; yields the storage_options that reach it."""
    from moto.server import ThreadedMotoServer  # moto[server] is in the test extra

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server._server.server_address
    options = {"key": "testing", "secret": "testing",
               "client_kwargs": {"endpoint_url": f"http://{host}:{port}", "region_name": "us-east-1"}}
    fs = fsspec.filesystem("s3", **options)
    fs.call_s3("create_bucket", Bucket="probekit-runs")
    yield options
    server.stop()


def _small(digits_tensors):
    return {name: (x[:300], y[:300]) for name, (x, y) in digits_tensors.items()}


def test_probe_and_monitor_write_a_url_that_reopens_and_resumes(url, digits_tensors, tmp_path):
    data = _small(digits_tensors)
    ds = pk.probe(tiny_convnet(), data, store=url, **FAST)
    stored = open_run(url)
    np.testing.assert_array_equal(stored.probe.values, ds.probe.values)
    assert list(stored.layer.values) == FAST["layers"]
    again = pk.probe(tiny_convnet(), data, store=url, resume=True, **FAST)  # finished: returned, not recomputed
    np.testing.assert_array_equal(again.probe.values, ds.probe.values)

    monitored = url.replace("run.zarr", "monitor.zarr")
    model = tiny_convnet()
    with pk.ProbeMonitor(model, data, store=monitored, **FAST) as monitor:
        monitor.update(epoch=0)
        monitor.update(epoch=1)
    with pk.ProbeMonitor(model, data, store=monitored, resume=True, **FAST) as monitor:
        assert [row.epoch for row in monitor.rows] == [0, 1]
        monitor.update(epoch=2)
    with pk.ProbeMonitor(model, data, store=tmp_path / "reference.zarr", **FAST) as reference:
        for epoch in range(3):
            reference.update(epoch=epoch)
    resumed = open_run(monitored)
    assert list(resumed.epoch.values) == [0, 1, 2]
    np.testing.assert_array_equal(resumed.probe.values, open_run(tmp_path / "reference.zarr").probe.values)


def test_probe_checkpoints_writes_a_url_and_resumes_past_the_checkpoints_written(memory_url, digits_tensors, tmp_path):
    import torch

    data = _small(digits_tensors)
    paths = []
    for seed in range(3):
        paths.append(tmp_path / f"c{seed}.pt")
        torch.save(tiny_convnet(seed).state_dict(), paths[-1])
    first = pk.probe_checkpoints(tiny_convnet, paths[:2], data, store=memory_url, **FAST)
    assert list(first.epoch.values) == [0, 1]
    resumed = pk.probe_checkpoints(tiny_convnet, paths, data, store=memory_url, resume=True, **FAST)
    straight = pk.probe_checkpoints(tiny_convnet, paths, data, **FAST)
    assert list(open_run(memory_url).epoch.values) == [0, 1, 2]
    np.testing.assert_array_equal(resumed.probe.values, straight.probe.values)


def test_train_and_probe_resumes_from_its_checkpoint_beside_a_url(memory_url, digits_tensors, tmp_path):
    data = _small(digits_tensors)
    options = dict(FAST, seed=3, train_batch_size=100)
    train_and_probe(tiny_convnet(), data, epochs=1, store=memory_url, **options)
    checkpoint = resume_path(memory_url)
    assert checkpoint == memory_url.replace("/run.zarr", "/.run.zarr.resume.pt")
    assert fsspec.filesystem("memory").exists(checkpoint.split("://", 1)[1])
    resumed = train_and_probe(tiny_convnet(), data, epochs=2, store=memory_url, resume=True, **options)
    straight = train_and_probe(tiny_convnet(), data, epochs=2, store=tmp_path / "r.zarr", **options)
    assert list(resumed.epoch.values) == [0, 1, 2]
    np.testing.assert_array_equal(resumed.probe.values, straight.probe.values)
    np.testing.assert_array_equal(resumed.model_loss.values, straight.model_loss.values)


def test_a_run_on_an_s3_server_is_written_read_resumed_and_locked(s3, digits_tensors):
    data = _small(digits_tensors)
    store = "s3://probekit-runs/models/convnet.zarr"
    model = tiny_convnet()
    with pk.ProbeMonitor(model, data, store=store, storage_options=s3, **FAST) as monitor:
        monitor.update(epoch=0)
        with pytest.raises(StoreLockedError, match=f"being written by process .* on {socket.gethostname()}"):
            pk.probe(tiny_convnet(), data, store=store, storage_options=s3, resume=True, **FAST)
        monitor.update(epoch=1)
        live = open_run(store, storage_options=s3)  # read while the writer holds the store
        assert list(live.epoch.values) == [0, 1]
    fs = fsspec.filesystem("s3", **s3)
    fs.invalidate_cache()
    assert not fs.exists(f"probekit-runs/models/convnet.zarr/{LOCK_FILE}")  # released on close
    with pk.ProbeMonitor(model, data, store=store, storage_options=s3, resume=True, **FAST) as monitor:
        monitor.update(epoch=2)
    ds = open_run(store, storage_options=s3)
    assert list(ds.epoch.values) == [0, 1, 2] and np.isfinite(ds.probe.values).all()
    with pytest.raises(FileExistsError, match="already exists .*3 epochs"):
        pk.probe(tiny_convnet(), data, store=store, storage_options=s3, **FAST)
    replaced = pk.probe(tiny_convnet(), data, store=store, storage_options=s3, overwrite=True, **FAST)
    assert list(open_run(store, storage_options=s3).epoch.values) == [0]
    np.testing.assert_array_equal(open_run(store, storage_options=s3).probe.values, replaced.probe.values)


def test_a_missing_bucket_and_an_unreachable_server_are_one_line(s3):
    with pytest.raises(StoreError, match=r"cannot write run store 's3://no-such-bucket/run.zarr' .*check that its bucket "
                                         r"exists and that the credentials in storage_options may write there"):
        RunWriter("s3://no-such-bucket/run.zarr", _layout(), storage_options=s3)
    with pytest.raises(FileNotFoundError, match="no run store at 's3://no-such-bucket/run.zarr'"):
        open_run("s3://no-such-bucket/run.zarr", storage_options=s3)
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    nowhere = {**s3, "client_kwargs": {**s3["client_kwargs"], "endpoint_url": f"http://127.0.0.1:{port}"},
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1}}
    with pytest.raises(StoreError, match="cannot read run store .*check the URL, and the credentials and endpoint"):
        open_run("s3://probekit-runs/run.zarr", storage_options=nowhere)


def test_the_cli_runs_shows_and_resumes_a_store_on_an_s3_server(s3, capsys):
    store = "s3://probekit-runs/cli/run.zarr"
    args = ["run", "--model", "paper_convnet", "--dataset", "digits", "--limit", "100", "--epochs", "1",
            "--layers", "input,pool1,fc2", "--store", store, "--storage-options", json.dumps(s3), "--quiet"]
    assert cli.main(args) == 0
    capsys.readouterr()
    assert cli.main(["show", store, "--storage-options", json.dumps(s3)]) == 0
    assert "2 epochs completed" in capsys.readouterr().out
    assert cli.main([*args[:8], "2", *args[9:], "--resume"]) == 0
    ds = open_run(store, storage_options=s3)
    assert list(ds.epoch.values) == [0, 1, 2] and np.isfinite(ds.model_loss.values[1:]).all()


def test_a_lock_left_on_an_object_store_is_taken_over_only_from_this_machine(memory_url):
    layout = _layout()
    fs = fsspec.filesystem("memory")
    root = memory_url.split("://", 1)[1]
    with RunWriter(memory_url, layout) as writer:
        writer.append(_row(layout, 0))
        with pytest.raises(StoreLockedError, match="being written by process"):
            RunWriter(memory_url, layout, resume=True)
    # A writer of this machine killed while holding the store leaves its lock object; its machine lock died with it.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    fs.pipe_file(f"{root}/{LOCK_FILE}", json.dumps({"pid": int(gone.stdout), "host": socket.gethostname(),
                                                    "command": "killed", "token": "old"}).encode())
    with RunWriter(memory_url, layout, resume=True) as writer:
        writer.append(_row(layout, 1))
    # A live process of this machine (one that took its machine lock elsewhere, under another TMPDIR) keeps it.
    fs.pipe_file(f"{root}/{LOCK_FILE}", json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                    "command": "live", "token": "other"}).encode())
    with pytest.raises(StoreLockedError, match=rf"process {os.getpid()} on .*\(live\)"):
        RunWriter(memory_url, layout, resume=True)
    # One of another machine cannot be told from a live writer: refused, saying how to clear it.
    fs.pipe_file(f"{root}/{LOCK_FILE}", json.dumps({"pid": 7, "host": "gpu-node-3", "command": "train.py"}).encode())
    with pytest.raises(StoreLockedError, match=rf"process 7 on gpu-node-3 \(train.py\).*if it no longer runs, delete "
                                               rf"{memory_url}/{LOCK_FILE}"):
        RunWriter(memory_url, layout, resume=True)
    fs.rm_file(f"{root}/{LOCK_FILE}")
    with RunWriter(memory_url, layout, resume=True) as writer:
        fs.rm_file(f"{root}/{LOCK_FILE}")  # someone removed the lock of a live writer
        with pytest.raises(StoreLockedError, match="lock of run store .* was removed .*stopped before counting"):
            writer.append(_row(layout, 2))
    assert list(open_run(memory_url).epoch.values) == [0, 1]


def test_an_interrupted_creation_on_an_object_store_reads_as_such_and_is_created_anew(memory_url):
    fs = fsspec.filesystem("memory")
    root = memory_url.split("://", 1)[1]
    fs.pipe({f"{root}/{CREATING_MARKER}": b"{}", f"{root}/.zgroup": b'{"zarr_format": 2}'})
    with pytest.raises(StoreError, match="is being created or replaced, or its writer died doing so"):
        open_run(memory_url)
    layout = _layout()
    with RunWriter(memory_url, layout) as writer:
        writer.append(_row(layout, 0))
    assert not fs.exists(f"{root}/{CREATING_MARKER}")
    assert list(open_run(memory_url).epoch.values) == [0]
    fs.rm(f"{root}/.zmetadata")
    with pytest.raises(StoreError, match="is damaged: its metadata object .zmetadata is missing"):
        open_run(memory_url)
    with pytest.raises(StoreError, match="holds a damaged run store .*refusing to write into it"):
        RunWriter(memory_url, layout, overwrite=True)


def _absent_protocol() -> tuple[str, str]:
    """A protocol fsspec knows whose package is not installed here: (protocol, package)."""
    from fsspec.registry import known_implementations

    for protocol in ("gs", "abfs", "oci", "webhdfs", "dropbox", "box", "lakefs", "wandb", "hf", "ossfs", "tosfs"):
        spec = known_implementations.get(protocol)
        if spec and importlib.util.find_spec(spec["class"].split(".")[0]) is None:
            return protocol, spec["class"].split(".")[0]
    raise AssertionError("every candidate filesystem package is installed; add a protocol whose package is absent")


def test_a_url_whose_filesystem_package_is_missing_names_the_package(digits_tensors, capsys):
    protocol, package = _absent_protocol()
    store = f"{protocol}://bucket/run.zarr"
    message = rf"needs the {package} package for {protocol}:// URLs, which is not installed; install {package}: pip install {package}"
    with pytest.raises(ImportError, match=message):
        open_run(store)
    with pytest.raises(ImportError, match=message):
        pk.probe(tiny_convnet(), _small(digits_tensors), store=store, **FAST)
    assert cli.main(["run", "--dataset", "digits", "--limit", "100", "--store", store, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"pip install {package}" in err


def test_a_filesystem_without_whole_object_writes_is_read_but_never_written(tmp_path, digits_tensors):
    local = tmp_path / "run.zarr"
    ds = pk.probe(tiny_convnet(), _small(digits_tensors), store=local, **FAST)
    options = {"path": str(tmp_path), "target_protocol": "file"}  # fsspec's dir:// over the local folder
    np.testing.assert_array_equal(open_run("dir://run.zarr", storage_options=options).probe.values, ds.probe.values)
    with pytest.raises(StoreError, match="dir:// cannot hold a run while it is written .*write to a local path or an object store"):
        RunWriter("dir://other.zarr", _layout(), storage_options=options)
    assert not (tmp_path / "other.zarr").exists()


def test_bad_store_urls_and_options_are_one_line(tmp_path):
    with pytest.raises(StoreError, match="names no folder for the store; pass a path inside the bucket, e.g. s3://bucket/run.zarr"):
        open_run("s3://bucket")
    with pytest.raises(ValueError, match="fsspec knows no filesystem for nosuchfs:// URLs"):
        open_run("nosuchfs://a/run.zarr")
    with pytest.raises(ValueError, match="storage_options= are for fsspec URLs .*is a local path"):
        open_run(tmp_path / "a.zarr", storage_options={"anon": True})
    with pytest.raises(ValueError, match="storage_options must be"):
        pk.probe(tiny_convnet(), {"train": (np.zeros((4, 1, 8, 8)), np.zeros(4))}, store="memory://x.zarr",
                 storage_options="anon", quiet=True)


def _run_cli_at(store, options, kill_after, *extra):
    import torch

    torch.set_num_threads(1)
    os.environ["PROBEKIT_KILL_AFTER_WRITES"] = str(kill_after)
    os._exit(cli.main([*RUN, "--store", store, "--storage-options", json.dumps(options), *extra]))


def _cli_at(store, options, *extra, kill_after=0) -> int:
    proc = FORK.Process(target=_run_cli_at, args=(store, options, kill_after, *extra))
    proc.start()
    proc.join(600)  # only to catch a hang
    assert proc.exitcode is not None, "probekit run hung"
    return proc.exitcode


@pytest.mark.slow
def test_sigkill_on_an_s3_server_keeps_every_completed_epoch_and_resume_takes_the_lock_over(s3):
    """``probekit run`` on S3 killed right after chosen object writes (the creation, a middle chunk, ``.zattrs``,
    ``.zmetadata``): the store opens with exactly the epochs counted, equal to the reference, and ``--resume`` (which
    finds the killed writer's lock object) completes it."""
    reference = "s3://probekit-runs/kill/reference.zarr"
    assert _cli_at(reference, s3, kill_after=WRITES + 1) == 0
    expected = open_run(reference, storage_options=s3)
    assert expected.sizes["epoch"] == EPOCHS
    points = [1, WRITES_PER_EPOCH + WRITES_PER_EPOCH // 2, 1 + 2 * WRITES_PER_EPOCH + WRITES_PER_EPOCH - 1,
              1 + 3 * WRITES_PER_EPOCH]
    for k in points:
        store = f"s3://probekit-runs/kill/after-{k}.zarr"
        assert _cli_at(store, s3, kill_after=k) == -signal.SIGKILL, f"the run was not killed after write {k}"
        ds = open_run(store, storage_options=s3)
        n = ds.sizes["epoch"]
        assert n == (k - 1) // WRITES_PER_EPOCH, (k, n)
        for name in ("probe", "step", "epoch", "model_loss", "model_error"):
            np.testing.assert_array_equal(ds[name].values, expected[name].isel(epoch=slice(0, n)).values)
        fs = fsspec.filesystem("s3", **s3)
        fs.invalidate_cache()
        assert fs.exists(store.split("://", 1)[1] + f"/{LOCK_FILE}")  # the killed writer's lock is left behind
        if k in points[1:3]:
            assert _cli_at(store, s3, "--resume") == 0
            done = open_run(store, storage_options=s3)
            for name in ("probe", "step", "epoch", "model_loss", "model_error"):
                np.testing.assert_array_equal(done[name].values, expected[name].values)


def _write_epochs_at(store, options, count, seen):
    """Write ``count`` epochs to ``store``; after each, wait until the reader has seen it (a timeout for hangs)."""
    layout = _layout()
    with RunWriter(store, layout, storage_options=options) as writer:
        for epoch in range(count):
            writer.append(_row(layout, epoch))
            observed = 0
            while observed < epoch + 1:
                if not seen.poll(120):
                    raise TimeoutError(f"the reader did not see epoch {epoch} within 120 s")
                observed = seen.recv()


@pytest.mark.slow
def test_a_reader_of_an_s3_store_never_errors_nor_sees_half_an_epoch(s3):
    """A writer in another process appends across the epoch axis's growth; after each epoch it waits until the
    reader has seen it, so the reader reads every count, each epoch whole."""
    import time

    store = "s3://probekit-runs/live/run.zarr"
    count = EPOCH_BLOCK + 6
    seen_by_reader, seen_by_writer = FORK.Pipe()
    writer = FORK.Process(target=_write_epochs_at, args=(store, s3, count, seen_by_writer))
    writer.start()
    seen, errors, layout = [], [], _layout()
    deadline = time.monotonic() + 600  # only to catch a hang
    while not seen or seen[-1] < count:
        assert time.monotonic() < deadline, f"the reader saw {seen[-1:]} of {count} epochs before the deadline"
        assert writer.is_alive() or writer.exitcode == 0, f"the writer died (exit code {writer.exitcode})"
        try:
            ds = open_run(store, storage_options=s3)
        except FileNotFoundError:
            continue  # not created yet
        except StoreError as error:
            if not seen and "is being created" in str(error):
                continue  # the writer holds the URL and is creating the store: no store yet, said so
            errors.append(repr(error))
            continue
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
    assert seen == sorted(seen) and set(range(1, count + 1)) <= set(seen)
