"""Figure 2: fitting probes on cached features vs scikit-learn's LogisticRegression.

Both solve the same problem on the same float32 arrays: softmax regression
with ``C = 1 / (n * l2)`` on features standardised with the training split's
mean and scale (probekit's convention; see ``probekit.engine.probes``), standardising
inside both timers. scikit-learn runs ``lbfgs`` in two thread settings, as
installed and with its BLAS limited to one thread (which avoids OpenBLAS
threads spinning against each other on a small shared machine and is often
much faster here); the baseline is the faster of the two.

Each case gives three rows. "each at its default tol": probekit's
``tol=3e-6`` (``DEFAULT_TOL``) against scikit-learn's ``tol=1e-4``, which stops earlier and
further from the optimum (the note gives each side's distance to it, in
valid-error points, the optimum being probekit's fit at ``tol=1e-6``);
"both at tol=1e-4" and "both at tol=3e-6" compare the two solvers at the
same stopping rule (both test the largest entry of the mean loss's
gradient). Errors are on a separate validation split; a gap is the largest
over layers, and a row meets its target only when the gap is within 1 point.

Each case also gives a "path cost" row: ``fit_probes`` at its default
``l2="auto"`` (the held-out fold, the L2 path of every layer, the choice
and the refit; see ``probekit.engine.probes``) against one fit of every
layer from scratch at the values the path chose, the two interleaved in
one invocation; target 3x. Its note gives the chosen values and the valid
error of both the chosen fits and the fixed default ``l2=1e-3``.

The features are synthetic stand-ins for pooled convnet features (see
``benchmarks.workloads.features``); deeper "layers" separate the classes
better, as in the paper.
"""

from __future__ import annotations

import statistics
import warnings
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np

from benchmarks.measure import Row, interleave, timed
from benchmarks.workloads import NUM_CLASSES, feature_split
from probekit.engine.probes import DEFAULT_L2, DEFAULT_TOL, L2_PATH, fit_probes, score

SIZES = {
    "quick": {"n": 1000, "single": [256, 1024], "layers": 8, "reps": 1, "sklearn_threads": [1], "tight": False},
    "full": {"n": 5000, "single": [2048, 8192], "layers": 1, "reps": 3, "sklearn_threads": [None, 1], "tight": True},
}
#: Reduced feature sizes of ResNet-50's 17 default probe points (default reductions, 224 px).
RESNET50_DIMS = [3888, 4096, 4096, 4096, 2048, 2048, 2048, 2048, 4096, 4096, 4096, 4096, 4096, 4096, 2048, 2048, 2048]
N_VALID = 2000
PROBEKIT_TOL = DEFAULT_TOL


def _layer(n: int, d: int, index: int, depth: float) -> dict:
    separation = 0.15 + 0.25 * depth  # deeper layers separate the classes better
    train = feature_split(n, d, layer_seed=100 + index, sample_seed=1, separation=separation)
    valid = feature_split(N_VALID, d, layer_seed=100 + index, sample_seed=2, separation=separation)
    return {"train": train, "valid": valid}


def _sklearn(layers: dict, *, blas_threads: int | None, tol: float = 1e-4) -> dict:
    """Fit every layer with scikit-learn; return valid errors and iteration counts."""
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    errors, iterations = {}, {}
    limit = threadpool_limits(blas_threads, user_api="blas") if blas_threads else nullcontext()
    with limit, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a ConvergenceWarning shows in n_iter_
        for name, data in layers.items():
            x, y = data["train"]
            xv, yv = data["valid"]
            x, xv = x.numpy(), xv.numpy()
            mean, scale = x.mean(0), x.std(0)
            scale = np.where(scale > 1e-6 * scale.max(), scale, 1).astype(np.float32)
            model = LogisticRegression(C=1 / (len(y) * DEFAULT_L2), max_iter=1000, tol=tol)
            model.fit((x - mean) / scale, y.numpy())
            errors[name] = 1 - model.score((xv - mean) / scale, yv.numpy())
            iterations[name] = int(model.n_iter_[0])
    return {"errors": errors, "iterations": iterations}


