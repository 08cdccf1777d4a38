"""Datasets for probing: the embedded digits, torchvision datasets and image folders.

Every loader returns a :class:`Splits`: ``train``, ``valid`` and ``test`` data plus a
:class:`DatasetInfo` that says what one example looks like (channels, size,
classes, class names) and how it was normalised. The probing engine reads
``Splits`` directly.

- :func:`digits` needs nothing but scikit-learn: 1,797 handwritten digits, 8x8
  pixels, 10 classes, embedded in scikit-learn. It is the default for examples,
  workshops and tests, and can be resized and given three channels for models
  that expect larger RGB input.
- :func:`load` opens MNIST, Fashion-MNIST, CIFAR-10, Imagenette or any folder in
  ImageNet layout through torchvision, downloading when asked and allowed.
- :func:`transforms_for` builds the per-example transform that fits a dataset to
  a model: resize (224 px for ResNet-50, 299 px for Inception v3), replicate a
  grey channel into three, and normalise (ImageNet statistics for pretrained
  weights).

Validation data never comes from the official test split: it is carved from the
training data with a fixed seed, stratified by class.
"""

from __future__ import annotations

import difflib
import os
import shutil
import tarfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetInfo",
    "DatasetUnavailableError",
    "Splits",
    "dataset_info",
    "digits",
    "load",
    "transforms_for",
]

#: Per-channel mean and standard deviation of ImageNet, the normalisation that
#: torchvision's pretrained weights expect.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: Dataset names :func:`load` understands (besides a folder path).
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagenette")

#: Input shape (C, H, W) of the models in :mod:`probekit.zoo` that need a fixed size.
MODEL_INPUTS = {"resnet50": (3, 224, 224), "inception_v3": (3, 299, 299)}

TensorPair = tuple[torch.Tensor, torch.Tensor]
SplitData = Union[Dataset, TensorPair]


class DatasetUnavailableError(RuntimeError):
    """A dataset could not be downloaded, or is not where ``root=`` says."""


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
        shape = "x".join(str(s) for s in self.info.input_shape)
        return f"Splits({self.info.name!r}: {sizes}; inputs {shape}, {self.info.num_classes} classes)"


def _length(data: SplitData) -> int:
    if isinstance(data, (tuple, list)):
        return len(data[0])
    return len(data)


# ---------------------------------------------------------------------------------- digits


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
    _check_int("size", size, minimum=1)
    _check_channels(channels)
    _check_int("seed", seed, minimum=0)
    _check_limit(limit)
    _check_fraction("valid_fraction", valid_fraction)
    if not (isinstance(test_fraction, (int, float)) and 0 <= test_fraction < 1):
        raise ValueError(f"test_fraction must be a number in [0, 1); got {test_fraction!r}")
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
    order = torch.from_numpy(_stratified_order(labels.numpy(), seed))
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


