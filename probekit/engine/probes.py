"""The linear probe, its solvers, and the held-out choice of its regularisation.

A probe is L2-regularised softmax regression on one layer's (reduced)
features: ``p(y | h) = softmax(W z + b)`` with ``z`` the features
standardised on the training split. The objective

    mean cross-entropy + l2 / 2 * ||W||^2

is convex, so a probe has one optimum; :func:`fit_probe` (one layer) and
:func:`fit_probes` (every layer of a run) find it with full-batch L-BFGS and
report whether it met its tolerance. It is the same problem as scikit-learn's
``LogisticRegression(C=1 / (n * l2))`` on standardised features.

Choosing ``l2`` (``l2="auto"``, the default). A probe's capacity must suit its
layer: 2,000 features on 100 examples need strong regularisation, 20
informative features on 2,000 examples almost none. Per layer:

- **Held-out fold.** The training split is divided once, for every layer
  alike, into a fitting part and a held-out fold: a seeded
  (``seed``), stratified 20% of each class (at least one example of each).
  In a token-level run (``groups=``, each token's sequence) the fold takes
  whole sequences instead, so that no sequence is on both sides of it.
  Valid and test splits are never looked at: they only report.
- **Path.** The probe is fitted on the fitting part along the log-spaced
  path :data:`L2_PATH` (10, 1, 0.1, ..., 1e-6: eight decades), from the
  strong end down, each value warm-started from the previous one's weights
  and stopped at a looser tolerance (``100 * tol``, at most 1e-3) than the
  final fit: a decade grid needs the held-out loss to about three digits. After
  each value the **mean cross-entropy on the held-out fold** (nats) is
  computed; the path stops early once it has failed to improve on the best
  value for :data:`PATIENCE` (2) consecutive values.
- **Choice.** The value with the lowest held-out cross-entropy wins; a weaker
  value must beat a stronger one by more than a relative ``1e-6`` (float
  noise), so ties go to the stronger L2.
- **Refit.** The probe is then refitted on the whole training split at the
  chosen value (warm-started from the path's weights, to ``tol``). That fit is
  the one returned: ``ProbeFit.l2`` is the value, ``ProbeFit.heldout`` the
  held-out cross-entropy it won with, ``ProbeFit.path`` every point tried.
- **Candidates.** A layer may have several candidate column slices of its
  features (``candidates``: the several pooling sizes of a ``reduce="auto"``
  reducer, see :mod:`probekit.engine.reduce`). Each candidate runs its own
  path on the same fold, and the best (candidate, l2) pair by the same
  held-out score wins (ties: the stronger L2, then the earlier candidate);
  ``ProbeFit.spec`` and ``ProbeFit.columns`` record it and
  :meth:`ProbeFit.logits` reads only those columns. With a fixed ``l2`` and
  several candidates, the path is that one value: the fold then chooses the
  candidate only.
- **Fallback.** A training split with fewer than :data:`MIN_PER_CLASS` (5)
  examples of some class cannot hold out a fold that has every class and
  still fit on the rest: the probe is then fitted with the fixed
  :data:`FALLBACK_L2` (1e-3; with candidates, the one with the fewest
  columns), and ``ProbeFit.fallback`` says why, in one line, for the caller
  to record with the run.
- **Cost.** Warm starts, the looser tolerance on the path and the early stop
  keep the whole choice (path and refit) within about 3x one fit at the
  chosen value from scratch (``benchmarks/fitting.py`` measures the ratio).
- **Determinism.** The fold comes from ``seed``; in the path every sum over
  rows is taken over fixed row blocks in a fixed order and the preconditioner
  is computed single-threaded, so the same data and seed give the same
  choice and the same weights whatever the number of CPU threads.

A fixed float ``l2`` (and at most one candidate) fits exactly as before the
path existed: on the whole training split, from the class priors, no fold.
``l2`` may also map layers to values (floats or ``"auto"``), e.g. to refit a
stored run with the values it chose.

How the solver stays cheap (see ``benchmarks/``): the loss and gradient are
two float32 matrix products per evaluation with the weights kept as
``(classes, features)`` (the fast layout for a skinny product), with the loss
summed in float64 so the line search sees a smooth objective; the strongest
correlations between features are whitened away by a low-rank preconditioner
found with a few products of a random sketch, which roughly halves the
evaluations on real, correlated features; and on the CPU the work runs on
single-threaded workers (whole layers in parallel, or row blocks of one
layer), which keeps all cores busy without the per-operation barriers that
make multithreaded small products stall on a shared machine.

:mod:`probekit.engine.online` holds the cheap alternative for monitoring (one
optimiser step per model training step).

This module owns the probes and their solvers; it works on feature tensors
only, so it imports no model-side part of the engine (only
:mod:`~probekit.engine.devices`, for thread counts) and
:mod:`probekit.params` for its argument checks, and never the run store,
the diagnosis, the charts or the explorers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from probekit.engine.devices import torch_threads
from probekit.params import Interval, Options, check_params

__all__ = [
    "DEFAULT_L2", "FALLBACK_L2", "HOLDOUT", "L2_PATH", "MIN_PER_CLASS", "PATIENCE", "ProbeFit", "fit_probe", "fit_probes", "score", "standardiser",
]

#: Default L2 strength of the solver when ``l2`` is not chosen on held-out data
#: (on standardised features, mean loss); also the fallback of ``l2="auto"``.
DEFAULT_L2 = 1e-3
#: The fixed value ``l2="auto"`` falls back to when no fold can be held out.
FALLBACK_L2 = DEFAULT_L2
#: The L2 path of ``l2="auto"``, strongest first.
L2_PATH = tuple(10.0 ** -e for e in range(-1, 7))
#: Share of each class held out to choose on.
HOLDOUT = 0.2
#: Fewest training examples of every class for ``l2="auto"`` to hold out a fold.
MIN_PER_CLASS = 5
#: Values along the path without improvement on the best before the path stops.
PATIENCE = 2
#: The path's points stop at this multiple of ``tol``, at most 1e-3 (the refit at ``tol`` itself).
_PATH_TOL = 100
#: A weaker L2 must lower the held-out loss by more than this (relative) to be chosen.
_TIE = 1e-6
_EVAL_CHUNK = 8192
#: Largest number of top feature-covariance directions the preconditioner whitens.
_PRECONDITION_RANK = 64
#: Fewest elements (examples x features) of a layer fitted in parallel with others, and
#: of each row block when one fit is split across threads.
_MIN_PARALLEL_ELEMENTS = 2**21
#: Largest training matrix (examples x features) whose loss is computed in float64. Near the
#: optimum of a small, low-variance problem (a 3-feature head on 64 examples) float32 losses
#: are too coarse for the line search to see the last decrease, and the fit would stop short of
#: its tolerance; at this size float64 costs nothing that matters.
_FLOAT64_ELEMENTS = 2**18
#: Most row blocks of one fit along the path (their number never depends on the threads).
_MAX_BLOCKS = 16
#: Rows of the random sample the preconditioner's sketch is computed on.
_SKETCH_ROWS = 2048
_STATS_ROWS = 1024

_L2_CONSTRAINTS = {"l2": [Interval(float, 0, None), Options("auto")], "seed": [Interval(int, 0, None)],
                   "max_iter": [Interval(int, 1, None)], "tol": [Interval(float, 0, None, closed="neither")]}


@dataclass
class ProbeFit:
    """A fitted probe: standardisation, weights, how the solver ended, and how ``l2`` was chosen."""

    mean: torch.Tensor  # (columns,)
    scale: torch.Tensor  # (columns,)
    weight: torch.Tensor  # (columns, classes), on standardised features
    bias: torch.Tensor
    iterations: int  # of the returned fit (the refit, for l2="auto")
    converged: bool
    #: The L2 strength the returned weights were fitted with.
    l2: float = DEFAULT_L2
    #: The chosen candidate's spec; None when the layer had one.
    spec: str | None = None
    #: The slice of the layer's features the probe reads (all of them unless a candidate was chosen).
    columns: slice | None = None
    #: Why ``l2="auto"`` fell back to :data:`FALLBACK_L2` (one line); None when it did not.
    fallback: str | None = None
    #: Held-out mean cross-entropy (nats) the choice was made on; NaN when nothing was chosen.
    heldout: float = math.nan
    #: Every point of the path: ``(spec, l2, held-out cross-entropy, iterations)``.
    path: tuple = ()
    #: L-BFGS iterations spent along the path (0 without one).
    path_iterations: int = 0

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        if self.columns is not None:
            features = features[..., self.columns]
        return ((features - self.mean) / self.scale) @ self.weight + self.bias


def standardiser(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and scale of the training features (constant features get scale 1)."""
    mean, scale, _ = _standardise(features, pool=None, keep=False)
    return mean, scale


