"""Named datasets and image folders, read through torchvision: :func:`load` and :func:`dataset_info`.

:func:`load` opens MNIST, Fashion-MNIST, CIFAR-10, Imagenette or any folder in
ImageNet layout, downloading when asked and allowed, and fits the images to a
model (see :mod:`probekit.data.transforms`). Validation data never comes from
the official test split: it is carved from the training data with a fixed
seed, stratified by class. torchvision is imported only when a dataset is
read; this module never imports the zoo or the engine.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from torch import nn
from torch.utils.data import Dataset, Subset

from probekit.data.embedded import digits
from probekit.data.downloads import download_guard
from probekit.data.splits import CONSTRAINTS, DatasetInfo, Splits, stratified_order
from probekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_transform, model_input, target_info
from probekit.params import check_params, choices

__all__ = ["DATASETS", "dataset_info", "load"]

#: Dataset names :func:`load` understands (besides a folder path).
DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "imagenette")


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
    model: nn.Module | None = None,
    limit: int | None = None,
    seed: int = 0,
    valid_fraction: float | None = None,
) -> Splits:
    """Train/valid/test splits of a named dataset or of an image folder.

    Named datasets: ``"digits"`` (embedded, see :func:`~probekit.data.digits`), ``"mnist"``,
    ``"fashion-mnist"``, ``"cifar10"`` and ``"imagenette"`` (10 easy ImageNet
    classes), read with torchvision and downloaded into ``root`` when missing
    and ``download=True``. Any other ``name`` must be a folder in ImageNet layout:
    ``name/train/<class>/*.jpg`` and ``name/val/<class>/*.jpg`` (or ``test/``).

    The test split is the official one (``val/`` for folders and Imagenette);
    validation data is carved from the training data with ``seed``, stratified by
    class. Examples are transformed on the fly (see :func:`~probekit.data.transforms_for`):
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
        model: a model to fit the inputs to: its ``input_shape`` and ``pretrained``
            attributes (every :mod:`probekit.zoo` model has them) set the defaults above.
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
        >>> splits = data.load("mnist", root="~/data", size=224, channels=3, limit=1000)
        >>> splits.info.input_shape
        (3, 224, 224)
    """
    if not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a dataset name or a folder path; got {type(name).__name__}")
    key = _canonical(name) if isinstance(name, str) else None
    model_shape, model_pretrained = model_input(model)
    if pretrained_norm is None:
        pretrained_norm = model_pretrained
    if model_shape is not None:
        channels = model_shape[0] if channels is None else channels
        size = model_shape[1] if size is None else size
    check_params(CONSTRAINTS, limit=limit, seed=seed, download=download)
    if valid_fraction is not None:
        check_params(CONSTRAINTS, valid_fraction=valid_fraction)

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
                f"root= is where named datasets ({choices(DATASETS)}) are kept; for a folder, pass the folder "
                f"itself as name. Got name={str(name)!r} and root={str(root)!r}"
            )
        native = dataset_info(name)
        info = target_info(native, size=size, channels=channels, pretrained=pretrained_norm)
        return _folder_splits(train_dir, test_dir, info, native.channels, limit=limit, seed=seed, valid_fraction=fraction)

    source = _SOURCES[key]
    info = target_info(source.info, size=size, channels=channels, pretrained=pretrained_norm)
    root = Path(root).expanduser() if root is not None else _default_root()
    if key == "imagenette":
        return _imagenette(root, download, info, limit=limit, seed=seed, valid_fraction=fraction)
    from torchvision import datasets

    dataset_class = getattr(datasets, source.torchvision_class)
    transform = build_transform(source.info.channels, info)
    with download_guard(key, root, source.owned, download):
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
    with download_guard("imagenette", root, _SOURCES["imagenette"].owned, download):
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
            f"unknown dataset {str(folder)!r}: not one of {choices(DATASETS)} and not a folder; {hint}"
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

    transform = build_transform(in_channels, info)
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
    order = stratified_order(labels, seed)
    n_valid = max(1, round(valid_fraction * len(labels)))
    valid_index, train_index = order[:n_valid], order[n_valid:]
    if limit is not None:
        valid_index, train_index = valid_index[:limit], train_index[:limit]
        test_data = Subset(test, stratified_order(np.asarray(test.targets), seed)[:limit].tolist())
    else:
        test_data = test
    return Splits(
        train=Subset(train, train_index.tolist()), valid=Subset(train, valid_index.tolist()), test=test_data, info=info
    )
