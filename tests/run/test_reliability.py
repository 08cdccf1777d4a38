"""Faults and bad input: each case of docs/reliability.md that other test files do not already cover."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import probekit as pk
from probekit.run.store import RunWriter, StoreError, open_run, write_atomic
from tests.conftest import tiny_convnet


def _interrupt_after(module, calls: int):
    seen = []

    def hook(*_):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt

    return module.register_forward_hook(hook)


def test_ctrl_c_during_an_update_leaves_a_consistent_store_and_a_restored_model(digits_tensors, tmp_path):
    model = tiny_convnet(batchnorm=True, dropout=True)
    model.train()
    store = tmp_path / "c.zarr"
    mon = pk.ProbeMonitor(model, digits_tensors, store=store, quiet=True)
    mon.update(epoch=0)
    params = {k: v.clone() for k, v in model.state_dict().items()}
    handle = _interrupt_after(model.fc1, 3)  # Ctrl-C in the middle of the next extraction
    with pytest.raises(KeyboardInterrupt):
        mon.update(epoch=1)
    handle.remove()
    assert all(m.training for m in model.modules())  # mode restored
    assert all(torch.equal(params[k], v) for k, v in model.state_dict().items())
    assert open_run(store).epoch.values.tolist() == [0]  # the store is consistent
    mon.update(epoch=1)  # and the session goes on
    mon.close()
    assert open_run(store).epoch.values.tolist() == [0, 1]


def test_ctrl_c_in_probe_restores_device_memory_format_and_releases_the_store(digits_tensors, tmp_path):
    model = tiny_convnet()
    handle = _interrupt_after(model.fc1, 4)  # after the two shape-discovery passes, during extraction
    with pytest.raises(KeyboardInterrupt):
        pk.probe(model, digits_tensors, store=tmp_path / "p.zarr", channels_last=True, quiet=True)
    handle.remove()
    assert all(p.is_contiguous() for p in model.parameters())
    assert open_run(tmp_path / "p.zarr").sizes["epoch"] == 0
    ds = pk.probe(model, digits_tensors, store=tmp_path / "p.zarr", resume=True, quiet=True)  # lock was released
    assert ds.sizes["epoch"] == 1


def test_truncated_chunk_names_the_broken_variable_and_what_still_reads(digits_tensors, tmp_path):
    store = tmp_path / "t.zarr"
    pk.probe(tiny_convnet(), digits_tensors, store=store, quiet=True)
    chunk = next((store / "probe").glob("0.*"))
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(StoreError, match=r"is damaged: cannot read probe \(.*\); still readable: .*feature_dim.*layer"):
        open_run(store)


def test_missing_metadata_file_names_the_store_and_how_to_read_the_rest(digits_tensors, tmp_path):
    store = tmp_path / "m.zarr"
    pk.probe(tiny_convnet(), digits_tensors, store=store, quiet=True)
    (store / ".zmetadata").unlink()
    with pytest.raises(StoreError, match=r"is damaged: its metadata file .zmetadata is missing; .*consolidated=False"):
        open_run(store)


def test_unreadable_metadata_is_reported_not_raised_raw(digits_tensors, tmp_path):
    store = tmp_path / "b.zarr"
    pk.probe(tiny_convnet(), digits_tensors, store=store, quiet=True)
    (store / ".zmetadata").write_text("{ not json")
    with pytest.raises(StoreError, match="broken metadata file .zmetadata"):
        open_run(store)


def test_read_only_location_is_refused_before_any_training(digits_tensors):
    model = tiny_convnet()
    calls = []
    model.conv1.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(StoreError, match="cannot create run store '/proc/probekit-test.zarr'.*choose a writable location"):
        pk.probe(model, digits_tensors, store="/proc/probekit-test.zarr", quiet=True)
    assert len(calls) == 2  # the two shape-discovery passes only


def test_oversized_layer_is_refused_before_allocating_with_the_reductions_that_fit():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(4, 3, 224, 224)
    y = torch.arange(4) % 2
    with pytest.raises(ValueError, match=r"layer 'conv1' has 802,816 features \(64x112x112\).*'pool8'"):
        pk.probe(model, {"train": (x, y)}, layers=["conv1"], reduce="flatten", quiet=True)


def test_declared_classes_missing_from_train_are_an_error(digits_tensors):
    with pytest.raises(ValueError, match=r"the train split holds 10 of the 12 declared classes \(missing \[10, 11\]\)"):
        pk.probe(tiny_convnet(), digits_tensors, num_classes=12, quiet=True)


def test_nan_labels_are_refused_naming_the_split(digits_tensors):
    x, y = digits_tensors["train"]
    bad = y.float()
    bad[3] = float("nan")
    with pytest.raises(TypeError, match="the train split's labels must be integer class indices"):
        pk.probe(tiny_convnet(), {"train": (x, bad)}, quiet=True)


def test_training_mode_model_is_probed_in_eval_mode(digits_tensors):
    model = tiny_convnet(batchnorm=True, dropout=True)
    with torch.no_grad():
        model.train()
        model(digits_tensors["train"][0][:200])  # running stats differ from batch stats
    in_train = pk.probe(model.train(), digits_tensors, quiet=True)
    in_eval = pk.probe(model.eval(), digits_tensors, quiet=True)
    np.testing.assert_array_equal(in_train.probe.values, in_eval.probe.values)


def test_resume_of_a_finished_probe_returns_it_without_recomputing(digits_tensors, tmp_path):
    store = tmp_path / "r.zarr"
    first = pk.probe(tiny_convnet(), digits_tensors, store=store, quiet=True)
    model = tiny_convnet()
    calls = []
    model.conv1.register_forward_hook(lambda *a: calls.append(1))
    again = pk.probe(model, digits_tensors, store=store, resume=True, quiet=True)
    np.testing.assert_array_equal(first.probe.values, again.probe.values)
    assert len(calls) == 2  # the two shape-discovery passes only


def test_resume_with_other_data_is_refused(digits_tensors, tmp_path):
    store = tmp_path / "d.zarr"
    pk.probe(tiny_convnet(), digits_tensors, store=store, quiet=True)
    smaller = {k: (x[:300], y[:300]) for k, (x, y) in digits_tensors.items()}
    with pytest.raises(StoreError, match="made for another run: its 'n_train' differs"):
        pk.probe(tiny_convnet(), smaller, store=store, resume=True, quiet=True)


def test_writer_refuses_a_store_killed_while_being_created(tmp_path):
    # A kill during creation leaves only a hidden temporary folder, never a half-made store.
    leftover = tmp_path / ".r.zarr.tmp-123-abcd"
    leftover.mkdir()
    (leftover / ".zgroup").write_text("{}")
    assert not (tmp_path / "r.zarr").exists()
    from probekit.run.schema import RunLayout, metric_names

    layout = RunLayout(["input"], [0], [0.0], ["input"], ["4"], [4], ["flatten"], metric_names(["train"], 3), {})
    RunWriter(tmp_path / "r.zarr", layout).close()
    assert open_run(tmp_path / "r.zarr").sizes["epoch"] == 0


_WITHOUT_POSIX_MODULES = """
import sys
sys.modules["fcntl"] = None  # as on Windows: importing it raises ImportError
sys.modules["msvcrt"] = None  # and no Windows lock either: reading must need neither
import probekit
from probekit import plots
ds = probekit.open_run(sys.argv[1])
plots.depth_profile(ds).to_dict()
probekit.explore(ds)
print("read, charted and explored", ds.sizes["epoch"], "epochs")
"""


def test_reading_and_charts_work_without_posix_only_modules():
    """``import probekit``, ``open_run``, the charts and the explorers never import ``fcntl``: only a writer locks."""
    root = Path(__file__).resolve().parents[2]
    store = root / "data" / "runs" / "mnist-convnet.zarr"
    proc = subprocess.run([sys.executable, "-c", _WITHOUT_POSIX_MODULES, str(store)], cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"read, charted and explored {open_run(store).sizes['epoch']} epochs" in proc.stdout


def test_write_atomic_replaces_whole_files_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_atomic(target, b"old")
    write_atomic(target, b'{"new": 1}')
    assert target.read_bytes() == b'{"new": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    with pytest.raises(FileNotFoundError):
        write_atomic(tmp_path / "missing" / "b.json", b"x")
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
