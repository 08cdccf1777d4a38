"""Models from the paper and from torchvision, each carrying its default probe points.

Every model built here has two attributes the rest of the kit reads:

- ``probe_layers`` (list of str): the probe points used when ``layers=`` is not
  given. Names are those :class:`probekit.engine.points.LayerGraph` understands:
  ``"input"`` for the model's input, otherwise module paths (``"conv1"``,
  ``"layers.63"``, ``"layer3.2"``, ``"Mixed_6a"``).
- ``input_shape`` (C, H, W), where the model expects a fixed image size, and
  ``pretrained`` (bool), so that :func:`probekit.data.load` and
  :func:`probekit.data.transforms_for` can fit a dataset to the model.

The paper's models: :func:`paper_convnet` (its MNIST convnet), :func:`bypass_mlp`
(128 dense layers with one long skip connection: the "dead segment" example) and
:func:`residual_mlp` (a healthy control with a skip in every block). From
torchvision: :func:`resnet50` and :func:`inception_v3`, with random, downloaded
or local weights. :func:`build` makes any of them by name; :func:`load_callable`
imports a user's own model factory from a ``"package.module:callable"`` spec.
"""

from __future__ import annotations

import difflib
import importlib
import os
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "INCEPTION_V3_EXTRAS",
    "INCEPTION_V3_LAYERS",
    "RESNET50_EXTRAS",
    "RESNET50_LAYERS",
    "BypassMLP",
    "ResidualMLP",
    "WeightsUnavailableError",
    "available",
    "build",
    "bypass_mlp",
    "default_layers",
    "inception_v3",
    "load_callable",
    "paper_convnet",
    "residual_mlp",
    "resnet50",
]

#: Activation functions the MLPs accept, by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}

#: ResNet-50's probe points in the paper (figure 3): the input and the 16 residual-block outputs.
RESNET50_LAYERS = ("input",) + tuple(
    f"layer{stage}.{block}" for stage, blocks in enumerate((3, 4, 6, 3), start=1) for block in range(blocks)
)
#: Optional extra ResNet-50 points: after the stem (``maxpool``), the pooled features, the logits.
RESNET50_EXTRAS = ("maxpool", "avgpool", "fc")

#: Inception v3's 17 probe points in the paper (figure 4), in forward order. The paper
#: gives their count (17), that 13 exceed 100,000 features and that the largest has
#: 426,320 (= 80 x 73 x 73, ``Conv2d_3b_1x1``); this list is the one that matches:
#: the two stem pools and the conv between them, the 11 ``Mixed_*`` blocks, the
#: auxiliary head (``AuxLogits``, which runs only in train mode), the pooled features
#: and the logits.
INCEPTION_V3_LAYERS = (
    "maxpool1", "Conv2d_3b_1x1", "maxpool2",
    "Mixed_5b", "Mixed_5c", "Mixed_5d",
    "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "AuxLogits",
    "Mixed_7a", "Mixed_7b", "Mixed_7c",
    "avgpool", "fc",
)
#: Optional extra Inception v3 points: the input and the stem convolutions.
INCEPTION_V3_EXTRAS = ("input", "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_4a_3x3")

