"""Which points of a model can be probed, their names, shapes and depth.

A *probe point* is any intermediate value of a model's forward pass that
holds one tensor per example: module outputs (``conv1``, ``layer3.2``) and
functional nodes (a residual ``add``, an Inception ``cat``). Points are found
by tracing the model with ``torch.fx`` (torchvision's ``NodePathTracer``, so
names are the module paths users know); a model that cannot be traced falls
back to forward hooks on its modules, with a warning.

:func:`list_layers` shows them; :class:`LayerGraph` resolves names and builds
the :class:`Extractor` that feeds every probe from **one** forward pass,
reducing each feature map right where it is produced.
"""

from __future__ import annotations

import difflib
import math
import operator
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
from torch import fx, nn

from probekit.engine.reduce import Reducer

INPUT = "input"
#: Layer selectors accepted by ``layers=`` besides explicit names.
SELECTORS = ("blocks", "all")


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

    @property
    def shape_text(self) -> str:
        return "x".join(str(s) for s in self.shape) if self.shape else "scalar"


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag on exit, whatever happens inside."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run torch with ``threads`` threads in this thread for the block, then as before.

    Many small operations each split across cores wait at a barrier for every
    core; on a shared machine one descheduled thread stalls them all (a
    10-50x slowdown measured on 2 busy cores), and they are too small to gain
    from more than one core anyway. ``torch.set_num_threads`` sets the calling
    thread's team size and a process-wide default for threads started later,
    which is put back on exit.
    """
    saved = torch.get_num_threads()
    if saved == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def as_args(example: object) -> tuple:
    """The positional arguments a model is called with for one input batch."""
    return tuple(example) if isinstance(example, (tuple, list)) else (example,)


def batch_size_of(example: object) -> int:
    first = as_args(example)[0]
    if not isinstance(first, torch.Tensor) or first.dim() == 0:
        raise TypeError(f"the example input must be a batched tensor (or a tuple starting with one); got {type(first).__name__}")
    return first.shape[0]


def _tracer_kwargs() -> dict:
    # torchvision's own defaults: its ops (e.g. StochasticDepth) stay leaves.
    from torchvision.models import feature_extraction

    return feature_extraction._set_default_tracer_kwargs(None)


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
        example: one input batch (a tensor, or a tuple of the model's inputs).

    Example:
        >>> graph = LayerGraph(model, torch.randn(2, 3, 224, 224))
        >>> [p.name for p in graph.resolve(["input", "layer3.2"])]
        ['input', 'layer3.2']
    """

    def __init__(self, model: nn.Module, example: object):
        self.model = model
        self._batch = min(batch_size_of(example), 2)
        example = tuple(a[: self._batch] if isinstance(a, torch.Tensor) else a for a in as_args(example))
        self._graphs: dict[str, fx.Graph] = {}
        self._node_of: dict[str, str] = {}  # probe point name -> fx node name
        try:
            self._trace_graphs()
            self.traced = True
        except Exception as error:  # noqa: BLE001 - any tracing failure falls back to hooks
            warnings.warn(
                f"{type(model).__name__} cannot be traced with torch.fx ({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                "probing module outputs with forward hooks instead (functional nodes such as residual adds are not available)",
                stacklevel=3,
            )
            self.traced = False
        self.points = self._graph_points(example) if self.traced else self._hook_points(example)
        self._by_name = {p.name: p for p in self.points}
        self._aliases = {alias: p for p in self.points for alias in p.aliases}

    # ------------------------------------------------------------------ discovery
    def _trace_graphs(self) -> None:
        tracer_kwargs = _tracer_kwargs()
        self._names: dict[str, dict[str, str]] = {}
        with preserved_state(self.model):
            for mode in ("eval", "train"):
                self.model.train(mode == "train")
                tracer = torchvision_tracer(**tracer_kwargs)
                self._graphs[mode] = tracer.trace(self.model)
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
            recorder.run(*example)
        return recorder.shapes

    def _input_error(self, example: tuple, error: Exception) -> ValueError:
        first = example[0]
        shape = "x".join(map(str, first.shape[1:])) if isinstance(first, torch.Tensor) else type(first).__name__
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
                    tensor = reducer_input(output)
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
                self.model(*example)
        except Exception as error:  # noqa: BLE001 - one line naming the input
            raise self._input_error(example, error) from error
        finally:
            for handle in handles:
                handle.remove()
        first = as_args(example)[0]
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
            "shape": [p.shape_text for p in self.points],
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
            f"Use pk.list_layers(model, example) to see all {len(self.points)} probe points."
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

    # ------------------------------------------------------------------ extraction
    def extractor(self, reducers: Mapping[str, Reducer]) -> Extractor:
        """An :class:`Extractor` returning ``{name: reducers[name](output)}`` per batch."""
        if self.traced:
            return _GraphExtractor(self, reducers)
        return HookExtractor(self, reducers)


