"""The probe solver reaches the convex optimum: agreement with scikit-learn, chance, identity stacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import probekit as pk
from probekit.engine.extract import build_extractor
from probekit.engine.points import LayerGraph
from probekit.engine.probes import fit_probe, score, standardiser
from tests.conftest import tiny_convnet


def _sklearn_errors(train_x, train_y, evals, l2):
    mean, scale = standardiser(train_x)
    z = ((train_x - mean) / scale).double().numpy()
    model = LogisticRegression(C=1 / (len(train_y) * l2), max_iter=20000, tol=1e-10).fit(z, train_y.numpy())
    return [1 - model.score(((x - mean) / scale).double().numpy(), y.numpy()) for x, y in evals]


@pytest.mark.parametrize("l2", [1e-4, 1e-3, 1e-2])
def test_probe_errors_match_sklearn_to_one_point_on_every_layer(digits_tensors, l2):
    model = tiny_convnet(seed=1)
    ds = pk.probe(model, digits_tensors, layers="all", reduce="flatten", l2=l2, quiet=True)
    # The same features, extracted independently, fitted by scikit-learn to convergence.
    graph = LayerGraph(model, digits_tensors["train"][0][:2])
    from probekit.engine.reduce import make_reducer

    reducers = {n: make_reducer("flatten", graph.point(n).shape, layer=n) for n in graph.names}
    run = build_extractor(graph, reducers)
    with torch.no_grad():
        feats = {s: run(x) for s, (x, _) in digits_tensors.items()}
    worst = 0.0
    for layer in ds.layer.values:
        ours = ds.probe.sel(layer=layer, metric=["valid_error", "test_error"]).squeeze("epoch").values
        ref = _sklearn_errors(feats["train"][layer], digits_tensors["train"][1],
                              [(feats[s][layer], digits_tensors[s][1]) for s in ("valid", "test")], l2)
        worst = max(worst, *np.abs(ours - ref))
    assert worst <= 0.01, f"largest valid/test error gap to scikit-learn: {worst:.4f}"
    assert bool(ds.converged.all())


def test_constant_layer_gives_chance_level_error():
    torch.manual_seed(0)
    y = torch.randint(0, 4, (400,))
    y[:200] = 1  # class 1 is the majority
    x = torch.ones(400, 16) * 3.0
    fit = fit_probe(x, y, 4)
    scores = score(fit.logits, x, y, 4)
    majority_error = float((y != 1).float().mean())
    assert scores["error"] == pytest.approx(majority_error)


def test_identity_stack_gives_equal_error_at_every_depth(digits_tensors):
    model = torch.nn.Sequential(torch.nn.Flatten(), *[torch.nn.Identity() for _ in range(4)])
    ds = pk.probe(model, digits_tensors, layers="all", quiet=True)
    errors = ds.probe.sel(metric="valid_error").squeeze("epoch").values
    assert len(errors) == 6 and np.ptp(errors) == 0 and errors[0] < 0.1


def test_separable_features_are_learned_perfectly():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (300,))
    x = torch.nn.functional.one_hot(y, 3).float() + 0.01 * torch.randn(300, 3)
    fit = fit_probe(x, y, 3, l2=1e-4)
    assert fit.converged and score(fit.logits, x, y, 3)["error"] == 0.0


def test_standardisation_is_the_same_with_and_without_worker_threads():
    """Row blocks are summed in a fixed order, so a pool changes speed, never the numbers."""
    from probekit.engine.probes import _single_threaded_torch, _standardise

    generator = torch.Generator().manual_seed(0)
    x = torch.rand(3000, 40, generator=generator) * 5 + 100  # a large offset: centring must be exact
    x[:, 7] = 3.0  # a constant feature gets scale 1
    alone = _standardise(x, pool=None)
    with _single_threaded_torch(2) as pool:
        pooled = _standardise(x, pool=pool)
    for a, b in zip(alone, pooled):
        assert torch.equal(a, b)
    mean, scale, z = alone
    torch.testing.assert_close(mean, x.double().mean(0).float())
    expected = x.double().std(0, unbiased=False).float()
    expected[7] = 1.0
    torch.testing.assert_close(scale, expected)
    torch.testing.assert_close(z, (x - mean) / scale)
    assert torch.equal(standardiser(x)[1], scale)


def test_online_step_skips_only_probes_with_nonfinite_features():
    """A NaN layer is left untouched (weights and running stats); a huge finite one still steps."""
    from probekit.engine.probes import OnlineProbes

    torch.manual_seed(0)
    probes = OnlineProbes({"ok": 6, "nan": 6, "huge": 4}, 3, lr=0.1)
    x = torch.randn(8, 6)
    features = {"ok": x, "nan": x.clone(), "huge": torch.full((8, 4), 3e38)}
    features["nan"][2, 1] = float("nan")
    before = {k: [t.clone() for t in (*p.parameters(), *p.buffers())] for k, p in zip(probes.names, probes.probes)}
    probes.step(features, torch.randint(0, 3, (8,)))
    after = {k: [*p.parameters(), *p.buffers()] for k, p in zip(probes.names, probes.probes)}
    assert all(torch.equal(a, b) for a, b in zip(before["nan"], after["nan"]))
    for name in ("ok", "huge"):
        assert not all(torch.equal(a, b) for a, b in zip(before[name], after[name]))
    assert probes.running["nan"]["n"] == 0 and probes.running["ok"]["n"] == 8


def test_online_l2_is_the_gradient_of_the_penalty():
    """Weight decay on the weights only, equal to the l2 / 2 * ||W||^2 term of the loss."""
    from probekit.engine.probes import OnlineProbes

    probes = OnlineProbes({"a": 3}, 2, l2=0.5)
    groups = {id(p): g["weight_decay"] for g in probes.optimizer.param_groups for p in g["params"]}
    linear = probes.probes[0][1]
    assert groups[id(linear.weight)] == 0.5 and groups[id(linear.bias)] == 0.0