_FORWARD_ORDER = {
    "resnet50": ("input", "maxpool", *RESNET50_LAYERS[1:], "avgpool", "fc"),
    "inception_v3": (
        "input", "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
        *INCEPTION_V3_LAYERS[2:],
    ),
}
_DEFAULTS = {"resnet50": (RESNET50_LAYERS, RESNET50_EXTRAS), "inception_v3": (INCEPTION_V3_LAYERS, INCEPTION_V3_EXTRAS)}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded (for example, offline)."""


def default_layers(model: str, *, extras: bool = False, aux_logits: bool = True) -> list[str]:
    """The default probe points of a torchvision model in the zoo, in forward order.

    Args:
        model: ``"resnet50"`` or ``"inception_v3"``.
        extras: add the optional points (:data:`RESNET50_EXTRAS`, :data:`INCEPTION_V3_EXTRAS`).
        aux_logits: keep Inception's ``AuxLogits`` (a model built without its auxiliary head has none).

    Example:
        >>> from probekit import zoo
        >>> zoo.default_layers("resnet50", extras=True)[:3]
        ['input', 'maxpool', 'layer1.0']
    """
    if model not in _DEFAULTS:
        raise ValueError(f"default_layers knows {', '.join(_DEFAULTS)}; got {model!r}")
    base, optional = _DEFAULTS[model]
    wanted = set(base) | (set(optional) if extras else set())
    if not aux_logits:
        wanted.discard("AuxLogits")
    return [name for name in _FORWARD_ORDER[model] if name in wanted]


# ---------------------------------------------------------------------------------- paper models


def paper_convnet(
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    input_size: int = 28,
    width: tuple[int, int] = (32, 64),
    hidden: int = 200,
    kernel_size: int = 5,
) -> nn.Sequential:
    """The paper's MNIST convnet: two conv layers, one hidden fully connected layer, logits.

    ``conv1 -> relu1 -> pool1 -> conv2 -> relu2 -> pool2 -> flatten -> fc1 -> relu3 -> fc2``.
    Convolutions keep the spatial size (padding ``kernel_size // 2``) and each
    pool halves it, so 28 x 28 MNIST gives 7 x 7 maps and 8 x 8 digits 2 x 2.
    ``probe_layers`` reads before and after every conv, ReLU, pool and fully
    connected layer, as in the paper's figure 2.

    Args:
        in_channels: input channels (1 for MNIST and digits).
        num_classes: number of outputs (logits).
        input_size: input height and width (at least 4).
        width: output channels of ``conv1`` and ``conv2``.
        hidden: units of the hidden fully connected layer ``fc1``.
        kernel_size: odd side of the square convolution kernels.

    Example:
        >>> from probekit import zoo
        >>> model = zoo.paper_convnet(input_size=8)
        >>> model(torch.randn(2, 1, 8, 8)).shape
        torch.Size([2, 10])
    """
    for name, value in (("in_channels", in_channels), ("num_classes", num_classes), ("hidden", hidden)):
        _check_positive(name, value)
    _check_positive("input_size", input_size, minimum=4)
    if not (isinstance(kernel_size, int) and kernel_size > 0 and kernel_size % 2 == 1):
        raise ValueError(f"kernel_size must be a positive odd integer (so padding keeps the size); got {kernel_size!r}")
    if not (isinstance(width, (tuple, list)) and len(width) == 2):
        raise ValueError(f"width must be two channel counts (conv1, conv2); got {width!r}")
    for value in width:
        _check_positive("width", value)
    side = input_size // 2 // 2
    model = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(in_channels, width[0], kernel_size, padding=kernel_size // 2)),
        ("relu1", nn.ReLU()),
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(width[0], width[1], kernel_size, padding=kernel_size // 2)),
        ("relu2", nn.ReLU()),
        ("pool2", nn.MaxPool2d(2)),
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(width[1] * side * side, hidden)),
        ("relu3", nn.ReLU()),
        ("fc2", nn.Linear(hidden, num_classes)),
    ]))
    model.probe_layers = ["input", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "relu3", "fc2"]
    model.input_shape = (in_channels, input_size, input_size)
    model.pretrained = False
    return model


def _dense(in_features: int, out_features: int, activation: str) -> nn.Sequential:
    """One fully connected layer and its activation, Glorot-uniform weights and zero biases."""
    linear = nn.Linear(in_features, out_features)
    nn.init.xavier_uniform_(linear.weight)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(OrderedDict([("linear", linear), ("act", ACTIVATIONS[activation]())]))


class _SkipAdd(nn.Module):
    """Adds the skip connection's value; a module so that the sum has a readable name, ``skip.add``."""

    def forward(self, h: torch.Tensor, bypass: torch.Tensor) -> torch.Tensor:
        return h + bypass


class BypassMLP(nn.Module):
    """A deep MLP with one long skip connection; see :func:`bypass_mlp`."""

    def __init__(self, *, depth: int, width: int, skip: tuple[int, int] | None, activation: str, in_features: int, num_classes: int):
        super().__init__()
        self.flatten = nn.Flatten()
        self.layers = nn.ModuleList(_dense(in_features if i == 0 else width, width, activation) for i in range(depth))
        if skip is not None:
            self.skip = _SkipAdd()
        self.output = nn.Linear(width, num_classes)
        self.skip_span = skip
        self.bypassed_layers = [f"layers.{i}" for i in range(skip[0] + 1, skip[1])] if skip else []
        self.probe_layers = ["input", *(f"layers.{i}" for i in range(depth)), "output"]
        self.pretrained = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        source, target = self.skip_span if self.skip_span is not None else (-1, -1)
        h = self.flatten(x)
        bypass = h
        for i, layer in enumerate(self.layers):
            if i == target:
                h = self.skip(h, bypass)
            h = layer(h)
            if i == source:
                bypass = h
        if target == len(self.layers):
            h = self.skip(h, bypass)
        return self.output(h)


def bypass_mlp(
    *,
    depth: int = 128,
    width: int = 128,
    skip: tuple[int, int] | None = (0, 64),
    activation: str = "tanh",
    in_features: int = 64,
    num_classes: int = 10,
) -> BypassMLP:
    """The paper's pathological model: ``depth`` dense layers and one long skip connection.

    Layers ``layers.0 ... layers.{depth-1}`` each compute ``h_i = act(W_i z_i + b_i)``
    with ``z_0`` the flattened input and ``z_i = h_{i-1}`` otherwise, except at the
    skip's end. Reading of the paper's "skip connection from layer a to layer b":
    the output of layer ``a`` is *added* to the input of layer ``b``,
    ``z_b = h_{b-1} + h_a`` (the sum is the probe point ``skip.add``), so layers
    ``a+1 .. b-1`` are bypassed: with the default ``(0, 64)``, layers 1 to 63.
    ``b == depth`` adds ``h_a`` to the input of the output layer. A linear
    ``output`` layer gives the logits.

    Choices where the paper is silent: weights are Glorot-uniform and biases zero
    (TensorFlow's default when the paper was written) and the activation is
    tanh. With these, on the embedded digits and plain SGD (lr 0.01, batch 64,
    1,000 steps), 128 layers without the skip stay at chance, while with the skip
    test accuracy reaches about 90% and the probes' validation error on the
    bypassed layers rises from about 0.06 (layer 1) to about 0.36 (layer 63)
    after 2,000 minibatches, recovering to about 0.04 right after the skip: the
    dead segment the paper shows (``probekit reproduce bypass``). With ReLU and these initialisations the
    signal vanishes after a few dozen layers, so neither variant trains.

    Attributes of the model: ``skip_span`` (the ``skip`` tuple), ``bypassed_layers``
    (names of the layers the skip goes around) and ``probe_layers`` (the input,
    every layer's output after its activation, and ``output``).

    Args:
        depth: number of hidden dense layers.
        width: units per hidden layer.
        skip: ``(a, b)`` with ``0 <= a`` and ``a + 2 <= b <= depth``; None for no skip
            (the plain deep MLP, which does not train).
        activation: one of :data:`ACTIVATIONS`.
        in_features: input features after flattening (8 x 8 digits: 64; MNIST: 784).
        num_classes: number of outputs.

    Example:
        >>> from probekit import zoo
        >>> model = zoo.bypass_mlp(depth=16, skip=(0, 8))
        >>> model(torch.randn(4, 1, 8, 8)).shape, model.bypassed_layers[:2]
        (torch.Size([4, 10]), ['layers.1', 'layers.2'])
    """
    for name, value in (("depth", depth), ("width", width), ("in_features", in_features), ("num_classes", num_classes)):
        _check_positive(name, value)
    _check_activation(activation)
    if skip is not None:
        if not (
            isinstance(skip, (tuple, list)) and len(skip) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in skip)
        ):
            raise ValueError(f"skip must be a pair (from_layer, to_layer) of integers, or None; got {skip!r}")
        if not (0 <= skip[0] and skip[0] + 2 <= skip[1] <= depth):
            raise ValueError(
                f"skip=(a, b) adds layer a's output to layer b's input, so it needs 0 <= a, a + 2 <= b <= depth "
                f"(={depth}) to bypass at least one layer; got {tuple(skip)}"
            )
        skip = (skip[0], skip[1])
    return BypassMLP(depth=depth, width=width, skip=skip, activation=activation, in_features=in_features, num_classes=num_classes)


