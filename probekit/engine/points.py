"""Which points of a model can be probed: their names, shapes, layouts and depth.

A *probe point* is any intermediate value of a model's forward pass that
holds one tensor per example: module outputs (``conv1``, ``layer3.2``,
``encoder.layer.3``) and functional nodes (a residual ``add``, an Inception
``cat``). Points are found by tracing the model with ``torch.fx``
(torchvision's public ``NodePathTracer``, so names are the module paths users
know); a model that cannot be traced (most Hugging Face ``transformers``
models) falls back to forward hooks on its modules, with a warning, and gets
the same default points and names.

Each point has a *layout*: ``"map"`` (channels first, ``C x H x W``),
``"tokens"`` (a sequence, channels last, ``T x H``) or ``"vector"``. It is
inferred from the module that produces the point (convolutions, batch norms
and pooling make maps; linear layers, embeddings, layer norms, attention,
transformer blocks and recurrent layers make token sequences) and can be set
per layer with ``layouts={layer: layout}``. A module whose output is a tuple
or a ``ModelOutput`` is read at its hidden state (``reads``: ``output[0]``,
``last_hidden_state``); ``"name:field"`` reads another field (``"h.0:1"``,
``"encoder:pooler_output"``).

This module owns :class:`ProbePoint`, :class:`LayerGraph` (discovery and name
resolution), :func:`list_layers`, the tracer's configuration
(``tracer_kwargs=``), :func:`preserved_state` and the two facts every later
stage shares about a layer's output: which tensor of it is probed
(:func:`as_tensor`, :meth:`ProbePoint.read`) and how its shape reads
(:func:`probekit.params.shape_text`). It imports :mod:`~probekit.engine.batch`
(what a batch is) and the run schema's layout names, and no later engine
module (the one forward pass that feeds the probes is
:mod:`probekit.engine.extract`); never the run store, the diagnosis, the
charts or the explorers.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import re
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import pandas as pd
import torch
from torch import fx, nn

from probekit.engine.batch import batch_size, call_model, first_tensor, take
from probekit.params import check_params, choices, shape_text
from probekit.run.schema import LAYOUTS

__all__ = [
    "INPUT", "LAYOUTS", "TRACER_KEYS", "TRACE_CONSTRAINTS", "LayerGraph", "ProbePoint", "as_tensor", "hidden_field",
    "list_layers", "preserved_state", "read_field", "read_point", "tracer_options",
]

#: The name of the model's (first) input as a probe point.
INPUT = "input"
#: What ``tracer_kwargs=`` may set: keyword arguments of torchvision's ``NodePathTracer`` (a ``torch.fx.Tracer``).
TRACER_KEYS = ("leaf_modules", "autowrap_functions", "autowrap_modules")
#: Argument checks of everything that traces a model (:class:`LayerGraph`, :func:`list_layers`, and their callers).
TRACE_CONSTRAINTS = {"model": [nn.Module], "tracer_kwargs": [Mapping, None], "layouts": [Mapping, None]}
#: The two batch sizes shapes are discovered with: a dim that follows them is the batch dim.
_DISCOVERY_SIZES = (2, 3)

#: Modules whose output is channels first (a 1-D map when it has two dims per example).
_MAP_MODULES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.pooling._AvgPoolNd,
                nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                nn.modules.pooling._AdaptiveMaxPoolNd, nn.modules.instancenorm._InstanceNorm, nn.GroupNorm)
#: Modules whose output is channels last: a (tokens x hidden) sequence when it has two dims per example.
_TOKEN_MODULES = (nn.Linear, nn.Embedding, nn.LayerNorm, nn.MultiheadAttention, nn.RNNBase,
                  nn.TransformerEncoderLayer, nn.TransformerDecoderLayer, nn.TransformerEncoder,
                  nn.TransformerDecoder, nn.Transformer)
#: Class names of sequence modules in other libraries (timm's Block, transformers' BertLayer, GPT2Block, Conv1D, ...).
_TOKEN_NAMES = re.compile(r"(Block|Layer|Embeddings?|Attention|SelfOutput|Output|Intermediate|Encoder|Decoder|"
                          r"Transformer|Mlp|MLP|FeedForward|RMSNorm|LayerNorm|Conv1D|Pooler)$")
#: Modules that leave their input as it is (in eval mode): never default points.
_NO_OPS = (nn.Identity, nn.modules.dropout._DropoutNd)
_NO_OP_NAMES = ("DropPath", "StochasticDepth", "Identity")


def as_tensor(output: object) -> torch.Tensor:
    """The tensor a probe reads from a layer's output: the output, or its hidden state (see :func:`hidden_field`).

    Example:
        >>> as_tensor({"logits": torch.zeros(2, 3), "aux": None}).shape
        torch.Size([2, 3])
    """
    if isinstance(output, torch.Tensor):
        return output
    field = hidden_field(output)
    if field is None:
        raise TypeError(f"a probed layer must output a tensor (or a tuple/dict holding one); got {type(output).__name__}")
    return read_field(output, field)


def _fields(output: object) -> list[tuple[int | str, torch.Tensor]]:
    """A structured output's tensor fields, one level deep: ``(index or key, tensor)``."""
    if isinstance(output, Mapping):
        return [(key, value) for key, value in output.items() if isinstance(value, torch.Tensor)]
    if isinstance(output, (tuple, list)):
        return [(i, value) for i, value in enumerate(output) if isinstance(value, torch.Tensor)]
    return []


