"""Shrinking feature maps before a probe sees them.

Early layers of a convolutional network have up to millions of features per
example; a linear probe on all of them would need gigabytes and would
memorise its training set. Each probed layer gets a *reduction*: a small,
fixed (never trained) module applied to the layer's output as soon as it is
produced. The reduction used is part of the result, so its text form
(``Reducer.describe()``) is recorded in the run store.

Reductions are named with short specs::

    "flatten"            every feature (refused above ``max_flatten``)
    "pool"               global average pooling, one feature per channel
    "pool4"              adaptive average pooling to 4x4 per channel
    "subset1000"         a fixed, seeded random subset of 1000 features
    "project512"         a seeded Gaussian random projection to 512 dims
    "auto"               the default policy (see :func:`auto_spec`)

A ``reduce=`` argument is one spec for every layer or a ``{layer: spec}``
mapping (missing layers get ``"auto"``).

This module owns the reducers, their spec grammar and the ``"auto"`` policy. It
imports only :mod:`~probekit.engine.points` from the engine (which tensor of an
output is probed, how a shape reads); never the run store, the diagnosis, the
charts or the explorers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from probekit.engine.points import as_tensor
from probekit.params import shape_text

__all__ = [
    "DEFAULT_BUDGET", "DEFAULT_MAX_FLATTEN", "MAX_PROJECTION_ENTRIES", "Flatten", "Pool", "Project", "Reducer", "Subset",
    "auto_spec", "make_reducer", "parse_spec", "spec_for",
]

#: Default per-probe feature budget of the ``"auto"`` policy.
DEFAULT_BUDGET = 4096
#: Largest layer that ``"flatten"`` accepts unless told otherwise.
DEFAULT_MAX_FLATTEN = 65536
#: Largest projection matrix (in_features x out_features) ``"project"`` builds.
MAX_PROJECTION_ENTRIES = 64 * 2**20

#: Most values per example of a map that :class:`Pool` pools through a channels-last copy.
_SMALL_MAP = 32768

_SPEC = re.compile(r"^(flatten|pool|subset|project|auto)(\d+)?$")


class Reducer(nn.Module):
    """Base class: maps a batch of layer outputs ``(N, ...)`` to ``(N, out_features)``.

    Subclasses set ``out_features`` and define ``reduce(x)`` and ``describe()``.
    """

    out_features: int

    def forward(self, output: object) -> torch.Tensor:
        return self.reduce(as_tensor(output).detach())


class Flatten(Reducer):
    def __init__(self, in_shape: tuple[int, ...]):
        super().__init__()
        self.out_features = math.prod(in_shape)

    def describe(self) -> str:
        return "flatten"

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        # A copy, never a view: a later in-place op (ReLU(inplace=True)) must not change it.
        return x.reshape(x.shape[0], -1).clone()


class Pool(Reducer):
    """Adaptive average pooling over the trailing spatial dims to ``size`` per side."""

    def __init__(self, in_shape: tuple[int, ...], size: int = 1):
        super().__init__()
        if len(in_shape) < 2:
            raise ValueError(
                f"pooling needs a feature map with channels and spatial dims; got per-example shape {shape_text(in_shape)}. "
                "Use 'flatten', 'subsetN' or 'projectN' for this layer."
            )
        self.size = size
        spatial = len(in_shape) - 1
        self.out_features = in_shape[0] * size**spatial
        self._pool = {1: nn.functional.adaptive_avg_pool1d, 2: nn.functional.adaptive_avg_pool2d,
                      3: nn.functional.adaptive_avg_pool3d}.get(spatial)
        if self._pool is None:
            raise ValueError(f"pooling supports 1 to 3 spatial dims; got per-example shape {shape_text(in_shape)}")

    def describe(self) -> str:
        return "pool" if self.size == 1 else f"pool{self.size}"

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dim() == 4 and self.size > 1 and x.device.type == "cpu" and x[0].numel() <= _SMALL_MAP
                and x.is_contiguous()):
            # On the CPU, torch's adaptive pooling of small NCHW maps runs 2-5x faster
            # through a channels-last copy (measured: 32x28x28 to 11x11, 64x14x14 to 8x8);
            # above about 32k values per example the copy costs more than it saves.
            x = x.contiguous(memory_format=torch.channels_last)
        return self._pool(x, self.size).reshape(x.shape[0], -1)


class Subset(Reducer):
    """A fixed random subset of ``n`` features, drawn once from ``seed``."""

    def __init__(self, in_shape: tuple[int, ...], n: int, seed: int = 0):
        super().__init__()
        total = math.prod(in_shape)
        self.n, self.seed = min(n, total), seed
        generator = torch.Generator().manual_seed(seed)
        flat = torch.randperm(total, generator=generator)[: self.n].sort().values
        # One index per dim, so that gathering never copies the whole map.
        index = torch.stack(torch.unravel_index(flat, tuple(in_shape))) if in_shape else flat[None]
        self.register_buffer("index", index, persistent=False)
        self.out_features = self.n

    def describe(self) -> str:
        return f"subset{self.n}(seed={self.seed})"

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x[(slice(None), *self.index)]


class Project(Reducer):
    """A seeded Gaussian random projection to ``n`` dims (Johnson-Lindenstrauss)."""

    def __init__(self, in_shape: tuple[int, ...], n: int, seed: int = 0):
        super().__init__()
        total = math.prod(in_shape)
        if total * n > MAX_PROJECTION_ENTRIES:
            raise ValueError(
                f"a projection of {total:,} features to {n} would need a {total:,} x {n} matrix "
                f"({total * n * 4 / 2**30:.1f} GiB). Use 'pool', 'poolK' or 'subset{n}' for this layer."
            )
        self.n, self.seed = n, seed
        generator = torch.Generator().manual_seed(seed)
        matrix = torch.randn(total, n, generator=generator) / math.sqrt(n)
        self.register_buffer("matrix", matrix, persistent=False)
        self.out_features = n

    def describe(self) -> str:
        return f"project{self.n}(seed={self.seed})"

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).to(self.matrix.dtype) @ self.matrix


def parse_spec(spec: str) -> tuple[str, int | None]:
    """Split ``"pool4"`` into ``("pool", 4)``; raise a ValueError naming the valid forms."""
    match = _SPEC.match(str(spec).strip().lower().replace(":", "").replace("_", ""))
    if not match:
        raise ValueError(
            f"unknown reduction {spec!r}; use one of 'auto', 'flatten', 'pool', 'poolK' (e.g. 'pool4'), "
            "'subsetN' (e.g. 'subset1000') or 'projectN' (e.g. 'project512')"
        )
    kind, number = match.group(1), match.group(2)
    if kind in ("subset", "project") and number is None:
        raise ValueError(f"reduction {spec!r} needs a feature count, e.g. '{kind}1000'")
    if kind in ("flatten", "auto") and number is not None:
        raise ValueError(f"reduction {spec!r} takes no number; did you mean 'pool{number}' or 'subset{number}'?")
    value = int(number) if number is not None else None
    if value is not None and value < 1:
        raise ValueError(f"reduction {spec!r} needs a positive number")
    return kind, value


def auto_spec(in_shape: tuple[int, ...], budget: int = DEFAULT_BUDGET) -> str:
    """The default policy: keep each probe at or under ``budget`` features.

    A layer that fits is flattened; a feature map (channels x spatial) is
    average-pooled to the largest k x k grid that fits (k=1 is global pooling,
    the paper's choice for ResNet-50); anything else, or a map with more
    channels than the budget, gets a fixed random subset of ``budget``
    features (the paper's choice for Inception v3).
    """
    total = math.prod(in_shape)
    if total <= budget:
        return "flatten"
    if 2 <= len(in_shape) <= 4 and in_shape[0] <= budget:
        spatial = len(in_shape) - 1
        k = int((budget / in_shape[0]) ** (1 / spatial) + 1e-9)
        k = max(1, min(k, *in_shape[1:]))
        return "pool" if k == 1 else f"pool{k}"
    return f"subset{budget}"


def make_reducer(
    spec: str,
    in_shape: tuple[int, ...],
    *,
    layer: str,
    seed: int = 0,
    budget: int = DEFAULT_BUDGET,
    max_flatten: int = DEFAULT_MAX_FLATTEN,
) -> Reducer:
    """Build the reducer for one layer of per-example shape ``in_shape``."""
    kind, number = parse_spec(spec)
    if kind == "auto":
        kind, number = parse_spec(auto_spec(in_shape, budget))
    total = math.prod(in_shape)
    if kind == "flatten":
        if total > max_flatten:
            fits = auto_spec(in_shape, budget)
            raise ValueError(
                f"layer {layer!r} has {total:,} features ({shape_text(in_shape)}), more than max_flatten={max_flatten:,}; "
                f"use a reduction such as {fits!r} (or 'pool', 'subset1000'), or raise max_flatten"
            )
        return Flatten(in_shape)
    if kind == "pool":
        try:
            return Pool(in_shape, number or 1)
        except ValueError as error:
            raise ValueError(f"layer {layer!r}: {error}") from None
    if kind == "subset":
        return Subset(in_shape, number, seed)
    try:
        return Project(in_shape, number, seed)
    except ValueError as error:
        raise ValueError(f"layer {layer!r}: {error}") from None


def spec_for(reduce: str | Mapping[str, str] | None, layer: str) -> str:
    """The spec that ``reduce=`` assigns to ``layer``."""
    if reduce is None:
        return "auto"
    if isinstance(reduce, Mapping):
        return reduce.get(layer, "auto")
    return reduce
