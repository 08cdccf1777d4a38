"""Controls: random-init copies, control-task labels, bootstrap repeats, the MDL online code, and their runs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from probekit.engine import controls
from probekit.engine.probes import fit_probes


class _WithBareParameter(nn.Module):
    def __init__(self):
        super().__init__()
        self.token = nn.Parameter(torch.arange(12.0))
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn(self.fc(x)) + self.token[:3]


def test_random_init_copy_is_seeded_and_leaves_the_model_and_rng_alone():
    torch.manual_seed(1)
    model = _WithBareParameter()
    with torch.no_grad():
        model.bn.running_mean.fill_(5.0)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()
    fresh, permuted = controls.random_init_copy(model, seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not fresh.training
    assert not torch.equal(fresh.fc.weight, model.fc.weight)
    assert torch.equal(fresh.bn.running_mean, torch.zeros(3))  # BatchNorm's own reset
    assert permuted == ["token"]
    assert sorted(fresh.token.tolist()) == list(range(12)) and fresh.token.tolist() != list(range(12))
    again, _ = controls.random_init_copy(model, seed=3)
    other, _ = controls.random_init_copy(model, seed=4)
    assert torch.equal(again.fc.weight, fresh.fc.weight) and torch.equal(again.token, fresh.token)
    assert not torch.equal(other.fc.weight, fresh.fc.weight)


def test_control_labels_are_fixed_per_type_and_follow_class_frequencies():
    train_labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    types = {"train": torch.arange(200).repeat(3)[torch.randperm(600, generator=torch.Generator().manual_seed(0))],
             "valid": torch.arange(150, 250)}
    labels = controls.control_labels(types, train_labels, 3, seed=0)
    assert labels["train"].shape == (600,) and labels["valid"].shape == (100,)
    label_of = {}
    for split in types:
        for t, c in zip(types[split].tolist(), labels[split].tolist()):
            assert label_of.setdefault(t, c) == c  # one label per type, in every split
    counts = np.bincount(list(label_of.values()), minlength=3)
    assert counts.tolist() == [150, 75, 25]  # 250 types cut 60 / 30 / 10 %
    assert torch.equal(controls.control_labels(types, train_labels, 3, seed=0)["train"], labels["train"])
    assert not torch.equal(controls.control_labels(types, train_labels, 3, seed=1)["train"], labels["train"])


def test_each_example_is_its_own_type_unless_groups_are_given():
    types = controls.example_types({"train": 4, "valid": 2})
    assert types["train"].tolist() == [0, 1, 2, 3] and types["valid"].tolist() == [4, 5]
    groups = controls.check_groups({"train": [0, 0, 1, 1], "val": np.array([1, 0])}, {"train": 4, "valid": 2})
    assert controls.example_types({"train": 4, "valid": 2}, groups)["valid"].tolist() == [1, 0]
    with pytest.raises(ValueError, match=r"groups\['train'\] has 3 entries but the train split has 4 examples"):
        controls.check_groups({"train": [0, 0, 1], "valid": [1, 0]}, {"train": 4, "valid": 2})
    with pytest.raises(ValueError, match="lacks the split"):
        controls.check_groups({"train": [0, 0, 1, 1]}, {"train": 4, "valid": 2})
    with pytest.raises(TypeError, match="whole numbers"):
        controls.check_groups({"train": [0.5, 0, 1, 1], "valid": [1, 0]}, {"train": 4, "valid": 2})


def test_bootstrap_keeps_every_class_count_and_differs_per_repeat():
    labels = torch.tensor([0] * 7 + [1] * 20 + [2] * 3)
    a, b = controls.bootstrap_indices(labels, 0, 1), controls.bootstrap_indices(labels, 0, 2)
    assert torch.equal(torch.bincount(labels[a]), torch.bincount(labels))
    assert a.unique().numel() < labels.numel()  # with replacement
    assert not torch.equal(a, b) and torch.equal(a, controls.bootstrap_indices(labels, 0, 1))
    assert len({controls.repeat_seed(0, r) for r in range(5)}) == 5


def test_block_schedule_starts_small_and_ends_at_the_split():
    assert controls.block_ends(1000) == [1, 2, 4, 8, 16, 32, 63, 125, 250, 500, 1000]
    assert controls.block_ends(10) == [1, 2, 3, 5, 10]
    assert controls.block_ends(1) == [1]


def _fitter(num_classes: int, l2: float):
    def fit(features, labels):
        return {layer: f.logits for layer, f in fit_probes(features, labels, num_classes, l2=l2).items()}
    return fit


def test_mdl_of_random_labels_is_close_to_the_uniform_code_and_far_below_it_for_real_ones():
    generator = torch.Generator().manual_seed(0)
    n, k = 600, 4
    y = torch.randint(0, k, (n,), generator=generator)
    informative = torch.nn.functional.one_hot(y, k).float() * 3 + torch.randn(n, k, generator=generator)
    noise = torch.randn(n, 32, generator=generator)
    mdl, uniform = controls.online_code_length({"noise": noise}, y, k, fit=_fitter(k, 1.0))["noise"]
    assert uniform == pytest.approx(n * math.log2(k))
    assert 0.9 < uniform / mdl < 1.1  # random labels: nothing to compress
    mdl, uniform = controls.online_code_length({"real": informative}, y, k, fit=_fitter(k, 1e-2))["real"]
    assert uniform / mdl > 4.0


def test_bad_names_get_one_line_errors_listing_the_known_ones():
    with pytest.raises(ValueError, match="unknown baseline 'random'.*known baselines are: random_init, control"):
        controls.check_baselines(["random"])
    assert controls.check_baselines("control,random_init") == ("random_init", "control")
    assert controls.check_baselines(None) == ()
    with pytest.raises(ValueError, match="unknown metric 'mld'.*choose from: error, loss, top5, mdl"):
        controls.check_metrics(["mld"])
    assert controls.check_metrics(["error", "mdl"]) == ("mdl",)


# ----------------------------------------------------------------------------- in a run
def _digits():
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16, torch.tensor(y)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def test_random_init_gain_is_zero_untrained_and_positive_at_the_output_of_a_trained_model():
    import probekit as pk

    x, y = _digits()
    data = {"train": (x[:600], y[:600]), "valid": (x[1000:1400], y[1000:1400])}
    layers = ["input", "2", "3"]

    def gain(model):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        ds = pk.probe(model, data, layers=layers, baselines=["random_init"], quiet=True)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not touched
        task = ds.probe.sel(metric="valid_error").squeeze("epoch")
        fresh = ds.baselines.sel(baseline="random_init", metric="valid_error").squeeze("epoch")
        return (fresh - task).values

    untrained = gain(_mlp(seed=1))
    assert untrained[0] == 0  # the input is the same for both
    assert abs(untrained[1]) < 0.03  # 64 random features: as good as another random init's
    assert abs(untrained[2]) < 0.15  # 10 random outputs vary more from one init to the next
    model = _mlp(seed=1)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[:600]), y[:600]).backward()
        optimizer.step()
    trained = gain(model)
    assert trained[0] == 0 and trained[-1] > 0.2


def test_a_memorising_probe_has_low_selectivity():
    import probekit as pk

    x, y = _digits()
    generator = torch.Generator().manual_seed(0)

    def copies(k):  # noisy copies of 150 images: each image is one type of the control task
        return (x[:150].repeat(k, 1, 1, 1) + 0.05 * torch.randn(150 * k, 1, 8, 8, generator=generator),
                y[:150].repeat(k), torch.arange(150).repeat(k))

    (tx, ty, tg), (vx, vy, vg) = copies(4), copies(2)
    torch.manual_seed(0)
    wide = nn.Sequential(nn.Flatten(), nn.Linear(64, 2048), nn.ReLU())
    data, groups = {"train": (tx, ty), "valid": (vx, vy)}, {"train": tg, "valid": vg}

    def selectivity(reduce, l2, groups):
        ds = pk.probe(wide, data, layers=["2"], reduce=reduce, l2=l2, baselines=["control"], groups=groups, quiet=True)
        return float(ds.probe.sel(metric="valid_selectivity").item()), float(ds.probe.sel(metric="valid_error").item())

    memorising, error = selectivity("flatten", 1e-4, groups)
    assert error < 0.05 and memorising < 0.1  # it learns the task, and the control task as well
    small, _ = selectivity("subset8", 1e-1, groups)
    assert small > memorising + 0.2  # a small probe cannot memorise 150 random labels
    unseen, _ = selectivity("flatten", 1e-4, None)  # each example its own type: no valid type was seen in training
    assert unseen > 0.8


def test_the_repeats_band_contains_the_single_fit():
    import probekit as pk
    from tests.conftest import tiny_convnet

    x, y = _digits()
    data = {"train": (x[:1000], y[:1000]), "valid": (x[1000:1400], y[1000:1400])}
    layers = ["input", "relu1", "fc1", "fc2"]
    single = pk.probe(tiny_convnet(), data, layers=layers, reduce={"relu1": "subset64"}, quiet=True)
    ds = pk.probe(tiny_convnet(), data, layers=layers, reduce={"relu1": "subset64"}, repeats=8, quiet=True)
    repeats = ds.probe_repeat.sel(metric="valid_error").squeeze("epoch").values  # (layer, repeat)
    one = single.probe.sel(metric="valid_error").squeeze("epoch").values
    assert ds.sizes["repeat"] == 8 and np.isfinite(repeats).all()
    assert (repeats.std(1) > 0).all()  # bootstrap resamples (and, at relu1, subsets) differ
    # A bootstrap fit sees about 63% distinct examples, so the repeats sit a little above the full fit
    # (bootstrap bias); a band of 3 standard deviations still holds it.
    spread = 3 * repeats.std(1, ddof=1)
    low, high = repeats.mean(1) - spread, repeats.mean(1) + spread
    assert ((low <= one) & (one <= high)).all(), (low, one, high)
    np.testing.assert_allclose(ds.probe.sel(metric="valid_error").squeeze("epoch").values, repeats.mean(1))
    np.testing.assert_array_equal(ds.l2.values, single.l2.values)  # chosen on the whole split, then kept


def test_mdl_on_random_labels_is_close_to_the_uniform_code():
    import probekit as pk
    from tests.conftest import tiny_convnet

    x, _ = _digits()
    labels = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(0))
    data = {"train": (x[:600], labels[:600]), "valid": (x[1000:1200], labels[1000:1200])}
    ds = pk.probe(tiny_convnet(), data, layers=["input", "relu1", "fc2"], metrics=["mdl"], quiet=True)
    compression = ds.probe.sel(metric="train_compression").squeeze("epoch").values
    assert ((compression > 0.9) & (compression < 1.1)).all(), compression
    mdl = ds.probe.sel(metric="train_mdl").squeeze("epoch").values
    np.testing.assert_allclose(mdl * compression, 600 * math.log2(10))


def test_bad_control_arguments_get_one_line_errors(tmp_path):
    import probekit as pk
    from tests.conftest import tiny_convnet

    x, y = _digits()
    data = {"train": (x[:200], y[:200]), "valid": (x[1000:1100], y[1000:1100])}
    with pytest.raises(ValueError, match="unknown baseline 'random'.*known baselines are: random_init, control"):
        pk.probe(tiny_convnet(), data, baselines=["random"], quiet=True)
    with pytest.raises(ValueError, match="repeats must be an integer >= 1; got 0"):
        pk.probe(tiny_convnet(), data, repeats=0, quiet=True)
    with pytest.raises(ValueError, match="online mode never does; use mode='snapshot'"):
        pk.ProbeMonitor(tiny_convnet(), data, mode="online", baselines=["control"], layers=["fc2"], quiet=True)
    with pytest.raises(ValueError, match="groups= are the control task's example types"):
        pk.probe(tiny_convnet(), data, groups={"train": torch.arange(200), "valid": torch.arange(100)}, quiet=True)
    few = {"train": (x[:30], y[:30]), "valid": (x[1000:1100], y[1000:1100])}  # 3 examples per class
    with pytest.warns(RuntimeWarning, match="needs at least 5 training examples of every class"):
        ds = pk.probe(tiny_convnet(), few, layers=["fc2"], store=tmp_path / "few.zarr", quiet=True)
    assert "l2=0.001" in pk.open_run(tmp_path / "few.zarr").attrs["l2_fallback"]
    assert ds.attrs["l2"] == "auto" and ds.l2.values.ravel().tolist() == [1e-3]


def test_online_mode_records_the_head_it_reports_under_l2_auto():
    import probekit as pk
    from probekit.engine.online import ONLINE_L2_PATH
    from tests.conftest import tiny_convnet

    x, y = _digits()
    model = tiny_convnet()
    mon = pk.ProbeMonitor(model, {"train": (x[:400], y[:400]), "valid": (x[1000:1200], y[1000:1200])}, mode="online",
                          layers=["relu1", "fc2"], quiet=True, probe_lr=1e-2)
    for i in range(0, 400, 50):
        model(x[i:i + 50])
        mon.step(y[i:i + 50])
    ds = mon.update(epoch=0)
    mon.close()
    assert ds.attrs["l2"] == "auto" and set(ds.l2.values.ravel().tolist()) <= set(ONLINE_L2_PATH)


def test_bootstrap_of_a_token_level_run_draws_whole_sequences():
    groups = torch.arange(20).repeat_interleave(3)
    labels = torch.arange(60) % 2
    rows = controls.bootstrap_indices(labels, seed=0, repeat=1, groups=groups)
    drawn = groups[rows]
    for g in torch.unique(drawn).tolist():  # a drawn sequence comes whole, once per draw
        assert (drawn == g).sum() % 3 == 0
    assert rows.numel() == 60
    assert not torch.equal(rows, controls.bootstrap_indices(labels, seed=0, repeat=2, groups=groups))
