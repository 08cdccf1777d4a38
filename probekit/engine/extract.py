"""One forward pass of the model feeds every probe: reduced features per probe point.

:func:`build_extractor` builds the callable for a :class:`~probekit.engine.points.LayerGraph`
and one reducer per layer: a copy of the traced graph whose outputs are the
reduced probe points (:class:`GraphExtractor`), or, for a model fx cannot trace,
forward hooks on its modules (:class:`HookExtractor`, also the online monitor's
way of reading the user's own training steps). Each reducer runs right where
its point is produced, so full-size feature maps are freed early and later
in-place operations cannot change what a probe reads.

This module owns the extractors and the in-place rewriting of residual adds. It
imports :mod:`~probekit.engine.points` and :mod:`~probekit.engine.reduce` (and the
batch forms beside them) and no later stage of the engine; never the run store, the diagnosis, the charts or the explorers.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping

import torch
from torch import fx, nn

from probekit.engine.batch import MASK_KEY, attention_mask, call_model
from probekit.engine.points import LayerGraph, read_point
from probekit.engine.reduce import _SMALL_MAP, Pyramid, Reducer

__all__ = ["Extractor", "GraphExtractor", "HookExtractor", "build_extractor"]


def build_extractor(graph: LayerGraph, reducers: Mapping[str, Reducer], *, mask_key: str = MASK_KEY) -> Extractor:
    """The one-pass extractor of ``graph``'s model: ``{name: reducers[name](output)}`` per batch.

    Args:
        graph: the model's probe points.
        reducers: one reducer per probe point to read, by name (see :func:`probekit.engine.reduce.make_reducer`).
        mask_key: the key of a mapping batch's mask of real tokens, used when ``mask=`` is not given.

    Example:
        >>> graph = LayerGraph(model, x[:2])
        >>> run = build_extractor(graph, {"fc1": make_reducer("flatten", graph.point("fc1").shape, layer="fc1")})
        >>> run(x)["fc1"].shape
        torch.Size([64, 32])
    """
    if graph.traced:
        extractor: Extractor = GraphExtractor(graph, reducers)
    else:
        points = {name: graph.point(name) for name in reducers}
        extractor = HookExtractor(graph.model, reducers, {name: p.module for name, p in points.items()},
                                  readers={name: p.read for name, p in points.items()})
    extractor.mask_key = mask_key
    return extractor


class Extractor:
    """Callable: one forward pass of the model on one batch, returning reduced features per layer.

    ``extractor(inputs, *, mask=None, tokens=None)``: ``inputs`` is a batch in any of the
    forms of :mod:`probekit.engine.batch` (a tensor, positional tuple or keyword mapping).
    ``mask`` is the ``(N, T)`` mask of real tokens the sequence reductions use (``None``:
    the batch's ``mask_key`` entry, else every token is real); ``tokens`` the ``(N, T)``
    labelled tokens of a token-level run, whose reducers return one row per labelled token.
    """

    names: list[str]
    reducers: dict[str, Reducer]
    mask_key: str = MASK_KEY

    def __call__(self, inputs: object, *, mask: torch.Tensor | None = None,
                 tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if mask is None:
            mask = attention_mask(inputs, self.mask_key)
        for reducer in self.reducers.values():
            reducer.batch_mask, reducer.batch_tokens = mask, tokens
        try:
            return self.run(inputs, mask=mask, tokens=tokens)
        finally:
            for reducer in self.reducers.values():
                reducer.batch_mask = reducer.batch_tokens = None

    def run(self, inputs: object, *, mask: torch.Tensor | None = None,
            tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class GraphExtractor(Extractor):
    """Runs a copy of the traced graph whose outputs are the reduced probe points.

    Each reducer is inserted right after its node, so it reads the value before
    any later in-place op can change it, and full-size maps are freed as soon
    as the rest of the graph no longer needs them. Nodes that no probe point
    needs (the model's head, when only early layers are probed) are dropped.
    """

    def __init__(self, graph: LayerGraph, reducers: Mapping[str, Reducer]):
        self.names = list(reducers)
        self.reducers = dict(reducers)
        self.graph = graph
        source, nodes = graph.source_graph(self.names)
        new = fx.Graph()
        value_map: dict[fx.Node, fx.Node] = {}
        new.graph_copy(source, value_map)
        by_name = {node.name: node for node in new.nodes}
        outputs = {}
        root: dict[str, object] = {}
        for i, name in enumerate(self.names):
            node = by_name[nodes[name]]
            target = f"probekit_reduce_{i}"
            root[target] = reducers[name]
            point = graph.point(name)
            with new.inserting_after(node):
                if point.field is not None or point.batch_dim:
                    # A field of a structured output (an RNN's sequence), examples first.
                    read = new.call_function(read_point, (node, point.field, point.batch_dim))
                    with new.inserting_after(read):
                        outputs[name] = new.call_module(target, (read,))
                else:
                    outputs[name] = new.call_module(target, (node,))
        new.output(outputs)
        _add_in_place(new, graph.model)
        for node in new.nodes:
            if node.op in ("call_module", "get_attr") and node.target not in root:
                root[node.target] = _fetch(graph.model, node.target)
        self.module = fx.GraphModule(root, new, class_name=f"{type(graph.model).__name__}Probes")
        self.module.graph.eliminate_dead_code()
        self.module.recompile()
        self.module.delete_all_unused_submodules()

    def run(self, inputs: object, *, mask: torch.Tensor | None = None,
            tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return self.module(*self.graph.graph_args(inputs))

    def to(self, device) -> GraphExtractor:
        for name, module in self.module.named_children():
            if name.startswith("probekit_reduce_"):
                module.to(device)
        return self


class HookExtractor(Extractor):
    """Forward hooks on modules: used for models fx cannot trace, and for online monitoring.

    Args:
        model: the model whose modules are hooked.
        reducers: one reducer per probe point, by name.
        modules: the module each point reads (its output), by point name; ``None``
            reads the model's first input.
        readers: per point name, what of the module's output is probed (see
            :meth:`~probekit.engine.points.ProbePoint.read`); default: its hidden state.

    While attached (``attach()`` / ``detach()``) the hooks capture reduced features
    on every forward pass of the model, including the user's own training steps;
    ``latest`` holds the last batch's features.
    """

    def __init__(self, model: nn.Module, reducers: Mapping[str, Reducer], modules: Mapping[str, str | None],
                 readers: Mapping[str, Callable[[object], torch.Tensor]] | None = None):
        self.model = model
        self.names = list(reducers)
        self.reducers = dict(reducers)
        self.modules = dict(modules)
        self.readers = dict(readers or {})
        self.latest: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def attach(self) -> None:
        if self._handles:
            return
        for name in self.names:
            reducer = self.reducers[name]
            module_name = self.modules[name]
            if module_name is None:
                self._handles.append(self.model.register_forward_pre_hook(self._pre_hook(name, reducer), with_kwargs=True))
            else:
                module = self.model.get_submodule(module_name)
                self._handles.append(module.register_forward_hook(self._hook(name, reducer)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str, reducer: Reducer) -> Callable:
        read = self.readers.get(name)

        def hook(module, args, output):
            with torch.no_grad():
                self.latest[name] = reducer(_one_layout(reducer, read(output) if read is not None else output))
        return hook

    def _pre_hook(self, name: str, reducer: Reducer) -> Callable:
        def hook(module, args, kwargs):
            with torch.no_grad():
                value = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
                self.latest[name] = reducer(_one_layout(reducer, value))
        return hook

    def run(self, inputs: object, *, mask: torch.Tensor | None = None,
            tokens: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        self.attach()
        try:
            self.latest = {}
            call_model(self.model, inputs)
            return dict(self.latest)
        finally:
            self.detach()

    def to(self, device) -> HookExtractor:
        for reducer in self.reducers.values():
            reducer.to(device)
        return self


def _one_layout(reducer: Reducer, value: object) -> object:
    """A small CPU feature map that a pyramid of poolings reads, in channels-last memory once for all of them.

    Each pooling of a small NCHW map on the CPU runs through a channels-last copy
    (see :class:`~probekit.engine.reduce.Pool`); given that layout already, none
    copies, so the map is copied once per point instead of once per pooling.
    """
    if (isinstance(reducer, Pyramid) and isinstance(value, torch.Tensor) and value.dim() == 4
            and value.device.type == "cpu" and value.shape[0] and value[0].numel() <= _SMALL_MAP
            and value.is_contiguous()):
        return value.detach().contiguous(memory_format=torch.channels_last)
    return value


#: Modules whose output is always a new tensor (never a view of their input or a parameter).
_FRESH_OUTPUTS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear, nn.modules.batchnorm._BatchNorm)


def _add_in_place(graph: fx.Graph, model: nn.Module) -> None:
    """Let ``a + b`` reuse ``a``'s memory where nothing else can tell the difference.

    Tracing records a residual ``out += identity`` as an out-of-place add, which
    allocates a new full-size map per block (with ResNet-50 at batch 32, 100 MB
    each in the first stage) where the model itself reuses ``out``. An add
    whose first operand is the fresh output of a conv, linear or norm module,
    read by nothing else (no probe either), calls :func:`_add_into_first`,
    which adds in place when the result has ``a``'s shape and dtype anyway.
    """
    for node in graph.nodes:
        if node.op != "call_function" or node.target not in (operator.add, torch.add) or node.kwargs or len(node.args) != 2:
            continue
        first = node.args[0]
        if (isinstance(first, fx.Node) and first.op == "call_module" and len(first.users) == 1
                and isinstance(model.get_submodule(first.target), _FRESH_OUTPUTS)):
            node.target = _add_into_first


def _add_into_first(a: object, b: object) -> object:
    """``a + b``, computed into ``a`` when that gives the same shape and dtype (see :func:`_add_in_place`)."""
    if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and not a.requires_grad
            and a.dtype == torch.result_type(a, b) and a.shape == torch.broadcast_shapes(a.shape, b.shape)):
        return a.add_(b)
    return a + b


def _fetch(model: nn.Module, target: str) -> object:
    value: object = model
    for part in target.split("."):
        value = getattr(value, part)
    return value
