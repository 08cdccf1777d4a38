"""Layer similarity between two models: linear CKA (Kornblith et al. 2019) from one forward pass per model.

:func:`cka` traces each model (:class:`~probekit.engine.points.LayerGraph`),
plans the same reduction for every layer of both (:func:`~probekit.engine.plan.build_plan`),
runs each model once over the same examples (:func:`~probekit.engine.features.extract`)
and compares every layer of one with every layer of the other. The result is an
``xarray.DataArray`` with dims ``(layer_a, layer_b)``; its attributes say which
estimator made it. Save it with ``da.to_dataset().to_zarr(path, zarr_format=2)``
(format 2, as run stores: its layer names are fixed-length strings, which
Zarr's format 3 does not yet specify) and read it back with ``xr.open_zarr(path)["cka"]``.

Estimators (``estimator=``), all of linear CKA, i.e. HSIC with linear kernels
``K = X Xᵀ`` and ``L = Y Yᵀ``, normalised: ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``:

- ``"biased"``: Kornblith et al.'s estimator, ``HSIC₀ = tr(HKHHLH) / (n-1)²``
  on all ``n`` examples (``H`` centres); biased upwards when ``n`` is small
  next to the feature widths.
- ``"debiased"``: the unbiased HSIC estimator of Song et al. (2012) on all ``n``
  examples, as Nguyen et al. (2021) use it; ``n`` must be at least 4.
- ``"minibatch"``: Nguyen et al.'s minibatch CKA: the unbiased HSIC averaged
  over seeded, disjoint minibatches of about ``minibatch_size`` examples, then
  normalised; memory grows with ``minibatch_size²``, not ``n²``.
- ``"auto"`` (default): ``"debiased"`` when ``n <= minibatch_size``, else ``"minibatch"``.

This module owns :func:`cka` and the estimators. It imports the engine's
points, reductions, plan, extraction and features; never the run store, the
diagnosis, the charts or the explorers.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np
import torch
import xarray as xr
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from probekit.engine.batch import take, to_device
from probekit.engine.devices import placed, resolve_device, wants_channels_last
from probekit.engine.extract import build_extractor
from probekit.engine.features import DEFAULT_CACHE_BYTES, SplitFeatures, as_splits, batches, extract, split_size
from probekit.engine.plan import Plan, build_plan
from probekit.engine.points import TRACE_CONSTRAINTS, LayerGraph, preserved_state
from probekit.engine.reduce import DEFAULT_BUDGET, DEFAULT_MAX_FLATTEN
from probekit.params import Interval, Options, check_params

__all__ = ["ESTIMATORS", "cka", "cka_matrix"]

Estimator = Literal["auto", "biased", "debiased", "minibatch"]
#: The estimators :func:`cka` knows (see the module docstring).
ESTIMATORS = ("auto", "biased", "debiased", "minibatch")
#: CKA reads no labels; the extraction still checks that any it is given are class indices.
_ANY_CLASS = sys.maxsize
_CONSTRAINTS = {
    "model_a": [nn.Module],
    "model_b": [nn.Module],
    "tracer_kwargs": TRACE_CONSTRAINTS["tracer_kwargs"],
    "reduce": [str],
    "estimator": [Options(*ESTIMATORS)],
    "minibatch_size": [Interval(int, 4, None)],
    "split": [Options("train", "valid", "test")],
    "batch_size": [Interval(int, 1, None)],
    "budget": [Interval(int, 1, None)],
    "max_flatten": [Interval(int, 1, None)],
    "seed": [Interval(int, 0, None)],
    "cache_bytes": [Interval(int, 0, None)],
    "device": [str, torch.device, None],
}


def cka(
    model_a: nn.Module,
    model_b: nn.Module,
    data: object,
    *,
    data_b: object | None = None,
    layers_a: str | Sequence[str] | None = None,
    layers_b: str | Sequence[str] | None = None,
    reduce: str = "pool",
    estimator: Estimator = "auto",
    minibatch_size: int = 1024,
    split: str = "valid",
    batch_size: int = 256,
    budget: int = DEFAULT_BUDGET,
    max_flatten: int = DEFAULT_MAX_FLATTEN,
    seed: int = 0,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    tracer_kwargs: Mapping[str, object] | None = None,
    device: str | torch.device | None = None,
) -> xr.DataArray:
    """Linear CKA between every layer of ``model_a`` and every layer of ``model_b``, on the same examples.

    Each model runs once over the data (eval mode, no gradients) and is left
    exactly as it was. Both models' layers get the same reduction.

    Args:
        model_a, model_b: any ``nn.Module`` (the same one twice compares a model with itself).
        data: the examples: one split (a ``DataLoader`` without shuffling, a ``Dataset``
            of ``(x, y)``, an ``(X, y)`` pair or a bare input tensor), or train/valid(/test)
            splits (a ``probekit.data.Splits``, a dict or a tuple) of which ``split`` is used.
        data_b: ``model_b``'s view of the same examples in the same order, when it needs other
            inputs (e.g. another resolution); default: ``data``.
        layers_a, layers_b: probe point names of each model (see :func:`probekit.list_layers`),
            ``"blocks"`` or ``"all"``; default: the model's ``probe_layers``, else ``"blocks"``.
        reduce: one reduction for every layer of both models (see :mod:`probekit.engine.reduce`);
            the default ``"pool"`` averages feature maps over space and leaves vectors to ``"auto"``.
        estimator: ``"auto"``, ``"biased"``, ``"debiased"`` or ``"minibatch"`` (see the module docstring).
        minibatch_size: examples per minibatch of the minibatch estimator (and the largest
            ``n`` for which ``"auto"`` uses the debiased one on all examples).
        split: the split to use when ``data`` holds several.
        batch_size: extraction batch size for data that is not a ``DataLoader``.
        budget, max_flatten: the reductions' limits, as for :func:`probekit.probe`.
        seed: seed of random reductions and of the minibatches.
        cache_bytes: above this many bytes, cached features go to disk.
        tracer_kwargs: added to the tracer's defaults, for both models (see :func:`probekit.list_layers`).
        device: ``"cuda"`` when available, else ``"cpu"``, by default.

    Returns:
        A DataArray named ``"cka"`` with dims ``(layer_a, layer_b)``, values in [0, 1] (the
        debiased estimators can dip slightly below 0 for unrelated layers), coordinates
        ``depth_a``/``depth_b``, ``reduction_a``/``reduction_b``, ``feature_dim_a``/``feature_dim_b``,
        and attributes ``estimator`` (the one used), ``n_examples``, ``minibatch_size``,
        ``minibatches``, ``kernel``, ``reduce``, ``seed``, ``model_a``, ``model_b``.

    Raises:
        ValueError: the two splits have different sizes, a layer name does not exist
            (the message names the closest ones), or a ``DataLoader`` shuffles.

    Example:
        >>> sim = pk.cka(resnet, inception, digits_32px.valid, data_b=digits_75px.valid)
        >>> sim.to_dataset().to_zarr("runs/cka.zarr", zarr_format=2)
        >>> pk.compare({"ResNet-50": run_a, "Inception v3": run_b}, cka=sim)
    """
    check_params(
        _CONSTRAINTS, model_a=model_a, model_b=model_b, tracer_kwargs=tracer_kwargs, reduce=reduce, estimator=estimator,
        minibatch_size=minibatch_size, split=split, batch_size=batch_size, budget=budget, max_flatten=max_flatten,
        seed=seed, cache_bytes=cache_bytes, device=device,
    )
    split_a = _one_split(data, split, "data")
    split_b = split_a if data_b is None else _one_split(data_b, split, "data_b")
    n_a, n_b = split_size(split_a), split_size(split_b)
    if n_a is not None and n_b is not None and n_a != n_b:
        raise ValueError(
            f"data has {n_a} examples but data_b has {n_b}; CKA compares the same examples, "
            "so give both models the same examples in the same order"
        )
    device = resolve_device(device)
    options = {"reduce": reduce, "budget": budget, "max_flatten": max_flatten, "seed": seed, "batch_size": batch_size,
               "cache_bytes": cache_bytes, "tracer_kwargs": tracer_kwargs, "device": device}
    if model_b is model_a and data_b is None:
        # One model against itself: one forward pass for the layers of both sides.
        plan_a, feats_a, (names_a, names_b) = _features(model_a, split_a, {"layers_a": layers_a, "layers_b": layers_b}, options)
        plan_b, feats_b = plan_a, feats_a
    else:
        plan_a, feats_a, (names_a,) = _features(model_a, split_a, {"layers_a": layers_a}, options)
        plan_b, feats_b, (names_b,) = _features(model_b, split_b, {"layers_b": layers_b}, options)
    n = int(feats_a.labels.shape[0])
    if int(feats_b.labels.shape[0]) != n:
        raise ValueError(
            f"data gave {n} examples but data_b gave {int(feats_b.labels.shape[0])}; CKA compares the same examples, "
            "so give both models the same examples in the same order"
        )
    if data_b is not None:
        _check_same_labels(feats_a.labels, feats_b.labels)
    bad = [name for name, feats in ((f"{l} of model_a", feats_a.nonfinite[l]) for l in names_a) if feats]
    bad += [name for name, feats in ((f"{l} of model_b", feats_b.nonfinite[l]) for l in names_b) if feats]
    if bad:
        warnings.warn(f"{bad} produced NaN or Inf features; their CKA is NaN", RuntimeWarning, stacklevel=2)
    used = ("debiased" if n <= minibatch_size else "minibatch") if estimator == "auto" else estimator
    x = [feats_a.features[l] for l in names_a]
    y = [feats_b.features[l] for l in names_b]
    values, groups = cka_matrix(x, y, estimator=used, minibatch_size=minibatch_size, seed=seed, device=device)
    for i, layer in enumerate(names_a):
        if feats_a.nonfinite[layer]:
            values[i, :] = np.nan
    for j, layer in enumerate(names_b):
        if feats_b.nonfinite[layer]:
            values[:, j] = np.nan
    return xr.DataArray(
        values, dims=("layer_a", "layer_b"), name="cka",
        coords={
            "layer_a": np.array(names_a, dtype=str), "layer_b": np.array(names_b, dtype=str),
            **_layer_coords(plan_a, names_a, "a"), **_layer_coords(plan_b, names_b, "b"),
        },
        attrs={
            "measure": "linear CKA", "kernel": "linear", "estimator": used, "n_examples": n,
            "minibatch_size": int(minibatch_size) if used == "minibatch" else n, "minibatches": groups,
            "reduce": reduce, "seed": int(seed),
            "model_a": type(model_a).__name__, "model_b": type(model_b).__name__,
        },
    )


def _one_split(data: object, split: str, argument: str) -> object:
    """The one split of ``data`` CKA reads: ``data`` itself, or ``data``'s ``split`` when it holds several."""
    if isinstance(data, (torch.Tensor, np.ndarray)):
        if len(data) == 0:
            raise ValueError(f"{argument}= is empty; give CKA at least 4 examples")
        data = (data, torch.zeros(len(data), dtype=torch.long))
    is_pair = isinstance(data, (tuple, list)) and len(data) == 2 and all(
        isinstance(d, (torch.Tensor, np.ndarray)) for d in data)
    if not (is_pair or isinstance(data, (DataLoader, Dataset))):
        splits = as_splits(data)
        if split not in splits:
            raise ValueError(f"{argument}= has no {split!r} split (it has {', '.join(splits)}); pass split= naming one")
        data = splits[split]
    else:
        as_splits({"train": data})  # the split checks: lengths, emptiness, types
    if isinstance(data, DataLoader) and isinstance(data.sampler, RandomSampler):
        raise ValueError(
            f"{argument}= is a DataLoader that shuffles; CKA pairs the two models' features example by example, "
            "so pass a DataLoader with shuffle=False"
        )
    return data