class _ResidualBlock(nn.Module):
    """``h + act(linear(norm(h)))``: a pre-norm residual block; its output is the sum."""

    def __init__(self, width: int, activation: str):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, width)
        self.act = ACTIVATIONS[activation]()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.act(self.linear(self.norm(h)))


class ResidualMLP(nn.Module):
    """An MLP with a skip connection around every block; see :func:`residual_mlp`."""

    def __init__(self, *, depth: int, width: int, activation: str, in_features: int, num_classes: int):
        super().__init__()
        self.flatten = nn.Flatten()
        self.stem = _dense(in_features, width, activation)
        self.blocks = nn.ModuleList(_ResidualBlock(width, activation) for _ in range(depth))
        self.output = nn.Linear(width, num_classes)
        self.probe_layers = ["input", "stem", *(f"blocks.{i}" for i in range(depth)), "output"]
        self.pretrained = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(self.flatten(x))
        for block in self.blocks:
            h = block(h)
        return self.output(h)


def residual_mlp(
    *,
    depth: int = 16,
    width: int = 128,
    activation: str = "relu",
    in_features: int = 64,
    num_classes: int = 10,
) -> ResidualMLP:
    """A healthy deep MLP: a skip connection around every block (the control for :func:`bypass_mlp`).

    ``stem`` maps the flattened input to ``width`` units; each of the ``depth``
    blocks ``blocks.i`` computes ``h + act(linear(layer_norm(h)))``, so the signal
    and its gradient reach every layer at any depth; ``output`` gives the logits.
    ``probe_layers``: the input, ``stem``, every block's output and ``output``.

    Args:
        depth: number of residual blocks.
        width: units per layer.
        activation: one of :data:`ACTIVATIONS`.
        in_features: input features after flattening.
        num_classes: number of outputs.

    Example:
        >>> from probekit import zoo
        >>> model = zoo.residual_mlp(depth=4)
        >>> model.probe_layers
        ['input', 'stem', 'blocks.0', 'blocks.1', 'blocks.2', 'blocks.3', 'output']
    """
    for name, value in (("depth", depth), ("width", width), ("in_features", in_features), ("num_classes", num_classes)):
        _check_positive(name, value)
    _check_activation(activation)
    return ResidualMLP(depth=depth, width=width, activation=activation, in_features=in_features, num_classes=num_classes)


