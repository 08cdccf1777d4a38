"""The probe solver reaches the convex optimum: agreement with scikit-learn, chance, identity stacks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

import probekit as pk
from probekit.engine.extract import build_extractor
from probekit.engine.points import LayerGraph
from probekit.engine.probes import fit_probe, fit_probes, score, standardiser
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
    from probekit.engine.online import OnlineProbes

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
    from probekit.engine.online import OnlineProbes

    probes = OnlineProbes({"a": 3}, 2, l2=0.5)
    groups = {id(p): g["weight_decay"] for g in probes.optimizer.param_groups for p in g["params"]}
    linear = probes.probes[0][1]
    assert groups[id(linear.weight)] == 0.5 and groups[id(linear.bias)] == 0.0


# ------------------------------------------------------------------ l2="auto": the held-out path
def _informative(n, d, classes=4, *, strength=1.0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, d, generator=generator) + strength * torch.randn(classes, d, generator=generator)[y]
    return x, y


def test_path_regularises_a_wide_layer_on_few_examples_more_than_a_narrow_one_on_many():
    from probekit.engine.probes import L2_PATH

    generator = torch.Generator().manual_seed(0)
    y_wide = torch.arange(100) % 4
    wide = torch.randn(100, 2000, generator=generator)
    wide[:, :5] += torch.randn(4, 5, generator=generator)[y_wide]  # a little signal in a sea of noise
    narrow, y_narrow = _informative(2000, 20, strength=0.7)
    a, b = fit_probe(wide, y_wide, 4), fit_probe(narrow, y_narrow, 4)
    assert a.l2 in L2_PATH and b.l2 in L2_PATH and a.l2 >= 100 * b.l2, (a.l2, b.l2)
    for fit in (a, b):
        assert fit.fallback is None and fit.spec is None and fit.converged
        assert np.isfinite(fit.heldout) and fit.path_iterations > 0
        chosen = [p for p in fit.path if p[1] == fit.l2]
        bar = min(p[2] for p in fit.path) * (1 + 1e-3)
        assert len(chosen) == 1 and chosen[0][2] == fit.heldout <= bar
        assert all(p[2] > bar for p in fit.path if p[1] > fit.l2)  # the strongest value under the bar
        assert [p[1] for p in fit.path] == list(L2_PATH[:len(fit.path)])  # from the strong end down
    # The narrow layer's choice is a real one: it beats the default 1e-3 or equals it on held-out data.
    assert b.heldout <= min(p[2] for p in b.path if p[1] >= 1e-2)


def test_a_weaker_value_that_ties_to_the_paths_precision_never_wins():
    """Held-out losses within a relative 1e-3 tie: the stronger value (and the earlier candidate) wins.

    A weak end where the warm start already meets the path's tolerance moves
    the held-out loss in its last digits only; before the tie was matched to
    the path's precision, such a point won by 1e-6 and the choice drifted to
    l2=1e-6, a value the path never really fitted.
    """
    from probekit.engine.probes import _choose

    def track(name, spec, losses):
        points = [(spec, 10.0 ** -i, loss, 5) for i, loss in enumerate(losses)]
        return {"name": name, "spec": spec, "points": points, "iterations": 5 * len(points),
                "kept": {i: (torch.full((1, 1), float(i)), torch.zeros(1)) for i in range(len(points))}}

    drifting = track("a", None, [2.0, 0.5, 0.30, 0.29999, 0.29998])  # the last two: the last digits only
    chosen = _choose([drifting])["a"]
    assert chosen[1] == 1e-2 and chosen[0] == 0.30 and chosen[2].item() == 2.0  # its own weights
    real = track("b", None, [2.0, 0.5, 0.30, 0.29])  # a gain of 3 %: the weaker value wins
    assert _choose([real])["b"][1] == 1e-3
    # Candidates: the earlier one wins a tie with a later one, even at a weaker value; not a real loss.
    small, big = track("c", "small", [1.0, 0.4002]), track("c", "big", [1.0, 0.6, 0.4])
    assert _choose([small, big])["c"][4] == "small"
    assert _choose([track("d", "small", [1.0, 0.5]), track("d", "big", [1.0, 0.4])])["d"][4] == "big"


def test_the_refit_is_the_optimum_of_the_whole_training_split_at_the_chosen_value():
    x, y = _informative(600, 30, strength=0.4)
    auto = fit_probe(x, y, 4, tol=1e-6)
    fixed = fit_probe(x, y, 4, l2=auto.l2, tol=1e-6)
    torch.testing.assert_close(auto.weight, fixed.weight, rtol=0, atol=2e-4)
    assert auto.columns == fixed.columns == slice(0, 30) and fixed.l2 == auto.l2 and np.isnan(fixed.heldout)


def test_candidates_choose_the_informative_slice_and_logits_read_only_it():
    generator = torch.Generator().manual_seed(1)
    signal, y = _informative(400, 8, strength=1.0, seed=2)
    noise = torch.randn(400, 300, generator=generator)
    x = torch.cat([noise, signal], 1)
    fit = fit_probe(x, y, 4, candidates={"noise": slice(0, 300), "signal": slice(300, 308)})
    assert fit.spec == "signal" and fit.columns == slice(300, 308)
    assert fit.weight.shape == (8, 4) and fit.mean.shape == (8,)
    assert {p[0] for p in fit.path} == {"noise", "signal"}
    x_test, y_test = _informative(400, 8, strength=1.0, seed=2)
    full = torch.cat([torch.randn(400, 300, generator=generator), x_test], 1)
    torch.testing.assert_close(fit.logits(full), fit.logits(torch.cat([torch.zeros(400, 300), x_test], 1)))
    assert score(fit.logits, full, y_test, 4)["error"] < 0.2
    # A fixed l2 with several candidates: the fold chooses the candidate only.
    fixed = fit_probe(x, y, 4, l2=1e-2, candidates={"noise": slice(0, 300), "signal": slice(300, 308)})
    assert fixed.spec == "signal" and fixed.l2 == 1e-2 and [p[1] for p in fixed.path] == [1e-2, 1e-2]


def test_auto_falls_back_to_the_fixed_value_when_a_class_is_too_small_to_hold_out():
    from probekit.engine.probes import FALLBACK_L2, MIN_PER_CLASS

    x, _ = _informative(40, 6)
    y = torch.arange(40) % 3
    y[:3] = 3  # class 3: three examples
    fit = fit_probe(x, y, 4)
    assert fit.l2 == FALLBACK_L2 and np.isnan(fit.heldout) and fit.path == ()
    assert f"at least {MIN_PER_CLASS} training examples of every class" in fit.fallback
    assert "class 3 has 3" in fit.fallback and "\n" not in fit.fallback
    same = fit_probe(x, y, 4, l2=FALLBACK_L2)
    torch.testing.assert_close(fit.weight, same.weight, rtol=0, atol=0)
    # With candidates, the one with the fewest columns is read.
    picked = fit_probe(x, y, 4, candidates={"big": slice(0, 6), "small": slice(0, 2)})
    assert picked.spec == "small" and "fewest columns, 'small'" in picked.fallback


def test_a_fixed_l2_fits_exactly_as_before_the_path_existed():
    """Weights of a fixed-l2 fit recorded before l2="auto" existed: the same optimum, to the solver's tolerance.

    (Small problems now compute their loss in float64, so the last digits of the path to
    the optimum differ from the float32 fit these were recorded with, by about 3e-5.)
    """
    generator = torch.Generator().manual_seed(3)
    y = torch.arange(90) % 3
    x = torch.randn(90, 5, generator=generator) + 0.7 * torch.randn(3, 5, generator=generator)[y]
    fit = fit_probe(x, y, 3, l2=1e-2)
    before_weight = [[-0.11103467643260956, 1.0136041641235352, -0.9025692939758301],
                     [-0.2453717738389969, 0.04293292015790939, 0.20243869721889496],
                     [0.06403661519289017, -0.5503271818161011, 0.48629137873649597],
                     [1.5209884643554688, -1.341748595237732, -0.1792398989200592],
                     [-0.44413837790489197, -0.21515731513500214, 0.659295916557312]]
    before_bias = [-0.04648788645863533, -0.14741821587085724, 0.19390617311000824]
    np.testing.assert_allclose(fit.weight.numpy(), before_weight, rtol=0, atol=1e-4)
    np.testing.assert_allclose(fit.bias.numpy(), before_bias, rtol=0, atol=1e-4)
    assert fit.converged and fit.l2 == 1e-2 and fit.fallback is None and fit.spec is None
    exact = fit_probe(x, y, 3, l2=1e-2, tol=1e-9)
    torch.testing.assert_close(fit.weight, exact.weight, rtol=0, atol=1e-4)


def test_the_choice_is_deterministic_whatever_the_thread_count():
    """Same data and seed: the same fold, choice and weights, with 1 or 2 threads, layers alone or in parallel."""
    from probekit.engine.probes import fit_probes

    a, y = _informative(1100, 2000, strength=0.05, seed=4)  # large enough for worker threads (>= 2**21 elements)
    b, _ = _informative(1100, 1960, strength=0.1, seed=5)
    features = {"a": a, "b": b}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        two = fit_probes(features, y, 4, tol=1e-4)
        alone = fit_probes({"a": a}, y, 4, tol=1e-4)  # one layer: its row blocks on the workers
        torch.set_num_threads(1)
        one = fit_probes(features, y, 4, tol=1e-4)
    finally:
        torch.set_num_threads(threads)
    for name in features:
        assert one[name].l2 == two[name].l2 and one[name].path == two[name].path
        assert torch.equal(one[name].weight, two[name].weight)
    assert alone["a"].path == one["a"].path and torch.equal(alone["a"].weight, one["a"].weight)
    other = fit_probes({"b": b}, y, 4, tol=1e-4, seed=1)["b"]
    assert other.path != one["b"].path  # the seed picks the fold


def test_bad_l2_and_candidates_get_one_line_errors():
    from probekit.engine.probes import fit_probes

    x, y = _informative(50, 4)
    with pytest.raises(ValueError, match=r"^l2 must be a finite number >= 0 or one of 'auto'; got 'fast'$"):
        fit_probe(x, y, 4, l2="fast")
    with pytest.raises(ValueError, match=r"candidate 'pool2' of layer 'probe' reads columns 2:9, .* within 0:4"):
        fit_probe(x, y, 4, candidates={"pool": slice(0, 2), "pool2": slice(2, 9)})
    with pytest.raises(ValueError, match=r"l2 maps layers to values but has none for \['b'\]"):
        fit_probes({"a": x, "b": x}, y, 4, l2={"a": 1e-3})
    mixed = fit_probes({"a": x, "b": x}, y, 4, l2={"a": 1e-2, "b": "auto"})
    assert mixed["a"].l2 == 1e-2 and np.isnan(mixed["a"].heldout) and np.isfinite(mixed["b"].heldout)


def test_online_auto_heads_each_train_as_a_fixed_probe_and_the_best_is_reported():
    from probekit.engine.online import ONLINE_L2_PATH, OnlineProbes

    torch.manual_seed(0)
    auto = OnlineProbes({"a": 6}, 3, lr=0.05, l2="auto")
    fixed = OnlineProbes({"a": 6}, 3, lr=0.05, l2=1e-1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(16, 6, generator=generator)
        y = torch.randint(0, 3, (16,), generator=generator)
        auto.step({"a": x}, y)
        fixed.step({"a": x}, y)
    head = auto.l2_path.index(1e-1)
    torch.testing.assert_close(auto.probes[0][1].weight[head * 3:(head + 1) * 3], fixed.probes[0][1].weight)
    run = auto.running["a"]
    best = min(range(len(ONLINE_L2_PATH)), key=lambda h: (run["loss"][h], h))
    assert auto.l2_of("a") == auto.l2_path[best]
    assert auto.train_scores("a")["loss"] == pytest.approx(run["loss"][best] / run["n"])
    assert auto.logits_of("a")(torch.randn(4, 6)).shape == (4, 3)
    assert fixed.l2_of("a") == 1e-1 and fixed.train_scores("a")["loss"] == pytest.approx(fixed.running["a"]["loss"][0] / 80)


def test_held_out_fold_of_a_token_level_run_keeps_every_sequence_whole():
    from probekit.engine.probes import _heldout_groups

    generator = torch.Generator().manual_seed(0)
    groups = torch.arange(60).repeat_interleave(5)  # 60 sequences of 5 labelled tokens
    labels = torch.randint(0, 3, (300,), generator=generator)
    order, n_fit = _heldout_groups(labels, groups, 3, seed=0)
    fit, held = set(groups[order[:n_fit]].tolist()), set(groups[order[n_fit:]].tolist())
    assert fit and held and not fit & held
    assert sorted(order.tolist()) == list(range(300))
    assert 0.15 <= (300 - n_fit) / 300 <= 0.3
    assert set(labels[order[n_fit:]].tolist()) == set(labels[order[:n_fit]].tolist()) == {0, 1, 2}
    one = _heldout_groups(labels, torch.zeros(300, dtype=torch.long), 3, seed=0)
    assert isinstance(one, str) and "needs at least 2 sequences" in one
    x = torch.randn(300, 8, generator=generator)
    fits = fit_probes({"a": x}, labels, 3, groups=groups)
    assert fits["a"].fallback is None and fits["a"].l2 > 0
    with pytest.raises(ValueError, match="groups= needs one group per row"):
        fit_probes({"a": x}, labels, 3, groups=groups[:10])


def test_small_problems_meet_their_tolerance():
    """3 features on 64 examples: with float32 losses, 11 of these 120 fits stopped short of their tolerance (the
    line search could not see the last decrease of a too-coarse loss); small problems are solved in float64."""
    failed = []
    for seed in range(40):
        for separation in (0.3, 1.0, 3.0):
            generator = torch.Generator().manual_seed(seed)
            y = torch.arange(64) % 3
            x = torch.randn(64, 3, generator=generator) + separation * torch.nn.functional.one_hot(y, 3).float()
            fit = fit_probe(x, y, 3, l2=1e-3)
            assert fit.weight.dtype == torch.float32 and fit.bias.dtype == torch.float32
            if not fit.converged:
                failed.append((seed, separation))
    assert failed == []


def _objective(fit, x, y, l2):
    z = ((x - fit.mean) / fit.scale).double()
    logits = z @ fit.weight.double() + fit.bias.double()
    return float(torch.nn.functional.cross_entropy(logits, y) + 0.5 * l2 * fit.weight.double().pow(2).sum())


def test_few_examples_of_many_features_are_fitted_in_their_span_to_the_same_optimum(monkeypatch):
    """n < d/2: the fit runs on the examples' span (a Gram matrix, n columns instead of d) and reaches the optimum
    of the problem in the features themselves; at the default tolerance it is closer to it than the features' fit,
    whose largest gradient entry is small early when the gradient is spread over 30,000 features."""
    from probekit.engine import probes

    x, y = _informative(100, 30_000, strength=0.05, seed=6)
    l2 = 1e-3
    span = fit_probe(x, y, 4, l2=l2)
    span_tight = fit_probe(x, y, 4, l2=l2, tol=1e-8)
    monkeypatch.setattr(probes, "_DUAL_ROWS_PER_CLASS", 0)  # the features' own coordinates
    primal_tight = fit_probe(x, y, 4, l2=l2, tol=1e-8)
    best = _objective(primal_tight, x, y, l2)
    assert span.converged and span_tight.converged and primal_tight.converged
    assert _objective(span_tight, x, y, l2) == pytest.approx(best, rel=1e-4)
    assert _objective(span, x, y, l2) == pytest.approx(best, rel=1e-3)
    torch.testing.assert_close(span_tight.weight, primal_tight.weight, rtol=0, atol=1e-3 * float(
        primal_tight.weight.abs().max()))
    assert span.weight.shape == (30_000, 4) and span.weight.dtype == torch.float32


def test_the_span_and_the_features_choose_the_same_l2_and_candidate(monkeypatch):
    from probekit.engine import probes

    signal, y = _informative(120, 10, strength=1.0, seed=7)
    noise = torch.randn(120, 600, generator=torch.Generator().manual_seed(8))
    x = torch.cat([noise, signal, noise[:, :300]], 1)
    candidates = {"noise": slice(0, 600), "signal+noise": slice(600, 910)}
    span = fit_probe(x, y, 4, candidates=candidates, tol=1e-7)
    monkeypatch.setattr(probes, "_DUAL_ROWS_PER_CLASS", 0)
    primal = fit_probe(x, y, 4, candidates=candidates, tol=1e-7)
    assert span.spec == primal.spec == "signal+noise" and span.l2 == primal.l2
    assert [p[1] for p in span.path] == [p[1] for p in primal.path]
    # The path stops at a looser tolerance: its held-out losses agree to a few digits where the L2 is weak.
    np.testing.assert_allclose([p[2] for p in span.path], [p[2] for p in primal.path], rtol=2e-2)
    torch.testing.assert_close(span.logits(x), primal.logits(x), rtol=0, atol=1e-2)
