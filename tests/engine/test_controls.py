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