def hidden_field(output: object) -> int | str | None:
    """The field of a structured output a probe reads by default: its hidden state.

    A mapping (a ``ModelOutput``) is read at ``last_hidden_state`` when it has it, else at
    its first tensor; a tuple at its first tensor (an RNN's output sequence, a transformer
    layer's hidden states). ``None`` for a tensor, or when nothing holds one.
    """
    if isinstance(output, Mapping) and isinstance(output.get("last_hidden_state"), torch.Tensor):
        return "last_hidden_state"
    fields = _fields(output)
    return fields[0][0] if fields else None


def read_field(output: object, field: int | str | None) -> torch.Tensor:
    """``output[field]`` of a structured output (a key, an attribute or an index); the output itself for ``None``."""
    if field is None:
        value = output
    elif isinstance(output, Mapping) and field in output:
        value = output[field]
    elif isinstance(field, int) and isinstance(output, (tuple, list)) and -len(output) <= field < len(output):
        value = output[field]
    else:
        value = getattr(output, str(field), None)
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"field {field!r} of a {type(output).__name__} output is not a tensor ({type(value).__name__})")
    return value


def _reads_text(field: int | str | None) -> str:
    return "" if field is None else (f"output[{field}]" if isinstance(field, int) else str(field))


def read_point(output: object, field: int | str | None, batch_dim: int) -> torch.Tensor:
    """A point's tensor of ``output``: its ``field`` (``None``: the hidden state), the examples' dim moved first."""
    value = read_field(output, field) if field is not None else as_tensor(output)
    return value.movedim(batch_dim, 0) if batch_dim else value


@dataclass(frozen=True)
class ProbePoint:
    """One place in a model's forward pass where a probe can read features.

    ``shape`` is per example; ``layout`` is ``"map"``, ``"tokens"``, ``"vector"`` or
    ``None`` (a two-dim output of unknown origin: pass ``layouts=``); ``field`` is the
    field of a structured output it reads (``None``: the output itself); ``batch_dim``
    the dim of the output that holds the examples (1 for a sequence-first RNN).
    """

    name: str
    op: str
    shape: tuple[int, ...]
    depth: int
    relative_depth: float
    aliases: tuple[str, ...] = ()
    train_only: bool = False
    module: str | None = None
    layout: str | None = None
    field: int | str | None = None
    batch_dim: int = 0
    recurrent: bool = False

    @property
    def features(self) -> int:
        return math.prod(self.shape)

    @property
    def reads(self) -> str:
        """What of the output is probed, ``""`` (the output), ``"output[0]"``, ``"last_hidden_state"``, ..."""
        return _reads_text(self.field)

    def read(self, output: object) -> torch.Tensor:
        """The probed tensor of this point's output, examples first."""
        return read_point(output, self.field, self.batch_dim)


@contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Leave ``model`` exactly as found on exit, whatever happens inside.

    Every module's train/eval flag is restored, and every parameter and buffer
    whose value changed inside (a traced ``num_batches_tracked += 1`` of timm's
    fused ``BatchNormAct2d``, running statistics updated by a train-mode pass) is
    copied back from a copy taken on entry.
    """
    modes = [(module, module.training) for module in model.modules()]
    tensors = [(t, t._version, t.detach().clone()) for t in _state_tensors(model)]
    try:
        yield
    finally:
        for module, mode in modes:
            module.training = mode
        with torch.no_grad():
            for tensor, version, saved in tensors:
                if tensor._version != version:
                    tensor.copy_(saved)


def _state_tensors(model: nn.Module) -> list[torch.Tensor]:
    seen, found = set(), []
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            found.append(tensor)
    return found


def _resize(inputs: object, n: int) -> object:
    """A batch of exactly ``n`` examples: its first ``n``, repeated in turn when it has fewer."""
    have = batch_size(inputs)
    if have >= n:
        return take(inputs, n)
    index = torch.arange(n) % have

    def pick(value):
        return value[index.to(value.device)] if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == have else value

    if isinstance(inputs, torch.Tensor):
        return pick(inputs)
    if isinstance(inputs, Mapping):
        return {key: pick(value) for key, value in inputs.items()}
    values = [pick(value) for value in inputs]
    return values if isinstance(inputs, list) else tuple(values)


def _structure(value: object) -> dict[int | str | None, tuple[int, ...]] | None:
    """The shapes of a value's tensors: ``{None: shape}`` for a tensor, ``{field: shape}`` for a tuple or mapping."""
    if isinstance(value, torch.Tensor):
        return {None: tuple(value.shape)}
    fields = _fields(value)
    return {field: tuple(t.shape) for field, t in fields} if fields else None