def torchvision_tracer(**kwargs):
    from torchvision.models.feature_extraction import NodePathTracer

    return NodePathTracer(**kwargs)


def _unique_points(graph: LayerGraph, names: list[str]) -> list[str]:
    seen, result = set(), []
    for name in names:
        depth = graph.point(name).depth
        if depth not in seen:
            seen.add(depth)
            result.append(name)
    return result


def reducer_input(output: object) -> torch.Tensor:
    from probekit.engine.reduce import _as_tensor

    return _as_tensor(output)


class Extractor:
    """Callable: one forward pass of the model, returning reduced features per layer."""

    names: list[str]

    def __call__(self, *inputs) -> dict[str, torch.Tensor]:
        return self.run(*inputs)


class _GraphExtractor(Extractor):
    """Runs a copy of the traced graph whose outputs are the reduced probe points.

    Each reducer is inserted right after its node, so it reads the value before
    any later in-place op can change it, and full-size maps are freed as soon
    as the rest of the graph no longer needs them. Nodes that no probe point
    needs (the model's head, when only early layers are probed) are dropped.
    """

    def __init__(self, graph: LayerGraph, reducers: Mapping[str, Reducer]):
        self.names = list(reducers)
        points = [graph.point(n) for n in self.names]
        mode = "train" if any(p.train_only for p in points) else "eval"
        source = graph._graphs.get(mode, graph._graphs[graph._base])
        new = fx.Graph()
        value_map: dict[fx.Node, fx.Node] = {}
        new.graph_copy(source, value_map)
        by_name = {node.name: node for node in new.nodes}
        outputs = {}
        root: dict[str, object] = {}
        for i, (name, point) in enumerate(zip(self.names, points)):
            node = by_name[graph._node_of[point.name]]
            target = f"probekit_reduce_{i}"
            root[target] = reducers[name]
            with new.inserting_after(node):
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

    def run(self, *inputs) -> dict[str, torch.Tensor]:
        return self.module(*inputs)

    def to(self, device) -> _GraphExtractor:
        for name, module in self.module.named_children():
            if name.startswith("probekit_reduce_"):
                module.to(device)
        return self


class HookExtractor(Extractor):
    """Forward hooks on modules: used for models fx cannot trace, and for online monitoring.

    While attached (``attach()`` / ``detach()``) the hooks capture reduced features
    on every forward pass of the model, including the user's own training steps;
    ``latest`` holds the last batch's features.
    """

    def __init__(self, graph: LayerGraph, reducers: Mapping[str, Reducer], *, modules: Mapping[str, str] | None = None):
        self.model = graph.model
        self.names = list(reducers)
        self.reducers = dict(reducers)
        self.modules = dict(modules) if modules is not None else {n: graph.point(n).module for n in self.names}
        self.latest: dict[str, torch.Tensor] = {}
        self._handles: list = []

    def attach(self) -> None:
        if self._handles:
            return
        for name in self.names:
            reducer = self.reducers[name]
            module_name = self.modules[name]
            if module_name is None:
                self._handles.append(self.model.register_forward_pre_hook(self._pre_hook(name, reducer)))
            else:
                module = self.model.get_submodule(module_name)
                self._handles.append(module.register_forward_hook(self._hook(name, reducer)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _hook(self, name: str, reducer: Reducer) -> Callable:
        def hook(module, args, output):
            with torch.no_grad():
                self.latest[name] = reducer(output)
        return hook

    def _pre_hook(self, name: str, reducer: Reducer) -> Callable:
        def hook(module, args):
            with torch.no_grad():
                self.latest[name] = reducer(args[0])
        return hook

    def run(self, *inputs) -> dict[str, torch.Tensor]:
        self.attach()
        try:
            self.latest = {}
            self.model(*inputs)
            return dict(self.latest)
        finally:
            self.detach()

    def to(self, device) -> HookExtractor:
        for reducer in self.reducers.values():
            reducer.to(device)
        return self


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


def list_layers(model: nn.Module, example_input: object) -> pd.DataFrame:
    """Every point of ``model`` a probe can read, in forward order.

    Args:
        model: any ``nn.Module``; left exactly as it was.
        example_input: one batch of inputs (only its first two examples are used).

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
    return LayerGraph(model, example_input).frame()
