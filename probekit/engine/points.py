"""Which points of a model can be probed: their names, shapes and depth.

A *probe point* is any intermediate value of a model's forward pass that
holds one tensor per example: module outputs (``conv1``, ``layer3.2``) and
functional nodes (a residual ``add``, an Inception ``cat``). Points are found
by tracing the model with ``torch.fx`` (torchvision's public ``NodePathTracer``,
so names are the module paths users know); a model that cannot be traced falls
back to forward hooks on its modules, with a warning.

This module owns :class:`ProbePoint`, :class:`LayerGraph` (discovery and name
resolution), :func:`list_layers`, the tracer's configuration (``tracer_kwargs=``),
and the two facts every later stage shares about a layer's output: which tensor
of it is probed (:func:`as_tensor`) and how its shape reads (:func:`probekit.params.shape_text`).
It is the start of the engine's path: it imports no other engine module (the
one forward pass that feeds the probes is :mod:`probekit.engine.extract`), and
never the run store, the diagnosis, the charts or the explorers.
"""

from __future__ import annotations

import difflib
import inspect
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
from torch import fx, nn

from probekit.engine.batch import batch_size, call_model, first_tensor, take
from probekit.params import check_params, choices, shape_text

__all__ = [
    "INPUT", "TRACER_KEYS", "TRACE_CONSTRAINTS", "LayerGraph", "ProbePoint", "as_tensor",
    "list_layers", "preserved_state", "tracer_options",
]

#: The name of the model's (first) input as a probe point.
INPUT = "input"
#: What ``tracer_kwargs=`` may set: keyword arguments of torchvision's ``NodePathTracer`` (a ``torch.fx.Tracer``).
TRACER_KEYS = ("leaf_modules", "autowrap_functions", "autowrap_modules")
#: Argument checks of everything that traces a model (:class:`LayerGraph`, :func:`list_layers`, and their callers).
TRACE_CONSTRAINTS = {"model": [nn.Module], "tracer_kwargs": [Mapping, None]}


def as_tensor(output: object) -> torch.Tensor:
    """The tensor a probe reads from a layer's output: the output, or its first tensor.

    Example:
        >>> as_tensor({"logits": torch.zeros(2, 3), "aux": None}).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, Sequence):
        for item in output:
            if isinstance(item, torch.Tensor):
                return item
    raise TypeError(f"a probed layer must output a tensor (or a tuple/dict holding one); got {type(output).__name__}")


@dataclass(frozen=True)
class ProbePoint:
    """One place in a model's forward pass where a probe can read features."""

    name: str
    op: str
    shape: tuple[int, ...]
    depth: int
    relative_depth: float
    aliases: tuple[str, ...] = ()
    train_only: bool = False
    module: str | None = None

    @property
    def features(self) -> int:
        return math.prod(self.shape)


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag on exit, whatever happens inside."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


def tracer_options(tracer_kwargs: Mapping[str, object] | None = None) -> dict[str, object]:
    """Keyword arguments for torchvision's ``NodePathTracer``: its documented defaults plus ``tracer_kwargs``.

    The defaults are those ``torchvision.models.feature_extraction`` documents:
    every module class of ``torchvision.ops`` (``StochasticDepth``,
    ``FrozenBatchNorm2d``, ...) stays one leaf node, and calls into ``math`` and
    ``torchvision.ops`` are kept as single calls. A user's ``leaf_modules``
    (module classes kept whole: one probe point each, never traced into),
    ``autowrap_functions`` (functions kept as single calls) and
    ``autowrap_modules`` (modules whose functions are kept as single calls)
    are added to them.

    Example:
        >>> options = tracer_options({"leaf_modules": [MyBlock]})
        >>> MyBlock in options["leaf_modules"]
        True
    """
    import torchvision.ops

    given = dict(tracer_kwargs or {})
    unknown = sorted(set(given) - set(TRACER_KEYS))
    if unknown:
        raise ValueError(f"tracer_kwargs has unknown keys {unknown}; it takes {choices(TRACER_KEYS)} (see torch.fx.Tracer)")
    for key, value in given.items():
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise TypeError(f"tracer_kwargs[{key!r}] must be a list or tuple; got {type(value).__name__}")
    leaves = given.get("leaf_modules", ())
    bad = [leaf for leaf in leaves if not (isinstance(leaf, type) and issubclass(leaf, nn.Module))]
    if bad:
        raise TypeError(f"tracer_kwargs['leaf_modules'] takes nn.Module classes (not instances); got {bad[:3]!r}")
    ops_modules = [value for _, value in sorted(vars(torchvision.ops).items())
                   if isinstance(value, type) and issubclass(value, nn.Module)]
    return {
        "leaf_modules": list(dict.fromkeys([*ops_modules, *leaves])),
        "autowrap_modules": tuple(dict.fromkeys([math, torchvision.ops, *given.get("autowrap_modules", ())])),
        "autowrap_functions": tuple(dict.fromkeys(given.get("autowrap_functions", ()))),
    }


