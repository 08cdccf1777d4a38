"""The linear probe, its solvers, and the held-out choice of its regularisation.

A probe is L2-regularised softmax regression on one layer's (reduced)
features: ``p(y | h) = softmax(W z + b)`` with ``z`` the features
standardised on the training split. The objective

    mean cross-entropy + l2 / 2 * ||W||^2

is convex, so a probe has one optimum; :func:`fit_probe` (one layer) and
:func:`fit_probes` (every layer of a run) find it with full-batch L-BFGS
(:mod:`probekit.engine.solver`, every layer's fit advancing together) and
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
  and stopped at a looser tolerance (``300 * tol``, at most 1e-3) than the
  final fit: a decade grid needs the held-out loss to about three digits. After
  each value the **mean cross-entropy on the held-out fold** (nats) is
  computed; the path stops early once it has failed to improve on the best
  value for :data:`PATIENCE` (2) consecutive values.
- **Choice.** The value with the lowest held-out cross-entropy wins, where
  losses within a relative ``1e-3`` of the lowest tie (the path's precision:
  three digits) and a tie goes to the stronger L2. A weak end of the path
  where the warm start already meets the looser tolerance moves the loss in
  its last digits only: such a value was never really fitted, and never
  wins (nor does a data-parallel fit, whose sums run in another order,
  choose differently on such digits).
- **Refit.** The probe is then refitted on the whole training split at the
  chosen value (warm-started from the path's weights, to ``tol``). That fit is
  the one returned: ``ProbeFit.l2`` is the value, ``ProbeFit.heldout`` the
  held-out cross-entropy it won with, ``ProbeFit.path`` every point tried.
- **Candidates.** A layer may have several candidate column slices of its
  features (``candidates``: the several pooling sizes of a ``reduce="auto"``
  reducer, see :mod:`probekit.engine.reduce`). Each candidate runs its own
  path on the same fold, and the best (candidate, l2) pair by the same
  held-out score wins (a tie, within the same ``1e-3``: the earlier
  candidate, the one with the fewest columns first, at its strongest L2);
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

Data-parallel fits (``comm=``, see :mod:`probekit.engine.distributed`): each
rank holds its shard of every split's features, and every sum over rows is
summed over the ranks, never gathered: the standardisation's sums, the
solver's loss and gradient (:mod:`probekit.engine.solver`), the
preconditioner's products, the held-out losses and every score's counts.
The held-out fold is drawn from the whole training split's labels (gathered
with each row's position in the split, two integers per example), so it is
the fold one process draws. Every layer is fitted in the features' own
coordinates there, except a layer that one process fits in the span of its
examples (at least twice as many features as examples, few examples per
class): that needs every rank's rows in one Gram matrix, and such a layer has
few rows by that rule, so every rank gathers them (at most
:data:`_GATHER_ELEMENTS` values) and fits it exactly as one process does
(``_few_rows``). The optimum is the same either way, and so is the L2 choice:
on the digits with the paper's convnet (8 and 28 px, three seeds), 2 ranks
chose every layer's value as 1 process did.

How the solver stays cheap (see ``benchmarks/`` and
:mod:`probekit.engine.solver`): the fits of every layer (and, on the path,
of every candidate) advance together, one evaluation each per round, and no
round waits for the device; the loss and gradient are two matrix products
per evaluation with the weights kept as ``(classes, features)`` (the fast
layout for a skinny product), with the loss summed in float64 so the line
search sees a smooth objective; the strongest correlations between features
are whitened away by a low-rank preconditioner found with a few products of
a random sketch, which roughly halves the evaluations on real, correlated
features; a layer with at least twice as many features as examples, and at
most 50 examples per class (150 with an L2 path), is fitted in the span of
its examples (the dual:
see ``_Space``), where every pass is over ``n`` columns instead of ``d`` and
the same optimum is reached, more faithfully at a given tolerance, since its
gradient is not spread over thousands of features; and on the CPU the
products run in row blocks on single-threaded workers, which keeps all cores
busy without the per-operation barriers that make multithreaded small
products stall on a shared machine.

:mod:`probekit.engine.online` holds the cheap alternative for monitoring (one
optimiser step per model training step).

This module owns the probes; it works on feature tensors only, so it imports
no model-side part of the engine (only :mod:`~probekit.engine.solver`,
:mod:`~probekit.engine.devices` for thread counts and
:mod:`~probekit.engine.distributed` for the sums over ranks) and
:mod:`probekit.params` for its argument checks, and never the run store,
the diagnosis, the charts or the explorers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch.nn import functional as F

from probekit.engine.devices import torch_threads
from probekit.engine.distributed import Collective
from probekit.engine.solver import FLOAT64_ELEMENTS, Problem, Whitening, minimize
from probekit.params import Interval, Options, check_params

__all__ = [
    "DEFAULT_L2", "DEFAULT_TOL", "FALLBACK_L2", "HOLDOUT", "L2_PATH", "MIN_PER_CLASS", "PATIENCE", "ProbeFit", "fit_probe", "fit_probes", "score", "standardiser",
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
#: The solver's default tolerance on the largest gradient entry. On the benchmarks' fits (one layer of 2,048 or
#: 8,192 features, 17 ResNet-50-sized layers; ``python -m benchmarks --only 2``) every layer's valid error is then
#: within 0.05 point of the ``tol=1e-6`` optimum; at 1e-5 it was up to 0.15 point off, for 20 % fewer iterations.
DEFAULT_TOL = 3e-6
#: The path's points stop at this multiple of ``tol``, at most 1e-3 (the refit at ``tol`` itself).
_PATH_TOL = 300
#: Held-out losses of the L2 path within this relative difference tie (the path's points stop at a looser
#: tolerance: their losses are known to about three digits); a tie goes to the stronger L2, the earlier candidate.
_TIE = 1e-3
_EVAL_CHUNK = 8192
#: Fewest elements (examples x features) of each row block of a fit on the CPU.
_MIN_PARALLEL_ELEMENTS = 2**21
#: Most examples per class for which a layer with at least twice as many features as examples is fitted in the
#: span of its examples (the dual): there the Gram matrix (2 n^2 d) costs less than the passes it saves
#: (about 4 n d K per evaluation, a few dozen evaluations per fit); three times as many with an L2 path, whose
#: fits all share the one Gram matrix.
_DUAL_ROWS_PER_CLASS = 50
#: Most row blocks of one fit (their number never depends on the threads).
_MAX_BLOCKS = 16
#: Most values (rows x features) of a layer that a data-parallel fit gathers onto every rank (:func:`_few_rows`).
_GATHER_ELEMENTS = 2**28
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
    features: torch.Tensor, *, pool: Executor | None, keep: bool = True, comm: Collective | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Mean, scale and (with ``keep``) the standardised features, in fixed row blocks.

    The blocks are summed in a fixed order whoever computes them, so the
    result does not depend on ``pool``; with one, its workers take every
    block but those this thread takes. Squared deviations are summed block by
    block: torch's column-wise std is ~10x slower on a tall matrix, and no
    step allocates a second full-size temporary. With ``comm`` both sums are
    summed over every rank's rows.
    """
    n = features.shape[0]
    starts = range(0, n, _STATS_ROWS)
    total = n if comm is None else comm.count(n)

    def each(fn) -> list:
        if pool is None:
            return [fn(a) for a in starts]
        futures = {a: pool.submit(fn, a) for a in starts[1::2]}  # this thread takes every other block
        mine = {a: fn(a) for a in starts[::2]}
        return [mine[a] if a in mine else futures[a].result() for a in starts]

    mean = sum(each(lambda a: features[a:a + _STATS_ROWS].sum(0)), features.new_zeros(features.shape[1]))
    if comm is not None:
        comm.sum_(mean)
    mean = mean / total
    z = torch.empty_like(features) if keep else None

    def deviations(a: int) -> torch.Tensor:
        block = torch.sub(features[a:a + _STATS_ROWS], mean, out=z[a:a + _STATS_ROWS] if keep else None)
        return block.pow(2).sum(0)

    squares = sum(each(deviations), torch.zeros_like(mean))
    if comm is not None:
        comm.sum_(squares)
    scale = (squares / total).sqrt_()
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
    tol: float = DEFAULT_TOL,
) -> ProbeFit:
    """Fit one probe with full-batch L-BFGS, its L2 strength chosen on a held-out fold by default.

    The loss and its analytic gradient are computed by torch (float32, on the
    features' device; on the CPU, row blocks on one single-threaded worker per
    core), and so are the L-BFGS iterations (:mod:`probekit.engine.solver`):
    the method of scikit-learn's ``lbfgs`` solver, without a host round trip
    per iteration on a GPU.

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
        tol: stop when the largest gradient entry is below this (:data:`DEFAULT_TOL`).

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
    tol: float = DEFAULT_TOL,
    groups: torch.Tensor | None = None,
    comm: Collective | None = None,
    positions: torch.Tensor | None = None,
) -> dict[str, ProbeFit]:
    """Fit one probe per layer, each as :func:`fit_probe` does, all on one held-out fold.

    Every layer's fit advances in the same solver rounds (paths included: each
    value of the path is one call of the solver for every layer still on it).
    On the CPU, the row blocks of the large layers run on
    ``torch.get_num_threads()`` single-threaded workers. The results are those
    of fitting each layer alone, to the last few bits (a layer's memory rows
    are padded to its group's widest, which can change the order of a sum).
    Every layer's standardised training features are held at once (one copy
    of ``features``, in float32).

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
        comm: the ranks of a data-parallel fit (see the module's docstring); ``features`` and
            ``labels`` are then this rank's shard, and every rank gets the same fits.
        positions: with ``comm``, each row's position in the whole training split (its
            sequence's, in a token-level run), from which the held-out fold is drawn.

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
    if comm is not None and (positions is None or tuple(positions.shape) != tuple(labels.shape)):
        raise ValueError("a data-parallel fit needs positions=: each row's position in the whole training split")
    if comm is not None:
        few = _few_rows(features, slices, choosing, num_classes, comm)
        if few:  # gathered, then fitted on every rank as one process fits them; the rest with sums over the ranks
            every_position = torch.cat(comm.gather_rows(positions.long()))
            order = torch.sort(every_position, stable=True).indices
            every_label = torch.cat(comm.gather_rows(labels))[order].to(labels.device)
            ordered_groups = None if groups is None else every_position[order]  # a sequence's position is its group
            gathered = {name: torch.cat(comm.gather_rows(features[name].float())).reshape(-1, features[name].shape[1])
                        [order].to(features[name].device) for name in few}
            alone = fit_probes(gathered, every_label, num_classes, l2={n: strengths[n] for n in few},
                               candidates={n: slices[n] for n in few}, seed=seed, max_iter=max_iter, tol=tol,
                               groups=ordered_groups)
            rest = {name: x for name, x in features.items() if name not in alone}
            shared = fit_probes(rest, labels, num_classes, l2={n: strengths[n] for n in rest},
                                candidates={n: slices[n] for n in rest}, seed=seed, max_iter=max_iter, tol=tol,
                                groups=groups, comm=comm, positions=positions) if rest else {}
            return {name: alone[name] if name in alone else shared[name] for name in features}
    if not choosing:
        fold = None
    elif comm is not None:
        fold = _shard_fold(labels, positions, groups is not None, num_classes, seed, comm)
    elif groups is None:
        fold = _heldout_fold(labels, num_classes, seed)
    else:
        fold = _heldout_groups(labels, groups, num_classes, seed)
    on_cpu = all(x.device.type == "cpu" for x in features.values())
    threads = torch.get_num_threads() if on_cpu else 1
    with _single_threaded_torch(threads) as pool:
        return _fit_all(features, labels, num_classes, strengths, slices, choosing, fold, pool=pool,
                        max_iter=max_iter, tol=tol, comm=comm)


def _few_rows(features: Mapping[str, torch.Tensor], slices: dict, choosing: list, num_classes: int,
              comm: Collective) -> list[str]:
    """The layers a data-parallel fit gathers onto every rank: those one process fits in the span of its examples.

    One process fits a candidate of at least twice as many features as the
    split's examples, and few examples per class, in that span (the dual, see
    :func:`_spaces`), which needs every row in one Gram matrix. Such a layer
    has few rows by that rule, so every rank gathers them (in the split's
    order, from each row's position) and fits the layer exactly as one
    process does; the ranks then hold the same fit without another
    collective. Above :data:`_GATHER_ELEMENTS` values a layer stays sharded,
    fitted in its features' own coordinates (the same optimum, reached
    along another path: an L2 choice on it may differ from one process's
    where two values tie to the path's tolerance).
    """
    rows = comm.count(next(iter(features.values())).shape[0])
    few = []
    for name, x in features.items():
        widest = max(columns.stop - columns.start for columns in slices[name].values())
        fits = 3 if name in choosing else 1
        if widest >= 2 * rows and rows <= _DUAL_ROWS_PER_CLASS * num_classes * fits \
                and rows * x.shape[1] <= _GATHER_ELEMENTS:
            few.append(name)
    return few


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


def _shard_fold(labels: torch.Tensor, positions: torch.Tensor, by_group: bool, num_classes: int, seed: int,
                comm: Collective) -> tuple[torch.Tensor, int, int, int] | str:
    """This rank's part of the fold one process would draw: ``(order, n_fit, fit rows, held rows)`` or why none.

    ``order`` lists this rank's fitting rows, then its held-out rows;
    ``n_fit`` counts its fitting rows, and the last two count every rank's.
    Every rank gathers the split's labels and positions, sorts them into the
    split's order (a sequence's tokens keep theirs: a sequence lives on one
    rank) and draws the one fold from them.
    """
    every_label = comm.gather_rows(labels.long())
    every_position = comm.gather_rows(positions.long())
    mine = sum(part.numel() for part in every_label[:comm.rank])
    by_position = torch.sort(torch.cat(every_position), stable=True).indices
    split_labels = torch.cat(every_label)[by_position]
    if by_group:
        fold = _heldout_groups(split_labels, torch.cat(every_position)[by_position], num_classes, seed)
    else:
        fold = _heldout_fold(split_labels, num_classes, seed)
    if isinstance(fold, str):
        return fold
    order, n_fit = fold
    held = torch.zeros(split_labels.numel(), dtype=torch.bool)
    held[order[n_fit:]] = True
    held_here = torch.empty_like(held)
    held_here[by_position] = held
    held_here = held_here[mine:mine + labels.numel()]
    fit_rows, held_rows = (~held_here).nonzero().flatten(), held_here.nonzero().flatten()
    return torch.cat([fit_rows, held_rows]), fit_rows.numel(), n_fit, split_labels.numel() - n_fit


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



def _blocks(z: torch.Tensor) -> int:
    """Row blocks of a problem's loss on ``z``: on the CPU from its size only, so that the sums are the same
    whoever computes them; one on a GPU, where a block is one more launch for no gain."""
    if z.device.type != "cpu":
        return 1
    return max(1, min(_MAX_BLOCKS, z.numel() // _MIN_PARALLEL_ELEMENTS))


class _Space:
    """The coordinates a candidate's problem is solved in, on its first ``rows`` rows (the rest held out).

    Primal: the standardised columns themselves. Dual (``gram`` given, for
    fewer examples than features): the span of the examples. With ``Z = U
    S^(1/2) V^T`` (from the eigenvectors of the Gram matrix ``Z Z^T``), the
    problem on ``F = U S^(1/2)`` (rows x rank) with weights ``W~ = W V`` is
    the same problem: the L2 optimum's weights lie in the examples' span (the
    gradient of the loss is a combination of the rows), so ``W = W~ V^T``,
    ``||W|| = ||W~||`` and the logits agree. Each pass is then over ``rank <=
    rows`` columns instead of ``d``; the held-out rows' coordinates come from
    the same Gram matrix.
    """

    #: Eigenvalues of the Gram matrix below this share of the largest are its null space.
    NULL = 1e-9

    def __init__(self, z: torch.Tensor, rows: int, whitening: Whitening | None, gram: torch.Tensor | None = None):
        self.z, self.rows, self.dual = z, rows, gram is not None
        #: Rows of the fitting part and of the held-out rows over every rank (a data-parallel fit: see :func:`_spaces`).
        self.count, self.held_count = rows, z.shape[0] - rows
        if gram is None:
            self.train, self.held = z[:rows], z[rows:]
            self.whitening = whitening
            return
        values, vectors = torch.linalg.eigh(gram[:rows, :rows])
        kept = values > self.NULL * values[-1].clamp_min(1e-300)
        values, vectors = values[kept], vectors[:, kept]
        self.factor = vectors / values.sqrt()  # U S^(-1/2): rows x rank
        dtype = torch.float64 if rows * values.numel() <= FLOAT64_ELEMENTS else torch.float32
        self.train = (vectors * values.sqrt()).to(dtype)
        self.held = (gram[rows:, :rows] @ self.factor).to(dtype)
        self.whitening = Whitening.of(self.train)

    def primal(self, weight: torch.Tensor) -> torch.Tensor:
        """True weights ``(K, d)`` (float32) of weights ``(K, columns)`` in these coordinates."""
        if not self.dual:
            return weight.float()
        return (weight.double() @ self.factor.T).float() @ self.z[:self.rows]

    def coords(self, weight: torch.Tensor) -> torch.Tensor:
        """Weights in these coordinates of true weights ``(K, d)`` (their part in the span, when dual)."""
        if not self.dual:
            return weight
        return (weight.float() @ self.z[:self.rows].T).double() @ self.factor


def _spaces(z: torch.Tensor, rows: int, num_classes: int, comm: Collective | None = None,
            totals: tuple[int, int] | None = None) -> tuple[_Space, _Space | None]:
    """The whole training split's space and, when ``rows < n``, the fitting part's (the rest held out).

    With ``comm``, ``z`` is this rank's shard and ``totals`` the rows (fitting part, held out) of
    every rank: the features' own coordinates, whitened from every rank's rows.
    """
    if comm is not None:
        fit_total, held_total = totals
        whitening = Whitening.of(z, rows=fit_total + held_total, reduce=comm.sum_)
        whole = _Space(z, z.shape[0], whitening)
        whole.count, whole.held_count = fit_total + held_total, 0
        if not held_total:
            return whole, None
        part = _Space(z, rows, whitening)
        part.count, part.held_count = fit_total, held_total
        return whole, part
    n, d = z.shape
    fits = 3 if rows < n else 1  # a path and its refit cost about three fits, all on one Gram matrix
    if d >= 2 * n and n <= _DUAL_ROWS_PER_CLASS * num_classes * fits:
        z64 = z.double()
        gram = z64 @ z64.T
        whole, part = _Space(z, n, None, gram), (_Space(z, rows, None, gram) if rows < n else None)
        if whole.train.shape[1] and (part is None or part.train.shape[1]):
            return whole, part
        # The examples span nothing (constant features): the features' own coordinates, where W stays 0.
    whitening = Whitening.of(z)
    return _Space(z, n, whitening), (_Space(z, rows, whitening) if rows < n else None)


@dataclass
class _Layer:
    """One layer's standardised training features (rows in fold order when it chooses) and its candidates."""

    mean: torch.Tensor
    scale: torch.Tensor
    z: torch.Tensor
    rows: int  # the fitting part's rows (all of them without a fold)
    labels: torch.Tensor
    candidates: dict  # {spec: slice} of z's columns
    l2: float | str
    about: dict  # ProbeFit fields known before the fit (spec, fallback)
    #: {spec: (whole split's _Space, fitting part's _Space or None)}, from :func:`_find_spaces`.
    spaces: dict = field(default_factory=dict)
    #: A data-parallel fit's rows over every rank: (fitting part, held out); None in one process.
    totals: tuple[int, int] | None = None

    def columns(self, spec) -> torch.Tensor:
        cols = self.candidates[spec]
        return self.z if cols == slice(0, self.z.shape[1]) else self.z[:, cols]


def _prepare(x: torch.Tensor, labels: torch.Tensor, candidates: dict, l2, *, order: torch.Tensor | None,
             rows: int | None, pool: Executor | None, comm: Collective | None = None,
             totals: tuple[int, int] | None = None, **about) -> _Layer:
    if order is not None:
        x, labels = x[order.to(x.device)], labels[order.to(labels.device)]
    mean, scale, z = _standardise(x.float(), pool=pool, comm=comm)
    if comm is not None and totals is None:  # no fold: every row fits
        totals = (comm.count(z.shape[0]), 0)
    return _Layer(mean, scale, z, z.shape[0] if rows is None else rows, labels.to(z.device), candidates, l2, about,
                  totals=totals)


def _find_spaces(layers: Mapping[str, _Layer], num_classes: int, pool: Executor | None,
                 comm: Collective | None = None) -> None:
    """Every candidate's spaces (its preconditioner's sketch, or its Gram matrix), on the workers side by side:
    each is computed single-threaded, so the result never depends on who computes it. A data-parallel fit
    finds them one after another, every rank in the same order (each sums products over the ranks)."""
    work = [(layer, spec) for layer in layers.values() for spec in layer.candidates]

    def find(item) -> tuple:
        layer, spec = item
        return _spaces(layer.columns(spec), layer.rows, num_classes, comm, layer.totals)

    parallel = pool is not None and comm is None
    for (layer, spec), spaces in zip(work, pool.map(find, work) if parallel else map(find, work)):
        layer.spaces[spec] = spaces


def _fit_all(features: Mapping[str, torch.Tensor], labels: torch.Tensor, num_classes: int, strengths: dict,
             slices: dict, choosing: list, fold, *, pool: Executor | None, max_iter: int, tol: float,
             comm: Collective | None = None) -> dict:
    """Every layer's fit: the L2 paths of the choosing layers advance together, then every final fit at once."""
    layers: dict[str, _Layer] = {}
    common = {"pool": pool, "comm": comm}
    for name, x in features.items():
        if name not in choosing:
            spec, columns = next(iter(slices[name].items()))
            x = x if columns == slice(0, x.shape[1]) else x[:, columns]
            layers[name] = _prepare(x, labels, {spec: slice(0, x.shape[1])}, strengths[name],
                                    order=None, rows=None, columns=columns, **common)
        elif isinstance(fold, str):  # no fold: the fixed fallback, on the smallest candidate
            l2, candidates = strengths[name], slices[name]
            spec, columns = min(candidates.items(), key=lambda item: item[1].stop - item[1].start)
            x = x if columns == slice(0, x.shape[1]) else x[:, columns]
            what = "l2='auto'" if l2 == "auto" else "choosing among candidates"
            then = f"fitted with the fixed l2={FALLBACK_L2:g} instead" if l2 == "auto" else "fitted"
            if len(candidates) > 1:
                then += f" on the candidate with the fewest columns, {spec!r}"
            why = f"{what} {fold}: {then} (give more examples{', or a fixed l2' if l2 == 'auto' else ''})"
            layers[name] = _prepare(x, labels, {spec: slice(0, x.shape[1])}, FALLBACK_L2 if l2 == "auto" else l2,
                                    order=None, rows=None, columns=columns, spec=spec, fallback=why, **common)
        else:
            layers[name] = _prepare(x, labels, slices[name], strengths[name], order=fold[0],
                                    rows=fold[1], totals=tuple(fold[2:]) if comm is not None else None, **common)
    _find_spaces(layers, num_classes, pool, comm)
    chosen = _paths({name: layers[name] for name in choosing if not isinstance(fold, str)}, num_classes,
                    pool=pool, max_iter=max_iter, tol=tol, comm=comm)
    reduce = None if comm is None else comm.sum_
    problems, starts, about, spaces = [], [], [], []
    for name, layer in layers.items():
        if name in chosen:
            loss, value, weight, bias, spec, points, spent = chosen[name]
            whole, part = layer.spaces[spec]
            problem = Problem(whole.train, layer.labels, num_classes, value, whole.whitening, _blocks(whole.train),
                              rows=whole.count, reduce=reduce)
            start = problem.warm(whole.coords(part.primal(weight)), bias)
            columns = layer.candidates[spec]
            extra = dict(spec=spec, columns=columns, heldout=loss, path=tuple(points), path_iterations=spent,
                         mean=layer.mean[columns].clone(), scale=layer.scale[columns].clone())
        else:
            whole, _ = next(iter(layer.spaces.values()))
            problem = Problem(whole.train, layer.labels, num_classes, layer.l2, whole.whitening, _blocks(whole.train),
                              rows=whole.count, reduce=reduce)
            start = problem.start()
            extra = dict(layer.about, mean=layer.mean, scale=layer.scale)
        problems.append(problem)
        starts.append(start)
        about.append(extra)
        spaces.append(whole)
    fits = {}
    for name, problem, extra, whole, (theta, iterations, converged) in zip(
            layers, problems, about, spaces, minimize(problems, starts, tol=tol, max_iter=max_iter, pool=pool)):
        weight, bias = problem.weights(theta)
        fits[name] = ProbeFit(weight=whole.primal(weight).T.contiguous(), bias=bias.float(), iterations=iterations,
                              converged=converged, l2=problem.l2, **extra)
    return fits


def _paths(layers: Mapping[str, _Layer], num_classes: int, *, pool: Executor | None, max_iter: int,
           tol: float, comm: Collective | None = None) -> dict:
    """Each choosing layer's chosen ``(held-out loss, l2, W, b, spec, points, path iterations)`` along its path.

    Every (layer, candidate) still on its path takes its next value in the
    same call of the solver, warm-started from its previous weights; the
    held-out losses are read back once per value. The choice is made once
    every path has stopped (:func:`_choose`).
    """
    if not layers:
        return {}
    tracks = []  # one per (layer, candidate), in layer then candidate order
    for name, layer in layers.items():
        grid = L2_PATH if layer.l2 == "auto" else (layer.l2,)
        for spec, (_, part) in layer.spaces.items():
            tracks.append({"name": name, "spec": spec, "grid": grid, "space": part, "y": layer.labels[:part.rows],
                           "held_y": layer.labels[part.rows:], "weights": None, "best": math.inf, "since_best": 0,
                           "done": False, "points": [], "kept": {}, "iterations": 0})
    path_tol = max(tol, min(_PATH_TOL * tol, 1e-3))
    for step in range(len(L2_PATH)):
        live = [t for t in tracks if not t["done"] and step < len(t["grid"])]
        if not live:
            break
        problems = [Problem(t["space"].train, t["y"], num_classes, t["grid"][step], t["space"].whitening,
                            _blocks(t["space"].train), rows=t["space"].count,
                            reduce=None if comm is None else comm.sum_) for t in live]
        starts = [p.start() if t["weights"] is None else p.warm(*t["weights"]) for p, t in zip(problems, live)]
        tols = [path_tol if len(t["grid"]) > 1 else tol for t in live]  # a path's points, or a single value's fit
        results = minimize(problems, starts, tol=tols, max_iter=max_iter, pool=pool)
        losses = []
        for p, t, (theta, iterations, _) in zip(problems, live, results):
            weight, bias = p.weights(theta)
            t["weights"] = (weight, bias)
            t["iterations"] += iterations
            held = t["space"].held
            logits = torch.addmm(bias.to(held.dtype), held, weight.to(held.dtype).T)
            if comm is None:
                losses.append(F.cross_entropy(logits.double(), t["held_y"]))
            else:  # summed here, divided by every rank's held-out rows below
                losses.append(F.cross_entropy(logits.double(), t["held_y"], reduction="sum"))
        losses = torch.stack(losses)
        if comm is not None:
            losses = comm.sum_(losses.cpu()) / torch.tensor([t["space"].held_count for t in live], dtype=torch.float64)
        for p, t, loss, (_, iterations, _) in zip(problems, live, losses.tolist(), results):
            loss = loss if math.isfinite(loss) else math.inf  # a diverged point never sets the bar
            t["points"].append((t["spec"], p.l2, loss, iterations))
            t["kept"][len(t["points"]) - 1] = t["weights"]
            if loss < t["best"] / (1 + _TIE):
                t["best"], t["since_best"] = loss, 0
            else:
                t["since_best"] += 1
                t["done"] = t["since_best"] >= PATIENCE
            # A point above this track's bar is above its layer's bar (never lower than the track's) at the end.
            t["kept"] = {i: w for i, w in t["kept"].items() if t["points"][i][2] <= t["best"] * (1 + _TIE)}
    return _choose(tracks)


def _choose(tracks: list[dict]) -> dict:
    """Each layer's point over all its candidates' paths: the simplest one that ties with the lowest held-out loss.

    The lowest held-out loss of the layer sets the bar, ``(1 + 1e-3)`` times
    it: the path's points stop at a looser tolerance, so their losses are
    known to about three digits, and a smaller difference is a tie. The
    chosen point is the earliest candidate (the one with the fewest columns
    first) with a point under the bar, at that candidate's strongest L2
    under it. So a weaker value that the path's tolerance cannot tell apart
    (a point whose warm start already met the tolerance, and whose loss
    moved only in its last digits) never wins, and a data-parallel fit,
    whose sums are taken in another order, chooses as one process does.
    Returns ``{layer: (held-out loss, l2, W, b, spec, points, path iterations)}``.
    """
    by_layer: dict[str, list[dict]] = {}
    for t in tracks:
        by_layer.setdefault(t["name"], []).append(t)
    chosen = {}
    for name, group in by_layer.items():
        bar = min(q[2] for t in group for q in t["points"]) * (1 + _TIE)
        t, i = next((t, i) for t in group for i, q in enumerate(t["points"]) if q[2] <= bar)
        _, value, loss, _ = t["points"][i]
        chosen[name] = (loss, value, *t["kept"][i], t["spec"], [q for u in group for q in u["points"]],
                        sum(u["iterations"] for u in group))
    return chosen


def score(logits_of, features: torch.Tensor, labels: torch.Tensor, num_classes: int, *,
          comm: Collective | None = None) -> dict[str, float]:
    """Error, cross-entropy and (with more than 5 classes) top-5 error of a probe on one split.

    A small split on the CPU is scored single-threaded: its products are too
    small to share, and threads sharing them would wait for each other. With
    ``comm`` (``features`` one rank's shard), the counts are summed over every
    rank: the scores are the whole split's.
    """
    n = labels.shape[0]
    small = features.device.type == "cpu" and features.numel() < _MIN_PARALLEL_ELEMENTS
    with torch_threads(1) if small else nullcontext():
        totals = []
        for start in range(0, n, _EVAL_CHUNK):
            chunk = logits_of(features[start:start + _EVAL_CHUNK].float())
            y = labels[start:start + _EVAL_CHUNK]
            sums = [F.cross_entropy(chunk, y, reduction="sum").double(), (chunk.argmax(1) != y).sum().double()]
            if num_classes > 5:
                sums.append((~(chunk.topk(5, dim=1).indices == y[:, None]).any(1)).sum().double())
            totals.append(torch.stack(sums))
        if comm is None:
            loss, errors, *top5 = torch.stack(totals).sum(0).tolist()  # one read of the device
        else:
            width = 3 if num_classes > 5 else 2
            local = torch.stack(totals).sum(0).cpu() if totals else torch.zeros(width, dtype=torch.float64)
            loss, errors, *top5, n = comm.sum_(torch.cat([local, torch.tensor([float(n)], dtype=torch.float64)])).tolist()
    result = {"error": errors / n, "loss": loss / n}
    if num_classes > 5:
        result["top5"] = top5[0] / n
    return result
