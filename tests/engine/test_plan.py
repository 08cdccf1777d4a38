"""pk.plan: the policy per layer, before any work."""

from __future__ import annotations

import torch

import probekit as pk


def test_plan_prints_the_policy_before_any_training(capsys):
    import torchvision

    plan = pk.plan(torchvision.models.resnet18(), torch.randn(1, 3, 224, 224), layers=["input", "layer1.0", "layer4.1"])
    frame = plan.frame()
    assert frame.reduction.tolist() == ["pool36", "pool8", "pool2"] and (frame.feature_dim <= 4096).all()
    assert frame.probe_params.tolist() == [(d + 1) * 10 for d in frame.feature_dim]
    text = str(plan)
    assert "probe plan: 3 layers of ResNet" in text and "pool8" in text