def _standardise(
    features: torch.Tensor, *, pool: Executor | None, keep: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mean, scale and (with ``keep``) the standardised features, in fixed row blocks.

    The blocks are summed in a fixed order whoever computes them, so the
    result does not depend on ``pool``; with one, its workers take every
    block but those this thread takes. Squared deviations are summed block by
    block: torch's column-wise std is ~10x slower on a tall matrix, and no
    step allocates a second full-size temporary.
    """
    n = features.shape[0]
    starts = range(0, n, _STATS_ROWS)

    def each(fn) -> list:
        if pool is None:
            return [fn(a) for a in starts]
        futures = {a: pool.submit(fn, a) for a in starts[1::2]}  # this thread takes every other block
        mine = {a: fn(a) for a in starts[::2]}
        return [mine[a] if a in mine else futures[a].result() for a in starts]

    mean = sum(each(lambda a: features[a:a + _STATS_ROWS].sum(0)), torch.zeros_like(features[0])) / n
    z = torch.empty_like(features) if keep else None

    def deviations(a: int) -> torch.Tensor:
        block = torch.sub(features[a:a + _STATS_ROWS], mean, out=z[a:a + _STATS_ROWS] if keep else None)
        return block.pow(2).sum(0)

    squares = sum(each(deviations), torch.zeros_like(mean))
    scale = (squares / n).sqrt_()
    scale = torch.where(scale > 1e-6 * scale.max().clamp_min(1e-30), scale, torch.ones_like(scale))
    if keep:
        each(lambda a: z[a:a + _STATS_ROWS].div_(scale))
    return mean, scale, z



def fit_probe(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float | str = "auto",
    candidates: Mapping[str, slice] | None = None,
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-5,
) -> ProbeFit:
    """Fit one probe with full-batch L-BFGS, its L2 strength chosen on a held-out fold by default.

    The loss and its analytic gradient are computed by torch (float32, on the
    features' device; on the CPU, row blocks on one single-threaded worker per
    core); SciPy's L-BFGS-B drives the iterations, as in scikit-learn's
    ``lbfgs`` solver.

    Args:
        features: ``(n, d)`` float tensor of one layer's training features.
        labels: ``(n,)`` integer class labels in ``[0, num_classes)``.
        num_classes: number of classes ``K``.
        l2: L2 strength on the weights (not the bias), per example; ``"auto"``
            chooses it along :data:`L2_PATH` by held-out cross-entropy (see the
            module's docstring), falling back to :data:`FALLBACK_L2` with a
            reason in ``ProbeFit.fallback`` when no fold can be held out.
        candidates: ``{spec: column slice}`` of ``features`` to choose among
            on the same fold (e.g. a ``Pyramid`` reducer's ``candidates``);
            None or one entry: every column.
        seed: seeds the held-out fold.
        max_iter: most L-BFGS iterations (per point of the path).
        tol: stop when the largest gradient entry is below this.

    Example:
        >>> fit = fit_probe(torch.randn(100, 8), torch.randint(0, 3, (100,)), 3)
        >>> fit.logits(torch.randn(5, 8)).shape
        torch.Size([5, 3])
    """
    return fit_probes({"probe": features}, labels, num_classes, l2=l2, seed=seed, max_iter=max_iter, tol=tol,
                      candidates=None if candidates is None else {"probe": candidates})["probe"]


def fit_probes(
    features: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float | str | Mapping[str, float | str] = "auto",
    candidates: Mapping[str, Mapping[str, slice]] | None = None,
    seed: int = 0,
    max_iter: int = 1000,
    tol: float = 1e-5,
    groups: torch.Tensor | None = None,
) -> dict[str, ProbeFit]:
    """Fit one probe per layer, each as :func:`fit_probe` does, all on one held-out fold.

    On the CPU, large layers are fitted in parallel (paths included), one per
    worker thread (``torch.get_num_threads()`` workers, each running torch
    single-threaded) and small ones one after another; the results are the
    same as fitting them one by one.

    Args:
        features: ``{layer: (n, d_layer) float tensor}``, all on one device.
        labels: ``(n,)`` integer class labels in ``[0, num_classes)``.
        num_classes, seed, max_iter, tol: as for :func:`fit_probe`.
        l2: a float, ``"auto"``, or ``{layer: float | "auto"}`` with an entry for every layer.
        candidates: ``{layer: {spec: column slice}}``; a layer without an entry
            (or with one candidate) reads all its columns. Entries for layers
            not in ``features`` are ignored (a caller may have left out a
            layer that could not be fitted).
        groups: ``(n,)`` integer group of each row (the sequence a token came
            from, in a token-level run): the held-out fold then takes whole
            groups, so that no group is on both sides of it.

    Returns:
        ``{layer: ProbeFit}``, in the order of ``features``.

    Example:
        >>> fits = fit_probes({"a": torch.randn(100, 8), "b": torch.randn(100, 4)}, torch.randint(0, 3, (100,)), 3)
        >>> sorted(fits)
        ['a', 'b']
    """
    if not features:
        return {}
    check_params(_L2_CONSTRAINTS, seed=seed, max_iter=max_iter, tol=tol)
    strengths = _strengths(l2, features)
    slices = {name: _candidate_slices(name, x.shape[1], (candidates or {}).get(name)) for name, x in features.items()}
    labels = labels.long()
    if labels.ndim != 1 or any(x.ndim != 2 or x.shape[0] != labels.shape[0] for x in features.values()):
        shapes = ", ".join(f"{name}: {tuple(x.shape)}" for name, x in features.items())
        raise ValueError(f"fit_probes needs (n, d) features and (n,) labels with the same n; got labels "
                         f"{tuple(labels.shape)} and features {shapes}")
    # One fold for every layer that chooses something (an L2 value, or among candidates).
    choosing = [name for name in features if strengths[name] == "auto" or len(slices[name]) > 1]
    if groups is not None and tuple(groups.shape) != tuple(labels.shape):
        raise ValueError(f"groups= needs one group per row: shape {tuple(labels.shape)}; got {tuple(groups.shape)}")
    if not choosing:
        fold = None
    elif groups is None:
        fold = _heldout_fold(labels, num_classes, seed)
    else:
        fold = _heldout_groups(labels, groups, num_classes, seed)
    on_cpu = all(x.device.type == "cpu" for x in features.values())
    threads = torch.get_num_threads() if on_cpu else 1
    solve = dict(num_classes=num_classes, max_iter=max_iter, tol=tol)

    def task(name: str, pool: Executor | None, parts: int) -> Callable[[], ProbeFit]:
        x = features[name]
        if name not in choosing:
            columns = next(iter(slices[name].values()))
            if columns != slice(0, x.shape[1]):
                x = x[:, columns]
            return lambda: _fit_one(x, labels, l2=strengths[name], pool=pool, parts=parts, columns=columns, **solve)
        return lambda: _fit_path(x, labels, fold, strengths[name], slices[name], pool=pool, parts=parts, **solve)

    # A small fit is many tiny steps: run in parallel, its threads would mostly wait for
    # each other (the GIL between steps); a large one spends its time in products.
    large = [name for name, x in features.items() if x.numel() >= _MIN_PARALLEL_ELEMENTS]
    with _single_threaded_blas(), _single_threaded_torch(threads) as pool:
        if pool is None or len(large) < 2:
            return {name: task(name, pool, threads)() for name in features}
        fits = {name: task(name, None, 1)() for name in features if name not in large}
        # Largest layers first, so that no worker is left with a big one at the end.
        order = sorted(large, key=lambda name: -features[name].numel())
        futures = {name: pool.submit(task(name, None, 1)) for name in order}
        fits.update({name: future.result() for name, future in futures.items()})
        return {name: fits[name] for name in features}


def _strengths(l2, features: Mapping[str, torch.Tensor]) -> dict[str, float | str]:
    """``{layer: float | "auto"}`` from the ``l2`` argument, checked."""
    if isinstance(l2, Mapping):
        missing = [name for name in features if name not in l2]
        if missing:
            raise ValueError(f"l2 maps layers to values but has none for {missing}; give every layer a value "
                             f"(a float or 'auto')")
        values = {name: l2[name] for name in features}
    else:
        values = dict.fromkeys(features, l2)
    for value in values.values():
        check_params(_L2_CONSTRAINTS, l2=value)
    return {name: value if value == "auto" else float(value) for name, value in values.items()}


def _candidate_slices(name: str, d: int, given: Mapping[str, slice] | None) -> dict[str | None, slice]:
    """The layer's candidates as ``{spec: slice(start, stop)}``; ``{None: slice(0, d)}`` for none or one."""
    if not given:
        return {None: slice(0, d)}
    out = {}
    for spec, columns in given.items():
        if not isinstance(columns, slice) or columns.step not in (None, 1):
            raise ValueError(f"candidate {spec!r} of layer {name!r} must be a slice of its feature columns with step 1; "
                             f"got {columns!r}")
        start, stop, _ = columns.indices(d)
        if stop <= start or (columns.stop is not None and columns.stop > d):
            raise ValueError(f"candidate {spec!r} of layer {name!r} reads columns {columns.start}:{columns.stop}, "
                             f"not a non-empty range of its {d} feature columns; give slices within 0:{d}")
        out[spec] = slice(start, stop)
    if len(out) == 1:
        return {None: next(iter(out.values()))}
    return out


def _heldout_fold(labels: torch.Tensor, num_classes: int, seed: int) -> tuple[torch.Tensor, int] | str:
    """A seeded, stratified held-out fold: ``(order, n_fit)``, the rows to fit on first, or why there is none (text).

    ``order`` lists the fitting rows (ascending) and then the held-out rows
    (ascending): :data:`HOLDOUT` of each class, rounded, at least one.
    """
    y = labels.detach().cpu()
    counts = torch.bincount(y, minlength=num_classes)
    present = (counts > 0).nonzero().flatten().tolist()
    scarce = [c for c in present if counts[c] < MIN_PER_CLASS]
    if scarce:
        c = min(scarce, key=lambda c: (int(counts[c]), c))
        return (f"holds out a stratified {HOLDOUT:.0%} fold and needs at least {MIN_PER_CLASS} training examples "
                f"of every class, but class {c} has {int(counts[c])}")
    shuffled = torch.randperm(y.shape[0], generator=torch.Generator().manual_seed(seed))
    fit, held = [], []
    for c in present:
        rows = shuffled[y[shuffled] == c]
        cut = max(1, round(HOLDOUT * rows.shape[0]))
        held.append(rows[:cut])
        fit.append(rows[cut:])
    fit_rows, held_rows = torch.cat(fit).sort().values, torch.cat(held).sort().values
    return torch.cat([fit_rows, held_rows]), fit_rows.shape[0]


#: Seeds :func:`_heldout_groups` tries before it gives up on a fold of whole groups with every class on both sides.
_GROUP_FOLD_TRIES = 16


def _heldout_groups(labels: torch.Tensor, groups: torch.Tensor, num_classes: int,
                    seed: int) -> tuple[torch.Tensor, int] | str:
    """A seeded held-out fold of whole groups (e.g. sequences): ``(order, n_fit)`` as :func:`_heldout_fold`, or why not.

    Groups are shuffled and held out until they hold :data:`HOLDOUT` of the
    rows. Every class present must keep at least one row on each side and
    :data:`MIN_PER_CLASS` rows in all; up to :data:`_GROUP_FOLD_TRIES` seeds
    are tried for such a fold.
    """
    y, g = labels.detach().cpu(), groups.detach().cpu().long()
    counts = torch.bincount(y, minlength=num_classes)
    present = counts > 0
    scarce = [c for c in present.nonzero().flatten().tolist() if counts[c] < MIN_PER_CLASS]
    if scarce:
        c = min(scarce, key=lambda c: (int(counts[c]), c))
        return (f"holds out a {HOLDOUT:.0%} fold of whole sequences and needs at least {MIN_PER_CLASS} labelled tokens "
                f"of every class, but class {c} has {int(counts[c])}")
    ids, member = torch.unique(g, return_inverse=True)
    if ids.numel() < 2:
        return f"holds out a {HOLDOUT:.0%} fold of whole sequences and needs at least 2 sequences; the training split has 1"
    sizes = torch.bincount(member, minlength=ids.numel())
    for attempt in range(_GROUP_FOLD_TRIES):
        order = torch.randperm(ids.numel(), generator=torch.Generator().manual_seed(seed + attempt))
        taken = torch.cumsum(sizes[order], 0)
        cut = int(torch.searchsorted(taken, torch.tensor(HOLDOUT * y.shape[0]))) + 1
        held_group = torch.zeros(ids.numel(), dtype=torch.bool)
        held_group[order[:min(cut, ids.numel() - 1)]] = True
        held = held_group[member]
        held_counts = torch.bincount(y[held], minlength=num_classes)
        fit_counts = counts - held_counts
        if bool(((held_counts > 0) & (fit_counts > 0))[present].all()):
            fit_rows, held_rows = (~held).nonzero().flatten(), held.nonzero().flatten()
            return torch.cat([fit_rows, held_rows]), fit_rows.shape[0]
    return (f"holds out a {HOLDOUT:.0%} fold of whole sequences with every class on both sides, and found none in "
            f"{_GROUP_FOLD_TRIES} seeded tries; add sequences holding the rare classes")


@contextmanager
def _single_threaded_torch(threads: int) -> Iterator[Executor | None]:
    """Run torch single-threaded here, with a pool of ``threads`` single-threaded workers (None for one).

    Workers that each own a core and one piece of work (a layer, or a block
    of rows) never wait for each other between operations, as threads
    sharing every small product do (see :func:`torch_threads`).
    """
    if threads <= 1:
        yield None
        return
    with torch_threads(1):
        pool = ThreadPoolExecutor(max_workers=threads, initializer=torch.set_num_threads, initargs=(1,),
                                  thread_name_prefix="probekit-fit")
        try:
            yield pool
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


def _single_threaded_blas():
    """SciPy's L-BFGS-B does its small vector work with OpenBLAS; its spinning threads
    would compete with torch's for the same cores (10-50x slower per step on 2 cores)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # scikit-learn brings it; without it, nothing to limit
        return nullcontext()
    return threadpool_limits(1, user_api="blas")



class _Objective:
    """The probe's loss on standardised features ``z`` (rows in row blocks), and L-BFGS-B on it.

    ``blocks``: how many row blocks the loss is summed over, in order. With a
    ``pool`` they are computed by its workers (this thread takes the first);
    without one, one after another here: the same arithmetic either way.
    """

    def __init__(self, z: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
                 precondition: Callable[[torch.Tensor], torch.Tensor], pool: Executor | None, blocks: int):
        if z.numel() <= _FLOAT64_ELEMENTS:
            z = z.double()
        self.z, self.labels, self.k = z, labels, num_classes
        self.n, self.d = z.shape
        self.precondition, self.pool = precondition, pool
        bounds = np.linspace(0, self.n, blocks + 1).astype(int)
        self.blocks = [(z[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def weight(self, flat: torch.Tensor) -> torch.Tensor:
        return self.precondition(flat[: self.d * self.k].view(self.k, self.d))

    def theta(self, weight_prime: torch.Tensor, previous: np.ndarray) -> np.ndarray:
        """Parameters with preconditioned weights ``weight_prime`` (``(classes, features)``) and ``previous``'s biases."""
        theta = previous.copy()
        theta[: self.d * self.k] = weight_prime.reshape(-1).double().cpu().numpy()
        return theta

    def start(self) -> np.ndarray:
        """Zero weights and the class log-frequencies as biases: the optimum when features carry nothing."""
        start = np.zeros(self.d * self.k + self.k)
        counts = torch.bincount(self.labels, minlength=self.k).double().clamp_min(0.5)
        prior = counts.log() - counts.log().mean()
        start[self.d * self.k:] = prior.cpu().numpy()
        return start

    def minimize(self, l2: float, start: np.ndarray, *, tol: float, max_iter: int) -> tuple[np.ndarray, int, bool]:
        """L-BFGS-B from ``start`` until the largest entry of the true gradient is within ``tol``."""
        from scipy.optimize import minimize

        z, n, d, k, pool = self.z, self.n, self.d, self.k, self.pool
        last: dict[str, object] = {}

        def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            flat = torch.from_numpy(theta).to(device=z.device, dtype=z.dtype)
            weight, bias = self.weight(flat), flat[d * k:]
            # This thread takes the first row block, the pool the others.
            futures = [pool.submit(_loss_terms, zb, yb, weight, bias) for zb, yb in self.blocks[1:]] if pool else []
            terms = [_loss_terms(*self.blocks[0], weight, bias)]
            terms += [f.result() for f in futures] if pool else [_loss_terms(zb, yb, weight, bias)
                                                                 for zb, yb in self.blocks[1:]]
            picked = sum(t[0] for t in terms)
            grad_w = sum(t[1] for t in terms) / n
            grad_b = sum(t[2] for t in terms) / n
            grad_w.add_(weight, alpha=l2)
            loss = -picked / n + 0.5 * l2 * float(weight.double().pow(2).sum())
            last["theta"], last["gmax"] = theta, max(float(grad_w.abs().max()), float(grad_b.abs().max()))
            grad = torch.cat([self.precondition(grad_w).reshape(-1), grad_b])
            return loss, grad.double().cpu().numpy()

        iterations = [0]

        def stop_when_converged(xk: np.ndarray) -> None:
            # The test is on the gradient of the true weights, whatever the preconditioner.
            iterations[0] += 1
            if last["gmax"] <= tol and np.array_equal(xk, last["theta"]):
                raise StopIteration

        try:
            result = minimize(
                loss_and_grad, start, jac=True, method="L-BFGS-B", callback=stop_when_converged,
                options={"maxiter": max_iter, "gtol": 0.0, "ftol": 64 * np.finfo(float).eps, "maxcor": 10},
            )
            solution, scipy_converged = result.x, result.status == 0
        except StopIteration:  # SciPy before 1.11 lets the callback's StopIteration through
            solution, scipy_converged = last["theta"], False
        if not np.array_equal(solution, last["theta"]):
            loss_and_grad(solution)
        return solution, iterations[0], bool(last["gmax"] <= tol or scipy_converged)

    def fit(self, theta: np.ndarray, mean: torch.Tensor, scale: torch.Tensor, iterations: int, converged: bool,
            **about) -> ProbeFit:
        flat = torch.from_numpy(theta).to(device=self.z.device, dtype=self.z.dtype)
        weight = self.weight(flat).T.contiguous().float()
        return ProbeFit(mean=mean, scale=scale, weight=weight, bias=flat[self.d * self.k:].float(),
                        iterations=iterations, converged=converged, **about)


def _fit_one(
    features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, l2: float, max_iter: int, tol: float,
    pool: Executor | None, parts: int, columns: slice | None = None, **about,
) -> ProbeFit:
    """One probe at a fixed ``l2``: standardise, precondition, then L-BFGS-B from the class priors."""
    features = features.float()
    mean, scale, z = _standardise(features, pool=pool)
    n, d = z.shape
    labels = labels.to(z.device)
    parts = max(1, min(parts, n * d // _MIN_PARALLEL_ELEMENTS)) if pool is not None else 1
    with torch_threads(parts) if pool is not None else nullcontext():  # a few large products: threads pay
        precondition = _preconditioner(z)
    objective = _Objective(z, labels, num_classes, precondition=precondition, pool=pool, blocks=parts)
    solution, iterations, converged = objective.minimize(l2, objective.start(), tol=tol, max_iter=max_iter)
    return objective.fit(solution, mean, scale, iterations, converged, l2=l2,
                         columns=columns if columns is not None else slice(0, d), **about)


def _fit_path(
    features: torch.Tensor, labels: torch.Tensor, fold: tuple[torch.Tensor, int] | str, l2: float | str,
    candidates: dict[str | None, slice], *, num_classes: int, max_iter: int, tol: float, pool: Executor | None,
    parts: int,
) -> ProbeFit:
    """One layer's choice of (candidate, l2) on the held-out fold, then its refit on every training row.

    See the module's docstring for the rule. ``fold`` is :func:`_heldout_fold`'s answer;
    ``l2`` a float (the path is that value: only the candidate is chosen) or ``"auto"``.
    """
    if isinstance(fold, str):  # no fold: the fixed fallback, on the smallest candidate
        spec, columns = min(candidates.items(), key=lambda item: item[1].stop - item[1].start)
        x = features if columns == slice(0, features.shape[1]) else features[:, columns]
        value = FALLBACK_L2 if l2 == "auto" else l2
        what = "l2='auto'" if l2 == "auto" else "choosing among candidates"
        then = f"fitted with the fixed l2={FALLBACK_L2:g} instead" if l2 == "auto" else "fitted"
        if len(candidates) > 1:
            then += f" on the candidate with the fewest columns, {spec!r}"
        why = f"{what} {fold}: {then} (give more examples{', or a fixed l2' if l2 == 'auto' else ''})"
        return _fit_one(x, labels, num_classes=num_classes, l2=value, max_iter=max_iter, tol=tol, pool=pool,
                        parts=parts, columns=columns, spec=spec, fallback=why)
    order, n_fit = fold
    order = order.to(features.device)
    mean, scale, z = _standardise(features.float()[order], pool=pool)
    labels = labels.to(z.device)[order]
    n, d = z.shape
    grid = L2_PATH if l2 == "auto" else (l2,)
    path_tol = max(tol, min(_PATH_TOL * tol, 1e-3)) if len(grid) > 1 else tol

    def blocks(rows: int, cols: int) -> int:  # never from the thread count: the same sums whoever computes them
        return max(1, min(_MAX_BLOCKS, rows * cols // _MIN_PARALLEL_ELEMENTS))

    points, best, path_iterations = [], None, 0
    for spec, columns in candidates.items():
        zc = z[:, columns] if columns != slice(0, d) else z
        with torch_threads(1):  # LAPACK's QR differs in the last bits with the thread count
            whitening = _Whitening.of(zc)
        fit_z, fit_y, held_z, held_y = zc[:n_fit], labels[:n_fit], zc[n_fit:], labels[n_fit:]
        theta, since_best, mine, weights = None, 0, None, None
        for value in grid:
            precondition, undo = whitening.at(value, num_classes)
            part = _Objective(fit_z, fit_y, num_classes, precondition=precondition, pool=pool,
                              blocks=blocks(n_fit, zc.shape[1]))
            theta = part.start() if theta is None else part.theta(undo(weights), theta)  # warm start
            theta, iterations, _ = part.minimize(value, theta, tol=path_tol, max_iter=max_iter)
            path_iterations += iterations
            flat = torch.from_numpy(theta).to(device=z.device, dtype=torch.float32)
            weights = part.weight(flat)
            logits = torch.addmm(flat[part.d * part.k:], held_z, weights.T)
            loss = float(F.cross_entropy(logits.double(), held_y))
            points.append((spec, value, loss, iterations))
            if mine is None or loss < mine[0] * (1 - _TIE):
                mine, since_best = (loss, value, theta.copy(), precondition), 0
            else:
                since_best += 1
                if since_best >= PATIENCE:
                    break
        if best is None or mine[0] < best[0] * (1 - _TIE):
            best = (*mine, spec, columns)
    loss, value, theta, precondition, spec, columns = best
    zc = z[:, columns] if columns != slice(0, d) else z
    whole = _Objective(zc, labels, num_classes, precondition=precondition, pool=pool, blocks=blocks(n, zc.shape[1]))
    solution, iterations, converged = whole.minimize(value, theta, tol=tol, max_iter=max_iter)
    return whole.fit(solution, mean[columns].clone(), scale[columns].clone(), iterations, converged, l2=value,
                     spec=spec, columns=columns, heldout=loss, path=tuple(points), path_iterations=path_iterations)


def _loss_terms(z: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """For a block of rows: the summed log-probability of the labels (float64), and the
    unnormalised weight and bias gradients of the summed cross-entropy."""
    rows = torch.arange(labels.shape[0], device=z.device)
    logp = torch.log_softmax(torch.addmm(bias[:, None], weight, z.T), dim=0)  # (classes, rows)
    picked = float(logp[labels, rows].double().sum())
    residual = logp.exp_()
    residual[labels, rows] -= 1
    return picked, residual @ z, residual.sum(1)


def _preconditioner(z: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """A change of variables ``W = W' P`` that whitens the top directions of the features' covariance.

    ``P = I + V diag(s - 1) V^T`` with ``V`` the top eigenvectors of ``z^T z / n``
    (found with two power iterations of a seeded random sketch) and ``s =
    sqrt(floor / eigenvalue)``, where ``floor`` is the largest of 1 (the mean
    eigenvalue of standardised features) and the smallest eigenvalue found.
    The optimum in ``W`` is unchanged; only the path to it is shorter.
    """
    return _Whitening.of(z).at(0.0)[0]


class _Whitening:
    """The top covariance directions of ``z`` (see :func:`_preconditioner`), and preconditioners from them.

    ``at(l2, classes)`` accounts for the L2 term: the loss's curvature along a
    direction of covariance ``e`` is about ``c e + l2`` with ``c = (1 - 1/K) / K``
    (softmax at its start), so ``s = sqrt((c floor + l2) / (c e + l2))``; at
    ``l2 = 0`` that is the plain whitening. Strong L2 makes the problem round
    already, and whitening it anyway would stretch the penalty's curvature
    instead: at the path's strong end that costs 2-3x the iterations.
    """

    def __init__(self, directions: torch.Tensor | None, top: torch.Tensor | None, floor: float):
        self.directions, self.top, self.floor = directions, top, floor

    @classmethod
    def of(cls, z: torch.Tensor) -> _Whitening:
        n, d = z.shape
        rank = min(_PRECONDITION_RANK, d // 8, n // 8)
        if rank < 8:
            return cls(None, None, 1.0)
        generator = torch.Generator(device=z.device).manual_seed(0)
        if n > _SKETCH_ROWS:  # the top directions are well estimated from a few thousand rows
            z = z[torch.randperm(n, generator=generator, device=z.device)[:_SKETCH_ROWS]]
            n = z.shape[0]
        basis = torch.randn(d, rank + 8, generator=generator, device=z.device)
        for _ in range(2):  # power iterations
            basis = torch.linalg.qr((z @ basis).T.matmul(z).T).Q
        sketch = z @ basis
        values, vectors = torch.linalg.eigh(sketch.T @ sketch / n)
        if not (torch.isfinite(values).all() and torch.isfinite(vectors).all()):
            return cls(None, None, 1.0)
        floor = max(float(values[0]), 1.0)
        top = values[-rank:]
        directions = basis @ vectors[:, -rank:]  # (d, rank), orthonormal
        return cls(directions, top, floor)

    def at(self, l2: float, classes: int = 2) -> tuple[Callable[[torch.Tensor], torch.Tensor],
                                                       Callable[[torch.Tensor], torch.Tensor]]:
        """``(P, P^-1)`` as functions of a ``(classes, features)`` matrix."""
        if self.directions is None:
            return (lambda matrix: matrix), (lambda matrix: matrix)
        directions, top, floor = self.directions, self.top, self.floor
        if l2 == 0:
            shift = torch.sqrt(floor / top.clamp_min(floor)) - 1  # in (-1, 0]
        else:
            c = (1 - 1 / classes) / classes
            shift = torch.sqrt((c * floor + l2) / (c * top.clamp_min(floor) + l2)) - 1
        inverse = 1 / (1 + shift) - 1

        def apply(matrix: torch.Tensor) -> torch.Tensor:
            v = directions.to(matrix.dtype)
            return matrix + ((matrix @ v) * shift.to(matrix.dtype)) @ v.T

        def undo(matrix: torch.Tensor) -> torch.Tensor:
            v = directions.to(matrix.dtype)
            return matrix + ((matrix @ v) * inverse.to(matrix.dtype)) @ v.T

        return apply, undo


def score(logits_of, features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Error, cross-entropy and (with more than 5 classes) top-5 error of a probe on one split."""
    errors = loss = top5 = 0.0
    n = labels.shape[0]
    for start in range(0, n, _EVAL_CHUNK):
        chunk = logits_of(features[start:start + _EVAL_CHUNK].float())
        y = labels[start:start + _EVAL_CHUNK]
        loss += F.cross_entropy(chunk, y, reduction="sum").item()
        errors += (chunk.argmax(1) != y).sum().item()
        if num_classes > 5:
            top5 += (~(chunk.topk(5, dim=1).indices == y[:, None]).any(1)).sum().item()
    result = {"error": errors / n, "loss": loss / n}
    if num_classes > 5:
        result["top5"] = top5 / n
    return result
