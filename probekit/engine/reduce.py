"""Shrinking feature maps before a probe sees them.

Early layers of a convolutional network have up to millions of features per
example; a linear probe on all of them would need gigabytes and would
memorise its training set. Each probed layer gets a *reduction*: a small,
fixed (never trained) module applied to the layer's output as soon as it is
produced. The reduction used is part of the result, so its text form
(``Reducer.describe()``) is recorded in the run store.

Every reducer knows its point's *layout*: ``"map"`` (channels first: ``C x H x W``,
``C x L``), ``"tokens"`` (a sequence, channels last: ``T x H``) or ``"vector"``.
Reductions are named with short specs::

    "flatten"            every feature (refused above ``max_flatten``)
    "pool"               maps: global average pooling, one feature per channel;
                         tokens: the mask-aware mean over tokens ("mean")
    "pool4"              maps: adaptive average pooling to 4x4 per channel;
                         tokens: mask-aware adaptive averaging to 4 token bins (4 x H)
    "mean"               tokens: the mean over real tokens (padding never counts)
    "first"              tokens: the first real token (BERT's CLS)
    "last"               tokens: the last real token (causal LMs, RNNs)
    "max"                tokens: the maximum over real tokens, per hidden unit
    "subset1000"         a fixed, seeded random subset of 1000 features
    "project512"         a seeded Gaussian random projection to 512 dims
    "auto"               the default policy (see :func:`make_reducer`)

No reduction of a token sequence pools across its hidden dim. ``flatten``,
``subsetN`` and ``projectN`` of a sequence read its token positions as they are
(padding included); the token reductions take the batch's mask of real tokens
(set by the extractor as ``batch_mask``). In a token-level run (``token_level=True``)
each reducer of a sequence returns one row per labelled token (``batch_tokens``),
its hidden vector reduced by ``flatten``, ``subsetN`` or ``projectN``.

Every reducer has ``candidates``: ``{spec: column slice}`` of its output. It is one
entry, except for ``"auto"`` on a feature map, which builds a :class:`Pyramid`:
the concatenation of several poolings (``pool``, ``pool2``, ``pool4``, ...; each within
the budget; ``flatten`` when the whole map fits it), among which each probe fit
chooses on held-out data, together with its L2 strength (see :mod:`probekit.engine.probes`):
how much of a map a probe should read depends on how many examples it is fitted on.

A ``reduce=`` argument is one spec for every layer or a ``{layer: spec}``
mapping (missing layers get ``"auto"``).

This module owns the reducers, their spec grammar and the ``"auto"`` policy. It
imports only :mod:`~probekit.engine.points` from the engine (which tensor of an
output is probed, how a shape reads) and the layout names of
:mod:`probekit.run.schema`; never the run store, the diagnosis, the charts or
the explorers.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import nn

from probekit.engine.points import LAYOUTS, as_tensor
from probekit.params import choices, shape_text
from probekit.run.schema import layout_for_shape

__all__ = [
    "DEFAULT_BUDGET", "DEFAULT_MAX_FLATTEN", "MAX_PROJECTION_ENTRIES", "TOKEN_SPECS", "Flatten", "PerToken", "Pool",
    "CANDIDATES_PER_EXAMPLE", "Project", "Pyramid", "Reducer", "Subset", "TokenPool", "TokenReduce", "auto_spec", "make_reducer", "parse_spec",
    "pyramid_sizes", "spec_for", "spec_fits",
]

#: The reductions of a token sequence over its tokens (one feature per hidden unit).
TOKEN_SPECS = ("mean", "first", "last", "max")

#: Widest candidate of ``"auto"``'s pyramid, in features per training example: a map's
#: poolings are offered up to ``min(budget, CANDIDATES_PER_EXAMPLE * examples)`` features.
CANDIDATES_PER_EXAMPLE = 4
#: Default per-probe feature budget of the ``"auto"`` policy.
DEFAULT_BUDGET = 4096
#: Largest layer that ``"flatten"`` accepts unless told otherwise.
DEFAULT_MAX_FLATTEN = 65536
#: Largest projection matrix (in_features x out_features) ``"project"`` builds.
MAX_PROJECTION_ENTRIES = 64 * 2**20

#: Most values per example of a map that :class:`Pool` pools through a channels-last copy.
_SMALL_MAP = 32768

_SPEC = re.compile(r"^(flatten|pool|subset|project|auto|mean|first|last|max)(\d+)?$")


class Reducer(nn.Module):
    """Base class: maps a batch of layer outputs ``(N, ...)`` to ``(N, out_features)``.

    Subclasses set ``out_features`` and define ``reduce(x)`` and ``describe()``.
    ``layout`` is the point's layout; ``batch_mask`` (``(N, T)`` real tokens) and
    ``batch_tokens`` (``(N, T)`` labelled tokens) are set by the extractor for
    the batch being reduced, ``None`` otherwise.
    """

    out_features: int
    layout: str = "map"
    batch_mask: torch.Tensor | None = None
    batch_tokens: torch.Tensor | None = None

    @property
    def candidates(self) -> dict[str, slice]:
        """``{spec: column slice}`` of the output, one entry (a :class:`Pyramid` has several)."""
        return {self.describe(): slice(0, self.out_features)}

    def forward(self, output: object) -> torch.Tensor:
        return self.reduce(as_tensor(output).detach())


class Flatten(Reducer):
    def __init__(self, in_shape: tuple[int, ...], layout: str = "map"):
        super().__init__()
        self.layout = layout
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

    def __init__(self, in_shape: tuple[int, ...], n: int, seed: int = 0, layout: str = "map"):
        super().__init__()
        self.layout = layout
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

    def __init__(self, in_shape: tuple[int, ...], n: int, seed: int = 0, layout: str = "map"):
        super().__init__()
        self.layout = layout
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


class Pyramid(Reducer):
    """Several poolings of one feature map side by side: ``auto`` on a map (see :func:`pyramid_sizes`).

    ``candidates`` maps each pooling's spec (``"pool"``, ``"pool2"``, ...) to its columns.
    """

    def __init__(self, in_shape: tuple[int, ...], sizes: list[int]):
        super().__init__()
        self.in_shape = tuple(in_shape)
        self.pools = nn.ModuleList(Pool(in_shape, size) for size in sizes)
        self.out_features = sum(pool.out_features for pool in self.pools)

    @property
    def candidates(self) -> dict[str, slice]:
        found, start = {}, 0
        for name, pool in zip(self._names(), self.pools):
            found[name] = slice(start, start + pool.out_features)
            start += pool.out_features
        return found

    def _names(self) -> list[str]:
        """Each pooling's spec; one that keeps the whole map (its size is every spatial side) is ``flatten``."""
        return ["flatten" if pool.size > 1 and all(side == pool.size for side in self.in_shape[1:]) else pool.describe()
                for pool in self.pools]

    def describe(self) -> str:
        return "auto(" + "|".join(self._names()) + ")"

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([pool.reduce(x) for pool in self.pools], dim=1)


