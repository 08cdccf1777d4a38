"""The batched solver: every problem advances together, converged ones are frozen, the host reads flags rarely."""

from __future__ import annotations

import pytest
import torch

from probekit.engine import solver
from probekit.engine.probes import _standardise
from probekit.engine.solver import Problem, Whitening, minimize


def _problem(n: int, d: int, k: int = 4, *, seed: int = 0, l2: float = 1e-3, strength: float = 0.3) -> Problem:
    generator = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % k
    mixing = torch.randn(d, d, generator=generator) / d**0.5 + torch.eye(d)  # correlated features
    x = (torch.randn(n, d, generator=generator) + strength * torch.randn(k, d, generator=generator)[y]) @ mixing
    _, _, z = _standardise(x, pool=None)
    return Problem(z, y, k, l2, Whitening.of(z))


def test_problems_solved_together_equal_problems_solved_alone():
    problems = [_problem(300, 40, seed=0), _problem(300, 120, seed=1), _problem(300, 7, seed=2, l2=1e-2)]
    together = minimize(problems, [p.start() for p in problems], tol=1e-6, max_iter=500)
    for p, (theta, iterations, converged) in zip(problems, together):
        (alone, alone_iterations, alone_converged), = minimize([p], [p.start()], tol=1e-6, max_iter=500)
        assert converged and alone_converged and iterations == alone_iterations
        torch.testing.assert_close(theta, alone, rtol=0, atol=1e-9)
        assert float(p.evaluate(theta)[2]) <= 1e-6  # the true gradient meets the tolerance


def test_the_device_path_reads_the_flags_every_few_rounds_and_gives_the_same_answer():
    """On a GPU the flags are read every CHECK_EVERY rounds; converged problems stay frozen in between."""
    problems = [_problem(200, 30, seed=s, strength=0.2 + 0.5 * s) for s in range(4)]  # they converge at different rounds
    eager, lazy = {}, {}
    every = minimize(problems, [p.start() for p in problems], tol=1e-5, max_iter=500, check_every=1, stats=eager)
    rarely = minimize(problems, [p.start() for p in problems], tol=1e-5, max_iter=500,
                      check_every=solver.CHECK_EVERY, stats=lazy)
    assert len({iterations for _, iterations, _ in every}) > 1
    for (a, ia, ca), (b, ib, cb) in zip(every, rarely):
        assert torch.equal(a, b) and ia == ib and ca == cb
    assert eager["reads"] == eager["rounds"] + 2  # every round on the CPU (free there), the last check, the answer
    assert lazy["reads"] <= lazy["rounds"] // solver.CHECK_EVERY + 2


def test_max_iter_stops_without_convergence_and_warm_starts_finish_quickly():
    p = _problem(300, 50, seed=3)
    (theta, iterations, converged), = minimize([p], [p.start()], tol=1e-8, max_iter=3)
    assert iterations == 3 and not converged
    (_, cold, _), = minimize([p], [p.start()], tol=1e-6, max_iter=500)
    (solution, _, _), = minimize([p], [p.start()], tol=1e-7, max_iter=500)
    weight, bias = p.weights(solution)
    (_, warm, ok), = minimize([p], [p.warm(weight, bias)], tol=1e-6, max_iter=500)
    assert ok and warm <= 1 < cold


def test_groups_bound_the_memory_of_the_parameters():
    sizes = [10, 2**19, 2**19, 2**19, 30, 2**21]
    groups = solver._groups(sizes, solver._GROUP_ELEMENTS)
    assert sorted(i for g in groups for i in g) == list(range(len(sizes)))
    for group in groups:
        assert len(group) == 1 or len(group) * max(sizes[i] for i in group) <= solver._GROUP_ELEMENTS


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_step_to_a_non_finite_loss_is_shortened(bad):
    """A trial step whose loss is not finite is rejected and shortened like any failed step."""
    p = _problem(100, 5, seed=4, l2=1e-4, strength=3.0)
    start = p.start()
    original = p.finish
    calls = {"n": 0}

    def sometimes_bad(started):
        loss, grad, gmax = original(started)
        calls["n"] += 1
        return (torch.tensor(bad, dtype=torch.float64) if calls["n"] == 2 else loss), grad, gmax

    p.finish = sometimes_bad
    (theta, _, converged), = minimize([p], [start], tol=1e-5, max_iter=500)
    assert converged and torch.isfinite(theta).all()


def test_each_problem_may_have_its_own_tolerance():
    loose, tight = _problem(300, 40, seed=5), _problem(300, 40, seed=5)
    together = minimize([loose, tight], [loose.start(), tight.start()], tol=[1e-3, 1e-7], max_iter=500)
    for p, value, (theta, iterations, converged) in zip((loose, tight), (1e-3, 1e-7), together):
        (alone, alone_iterations, _), = minimize([p], [p.start()], tol=value, max_iter=500)
        assert converged and iterations == alone_iterations
        torch.testing.assert_close(theta, alone, rtol=0, atol=1e-9)
    assert together[0][1] < together[1][1]