# ---------------------------------------------------------------------------------- torchvision models


def resnet50(*, weights: str | os.PathLike | None = None, num_classes: int | None = None) -> nn.Module:
    """torchvision's ResNet-50, with random, downloaded or local weights.

    ``probe_layers`` is the paper's: the input and the 16 residual-block outputs
    (:data:`RESNET50_LAYERS`); :data:`RESNET50_EXTRAS` adds ``maxpool``, ``avgpool``
    and ``fc`` (see :func:`default_layers`). The model expects 224 x 224 RGB
    (``input_shape``); ``pretrained`` is True when weights were loaded, so data
    loaders normalise with ImageNet statistics.

    Args:
        weights: None for random initialisation; ``"DEFAULT"``, ``"IMAGENET1K_V1"``
            or ``"IMAGENET1K_V2"`` (or a ``ResNet50_Weights`` member) for
            torchvision's ImageNet weights, downloaded on first use; or the path of
            a local state dict (``torch.save(model.state_dict(), path)``), read with
            ``weights_only=True`` so a file carrying pickled code is refused.
        num_classes: outputs of ``fc``; default 1000, or the number in a local file.

    Raises:
        WeightsUnavailableError: named weights could not be downloaded (offline).

    Example:
        >>> from probekit import zoo
        >>> model = zoo.resnet50(weights="checkpoints/resnet50.pth")
        >>> model.probe_layers[:3]
        ['input', 'layer1.0', 'layer1.1']
    """
    from torchvision import models

    state, classes = _fetch_weights(_weights_source(weights, models.ResNet50_Weights, "resnet50"), "resnet50", num_classes)
    model = models.resnet50(weights=None, num_classes=classes)
    if state is not None:
        _load_state(model, state, weights, "resnet50", hint=f"num_classes={classes}")
    model.probe_layers = list(RESNET50_LAYERS)
    model.input_shape = (3, 224, 224)
    model.pretrained = state is not None
    return model


