"""A full disk or quota mid-run: one line naming the store, every completed epoch kept, no temporary file, resumable.

Each test runs on two genuinely size-limited filesystems:

- ``tmpfs``: a real tmpfs of a few MiB mounted for the test (``mount -t tmpfs -o
  size=...``), where the local store's rename, fsync and flock run for real. It
  needs CAP_SYS_ADMIN; where the mount is refused (an unprivileged container),
  this case runs on the quota filesystem instead, so nothing is ever skipped.
- ``quota``: :class:`QuotaFileSystem`, an in-process object store (fsspec's
  memory filesystem) with a byte quota: a put that would take it past its
  quota raises ``OSError(ENOSPC)`` and leaves the object as it was, as an object
  store's put does. It exercises the object-store path of the run store.

The disk is filled the way a user's fills: a ballast file written until the
filesystem refuses it; "space is freed" by deleting the ballast.
"""

from __future__ import annotations

import errno
import os
import re
import subprocess
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
from torch.nn import functional as F
from fsspec.implementations.memory import MemoryFile, MemoryFileSystem

import probekit as pk
from probekit import cli
from probekit.engine.training import resume_path, train_and_probe
from probekit.run.store import LOCK_FILE, StoreFullError, open_run
from tests.conftest import tiny_convnet

FAST = {"layers": ["input", "pool1", "fc2"], "reduce": "pool", "l2": 1e-3, "quiet": True}


class _QuotaFile(MemoryFile):
    """A file of :class:`QuotaFileSystem`: its bytes count against the quota when it is committed, whole."""

    settled = False  # committed, or refused: never committed again (BytesIO closes itself when collected)

    def commit(self):
        self.settled = True
        self.fs.charge(self.path, self.getbuffer().nbytes)
        super().commit()

    def close(self):
        if not self.settled:  # a streamed write appears whole on close, as an object store's upload does
            self.commit()


class QuotaFileSystem(MemoryFileSystem):
    """fsspec's memory filesystem with a byte quota over all its files (its own, not ``memory://``'s)."""

    protocol = "quotamem"
    store: dict = {}
    pseudo_dirs = [""]
    quota = 0

    def charge(self, path: str, size: int) -> None:
        """Refuse a put when usage plus its size passes the quota, even one that replaces an object (as MinIO's
        hard bucket quota does), with ENOSPC."""
        used = sum(f.getbuffer().nbytes for f in self.store.values())
        if used + size > type(self).quota:
            raise OSError(errno.ENOSPC, f"No space left on device (quota of {type(self).quota} bytes)", path)

    def _open(self, path, mode="rb", block_size=None, autocommit=True, cache_options=None, **kwargs):
        if mode not in {"wb", "xb"}:
            return super()._open(path, mode, block_size, autocommit, cache_options, **kwargs)
        path = self._strip_protocol(path)
        if mode == "xb" and self.exists(path):
            raise FileExistsError(path)
        file = _QuotaFile(self, path, kwargs.get("data"))
        if kwargs.get("data") is not None:
            file.commit()
        return file


fsspec.register_implementation("quotamem", QuotaFileSystem, clobber=True)