def _probekit(layers: dict, tol: float = PROBEKIT_TOL) -> dict:
    labels = next(iter(layers.values()))["train"][1]
    fits = fit_probes({name: data["train"][0] for name, data in layers.items()}, labels, NUM_CLASSES, l2=DEFAULT_L2,
                      tol=tol)
    errors = {name: score(fits[name].logits, *layers[name]["valid"], NUM_CLASSES)["error"] for name in layers}
    return {"errors": errors, "iterations": {n: f.iterations for n, f in fits.items()},
            "converged": all(f.converged for f in fits.values())}


def _sklearn_name(threads: int | None, tol: float) -> str:
    return f"sklearn tol={tol:g} blas={threads or 'default'}"


def _probekit_name(tol: float) -> str:
    return f"probekit tol={tol:g}"


def _measure(layers: dict, reps: int, variants: dict[str, Callable[[], dict]]) -> tuple[dict, dict]:
    """Time every variant ``reps`` times, in alternating order (ABC, CBA, ...)."""
    names = list(variants)
    runs: dict = {name: [] for name in names}
    answers: dict = {}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else names[::-1]):
            seconds, answers[name] = timed(variants[name])
            runs[name].append(seconds)
    return runs, answers


def _gap(answers: dict, a: str, b: str) -> float:
    """Largest difference in valid error between two variants' fits, in points."""
    return 100 * max(abs(answers[a]["errors"][k] - answers[b]["errors"][k]) for k in answers[a]["errors"])


def _row(case: str, runs: dict, answers: dict, ours: str, baseline: list[str], *, target: float, reference: str | None,
         ) -> Row:
    """probekit variant ``ours`` against the fastest of the ``baseline`` variants, rep by rep."""
    best = min(baseline, key=lambda name: statistics.median(runs[name]))
    pairs = [p / min(runs[name][i] for name in baseline) for i, p in enumerate(runs[ours])]
    gap = _gap(answers, ours, best)
    layers = answers[ours]["errors"]
    n_ours = statistics.median(answers[ours]["iterations"].values())
    n_theirs = statistics.median(answers[best]["iterations"].values())
    note = (f"{ours}; valid error gap {gap:.2f} pt (target <= 1); median iterations "
            f"probekit {n_ours:.0f}, sklearn {n_theirs:.0f}")
    if reference is not None and reference not in (ours, best):
        note += (f"; distance to the tol=1e-6 optimum: probekit {_gap(answers, ours, reference):.2f} pt, "
                 f"sklearn {_gap(answers, best, reference):.2f} pt")
    return Row(
        figure="2 fitting", case=case, baseline=best, baseline_value=statistics.median(runs[best]),
        probekit_value=statistics.median(runs[ours]), unit="s", target=target, note=note,
        pair_ratio=statistics.median(pairs), accurate=gap <= 1.0,
        extra={"times_s": runs, "pair_ratios": pairs, "error_gap_points": gap, "layers": len(layers),
               "answers": answers},
    )


def _rows(case: str, layers: dict, config: dict, threads: list[int | None], *, target: float) -> tuple[list[Row], int | None]:
    """The rows of one case: defaults against defaults, then both sides at each same tolerance."""
    tols = [1e-4] + ([PROBEKIT_TOL] if config["tight"] else [])
    variants = {_probekit_name(PROBEKIT_TOL): lambda: _probekit(layers, PROBEKIT_TOL),
                _probekit_name(1e-4): lambda: _probekit(layers, 1e-4)}
    variants |= {_sklearn_name(t, 1e-4): (lambda t=t: _sklearn(layers, blas_threads=t)) for t in threads}
    if config["tight"]:
        variants[_sklearn_name(threads[-1], PROBEKIT_TOL)] = lambda: _sklearn(layers, blas_threads=threads[-1],
                                                                              tol=PROBEKIT_TOL)
    runs, answers = _measure(layers, config["reps"] if len(layers) == 1 else max(1, config["reps"] - 1), variants)
    # The optimum itself, once, untimed: how far each side's answer is from it.
    answers["optimum"] = _probekit(layers, 1e-6)
    defaults = [_sklearn_name(t, 1e-4) for t in threads]
    rows = [_row(f"{case}, each at its default tol", runs, answers, _probekit_name(PROBEKIT_TOL), defaults,
                 target=target, reference="optimum")]
    fastest = min(threads, key=lambda t: statistics.median(runs[_sklearn_name(t, 1e-4)]))
    for tol in tols:
        rows.append(_row(f"{case}, both at tol={tol:g}", runs, answers, _probekit_name(tol),
                         [n for n in runs if n.startswith(f"sklearn tol={tol:g} ")], target=target, reference=None))
    return rows, fastest