def inception_v3(
    *,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    aux_logits: bool = True,
    transform_input: bool | None = None,
) -> nn.Module:
    """torchvision's Inception v3, with random, downloaded or local weights.

    ``probe_layers`` are the paper's 17 points (:data:`INCEPTION_V3_LAYERS`):
    ``maxpool1``, ``Conv2d_3b_1x1``, ``maxpool2``, every ``Mixed_*`` block, the
    auxiliary head ``AuxLogits`` (only with ``aux_logits=True``; it runs in train
    mode only, which the engine handles), ``avgpool`` and ``fc``.
    :data:`INCEPTION_V3_EXTRAS` adds the input and the stem convolutions. The model
    expects 299 x 299 RGB; it runs from 75 px, but the auxiliary head needs about 299.

    Args:
        weights: None for random initialisation; ``"DEFAULT"`` or ``"IMAGENET1K_V1"``
            (or an ``Inception_V3_Weights`` member), downloaded on first use; or the
            path of a local state dict, read with ``weights_only=True``.
        num_classes: outputs of ``fc``; default 1000, or the number in a local file.
        aux_logits: keep the auxiliary classifier ``AuxLogits``.
        transform_input: re-normalise ImageNet-normalised inputs the way Google's
            original weights expect; default True with weights (as torchvision
            does), False for random initialisation.

    Raises:
        WeightsUnavailableError: named weights could not be downloaded (offline).

    Example:
        >>> from probekit import zoo
        >>> model = zoo.inception_v3(aux_logits=False)
        >>> model.probe_layers[:3]
        ['maxpool1', 'Conv2d_3b_1x1', 'maxpool2']
    """
    from torchvision import models

    source = _weights_source(weights, models.Inception_V3_Weights, "inception_v3")
    state, classes = _fetch_weights(source, "inception_v3", num_classes)
    if transform_input is None:
        transform_input = state is not None
    if state is None:
        model = models.Inception3(num_classes=classes, aux_logits=aux_logits, transform_input=transform_input, init_weights=True)
    else:
        has_aux = any(key.startswith("AuxLogits.") for key in state)
        if aux_logits and not has_aux:
            raise ValueError(
                f"the weights in {_describe(weights)} have no auxiliary head (no AuxLogits.* entries); pass aux_logits=False"
            )
        model = models.Inception3(num_classes=classes, aux_logits=has_aux, transform_input=transform_input, init_weights=False)
        _load_state(model, state, weights, "inception_v3", hint=f"num_classes={classes}")
        if not aux_logits and has_aux:
            model.aux_logits = False
            model.AuxLogits = None
    model.probe_layers = default_layers("inception_v3", aux_logits=aux_logits)
    model.input_shape = (3, 299, 299)
    model.pretrained = state is not None
    return model


def _weights_source(weights: object, enum_class: type, arch: str):
    """What ``weights`` names: None (random init), a torchvision weights member, or a file path."""
    if weights is None or isinstance(weights, enum_class):
        return weights
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(
            f"weights must be None, a weights name, a {enum_class.__name__} member or a file path; got {type(weights).__name__}"
        )
    names = ["DEFAULT", *enum_class.__members__]
    if isinstance(weights, str) and weights in names:
        return enum_class.DEFAULT if weights == "DEFAULT" else enum_class[weights]
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if isinstance(weights, str) and not path.suffix and os.sep not in weights:
        raise ValueError(
            f"unknown weights {weights!r} for {arch}; use None (random), one of {', '.join(repr(n) for n in names)}, "
            "or the path of a saved state dict"
        )
    raise FileNotFoundError(f"weights file {str(path)!r} does not exist; pass the path of a state dict saved with torch.save")


def _fetch_weights(source, arch: str, num_classes: int | None) -> tuple[dict[str, torch.Tensor] | None, int]:
    """The state dict from ``source`` (None for random init) and the number of classes to build with."""
    if num_classes is not None:
        _check_positive("num_classes", num_classes)
    if source is None:
        return None, 1000 if num_classes is None else num_classes
    if isinstance(source, Path):
        state = _read_state_dict(source)
        found = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
        return state, found if num_classes is None else num_classes
    found = len(source.meta["categories"])
    if num_classes is not None and num_classes != found:
        raise ValueError(
            f"torchvision's {arch} ImageNet weights have {found} classes; got num_classes={num_classes}. "
            f"Build with num_classes={found} (or None) and replace model.fc to fine-tune"
        )
    return _download(source, arch), found