def _real_tokens(x: torch.Tensor, mask: torch.Tensor | None, layer: str) -> torch.Tensor | None:
    """The batch's ``(N, T)`` mask of real tokens for a ``(N, T, H)`` output, on its device; ``None``: all real."""
    if mask is None:
        return None
    if tuple(mask.shape) != tuple(x.shape[:2]):
        if bool(mask.all()):
            return None
        raise ValueError(
            f"layer {layer!r} outputs {x.shape[1]} tokens per example but the batch's mask of real tokens has shape "
            f"{tuple(mask.shape)}; probe a point whose tokens are the input's, or give it layouts={{{layer!r}: 'vector'}}"
        )
    return mask.to(device=x.device, dtype=torch.bool)


class TokenReduce(Reducer):
    """One feature per hidden unit of a ``(T, H)`` sequence: ``mean``, ``first``, ``last`` or ``max`` over real tokens.

    ``first`` and ``last`` are the first and last real tokens of each example (left or
    right padding alike); an example without real tokens gives zeros.
    """

    layout = "tokens"

    def __init__(self, in_shape: tuple[int, ...], kind: str = "mean", layer: str = "?"):
        super().__init__()
        if len(in_shape) != 2:
            raise ValueError(f"{kind!r} reduces a (tokens x hidden) sequence; got per-example shape {shape_text(in_shape)}")
        if kind not in TOKEN_SPECS:
            raise ValueError(f"unknown token reduction {kind!r}; use one of {', '.join(TOKEN_SPECS)}")
        self.kind, self.layer = kind, layer
        self.out_features = in_shape[1]

    def describe(self) -> str:
        return self.kind

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        mask = _real_tokens(x, self.batch_mask, self.layer)
        if mask is None:
            return {"mean": lambda: x.mean(1), "first": lambda: x[:, 0].clone(), "last": lambda: x[:, -1].clone(),
                    "max": lambda: x.amax(1)}[self.kind]()
        real = mask.any(1, keepdim=True)
        if self.kind == "mean":
            weights = mask.to(x.dtype).unsqueeze(-1)
            return (x * weights).sum(1) / weights.sum(1).clamp_min(1)
        if self.kind == "max":
            low = torch.finfo(x.dtype).min
            return torch.where(real, x.masked_fill(~mask.unsqueeze(-1), low).amax(1), torch.zeros((), dtype=x.dtype, device=x.device))
        positions = torch.arange(x.shape[1], device=x.device).expand_as(mask)
        if self.kind == "first":
            index = torch.where(mask, positions, x.shape[1]).amin(1).clamp_max(x.shape[1] - 1)
        else:
            index = torch.where(mask, positions, -1).amax(1).clamp_min(0)
        picked = x[torch.arange(x.shape[0], device=x.device), index]
        return torch.where(real, picked, torch.zeros((), dtype=x.dtype, device=x.device))


