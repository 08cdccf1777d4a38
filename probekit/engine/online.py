"""Online probes: one optimiser step per model training step, on that batch's detached features.

:class:`OnlineProbes` is the cheap alternative to refitting every probe to
its optimum (:mod:`probekit.engine.probes`) for monitoring a model while it
trains. With ``l2="auto"`` each layer gets one head per value of
:data:`ONLINE_L2_PATH`, all stepped on every batch; each batch is scored by
every head *before* the head steps on it, so the running training loss is a
held-out (prequential) score, and the head with the lowest running loss
since the epoch began is the one whose scores and logits are reported
(``OnlineProbes.l2_of``).

Like the probes module, it works on feature tensors only: it imports
:mod:`~probekit.engine.probes` (the L2 defaults and checks),
:mod:`~probekit.engine.devices` and :mod:`probekit.params`, and never the
model side, the run store, the diagnosis, the charts or the explorers.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from probekit.engine.devices import torch_threads
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
    """

    def __init__(self, dims: dict[str, int], num_classes: int, *, lr: float = 1e-3, l2: float | str = DEFAULT_L2):
        super().__init__()
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
            self._decay = None
        else:  # the same, head by head: l2 of each output row, added to the gradient before the step
            groups = [{"params": weights}, {"params": biases}]
            self._decay = torch.tensor(self.l2_path).repeat_interleave(num_classes)[:, None]
        self.optimizer = torch.optim.Adam(groups, lr=lr, foreach=True)
        self.steps = 0
        self.reset_running()

    def reset_running(self) -> None:
        """Clear the running train metrics (called at the start of each epoch)."""
        heads = len(self.l2_path)
        self.running = {name: {"error": [0.0] * heads, "loss": [0.0] * heads, "top5": [0.0] * heads, "n": 0}
                        for name in self.names}

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
        heads, k = len(self.l2_path), self.num_classes
        with torch_threads(1), torch.enable_grad():
            inputs = [features[name].detach().float() for name in self.names]
            with torch.no_grad():  # NaN and Inf propagate to a sum; one sync for every probe
                finite = torch.stack([x.sum() for x in inputs]).isfinite().tolist()
            # A float32 sum can overflow on large finite values: those get an exact check.
            finite = [ok or math.isfinite(x.sum(dtype=torch.float64)) for ok, x in zip(finite, inputs)]
            kept = [i for i, ok in enumerate(finite) if ok]
            if kept:
                batch = labels.shape[0]
                stacked = torch.stack([self.probes[i](inputs[i]) for i in kept])  # (probes, batch, heads * classes)
                stacked = stacked.view(len(kept), batch, heads, k).transpose(1, 2)  # (probes, heads, batch, classes)
                losses = F.cross_entropy(stacked.flatten(0, 2), labels.repeat(len(kept) * heads), reduction="none")
                losses = losses.view(len(kept), heads, batch)
                losses.mean(2).sum().backward()
                if self._decay is not None:
                    decay = self._decay.to(labels.device)
                    for i in kept:
                        linear = self.probes[i][1]
                        linear.weight.grad.add_(decay * linear.weight.detach())
                self.optimizer.step()
                with torch.no_grad():
                    totals = {"loss": losses.sum(2), "error": (stacked.argmax(3) != labels).sum(2)}
                    if k > 5:
                        totals["top5"] = (~(stacked.topk(5, dim=3).indices == labels[:, None]).any(3)).sum(2)
                    totals = {measure: values.tolist() for measure, values in totals.items()}
                for row, i in enumerate(kept):
                    run = self.running[self.names[i]]
                    run["n"] += batch
                    for measure, values in totals.items():
                        run[measure] = [a + b for a, b in zip(run[measure], values[row])]
        self.steps += 1

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