def _stratified_order(labels: np.ndarray, seed: int) -> np.ndarray:
    """A random permutation of positions in which every prefix is stratified by class.

    The k-th of the n_c examples of class c (in random order) gets the key
    ``(k + u) / n_c`` with ``u`` uniform in [0, 1); sorting by key spreads each class
    evenly along the order, so the first m positions hold about ``m * n_c / N`` of
    class c, for every m.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    keys = np.empty(len(labels), dtype=np.float64)
    for label in np.unique(labels):
        where = np.flatnonzero(labels == label)
        rng.shuffle(where)
        keys[where] = (np.arange(len(where)) + rng.random(len(where))) / len(where)
    return np.argsort(keys, kind="stable")


# ---------------------------------------------------------------------------------- named datasets


@dataclass(frozen=True)
class _Source:
    info: DatasetInfo
    torchvision_class: str
    owned: tuple[str, ...]
    """Names under ``root`` that belong to this dataset (cleaned up after a failed download)."""


_DIGIT_NAMES = [str(d) for d in range(10)]
_IMAGENETTE_CLASSES = {
    "n01440764": "tench",
    "n02102040": "English springer",
    "n02979186": "cassette player",
    "n03000684": "chain saw",
    "n03028079": "church",
    "n03394916": "French horn",
    "n03417042": "garbage truck",
    "n03425413": "gas pump",
    "n03445777": "golf ball",
    "n03888257": "parachute",
}
#: Imagenette archives by image size: the folder each one unpacks to, and its shorter side in pixels.
_IMAGENETTE_VARIANTS = {"160px": ("imagenette2-160", 160), "320px": ("imagenette2-320", 320), "full": ("imagenette2", None)}

#: The torchvision datasets :func:`load` reads, with their native shape and statistics.
_SOURCES = {
    "mnist": _Source(
        DatasetInfo("mnist", (1, 28, 28), 10, _DIGIT_NAMES, (0.1307,), (0.3081,)), "MNIST", ("MNIST",)
    ),
    "fashion-mnist": _Source(
        DatasetInfo(
            "fashion-mnist", (1, 28, 28), 10,
            ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
            (0.2860,), (0.3530,),
        ),
        "FashionMNIST",
        ("FashionMNIST",),
    ),
    "cifar10": _Source(
        DatasetInfo(
            "cifar10", (3, 32, 32), 10,
            ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
            (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616),
        ),
        "CIFAR10",
        ("cifar-10-batches-py", "cifar-10-python.tar.gz"),
    ),
    "imagenette": _Source(
        DatasetInfo("imagenette", (3, 224, 224), 10, list(_IMAGENETTE_CLASSES.values()), IMAGENET_MEAN, IMAGENET_STD),
        "Imagenette",
        tuple(name for folder, _ in _IMAGENETTE_VARIANTS.values() for name in (folder, f"{folder}.tgz")),
    ),
}


def _canonical(name: str) -> str | None:
    """The name of a known dataset, ignoring case, '-' and '_'; None if it is not one."""
    squashed = name.lower().replace("-", "").replace("_", "")
    return next((known for known in DATASETS if known.replace("-", "") == squashed), None)


def dataset_info(name: str | os.PathLike) -> DatasetInfo:
    """The native :class:`DatasetInfo` of a dataset, without loading or downloading it.

    For ``"digits"`` the mean and std are those of its training split with
    ``seed=0`` (:func:`digits` computes them for its own seed). For a folder in ImageNet layout the
    classes are its ``train/`` subfolders, shown at 224 px with ImageNet statistics.

    Args:
        name: one of :data:`DATASETS`, or a folder with ``train/`` and ``val/`` subfolders.

    Example:
        >>> from probekit import data
        >>> data.dataset_info("fashion-mnist").class_names[:3]
        ['T-shirt/top', 'Trouser', 'Pullover']
    """
    key = _canonical(name) if isinstance(name, str) else None
    if key == "digits":
        return digits(limit=1).info
    if key is not None:
        return replace(_SOURCES[key].info)
    train_dir, _ = _folder_layout(name)
    classes = sorted(entry.name for entry in os.scandir(train_dir) if entry.is_dir())
    return DatasetInfo(str(name), (3, 224, 224), len(classes), classes, IMAGENET_MEAN, IMAGENET_STD)


def _default_root() -> Path:
    configured = os.environ.get("PROBEKIT_DATA")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "probekit" / "data"


def load(
    name: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    download: bool = True,
    size: int | None = None,
    channels: int | None = None,
    pretrained_norm: bool | None = None,
    model: nn.Module | str | None = None,
    limit: int | None = None,
    seed: int = 0,
    valid_fraction: float | None = None,
) -> Splits:
    """Train/valid/test splits of a named dataset or of an image folder.

    Named datasets: ``"digits"`` (embedded, see :func:`digits`), ``"mnist"``,
    ``"fashion-mnist"``, ``"cifar10"`` and ``"imagenette"`` (10 easy ImageNet
    classes), read with torchvision and downloaded into ``root`` when missing
    and ``download=True``. Any other ``name`` must be a folder in ImageNet layout:
    ``name/train/<class>/*.jpg`` and ``name/val/<class>/*.jpg`` (or ``test/``).

    The test split is the official one (``val/`` for folders and Imagenette);
    validation data is carved from the training data with ``seed``, stratified by
    class. Examples are transformed on the fly (see :func:`transforms_for`):
    resized, replicated to ``channels`` and normalised.

    Args:
        name: a name from :data:`DATASETS` (case, '-' and '_' ignored) or a folder.
        root: where named datasets live or are downloaded to; defaults to
            ``$PROBEKIT_DATA`` or ``~/.cache/probekit/data``. Not used for folders.
        download: download a named dataset that is not under ``root``.
        size: input height and width; default: the model's input size if ``model``
            is given, else the dataset's own (224 for Imagenette and folders).
        channels: 1 or 3; default: the model's, else the dataset's.
        pretrained_norm: normalise with ImageNet statistics (for pretrained
            ImageNet weights); default: the model's ``pretrained`` attribute, else False.
        model: a model (or a :data:`MODEL_INPUTS` name) to fit the inputs to.
        limit: keep at most this many examples in each split (class-balanced).
        seed: seed of the validation split and of ``limit``'s selection.
        valid_fraction: share of the training data held out for validation;
            default 0.1 (0.2 of all images for digits).

    Returns:
        :class:`Splits` of datasets yielding ``(x, y)`` (``(X, y)`` tensors for digits).

    Raises:
        DatasetUnavailableError: the dataset could not be downloaded (for example
            offline), or is not under ``root`` with ``download=False``.

    Example:
        >>> from probekit import data
        >>> splits = data.load("mnist", root="~/data", model="resnet50", limit=1000)
        >>> splits.info.input_shape
        (3, 224, 224)
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a dataset name or a folder path; got {type(name).__name__}")
    key = _canonical(name) if isinstance(name, str) else None
    model_shape, model_pretrained = _model_input(model)
    if pretrained_norm is None:
        pretrained_norm = model_pretrained
    if model_shape is not None:
        channels = model_shape[0] if channels is None else channels
        size = model_shape[1] if size is None else size
    _check_limit(limit)
    _check_int("seed", seed, minimum=0)
    if valid_fraction is not None:
        _check_fraction("valid_fraction", valid_fraction)

    if key == "digits":
        extra = {} if valid_fraction is None else {"valid_fraction": valid_fraction}
        return digits(
            size=8 if size is None else size,
            channels=channels if channels is not None else (3 if pretrained_norm else 1),
            seed=seed, pretrained_norm=pretrained_norm, limit=limit, **extra,
        )
    fraction = 0.1 if valid_fraction is None else valid_fraction
    if key is None:
        train_dir, test_dir = _folder_layout(name)
        if root is not None:
            raise ValueError(
                f"root= is where named datasets ({', '.join(DATASETS)}) are kept; for a folder, pass the folder "
                f"itself as name. Got name={str(name)!r} and root={str(root)!r}"
            )
        native = dataset_info(name)
        info = _target_info(native, size=size, channels=channels, pretrained=pretrained_norm)
        return _folder_splits(train_dir, test_dir, info, native.channels, limit=limit, seed=seed, valid_fraction=fraction)

    source = _SOURCES[key]
    info = _target_info(source.info, size=size, channels=channels, pretrained=pretrained_norm)
    root = Path(root).expanduser() if root is not None else _default_root()
    if key == "imagenette":
        return _imagenette(root, download, info, limit=limit, seed=seed, valid_fraction=fraction)
    from torchvision import datasets

    dataset_class = getattr(datasets, source.torchvision_class)
    transform = _build_transform(source.info.channels, info)
    with _download_guard(key, root, source.owned, download):
        train = dataset_class(str(root), train=True, transform=transform, download=download)
        test = dataset_class(str(root), train=False, transform=transform, download=download)
    return _carve_splits(train, test, info, limit=limit, seed=seed, valid_fraction=fraction)


def _imagenette(root: Path, download: bool, info: DatasetInfo, **split_options) -> Splits:
    """Imagenette, from the smallest archive that is already under ``root`` and large enough.

    A variant already present is preferred (the largest one if none is large
    enough); otherwise the smallest one at least ``info.size`` pixels is downloaded.
    """
    from torchvision import datasets

    adequate = [v for v, (_, side) in _IMAGENETTE_VARIANTS.items() if side is None or side >= info.size]
    too_small = [v for v in reversed(_IMAGENETTE_VARIANTS) if v not in adequate]
    present = [v for v in adequate + too_small if (root / _IMAGENETTE_VARIANTS[v][0]).is_dir()]
    variant = present[0] if present else adequate[0]
    with _download_guard("imagenette", root, _SOURCES["imagenette"].owned, download):
        datasets.Imagenette(str(root), split="val", size=variant, download=download)
    folder = root / _IMAGENETTE_VARIANTS[variant][0]
    return _folder_splits(folder / "train", folder / "val", info, 3, **split_options)


def _folder_layout(folder: str | os.PathLike) -> tuple[Path, Path]:
    """The train and test folders of an ImageNet-layout folder, or a ValueError saying what is missing."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        close = difflib.get_close_matches(str(folder).lower(), DATASETS, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown dataset {str(folder)!r}: not one of {', '.join(DATASETS)} and not a folder; {hint}"
            "pass a dataset name, or a folder with train/<class>/ and val/<class>/ image subfolders"
        )
    test_dir = next((path / sub for sub in ("val", "test") if (path / sub).is_dir()), None)
    if not (path / "train").is_dir() or test_dir is None:
        found = sorted(entry.name for entry in os.scandir(path) if entry.is_dir())
        raise ValueError(
            f"folder {str(path)!r} is not in ImageNet layout: it needs train/ and val/ (or test/) subfolders "
            f"with one folder of images per class; found subfolders {found}"
        )
    return path / "train", test_dir


def _folder_splits(
    train_dir: Path, test_dir: Path, info: DatasetInfo, in_channels: int, *, limit: int | None, seed: int, valid_fraction: float
) -> Splits:
    from torchvision import datasets

    transform = _build_transform(in_channels, info)
    train = datasets.ImageFolder(str(train_dir), transform=transform)
    test = datasets.ImageFolder(str(test_dir), transform=transform)
    if train.classes != test.classes:
        missing = sorted(set(train.classes) ^ set(test.classes))
        raise ValueError(
            f"{train_dir} and {test_dir} must hold the same class folders; these appear in only one: {missing}"
        )
    names = [_IMAGENETTE_CLASSES.get(wnid, wnid) for wnid in train.classes]
    info = replace(info, num_classes=len(names), class_names=names)
    return _carve_splits(train, test, info, limit=limit, seed=seed, valid_fraction=valid_fraction)


def _carve_splits(
    train: Dataset, test: Dataset, info: DatasetInfo, *, limit: int | None, seed: int, valid_fraction: float
) -> Splits:
    """Hold out a stratified validation share of ``train``; apply ``limit`` to every split."""
    labels = np.asarray(train.targets)
    order = _stratified_order(labels, seed)
    n_valid = max(1, round(valid_fraction * len(labels)))
    valid_index, train_index = order[:n_valid], order[n_valid:]
    if limit is not None:
        valid_index, train_index = valid_index[:limit], train_index[:limit]
        test_data = Subset(test, _stratified_order(np.asarray(test.targets), seed)[:limit].tolist())
    else:
        test_data = test
    return Splits(
        train=Subset(train, train_index.tolist()), valid=Subset(train, valid_index.tolist()), test=test_data, info=info
    )


# ---------------------------------------------------------------------------------- downloads


@contextmanager
def _download_guard(name: str, root: Path, owned: Sequence[str], download: bool) -> Iterator[None]:
    """Turn a failed download (or a missing local copy) into one clear error, and undo its traces.

    Everything the failed attempt created under ``root`` is removed: empty
    ``raw/`` folders, partial archives, and ``root`` itself if it was created.
    Only ``root``'s top level and the dataset's own folders (``owned``) are listed,
    so a large shared data folder is not walked.
    """
    created_from = _first_missing(root)
    before = _snapshot(root, owned)
    try:
        yield
    except (OSError, RuntimeError, EOFError, tarfile.TarError) as error:
        if created_from is not None:
            shutil.rmtree(created_from, ignore_errors=True)
        else:
            for path in sorted(_snapshot(root, owned) - before, key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = f"{type(error).__name__}: {lines[-1][:200]}" if lines else type(error).__name__
        if download:
            message = (
                f"could not download the {name!r} dataset to {root} ({reason}); pass root= pointing at a folder that "
                f"already holds it (e.g. copied from a machine with network access), or use the embedded "
                f"probekit.data.digits(), which needs no download"
            )
        else:
            message = (
                f"the {name!r} dataset is not under {root} and download=False ({reason}); pass download=True, "
                f"root= pointing at a local copy, or use the embedded probekit.data.digits()"
            )
        raise DatasetUnavailableError(message) from error


def _first_missing(path: Path) -> Path | None:
    """The highest ancestor of ``path`` (or ``path`` itself) that does not exist yet."""
    missing = None
    for candidate in (path, *path.parents):
        if candidate.exists():
            break
        missing = candidate
    return missing


def _snapshot(root: Path, owned: Sequence[str]) -> set[Path]:
    if not root.is_dir():
        return set()
    paths = set(root.iterdir())
    for name in owned:
        if (root / name).is_dir():
            paths.update((root / name).rglob("*"))
    return paths


# ---------------------------------------------------------------------------------- transforms


class _RepeatChannels(nn.Module):
    """Replicate a single grey channel (dimension -3) ``channels`` times."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([image] * self.channels, dim=-3)


def _model_input(model: nn.Module | str | None) -> tuple[tuple[int, int, int] | None, bool]:
    """The input shape ``(C, H, W)`` a model expects (None if unknown), and whether it is pretrained."""
    if model is None:
        return None, False
    if isinstance(model, str):
        if model not in MODEL_INPUTS:
            raise ValueError(
                f"unknown model name {model!r}; known input sizes: {', '.join(MODEL_INPUTS)}. "
                "Pass the model itself, or size= and channels="
            )
        return MODEL_INPUTS[model], False
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a model name; got {type(model).__name__}")
    pretrained = bool(getattr(model, "pretrained", False))
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        return tuple(shape), pretrained
    from torchvision.models import Inception3, ResNet

    if isinstance(model, Inception3):
        return MODEL_INPUTS["inception_v3"], pretrained
    if isinstance(model, ResNet):
        return MODEL_INPUTS["resnet50"], pretrained
    return None, pretrained


def _target_info(native: DatasetInfo, *, size: int | None, channels: int | None, pretrained: bool) -> DatasetInfo:
    """``native`` resized to ``size``, given ``channels``, normalised for ``pretrained`` weights."""
    size = native.size if size is None else size
    _check_int("size", size, minimum=1)
    if channels is None:
        channels = 3 if pretrained else native.channels
    _check_channels(channels)
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


def _build_transform(in_channels: int, info: DatasetInfo):
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
    model: nn.Module | str | None = None,
    size: int | None = None,
    channels: int | None = None,
    pretrained: bool | None = None,
):
    """The per-example transform that turns a dataset's images into a model's inputs.

    It takes a PIL image, a ``H x W`` / ``C x H x W`` uint8 tensor, or a float tensor
    in ``[0, 1]`` (also a batch ``N x C x H x W``), and returns a float tensor:
    resized (shorter side to ``size``, then centre-cropped square), grey channels
    replicated when the model wants three, and normalised.

    Sizes come from, in order: ``size=``/``channels=``, the model (its
    ``input_shape`` attribute, as :mod:`probekit.zoo` models carry; torchvision
    ResNets 224 px and Inception v3 299 px; or a :data:`MODEL_INPUTS` name), then
    ``info``. Normalisation uses ImageNet statistics when ``pretrained`` (default:
    the model's ``pretrained`` attribute), else ``info.mean``/``info.std``.

    Args:
        info: the dataset's native :class:`DatasetInfo` (see :func:`dataset_info`).
        model: a model or model name to fit the inputs to.
        size: output height and width.
        channels: output channels (1, or 3 to replicate a grey channel).
        pretrained: normalise for pretrained ImageNet weights.

    Returns:
        A ``torchvision.transforms.v2.Compose``.

    Example:
        >>> from probekit import data
        >>> t = data.transforms_for(data.dataset_info("mnist"), model="resnet50", pretrained=True)
        >>> t(torch.zeros(28, 28, dtype=torch.uint8)).shape
        torch.Size([3, 224, 224])
    """
    if not isinstance(info, DatasetInfo):
        raise TypeError(f"info must be a DatasetInfo (see probekit.data.dataset_info); got {type(info).__name__}")
    model_shape, model_pretrained = _model_input(model)
    if model_shape is not None:
        channels = model_shape[0] if channels is None else channels
        size = model_shape[1] if size is None else size
    pretrained = model_pretrained if pretrained is None else pretrained
    target = _target_info(info, size=size, channels=channels, pretrained=pretrained)
    return _build_transform(info.channels, target)


# ---------------------------------------------------------------------------------- argument checks


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def _check_channels(channels: object) -> None:
    if channels not in (1, 3) or isinstance(channels, bool):
        raise ValueError(f"channels must be 1 or 3; got {channels!r}")


def _check_limit(limit: object) -> None:
    if limit is not None:
        _check_int("limit", limit, minimum=1)


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in (0, 1); got {value!r}")
