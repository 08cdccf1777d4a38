"""pk.probe and pk.probe_checkpoints end to end on the embedded digits: the model left as found, the run's schema, data checks."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

import probekit as pk
from tests.conftest import tiny_convnet


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, {n: m.training for n, m in model.named_modules()}


def test_probe_leaves_parameters_buffers_and_modes_exactly_as_found(digits_tensors):
    model = tiny_convnet(batchnorm=True, dropout=True)
    model.train()
    model.fc2.eval()
    with torch.no_grad():  # non-trivial running statistics
        model(digits_tensors["train"][0][:64])
    params, modes = _state(model)
    tracked = model.bn1.num_batches_tracked.clone()
    ds = pk.probe(model, digits_tensors, layers="all", quiet=True)
    after_params, after_modes = _state(model)
    assert after_modes == modes
    assert all(torch.equal(params[k], after_params[k]) for k in params)
    assert torch.equal(model.bn1.num_batches_tracked, tracked)
    assert all(p.grad is None for p in model.parameters())  # no gradient reached the model
    assert all(p.is_contiguous() for p in model.parameters())  # channels-last was undone
    assert ds.sizes == {"layer": 10, "epoch": 1, "metric": 9}


def test_one_forward_pass_per_batch_feeds_every_layer(digits_tensors):
    model = tiny_convnet()
    calls = []
    model.conv1.register_forward_hook(lambda *a: calls.append(1))
    pk.probe(model, digits_tensors, layers="all", batch_size=100, quiet=True)
    # 1000 + 400 + 397 examples in batches of 100 -> 10 + 4 + 4 passes, plus the two
    # discovery passes (batches of 2 and 3) that find the probe points' shapes and batch dims.
    assert len(calls) == 18 + 2


def test_store_schema_coordinates_and_provenance(digits_tensors, tmp_path):
    model = tiny_convnet()
    ds = pk.probe(model, digits_tensors, store=tmp_path / "a.zarr", quiet=True, seed=7)
    assert ds.probe.dims == ("layer", "epoch", "metric")
    assert list(ds.layer.values) == ["input", "conv1", "relu1", "pool1", "flatten", "fc1", "relu2", "fc2"]
    assert ds.depth.values.tolist() == sorted(ds.depth.values.tolist())
    assert ds.relative_depth.values[0] == 0 and ds.relative_depth.values[-1] == 1
    assert list(ds.metric.values) == [f"{s}_{m}" for s in ("train", "valid", "test") for m in ("error", "loss", "top5")]
    # auto on a map: the candidates side by side (8 + 32 + 128 + 512 columns), one chosen per fit on held-out data
    assert ds.reduction.sel(layer="conv1").item() == "auto(pool|pool2|pool4|flatten)"
    assert ds.feature_dim.sel(layer="conv1").item() == 680
    assert ds.reduction_used.sel(layer="conv1").item() in ("pool", "pool2", "pool4", "flatten")
    assert ds.reduction_used.sel(layer="fc1").item() == ds.reduction.sel(layer="fc1").item() == "flatten"
    assert np.isfinite(ds.l2.values).all() and (ds.l2.values > 0).all()
    assert ds["shape"].sel(layer="pool1").item() == "8x4x4"
    for key in ("probekit_version", "torch_version", "python_version", "model", "model_parameters", "n_train",
                "n_valid", "n_test", "seed", "device", "mode", "command", "started", "chance_error", "num_classes"):
        assert key in ds.attrs, key
    assert ds.attrs["seed"] == 7 and ds.attrs["mode"] == "snapshot" and ds.attrs["n_train"] == 1000
    assert ds.epoch.values.tolist() == [0] and ds.step.values.tolist() == [-1]  # step=None: unknown, stored as -1
    stored = pk.open_run(tmp_path / "a.zarr")
    np.testing.assert_array_equal(stored.probe.values, ds.probe.values)
    assert stored.attrs == ds.attrs


def test_nan_features_flag_one_layer_and_the_others_are_probed(digits_tensors):
    model = tiny_convnet()
    model.fc1.register_forward_hook(lambda m, i, o: o * float("nan"))
    with pytest.warns(RuntimeWarning, match=r"layers \['fc1', 'relu2', 'fc2'\] produced NaN"):
        ds = pk.probe(model, digits_tensors, quiet=True)
    assert ds.nonfinite.sel(layer="fc1").item() and not ds.nonfinite.sel(layer="relu1").item()
    assert np.isnan(ds.probe.sel(layer="fc1").values).all()
    assert np.isfinite(ds.probe.sel(layer="relu1").values).all()


def test_probe_checkpoints_writes_one_row_per_snapshot(digits_tensors, tmp_path):
    paths = []
    for seed in range(3):
        path = tmp_path / f"c{seed}.pt"
        torch.save(tiny_convnet(seed=seed).state_dict(), path)
        paths.append(path)
    ds = pk.probe_checkpoints(tiny_convnet, paths, digits_tensors, store=tmp_path / "c.zarr", steps=[0, 500, 2000],
                              layers=["input", "fc2"], quiet=True)
    assert ds.epoch.values.tolist() == [0, 1, 2] and ds.step.values.tolist() == [0, 500, 2000]
    inputs = ds.probe.sel(layer="input", metric="valid_error").values
    assert np.ptp(inputs) == 0  # the input does not depend on the weights
    assert np.ptp(ds.probe.sel(layer="fc2", metric="valid_error").values) > 0


def test_probe_checkpoints_refuses_pickled_code(digits_tensors, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Payload()}, path)
    with pytest.raises(ValueError, match="refusing to load .*evil.pt.*objects other than tensors"):
        pk.probe_checkpoints(tiny_convnet, [path], digits_tensors, quiet=True)


def test_bad_data_arguments_fail_with_one_line(digits_tensors):
    model = tiny_convnet()
    x, y = digits_tensors["train"]
    with pytest.raises(ValueError, match="no 'train' split"):
        pk.probe(model, {"valid": (x, y)}, quiet=True)
    with pytest.raises(ValueError, match=r"the valid split has labels in \[12, 12\], outside \[0, 9\]"):
        pk.probe(model, {"train": (x, y), "valid": (x[:10], torch.full((10,), 12))}, num_classes=10, quiet=True)
    with pytest.raises(TypeError, match="the train split's labels are torch.float32 holding whole numbers"):
        pk.probe(model, {"train": (x, y.float())}, quiet=True)
    with pytest.raises(ValueError, match="the train split holds a single class"):
        pk.probe(model, {"train": (x[:5], torch.zeros(5, dtype=torch.long))}, quiet=True)
    with pytest.raises(ValueError, match="cannot run on an input of per-example shape 3x8x8"):
        pk.probe(model, {"train": (torch.randn(10, 3, 8, 8), y[:10])}, quiet=True)
    with pytest.raises(ValueError, match="the valid split is empty"):
        pk.probe(model, {"train": (x, y), "valid": (x[:0], y[:0])}, quiet=True)


def test_results_are_deterministic_for_a_seed(digits_tensors):
    a = pk.probe(tiny_convnet(), digits_tensors, reduce="subset50", quiet=True, seed=3)
    b = pk.probe(tiny_convnet(), digits_tensors, reduce="subset50", quiet=True, seed=3)
    c = pk.probe(tiny_convnet(), digits_tensors, reduce="subset50", quiet=True, seed=4)
    np.testing.assert_array_equal(a.probe.values, b.probe.values)
    assert not np.array_equal(a.probe.values, c.probe.values)


def test_dataloaders_and_datasets_are_accepted(digits_tensors):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = digits_tensors["train"]
    vx, vy = digits_tensors["valid"]
    as_tensors = pk.probe(tiny_convnet(), {"train": (x, y), "valid": (vx, vy)}, layers=["relu1"], quiet=True)
    as_loaders = pk.probe(tiny_convnet(), (DataLoader(TensorDataset(x, y), batch_size=64), TensorDataset(vx, vy)),
                          layers=["relu1"], quiet=True, num_classes=10)
    np.testing.assert_allclose(as_tensors.probe.values, as_loaders.probe.values, atol=2e-3)


def test_no_warnings_on_a_plain_run(digits_tensors, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.probe(copy.deepcopy(tiny_convnet()), digits_tensors, store=tmp_path / "w.zarr", quiet=True)
        pk.open_run(tmp_path / "w.zarr")


def test_feature_cache_on_disk_gives_the_same_result(digits_tensors):
    in_memory = pk.probe(tiny_convnet(), digits_tensors, quiet=True)
    on_disk = pk.probe(tiny_convnet(), digits_tensors, quiet=True, cache_bytes=1)  # every split goes to disk
    np.testing.assert_array_equal(in_memory.probe.values, on_disk.probe.values)


def test_probe_and_probe_checkpoints_check_their_own_arguments(digits_tensors, tmp_path):
    with pytest.raises(ValueError, match="device must be a str or a device or None; got 3"):
        pk.probe(tiny_convnet(), digits_tensors, device=3, quiet=True)
    with pytest.raises(ValueError, match="epoch must be an integer >= 0 or None; got -1"):
        pk.probe(tiny_convnet(), digits_tensors, epoch=-1, quiet=True)
    with pytest.raises(ValueError, match="l2 must be a finite number >= 0 or one of 'auto'; got -1"):
        pk.probe(tiny_convnet(), digits_tensors, l2=-1, quiet=True)
    with pytest.raises(ValueError, match="build_model must be a Callable; got 'convnet'"):
        pk.probe_checkpoints("convnet", [tmp_path / "c.pt"], digits_tensors, quiet=True)
    torch.save(tiny_convnet().state_dict(), tmp_path / "c.pt")
    with pytest.raises(ValueError, match=r"epochs= and steps= need one entry per checkpoint \(1\); got 2 and 1"):
        pk.probe_checkpoints(tiny_convnet, [tmp_path / "c.pt"], digits_tensors, epochs=[0, 1], quiet=True)
