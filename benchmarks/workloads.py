"""The models and data every figure runs on: torchvision models with their default
probe points, class-structured synthetic images, and synthetic cached features.

Nothing is downloaded: weights are random (as in the issue's figures) and the
data are generated from a seed, with a class signal that survives a random
network, so that probes have something to find and the solver faces a
realistic, correlated problem rather than pure noise.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

NUM_CLASSES = 10
SIZES = {"resnet50": 224, "inception_v3": 299}

# The defaults of probekit.zoo, repeated so the suite also runs where the zoo is not there.
RESNET50_LAYERS = ["input"] + [f"layer{s}.{b}" for s, n in enumerate((3, 4, 6, 3), start=1) for b in range(n)]
INCEPTION_V3_LAYERS = [
    "maxpool1", "Conv2d_3b_1x1", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c",
    "Mixed_6d", "Mixed_6e", "AuxLogits", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool", "fc",
]


def build(name: str) -> nn.Module:
    """A torchvision model with random weights, in eval mode, carrying ``probe_layers``."""
    torch.manual_seed(0)
    try:
        from probekit import zoo

        model = getattr(zoo, name)()
    except (ImportError, AttributeError):
        import torchvision

        if name == "resnet50":
            model = torchvision.models.resnet50(weights=None)
        else:
            model = torchvision.models.Inception3(aux_logits=True, transform_input=False, init_weights=True)
    if not getattr(model, "probe_layers", None):
        model.probe_layers = list(RESNET50_LAYERS if name == "resnet50" else INCEPTION_V3_LAYERS)
    return model.eval()


def _patterns(size: int, seed: int) -> torch.Tensor:
    """One smooth random colour pattern per class, ``(classes, 3, size, size)``."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(NUM_CLASSES, 3, 6, 6, generator=generator)
    return nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)


def images(n: int, size: int, *, seed: int = 0, signal: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images of class pattern plus noise, and their labels (balanced: 0, 1, ..., 9, 0, 1, ...)."""
    generator = torch.Generator().manual_seed(seed + 1)
    labels = torch.arange(n) % NUM_CLASSES
    x = signal * _patterns(size, 0)[labels] + torch.randn(n, 3, size, size, generator=generator)
    return x, labels


class ImageStream(Dataset):
    """The same kind of images, generated one at a time (nothing held in memory)."""

    def __init__(self, n: int, size: int, *, seed: int = 0, signal: float = 0.5):
        self.n, self.size, self.seed, self.signal = n, size, seed, signal
        self.patterns = _patterns(size, 0)
        self.targets = torch.arange(n) % NUM_CLASSES

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        y = self.targets[i]
        return self.signal * self.patterns[y] + torch.randn(3, self.size, self.size, generator=generator), y


def features(n: int, d: int, *, seed: int = 0, separation: float = 0.35, latent: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached-feature stand-ins: ``(n, d)`` float32 non-negative, correlated features and labels.

    Like pooled ReLU features of a convnet: a latent Gaussian with a power-law
    spectrum (a few strong directions, a long tail), shifted per class, mixed
    into ``d`` features, plus independent noise, then rectified. ``seed``
    picks the mixing (the "layer"); each split draws its own examples with
    :func:`feature_split`.
    """
    return feature_split(n, d, layer_seed=seed, sample_seed=seed + 1, separation=separation, latent=latent)


def feature_split(n: int, d: int, *, layer_seed: int, sample_seed: int, separation: float = 0.35,
                  latent: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    layer = torch.Generator().manual_seed(layer_seed)
    spectrum = torch.arange(1, latent + 1, dtype=torch.float32).pow(-0.5)
    means = torch.randn(NUM_CLASSES, latent, generator=layer) * separation
    mixing = torch.randn(latent, d, generator=layer) / math.sqrt(latent) * 3
    sample = torch.Generator().manual_seed(sample_seed)
    labels = torch.randperm(n, generator=sample) % NUM_CLASSES
    z = (torch.randn(n, latent, generator=sample) + means[labels]) * spectrum
    x = torch.relu(z @ mixing + 0.5 * torch.randn(n, d, generator=sample) + 0.1)
    return x, labels


def paper_convnet() -> nn.Module:
    """The paper's MNIST convnet (probekit.zoo's, or the same layers where the zoo is not there)."""
    torch.manual_seed(0)
    try:
        from probekit import zoo

        return zoo.paper_convnet(input_size=28)
    except (ImportError, AttributeError):
        from collections import OrderedDict

        model = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(1, 32, 5, padding=2)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(32, 64, 5, padding=2)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()), ("fc1", nn.Linear(64 * 7 * 7, 200)), ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(200, 10)),
        ]))
        model.probe_layers = ["input", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "relu3", "fc2"]
        return model


def digits28() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """scikit-learn's embedded digits, upsampled to MNIST's 28 x 28: 1,400 train / 397 valid."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    x = nn.functional.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)
    y = torch.tensor(y)
    return {"train": (x[:1400], y[:1400]), "valid": (x[1400:], y[1400:])}
