"""The linear probe and its solvers.

A probe is L2-regularised softmax regression on one layer's (reduced)
features: ``p(y | h) = softmax(W z + b)`` with ``z`` the features
standardised on the training split. The objective

    mean cross-entropy + l2 / 2 * ||W||^2

is convex, so a probe has one optimum; :func:`fit_probe` finds it with
full-batch L-BFGS and reports whether it met its tolerance. It is the same problem as scikit-learn's
``LogisticRegression(C=1 / (n * l2))`` on standardised features.

:class:`OnlineProbes` is the cheap alternative for monitoring: one optimiser
step per model training step on that batch's detached features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

import torch
from torch import nn
from torch.nn import functional as F

#: Default L2 strength (on standardised features, mean loss).
DEFAULT_L2 = 1e-3
_EVAL_CHUNK = 8192


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
    mean = features.mean(0)
    scale = features.std(0, unbiased=False)
    scale = torch.where(scale > 1e-6 * scale.max().clamp_min(1e-30), scale, torch.ones_like(scale))
    return mean, scale


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
    features' device, multithreaded); SciPy's L-BFGS-B drives the iterations,
    as in scikit-learn's ``lbfgs`` solver.

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
    from scipy.optimize import minimize

    features = features.float()
    mean, scale = standardiser(features)
    z = (features - mean) / scale
    n, d = z.shape
    labels = labels.long()
    device = z.device

    def unpack(theta: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        flat = torch.from_numpy(theta.astype(np.float32)).to(device)
        return flat[: d * num_classes].view(d, num_classes), flat[d * num_classes:]

    def loss_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        weight, bias = unpack(theta)
        logits = torch.addmm(bias, z, weight)
        logp = torch.log_softmax(logits, dim=1)
        loss = -logp.gather(1, labels[:, None]).mean() + 0.5 * l2 * weight.pow(2).sum()
        residual = logp.exp_()
        residual[torch.arange(n, device=device), labels] -= 1
        residual /= n
        grad_w = torch.addmm(weight, z.T, residual, beta=l2)
        grad_b = residual.sum(0)
        grad = torch.cat([grad_w.reshape(-1), grad_b]).double().cpu().numpy()
        return float(loss), grad

    result = minimize(
        loss_and_grad, np.zeros(d * num_classes + num_classes), jac=True, method="L-BFGS-B",
        options={"maxiter": max_iter, "gtol": tol, "ftol": 64 * np.finfo(float).eps, "maxcor": 20},
    )
    weight, bias = unpack(result.x)
    return ProbeFit(
        mean=mean, scale=scale, weight=weight.clone(), bias=bias.clone(), iterations=int(result.nit),
        converged=bool(result.success),
    )


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
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=lr, weight_decay=0.0)
        self.l2 = l2
        self.steps = 0
        self.reset_running()

    def reset_running(self) -> None:
        """Clear the running train metrics (called at the start of each epoch)."""
        self.running = {name: {"error": 0.0, "loss": 0.0, "top5": 0.0, "n": 0} for name in self.names}

    def step(self, features: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
        """One optimiser step for every probe on one batch's detached features."""
        self.train()
        self.optimizer.zero_grad()
        total = 0.0
        with torch.enable_grad():
            for name, probe in zip(self.names, self.probes):
                x = features[name].detach().float()
                if not torch.isfinite(x).all():
                    continue
                logits = probe(x)
                loss = F.cross_entropy(logits, labels) + 0.5 * self.l2 * probe[1].weight.pow(2).sum()
                total = total + loss
                with torch.no_grad():
                    run = self.running[name]
                    run["n"] += labels.shape[0]
                    run["loss"] += F.cross_entropy(logits, labels, reduction="sum").item()
                    run["error"] += (logits.argmax(1) != labels).sum().item()
                    if self.num_classes > 5:
                        run["top5"] += (~(logits.topk(5, dim=1).indices == labels[:, None]).any(1)).sum().item()
            if isinstance(total, torch.Tensor):
                total.backward()
                self.optimizer.step()
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
