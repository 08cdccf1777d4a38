"""Figure 2: fitting probes on cached features vs scikit-learn's LogisticRegression.

Both solve the same problem on the same float32 arrays: softmax regression
with ``C = 1 / (n * l2)`` on features standardised with the training split's
mean and scale (probekit's convention; see ``probekit.probes``), standardising
inside both timers. scikit-learn runs with its defaults (``lbfgs``,
``tol=1e-4``) in two thread settings, as installed and with its BLAS limited
to one thread (which avoids OpenBLAS threads spinning against each other on
a small shared machine and is often much faster here); the baseline is the
faster of the two. probekit runs with its own defaults (``tol=1e-5``, ten
times tighter), so a second row per case gives scikit-learn at that same
tolerance. Errors are on a separate validation split; the gap is the largest
over layers.

The features are synthetic stand-ins for pooled convnet features (see
``benchmarks.workloads.features``); deeper "layers" separate the classes
better, as in the paper.
"""

from __future__ import annotations

import statistics
import warnings
from contextlib import nullcontext

import numpy as np

from benchmarks.measure import Row, timed
from benchmarks.workloads import NUM_CLASSES, feature_split
from probekit.probes import DEFAULT_L2, fit_probes, score

SIZES = {
    "quick": {"n": 1000, "single": [256, 1024], "layers": 8, "reps": 1, "sklearn_threads": [1], "tight": False},
    "full": {"n": 5000, "single": [2048, 8192], "layers": 1, "reps": 3, "sklearn_threads": [None, 1], "tight": True},
}
#: Reduced feature sizes of ResNet-50's 17 default probe points (default reductions, 224 px).
RESNET50_DIMS = [3888, 4096, 4096, 4096, 2048, 2048, 2048, 2048, 4096, 4096, 4096, 4096, 4096, 4096, 2048, 2048, 2048]
N_VALID = 2000
PROBEKIT_TOL = 1e-5


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


def _probekit(layers: dict) -> dict:
    labels = next(iter(layers.values()))["train"][1]
    fits = fit_probes({name: data["train"][0] for name, data in layers.items()}, labels, NUM_CLASSES, l2=DEFAULT_L2,
                      tol=PROBEKIT_TOL)
    errors = {name: score(fits[name].logits, *layers[name]["valid"], NUM_CLASSES)["error"] for name in layers}
    return {"errors": errors, "iterations": {n: f.iterations for n, f in fits.items()},
            "converged": all(f.converged for f in fits.values())}


def _variant(threads: int | None, tol: float) -> str:
    return f"sklearn tol={tol:g} blas={threads or 'default'}"


def _measure(layers: dict, reps: int, variants: list[tuple[int | None, float]]) -> tuple[dict, dict]:
    """Time probekit and each scikit-learn variant ``reps`` times, in alternating order."""
    names = ["probekit"] + [_variant(*v) for v in variants]
    runs: dict = {name: [] for name in names}
    answers: dict = {}
    for rep in range(reps):
        for name in (names if rep % 2 == 0 else list(reversed(names))):
            if name == "probekit":
                seconds, answer = timed(lambda: _probekit(layers))
            else:
                threads, tol = variants[names.index(name) - 1]
                seconds, answer = timed(lambda: _sklearn(layers, blas_threads=threads, tol=tol))
            runs[name].append(seconds)
            answers[name] = answer
    return runs, answers


def _row(case: str, layers: dict, runs: dict, answers: dict, baseline: list[str], *, target: float | None) -> Row:
    """probekit against the fastest of the ``baseline`` variants, rep by rep."""
    best = min(baseline, key=lambda name: statistics.median(runs[name]))
    pairs = [p / min(runs[name][i] for name in baseline) for i, p in enumerate(runs["probekit"])]
    gap = max(abs(answers["probekit"]["errors"][k] - answers[best]["errors"][k]) for k in layers)
    n = next(iter(layers.values()))["train"][0].shape[0]
    ours = statistics.median(answers["probekit"]["iterations"].values())
    theirs = statistics.median(answers[best]["iterations"].values())
    return Row(
        figure="2 fitting", case=case, baseline=best, baseline_value=statistics.median(runs[best]),
        probekit_value=statistics.median(runs["probekit"]), unit="s", target=target,
        note=f"valid error gap {100 * gap:.2f} pt (target <= 1); median iterations probekit {ours:.0f}, sklearn {theirs:.0f}",
        pair_ratio=statistics.median(pairs),
        extra={"times_s": runs, "pair_ratios": pairs, "error_gap_points": 100 * gap, "n": n, "layers": len(layers),
               "dims": sorted({d["train"][0].shape[1] for d in layers.values()}), "answers": answers},
    )


def run(size: str) -> list[Row]:
    config = SIZES[size]
    n, reps, settings = config["n"], config["reps"], config["sklearn_threads"]
    warm = {"warm-up": _layer(200, 64, 0, 0.5)}  # first calls import SciPy and start thread pools
    _probekit(warm)
    _sklearn(warm, blas_threads=1)
    rows = []
    fastest = settings[-1]
    for d in config["single"]:
        layers = {"layer": _layer(n, d, 0, 0.5)}
        variants = [(t, 1e-4) for t in settings] + ([(fastest, PROBEKIT_TOL)] if config["tight"] else [])
        runs, answers = _measure(layers, reps, variants)
        defaults = [_variant(t, 1e-4) for t in settings]
        rows.append(_row(f"1 layer, {n:,} x {d:,}", layers, runs, answers, defaults, target=1.0))
        if config["tight"]:
            rows.append(_row(f"1 layer, {n:,} x {d:,}, same tol", layers, runs, answers,
                             [_variant(fastest, PROBEKIT_TOL)], target=None))
        fastest = min(settings, key=lambda t: statistics.median(runs[_variant(t, 1e-4)]))
    dims = [d // config["layers"] for d in RESNET50_DIMS]
    layers = {f"layer{i}": _layer(n, d, i, i / (len(dims) - 1)) for i, d in enumerate(dims)}
    variants = [(fastest, 1e-4)] + ([(fastest, PROBEKIT_TOL)] if config["tight"] else [])
    runs, answers = _measure(layers, max(1, reps - 1), variants)
    case = f"all {len(dims)} ResNet-50 layers, {n:,} x {sum(dims):,}"
    rows.append(_row(case, layers, runs, answers, [_variant(fastest, 1e-4)], target=0.5))
    if config["tight"]:
        rows.append(_row(f"{case}, same tol", layers, runs, answers, [_variant(fastest, PROBEKIT_TOL)], target=None))
    return rows
