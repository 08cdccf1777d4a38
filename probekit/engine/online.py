"""Online probes: one optimiser step per model training step, on that batch's detached features.

:class:`OnlineProbes` is the cheap alternative to refitting every probe to
its optimum (:mod:`probekit.engine.probes`) for monitoring a model while it
trains. With ``l2="auto"`` each layer gets one head per value of
:data:`ONLINE_L2_PATH`, all stepped on every batch; each batch is scored by
every head *before* the head steps on it, so the running training loss is a
held-out (prequential) score, and the head with the lowest running loss
since the epoch began is the one whose scores and logits are reported
(``OnlineProbes.l2_of``).

Data-parallel (``comm=``, a model trained with ``DistributedDataParallel``):
each rank's hooks feed the probes its own batches; every step standardises
with the batch statistics of every rank's batch together and sums the probes'
gradients over the ranks (two all-reduces per step), so the probes stay the
same on every rank and take the step one process would take on the union of
the ranks' batches. The running scores stay per rank until
:meth:`OnlineProbes.sum_running` sums them.

Like the probes module, it works on feature tensors only: it imports
:mod:`~probekit.engine.probes` (the L2 defaults and checks),
:mod:`~probekit.engine.distributed` (the sums over ranks),
:mod:`~probekit.engine.devices` and :mod:`probekit.params`, and never the
model side, the run store, the diagnosis, the charts or the explorers.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from probekit.engine.devices import torch_threads
from probekit.engine.distributed import Collective
from probekit.engine.probes import _L2_CONSTRAINTS, DEFAULT_L2, FALLBACK_L2
from probekit.params import check_params

__all__ = ["ONLINE_L2_PATH", "OnlineProbes"]

#: The heads of :class:`OnlineProbes` with ``l2="auto"``.
ONLINE_L2_PATH = (1e-4, 1e-3, 1e-2, 1e-1)


class OnlineProbes(nn.Module):
    """One probe per layer, each taking one step per model training step.

    Features are standardised by a running ``BatchNorm1d`` (no affine part);
    the probes train with Adam and their own L2 weight decay, never touching
    the model. With ``l2="auto"`` each layer has one head per value of
    :data:`ONLINE_L2_PATH` (one ``Linear`` with ``heads x classes`` outputs),
    every head stepped on every batch with its own decay; since a batch is
    scored before any head steps on it, the running loss is a held-out score,
    and the head with the lowest one since :meth:`reset_running` (ties: the
    stronger L2) is the layer's probe (:meth:`l2_of`, :meth:`train_scores`,
    :meth:`logits_of`).

    :meth:`step` is one fused update of every probe: the softmax gradient is
    written in closed form (no autograd graph), every layer's losses, scores and
    gradients are computed on one stacked tensor, the optimiser is Adam's fused
    kernel where the device has one, and the running totals stay on the device
    (read when a score is asked for).
    """

    def __init__(self, dims: dict[str, int], num_classes: int, *, lr: float = 1e-3, l2: float | str = DEFAULT_L2,
                 comm: Collective | None = None):
        super().__init__()
        self.comm = comm
        check_params(_L2_CONSTRAINTS, l2=l2)
        self.names = list(dims)
        self.num_classes = num_classes
        self.l2_path = tuple(sorted(ONLINE_L2_PATH, reverse=True)) if l2 == "auto" else (float(l2),)
        heads = len(self.l2_path)
        self.probes = nn.ModuleList(
            nn.Sequential(nn.BatchNorm1d(d, affine=False), nn.Linear(d, heads * num_classes)) for d in dims.values()
        )
        for probe in self.probes:
            nn.init.zeros_(probe[1].weight)
            nn.init.zeros_(probe[1].bias)
        weights = [probe[1].weight for probe in self.probes]
        biases = [probe[1].bias for probe in self.probes]
        if heads == 1:
            # Adam's weight_decay adds l2 * W to the gradient: the L2 term of the loss, without computing it.
            groups = [{"params": weights, "weight_decay": self.l2_path[0]}, {"params": biases}]
        else:  # the same, head by head: l2 of each output row, added to the gradient before the step
            groups = [{"params": weights}, {"params": biases}]
        # Each output row's L2 strength (one head per row block), added to the weights' gradient by step().
        self.register_buffer("_decay", torch.tensor(self.l2_path).repeat_interleave(num_classes)[:, None],
                             persistent=False)
        self._lr, self._groups = lr, groups
        self.optimizer = self._optimizer(torch.device("cpu"))
        self.steps = 0
        # (layer, measure, head): summed losses, errors and top-5 errors since reset_running, on the probes' device.
        self.register_buffer("_totals", torch.zeros(len(self.names), 3, heads, dtype=torch.float64), persistent=False)
        self.reset_running()

    def _optimizer(self, device: torch.device) -> torch.optim.Optimizer:
        """Adam over the probes' weights and biases: the fused kernel on the CPU and CUDA, else the foreach one."""
        self._optimizer_device = device
        if device.type in ("cpu", "cuda"):
            try:
                return torch.optim.Adam(self._groups, lr=self._lr, fused=True)
            except RuntimeError:  # a torch without the device's fused kernel (CPU: before 2.4)
                pass
        return torch.optim.Adam(self._groups, lr=self._lr, foreach=True)

    def reset_running(self) -> None:
        """Clear the running train metrics (called at the start of each epoch)."""
        self._totals.zero_()
        self._seen = [0] * len(self.names)

    def sum_running(self) -> None:
        """Data-parallel: the running metrics summed over every rank, in place (call once, before reading them)."""
        if self.comm is None:
            return
        seen = torch.tensor(self._seen, dtype=torch.float64)
        self.comm.sum_(self._totals)
        self._seen = [int(v) for v in self.comm.sum_(seen).tolist()]

    @property
    def running(self) -> dict[str, dict[str, object]]:
        """The running train metrics since :meth:`reset_running`, per layer (per-head sums and the examples seen)."""
        totals = self._totals.tolist()
        out = {}
        for i, name in enumerate(self.names):
            loss, error, top5 = totals[i]
            out[name] = {"error": error, "loss": loss, "top5": top5, "n": self._seen[i]}
        return out

    def step(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """One optimiser step for every probe on one batch's detached features.

        The probes' operations are small, so they run single-threaded (split
        across cores they would mostly wait for each other; see
        :func:`probekit.engine.devices.torch_threads`). A layer whose features
        hold a NaN or an infinity is left untouched (weights, optimiser state and
        running statistics). Each batch is scored before the step; the mean
        cross-entropy's gradient is ``(softmax - onehot) / batch`` against the
        standardised features, and the L2 term is added to the weights' gradient.
        """
        self.train()
        heads, k = len(self.l2_path), self.num_classes
        with torch_threads(1), torch.no_grad():
            inputs = [features[name].detach().float() for name in self.names]
            if self.comm is not None:
                stats, finite = self._batch_stats(inputs)
            else:
                # NaN and Inf propagate to a sum; one sync for every probe
                finite = torch.stack([x.sum() for x in inputs]).isfinite().tolist()
                # A float32 sum can overflow on large finite values: those get an exact check.
                finite = [ok or math.isfinite(x.sum(dtype=torch.float64)) for ok, x in zip(finite, inputs)]
            kept = [i for i, ok in enumerate(finite) if ok]
            for i, probe in enumerate(self.probes):
                probe[1].weight.grad = probe[1].bias.grad = None  # a skipped probe takes no optimiser step
            if kept:
                device = self._totals.device
                if device != self._optimizer_device and not self.optimizer.state:
                    self.optimizer = self._optimizer(device)  # moved before its first step: the device's kernel
                batch = labels.shape[0]
                norms = [self.probes[i][0] for i in kept]
                linears = [self.probes[i][1] for i in kept]
                standard = []
                for i, norm in zip(kept, norms):
                    if self.comm is not None:
                        standard.append(_standardise_with(inputs[i], norm, *stats[i]))
                        continue
                    standard.append(F.batch_norm(inputs[i], norm.running_mean, norm.running_var, training=True,
                                                 momentum=norm.momentum, eps=norm.eps))
                torch._foreach_add_([norm.num_batches_tracked for norm in norms], 1)
                total = batch if self.comm is None else stats[kept[0]][2]
                logits = torch.stack([torch.addmm(lin.bias, x, lin.weight.t()) for lin, x in zip(linears, standard)])
                logits = logits.view(len(kept), batch, heads, k)  # (probes, batch, heads, classes)
                logp = logits.log_softmax(3)
                target = labels.view(1, batch, 1, 1).expand(len(kept), batch, heads, 1)
                losses = -logp.gather(3, target).squeeze(3)  # (probes, batch, heads)
                # d(mean loss)/d(logits), every head's loss summed: (softmax - onehot) / batch
                grad = logp.exp_()
                grad.scatter_add_(3, target, torch.full_like(target, -1, dtype=grad.dtype))
                grad = grad.div_(total).view(len(kept), batch, heads * k)
                decay = self._decay if heads > 1 else None
                for row, (lin, x) in enumerate(zip(linears, standard)):
                    weight_grad = torch.mm(grad[row].t(), x)
                    if decay is not None and self.comm is None:
                        weight_grad.addcmul_(decay, lin.weight)
                    lin.weight.grad = weight_grad
                for lin, bias_grad in zip(linears, grad.sum(1).unbind(0)):
                    lin.bias.grad = bias_grad
                if self.comm is not None:  # every rank's share of the mean gradient, summed: one all-reduce
                    grads = [g for lin in linears for g in (lin.weight.grad, lin.bias.grad)]
                    flat = self.comm.sum_(torch.cat([g.reshape(-1) for g in grads]))
                    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
                        g.copy_(part.view_as(g))
                    if decay is not None:  # the L2 term once, after the sum
                        for lin in linears:
                            lin.weight.grad.addcmul_(decay, lin.weight)
                self.optimizer.step()
                stacked = self._measures(logits, losses, labels)
                if len(kept) == len(self.names):
                    self._totals.add_(stacked)
                else:
                    self._totals.index_add_(0, torch.tensor(kept, device=device), stacked)
                for i in kept:
                    self._seen[i] += batch
        self.steps += 1

    def _batch_stats(self, inputs: list[torch.Tensor]) -> tuple[list[tuple[torch.Tensor, torch.Tensor, int]], list[bool]]:
        """Every layer's ``(mean, biased variance, rows)`` over every rank's batch, and which layers are finite on all.

        One all-reduce of each layer's float64 sums and sums of squares (a NaN or an infinity on any rank makes
        that layer's sums non-finite everywhere, so every rank skips the same layers).
        """
        sums = [torch.stack([x.sum(0, dtype=torch.float64), x.double().pow(2).sum(0)]) for x in inputs]
        count = torch.tensor([float(inputs[0].shape[0])], dtype=torch.float64, device=sums[0].device)
        flat = self.comm.sum_(torch.cat([count] + [s.reshape(-1) for s in sums]))
        rows, at, stats, finite = int(flat[0].item()), 1, [], []
        for s in sums:
            total = flat[at:at + s.numel()].view_as(s)
            at += s.numel()
            mean = total[0] / max(rows, 1)
            variance = (total[1] / max(rows, 1) - mean.pow(2)).clamp_min(0)
            stats.append((mean, variance, rows))
            finite.append(bool(torch.isfinite(total).all()))
        return stats, finite

    def _measures(self, logits: torch.Tensor, losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``(probes, measure, head)`` sums over a batch: loss, errors, top-5 errors (zeros with 5 classes or fewer)."""
        batch, dtype = labels.shape[0], self._totals.dtype
        wrong = logits.argmax(3) != labels.view(1, batch, 1)
        measures = [losses.sum(1).to(dtype), wrong.sum(1).to(dtype)]
        if self.num_classes > 5:
            top5 = ~(logits.topk(5, dim=3).indices == labels.view(1, batch, 1, 1)).any(3)
            measures.append(top5.sum(1).to(dtype))
        else:
            measures.append(torch.zeros_like(measures[0]))
        return torch.stack(measures, 1)

    def evaluate(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, list[bool]]:
        """Every head's scores on one held-out batch, without a step: ``(totals, finite)``.

        ``totals`` is ``(layer, measure, head)``: the batch's summed loss, errors
        and top-5 errors (zeros with 5 classes or fewer), in :attr:`names` order,
        NaN for a layer whose features hold a NaN or an infinity; ``finite`` says
        which layers were scored. Features are standardised by the running
        statistics, as :meth:`logits_of` does.
        """
        heads, k, batch = len(self.l2_path), self.num_classes, labels.shape[0]
        totals = torch.full((len(self.names), 3, heads), math.nan, dtype=self._totals.dtype, device=self._totals.device)
        with torch_threads(1), torch.no_grad():
            inputs = [features[name].detach().float() for name in self.names]
            finite = torch.stack([x.sum() for x in inputs]).isfinite().tolist()
            finite = [ok or math.isfinite(x.sum(dtype=torch.float64)) for ok, x in zip(finite, inputs)]
            kept = [i for i, ok in enumerate(finite) if ok]
            if kept:
                logits = []
                for i in kept:
                    norm, linear = self.probes[i]
                    x = F.batch_norm(inputs[i], norm.running_mean, norm.running_var, training=False, eps=norm.eps)
                    logits.append(torch.addmm(linear.bias, x, linear.weight.t()))
                logits = torch.stack(logits).view(len(kept), batch, heads, k)
                target = labels.view(1, batch, 1, 1).expand(len(kept), batch, heads, 1)
                losses = -logits.log_softmax(3).gather(3, target).squeeze(3)
                totals[torch.tensor(kept, device=totals.device)] = self._measures(logits, losses, labels)
        return totals, finite

    def head_of(self, name: str) -> int:
        """The index of the layer's reported head (see :meth:`l2_of`)."""
        return self._head(name)

    def _head(self, name: str) -> int:
        """The layer's head: the lowest running (held-out) loss, ties to the stronger L2; the fallback before any step."""
        run = self.running[name]
        if len(self.l2_path) == 1:
            return 0
        if not run["n"]:
            return min(range(len(self.l2_path)), key=lambda h: abs(math.log(self.l2_path[h] / FALLBACK_L2)))
        return min(range(len(self.l2_path)), key=lambda h: (run["loss"][h], h))

    def l2_of(self, name: str) -> float:
        """The L2 strength of the layer's reported head."""
        return self.l2_path[self._head(name)]

    def train_scores(self, name: str) -> dict[str, float]:
        run, head = self.running[name], self._head(name)
        n = max(run["n"], 1) if run["n"] else math.nan
        result = {"error": run["error"][head] / n, "loss": run["loss"][head] / n}
        if self.num_classes > 5:
            result["top5"] = run["top5"][head] / n
        return result

    def logits_of(self, name: str):
        probe = self.probes[self.names.index(name)]
        head, k = self._head(name), self.num_classes

        def logits(x: torch.Tensor) -> torch.Tensor:
            probe.eval()
            with torch.no_grad():
                return probe(x)[:, head * k:(head + 1) * k]
        return logits


def _standardise_with(x: torch.Tensor, norm: nn.BatchNorm1d, mean: torch.Tensor, variance: torch.Tensor,
                      rows: int) -> torch.Tensor:
    """``norm``'s training-mode standardisation of ``x`` with statistics of a larger batch (every rank's), its
    running statistics updated as ``BatchNorm1d`` updates them (unbiased variance)."""
    momentum = norm.momentum
    norm.running_mean.mul_(1 - momentum).add_(mean.to(norm.running_mean.dtype), alpha=momentum)
    unbiased = variance * rows / max(rows - 1, 1)
    norm.running_var.mul_(1 - momentum).add_(unbiased.to(norm.running_var.dtype), alpha=momentum)
    return (x - mean.to(x.dtype)) / torch.sqrt(variance.to(x.dtype) + norm.eps)