def _batched_fields(small: Mapping, large: Mapping, module: nn.Module | None) -> dict:
    """``{field: (per-example shape, batch dim)}`` of the fields of one output that hold one row per example.

    ``small`` and ``large`` are the field shapes seen with two batch sizes; a
    field is batched along the dim that follows the batch size: dim 0, or, for
    a recurrent module's time-major output, the dim after time.
    """
    fields = {}
    for field in small:
        dim = _batch_dim(small[field], large[field])
        if dim == 0 or (dim is not None and isinstance(module, nn.RNNBase)):
            fields[field] = (small[field][:dim] + small[field][dim + 1:], dim)
    return fields


def _batch_dim(small: tuple[int, ...], large: tuple[int, ...]) -> int | None:
    """The one dim that follows the batch size between the two discovery runs; ``None`` if there is none."""
    if len(small) != len(large):
        return None
    moved = [i for i, (a, b) in enumerate(zip(small, large)) if a != b]
    if len(moved) == 1 and (small[moved[0]], large[moved[0]]) == _DISCOVERY_SIZES:
        return moved[0]
    return None


def _no_op(module: nn.Module | None) -> bool:
    return module is not None and (isinstance(module, _NO_OPS) or type(module).__name__ in _NO_OP_NAMES)


def _module_layout(module: nn.Module) -> str | None:
    """The layout a module's two-dims-per-example output has, from its class; ``None`` when the class does not say."""
    if isinstance(module, _MAP_MODULES):
        return "map"
    if isinstance(module, _TOKEN_MODULES) or _TOKEN_NAMES.search(type(module).__name__):
        return "tokens"
    return None


def _subtree_layout(module: nn.Module) -> str | None:
    """A sequence model's layout from what it contains: recurrent, attention or embedding layers and no 1-D convolutions."""
    kinds = set()
    for sub in module.modules():
        if isinstance(sub, (nn.Conv1d, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd)) and \
                not isinstance(sub, (nn.Conv2d, nn.Conv3d)):
            kinds.add("map")
        elif isinstance(sub, (nn.RNNBase, nn.MultiheadAttention, nn.Embedding, nn.TransformerEncoderLayer,
                              nn.TransformerDecoderLayer)) or re.search(r"(Attention|Embeddings?|Transformer)$", type(sub).__name__):
            kinds.add("tokens")
    return kinds.pop() if len(kinds) == 1 else None


def _infer_layout(rank: int, known: str | None, model: nn.Module, enclosing: Sequence[str]) -> str | None:
    """A point's layout: a vector below two dims per example, a map above; two dims from the module, then its containers."""
    if rank <= 1:
        return "vector"
    if rank >= 3:
        return "map"
    if known is not None:
        return known
    for name in enclosing:
        module = _get(model, name)
        if module is None:
            continue
        found = _module_layout(module) if name else None
        if found is not None:
            return found
    for name in enclosing:
        module = _get(model, name)
        if module is not None:
            found = _subtree_layout(module)
            if found is not None:
                return found
    return None


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name) if name else model
    except AttributeError:
        return None


def _enclosing(qualname: str) -> list[str]:
    """The module paths that contain a point, innermost first, ending with the model itself (``""``)."""
    parts = qualname.split(".") if qualname else []
    return [".".join(parts[:k]) for k in range(len(parts), 0, -1)] + [""]


_NUMBERED = re.compile(r"^([A-Za-z_]*?)(\d+)$")


def _repeated(module: nn.Module) -> bool:
    """A container of two or more blocks of one class (``encoder.layer``, ``h``, ``blocks``, ``layers``, ``layer1``).

    That is a ``Sequential`` or ``ModuleList`` of two or more modules of one class,
    or a stage module whose children are all composite blocks of one class named
    by number (timm RegNet's ``s1.b1``, ``s3.b1``, ``s3.b2``, ...; a stage of one
    block too, so that every stage reads alike). Never an Inception block's
    differently named branches, nor a ``ModuleDict`` (DenseNet's dense block: its
    forward concatenates its layers' outputs, so the block, not each layer, is the point).
    """
    named = list(module.named_children())
    children = [child for _, child in named]
    if not children or len({type(c) for c in children}) != 1 or isinstance(module, nn.ModuleDict):
        return False
    if isinstance(children[0], (nn.Sequential, nn.ModuleList, nn.ModuleDict)):
        return False
    if isinstance(module, (nn.Sequential, nn.ModuleList)):
        return len(children) >= 2
    matches = [_NUMBERED.match(name) for name, _ in named]
    return (all(matches) and len({m.group(1) for m in matches}) == 1
            and any(True for _ in children[0].children()))


