"""Fitting a dataset's images to a model: resize, replicate a grey channel, normalise.

:func:`transforms_for` builds the per-example transform; the loaders use the same
steps. A model says what input it wants through its own ``input_shape``
(``(C, H, W)``) and ``pretrained`` attributes, which every :mod:`probekit.zoo`
model carries; this module knows no model by name, and never imports the zoo
or the engine. torchvision is imported only when a transform is built.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from probekit.data.splits import CONSTRAINTS, DatasetInfo
from probekit.params import check_params

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "build_transform", "model_input", "target_info", "transforms_for"]

#: Per-channel mean and standard deviation of ImageNet, the normalisation that
#: torchvision's pretrained weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _RepeatChannels(nn.Module):
    """Replicate a single grey channel (dimension -3) ``channels`` times."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([image] * self.channels, dim=-3)


def model_input(model: nn.Module | None) -> tuple[tuple[int, int, int] | None, bool]:
    """The input shape ``(C, H, W)`` a model declares (None if it declares none), and whether it is pretrained.

    Example:
        >>> model = nn.Linear(3, 2)
        >>> model.input_shape, model.pretrained = (3, 32, 32), True
        >>> model_input(model)
        ((3, 32, 32), True)
    """
    if model is None:
        return None, False
    if isinstance(model, str):
        raise TypeError(
            f"model must be an nn.Module, not a name; got {model!r}. Pass the model itself (every probekit.zoo model "
            "declares its input_shape), or size= and channels="
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module that declares its input_shape; got {type(model).__name__}")
    shape = getattr(model, "input_shape", None)
    return (tuple(shape) if shape is not None else None), bool(getattr(model, "pretrained", False))


def target_info(native: DatasetInfo, *, size: int | None, channels: int | None, pretrained: bool) -> DatasetInfo:
    """``native`` resized to ``size``, given ``channels``, normalised for ``pretrained`` weights.

    Example:
        >>> from probekit import data
        >>> target_info(data.dataset_info("mnist"), size=32, channels=3, pretrained=False).input_shape
        (3, 32, 32)
    """
    size = native.size if size is None else size
    if channels is None:
        channels = 3 if pretrained else native.channels
    check_params(CONSTRAINTS, size=size, channels=channels)
    if channels < native.channels:
        raise ValueError(
            f"{native.name} has {native.channels} channels; cannot reduce them to {channels}. "
            "Pass channels=3 (or leave it unset)"
        )
    if pretrained:
        if channels != 3:
            raise ValueError(
                f"pretrained normalisation uses ImageNet statistics for 3 channels; got channels={channels}. Pass channels=3"
            )
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean = native.mean * (channels // native.channels)
        std = native.std * (channels // native.channels)
    return replace(native, input_shape=(channels, size, size), mean=mean, std=std, normalized=True)


def build_transform(in_channels: int, info: DatasetInfo):
    """The ``torchvision.transforms.v2`` pipeline from images with ``in_channels`` to inputs described by ``info``.

    Example:
        >>> from probekit import data
        >>> build_transform(1, data.dataset_info("mnist"))(torch.zeros(28, 28, dtype=torch.uint8)).shape
        torch.Size([1, 28, 28])
    """
    from torchvision.transforms import v2

    steps = [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Resize(info.size, antialias=True),
        v2.CenterCrop(info.size),
    ]
    if info.channels != in_channels:
        steps.append(_RepeatChannels(info.channels))
    if info.normalized:
        steps.append(v2.Normalize(list(info.mean), list(info.std)))
    steps.append(v2.ToPureTensor())
    return v2.Compose(steps)


def transforms_for(
    info: DatasetInfo,
    *,
    model: nn.Module | None = None,
    size: int | None = None,
    channels: int | None = None,
    pretrained: bool | None = None,
):
    """The per-example transform that turns a dataset's images into a model's inputs.

    It takes a PIL image, a ``H x W`` / ``C x H x W`` uint8 tensor, or a float tensor
    in ``[0, 1]`` (also a batch ``N x C x H x W``), and returns a float tensor:
    resized (shorter side to ``size``, then centre-cropped square), grey channels
    replicated when the model wants three, and normalised.

    Sizes come from, in order: ``size=``/``channels=``, the model's own
    ``input_shape`` attribute (every :mod:`probekit.zoo` model declares one:
    224 px for ResNet-50, 299 px for Inception v3), then ``info``. Normalisation
    uses ImageNet statistics when ``pretrained`` (default: the model's
    ``pretrained`` attribute), else ``info.mean``/``info.std``.

    Args:
        info: the dataset's native :class:`DatasetInfo` (see :func:`~probekit.data.dataset_info`).
        model: a model to fit the inputs to, one that declares ``input_shape``
            (``(C, H, W)``) and ``pretrained``; a model that declares no input
            shape keeps the dataset's size and channels.
        size: output height and width.
        channels: output channels (1, or 3 to replicate a grey channel).
        pretrained: normalise for pretrained ImageNet weights.

    Returns:
        A ``torchvision.transforms.v2.Compose``.

    Example:
        >>> from probekit import data, zoo
        >>> t = data.transforms_for(data.dataset_info("mnist"), model=zoo.resnet50(), pretrained=True)
        >>> t(torch.zeros(28, 28, dtype=torch.uint8)).shape
        torch.Size([3, 224, 224])
    """
    if not isinstance(info, DatasetInfo):
        raise TypeError(f"info must be a DatasetInfo (see probekit.data.dataset_info); got {type(info).__name__}")
    model_shape, model_pretrained = model_input(model)
    if model_shape is not None:
        channels = model_shape[0] if channels is None else channels
        size = model_shape[1] if size is None else size
    pretrained = model_pretrained if pretrained is None else pretrained
    target = target_info(info, size=size, channels=channels, pretrained=pretrained)
    return build_transform(info.channels, target)
