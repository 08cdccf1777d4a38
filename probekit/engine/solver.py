"""The probes' solver: L-BFGS on many softmax regressions at once, on their device.

A :class:`Problem` is one L2-regularised softmax regression on standardised
features ``z`` (``(n, d)``), with weights in preconditioned coordinates
``W = W' P`` (:class:`Whitening`). :func:`minimize` advances a list of them
together, one round at a time: every round evaluates each problem once, at a
trial step, then accepts or shortens the step of each, updates each one's
L-BFGS memory and takes each one's next direction. Every decision of a round
is a tensor operation over all problems at once (``torch.where`` on a
per-problem mask), so no round needs the host: on CUDA the loop reads the
convergence flags back only every :data:`CHECK_EVERY` rounds, and on the CPU
(where reading a flag costs nothing) after every round, to stop evaluating a
problem as soon as it has converged. The same code runs on both.

The method is the one scikit-learn's ``lbfgs`` solver runs through SciPy
(L-BFGS with :data:`MEMORY` pairs, the first step scaled to unit length),
with a backtracking Armijo line search in place of SciPy's Wolfe search: a
trial step that does not decrease the loss enough is shortened (quadratic
interpolation, within a factor 0.1-0.5) and tried in the next round, while
the other problems move on. A problem stops when

- the largest entry of its *true* gradient (in ``W``, whatever the
  preconditioner) is within ``tol`` (converged);
- a step lowers its loss by less than a relative :data:`_FTOL` (converged: the
  loss cannot see a further decrease, as SciPy's ``ftol`` test);
- its step has shrunk below :data:`_MIN_STEP` without a decrease, or it has
  taken ``max_iter`` iterations (not converged, unless its gradient meets
  ``tol``).

The problems' parameters live in one ``(problems, width)`` float64 matrix,
each row a problem's flattened ``(W', b)`` padded with zeros; the L-BFGS
memory is ``MEMORY`` such matrices, one ring for every problem (a round in
which a problem gains no pair leaves a hole in its memory, which the
recursion skips). Once a quarter of a group's problems have stopped, their
rows leave the matrices. Problems are solved in groups, by size, of at most
:data:`_GROUP_ELEMENTS` parameters on the CPU (rows times width) and
:data:`_DEVICE_GROUP_ELEMENTS` on a GPU, so that memory stays bounded however
many layers a run has; the grouping depends only on the problems' sizes and
the device. On the CPU, groups of similar weight run side by side on the
workers, each single-threaded; a group that outweighs the others runs alone,
its row blocks shared by the workers.

The losses are computed by torch: two matrix products per evaluation, in row
blocks (:attr:`Problem.blocks`) summed in a fixed order, on a pool of
single-threaded workers on the CPU or on the device's stream on a GPU; the
loss is summed in float64, and problems of at most :data:`FLOAT64_ELEMENTS`
feature entries are evaluated in float64 throughout.

Data-parallel fits (several ranks, each holding a shard of the rows): a
problem made with ``reduce=`` (a function summing a tensor over every rank in
place) and ``rows=`` (the rows of every rank) has the whole problem's loss
and gradient on every rank: :func:`minimize` sums every live problem's row
sums with one call of ``reduce`` per round, and runs the groups one after
another, so that every rank makes the same calls in the same order and the
same decisions from the same sums.

This module works on feature tensors only; it imports nothing of probekit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor

import numpy as np
import torch

__all__ = ["CHECK_EVERY", "FLOAT64_ELEMENTS", "MEMORY", "Problem", "Whitening", "minimize"]

#: L-BFGS memory: the pairs of steps and gradient changes kept per problem.
MEMORY = 10
#: Rounds between two reads of the convergence flags on a GPU (every round on the CPU).
CHECK_EVERY = 8
#: Largest feature matrix (examples x features) evaluated in float64. Near the optimum of a small,
#: low-variance problem (a 3-feature head on 64 examples) float32 losses are too coarse for the line
#: search to see the last decrease; at this size float64 costs nothing that matters.
FLOAT64_ELEMENTS = 2**18
#: Largest group of problems solved together on the CPU, in parameters (rows x padded width); a larger problem is
#: its own group. Groups are what the CPU's workers share out, so they are small; their number depends on the
#: problems' sizes only, never on the threads.
_GROUP_ELEMENTS = 2**16
#: The same on a GPU, where a group is solved with one launch per operation for all its problems.
_DEVICE_GROUP_ELEMENTS = 2**22
#: Armijo's sufficient-decrease constant.
_ARMIJO = 1e-4
#: A step that lowers the loss by less than this, relative to the loss, ends the problem (SciPy's ``64 eps``).
_FTOL = 64 * float(np.finfo(float).eps)
#: A trial step shorter than this (relative to the first, unit-length one) ends the line search.
_MIN_STEP = 1e-12
#: Fewest elements of a row block evaluated on a worker thread (smaller ones run on the calling thread).
_POOL_ELEMENTS = 2**18
#: Largest number of top feature-covariance directions the preconditioner whitens.
_PRECONDITION_RANK = 64
#: Rows of the random sample the preconditioner's sketch is computed on.
_SKETCH_ROWS = 2048


class Problem:
    """One softmax regression: ``mean CE(z W^T + b, labels) + l2 / 2 ||W||^2`` over ``W = W' P``.

    Args:
        z: ``(n, d)`` standardised features (any float dtype; float64 is used at
            most :data:`FLOAT64_ELEMENTS` entries, float32 otherwise).
        labels: ``(n,)`` int64 class labels, on ``z``'s device.
        num_classes: ``K``.
        l2: the L2 strength on ``W``.
        whitening: the preconditioner's directions (:class:`Whitening`), used at ``l2``.
        blocks: how many row blocks the loss is summed over, in order (the same sums whoever computes them).
        rows: the rows of the whole problem when ``z`` is one rank's shard of them (default: ``z``'s).
        reduce: sums a tensor over every rank in place (with ``rows``); ``None`` in a single process.
    """

    def __init__(self, z: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, whitening: Whitening,
                 blocks: int = 1, *, rows: int | None = None, reduce: Callable[[torch.Tensor], object] | None = None):
        # The whole problem's size decides, so that every rank computes in the dtype one process would.
        elements = z.numel() if rows is None else int(rows) * z.shape[1]
        dtype = torch.float64 if elements <= FLOAT64_ELEMENTS else torch.float32
        self.z = z.to(dtype)
        self.labels, self.k, self.l2 = labels, num_classes, float(l2)
        self.n, self.d = z.shape
        local = self.n
        if rows is not None:
            self.n = int(rows)
        self.reduce = reduce
        self.precondition, self.undo = whitening.at(self.l2, num_classes)
        bounds = np.linspace(0, local, max(1, blocks) + 1).astype(int)
        self.blocks = [(self.z[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    @property
    def size(self) -> int:
        """The number of parameters, ``K * d`` weights and ``K`` biases."""
        return self.k * self.d + self.k

    def start(self) -> torch.Tensor:
        """Zero weights and the class log-frequencies as biases: the optimum when features carry nothing."""
        counts = torch.bincount(self.labels, minlength=self.k).double()
        if self.reduce is not None:
            self.reduce(counts)
        counts = counts.clamp_min(0.5)
        theta = torch.zeros(self.size, dtype=torch.float64, device=self.z.device)
        theta[self.k * self.d:] = counts.log() - counts.log().mean()
        return theta

    def warm(self, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """Parameters (in this problem's coordinates) of true weights ``weight`` ``(K, d)`` and ``bias``."""
        prime = self.undo(weight.to(self.z.dtype))
        return torch.cat([prime.reshape(-1).double(), bias.double()])

    def weights(self, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """True ``(W, b)`` (``(K, d)``, ``(K,)``, in the problem's dtype) of parameters ``theta``."""
        kd = self.k * self.d
        weight = self.precondition(theta[:kd].to(self.z.dtype).view(self.k, self.d))
        return weight, theta[kd:self.size].to(self.z.dtype)

    def begin(self, theta: torch.Tensor, pool: Executor | None):
        """Start evaluating at ``theta``: large row blocks go to ``pool``'s workers; :meth:`finish` collects them."""
        weight, bias = self.weights(theta)
        run = [pool.submit(_loss_terms, z, y, weight, bias) if pool is not None and z.numel() >= _POOL_ELEMENTS
               else None for z, y in self.blocks]
        return weight, bias, run

    def finish(self, started) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss (float64, 0-d), preconditioned gradient (float64, ``(size,)``) and largest true-gradient entry (0-d).

        Returns tensors only: nothing here waits for the device.
        """
        return self.complete(*self.sums(started))

    def sums(self, started) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weight, summed log-probability, weight gradient sum, bias gradient sum)`` over this process's rows."""
        weight, bias, run = started
        if not self.blocks:  # a rank without rows of this problem adds nothing
            return (weight, torch.zeros((), dtype=torch.float64, device=weight.device), torch.zeros_like(weight),
                    torch.zeros_like(bias))
        terms = [_loss_terms(z, y, weight, bias) if future is None else future.result()
                 for future, (z, y) in zip(run, self.blocks)]
        picked, grad_w, grad_b = terms[0]
        for term in terms[1:]:  # in block order
            picked, grad_w, grad_b = picked + term[0], grad_w + term[1], grad_b + term[2]
        return weight, picked, grad_w, grad_b

    def complete(self, weight: torch.Tensor, picked: torch.Tensor, grad_w: torch.Tensor,
                 grad_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`finish` from the sums over every row."""
        grad_w = grad_w / self.n + self.l2 * weight
        grad_b = grad_b / self.n
        loss = -picked / self.n + 0.5 * self.l2 * weight.double().pow(2).sum()
        gmax = torch.maximum(grad_w.abs().max(), grad_b.abs().max()).double()
        grad = torch.cat([self.precondition(grad_w).reshape(-1).double(), grad_b.double()])
        return loss, grad, gmax

    def evaluate(self, theta: torch.Tensor, pool: Executor | None = None):
        """:meth:`finish` of :meth:`begin`."""
        return self.finish(self.begin(theta, pool))


def _loss_terms(z: torch.Tensor, labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor):
    """For a block of rows: the summed log-probability of the labels (float64, 0-d), and the
    unnormalised weight and bias gradients of the summed cross-entropy."""
    rows = torch.arange(labels.shape[0], device=z.device)
    logp = torch.log_softmax(torch.addmm(bias[:, None], weight, z.T), dim=0)  # (classes, rows)
    picked = logp[labels, rows].double().sum()
    residual = logp.exp_()
    residual[labels, rows] -= 1
    return picked, residual @ z, residual.sum(1)


def minimize(problems: Sequence[Problem], starts: Sequence[torch.Tensor], *, tol: float | Sequence[float], max_iter: int,
             pool: Executor | None = None, check_every: int | None = None,
             stats: dict | None = None) -> list[tuple[torch.Tensor, int, bool]]:
    """Minimise every problem from its start; ``[(theta, iterations, converged)]`` in order.

    Args:
        problems: on one device.
        starts: each problem's parameters (``(size,)`` float64, e.g.
            :meth:`Problem.start` or :meth:`Problem.warm`).
        tol, max_iter: the stopping rules of the module's docstring; ``tol`` may give each problem its own.
        pool: single-threaded CPU workers for the large row blocks.
        check_every: rounds between reads of the convergence flags; by default
            1 on the CPU and :data:`CHECK_EVERY` on other devices. The answer
            does not depend on it: a converged problem is frozen by its mask.
        stats: a dict to add ``rounds`` (evaluation rounds) and ``reads``
            (host reads of device values) to.
    """
    stats = {} if stats is None else stats
    stats.setdefault("rounds", 0)
    stats.setdefault("reads", 0)
    if not problems:
        return []
    tols = [float(tol)] * len(problems) if isinstance(tol, (int, float)) else [float(t) for t in tol]
    on_cpu = problems[0].z.device.type == "cpu"
    groups = _groups([p.size for p in problems], _GROUP_ELEMENTS if on_cpu else _DEVICE_GROUP_ELEMENTS)
    work = [sum(problems[i].z.numel() for i in group) for group in groups]
    each = [{"rounds": 0, "reads": 0} for _ in groups]

    def run(j: int, blocks_pool: Executor | None) -> list:
        group = groups[j]
        return _minimize([problems[i] for i in group], [starts[i] for i in group], tol=[tols[i] for i in group],
                         max_iter=max_iter, pool=blocks_pool, check_every=check_every, stats=each[j])

    # Several groups of similar weight run side by side, one per worker, each single-threaded; otherwise
    # one after another, with the row blocks of each on the workers. Either way the same arithmetic.
    # Data-parallel problems run their groups in order: every rank must reduce the same sums in the same order.
    if pool is None or len(groups) == 1 or 2 * max(work) > sum(work) or problems[0].reduce is not None:
        answers = [run(j, pool) for j in range(len(groups))]
    else:
        futures = {j: pool.submit(run, j, None) for j in sorted(range(len(groups)), key=lambda j: -work[j])}
        answers = [futures[j].result() for j in range(len(groups))]
    out: list = [None] * len(problems)
    for group, answer, counts in zip(groups, answers, each):
        for i, result in zip(group, answer):
            out[i] = result
        stats["rounds"] += counts["rounds"]
        stats["reads"] += counts["reads"]
    return out


def _reduced(problems: Sequence[Problem], live: Sequence[int], started: dict) -> dict:
    """Every live problem's :meth:`Problem.finish` from the sums over every rank: one ``reduce`` call for all."""
    sums = {i: problems[i].sums(started[i]) for i in live}
    flat = torch.cat([torch.cat([picked.reshape(1).double(), grad_w.reshape(-1).double(), grad_b.reshape(-1).double()])
                      for _, picked, grad_w, grad_b in sums.values()])
    problems[live[0]].reduce(flat)
    out, at = {}, 0
    for i, (weight, _, grad_w, grad_b) in sums.items():
        kd, k = grad_w.numel(), grad_b.numel()
        picked = flat[at]
        total_w = flat[at + 1:at + 1 + kd].view_as(grad_w).to(grad_w.dtype)
        total_b = flat[at + 1 + kd:at + 1 + kd + k].to(grad_b.dtype)
        at += 1 + kd + k
        out[i] = problems[i].complete(weight, picked, total_w, total_b)
    return out


def _groups(sizes: Sequence[int], bound: int = 2**16) -> list[list[int]]:
    """Indices of problems solved together: by size, at most ``bound`` padded parameters each."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], i))
    groups, current = [], []
    for i in order:  # ascending sizes: the group's width is its last problem's size
        if current and (len(current) + 1) * sizes[i] > bound:
            groups.append(current)
            current = []
        current.append(i)
    return groups + ([current] if current else [])


def _minimize(problems: Sequence[Problem], starts: Sequence[torch.Tensor], *, tol: Sequence[float], max_iter: int,
              pool: Executor | None, check_every: int | None, stats: dict) -> list[tuple[torch.Tensor, int, bool]]:
    device = problems[0].z.device
    count, width = len(problems), max(p.size for p in problems)
    if check_every is None:
        check_every = 1 if device.type == "cpu" else CHECK_EVERY
    tol = torch.tensor(tol, dtype=torch.float64, device=device)  # each problem's
    x = torch.zeros(count, width, dtype=torch.float64, device=device)
    for i, start in enumerate(starts):
        x[i, :problems[i].size] = start.to(device=device, dtype=torch.float64)

    def evaluate(theta: torch.Tensor, live: Sequence[int], f, grad, gmax):
        """Every live problem's loss, gradient and true-gradient maximum at ``theta``; the others' as given."""
        losses, grads, maxima = list(f.unbind()), list(grad.unbind()), list(gmax.unbind())
        started = {i: problems[i].begin(theta[i, :problems[i].size], pool) for i in live}  # every block under way
        done = _reduced(problems, live, started) if problems[0].reduce is not None else {}
        for i in live:
            p = problems[i]
            loss, g, m = done[i] if done else p.finish(started[i])
            losses[i], maxima[i] = loss, m
            grads[i] = torch.nn.functional.pad(g, (0, width - p.size)) if p.size < width else g
        return torch.stack(losses), torch.stack(grads), torch.stack(maxima)

    everyone = range(count)
    nothing = torch.zeros(count, dtype=torch.float64, device=device)
    f, grad, gmax = evaluate(x, everyone, nothing, torch.zeros_like(x), nothing)
    active = torch.isfinite(f) & (gmax > tol)
    converged = gmax <= tol
    iterations = torch.zeros(count, dtype=torch.long, device=device)
    steps = torch.zeros(MEMORY, count, width, dtype=torch.float64, device=device)
    changes = torch.zeros_like(steps)
    rho = torch.zeros(MEMORY, count, dtype=torch.float64, device=device)
    gamma = torch.zeros(count, dtype=torch.float64, device=device)  # scale of the initial inverse Hessian
    has_pair = torch.zeros(count, dtype=torch.bool, device=device)
    head = 0
    unit = (1 / grad.norm(dim=1).clamp_min(1e-300)).clamp(max=1.0)
    direction, step = -grad * unit[:, None], torch.ones(count, dtype=torch.float64, device=device)
    slope = (grad * direction).sum(1)
    live = list(everyone)
    rows = list(everyone)  # the problem of each row of the state
    out: list = [None] * count
    for round_ in range(max_iter * 40 + 10):  # a bound the stopping rules always meet first
        if round_ % check_every == 0:
            live = active.nonzero().flatten().tolist()
            stats["reads"] += 1
            if not live:
                break
            if 4 * len(live) <= 3 * len(rows):  # a quarter of the rows or more have stopped: drop them
                converged = converged | (gmax <= tol)
                done = active.logical_not().nonzero().flatten().tolist()
                for i, (iters, ok) in zip(done, zip(iterations[done].tolist(), converged[done].tolist())):
                    out[rows[i]] = (x[i, :problems[i].size].clone(), iters, bool(ok))
                keep_rows = torch.tensor(live, device=device)
                x, f, grad, gmax, tol, active, converged, iterations, gamma, has_pair, direction, step, slope = (
                    t.index_select(0, keep_rows) for t in (x, f, grad, gmax, tol, active, converged, iterations,
                                                           gamma, has_pair, direction, step, slope))
                steps, changes, rho = (t.index_select(1, keep_rows) for t in (steps, changes, rho))
                problems, rows = [problems[i] for i in live], [rows[i] for i in live]
                live = list(range(len(rows)))
        stats["rounds"] += 1
        trial = x + step[:, None] * direction
        f_new, grad_new, gmax_new = evaluate(trial, live, f, grad, gmax)
        finite = torch.isfinite(f_new)
        accept = active & finite & (f_new <= f + _ARMIJO * step * slope)
        # The pair (s, y) of an accepted step enters the memory when its curvature is positive. The memory is a
        # ring shared by every problem: each round writes one slot, a hole (rho = 0, no effect) for a problem
        # without a new pair.
        s, y = trial - x, grad_new - grad
        sy, yy = (s * y).sum(1), (y * y).sum(1)
        keep = accept & (sy > 1e-10 * yy)
        head = (head + 1) % MEMORY
        steps[head] = s.masked_fill_(~keep[:, None], 0.0)
        changes[head] = y.masked_fill_(~keep[:, None], 0.0)
        rho[head] = torch.where(keep, 1 / sy.clamp_min(1e-300), 0.0)
        gamma = torch.where(keep, sy / yy.clamp_min(1e-300), gamma)
        has_pair = has_pair | keep
        flat = accept & ((f - f_new) <= _FTOL * torch.maximum(torch.maximum(f.abs(), f_new.abs()), torch.ones_like(f)))
        x = torch.where(accept[:, None], trial, x)
        f, grad, gmax = torch.where(accept, f_new, f), torch.where(accept[:, None], grad_new, grad), \
            torch.where(accept, gmax_new, gmax)
        iterations = iterations + accept.long()
        # Rejected: shorten the step (the minimum of the quadratic through f, the slope and f_new).
        excess = (f_new - f - step * slope).clamp_min(1e-300)
        shrink = torch.where(finite, (-slope * step / (2 * excess)).clamp(0.1, 0.5), torch.full_like(step, 0.1))
        step = torch.where(accept, torch.ones_like(step), torch.where(active, step * shrink, step))
        # Accepted: the next direction, -H grad by the two-loop recursion over the memory (empty pairs have rho = 0).
        newest_first = [(head - i) % MEMORY for i in range(MEMORY)]
        q, alphas = grad.clone(), {}
        for i in newest_first:
            alphas[i] = rho[i] * torch.linalg.vecdot(steps[i], q)
            q.sub_(alphas[i][:, None] * changes[i])
        scale = torch.where(has_pair, gamma, (1 / grad.norm(dim=1).clamp_min(1e-300)).clamp(max=1.0))
        r = q.mul_(scale[:, None])
        for i in reversed(newest_first):
            beta = rho[i] * torch.linalg.vecdot(changes[i], r)
            r.add_((alphas[i] - beta)[:, None] * steps[i])
        new_slope = -(grad * r).sum(1)
        uphill = ~(new_slope < 0)  # lost descent (float noise): restart from the scaled gradient, memory cleared
        restart = -grad * (1 / grad.norm(dim=1).clamp_min(1e-300)).clamp(max=1.0)[:, None]
        fresh = torch.where(uphill[:, None], restart, -r)
        lost = accept & uphill
        rho.masked_fill_(lost[None], 0.0)
        has_pair = has_pair & ~lost
        direction = torch.where(accept[:, None], fresh, direction)
        slope = torch.where(accept, (grad * direction).sum(1), slope)
        converged = converged | (accept & ((gmax <= tol) | flat))
        stuck = active & ~accept & (step < _MIN_STEP)
        active = active & ~converged & ~stuck & (iterations < max_iter)
    converged = converged | (gmax <= tol)
    done = list(zip(iterations.tolist(), converged.tolist()))
    stats["reads"] += 1
    for i, (p, (iters, ok)) in enumerate(zip(problems, done)):
        out[rows[i]] = (x[i, :p.size].clone(), iters, bool(ok))
    return out


class Whitening:
    """The top covariance directions of ``z``, and preconditioners ``W = W' P`` from them.

    ``P = I + V diag(s - 1) V^T`` with ``V`` the top eigenvectors of ``z^T z / n``
    (found with two power iterations of a seeded random sketch). The optimum in
    ``W`` is unchanged; only the path to it is shorter. :meth:`at` accounts for
    the L2 term: the loss's curvature along a direction of covariance ``e`` is
    about ``c e + l2`` with ``c = (1 - 1/K) / K`` (softmax at its start), so
    ``s = sqrt((c floor + l2) / (c e + l2))``, where ``floor`` is the largest of
    1 (the mean eigenvalue of standardised features) and the smallest eigenvalue
    found; at ``l2 = 0`` that is the plain whitening. Strong L2 makes the
    problem round already, and whitening it anyway would stretch the penalty's
    curvature instead: at the path's strong end that costs 2-3x the iterations.
    """

    def __init__(self, directions: torch.Tensor | None, top: torch.Tensor | None, floor: float):
        self.directions, self.top, self.floor = directions, top, floor

    @classmethod
    def of(cls, z: torch.Tensor, *, rows: int | None = None,
           reduce: Callable[[torch.Tensor], object] | None = None) -> Whitening:
        """The directions of ``z``; with ``reduce`` (``z`` one rank's rows of ``rows``), of every rank's rows,
        from the products ``z^T z B`` summed over the ranks (no sample of rows)."""
        n, d = z.shape
        if rows is not None:
            n = int(rows)
        rank = min(_PRECONDITION_RANK, d // 8, n // 8)
        if rank < 8:
            return cls(None, None, 1.0)
        z = z.float()
        generator = torch.Generator(device=z.device).manual_seed(0)
        if reduce is None and n > _SKETCH_ROWS:  # the top directions are well estimated from a few thousand rows
            z = z[torch.randperm(n, generator=generator, device=z.device)[:_SKETCH_ROWS]]
            n = z.shape[0]
        basis = torch.randn(d, rank + 8, generator=generator, device=z.device)
        for _ in range(2):  # power iterations
            product = (z @ basis).T.matmul(z).T
            if reduce is not None:
                reduce(product)
            basis = torch.linalg.qr(product).Q
        sketch = z @ basis
        covariance = sketch.T @ sketch
        if reduce is not None:
            reduce(covariance)
        values, vectors = torch.linalg.eigh(covariance / n)
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
