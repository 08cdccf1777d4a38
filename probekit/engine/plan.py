"""The probe plan: which layers, which reduction, how large each probe, before any work.

:func:`plan` traces the model once (:mod:`probekit.engine.points`) and picks a
reducer per layer (:mod:`probekit.engine.reduce`); :class:`Plan` shows the result
and turns it into the run layout of :mod:`probekit.run.schema`.

This module owns the plan and the checks of the arguments that shape it
(:data:`PLAN_CONSTRAINTS`). It imports the engine's points and reductions and
the run schema; never the store, the diagnosis, the charts or the explorers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
from torch import nn

from probekit.engine.points import TRACE_CONSTRAINTS, LayerGraph
from probekit.engine.reduce import DEFAULT_BUDGET, DEFAULT_MAX_FLATTEN, Reducer, make_reducer, parse_spec, spec_fits, spec_for
from probekit.params import Interval, check_params, shape_text
from probekit.run.schema import RunLayout

__all__ = ["PLAN_CONSTRAINTS", "Plan", "build_plan", "plan"]

#: Argument checks of what shapes a plan; :class:`~probekit.engine.monitor.ProbeMonitor` shares them.
PLAN_CONSTRAINTS = {
    "num_classes": [Interval(int, 2, None)],
    "budget": [Interval(int, 1, None)],
    "max_flatten": [Interval(int, 1, None)],
    "seed": [Interval(int, 0, None)],
}
_CONSTRAINTS = {**TRACE_CONSTRAINTS, **PLAN_CONSTRAINTS}


@dataclass
class Plan:
    """What a probing run will do, per layer, before any work: see :func:`plan`.

    ``print(plan)`` shows it as text, a notebook as a table; :meth:`frame` is that table.
    """

    graph: LayerGraph
    layers: list[str]
    reducers: dict[str, Reducer]
    num_classes: int

    def frame(self) -> pd.DataFrame:
        """One row per probed layer: op, shape, reduction, probe size and cache memory."""
        rows = []
        for name in self.layers:
            point, reducer = self.graph.point(name), self.reducers[name]
            d = reducer.out_features
            rows.append({
                "layer": name, "op": point.op, "shape": shape_text(point.shape), "layout": point.layout,
                "features": point.features,
                "reduction": reducer.describe(), "feature_dim": d, "probe_params": (d + 1) * self.num_classes,
                "cache_MiB_per_1k": round(d * 4 * 1000 / 2**20, 2),
            })
        return pd.DataFrame(rows)

    def layout(self, metrics: list[str], attrs: dict) -> RunLayout:
        """The run's layout (its layer coordinates) for these metrics and attributes."""
        points = [self.graph.point(n) for n in self.layers]
        return RunLayout(
            layers=list(self.layers), depth=[p.depth for p in points], relative_depth=[p.relative_depth for p in points],
            op=[p.op for p in points], shape=[shape_text(p.shape) for p in points],
            feature_dim=[self.reducers[n].out_features for n in self.layers],
            reduction=[self.reducers[n].describe() for n in self.layers], metrics=metrics, attrs=attrs,
            layouts=[p.layout for p in points],
        )

    @property
    def candidates(self) -> dict[str, dict[str, slice]]:
        """The reductions each layer's features hold, ``{layer: {spec: column slice}}`` (several for ``auto`` on a map)."""
        return {name: self.reducers[name].candidates for name in self.layers}

    def __str__(self) -> str:
        frame = self.frame()
        total = frame.feature_dim.sum()
        return (
            f"probe plan: {len(frame)} layer{'s' if len(frame) != 1 else ''} of {type(self.graph.model).__name__}, "
            f"{self.num_classes} classes, "
            f"{total:,} probe features in all ({frame.probe_params.sum():,} probe parameters, "
            f"{frame.cache_MiB_per_1k.sum():.1f} MiB of cache per 1,000 examples)\n{frame.to_string(index=False)}"
        )

    def _repr_html_(self) -> str:
        return self.frame().to_html(index=False)


