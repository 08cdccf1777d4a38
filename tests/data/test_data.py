"""Tests for probekit.data: embedded digits, torchvision datasets (offline), folders, transforms."""

from __future__ import annotations

import struct
import urllib.error
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from probekit import data
from probekit.data import DatasetInfo, DatasetUnavailableError, Splits

# ---------------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_split_sizes():
    splits = data.digits()
    assert isinstance(splits, Splits)
    assert splits.sizes() == {"train": 1079, "valid": 359, "test": 359}
    for X, y in (splits.train, splits.valid, splits.test):
        assert X.dtype == torch.float32 and y.dtype == torch.int64
        assert X.shape[1:] == (1, 8, 8) and X.shape[0] == y.shape[0]
    info = splits.info
    assert info.input_shape == (1, 8, 8) and info.num_classes == 10
    assert info.class_names == [str(d) for d in range(10)]
    assert "train=1,079" in repr(splits) and "1x8x8" in repr(splits)


def test_digits_splits_partition_the_dataset():
    splits = data.digits(normalize=False)
    rows = Counter()
    for X, y in (splits.train, splits.valid, splits.test):
        for image, label in zip(X, y):
            rows[(np.round(image.numpy() * 16).astype(np.int64).tobytes(), int(label))] += 1
    bunch = load_digits()
    expected = Counter((image.astype(np.int64).tobytes(), int(label)) for image, label in zip(bunch.images, bunch.target))
    assert rows == expected


def test_digits_splits_are_stratified():
    splits = data.digits()
    overall = np.bincount(load_digits().target, minlength=10) / 1797
    for X, y in (splits.train, splits.valid, splits.test):
        counts = np.bincount(y.numpy(), minlength=10)
        assert np.all(np.abs(counts - overall * len(y)) <= 1.5), counts


def test_digits_is_deterministic_for_a_seed_and_changes_with_it():
    a, b, c = data.digits(seed=3), data.digits(seed=3), data.digits(seed=4)
    for split in ("train", "valid", "test"):
        assert torch.equal(getattr(a, split)[0], getattr(b, split)[0])
        assert torch.equal(getattr(a, split)[1], getattr(b, split)[1])
    assert not torch.equal(a.test[1], c.test[1])


def test_digits_normalisation_uses_training_statistics():
    splits = data.digits()
    X = splits.train[0]
    assert abs(X.mean().item()) < 1e-4 and abs(X.std().item() - 1) < 1e-3
    raw = data.digits(normalize=False)
    assert raw.info.normalized is False and splits.info.normalized is True
    assert raw.train[0].min() == 0 and raw.train[0].max() == 1
    expected = (raw.valid[0] - splits.info.mean[0]) / splits.info.std[0]
    assert torch.allclose(splits.valid[0], expected, atol=1e-6)


def test_digits_resize_and_channels():
    small = data.digits(normalize=False, limit=30)
    big = data.digits(size=20, channels=3, normalize=False, limit=30)
    X = big.train[0]
    assert X.shape == (30, 3, 20, 20) and big.info.input_shape == (3, 20, 20)
    assert torch.equal(X[:, 0], X[:, 1]) and torch.equal(X[:, 0], X[:, 2])
    expected = nn.functional.interpolate(small.train[0], size=(20, 20), mode="bilinear", align_corners=False)
    assert torch.allclose(X[:, :1], expected, atol=1e-6)
    assert torch.equal(big.train[1], small.train[1])
    assert len(big.info.mean) == 3 and big.info.mean[0] == big.info.mean[2]


def test_digits_limit_is_per_split_and_class_balanced():
    splits = data.digits(limit=50)
    assert splits.sizes() == {"train": 50, "valid": 50, "test": 50}
    for _, y in (splits.train, splits.valid, splits.test):
        counts = np.bincount(y.numpy(), minlength=10)
        assert counts.min() >= 3 and counts.max() <= 7, counts
    full = data.digits()
    assert torch.equal(splits.train[0], full.train[0][:50])
    assert splits.info.mean == full.info.mean


