"""Data splits in, reduced features per layer out: one forward pass per batch.

``data=`` arguments take train/valid(/test) splits as a mapping
(``{"train": ..., "valid": ...}``), a sequence ``(train, valid[, test])`` or an
object with ``train``/``valid``/``test`` attributes (``probekit.data.Splits``).
Each split is a ``DataLoader``, a torch ``Dataset`` of ``(x, y)`` pairs, or an
``(X, y)`` pair of tensors or arrays.

This module owns the ``data=`` forms, label checks and the feature cache (in
memory, or memory-mapped files above ``cache_bytes``). It runs an
:class:`~probekit.engine.extract.Extractor` it is given and imports nothing
after it on the engine's path (no probes, plan or monitor); never the run
store, the diagnosis, the charts or the explorers.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from probekit.engine.devices import torch_threads
from probekit.engine.extract import Extractor
from probekit.engine.points import as_args

__all__ = [
    "DEFAULT_CACHE_BYTES", "SplitFeatures", "as_splits", "batches", "check_labels", "extract", "labels_of", "split_size",
]

_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}
#: Above this many bytes of cached features, the cache goes to disk.
DEFAULT_CACHE_BYTES = 2 * 2**30


def as_splits(data: object) -> dict[str, object]:
    """Normalise a ``data=`` argument to ``{"train": ..., "valid": ..., "test": ...}``."""
    if isinstance(data, Mapping):
        splits = {}
        for key, value in data.items():
            if key not in _ALIASES:
                raise ValueError(f"unknown split {key!r} in data=; use 'train', 'valid' (or 'val') and 'test'")
            splits[_ALIASES[key]] = value
    elif all(hasattr(data, a) for a in ("train", "valid")):
        splits = {name: getattr(data, name, None) for name in ("train", "valid", "test")}
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)) and 1 <= len(data) <= 3 and not _is_pair(data):
        splits = dict(zip(("train", "valid", "test"), data))
    else:
        raise TypeError(
            f"data= must be a dict of splits, a (train, valid[, test]) tuple or a Splits object; got {type(data).__name__}. "
            "Each split is a DataLoader, a Dataset of (x, y) or an (X, y) pair"
        )
    splits = {k: v for k, v in splits.items() if v is not None}
    if "train" not in splits:
        raise ValueError("data= has no 'train' split; probes are fitted on it")
    for name, split in splits.items():
        _check_split(name, split)
    return splits


def _is_pair(data: Sequence) -> bool:
    """An ``(X, y)`` pair passed where a tuple of splits was expected."""
    return len(data) == 2 and all(isinstance(d, (torch.Tensor, np.ndarray)) for d in data)


def _check_split(name: str, split: object) -> None:
    if isinstance(split, (DataLoader, Dataset)):
        if hasattr(split, "__len__") and len(split) == 0:
            raise ValueError(f"the {name} split is empty; give it at least one example per class")
        return
    if isinstance(split, (tuple, list)) and len(split) == 2:
        x, y = split
        if len(x) != len(y):
            raise ValueError(f"the {name} split has {len(x)} inputs but {len(y)} labels; they must match")
        if len(y) == 0:
            raise ValueError(f"the {name} split is empty; give it at least one example per class")
        return
    raise TypeError(
        f"the {name} split must be a DataLoader, a Dataset of (x, y) or an (X, y) pair; got {type(split).__name__}"
    )


def split_size(split: object) -> int | None:
    if isinstance(split, DataLoader):
        dataset = split.dataset
        return len(dataset) if hasattr(dataset, "__len__") else None
    if isinstance(split, Dataset):
        return len(split) if hasattr(split, "__len__") else None
    return len(split[1])


def batches(split: object, batch_size: int) -> Iterator[tuple[object, torch.Tensor]]:
    """``(inputs, labels)`` batches of one split, in a fixed order."""
    if isinstance(split, DataLoader):
        yield from split
        return
    if isinstance(split, Dataset):
        yield from DataLoader(split, batch_size=batch_size, shuffle=False)
        return
    x, y = split
    for start in range(0, len(y), batch_size):
        yield _tensor(x[start:start + batch_size]), _tensor(y[start:start + batch_size])


def _tensor(value: object) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def labels_of(split: object, batch_size: int) -> torch.Tensor:
    """All labels of a split (cheap for tensor pairs and datasets with ``targets``)."""
    if isinstance(split, (tuple, list)):
        return _tensor(split[1])
    dataset = split.dataset if isinstance(split, DataLoader) else split
    targets = getattr(dataset, "targets", None)
    if targets is not None and not isinstance(split, DataLoader):
        return _tensor(targets)
    return torch.cat([_tensor(y).reshape(-1) for _, y in batches(split, batch_size)])


def check_labels(name: str, labels: torch.Tensor, num_classes: int) -> None:
    """Refuse labels a probe cannot use, naming the split and what to do."""
    if labels.numel() == 0:
        raise ValueError(f"the {name} split is empty; give it at least one example per class")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        if labels.is_floating_point() and torch.isfinite(labels).all() and (labels == labels.round()).all():
            raise TypeError(
                f"the {name} split's labels are {labels.dtype} holding whole numbers; pass them as integers (e.g. y.long())"
            )
        raise TypeError(f"the {name} split's labels must be integer class indices; got {labels.dtype} values")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"the {name} split has labels in [{low}, {high}], outside [0, {num_classes - 1}] for num_classes={num_classes}; "
            "relabel them as 0..K-1 or pass the right num_classes"
        )
    if name == "train":
        present = int(torch.unique(labels).numel())
        if present < 2:
            raise ValueError(f"the train split holds a single class ({low}); a probe needs at least two classes to separate")
        if present < num_classes:
            missing = sorted(set(range(num_classes)) - set(torch.unique(labels).tolist()))
            raise ValueError(
                f"the train split holds {present} of the {num_classes} declared classes (missing {missing[:10]}); "
                "pass num_classes matching the labels or add examples of the missing classes"
            )


@dataclass
class SplitFeatures:
    """Reduced features of one split: ``features[layer]`` is ``(n, d)``; ``labels`` is ``(n,)``."""

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    nonfinite: dict[str, bool] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory | None = None


def extract(
    extractor: Extractor,
    split: object,
    *,
    name: str,
    dims: Mapping[str, int],
    num_classes: int,
    batch_size: int,
    device: torch.device,
    channels_last: bool = False,
    cache_bytes: int = DEFAULT_CACHE_BYTES,
    progress=None,
    autocast: torch.dtype | None = None,
) -> SplitFeatures:
    """Run ``extractor`` over one split and cache every layer's reduced features.

    The model runs under ``torch.no_grad()`` (not ``inference_mode``, whose
    tensors cannot be saved for backward). Features stay in memory while the
    whole cache fits in ``cache_bytes``, else they go to memory-mapped files in
    a temporary folder, removed with the returned object. With ``autocast``
    (e.g. ``torch.bfloat16``) the forward pass runs under ``torch.autocast``
    on ``device``; the cached features are float32 either way.
    """
    n = split_size(split)
    total_bytes = (n or 0) * sum(dims.values()) * 4
    tmp = None
    if n is not None and total_bytes > cache_bytes:
        tmp = tempfile.TemporaryDirectory(prefix="probekit-cache-")
        store = {layer: np.lib.format.open_memmap(f"{tmp.name}/{i}.npy", mode="w+", dtype=np.float32, shape=(n, d))
                 for i, (layer, d) in enumerate(dims.items())}
    else:
        store = {layer: [] for layer in dims}
    labels, position = [], 0
    nonfinite = dict.fromkeys(dims, False)
    mixed = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    with torch.no_grad():
        for inputs, y in batches(split, batch_size):
            args = tuple(a.to(device, non_blocking=True) if isinstance(a, torch.Tensor) else a for a in as_args(inputs))
            if channels_last and args[0].dim() == 4:
                args = (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
            with mixed:
                out = extractor(*args)
            y = _tensor(y).reshape(-1)
            count = y.shape[0]
            with torch_threads(1):  # reduced features are small: bookkeeping is cheapest on one thread
                for layer, value in out.items():
                    value = value.float()
                    # One float64 sum (no overflow from float32 values) is finite iff every value
                    # is; several times cheaper than isfinite().all() on every batch and layer.
                    if not nonfinite[layer] and not math.isfinite(value.sum(dtype=torch.float64)):
                        nonfinite[layer] = True
                    if tmp is not None:
                        store[layer][position:position + count] = value.cpu().numpy()
                    else:
                        store[layer].append(value)
            labels.append(y)
            position += count
            if progress is not None:
                progress.update(count)
    labels_all = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    check_labels(name, labels_all, num_classes)
    if tmp is not None:
        features = {layer: torch.from_numpy(array) for layer, array in store.items()}
    else:
        features = {}
        for layer in list(store):
            features[layer] = torch.cat(store.pop(layer))
    return SplitFeatures(features=features, labels=labels_all.to(device).long(), nonfinite=nonfinite, _tmp=tmp)