def _features(model: nn.Module, split: object, layers: Mapping[str, object], options: dict) -> tuple[Plan, SplitFeatures, list]:
    """One forward pass of ``model`` over ``split``: its plan, every layer's reduced features, and
    the layer names each ``layers`` argument (by name, e.g. ``layers_a``) resolves to."""
    device = options["device"]
    channels_last = wants_channels_last(model, device, None)
    with placed(model, device, channels_last), preserved_state(model):
        model.eval()
        for inputs, _ in batches(split, 2):
            example = to_device(take(inputs, 2), device)
            break
        else:
            raise ValueError("the data is empty; give CKA at least 4 examples")
        graph = LayerGraph(model, example, tracer_kwargs=options["tracer_kwargs"])
        resolved = []
        for argument, value in layers.items():
            try:
                resolved.append(graph.resolve(value))
            except (ValueError, TypeError) as error:
                raise type(error)(f"{argument}: {error}") from error
        union = sorted({name for names in resolved for name in names}, key=lambda name: graph.point(name).depth)
        plan = build_plan(graph, union, options["reduce"], num_classes=2, seed=options["seed"],
                          budget=options["budget"], max_flatten=options["max_flatten"])
        for reducer in plan.reducers.values():
            reducer.to(device)
        dims = {name: plan.reducers[name].out_features for name in plan.layers}
        feats = extract(
            build_extractor(graph, plan.reducers), split, name="cka", dims=dims, num_classes=_ANY_CLASS,
            batch_size=options["batch_size"], device=device, channels_last=channels_last,
            cache_bytes=options["cache_bytes"],
        )
    return plan, feats, resolved


