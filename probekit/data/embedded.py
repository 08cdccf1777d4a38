"""The embedded digits: scikit-learn's 1,797 handwritten 8x8 digits, split and ready for a model.

:func:`digits` needs nothing but scikit-learn (no download, no torchvision): the
default for examples, workshops and tests, resized and given three channels for
models that expect larger RGB input. This module never imports the zoo or the engine.
"""

from __future__ import annotations

import torch
from torch import nn

from probekit.data.splits import CONSTRAINTS, DatasetInfo, Splits, stratified_order
from probekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from probekit.params import check_params

__all__ = ["digits"]


def digits(
    *,
    size: int = 8,
    channels: int = 1,
    seed: int = 0,
    normalize: bool = True,
    pretrained_norm: bool = False,
    limit: int | None = None,
    valid_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> Splits:
    """scikit-learn's handwritten digits, split 60/20/20 and ready for a model.

    1,797 greyscale images of 8x8 pixels, 10 classes, shipped inside scikit-learn:
    nothing is downloaded. Pixels are scaled to ``[0, 1]``, resized (bilinear) to
    ``size`` x ``size``, replicated to ``channels`` and normalised with the mean
    and standard deviation of the training split (or ImageNet's with
    ``pretrained_norm=True``).

    The splits are stratified by class with a fixed ``seed``, and each split is
    in a stratified random order, so any prefix of it is class-balanced.

    Memory: the tensors hold ``N x channels x size x size`` float32 values; all
    1,797 images at 299 x 299 x 3 take about 1.9 GB (at 224: 1.1 GB; at 75:
    120 MB). Pass ``limit=`` to keep at most that many examples per split.

    Args:
        size: output height and width in pixels (8 keeps the original images).
        channels: 1, or 3 to replicate the grey channel for RGB models.
        seed: seed of the split; the same seed gives the same split.
        normalize: normalise with ``info.mean`` / ``info.std``; if False, pixels stay in ``[0, 1]``.
        pretrained_norm: normalise with ImageNet statistics (for pretrained
            ImageNet models; needs ``channels=3``).
        limit: keep at most this many examples in each split (class-balanced).
        valid_fraction: share of the 1,797 images used for validation.
        test_fraction: share used for test; 0 gives ``test=None``.

    Returns:
        :class:`Splits` of ``(X, y)`` tensor pairs: ``X`` float32 ``N x C x size x size``, ``y`` int64.

    Example:
        >>> from probekit import data
        >>> splits = data.digits(size=32, channels=3, limit=200)
        >>> splits.train[0].shape
        torch.Size([200, 3, 32, 32])
    """
    check_params(CONSTRAINTS, size=size, channels=channels, seed=seed, limit=limit, valid_fraction=valid_fraction,
                 test_fraction=test_fraction, normalize=normalize, pretrained_norm=pretrained_norm)
    if valid_fraction + test_fraction >= 1:
        raise ValueError(
            f"valid_fraction + test_fraction must leave data to train on; got {valid_fraction} + {test_fraction}"
        )
    if pretrained_norm and channels != 3:
        raise ValueError(f"pretrained_norm=True normalises 3 channels with ImageNet statistics; got channels={channels}. Pass channels=3")

    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.from_numpy(bunch.images).to(torch.float32).div_(16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).to(torch.int64)
    total = len(labels)
    order = torch.from_numpy(stratified_order(labels.numpy(), seed))
    n_test = round(test_fraction * total)
    n_valid = round(valid_fraction * total)
    parts = {
        "train": order[n_test + n_valid:],
        "valid": order[n_test:n_test + n_valid],
        "test": order[:n_test],
    }
    if pretrained_norm:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        train_pixels = images[parts["train"]]
        mean, std = (train_pixels.mean().item(),) * channels, (train_pixels.std().item(),) * channels
    if limit is not None:
        parts = {name: index[:limit] for name, index in parts.items()}
    info = DatasetInfo(
        name="digits",
        input_shape=(channels, size, size),
        num_classes=10,
        class_names=[str(d) for d in range(10)],
        mean=mean,
        std=std,
        normalized=normalize or pretrained_norm,
    )
    data = {
        name: (_prepare_images(images[index], info), labels[index].clone()) if len(index) else None
        for name, index in parts.items()
    }
    return Splits(train=data["train"], valid=data["valid"], test=data["test"], info=info)


def _prepare_images(images: torch.Tensor, info: DatasetInfo, *, chunk: int = 256) -> torch.Tensor:
    """Resize ``N x 1 x h x w`` images in [0, 1] to ``info.input_shape`` and normalise them.

    Works chunk by chunk into one preallocated tensor, so peak memory is the output.
    """
    channels, height, width = info.input_shape
    out = torch.empty((len(images), channels, height, width), dtype=torch.float32)
    for start in range(0, len(images), chunk):
        block = images[start:start + chunk]
        if block.shape[-2:] != (height, width):
            shrinking = height < block.shape[-2] or width < block.shape[-1]
            block = nn.functional.interpolate(
                block, size=(height, width), mode="bilinear", align_corners=False, antialias=shrinking
            )
        out[start:start + chunk] = block  # broadcasts one grey channel to all channels
    if info.normalized:
        out.sub_(torch.tensor(info.mean).view(-1, 1, 1)).div_(torch.tensor(info.std).view(-1, 1, 1))
    return out