def test_digits_pretrained_norm_uses_imagenet_statistics():
    splits = data.digits(channels=3, pretrained_norm=True, limit=5)
    assert splits.info.mean == data.IMAGENET_MEAN and splits.info.std == data.IMAGENET_STD
    raw = data.digits(channels=3, normalize=False, limit=5)
    expected = (raw.test[0][:, 1] - data.IMAGENET_MEAN[1]) / data.IMAGENET_STD[1]
    assert torch.allclose(splits.test[0][:, 1], expected, atol=1e-6)
    with pytest.raises(ValueError, match="pretrained_norm=True .* got channels=1. Pass channels=3"):
        data.digits(pretrained_norm=True)


def test_digits_without_test_split():
    splits = data.digits(test_fraction=0, valid_fraction=0.25)
    assert splits.test is None
    assert splits.sizes() == {"train": 1348, "valid": 449}


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 0}, "size must be an integer >= 1; got 0"),
        ({"channels": 2}, "channels must be one of 1, 3; got 2"),
        ({"limit": 0}, "limit must be an integer >= 1 or None; got 0"),
        ({"valid_fraction": 1.5}, r"valid_fraction must be a finite number in \(0, 1\); got 1.5"),
        ({"test_fraction": 1}, r"test_fraction must be a finite number in \[0, 1\); got 1"),
        ({"valid_fraction": 0.5, "test_fraction": 0.5}, "must leave data to train on"),
        ({"seed": -1}, "seed must be an integer >= 0"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        data.digits(**kwargs)


# ---------------------------------------------------------------------------------- info and load("digits")


def test_dataset_info_of_named_datasets():
    assert data.dataset_info("cifar10").class_names[:2] == ["airplane", "automobile"]
    assert data.dataset_info("CIFAR-10").input_shape == (3, 32, 32)
    assert data.dataset_info("Fashion_MNIST").class_names[0] == "T-shirt/top"
    mnist = data.dataset_info("mnist")
    assert mnist.input_shape == (1, 28, 28) and mnist.num_classes == 10 and len(mnist.mean) == 1
    imagenette = data.dataset_info("imagenette")
    assert imagenette.class_names[0] == "tench" and imagenette.mean == data.IMAGENET_MEAN
    assert data.dataset_info("digits").mean == data.digits(limit=1).info.mean


def test_dataset_info_validates_itself():
    with pytest.raises(ValueError, match="2 class names for 3 classes"):
        DatasetInfo("x", (1, 4, 4), 3, ["a", "b"], (0.5,), (0.2,))
    with pytest.raises(ValueError, match=r"one value per channel \(3\); got 1 means"):
        DatasetInfo("x", (3, 4, 4), 2, ["a", "b"], (0.5,), (0.2, 0.2, 0.2))


def test_load_digits_delegates_and_fits_a_model():
    splits = data.load("digits", limit=4, seed=1)
    assert torch.equal(splits.train[0], data.digits(limit=4, seed=1).train[0])
    fitted = data.load("digits", model=_Declares(), limit=2)
    assert fitted.train[0].shape == (2, 3, 30, 30)
    assert fitted.info.mean != data.IMAGENET_MEAN
    pretrained = data.load("digits", size=16, pretrained_norm=True, limit=2)
    assert pretrained.info.input_shape == (3, 16, 16) and pretrained.info.mean == data.IMAGENET_MEAN


def test_load_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown dataset 'mnsit'.*did you mean 'mnist'"):
        data.load("mnsit")
    with pytest.raises(TypeError, match="name must be a dataset name or a folder path; got int"):
        data.load(3)
    with pytest.raises(TypeError, match="model must be an nn.Module, not a name; got 'vgg'. Pass the model itself"):
        data.load("digits", model="vgg")


# ---------------------------------------------------------------------------------- offline behaviour


@pytest.fixture
def offline(monkeypatch):
    """No network: every torchvision download writes a partial file, then fails like a DNS error."""
    calls = []

    def fake_download_url(url, root, filename=None, md5=None, max_redirect_hops=3):
        calls.append(url)
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / (filename or Path(url).name)).write_bytes(b"partial")
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    def no_network(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")

    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", fake_download_url)
    monkeypatch.setattr("urllib.request.urlopen", no_network)
    return calls


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10", "imagenette"])
def test_failed_download_raises_one_clear_error_and_leaves_nothing(offline, tmp_path, name):
    root = tmp_path / "data" / "nested"
    with pytest.raises(DatasetUnavailableError, match=f"could not download the '{name}' dataset") as caught:
        data.load(name, root=root)
    message = str(caught.value)
    assert "\n" not in message
    assert "pass root=" in message and "digits()" in message and "name resolution" in message
    assert offline, "the download was never attempted"
    assert list(tmp_path.iterdir()) == []


def test_failed_download_keeps_what_was_there(offline, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    (tmp_path / "MNIST" / "raw" / "keep.bin").write_bytes(b"x")
    with pytest.raises(DatasetUnavailableError, match="could not download the 'mnist' dataset"):
        data.load("mnist", root=tmp_path)
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == ["MNIST", "MNIST/raw", "MNIST/raw/keep.bin", "notes.txt"]


def test_missing_local_copy_without_download(offline, tmp_path):
    with pytest.raises(DatasetUnavailableError, match="'cifar10' dataset is not under .* and download=False"):
        data.load("cifar10", root=tmp_path / "none", download=False)
    assert not (tmp_path / "none").exists()
    assert offline == []


# ---------------------------------------------------------------------------------- local copies


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = 0x0800 + array.ndim  # unsigned byte data
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())


@pytest.fixture
def local_mnist(tmp_path):
    """A tiny MNIST in torchvision's raw layout: 60 training and 20 test images."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (60, 28, 28), dtype=np.uint8), "t10k": rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)}
    labels = {"train": np.arange(60, dtype=np.uint8) % 10, "t10k": np.arange(20, dtype=np.uint8) % 10}
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images[split])
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split])
    return tmp_path, images, labels


def test_load_local_mnist(offline, local_mnist):
    root, images, labels = local_mnist
    splits = data.load("mnist", root=root)
    assert offline == []
    assert splits.sizes() == {"train": 54, "valid": 6, "test": 20}
    assert sorted(splits.train.indices + splits.valid.indices) == list(range(60))
    x, y = splits.test[3]
    assert isinstance(x, torch.Tensor) and type(x) is torch.Tensor and isinstance(y, int)
    assert x.shape == (1, 28, 28) and y == labels["t10k"][3]
    expected = (torch.from_numpy(images["t10k"][3]).float() / 255 - 0.1307) / 0.3081
    assert torch.allclose(x[0], expected, atol=1e-5)
    index = splits.train.indices[0]
    assert splits.train[0][1] == labels["train"][index]


def test_load_local_mnist_for_a_pretrained_rgb_model(offline, local_mnist):
    root, images, _ = local_mnist
    splits = data.load("mnist", root=root, size=32, channels=3, pretrained_norm=True, limit=5, seed=1)
    assert splits.sizes() == {"train": 5, "valid": 5, "test": 5}
    assert splits.info.input_shape == (3, 32, 32) and splits.info.mean == data.IMAGENET_MEAN
    x, _ = splits.valid[0]
    assert x.shape == (3, 32, 32)
    grey = x * torch.tensor(data.IMAGENET_STD).view(3, 1, 1) + torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    assert torch.allclose(grey[0], grey[1], atol=1e-5) and torch.allclose(grey[0], grey[2], atol=1e-5)
    assert len({int(y) for _, y in (splits.test[i] for i in range(5))}) == 5


def _write_images(folder: Path, classes: dict[str, int], *, suffix: str = ".png", size=(12, 10)) -> None:
    rng = np.random.default_rng(len(str(folder)))
    for name, count in classes.items():
        (folder / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}{suffix}")


def test_load_image_folder(tmp_path):
    _write_images(tmp_path / "shapes" / "train", {"cat": 10, "dog": 10})
    _write_images(tmp_path / "shapes" / "val", {"cat": 2, "dog": 3})
    splits = data.load(tmp_path / "shapes", size=8)
    assert splits.info.class_names == ["cat", "dog"] and splits.info.input_shape == (3, 8, 8)
    assert splits.info.mean == data.IMAGENET_MEAN
    assert splits.sizes() == {"train": 18, "valid": 2, "test": 5}
    assert sorted(splits.valid[i][1] for i in range(2)) == [0, 1]
    x, y = splits.test[4]
    assert x.shape == (3, 8, 8) and y == 1
    limited = data.load(str(tmp_path / "shapes"), size=8, limit=2)
    assert limited.sizes() == {"train": 2, "valid": 2, "test": 2}


def test_image_folder_errors(tmp_path):
    _write_images(tmp_path / "flat" / "train", {"cat": 1})
    with pytest.raises(ValueError, match=r"not in ImageNet layout: it needs train/ and val/ \(or test/\).*found subfolders \['train'\]"):
        data.load(tmp_path / "flat")
    _write_images(tmp_path / "flat" / "val", {"dog": 1})
    with pytest.raises(ValueError, match=r"must hold the same class folders.*\['cat', 'dog'\]"):
        data.load(tmp_path / "flat")
    with pytest.raises(ValueError, match="root= is where named datasets"):
        data.load(tmp_path / "flat", root=tmp_path)
    with pytest.raises(ValueError, match="has 3 channels; cannot reduce them to 1"):
        data.load(tmp_path / "flat", channels=1)


def test_load_local_imagenette_picks_the_copy_present(offline, tmp_path):
    folder = tmp_path / "imagenette2-160"
    _write_images(folder / "train", {"n01440764": 5, "n02102040": 5}, suffix=".JPEG", size=(20, 16))
    _write_images(folder / "val", {"n01440764": 1, "n02102040": 1}, suffix=".JPEG", size=(20, 16))
    splits = data.load("imagenette", root=tmp_path, size=32, limit=3)
    assert offline == []
    assert splits.info.class_names == ["tench", "English springer"]
    assert splits.info.input_shape == (3, 32, 32)
    assert splits.sizes() == {"train": 3, "valid": 1, "test": 2}
    assert splits.train[0][0].shape == (3, 32, 32)


# ---------------------------------------------------------------------------------- transforms


class _Fixed(nn.Module):
    input_shape = (3, 40, 40)
    pretrained = True


class _Declares(nn.Module):
    input_shape = (3, 30, 30)
    pretrained = False


def test_transforms_for_models():
    mnist = data.dataset_info("mnist")
    image = torch.randint(0, 256, (28, 28), dtype=torch.uint8)
    assert data.transforms_for(mnist)(image).shape == (1, 28, 28)
    assert data.transforms_for(mnist, model=_Declares())(image).shape == (3, 30, 30)
    assert data.transforms_for(mnist, model=nn.Linear(2, 2))(image).shape == (1, 28, 28)  # declares no input
    assert data.transforms_for(mnist, model=_Fixed(), size=16)(image).shape == (3, 16, 16)

    out = data.transforms_for(mnist, model=_Fixed())(image)
    assert out.shape == (3, 40, 40) and type(out) is torch.Tensor
    plain = data.transforms_for(mnist, model=_Fixed(), pretrained=False)(image)
    back = plain * 0.3081 + 0.1307
    assert torch.allclose(out, (back - torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(data.IMAGENET_STD).view(3, 1, 1), atol=1e-5)


def test_transforms_for_pil_and_tensor_agree():
    pixels = np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8)
    transform = data.transforms_for(data.dataset_info("mnist"), size=14, channels=3)
    from_pil = transform(Image.fromarray(pixels))
    from_tensor = transform(torch.from_numpy(pixels))
    assert from_pil.shape == (3, 14, 14)
    assert torch.allclose(from_pil, from_tensor, atol=1e-6)
    batch = transform(torch.from_numpy(pixels).float().div(255).expand(4, 1, 28, 28))
    assert batch.shape == (4, 3, 14, 14) and torch.allclose(batch[2], from_pil, atol=1e-5)


def test_transforms_for_errors():
    with pytest.raises(TypeError, match="info must be a DatasetInfo"):
        data.transforms_for("mnist")
    with pytest.raises(ValueError, match="cifar10 has 3 channels; cannot reduce them to 1"):
        data.transforms_for(data.dataset_info("cifar10"), channels=1)
    with pytest.raises(ValueError, match="pretrained normalisation .* got channels=1"):
        data.transforms_for(data.dataset_info("mnist"), channels=1, pretrained=True)
    with pytest.raises(TypeError, match="model must be an nn.Module that declares its input_shape; got int"):
        data.transforms_for(data.dataset_info("mnist"), model=3)
    with pytest.raises(TypeError, match="not a name; got 'resnet50'.*every probekit.zoo model declares its input_shape"):
        data.transforms_for(data.dataset_info("mnist"), model="resnet50")
