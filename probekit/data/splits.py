"""What a loaded dataset is: :class:`DatasetInfo` (one example's shape, classes, normalisation) and :class:`Splits`.

Also the stratified order every loader carves its splits with, and the one table
of argument checks the loaders share. This module never imports torchvision,
the zoo or the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from torch.utils.data import Dataset

from probekit.params import Interval, Options, shape_text

__all__ = ["CONSTRAINTS", "DatasetInfo", "SplitData", "Splits", "TensorPair", "stratified_order"]

TensorPair = tuple[torch.Tensor, torch.Tensor]
SplitData = Union[Dataset, TensorPair]

#: What the loaders' arguments may be (see :func:`probekit.params.check_params`).
CONSTRAINTS = {
    "size": [Interval(int, 1, None)],
    "channels": [Options(1, 3)],
    "seed": [Interval(int, 0, None)],
    "limit": [Interval(int, 1, None), None],
    "valid_fraction": [Interval(float, 0, 1, closed="neither")],
    "test_fraction": [Interval(float, 0, 1, closed="left")],
    "normalize": [bool],
    "pretrained_norm": [bool],
    "download": [bool],
}


@dataclass
class DatasetInfo:
    """What one example of a dataset looks like, as the model will receive it.

    Example:
        >>> from probekit import data
        >>> info = data.dataset_info("cifar10")
        >>> info.input_shape, info.class_names[:2]
        ((3, 32, 32), ['airplane', 'automobile'])
    """

    name: str
    """Short name of the dataset (``"digits"``, ``"mnist"``, ...) or the folder it was read from."""
    input_shape: tuple[int, int, int]
    """Shape of one input ``(channels, height, width)``."""
    num_classes: int
    """Number of classes; labels are ``0 .. num_classes - 1``."""
    class_names: list[str]
    """A readable name for each label, indexed by label."""
    mean: tuple[float, ...]
    """Per-channel mean subtracted from pixel values in ``[0, 1]`` (one value per channel)."""
    std: tuple[float, ...]
    """Per-channel standard deviation the centred pixel values are divided by."""
    normalized: bool = True
    """Whether the inputs have been normalised with ``mean`` and ``std`` (else they are in ``[0, 1]``)."""

    def __post_init__(self) -> None:
        self.input_shape = tuple(int(s) for s in self.input_shape)
        self.class_names = [str(c) for c in self.class_names]
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape must be (channels, height, width); got {self.input_shape}")
        if len(self.class_names) != self.num_classes:
            raise ValueError(
                f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes; give one name per class"
            )
        channels = self.input_shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(
                f"{self.name}: mean and std need one value per channel ({channels}); "
                f"got {len(self.mean)} means and {len(self.std)} stds"
            )

    @property
    def channels(self) -> int:
        """Number of input channels."""
        return self.input_shape[0]

    @property
    def size(self) -> int:
        """Input height (inputs are square)."""
        return self.input_shape[1]


@dataclass
class Splits:
    """Train, validation and test data of one dataset, with its :class:`DatasetInfo`.

    Each split is either a ``(X, y)`` pair of tensors (``X`` float32 of shape
    ``N x C x H x W``, ``y`` int64 of shape ``N``) or a ``torch.utils.data.Dataset``
    whose items are ``(x, y)`` with ``x`` a float tensor ``C x H x W`` and ``y`` an int.

    Example:
        >>> from probekit import data
        >>> splits = data.digits()
        >>> X, y = splits.train
        >>> splits.sizes()
        {'train': 1079, 'valid': 359, 'test': 359}
    """

    train: SplitData
    """Data the probes are trained on."""
    valid: SplitData
    """Held-out data for early stopping and for the error the paper reports."""
    test: SplitData | None
    """The official test split, or ``None`` when there is none."""
    info: DatasetInfo
    """What one example looks like and how it was normalised."""

    def sizes(self) -> dict[str, int]:
        """Number of examples in each split that is present."""
        present = {"train": self.train, "valid": self.valid, "test": self.test}
        return {name: _length(data) for name, data in present.items() if data is not None}

    def __repr__(self) -> str:
        sizes = ", ".join(f"{name}={n:,}" for name, n in self.sizes().items())
        return f"Splits({self.info.name!r}: {sizes}; inputs {shape_text(self.info.input_shape)}, {self.info.num_classes} classes)"


def _length(data: SplitData) -> int:
    if isinstance(data, (tuple, list)):
        return len(data[0])
    return len(data)


def stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A random permutation of positions in which every prefix is stratified by class.

    The k-th of the n_c examples of class c (in random order) gets the key
    ``(k + u) / n_c`` with ``u`` uniform in [0, 1); sorting by key spreads each class
    evenly along the order, so the first m positions hold about ``m * n_c / N`` of
    class c, for every m.

    Example:
        >>> stratified_order(np.array([0, 0, 1, 1]), seed=0).shape
        (4,)
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    keys = np.empty(len(labels), dtype=np.float64)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        rng.shuffle(where)
        keys[where] = (np.arange(len(where)) + rng.random(len(where))) / len(where)
    return np.argsort(keys, kind="stable")
