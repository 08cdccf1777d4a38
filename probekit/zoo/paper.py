"""The paper's models: its MNIST convnet, the 128-layer MLP with one long skip, and a healthy residual control.

:func:`paper_convnet`, :func:`bypass_mlp` (the "dead segment" example) and
:func:`residual_mlp`. Each model carries ``probe_layers`` (its default probe
points), ``pretrained`` (False) and, where it expects a fixed image size,
``input_shape``. This module imports only torch: never the data, the engine or torchvision.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from probekit.params import Interval, Options, check_params

__all__ = ["ACTIVATIONS", "BypassMLP", "ResidualMLP", "bypass_mlp", "paper_convnet", "residual_mlp"]

#: Activation functions the MLPs accept, by name.
ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}

_POSITIVE = [Interval(int, 1, None)]
#: What the paper models' arguments may be (see :func:`probekit.params.check_params`).
_CONSTRAINTS = {
    "in_channels": _POSITIVE,
    "num_classes": _POSITIVE,
    "hidden": _POSITIVE,
    "input_size": [Interval(int, 4, None)],
    "kernel_size": _POSITIVE,
    "depth": _POSITIVE,
    "width": _POSITIVE,
    "in_features": _POSITIVE,
    "activation": [Options(*ACTIVATIONS)],
}


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
    check_params(_CONSTRAINTS, in_channels=in_channels, num_classes=num_classes, hidden=hidden, input_size=input_size)
    if not (_CONSTRAINTS["kernel_size"][0].accepts(kernel_size) and kernel_size % 2 == 1):
        raise ValueError(f"kernel_size must be a positive odd integer (so padding keeps the size); got {kernel_size!r}")
    if not (isinstance(width, (tuple, list)) and len(width) == 2):
        raise ValueError(f"width must be two channel counts (conv1, conv2); got {width!r}")
    for value in width:
        check_params(_CONSTRAINTS, width=value)
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
    check_params(_CONSTRAINTS, depth=depth, width=width, in_features=in_features, num_classes=num_classes,
                 activation=activation)
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
    check_params(_CONSTRAINTS, depth=depth, width=width, in_features=in_features, num_classes=num_classes,
                 activation=activation)
    return ResidualMLP(depth=depth, width=width, activation=activation, in_features=in_features, num_classes=num_classes)