class SmallDisk:
    """A size-limited filesystem for one test: where its store goes, how to fill it and free it, what it holds."""

    def __init__(self, kind: str, root: Path | str):
        self.kind, self.root = kind, root

    def store(self, name: str) -> str:
        return str(self.root / name) if self.kind == "tmpfs" else f"quotamem://{self.root}/{name}"

    def fill(self, leave: int = 0) -> None:
        """Write a ballast file until the filesystem refuses more, then give ``leave`` bytes back."""
        if self.kind == "tmpfs":
            fd = os.open(self.root / "ballast", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            try:
                for size in (1 << 16, 1 << 12, 1):
                    try:
                        while True:
                            os.write(fd, b"\0" * size)
                    except OSError as error:
                        assert error.errno == errno.ENOSPC
                if leave:
                    os.ftruncate(fd, os.fstat(fd).st_size - leave)
            finally:
                os.close(fd)
            return
        fs = QuotaFileSystem()
        used = sum(f.getbuffer().nbytes for f in fs.store.values())
        fs.pipe_file(f"/{self.root}/ballast", b"\0" * (QuotaFileSystem.quota - used - leave))
        with pytest.raises(OSError):
            fs.pipe_file(f"/{self.root}/one-more", b"\0" * (leave + 1))

    def free(self) -> None:
        if self.kind == "tmpfs":
            (self.root / "ballast").unlink()
        else:
            QuotaFileSystem().rm_file(f"/{self.root}/ballast")

    def files(self) -> list[str]:
        """Every file on the filesystem, the ballast and the writer's lock (there while a writer is) aside."""
        if self.kind == "tmpfs":
            found = [str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file()]
        else:
            found = [key.split(f"/{self.root}/", 1)[1] for key in QuotaFileSystem().store]
        return sorted(name for name in found if name != "ballast" and not name.endswith(LOCK_FILE))


@pytest.fixture(params=["tmpfs", "quota"])
def small_disk(request, tmp_path):
    """A 4 MiB filesystem: a real tmpfs where this process may mount one, else (and always for "quota") a quota store."""
    size = 4 << 20
    kind = request.param
    if kind == "tmpfs":
        mount = tmp_path / "small"
        mount.mkdir()
        try:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)],
                                     capture_output=True).returncode == 0
        except OSError:  # no mount command
            mounted = False
        if mounted:
            try:
                yield SmallDisk("tmpfs", mount)
            finally:
                subprocess.run(["umount", "-l", str(mount)], check=True)
            return
        kind = "quota"  # no CAP_SYS_ADMIN here: the same test on the quota filesystem, never a skip
    QuotaFileSystem.store.clear()
    QuotaFileSystem.pseudo_dirs[:] = [""]
    QuotaFileSystem.quota = size
    yield SmallDisk("quota", f"disk-{uuid.uuid4().hex[:8]}")
    QuotaFileSystem.store.clear()


def _leftovers(files: list[str]) -> list[str]:
    return [name for name in files if ".tmp-" in name or ".partial" in name or ".old-" in name]


def test_a_full_disk_while_monitoring_keeps_every_epoch_and_resume_continues(small_disk, digits_tensors, tmp_path):
    data = {name: (x[:300], y[:300]) for name, (x, y) in digits_tensors.items()}
    store = small_disk.store("run.zarr")
    model = tiny_convnet()
    with pk.ProbeMonitor(model, data, store=store, **FAST) as monitor:
        monitor.update(epoch=0)
        monitor.update(epoch=1)
        before = small_disk.files()
        small_disk.fill()
        with pytest.raises(StoreFullError) as caught:
            monitor.update(epoch=2)
    message = str(caught.value)
    assert "\n" not in message and caught.value.errno == errno.ENOSPC and isinstance(caught.value, OSError)
    assert f"no space left on run store {store!r} while writing epoch 2" in message
    assert "it keeps its 2 completed epochs and no temporary file is left" in message
    assert "continue with resume=True (--resume)" in message
    assert _leftovers(small_disk.files()) == [] and small_disk.files() == before
    assert list(open_run(store).epoch.values) == [0, 1]  # readable while the disk is still full

    small_disk.free()
    with pk.ProbeMonitor(model, data, store=store, resume=True, **FAST) as monitor:
        assert [row.epoch for row in monitor.rows] == [0, 1]
        monitor.update(epoch=2)
    with pk.ProbeMonitor(model, data, store=tmp_path / "reference.zarr", **FAST) as reference:
        for epoch in range(3):
            reference.update(epoch=epoch)
    resumed = open_run(store)
    assert list(resumed.epoch.values) == [0, 1, 2]
    np.testing.assert_array_equal(resumed.probe.values, open_run(tmp_path / "reference.zarr").probe.values)


def test_a_full_disk_creating_a_store_leaves_nothing(small_disk, digits_tensors):
    small_disk.fill()
    store = small_disk.store("new.zarr")
    with pytest.raises(StoreFullError, match=rf"^no space left .*run store {re.escape(repr(store))} .*nothing was.*Free space"):
        pk.probe(tiny_convnet(), digits_tensors, store=store, **FAST)
    assert small_disk.files() == []
    small_disk.free()
    assert pk.probe(tiny_convnet(), digits_tensors, store=store, **FAST).sizes["epoch"] == 1


