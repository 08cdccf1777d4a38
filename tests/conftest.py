"""Shared fixtures: synthetic runs that follow docs/store.md (schema version 2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import xarray as xr

MEASURES = ("error", "loss", "top5")
_KINDS = ("conv", "relu", "pool")


def layer_names(n_layers: int) -> list[str]:
    """Forward-order names that do not sort alphabetically: input, conv1, relu2, pool3, ..., logits."""
    middle = [f"{_KINDS[(i - 1) % 3]}{i}" for i in range(1, n_layers - 1)]
    return (["input"] + middle + ["logits"])[:n_layers]


def make_run(
    n_layers: int = 6,
    n_epochs: int = 4,
    *,
    splits: Sequence[str] = ("train", "valid", "test"),
    measures: Sequence[str] = ("error", "loss"),
    nan_layers: Sequence[str] = (),
    model: str = "toynet",
    num_classes: int = 10,
    steps: bool = True,
    baselines: Sequence[str] = (),
    repeats: int = 1,
    repeat_sd: float = 0.02,
) -> xr.Dataset:
    """A run dataset as ``probekit.run.store`` writes it, with known values.

    ``error`` at layer i (of L) and epoch e (of E), split s (0 train, 1 valid,
    2 test) is ``0.9 - 0.6 * (i / (L - 1)) * ((e + 1) / E) + 0.05 * s``; loss
    is ``2.3 * error``, top5 ``error / 2``. Layers in ``nan_layers`` have NaN
    metrics and ``nonfinite`` set. Probe points sit at even depths among
    ``2 * L - 1`` points, so ``relative_depth = i / (L - 1)``.

    ``baselines`` adds the ``baselines`` variable: ``random_init`` error is
    ``0.9 - 0.2 * (i / (L - 1)) + 0.05 * s`` at every epoch (the task beats it
    above the input, where they are equal), ``control`` error is ``0.9 + 0.05 * s``
    (losses and top-5 scaled as for the task); with ``control`` every split also
    has ``selectivity`` = control error - task error (NaN in ``baselines``).
    ``repeats > 1`` adds ``probe_repeat``: the task's values plus seeded noise
    of standard deviation ``repeat_sd``, centred so that ``probe`` is exactly
    their mean.
    """
    names = layer_names(n_layers)
    depth = np.arange(n_layers, dtype=np.int64) * 2
    relative = depth / max(depth[-1], 1)
    control = "control" in baselines
    metrics = [(split, measure) for split in splits
               for measure in (*MEASURES, "selectivity") if measure in measures or (measure == "selectivity" and control)]
    i = np.arange(n_layers)[:, None, None] / max(n_layers - 1, 1)
    e = (np.arange(n_epochs)[None, :, None] + 1) / max(n_epochs, 1)
    offset = np.array([0.05 * ("train", "valid", "test").index(split) for split, _ in metrics])[None, None, :]
    scale = np.array([{"error": 1.0, "loss": 2.3, "top5": 0.5, "selectivity": np.nan}[measure]
                      for _, measure in metrics])[None, None, :]
    probe = (0.9 - 0.6 * i * e + offset) * scale
    extra_vars, extra_coords = {}, {}
    if baselines:
        base = np.full((n_layers, n_epochs, len(baselines), len(metrics)), np.nan)
        for b, name in enumerate(baselines):
            error = 0.9 - 0.2 * i + 0 * e if name == "random_init" else 0.9 + 0 * i * e
            base[:, :, b, :] = (error + offset) * scale
        extra_vars["baselines"] = (("layer", "epoch", "baseline", "metric"), base)
        extra_coords["baseline"] = ("baseline", np.array(list(baselines), dtype=object))
        if control:
            task_error = 0.9 - 0.6 * i * e + offset
            control_error = 0.9 + offset
            selectivity = np.broadcast_to(control_error - task_error, probe.shape)
            is_selectivity = np.array([m == "selectivity" for _, m in metrics])
            probe = np.where(is_selectivity[None, None, :], selectivity, probe)
    if repeats > 1:
        noise = np.random.default_rng(0).normal(0.0, repeat_sd, size=(n_layers, n_epochs, repeats, len(metrics)))
        noise -= noise.mean(axis=2, keepdims=True)
        extra_vars["probe_repeat"] = (("layer", "epoch", "repeat", "metric"), probe[:, :, None, :] + noise)
        extra_coords["repeat"] = ("repeat", np.arange(repeats, dtype=np.int64))
    nonfinite = np.zeros((n_layers, n_epochs), dtype=bool)
    for name in nan_layers:
        probe[names.index(name)] = np.nan
        nonfinite[names.index(name)] = True
        for value in extra_vars.values():
            value[1][names.index(name)] = np.nan
    epochs = np.arange(n_epochs, dtype=np.int64)
    step = epochs * 100 if steps else np.full(n_epochs, -1, dtype=np.int64)
    channels = [16 * (1 + k // 3) for k in range(1, n_layers - 1)]
    shapes = ["3x8x8"] + [f"{c}x8x8" for c in channels] + ["10"]
    feature_dim = np.array([192, *channels, 10], dtype=np.int64)[:n_layers]
    reduction = np.array(["flatten"] + ["pool"] * (n_layers - 2) + ["flatten"], dtype=object)[:n_layers]
    ops = np.array(["input"] + ["Conv2d"] * (n_layers - 2) + ["Linear"], dtype=object)[:n_layers]
    return xr.Dataset(
        {
            "probe": (("layer", "epoch", "metric"), probe),
            "l2": (("layer", "epoch"), np.where(nonfinite, np.nan, 1e-4)),
            "reduction_used": (("layer", "epoch"), np.repeat(reduction.astype(str)[:, None], n_epochs, axis=1)),
            "nonfinite": (("layer", "epoch"), nonfinite),
            "iterations": (("layer", "epoch"), np.full((n_layers, n_epochs), 50, dtype=np.int64)),
            "converged": (("layer", "epoch"), np.ones((n_layers, n_epochs), dtype=bool)),
            "model_loss": (("epoch",), np.full(n_epochs, np.nan)),
            "model_error": (("epoch",), np.full(n_epochs, np.nan)),
            "wall_time": (("epoch",), epochs * 1.5),
            **extra_vars,
        },
        coords={
            "layer": ("layer", np.array(names, dtype=object)),
            "depth": ("layer", depth),
            "relative_depth": ("layer", relative),
            "op": ("layer", ops),
            "shape": ("layer", np.array(shapes[:n_layers], dtype=object)),
            "layout": ("layer", np.array(["map"] * (n_layers - 1) + ["vector"], dtype=object)[:n_layers]),
            "feature_dim": ("layer", feature_dim),
            "reduction": ("layer", reduction),
            "epoch": ("epoch", epochs),
            "step": ("epoch", step),
            "metric": ("metric", np.array([f"{s}_{m}" for s, m in metrics], dtype=object)),
            "split": ("metric", np.array([s for s, _ in metrics], dtype=object)),
            "measure": ("metric", np.array([m for _, m in metrics], dtype=object)),
            **extra_coords,
        },
        attrs={
            "probekit_schema": 2,
            "mode": "snapshot",
            "model": model,
            "model_class": "ToyNet",
            "model_parameters": 12345,
            "dataset": "digits",
            "n_train": 1000,
            "n_valid": 400,
            "n_test": 397,
            "num_classes": num_classes,
            "chance_error": 1.0 - 1.0 / num_classes,
            "l2": 1e-4,
            "seed": 0,
            "device": "cpu",
            "batch_size": 64,
            "budget": 200,
            "probekit_version": "0.1.0",
            "torch_version": "2.14.1",
            "python_version": "3.11",
            "command": "pytest",
            "started": "2026-01-01T00:00:00Z",
            **({"baselines": list(baselines)} if baselines else {}),
            **({"repeats": repeats} if repeats > 1 else {}),
        },
    )


@pytest.fixture
def run() -> xr.Dataset:
    """A small run: 6 layers, 4 epochs, train/valid/test, error and loss."""
    return make_run()


# --------------------------------------------------------------------- engine fixtures
@pytest.fixture(scope="session")
def digits_tensors():
    """scikit-learn's digits as 1x8x8 tensors in [0, 1], split 1000 / 400 / 397."""
    import torch
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(y)
    return {"train": (x[:1000], y[:1000]), "valid": (x[1000:1400], y[1000:1400]), "test": (x[1400:], y[1400:])}


def tiny_convnet(seed: int = 0, *, batchnorm: bool = False, dropout: bool = False):
    """A small convnet for 1x8x8 inputs with readable layer names."""
    from collections import OrderedDict

    import torch
    from torch import nn

    torch.manual_seed(seed)
    layers = [("conv1", nn.Conv2d(1, 8, 3, padding=1))]
    if batchnorm:
        layers.append(("bn1", nn.BatchNorm2d(8)))
    layers += [("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)), ("flatten", nn.Flatten())]
    if dropout:
        layers.append(("drop", nn.Dropout(0.5)))
    layers += [("fc1", nn.Linear(128, 32)), ("relu2", nn.ReLU()), ("fc2", nn.Linear(32, 10))]
    return nn.Sequential(OrderedDict(layers))