def _holds_repeated(module: nn.Module) -> bool:
    return any(_repeated(sub) for sub in module.modules())


def _is_plain_container(module: nn.Module) -> bool:
    return isinstance(module, (nn.Sequential, nn.ModuleList, nn.ModuleDict)) and any(True for _ in module.children())


def _block_names(module: nn.Module, prefix: str = "") -> list[str]:
    """Default points under ``module``: each block of a repeated container at any depth, and the modules around them.

    A child that is a repeated container gives its blocks; a child that holds one
    somewhere inside is opened (so ``bert.embeddings``, ``bert.encoder.layer.N`` and
    ``bert.pooler`` are found); a plain container is opened one level (ResNet's
    ``layer1`` gives ``layer1.0``, ...); any other child is one point. No-op modules
    (``Identity``, dropout, drop-path) are skipped.
    """
    names = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if _no_op(child):
            continue
        if _repeated(child):
            for sub, block in child.named_children():
                if _no_op(block):
                    continue
                # A block that holds repeated blocks itself (ConvNeXt's stages.N.blocks.M) is opened.
                names += _block_names(block, f"{full}.{sub}.") if _holds_repeated(block) else [f"{full}.{sub}"]
        elif _holds_repeated(child):
            names += _block_names(child, f"{full}.")
        elif _is_plain_container(child):
            names += [f"{full}.{sub}" for sub, block in child.named_children() if not _no_op(block)]
        else:
            names.append(full)
    return names


_SHAPE_WORDS = re.compile(r"shape|size|channel|dimension|\bdims?\b|mat1|mat2|broadcast|expected input|must match", re.I)


def _model_error(model: nn.Module, example: object, error: Exception) -> Exception:
    """One line for a forward that raised: the model's own message, and a shape hint only when it is about shapes."""
    first = first_tensor(example)
    message = str(error).strip().splitlines()[0][:300] if str(error).strip() else "(no message)"
    text = f"{type(model).__name__} raised {type(error).__name__}: {message}"
    if _SHAPE_WORDS.search(message):
        shape = shape_text(first.shape[1:]) if first is not None else type(example).__name__
        text += f"; it cannot run on an input of per-example shape {shape}: check the input's size and channels"
    else:
        text += " (running the example input to find its probe points)"
    return ValueError(text)


def _check_not_detection(model: nn.Module, example: object) -> None:
    """torchvision's detection models take a list of images and return detections: probe their backbone."""
    module = type(model).__module__
    if module.startswith("torchvision.models.detection") and hasattr(model, "backbone"):
        given = "a list of images" if isinstance(example, (list, tuple)) else "images"
        raise TypeError(
            f"{type(model).__name__} is a detection model: it takes {given} and returns detections, not one tensor per "
            "example, and probekit takes batched tensors; probe its feature extractor instead: "
            "pk.list_layers(model.backbone, torch.stack(images))"
        )


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


def _reads_training(model: nn.Module, tracer: fx.Tracer) -> bool:
    """Whether code the tracer runs may read a ``training`` flag, so that the train-mode graph may differ.

    The tracer runs the ``forward`` (and every other method) of each module it
    traces into: the model, and each module below it that is not a leaf (leaf
    modules, ``torch.nn``'s among them, are one node, whatever their flags), and
    the functions those call. Their code is read, not run: any attribute or
    constant named ``training`` answers True (``self.training``,
    ``getattr(m, "training")``, ``F.dropout(x, training=self.training)``), so the
    answer errs only toward tracing both modes. Functions of ``torch`` itself are
    not followed.
    """
    seen: set[int] = set()

    def code_reads(code) -> bool:
        if id(code) in seen:
            return False
        seen.add(id(code))
        if "training" in code.co_names or "training" in code.co_consts:
            return True
        return any(code_reads(const) for const in code.co_consts if inspect.iscode(const))

    def function_reads(function, depth: int = 0) -> bool:
        function = inspect.unwrap(function) if callable(function) else function
        code = getattr(function, "__code__", None)
        if code is None or id(code) in seen:
            return False
        if code_reads(code):
            return True
        if depth >= 8:
            return False
        called = [getattr(function, "__globals__", {}).get(name) for name in code.co_names]
        called += [cell.cell_contents for cell in (getattr(function, "__closure__", None) or ()) if _cell_set(cell)]
        return any(function_reads(f, depth + 1) for f in called
                   if inspect.isfunction(f) and not (f.__module__ or "").startswith("torch"))

    def class_reads(cls: type) -> bool:
        for klass in cls.__mro__:
            if klass in (nn.Module, object):
                break
            for value in vars(klass).values():
                if isinstance(value, (staticmethod, classmethod)):
                    value = value.__func__
                elif isinstance(value, property):
                    value = value.fget
                if function_reads(value):
                    return True
        return False

    classes: dict[type, None] = {}
    stack = [("", model)]
    while stack:
        name, module = stack.pop()
        if name and tracer.is_leaf_module(module, name):
            continue
        if any(function_reads(v) for k, v in vars(module).items() if k in ("forward", "_forward")):
            return True  # a forward set on the instance
        classes.setdefault(type(module), None)
        stack += [(f"{name}.{child}" if name else child, sub) for child, sub in module.named_children()]
    return any(class_reads(cls) for cls in classes)