class TokenPool(Reducer):
    """Mask-aware adaptive averaging of a ``(T, H)`` sequence to ``size`` token bins: ``size * H`` features.

    Each example's real tokens are split into ``size`` bins as ``adaptive_avg_pool1d``
    splits a sequence of their number (the same result when nothing is padding).
    """

    layout = "tokens"

    def __init__(self, in_shape: tuple[int, ...], size: int, layer: str = "?"):
        super().__init__()
        if len(in_shape) != 2:
            raise ValueError(f"'pool{size}' of a sequence needs (tokens x hidden); got per-example shape {shape_text(in_shape)}")
        self.size, self.layer = size, layer
        self.out_features = size * in_shape[1]

    def describe(self) -> str:
        return f"pool{self.size}"

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        mask = _real_tokens(x, self.batch_mask, self.layer)
        mask = torch.ones(n, t, dtype=torch.bool, device=x.device) if mask is None else mask
        length = mask.sum(1, keepdim=True)  # (N, 1)
        rank = mask.long().cumsum(1) - 1  # each real token's position among the real ones
        k = torch.arange(self.size, device=x.device).view(1, -1, 1)  # (1, K, 1)
        start = torch.div(k * length.unsqueeze(1), self.size, rounding_mode="floor")
        end = -torch.div(-(k + 1) * length.unsqueeze(1), self.size, rounding_mode="floor")  # ceil
        inside = (rank.unsqueeze(1) >= start) & (rank.unsqueeze(1) < end) & mask.unsqueeze(1)  # (N, K, T)
        weights = inside.to(x.dtype)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1)
        return (weights @ x).reshape(n, -1)