def _path_row(case: str, layers: dict, reps: int) -> Row:
    """``l2="auto"`` (path, choice, refit) against one fit at the chosen values from scratch."""
    labels = next(iter(layers.values()))["train"][1]
    train = {name: data["train"][0] for name, data in layers.items()}
    chosen = {name: fit.l2 for name, fit in fit_probes(train, labels, NUM_CLASSES).items()}  # also the warm-up
    answers = {}

    def auto():
        answers["auto"] = fit_probes(train, labels, NUM_CLASSES)

    def fixed():
        answers["fixed"] = fit_probes(train, labels, NUM_CLASSES, l2=chosen)

    pairs = interleave(fixed, auto, reps=reps, warmup=False)
    fits = answers["auto"]
    default = fit_probes(train, labels, NUM_CLASSES, l2=DEFAULT_L2)

    def valid_error(of: dict) -> float:
        return statistics.mean(score(of[n].logits, *layers[n]["valid"], NUM_CLASSES)["error"] for n in layers)

    counts = {value: sum(f.l2 == value for f in fits.values()) for value in L2_PATH}
    picked = ", ".join(f"{value:g} x{count}" for value, count in counts.items() if count)
    note = (f"chosen l2: {picked}; mean valid error {valid_error(fits):.3f} (l2=1e-3: {valid_error(default):.3f}); "
            f"median L-BFGS iterations: path {statistics.median(f.path_iterations for f in fits.values()):.0f}, "
            f"refit {statistics.median(f.iterations for f in fits.values()):.0f}, "
            f"one fit {statistics.median(f.iterations for f in answers['fixed'].values()):.0f}")
    return Row(
        figure="2 fitting", case=f"{case}, l2='auto' path", baseline="one fit at the chosen l2",
        baseline_value=pairs.baseline_median, probekit_value=pairs.candidate_median, unit="s", target=3.0,
        note=note, pair_ratio=pairs.ratio,
        extra={"times_s": pairs.as_dict(), "chosen_l2": {n: f.l2 for n, f in fits.items()},
               "heldout": {n: f.heldout for n, f in fits.items()},
               "valid_error_auto": valid_error(fits), "valid_error_default": valid_error(default)},
    )


def run(size: str) -> list[Row]:
    config = SIZES[size]
    n, threads = config["n"], config["sklearn_threads"]
    warm = {"warm-up": _layer(200, 64, 0, 0.5)}  # first calls import scikit-learn and start thread pools
    _probekit(warm)
    _sklearn(warm, blas_threads=1)
    rows = []
    for d in config["single"]:
        case, layer = f"1 layer, {n:,} x {d:,}", {"layer": _layer(n, d, 0, 0.5)}
        new, fastest = _rows(case, layer, config, threads, target=1 / 1.5)  # at least 1.5x faster
        rows += new + [_path_row(case, layer, max(config["reps"], 2))]
        threads = [fastest]  # later cases time only the faster scikit-learn setting
    dims = [d // config["layers"] for d in RESNET50_DIMS]
    layers = {f"layer{i}": _layer(n, d, i, i / (len(dims) - 1)) for i, d in enumerate(dims)}
    case = f"all {len(dims)} ResNet-50 layers, {n:,} x {sum(dims):,}"
    rows += _rows(case, layers, config, threads, target=0.25)[0]  # at least 4x faster
    rows.append(_path_row(case, layers, max(config["reps"] - 1, 2)))
    return rows