def _cell_set(cell) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell
        return False
    return True


class _ShapeRecorder(fx.Interpreter):
    """Runs a traced graph once, keeping the shapes of each node's output (see :func:`_structure`), not its value."""

    def __init__(self, module: fx.GraphModule):
        super().__init__(module, garbage_collect_values=True)
        self.shapes: dict[str, dict | None] = {}

    def run_node(self, node: fx.Node):
        value = super().run_node(node)
        self.shapes[node.name] = _structure(value)
        return value


class LayerGraph:
    """The probe points of one model, found from an example input.

    Args:
        model: any ``nn.Module``; it is left exactly as it was found (flags, parameters, buffers).
        example_input: one input batch: a tensor, a tuple of positional arguments or a
            mapping of keyword arguments (see :mod:`probekit.engine.batch`). Shapes are
            discovered from batches of 2 and 3 of its examples (repeated when it has
            fewer), so a leading dim that is not the batch (an RNN's ``h_n``) is never
            taken for it.
        tracer_kwargs: passed to torchvision's ``NodePathTracer`` on top of its
            defaults (see :func:`tracer_options`): ``leaf_modules`` (module classes
            kept whole, one probe point each), ``autowrap_functions``, ``autowrap_modules``.
        layouts: ``{layer: "map" | "tokens" | "vector"}`` for points whose inferred
            layout is wrong or unknown.

    Example:
        >>> graph = LayerGraph(torchvision.models.resnet50(), torch.randn(2, 3, 224, 224))
        >>> graph.resolve(["layer3.2", "input"])
        ['input', 'layer3.2']
        >>> graph.point("layer3.2").name
        'layer3.2.relu_2'
    """

    def __init__(self, model: nn.Module, example_input: object, *, tracer_kwargs: Mapping[str, object] | None = None,
                 layouts: Mapping[str, str] | None = None):
        check_params(TRACE_CONSTRAINTS, model=model, tracer_kwargs=tracer_kwargs, layouts=layouts)
        self.model = model
        batch_size(example_input)
        _check_not_detection(model, example_input)
        first = first_tensor(example_input)
        self._input_dtype_integer = not (first.is_floating_point() or first.is_complex())
        examples = [_resize(example_input, n) for n in _DISCOVERY_SIZES]
        self._signature, self._concrete = _forward_binding(model, examples[0])
        tracer = tracer_options(tracer_kwargs)
        self._graphs: dict[str, fx.Graph] = {}
        self._node_of: dict[str, str] = {}  # probe point name -> fx node name
        self._fields: dict[str, dict] = {}  # probe point name -> {field: (per-example shape, batch dim)}
        with preserved_state(model):
            try:
                self._trace_graphs(tracer)
                self.traced = True
            except Exception as error:  # noqa: BLE001 - any tracing failure falls back to hooks
                warnings.warn(
                    f"{type(model).__name__} cannot be traced with torch.fx ({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}); "
                    "probing module outputs with forward hooks instead (functional nodes such as residual adds are not available). "
                    "To trace it, keep the module that fails whole with tracer_kwargs={'leaf_modules': [ThatModule]}",
                    stacklevel=3,
                )
                self.traced = False
            points = self._graph_points(examples) if self.traced else self._hook_points(examples)
        self._by_name = {p.name: p for p in points}
        self._aliases = {alias: p.name for p in points for alias in p.aliases}
        self.points = points
        self._layouts: dict[str, str] = {}
        for name, layout in (layouts or {}).items():
            self.set_layout(name, layout)

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
        # The train-mode graph differs from the eval one only where traced code reads a
        # ``training`` flag (Inception's aux head); without such code it is not traced.
        modes = ("eval", "train") if _reads_training(self.model, NodePathTracer(**options)) else ("eval",)
        for mode in modes:
            self.model.train(mode == "train")
            tracer = NodePathTracer(**options)
            self._graphs[mode] = tracer.trace(self.model, concrete_args=self._concrete)
            self._names[mode] = {node.name: qualname for node, qualname in tracer.node_to_qualname.items()}

    def _graph_points(self, examples: list) -> list[ProbePoint]:
        names = self._names
        eval_names, train_names = set(names["eval"].values()), set(names.get("train", names["eval"]).values())
        # Train-only nodes (Inception's aux head) are offered when the train graph
        # is a superset; they are then run from the train graph, modules in eval mode.
        self._base = "train" if eval_names < train_names else "eval"
        if self._base == "eval":
            self._graphs.pop("train", None)
        graph = self._graphs[self._base]
        qualname = names[self._base]

        try:
            runs = self._shapes(graph, examples)
        except Exception as error:  # noqa: BLE001 - retried on the eval graph, else one line on the input
            if self._base == "train":
                # Train-only branches (an aux head) may not fit this input size; the eval graph may.
                self._base, graph, qualname = "eval", self._graphs["eval"], names["eval"]
                self._graphs.pop("train")
                try:
                    runs = self._shapes(graph, examples)
                except Exception as retry:  # noqa: BLE001
                    raise _model_error(self.model, examples[0], retry) from retry
                warnings.warn(
                    f"train-only layers of {type(self.model).__name__} (e.g. an auxiliary head) cannot run on this input "
                    f"({str(error).splitlines()[0][:120]}); they are not offered as probe points", stacklevel=4,
                )
            else:
                raise _model_error(self.model, examples[0], error) from error

        found: dict[str, dict] = {}  # node name -> {field: (per-example shape, batch dim)}
        for node in graph.nodes:
            if node.op in ("output", "get_attr"):
                continue
            small, large = runs[0].get(node.name), runs[1].get(node.name)
            if not small or not large or set(small) != set(large):
                continue
            module = self.model.get_submodule(node.target) if node.op == "call_module" else None
            fields = _batched_fields(small, large, module)
            if fields:
                found[node.name] = fields
        nodes = [n for n in graph.nodes if n.name in found]
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
        # Modules traced into (containers, and modules such as timm's LayerNorm that call functions) end at their last node.
        containers = {name for name, _ in self.model.named_modules() if name}
        aliases: dict[str, list[str]] = {}
        for container, node_name in last_node.items():
            if container in containers:
                aliases.setdefault(node_name, []).append(container)
        module_calls: dict[str, int] = {}
        for node in nodes:
            if node.op == "call_module":
                module_calls[node.target] = module_calls.get(node.target, 0) + 1

        layout_of: dict[str, str | None] = {}
        rank_of: dict[str, int] = {}
        points = []
        last = max(len(nodes) - 1, 1)
        for depth, node in enumerate(nodes):
            name = point_names[node.name]
            self._node_of[name] = node.name
            submodule = self.model.get_submodule(node.target) if node.op == "call_module" else None
            op = "input" if node.op == "placeholder" else (
                type(submodule).__name__ if submodule is not None else getattr(node.target, "__name__", str(node.target))
            )
            module = node.target if node.op == "call_module" and module_calls.get(node.target) == 1 else None
            fields = found[node.name]
            field = None if None in fields else _default_field(fields)
            if field is None and None not in fields:
                continue
            shape, dim = fields[field]
            self._fields[name] = fields
            known = _module_layout(submodule) if submodule is not None else None
            if known is None and node.op != "placeholder":
                # A functional node (add, getitem, an activation) keeps the layout of what it reads.
                inputs = [a for a in node.all_input_nodes if a.name in layout_of and rank_of.get(a.name) == len(shape)]
                known = next((layout_of[a.name] for a in inputs if layout_of[a.name]), None)
            enclosing = [] if node.op == "placeholder" else _enclosing(qualname.get(node.name, ""))[1:]
            layout = _infer_layout(len(shape), known, self.model, enclosing or [""])
            layout_of[node.name], rank_of[node.name] = layout, len(shape)
            points.append(ProbePoint(
                name=name, op=op, shape=shape, depth=depth, relative_depth=depth / last,
                aliases=tuple(sorted(aliases.get(node.name, []), key=len, reverse=True)),
                train_only=self._base == "train" and qualname.get(node.name) not in eval_names and node.op != "placeholder",
                module=module, layout=layout, field=field, batch_dim=dim, recurrent=isinstance(submodule, nn.RNNBase),
            ))
        return _renumber(points)

    def _shapes(self, graph: fx.Graph, examples: list) -> list[dict[str, dict | None]]:
        """Each node's output shapes, one run of ``graph`` per example batch (the discovery sizes).

        Runs inside the constructor's :func:`preserved_state`, which restores whatever a pass changes.
        """
        module = fx.GraphModule(self.model, graph)
        runs = []
        with torch.no_grad():
            self.model.eval()
            for example in examples:
                recorder = _ShapeRecorder(module)
                recorder.run(*self.graph_args(example))
                runs.append(recorder.shapes)
        return runs

    def _hook_points(self, examples: list) -> list[ProbePoint]:
        runs: list[dict[str, dict]] = []
        for example in examples:
            order: dict[str, dict] = {}
            handles = []

            def recorder(name: str, order=order) -> Callable:
                def hook(module, args, output):
                    structure = _structure(output)
                    if structure:
                        order.pop(name, None)  # a module called twice counts at its last call
                        order[name] = structure
                return hook

            for name, module in self.model.named_modules():
                if name:
                    handles.append(module.register_forward_hook(recorder(name)))
            try:
                with torch.no_grad():  # the constructor's preserved_state restores what a pass changes
                    self.model.eval()
                    call_model(self.model, example)
            except Exception as error:  # noqa: BLE001 - one line naming the model's own error
                raise _model_error(self.model, example, error) from error
            finally:
                for handle in handles:
                    handle.remove()
            runs.append(order)

        first = [first_tensor(example) for example in examples]
        entries = []
        if first[0] is not None and _batch_dim(tuple(first[0].shape), tuple(first[1].shape)) == 0:
            entries.append((INPUT, {None: (tuple(first[0].shape[1:]), 0)}, "input"))
        # Hooks fire when a module *finishes*: a container after its children.
        for name, small in runs[0].items():
            large = runs[1].get(name)
            if not large or set(small) != set(large):
                continue
            module = self.model.get_submodule(name)
            fields = _batched_fields(small, large, module)
            if fields:
                entries.append((name, fields, type(module).__name__))
        points = []
        last = max(len(entries) - 1, 1)
        for i, (name, fields, op) in enumerate(entries):
            field = None if None in fields else _default_field(fields)
            if field is None and None not in fields:
                continue
            shape, dim = fields[field]
            self._fields[name] = fields
            module = None if name == INPUT else self.model.get_submodule(name)
            known = _module_layout(module) if module is not None else None
            layout = _infer_layout(len(shape), known, self.model, _enclosing(name)[1:] if module is not None else [""])
            points.append(ProbePoint(
                name=name, op=op, shape=shape, depth=i, relative_depth=i / last, module=None if name == INPUT else name,
                layout=layout, field=field, batch_dim=dim, recurrent=isinstance(module, nn.RNNBase),
            ))
        return _renumber(points)

    # ------------------------------------------------------------------ layouts
    def set_layout(self, name: str, layout: str) -> None:
        """Set the layout of point ``name`` (``layouts=``): ``"map"``, ``"tokens"`` or ``"vector"``."""
        if layout not in LAYOUTS:
            raise ValueError(f"layouts[{name!r}] is {layout!r}; a layout is one of {choices(LAYOUTS)}")
        point = self.point(name)
        rank = len(point.shape)
        if (layout == "tokens" and rank != 2) or (layout == "map" and rank < 2):
            need = "two dims per example (tokens x hidden)" if layout == "tokens" else "channels and spatial dims"
            raise ValueError(f"layouts[{name!r}] = {layout!r} needs {need}; {point.name!r} has per-example shape "
                             f"{shape_text(point.shape)}")
        self._replace(point, layout=layout)

    def _replace(self, point: ProbePoint, **changes) -> None:
        new = dataclasses.replace(point, **changes)
        self._by_name[point.name] = new
        self.points = [new if p.name == point.name else p for p in self.points]

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
            "reads": [p.reads for p in self.points],
            "shape": [shape_text(p.shape) for p in self.points],
            "layout": [p.layout or "?" for p in self.points],
            "features": [p.features for p in self.points],
            "depth": [p.depth for p in self.points],
            "relative_depth": [round(p.relative_depth, 4) for p in self.points],
            "train_only": [p.train_only for p in self.points],
        })

    def point(self, name: str) -> ProbePoint:
        """The probe point called ``name``: a node name, a container alias, ``'input'``, or ``'name:field'``."""
        if name in self._by_name:
            return self._by_name[name]
        if name in self._aliases:
            return self._by_name[self._aliases[name]]
        if ":" in name:
            return self._field_point(name)
        candidates = list(self._by_name) + list(self._aliases)
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
        hint = f"closest: {', '.join(repr(c) for c in close)}" if close else f"valid names start with: {', '.join(repr(c) for c in candidates[:5])}"
        raise ValueError(
            f"unknown layer {name!r} for {type(self.model).__name__}; {hint}. "
            f"Use pk.list_layers(model, example_input) to see all {len(self.points)} probe points."
        )

    def _field_point(self, name: str) -> ProbePoint:
        """``'h.0:1'`` / ``'encoder:pooler_output'``: another field of a structured output, as a point of its own."""
        base_name, _, text = name.rpartition(":")
        base = self.point(base_name)
        fields = self._fields.get(base.name, {})
        field: int | str = int(text) if re.fullmatch(r"-?\d+", text) else text
        if field not in fields:
            offered = [_reads_text(f) for f in fields if f is not None]
            raise ValueError(
                f"layer {name!r}: {base.name!r} has no tensor field {text!r} holding one row per example; "
                + (f"its fields are {choices(offered)}" if offered else "its output is a single tensor")
            )
        shape, dim = fields[field]
        module = _get(self.model, base.module) if base.module else None
        layout = _infer_layout(len(shape), _module_layout(module) if module is not None else base.layout,
                               self.model, _enclosing(base.module or "")[1:])
        point = dataclasses.replace(base, name=name, aliases=(), shape=shape, field=field, batch_dim=dim, layout=layout)
        self._by_name[name] = point
        if self.traced:
            self._node_of[name] = self._node_of[base.name]
        return point

    def blocks(self) -> list[str]:
        """Default probe points: the input, and the blocks of the model.

        Each block of a repeated-block container (a ``Sequential`` or ``ModuleList`` of
        two or more modules of one class) is a point, at any depth: ``encoder.layer.N``,
        ``h.N``, ``blocks.N``, ``layers.N``, ``layer1.N``. So is every module beside
        them on the way down (embeddings, a final norm, a pooler, the head); a plain
        container is opened one level. No-op modules (``Identity``, dropout) are not
        defaults, and neither is an input of token ids (integers).
        """
        wanted = []
        first = self._by_name.get(INPUT)
        if first is not None and not _integer_input(self, first):
            wanted.append(INPUT)
        wanted += _block_names(self.model)
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
        return sorted(layers, key=lambda n: (self.point(n).depth, n))

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