class PerToken(Reducer):
    """A token-level run's reducer: one row per labelled token (``batch_tokens``), its hidden vector reduced by ``inner``."""

    layout = "tokens"

    def __init__(self, inner: Reducer, layer: str = "?"):
        super().__init__()
        self.inner, self.layer = inner, layer
        self.out_features = inner.out_features

    def describe(self) -> str:
        return f"per-token {self.inner.describe()}"

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.batch_tokens
        if tokens is None:
            raise ValueError(f"layer {self.layer!r} reduces labelled tokens, and this batch has no per-token labels")
        if tuple(tokens.shape) != tuple(x.shape[:2]):
            raise ValueError(
                f"layer {self.layer!r} outputs {x.shape[1]} tokens per example but the per-token labels have shape "
                f"{tuple(tokens.shape)}; label the tokens of the model's input sequence"
            )
        return self.inner.reduce(x[tokens.to(x.device)])


def parse_spec(spec: str) -> tuple[str, int | None]:
    """Split ``"pool4"`` into ``("pool", 4)``; raise a ValueError naming the valid forms."""
    match = _SPEC.match(str(spec).strip().lower().replace(":", "").replace("_", ""))
    if not match:
        raise ValueError(
            f"unknown reduction {spec!r}; use one of 'auto', 'flatten', 'pool', 'poolK' (e.g. 'pool4'), "
            "'subsetN' (e.g. 'subset1000'), 'projectN' (e.g. 'project512') or, for token sequences, "
            "'mean', 'first', 'last', 'max'"
        )
    kind, number = match.group(1), match.group(2)
    if kind in ("subset", "project") and number is None:
        raise ValueError(f"reduction {spec!r} needs a feature count, e.g. '{kind}1000'")
    if kind in ("flatten", "auto", *TOKEN_SPECS) and number is not None:
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


def pyramid_sizes(in_shape: tuple[int, ...], budget: int = DEFAULT_BUDGET) -> list[int]:
    """The pooling sizes of ``auto`` on a feature map: 1, 2, 4 and the largest that fits ``budget`` (see :func:`auto_spec`)."""
    channels, spatial = in_shape[0], len(in_shape) - 1
    largest = max(1, min(int((budget / channels) ** (1 / spatial) + 1e-9), *in_shape[1:]))
    return sorted({size for size in (1, 2, 4) if size <= largest} | {largest})


def spec_fits(spec: str, layout: str) -> bool:
    """Whether ``spec`` applies to a point of ``layout`` (pooling needs a map or tokens; token specs need tokens)."""
    kind, _ = parse_spec(spec)
    if kind in TOKEN_SPECS:
        return layout == "tokens"
    if kind == "pool":
        return layout in ("map", "tokens")
    return True


def _layout_of(in_shape: tuple[int, ...], layout: str | None) -> str:
    if layout is None:
        return layout_for_shape(in_shape)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; a point's layout is one of {choices(LAYOUTS)}")
    if layout == "tokens" and len(in_shape) != 2:
        raise ValueError(f"a 'tokens' point is (tokens x hidden); got per-example shape {shape_text(in_shape)}")
    if layout == "map" and len(in_shape) < 2:
        raise ValueError(f"a 'map' point has channels and spatial dims; got per-example shape {shape_text(in_shape)}")
    return layout


