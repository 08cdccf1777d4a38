"""Online ProbeMonitor: the fused probe step, and scoring the probes in the training loop's own validation pass (observe)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import probekit as pk
from tests.conftest import tiny_convnet

LAYERS = ["input", "relu1", "fc1", "fc2"]


def _train_epoch(model, mon, x, y, opt):
    model.train()
    for i in range(0, 500, 100):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100]).backward()
        opt.step()
        mon.step(y[i:i + 100])


def _validate(model, mon, split, batch=128):
    x, y = split
    model.eval()
    with torch.no_grad():
        for start in range(0, len(y), batch):
            model(x[start:start + batch])
            mon.observe(y[start:start + batch], split="valid")


def test_observed_validation_batches_score_as_the_monitors_own_pass(digits_tensors):
    """Two identical runs: one monitor runs its own valid pass, the other is fed the training loop's; same row."""
    model = tiny_convnet()
    twin = copy.deepcopy(model)
    rows = []
    sizes = []
    for net, feed in ((model, False), (twin, True)):
        mon = pk.ProbeMonitor(net, digits_tensors, mode="online", layers=LAYERS, quiet=True, probe_lr=1e-2)
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        for epoch in (1,):
            _train_epoch(net, mon, *digits_tensors["train"], opt)
            if feed:
                _validate(net, mon, digits_tensors["valid"])
            seen = []
            hook = net.conv1.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out.shape[0]))
            mon.update(epoch=epoch)
            hook.remove()
            sizes.append(sum(seen))
        rows.append(mon.dataset)
        mon.close()
    plain, fed = rows
    np.testing.assert_allclose(fed.probe.values, plain.probe.values, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fed.l2.values, plain.l2.values)
    assert np.isfinite(fed.probe.sel(metric="valid_error").values).all()
    # The fed monitor's updates ran the model over the test split only (397 examples), not over valid (400).
    assert sizes == [797, 397]


def test_the_held_out_pass_scores_what_the_traced_extractor_and_score_give(digits_tensors):
    from probekit.engine.extract import build_extractor
    from probekit.engine.probes import score

    model = tiny_convnet()
    mon = pk.ProbeMonitor(model, digits_tensors, mode="online", layers=LAYERS, quiet=True, probe_lr=1e-2)
    _train_epoch(model, mon, *digits_tensors["train"], torch.optim.SGD(model.parameters(), lr=0.05))
    x, y = digits_tensors["valid"]
    with torch.no_grad():
        model.eval()
        features = build_extractor(mon.graph, mon.plan.reducers)(x)
    expected = {layer: score(mon._online.logits_of(layer), features[layer], y, 10) for layer in LAYERS}
    row = mon.update(epoch=1)
    mon.close()
    for layer in LAYERS:
        for measure, value in expected[layer].items():
            assert row.probe.sel(layer=layer, metric=f"valid_{measure}").item() == pytest.approx(value, rel=1e-5, abs=1e-6)


def test_observe_counts_only_the_batches_since_the_last_update(digits_tensors):
    model = tiny_convnet()
    mon = pk.ProbeMonitor(model, digits_tensors, mode="online", layers=["fc1"], quiet=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train_epoch(model, mon, *digits_tensors["train"], opt)
    x, y = digits_tensors["valid"]
    model.eval()
    with torch.no_grad():
        model(x[:50])
        mon.observe(y[:50])
    first = mon.update(epoch=1).probe.sel(metric="valid_error").item()
    with torch.no_grad():
        model(x[:50])
        mon.observe(y[:50])
    second = mon.update(epoch=2).probe.sel(metric="valid_error").item()
    mon.close()
    assert first == second  # the same 50 examples each time, no step between: one epoch's batches, not two
    assert first * 50 == pytest.approx(round(first * 50))


def test_observe_flags_a_layer_whose_validation_features_are_not_finite(digits_tensors):
    model = tiny_convnet()
    mon = pk.ProbeMonitor(model, digits_tensors, mode="online", layers=["input", "fc1"], quiet=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train_epoch(model, mon, *digits_tensors["train"], opt)
    x, y = digits_tensors["valid"]
    bad = x[:20].clone()
    bad[3, 0, 0, 0] = float("nan")
    model.eval()
    with torch.no_grad():
        model(bad)
    mon.observe(y[:20])
    with pytest.warns(RuntimeWarning, match="NaN or Inf"):
        row = mon.update(epoch=1)
    mon.close()
    assert row.nonfinite.sel(layer="input").item() and row.nonfinite.sel(layer="fc1").item()


def test_observe_errors_say_what_to_do(digits_tensors):
    model = tiny_convnet()
    snapshot = pk.ProbeMonitor(model, digits_tensors, layers=["fc1"], quiet=True)
    with pytest.raises(RuntimeError, match="observe\\(\\) is for mode='online'"):
        snapshot.observe(digits_tensors["valid"][1][:8])
    mon = pk.ProbeMonitor(model, digits_tensors, mode="online", layers=["fc1"], quiet=True)
    x, y = digits_tensors["valid"]
    with pytest.raises(RuntimeError, match="no captured features; call it after the model's forward pass"):
        mon.observe(y[:8])
    with torch.no_grad():
        model(x[:8])
    with pytest.raises(ValueError, match="^split='train' is not a held-out split of this monitor; choose from: 'valid', 'test'$"):
        mon.observe(y[:8], split="train")
    with pytest.raises(ValueError, match="^observe\\(\\) got 6 labels for a batch of 8 examples"):
        mon.observe(y[:6])
    mon.observe(y[:8])
    with pytest.raises(RuntimeError, match="no captured features"):  # each batch once
        mon.observe(y[:8])
    mon.close()


def test_fused_step_matches_an_autograd_step_of_the_same_probes():
    """The closed-form gradient and the fused optimiser give what autograd and Adam give on the same modules."""
    from probekit.engine.online import OnlineProbes

    torch.manual_seed(0)
    probes = OnlineProbes({"a": 7, "b": 3}, 4, lr=0.05, l2="auto")
    reference = copy.deepcopy(probes.probes)
    optimizer = torch.optim.Adam([{"params": [p[1].weight for p in reference]}, {"params": [p[1].bias for p in reference]}],
                                 lr=0.05, foreach=False)
    decay = torch.tensor(probes.l2_path).repeat_interleave(4)[:, None]
    generator = torch.Generator().manual_seed(1)
    for _ in range(6):
        features = {"a": torch.randn(16, 7, generator=generator) * 3, "b": torch.randn(16, 3, generator=generator) + 2}
        y = torch.randint(0, 4, (16,), generator=generator)
        probes.step(features, y)
        optimizer.zero_grad()
        reference.train()
        for probe, x in zip(reference, features.values()):
            logits = probe(x).view(16, len(probes.l2_path), 4).transpose(0, 1)
            loss = sum(nn.functional.cross_entropy(head, y) for head in logits)
            loss.backward()
            probe[1].weight.grad.add_(decay * probe[1].weight.detach())
        optimizer.step()
    for ours, theirs in zip(probes.probes, reference):
        for a, b in zip([*ours.parameters(), *ours.buffers()], [*theirs.parameters(), *theirs.buffers()]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert probes.running["a"]["n"] == 96 and len(probes.running["a"]["loss"]) == len(probes.l2_path)