def _default_field(fields: dict) -> int | str | None:
    if "last_hidden_state" in fields:
        return "last_hidden_state"
    return next(iter(fields), None)


def _renumber(points: list[ProbePoint]) -> list[ProbePoint]:
    last = max(len(points) - 1, 1)
    return [dataclasses.replace(p, depth=i, relative_depth=i / last) for i, p in enumerate(points)]


def _integer_input(graph: LayerGraph, point: ProbePoint) -> bool:
    return point.op == "input" and getattr(graph, "_input_dtype_integer", False)


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


def list_layers(model: nn.Module, example_input: object, *, tracer_kwargs: Mapping[str, object] | None = None,
                layouts: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Every point of ``model`` a probe can read, in forward order.

    Args:
        model: any ``nn.Module``; left exactly as it was (flags, parameters and buffers).
        example_input: one batch of inputs: a tensor, a tuple of positional arguments or a
            mapping of keyword arguments (e.g. ``input_ids`` and ``attention_mask``).
        tracer_kwargs: added to the tracer's defaults (see :func:`tracer_options`): e.g.
            ``{"leaf_modules": [MyBlock]}`` keeps every ``MyBlock`` as one probe point, and
            lets a model trace whose ``MyBlock`` has data-dependent control flow.
        layouts: ``{layer: "map" | "tokens" | "vector"}`` where the inferred layout is wrong or ``?``.

    Returns:
        A DataFrame with one row per probe point: ``name`` (what ``layers=`` takes),
        ``aliases`` (container modules that end at this point, also accepted),
        ``op``, ``reads`` (what of a structured output is probed: ``output[0]`` of a
        tuple, ``last_hidden_state`` of a ``ModelOutput``; empty for a tensor),
        per-example ``shape``, ``layout`` (``map``, ``tokens``, ``vector``, or ``?``
        when it cannot be inferred: pass ``layouts=``), ``features``, ``depth``
        (forward order), ``relative_depth`` (0 at the input, 1 at the output) and ``train_only``.

    Another field of a structured output is its own point, named ``"layer:field"``:
    an index (``"h.0:1"``, a tuple's second tensor; ``"gru:1"``, an RNN's ``h_n``) or a
    key (``"encoder:pooler_output"``). Any of these names goes in ``layers=``.

    Example:
        >>> import torchvision, probekit as pk
        >>> table = pk.list_layers(torchvision.models.resnet50(), torch.randn(1, 3, 224, 224))
        >>> table[table.aliases != ""].name.tolist()[:2]
        ['layer1.0.relu_2', 'layer1.1.relu_2']
    """
    return LayerGraph(model, example_input, tracer_kwargs=tracer_kwargs, layouts=layouts).frame()