def test_a_disk_filling_while_a_store_is_created_leaves_nothing_and_a_new_run_creates_it(small_disk, digits_tensors):
    small_disk.fill(leave=8192)  # room for the lock and the creation marker, not for the store's files
    store = small_disk.store("half.zarr")
    with pytest.raises(StoreFullError, match=rf"^no space left to create run store {re.escape(repr(store))} .*Free space"):
        pk.probe(tiny_convnet(), digits_tensors, store=store, **FAST)
    assert small_disk.files() == []
    small_disk.free()
    assert pk.probe(tiny_convnet(), digits_tensors, store=store, **FAST).sizes["epoch"] == 1
    assert _leftovers(small_disk.files()) == []


def test_the_cli_on_a_full_disk_is_one_line_and_resume_completes_the_run(small_disk, tmp_path, capsys):
    store = small_disk.store("cli.zarr")
    base = ["run", "--model", "paper_convnet", "--dataset", "digits", "--limit", "100",
            "--layers", "input,pool1,fc2", "--quiet"]
    assert cli.main([*base, "--epochs", "1", "--store", store]) == 0
    small_disk.fill()
    capsys.readouterr()
    assert cli.main([*base, "--epochs", "3", "--store", store, "--resume"]) == 2
    err = capsys.readouterr().err
    checkpoint = store.replace("cli.zarr", ".cli.zarr.resume.pt")
    # The first write that finds no room names its path: the epoch count rewritten on resuming (a local rename
    # needs a second copy's room), the lock object (new on an object store) or the training checkpoint.
    assert err.count("\n") == 1 and err.startswith("probekit: error: no space left "), err
    assert f"run store {store!r}" in err or f"writing {checkpoint!r}" in err, err
    assert "no temporary file is left" in err and "--resume" in err, err
    assert "enforce fail" not in err
    assert _leftovers(small_disk.files()) == []
    assert list(open_run(store).epoch.values) == [0, 1]

    small_disk.free()
    assert cli.main([*base, "--epochs", "3", "--store", store, "--resume"]) == 0
    reference = str(tmp_path / "reference.zarr")
    assert cli.main([*base, "--epochs", "3", "--store", reference]) == 0
    resumed, straight = open_run(store), open_run(reference)
    assert list(resumed.epoch.values) == [0, 1, 2, 3]
    np.testing.assert_array_equal(resumed.probe.values, straight.probe.values)
    np.testing.assert_array_equal(resumed.model_loss.values, straight.model_loss.values)
    assert _leftovers(small_disk.files()) == []


def test_a_disk_filling_during_training_stops_at_the_checkpoint_and_resume_completes(small_disk, digits_tensors, tmp_path):
    data = {name: (x[:300], y[:300]) for name, (x, y) in digits_tensors.items()}
    store = small_disk.store("train.zarr")
    calls = []

    def loss_filling_the_disk_in_epoch_2(logits, labels):
        calls.append(1)
        if len(calls) == 4:  # epoch 2's first step (3 an epoch; epoch 0 is untrained): a program takes the last bytes
            small_disk.fill()
        return F.cross_entropy(logits, labels)

    options = dict(FAST, seed=1, train_batch_size=100)
    with pytest.raises(StoreFullError) as caught:
        train_and_probe(tiny_convnet(), data, epochs=3, store=store, loss_fn=loss_filling_the_disk_in_epoch_2, **options)
    checkpoint = resume_path(store)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"no space left writing {str(checkpoint)!r}")
    assert "the run store keeps every completed epoch" in message and "resume=True (--resume)" in message
    assert _leftovers(small_disk.files()) == []
    assert list(open_run(store).epoch.values) == [0, 1]

    small_disk.free()
    resumed = train_and_probe(tiny_convnet(), data, epochs=3, store=store, resume=True, **options)
    straight = train_and_probe(tiny_convnet(), data, epochs=3, store=tmp_path / "reference.zarr", **options)
    assert list(resumed.epoch.values) == [0, 1, 2, 3]
    np.testing.assert_array_equal(resumed.probe.values, straight.probe.values)
    np.testing.assert_array_equal(resumed.model_loss.values, straight.model_loss.values)