def build_plan(graph: LayerGraph, layers, reduce, *, num_classes: int, seed: int, budget: int, max_flatten: int,
               layouts: Mapping[str, str] | None = None, token_level: bool = False, examples: int | None = None) -> Plan:
    """The plan for an already traced model (arguments as for :func:`plan`, checked by the caller).

    ``examples``: the training split's size, when known; ``"auto"`` offers no pooling
    candidate wider than the data supports (see :func:`probekit.engine.reduce.make_reducer`).

    ``token_level``: a run with per-token labels; every probed point must then be a token
    sequence, and each reducer returns one row per labelled token.
    """
    for name, layout in (layouts or {}).items():
        graph.set_layout(name, layout)
    names = graph.resolve(layers)
    if isinstance(reduce, Mapping):
        unknown = [k for k in reduce if k not in names]
        if unknown:
            raise ValueError(f"reduce= names layers that are not probed: {unknown}; probed layers are {names}")
    unknown_layout = [n for n in names if graph.point(n).layout is None]
    if unknown_layout:
        example = ", ".join(f"{n!r}: 'tokens'" for n in unknown_layout[:2])
        raise ValueError(
            f"cannot tell whether {unknown_layout[:5]} ({shape_text(graph.point(unknown_layout[0]).shape)} per example) "
            f"{'is a token sequence' if len(unknown_layout) == 1 else 'are token sequences'} (tokens x hidden) or "
            f"1-D feature maps (channels x length); say which with layouts={{{example}}} (or 'map')"
        )
    if token_level:
        wrong = [n for n in names if graph.point(n).layout != "tokens"]
        if wrong:
            raise ValueError(
                f"per-token labels need points of the 'tokens' layout (tokens x hidden); {wrong[:5]} "
                f"{'is' if len(wrong) == 1 else 'are'} {graph.point(wrong[0]).layout}: pass layers= naming sequence "
                "outputs (see the layout column of pk.list_layers)"
            )
    reducers = {}
    for name in names:
        point = graph.point(name)
        spec = spec_for(reduce, name)
        if isinstance(reduce, str) and not token_level and not spec_fits(spec, point.layout):
            spec = "auto"  # one spec for every layer: it applies where it fits; the others get the default
        if spec == "auto" and point.recurrent and point.layout == "tokens" and not token_level:
            spec = "last"  # a recurrent layer's summary of its sequence is its last real step
        parse_spec(spec)
        reducers[name] = make_reducer(spec, point.shape, layer=name, layout=point.layout, token_level=token_level,
                                      seed=seed, budget=budget, max_flatten=max_flatten, examples=examples)
    return Plan(graph=graph, layers=names, reducers=reducers, num_classes=num_classes)


def plan(
    model: nn.Module,
    example_input: object,
    *,
    layers: str | Sequence[str] | None = None,
    reduce: str | Mapping[str, str] | None = None,
    num_classes: int = 10,
    budget: int = DEFAULT_BUDGET,
    max_flatten: int = DEFAULT_MAX_FLATTEN,
    seed: int = 0,
    tracer_kwargs: Mapping[str, object] | None = None,
    layouts: Mapping[str, str] | None = None,
) -> Plan:
    """Per layer: shape, reduction, probe size and cache memory, before any training.

    Args:
        model: any ``nn.Module`` (left as it was).
        example_input: one input batch.
        layers: probe point names (see :func:`probekit.list_layers`), ``"blocks"``
            (the default: input and each top-level block) or ``"all"``.
        reduce: one reduction for every layer or ``{layer: reduction}`` (see
            :mod:`probekit.engine.reduce`); the default ``"auto"`` pools a feature map at
            several sizes within ``budget`` features (a ``Pyramid``), takes the mask-aware
            ``"mean"`` of a token sequence (``"last"`` for a recurrent layer) and flattens a
            vector. A single spec for every layer applies where it fits (``"pool"`` to maps
            and sequences, ``"mean"``/``"first"``/``"last"``/``"max"`` to sequences) and leaves
            the other layers to ``"auto"``; a per-layer mapping is strict.
        num_classes: classes of the probing task (sizes the probes).
        budget: the ``"auto"`` policy's feature budget per probe.
        max_flatten: largest layer ``"flatten"`` accepts.
        seed: seed of random subsets and projections.
        tracer_kwargs: added to the tracer's defaults (see :func:`probekit.list_layers`).
        layouts: ``{layer: "map" | "tokens" | "vector"}`` where the inferred layout (the
            ``layout`` column of :func:`probekit.list_layers`) is wrong or unknown.

    Example:
        >>> print(pk.plan(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224), reduce="pool"))
    """
    check_params(_CONSTRAINTS, model=model, tracer_kwargs=tracer_kwargs, layouts=layouts, num_classes=num_classes,
                 budget=budget, max_flatten=max_flatten, seed=seed)
    graph = LayerGraph(model, example_input, tracer_kwargs=tracer_kwargs, layouts=layouts)
    return build_plan(graph, layers, reduce, num_classes=num_classes, seed=seed, budget=budget, max_flatten=max_flatten)
