"""The linear probe and its solvers.

A probe is L2-regularised softmax regression on one layer's (reduced)
features: ``p(y | h) = softmax(W z + b)`` with ``z`` the features
standardised on the training split. The objective

    mean cross-entropy + l2 / 2 * ||W||^2

is convex, so a probe has one optimum; :func:`fit_probe` (one layer) and
:func:`fit_probes` (every layer of a run) find it with full-batch L-BFGS and
report whether it met its tolerance. It is the same problem as scikit-learn's
``LogisticRegression(C=1 / (n * l2))`` on standardised features.

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

:class:`OnlineProbes` is the cheap alternative for monitoring: one optimiser
step per model training step on that batch's detached features.

This module owns the probes and their solvers; it works on feature tensors
only, so it imports no model-side part of the engine (only
:mod:`~probekit.engine.devices`, for thread counts), and never the run store,
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
from torch import nn
from torch.nn import functional as F

from probekit.engine.devices import torch_threads

__all__ = ["DEFAULT_L2", "OnlineProbes", "ProbeFit", "fit_probe", "fit_probes", "score", "standardiser"]

#: Default L2 strength (on standardised features, mean loss).
DEFAULT_L2 = 1e-3
_EVAL_CHUNK = 8192
#: Largest number of top feature-covariance directions the preconditioner whitens.
_PRECONDITION_RANK = 64
#: Fewest elements (examples x features) of a layer fitted in parallel with others, and
#: of each row block when one fit is split across threads.
_MIN_PARALLEL_ELEMENTS = 2**21
#: Rows of the random sample the preconditioner's sketch is computed on.
_SKETCH_ROWS = 2048
_STATS_ROWS = 1024


@dataclass
class ProbeFit:
    """A fitted probe: standardisation, weights, and how the solver ended."""

    mean: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor  # (features, classes), on standardised features
    bias: torch.Tensor
    iterations: int
    converged: bool

    def logits(self, features: torch.Tensor) -> torch.Tensor:
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
    l2: float = DEFAULT_L2,
    max_iter: int = 1000,
    tol: float = 1e-5,
) -> ProbeFit:
    """Fit one probe to its optimum with full-batch L-BFGS.

    The loss and its analytic gradient are computed by torch (float32, on the
    features' device; on the CPU, row blocks on one single-threaded worker per
    core); SciPy's L-BFGS-B drives the iterations, as in scikit-learn's
    ``lbfgs`` solver.

    Args:
        features: ``(n, d)`` float tensor of one layer's training features.
        labels: ``(n,)`` integer class labels in ``[0, num_classes)``.
        num_classes: number of classes ``K``.
        l2: L2 strength on the weights (not the bias), per example.
        max_iter: most L-BFGS iterations.
        tol: stop when the largest gradient entry is below this.

    Example:
        >>> fit = fit_probe(torch.randn(100, 8), torch.randint(0, 3, (100,)), 3)
        >>> fit.logits(torch.randn(5, 8)).shape
        torch.Size([5, 3])
    """
    return fit_probes({"probe": features}, labels, num_classes, l2=l2, max_iter=max_iter, tol=tol)["probe"]


def fit_probes(
    features: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    *,
    l2: float = DEFAULT_L2,
    max_iter: int = 1000,
    tol: float = 1e-5,
) -> dict[str, ProbeFit]:
    """Fit one probe per layer, each to its optimum as :func:`fit_probe` does.

    On the CPU, large layers are fitted in parallel, one per worker thread
    (``torch.get_num_threads()`` workers, each running torch single-threaded)
    and small ones one after another; the results are the same as fitting
    them one by one.

    Args:
        features: ``{layer: (n, d_layer) float tensor}``, all on one device.
        labels: ``(n,)`` integer class labels in ``[0, num_classes)``.
        num_classes, l2, max_iter, tol: as for :func:`fit_probe`.

    Returns:
        ``{layer: ProbeFit}``, in the order of ``features``.

    Example:
        >>> fits = fit_probes({"a": torch.randn(100, 8), "b": torch.randn(100, 4)}, torch.randint(0, 3, (100,)), 3)
        >>> sorted(fits)
        ['a', 'b']
    """
    if not features:
        return {}
    labels = labels.long()
    on_cpu = all(x.device.type == "cpu" for x in features.values())
    threads = torch.get_num_threads() if on_cpu else 1
    solve = dict(num_classes=num_classes, l2=l2, max_iter=max_iter, tol=tol)
    # A small fit is many tiny steps: run in parallel, its threads would mostly wait for
    # each other (the GIL between steps); a large one spends its time in products.
    large = [name for name, x in features.items() if x.numel() >= _MIN_PARALLEL_ELEMENTS]
    with _single_threaded_blas(), _single_threaded_torch(threads) as pool:
        if pool is None or len(large) < 2:
            return {name: _fit_one(x, labels, pool=pool, parts=threads, **solve) for name, x in features.items()}
        fits = {name: _fit_one(x, labels, pool=None, parts=1, **solve) for name, x in features.items() if name not in large}
        # Largest layers first, so that no worker is left with a big one at the end.
        order = sorted(large, key=lambda name: -features[name].numel())
        futures = {name: pool.submit(_fit_one, features[name], labels, pool=None, parts=1, **solve) for name in order}
        fits.update({name: future.result() for name, future in futures.items()})
        return {name: fits[name] for name in features}


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


def _fit_one(
    features: torch.Tensor, labels: torch.Tensor, *, num_classes: int, l2: float, max_iter: int, tol: float,
    pool: Executor | None, parts: int,
) -> ProbeFit:
    """One probe: standardise, precondition, then L-BFGS-B on the loss of :func:`_loss_terms`."""
    from scipy.optimize import minimize

    features = features.float()
    mean, scale, z = _standardise(features, pool=pool)
    n, d = z.shape
    k = num_classes
    labels = labels.to(z.device)
    parts = max(1, min(parts, n * d // _MIN_PARALLEL_ELEMENTS)) if pool is not None else 1
    bounds = np.linspace(0, n, parts + 1).astype(int)
    blocks = [(z[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    with torch_threads(parts) if pool is not None else nullcontext():  # a few large products: threads pay
        precondition = _preconditioner(z)

    def to_weight(flat: torch.Tensor) -> torch.Tensor:
        return precondition(flat[: d * k].view(k, d))

    last: dict[str, object] = {}

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        flat = torch.from_numpy(theta).to(device=z.device, dtype=torch.float32)
        weight, bias = to_weight(flat), flat[d * k:]
        # This thread takes the first row block, the pool the others.
        futures = [pool.submit(_loss_terms, zb, yb, weight, bias) for zb, yb in blocks[1:]]
        terms = [_loss_terms(*blocks[0], weight, bias)] + [future.result() for future in futures]
        picked = sum(t[0] for t in terms)
        grad_w = sum(t[1] for t in terms) / n
        grad_b = sum(t[2] for t in terms) / n
        grad_w.add_(weight, alpha=l2)
        loss = -picked / n + 0.5 * l2 * float(weight.double().pow(2).sum())
        last["theta"], last["gmax"] = theta, max(float(grad_w.abs().max()), float(grad_b.abs().max()))
        grad = torch.cat([precondition(grad_w).reshape(-1), grad_b])
        return loss, grad.double().cpu().numpy()

    iterations = [0]

    def stop_when_converged(xk: np.ndarray) -> None:
        # The test is on the gradient of the true weights, whatever the preconditioner.
        iterations[0] += 1
        if last["gmax"] <= tol and np.array_equal(xk, last["theta"]):
            raise StopIteration

    start = np.zeros(d * k + k)
    counts = torch.bincount(labels, minlength=k).double().clamp_min(0.5)
    prior = counts.log() - counts.log().mean()
    start[d * k:] = prior.cpu().numpy()  # class log-frequencies: the optimum when features carry nothing
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
    flat = torch.from_numpy(solution).to(device=z.device, dtype=torch.float32)
    weight = to_weight(flat)
    return ProbeFit(
        mean=mean, scale=scale, weight=weight.T.contiguous(), bias=flat[d * k:].clone(), iterations=iterations[0],
        converged=bool(last["gmax"] <= tol or scipy_converged),
    )


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
    n, d = z.shape
    rank = min(_PRECONDITION_RANK, d // 8, n // 8)
    if rank < 8:
        return lambda matrix: matrix
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
        return lambda matrix: matrix
    floor = max(float(values[0]), 1.0)
    top = values[-rank:]
    directions = basis @ vectors[:, -rank:]  # (d, rank), orthonormal
    shift = torch.sqrt(floor / top.clamp_min(floor)) - 1  # in (-1, 0]

    def apply(matrix: torch.Tensor) -> torch.Tensor:
        return matrix + ((matrix @ directions) * shift) @ directions.T

    return apply


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


class OnlineProbes(nn.Module):
    """One probe per layer, each taking one step per model training step.

    Features are standardised by a running ``BatchNorm1d`` (no affine part);
    the probes train with Adam and their own L2 weight decay, never touching
    the model.
    """

    def __init__(self, dims: dict[str, int], num_classes: int, *, lr: float = 1e-3, l2: float = DEFAULT_L2):
        super().__init__()
        self.names = list(dims)
        self.num_classes = num_classes
        self.probes = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(d, affine=False), nn.Linear(d, num_classes)) for d in dims.values()
        )
        for probe in self.probes:
            nn.init.zeros_(probe[1].weight)
            nn.init.zeros_(probe[1].bias)
        # Adam's weight_decay adds l2 * W to the gradient: the L2 term of the loss, without computing it.
        weights = [probe[1].weight for probe in self.probes]
        biases = [probe[1].bias for probe in self.probes]
        self.optimizer = torch.optim.Adam([{"params": weights, "weight_decay": l2}, {"params": biases}], lr=lr,
                                          foreach=True)
        self.steps = 0
        self.reset_running()

    def reset_running(self) -> None:
        """Clear the running train metrics (called at the start of each epoch)."""
        self.running = {name: {"error": 0.0, "loss": 0.0, "top5": 0.0, "n": 0} for name in self.names}

    def step(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """One optimiser step for every probe on one batch's detached features.

        The probes' operations are small, so they run single-threaded (split
        across cores they would mostly wait for each other; see
        :func:`probekit.engine.devices.torch_threads`); the finiteness checks, losses
        and running metrics of all probes are computed together, and the L2
        term is the optimiser's weight decay on the weights.
        """
        self.train()
        self.optimizer.zero_grad()
        with torch_threads(1), torch.enable_grad():
            inputs = [features[name].detach().float() for name in self.names]
            with torch.no_grad():  # NaN and Inf propagate to a sum; one sync for every probe
                finite = torch.stack([x.sum() for x in inputs]).isfinite().tolist()
            # A float32 sum can overflow on large finite values: those get an exact check.
            finite = [ok or math.isfinite(x.sum(dtype=torch.float64)) for ok, x in zip(finite, inputs)]
            kept = [i for i, ok in enumerate(finite) if ok]
            if kept:
                stacked = torch.stack([self.probes[i](inputs[i]) for i in kept])  # (probes, batch, classes)
                losses = F.cross_entropy(stacked.flatten(0, 1), labels.repeat(len(kept)), reduction="none")
                losses = losses.view(len(kept), -1)
                losses.mean(1).sum().backward()
                self.optimizer.step()
                with torch.no_grad():
                    totals = {"loss": losses.sum(1), "error": (stacked.argmax(2) != labels).sum(1)}
                    if self.num_classes > 5:
                        totals["top5"] = (~(stacked.topk(5, dim=2).indices == labels[:, None]).any(2)).sum(1)
                    totals = {measure: values.tolist() for measure, values in totals.items()}
                for row, i in enumerate(kept):
                    run = self.running[self.names[i]]
                    run["n"] += labels.shape[0]
                    for measure, values in totals.items():
                        run[measure] += values[row]
        self.steps += 1

    def train_scores(self, name: str) -> dict[str, float]:
        run = self.running[name]
        n = max(run["n"], 1) if run["n"] else math.nan
        result = {"error": run["error"] / n, "loss": run["loss"] / n}
        if self.num_classes > 5:
            result["top5"] = run["top5"] / n
        return result

    def logits_of(self, name: str):
        probe = self.probes[self.names.index(name)]

        def logits(x: torch.Tensor) -> torch.Tensor:
            probe.eval()
            with torch.no_grad():
                return probe(x)
        return logits