def _download(weights, arch: str) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash a RuntimeError
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = f"{type(error).__name__}: {lines[-1][:200]}" if lines else type(error).__name__
        filename = Path(urlparse(weights.url).path).name
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsUnavailableError(
            f"could not download {arch} weights {weights} ({reason}); on a machine with network access run "
            f"torchvision.models.{arch}(weights='{weights.name}'), which saves {filename} under ~/.cache/torch/hub/checkpoints, "
            f"copy that file here and pass weights='path/to/{filename}' (or put it in {cache})"
        ) from error


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict read from ``path`` without running any code it may carry."""
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refused to load {str(path)!r}: it holds pickled Python objects besides tensors, which could run code "
            "(torch.load with weights_only=True rejected it). If you trust the file, load it yourself and re-save "
            "model.state_dict() with torch.save"
        ) from error
    except (OSError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"could not read weights from {str(path)!r} ({type(error).__name__}); it must be written by "
            "torch.save(model.state_dict(), path)"
        ) from error
    if isinstance(loaded, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not (isinstance(loaded, Mapping) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values())):
        raise ValueError(
            f"{str(path)!r} does not hold a state dict (a mapping of parameter names to tensors); "
            f"got {type(loaded).__name__}. Save one with torch.save(model.state_dict(), path)"
        )
    state = dict(loaded)
    if all(key.startswith("module.") for key in state):  # saved from DataParallel / DistributedDataParallel
        state = {key[len("module."):]: value for key, value in state.items()}
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], weights: object, arch: str, *, hint: str) -> None:
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ValueError(
            f"the weights in {_describe(weights)} do not fit torchvision's {arch} built with {hint} ({detail}); "
            f"they must come from the same architecture (pass num_classes= to match the file)"
        ) from error


def _describe(weights: object) -> str:
    return repr(str(weights)) if isinstance(weights, (str, os.PathLike)) else str(weights)


# ---------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "paper_convnet": paper_convnet,
    "bypass_mlp": bypass_mlp,
    "residual_mlp": residual_mlp,
    "resnet50": resnet50,
    "inception_v3": inception_v3,
}


def available() -> list[str]:
    """Names :func:`build` accepts.

    Example:
        >>> from probekit import zoo
        >>> zoo.available()
        ['paper_convnet', 'bypass_mlp', 'residual_mlp', 'resnet50', 'inception_v3']
    """
    return list(_REGISTRY)


def build(name: str, **kwargs) -> nn.Module:
    """Build a zoo model by name, or a user's model from a ``"package.module:callable"`` spec.

    Args:
        name: one of :func:`available`, or a spec for :func:`load_callable`.
        **kwargs: keyword arguments of the model's factory.

    Example:
        >>> from probekit import zoo
        >>> model = zoo.build("bypass_mlp", depth=32, skip=(0, 16))
        >>> model = zoo.build("mypackage.models:make_net", width=64)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a model name (see probekit.zoo.available()); got {type(name).__name__}")
    if ":" in name:
        return load_callable(name)(**kwargs)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown model {name!r}; {hint}available: {', '.join(_REGISTRY)}, "
            "or 'package.module:callable' for your own factory"
        )
    return _REGISTRY[name](**kwargs)


def load_callable(spec: str) -> Callable:
    """Import a callable from a ``"package.module:attribute"`` spec (no code is evaluated from the string).

    The module is imported with :func:`importlib.import_module` and the attribute
    (which may be dotted, ``"module:Class.method"``) looked up on it.

    Args:
        spec: ``"package.module:callable"``.

    Example:
        >>> from probekit import zoo
        >>> make = zoo.load_callable("torchvision.models:resnet18")
        >>> model = make(num_classes=10)
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string 'package.module:callable'; got {type(spec).__name__}")
    module_name, colon, attribute = spec.partition(":")
    parts = module_name.split(".") + attribute.split(".")
    if not colon or not all(part.isidentifier() for part in parts):
        raise ValueError(
            f"a callable is named 'package.module:callable' (e.g. 'torchvision.models:resnet18'); got {spec!r}"
        )
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"could not import module {module_name!r} named in {spec!r} ({type(error).__name__}: {error}); "
            "check that it is installed or on sys.path"
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise AttributeError(f"{spec!r}: {type(target).__name__} {getattr(target, '__name__', '')!r} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{spec!r} names a {type(target).__name__}, not a callable; point it at a function or class that builds the model")
    return target


# ---------------------------------------------------------------------------------- argument checks


def _check_positive(name: str, value: object, *, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _check_activation(activation: object) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}; got {activation!r}")