class _ShapeRecorder(fx.Interpreter):
    """Runs a traced graph once, keeping each node's output shape, not its value."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module, garbage_collect_values=True)
        self.shapes: dict[str, tuple[int, ...] | None] = {}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        self.shapes[node.name] = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        return value


class LayerGraph:
    """The probe points of one model, found from an example input.

    Args:
        model: any ``nn.Module``; it is left exactly as it was found.
        example_input: one input batch (a tensor, or a tuple of the model's inputs);
            only its first two examples are run.
        tracer_kwargs: passed to torchvision's ``NodePathTracer`` on top of its
            defaults (see :func:`tracer_options`): ``leaf_modules`` (module classes
            kept whole, one probe point each), ``autowrap_functions``, ``autowrap_modules``.

    Example:
        >>> graph = LayerGraph(torchvision.models.resnet50(), torch.randn(2, 3, 224, 224))
        >>> graph.resolve(["layer3.2", "input"])
        ['input', 'layer3.2']
        >>> graph.point("layer3.2").name
        'layer3.2.relu_2'
    """

    def __init__(self, model: nn.Module, example_input: object, *, tracer_kwargs: Mapping[str, object] | None = None):
        check_params(TRACE_CONSTRAINTS, model=model, tracer_kwargs=tracer_kwargs)
        self.model = model
        self._batch = min(batch_size(example_input), 2)
        example = take(example_input, self._batch)
        self._signature, self._concrete = _forward_binding(model, example)
        tracer = tracer_options(tracer_kwargs)
        self._graphs: dict[str, fx.Graph] = {}
        self._node_of: dict[str, str] = {}  # probe point name -> fx node name
        try:
            self._trace_graphs(tracer)
            self.traced = True
        except Exception as error:  # noqa: BLE001 - any tracing failure falls back to hooks
            warnings.warn(
                f"{type(model).__name__} cannot be traced with torch.fx ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "probing module outputs with forward hooks instead (functional nodes such as residual adds are not available). "
                "To trace it, keep the module that fails whole with tracer_kwargs={'leaf_modules': [ThatModule]}",
                stacklevel=3,
            )
            self.traced = False
        self.points = self._graph_points(example) if self.traced else self._hook_points(example)
        self._by_name = {p.name: p for p in self.points}
        self._aliases = {alias: p for p in self.points for alias in p.aliases}

    # ------------------------------------------------------------------ discovery
    def graph_args(self, inputs: object) -> tuple:
        """A batch as the traced graph's positional inputs: one value per parameter of the model's ``forward``."""
        if self._signature is None:
            return tuple(inputs.values()) if isinstance(inputs, Mapping) else (
                tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,))
        bound = _bind(self.model, self._signature, inputs)
        bound.apply_defaults()
        return tuple(bound.arguments[name] for name in self._signature.parameters)

    def _trace_graphs(self, options: dict[str, object]) -> None:
        from torchvision.models.feature_extraction import NodePathTracer

        self._names: dict[str, dict[str, str]] = {}
        with preserved_state(self.model):
            for mode in ("eval", "train"):
                self.model.train(mode == "train")
                tracer = NodePathTracer(**options)
                self._graphs[mode] = tracer.trace(self.model, concrete_args=self._concrete)
                self._names[mode] = {node.name: qualname for node, qualname in tracer.node_to_qualname.items()}

    def _graph_points(self, example: tuple) -> list[ProbePoint]:
        names = self._names
        eval_names, train_names = set(names["eval"].values()), set(names["train"].values())
        # Train-only nodes (Inception's aux head) are offered when the train graph
        # is a superset; they are then run from the train graph, modules in eval mode.
        self._base = "train" if eval_names < train_names else "eval"
        if self._base == "eval":
            self._graphs.pop("train")
        graph = self._graphs[self._base]
        qualname = names[self._base]

        try:
            shapes = self._shapes(graph, example)
        except Exception as error:  # noqa: BLE001 - retried on the eval graph, else one line on the input
            if self._base == "train":
                # Train-only branches (an aux head) may not fit this input size; the eval graph may.
                self._base, graph, qualname = "eval", self._graphs["eval"], names["eval"]
                self._graphs.pop("train")
                try:
                    shapes = self._shapes(graph, example)
                except Exception as retry:  # noqa: BLE001
                    raise self._input_error(example, retry) from retry
                warnings.warn(
                    f"train-only layers of {type(self.model).__name__} (e.g. an auxiliary head) cannot run on this input "
                    f"({str(error).splitlines()[0][:120]}); they are not offered as probe points", stacklevel=4,
                )
            else:
                raise self._input_error(example, error) from error

        nodes = [
            n for n in graph.nodes
            if n.op not in ("output", "get_attr") and shapes.get(n.name) and len(shapes[n.name]) >= 1
            and shapes[n.name][0] == self._batch
        ]
        placeholders = [n for n in nodes if n.op == "placeholder"]
        point_names = {}
        for i, node in enumerate(placeholders):
            point_names[node.name] = INPUT if i == 0 else f"{INPUT}_{i}"
        for node in nodes:
            point_names.setdefault(node.name, qualname.get(node.name, node.name))
        # A container module's output is its last node: 'layer3.2' names 'layer3.2.relu_2'.
        last_node: dict[str, str] = {}
        for node in nodes:
            parts = qualname.get(node.name, "").split(".")
            for k in range(1, len(parts)):
                last_node[".".join(parts[:k])] = node.name
        containers = {name for name, module in self.model.named_modules() if name and any(True for _ in module.children())}
        aliases: dict[str, list[str]] = {}
        for container, node_name in last_node.items():
            if container in containers:
                aliases.setdefault(node_name, []).append(container)
        module_calls: dict[str, int] = {}
        for node in nodes:
            if node.op == "call_module":
                module_calls[node.target] = module_calls.get(node.target, 0) + 1

        points = []
        last = max(len(nodes) - 1, 1)
        for depth, node in enumerate(nodes):
            name = point_names[node.name]
            self._node_of[name] = node.name
            op = "input" if node.op == "placeholder" else (
                type(self.model.get_submodule(node.target)).__name__ if node.op == "call_module"
                else getattr(node.target, "__name__", str(node.target))
            )
            module = node.target if node.op == "call_module" and module_calls.get(node.target) == 1 else None
            points.append(ProbePoint(
                name=name, op=op, shape=shapes[node.name][1:], depth=depth, relative_depth=depth / last,
                aliases=tuple(sorted(aliases.get(node.name, []), key=len, reverse=True)),
                train_only=self._base == "train" and qualname.get(node.name) not in eval_names and node.op != "placeholder",
                module=module,
            ))
        return points

    def _shapes(self, graph: fx.Graph, example: tuple) -> dict[str, tuple[int, ...] | None]:
        with preserved_state(self.model), torch.no_grad():
            self.model.eval()
            recorder = _ShapeRecorder(fx.GraphModule(self.model, graph))
            recorder.run(*self.graph_args(example))
        return recorder.shapes

    def _input_error(self, example: object, error: Exception) -> ValueError:
        first = first_tensor(example)
        shape = shape_text(first.shape[1:]) if isinstance(first, torch.Tensor) else type(first).__name__
        return ValueError(
            f"{type(self.model).__name__} cannot run on an input of per-example shape {shape} "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); check the input's size and channels"
        )

    def _hook_points(self, example: tuple) -> list[ProbePoint]:
        order: dict[str, tuple[int, ...]] = {}
        handles = []

        def recorder(name: str) -> Callable:
            def hook(module, args, output):
                try:
                    tensor = as_tensor(output)
                except TypeError:
                    return
                if tensor.dim() >= 1 and tensor.shape[0] == self._batch:
                    order.pop(name, None)  # a module called twice counts at its last call
                    order[name] = tuple(tensor.shape[1:])
            return hook

        for name, module in self.model.named_modules():
            if name:
                handles.append(module.register_forward_hook(recorder(name)))
        try:
            with preserved_state(self.model), torch.no_grad():
                self.model.eval()
                call_model(self.model, example)
        except Exception as error:  # noqa: BLE001 - one line naming the input
            raise self._input_error(example, error) from error
        finally:
            for handle in handles:
                handle.remove()
        first = first_tensor(example)
        entries = [(INPUT, tuple(first.shape[1:]), "input")]
        # Hooks fire when a module *finishes*: a container after its children.
        entries += [(name, shape, type(self.model.get_submodule(name)).__name__) for name, shape in order.items()]
        last = max(len(entries) - 1, 1)
        return [
            ProbePoint(name=name, op=op, shape=shape, depth=i, relative_depth=i / last, module=None if name == INPUT else name)
            for i, (name, shape, op) in enumerate(entries)
        ]

    # ------------------------------------------------------------------ names
    @property
    def names(self) -> list[str]:
        return [p.name for p in self.points]

    def frame(self) -> pd.DataFrame:
        """The probe points as a table, one row each, in forward order."""
        return pd.DataFrame({
            "name": [p.name for p in self.points],
            "aliases": [", ".join(p.aliases) for p in self.points],
            "op": [p.op for p in self.points],
            "shape": [shape_text(p.shape) for p in self.points],
            "features": [p.features for p in self.points],
            "depth": [p.depth for p in self.points],
            "relative_depth": [round(p.relative_depth, 4) for p in self.points],
            "train_only": [p.train_only for p in self.points],
        })

    def point(self, name: str) -> ProbePoint:
        """The probe point called ``name`` (a node name, a container alias or ``'input'``)."""
        if name in self._by_name:
            return self._by_name[name]
        if name in self._aliases:
            return self._aliases[name]
        candidates = list(self._by_name) + list(self._aliases)
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
        hint = f"closest: {', '.join(repr(c) for c in close)}" if close else f"valid names start with: {', '.join(repr(c) for c in candidates[:5])}"
        raise ValueError(
            f"unknown layer {name!r} for {type(self.model).__name__}; {hint}. "
            f"Use pk.list_layers(model, example_input) to see all {len(self.points)} probe points."
        )

    def blocks(self) -> list[str]:
        """Default probe points: the input and the output of each top-level block.

        Top-level children of the model count as blocks; a child that is a plain
        container (``Sequential``, ``ModuleList``, ``ModuleDict``) is opened one level,
        so ResNet's ``layer1`` gives ``layer1.0``, ``layer1.1``, ...
        """
        wanted = [INPUT]
        for name, child in self.model.named_children():
            if isinstance(child, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and any(True for _ in child.children()):
                wanted += [f"{name}.{sub}" for sub, _ in child.named_children()]
            else:
                wanted.append(name)
        known = set(self._by_name) | set(self._aliases)
        return _unique_points(self, [w for w in wanted if w in known])

    def resolve(self, layers: str | Sequence[str] | None) -> list[str]:
        """Turn a ``layers=`` argument into probe point names, in forward order.

        ``None`` means the model's own ``probe_layers`` attribute if it has one,
        else ``"blocks"``; ``"all"`` means every probe point.
        """
        if layers is None:
            layers = getattr(self.model, "probe_layers", None) or "blocks"
        if isinstance(layers, str):
            if layers == "blocks":
                return self.blocks()
            if layers == "all":
                return self.names
            layers = [layers]
        layers = list(layers)
        if not layers:
            raise ValueError("layers= is empty; pass layer names, 'blocks' or 'all' (see pk.list_layers)")
        for name in layers:
            if not isinstance(name, str):
                raise TypeError(f"layer names must be strings; got {name!r} ({type(name).__name__})")
            self.point(name)
        if len(set(layers)) != len(layers):
            dupes = sorted({n for n in layers if layers.count(n) > 1})
            raise ValueError(f"layers= names {dupes} more than once; name each probe point once")
        return sorted(layers, key=lambda n: self.point(n).depth)

    # ------------------------------------------------------------------ for extraction
    def source_graph(self, names: Sequence[str]) -> tuple[fx.Graph, dict[str, str]]:
        """The traced graph that computes every point in ``names``, and each point's node name in it.

        That is the eval-mode graph, or the train-mode one when a point exists only
        there (an auxiliary head); either runs with the modules as the caller set them.
        Node names differ between the two graphs (a train-only branch shifts the
        numbering of the nodes after it), so points are matched by their qualified names.
        """
        if not self.traced:
            raise ValueError(f"{type(self.model).__name__} was not traced (it is probed with forward hooks); it has no graph")
        mode = "train" if any(self.point(n).train_only for n in names) else "eval"
        mode = mode if mode in self._graphs else self._base
        nodes = {name: self._node_of[self.point(name).name] for name in names}
        if mode != self._base:
            qualname = self._names[self._base]
            node_of_qualname = {q: node for node, q in self._names[mode].items()}
            nodes = {name: node_of_qualname.get(qualname.get(node), node) for name, node in nodes.items()}
        return self._graphs[mode], nodes


def _bind(model: nn.Module, signature: inspect.Signature, inputs: object) -> inspect.BoundArguments:
    try:
        if isinstance(inputs, Mapping):
            return signature.bind(**inputs)
        if isinstance(inputs, (tuple, list)):
            return signature.bind(*inputs)
        return signature.bind(inputs)
    except TypeError as error:
        given = f"keys {sorted(inputs)}" if isinstance(inputs, Mapping) else f"{len(inputs) if isinstance(inputs, (tuple, list)) else 1} positional"
        raise TypeError(
            f"the batch ({given}) does not fit {type(model).__name__}.forward{signature}: {error}; "
            "pass a mapping of its keyword arguments or a tuple of its positional ones"
        ) from None


def _forward_binding(model: nn.Module, example: object) -> tuple[inspect.Signature | None, dict[str, object] | None]:
    """The model's ``forward`` signature and the arguments tracing fixes to constants.

    Parameters the batch does not give keep their defaults, and non-tensor values the
    batch gives (flags such as ``use_cache=False``) stay constants, so that tracing
    follows the branch the model takes for this batch (``if mask is not None``).
    A ``forward(*args, **kwargs)`` is traced as it is (``None, None``).
    """
    try:
        signature = inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None, None
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in signature.parameters.values()):
        return None, None
    bound = _bind(model, signature, example)
    concrete = {}
    for name, parameter in signature.parameters.items():
        if name not in bound.arguments:
            if parameter.default is not parameter.empty:
                concrete[name] = parameter.default
        elif bound.arguments[name] is None or isinstance(bound.arguments[name], (bool, int, float, str)):
            concrete[name] = bound.arguments[name]
    return signature, concrete


def _unique_points(graph: LayerGraph, names: list[str]) -> list[str]:
    seen, result = set(), []
    for name in names:
        depth = graph.point(name).depth
        if depth not in seen:
            seen.add(depth)
            result.append(name)
    return result


def list_layers(model: nn.Module, example_input: object, *, tracer_kwargs: Mapping[str, object] | None = None) -> pd.DataFrame:
    """Every point of ``model`` a probe can read, in forward order.

    Args:
        model: any ``nn.Module``; left exactly as it was.
        example_input: one batch of inputs (only its first two examples are used).
        tracer_kwargs: added to the tracer's defaults (see :func:`tracer_options`): e.g.
            ``{"leaf_modules": [MyBlock]}`` keeps every ``MyBlock`` as one probe point, and
            lets a model trace whose ``MyBlock`` has data-dependent control flow.

    Returns:
        A DataFrame with one row per probe point: ``name`` (what ``layers=`` takes),
        ``aliases`` (container modules that end at this point, also accepted),
        ``op``, per-example ``shape``, ``features``, ``depth`` (forward order),
        ``relative_depth`` (0 at the input, 1 at the output) and ``train_only``.

    Example:
        >>> import torchvision, probekit as pk
        >>> table = pk.list_layers(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))
        >>> table[table.aliases != ""].name.tolist()[:2]
        ['layer1.0.relu_2', 'layer1.1.relu_2']
    """
    return LayerGraph(model, example_input, tracer_kwargs=tracer_kwargs).frame()