def make_reducer(
    spec: str,
    in_shape: tuple[int, ...],
    *,
    layer: str,
    layout: str | None = None,
    token_level: bool = False,
    seed: int = 0,
    budget: int = DEFAULT_BUDGET,
    max_flatten: int = DEFAULT_MAX_FLATTEN,
    examples: int | None = None,
) -> Reducer:
    """Build the reducer for one layer of per-example shape ``in_shape`` and ``layout``.

    ``examples`` (the training split's size, when known) narrows ``"auto"``'s
    pyramid on a map: no candidate is wider than :data:`CANDIDATES_PER_EXAMPLE`
    features per training example (nor than ``budget``), so the feature budget
    follows the data: 256 images offer a 64-channel map up to ``pool4`` (1,024
    features), 1,000 up to 4,000.

    ``layout=None`` reads the shape's rank: a map from 2 dims up, else a vector.
    ``"auto"``: a feature map gets a :class:`Pyramid` of poolings within ``budget``, the
    whole map (``flatten``) among them when it fits (a single ``pool`` when only that
    fits, a ``subset`` when the channels alone exceed it); a sequence gets ``"mean"`` (``"last"`` when ``layer`` is a recurrent layer's
    output: pass ``spec="last"``); a vector is flattened, or subset above ``budget``.
    ``token_level``: a sequence's labelled tokens, one row each (see :class:`PerToken`).
    """
    kind, number = parse_spec(spec)
    layout = _layout_of(tuple(in_shape), layout)
    if token_level:
        if layout != "tokens":
            raise ValueError(
                f"layer {layer!r} is a {layout} ({shape_text(in_shape)}); per-token labels need points of the 'tokens' "
                f"layout (tokens x hidden): probe sequence outputs, or pass layouts={{{layer!r}: 'tokens'}} if it is one"
            )
        if kind in TOKEN_SPECS or kind == "pool":
            raise ValueError(f"layer {layer!r}: in a token-level run each labelled token is one example; reduce its hidden "
                             f"vector with 'flatten', 'subsetN' or 'projectN' (not {spec!r})")
        hidden = (in_shape[1],)
        inner = make_reducer("auto" if kind == "auto" else spec, hidden, layer=layer, layout="vector", seed=seed,
                             budget=budget, max_flatten=max_flatten)
        return PerToken(inner, layer=layer)
    if layout == "tokens":
        if kind == "auto" or (kind == "pool" and number in (None, 1)):
            return TokenReduce(in_shape, "mean", layer=layer)
        if kind in TOKEN_SPECS:
            return TokenReduce(in_shape, kind, layer=layer)
        if kind == "pool":
            return TokenPool(in_shape, number, layer=layer)
    elif kind in TOKEN_SPECS:
        raise ValueError(
            f"layer {layer!r}: {spec!r} reduces a token sequence and this point is a {layout} ({shape_text(in_shape)}); "
            f"use 'pool'/'poolK' for a feature map or 'flatten'/'subsetN' for a vector, or pass layouts={{{layer!r}: 'tokens'}}"
        )
    total = math.prod(in_shape)
    if kind == "auto":
        if layout == "map" and in_shape[0] <= budget and len(in_shape) <= 4:
            widest = budget if examples is None else max(in_shape[0], min(budget, CANDIDATES_PER_EXAMPLE * examples))
            sizes = pyramid_sizes(tuple(in_shape), widest)
            return Pool(in_shape, 1) if sizes == [1] else Pyramid(in_shape, sizes)
        kind, number = parse_spec("flatten" if total <= budget else f"subset{budget}")
    if kind == "flatten":
        if total > max_flatten:
            fits = auto_spec(in_shape, budget) if layout != "tokens" else "mean"
            raise ValueError(
                f"layer {layer!r} has {total:,} features ({shape_text(in_shape)}), more than max_flatten={max_flatten:,}; "
                f"use a reduction such as {fits!r} (or 'pool', 'subset1000'), or raise max_flatten"
            )
        return Flatten(in_shape, layout)
    if kind == "pool":
        if layout == "vector":
            raise ValueError(
                f"layer {layer!r}: pooling needs a feature map with channels and spatial dims; got per-example shape "
                f"{shape_text(in_shape)}. Use 'flatten', 'subsetN' or 'projectN' for this layer."
            )
        try:
            return Pool(in_shape, number or 1)
        except ValueError as error:
            raise ValueError(f"layer {layer!r}: {error}") from None
    if kind == "subset":
        return Subset(in_shape, number, seed, layout)
    try:
        return Project(in_shape, number, seed, layout)
    except ValueError as error:
        raise ValueError(f"layer {layer!r}: {error}") from None


def spec_for(reduce: str | Mapping[str, str] | None, layer: str) -> str:
    """The spec that ``reduce=`` assigns to ``layer``."""
    if reduce is None:
        return "auto"
    if isinstance(reduce, Mapping):
        return reduce.get(layer, "auto")
    return reduce