def _check_same_labels(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two splits that carry different labels at the same positions are not the same examples."""
    differ = int((a.cpu() != b.cpu()).sum())
    if differ:
        raise ValueError(
            f"data and data_b have different labels at {differ} of {a.shape[0]} positions; CKA compares the same "
            "examples, so give both models the same examples in the same order"
        )


def _layer_coords(plan: Plan, names: Sequence[str], side: str) -> dict:
    dim = f"layer_{side}"
    return {
        f"depth_{side}": (dim, np.array([plan.graph.point(n).depth for n in names], dtype=np.int64)),
        f"reduction_{side}": (dim, np.array([plan.reducers[n].describe() for n in names], dtype=str)),
        f"feature_dim_{side}": (dim, np.array([plan.reducers[n].out_features for n in names], dtype=np.int64)),
    }


# ----------------------------------------------------------------------------- estimators
def cka_matrix(
    x: Sequence[torch.Tensor | np.ndarray],
    y: Sequence[torch.Tensor | np.ndarray],
    *,
    estimator: Literal["biased", "debiased", "minibatch"] = "debiased",
    minibatch_size: int = 1024,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[np.ndarray, int]:
    """Linear CKA of every feature matrix in ``x`` against every one in ``y`` (each ``(n, d)``, same ``n``).

    Returns the ``(len(x), len(y))`` matrix and the number of minibatches it was computed on
    (1 for ``"biased"`` and ``"debiased"``). Computation is in float64, through each
    minibatch's Gram matrices.

    Example:
        >>> values, _ = cka_matrix([features], [features], estimator="biased")
        >>> values
        array([[1.]])
    """
    n = int(x[0].shape[0])
    if any(int(m.shape[0]) != n for m in (*x, *y)):
        raise ValueError(f"every feature matrix needs the same {n} examples; got {[int(m.shape[0]) for m in (*x, *y)]}")
    if estimator not in ("biased", "debiased", "minibatch"):
        raise ValueError(f"estimator must be one of 'biased', 'debiased', 'minibatch'; got {estimator!r}")
    least = 2 if estimator == "biased" else 4
    if n < least:
        raise ValueError(f"the {estimator} CKA estimator needs at least {least} examples; got {n}")
    if estimator == "minibatch":
        count = max(1, n // minibatch_size + (n % minibatch_size > 0))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        groups = [g for g in torch.tensor_split(order, count) if g.numel() >= 4]
    else:
        groups = [torch.arange(n)]
    cross = np.zeros((len(x), len(y)))
    self_x, self_y = np.zeros(len(x)), np.zeros(len(y))
    for index in groups:
        grams_x = _grams(x, index, device, centred=estimator == "biased")
        grams_y = _grams(y, index, device, centred=estimator == "biased")
        hsic = _hsic0 if estimator == "biased" else _hsic1
        cross += hsic(grams_x, grams_y).cpu().numpy()
        self_x += torch.diagonal(hsic(grams_x, grams_x)).cpu().numpy()
        self_y += torch.diagonal(hsic(grams_y, grams_y)).cpu().numpy()
    with np.errstate(invalid="ignore", divide="ignore"):
        values = cross / np.sqrt(np.outer(self_x, self_y))
    return values, len(groups)


def _grams(features: Sequence[torch.Tensor | np.ndarray], index: torch.Tensor, device, *, centred: bool) -> torch.Tensor:
    """``(layers, m, m)`` linear Gram matrices of the rows ``index`` of each feature matrix, float64."""
    grams = []
    for matrix in features:
        rows = torch.as_tensor(np.asarray(matrix[index.numpy()]) if isinstance(matrix, np.ndarray) else matrix[index.to(matrix.device)])
        rows = rows.to(device=device, dtype=torch.float64).reshape(rows.shape[0], -1)
        if centred:
            rows = rows - rows.mean(0, keepdim=True)
        grams.append(rows @ rows.T)
    return torch.stack(grams)


def _hsic0(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Kornblith et al.'s HSIC of centred Grams, ``tr(K L) / (m-1)²``, for every pair: ``(a, b)``."""
    m = k.shape[-1]
    return k.reshape(k.shape[0], -1) @ l.reshape(l.shape[0], -1).T / (m - 1) ** 2


def _hsic1(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al.'s (2012) unbiased HSIC for every pair of Grams: ``(a, b)``.

    With ``K̃``, ``L̃`` the Grams with zeroed diagonals and ``m`` examples::

        [tr(K̃L̃) + 1ᵀK̃1 · 1ᵀL̃1 / ((m-1)(m-2)) - 2/(m-2) · 1ᵀK̃L̃1] / (m(m-3))
    """
    m = k.shape[-1]
    eye = torch.eye(m, dtype=torch.bool, device=k.device)
    k, l = k.masked_fill(eye, 0.0), l.masked_fill(eye, 0.0)
    trace = k.reshape(k.shape[0], -1) @ l.reshape(l.shape[0], -1).T
    rows_k, rows_l = k.sum(-1), l.sum(-1)
    totals = torch.outer(rows_k.sum(-1), rows_l.sum(-1)) / ((m - 1) * (m - 2))
    return (trace + totals - 2.0 / (m - 2) * (rows_k @ rows_l.T)) / (m * (m - 3))
