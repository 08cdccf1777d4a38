"""pk.plan: the policy per layer, before any work."""

from __future__ import annotations

import pytest
import torch

import probekit as pk
from tests.conftest import tiny_convnet


def test_plan_prints_the_policy_before_any_training(capsys):
    import torchvision

    plan = pk.plan(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224), layers=["input", "layer1.0", "layer4.1"])
    frame = plan.frame()
    # "auto" on a map: several poolings side by side, each within the budget, for the fit to choose among.
    assert frame.reduction.tolist() == ["auto(pool|pool2|pool4|pool36)", "auto(pool|pool2|pool4|pool8)", "auto(pool|pool2)"]
    assert frame.layout.tolist() == ["map", "map", "map"]
    for name, d in zip(plan.layers, frame.feature_dim):
        spans = list(plan.candidates[name].values())
        assert spans[0].start == 0 and spans[-1].stop == d and all(s.stop - s.start <= 4096 for s in spans)
    assert plan.candidates["layer1.0"]["pool8"] == slice(64 * (1 + 4 + 16), 64 * (1 + 4 + 16 + 64))
    assert frame.probe_params.tolist() == [(d + 1) * 10 for d in frame.feature_dim]
    text = str(plan)
    assert "probe plan: 3 layers of ResNet" in text and "pool8" in text


def test_plan_checks_its_arguments_before_tracing():
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="budget must be an integer >= 1; got 0"):
        pk.plan(tiny_convnet(), x, budget=0)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2; got 1"):
        pk.plan(tiny_convnet(), x, num_classes=1)
    with pytest.raises(ValueError, match="seed must be an integer >= 0; got -3"):
        pk.plan(tiny_convnet(), x, seed=-3)
