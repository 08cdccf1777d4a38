"""Data splits in, reduced features per layer out: one forward pass per batch.

``data=`` arguments take train/valid(/test) splits as a mapping
(``{"train": ..., "valid": ...}``), a sequence ``(train, valid[, test])`` or an
object with ``train``/``valid``/``test`` attributes (``probekit.data.Splits``).
Each split is one of:

- an ``(inputs, labels)`` pair, ``inputs`` being a tensor or array, a tuple of
  positional arguments or a mapping of keyword arguments (all batched on dim 0);
- a torch ``Dataset`` (map-style or ``IterableDataset``), or any sized object
  with ``__getitem__`` such as a Hugging Face ``datasets.Dataset``; its items are
  ``(inputs, label)`` pairs or rows (mappings) carrying their label under
  ``label_key=``;
- a ``DataLoader`` yielding such batches (over an ``IterableDataset`` too:
  nothing here calls ``len()`` on it; progress then has no total).

**Rows with a label key.** A mapping row's label is its ``label_key`` entry and
the model's keyword arguments are **all its other keys**, passed as
``model(**inputs)`` (e.g. ``input_ids``, ``attention_mask``). A key the model's
``forward`` does not take (a ``text`` or ``idx`` column) is refused with a
one-line error naming it: remove such columns from the rows. Rows a Dataset
yields are collated here: numbers, lists and arrays are stacked into tensors
(all rows of a key must have one shape: pad them), anything else (strings)
stays a list.

**Labels.** ``(N,)`` class indices label whole examples. Integer ``(N, T)``
labels, ``-100`` marking "no label" (Hugging Face's convention), make a
token-level run: every labelled token is one probe example, in row-major order,
and only those tokens' features are cached (``M x d``, never ``N x T x d``).
Splits stay split by sequence (each split is given whole), and
:attr:`SplitFeatures.groups` holds each row's sequence for any further split.
One-hot rows, labels of rank 3 or more and float ``(N, T)`` labels are refused
with one line each.

**Masks.** A mapping batch's ``mask_key`` entry (``"attention_mask"`` by
default) is passed to the extractor as ``mask=`` so sequence reductions skip
padding; a labelled token on padding is refused.

This module owns the ``data=`` forms, the collation of rows, label checks and
the feature cache (in memory, or files on disk above ``cache_bytes``). It runs
an :class:`~probekit.engine.extract.Extractor` it is given, imports
:mod:`~probekit.engine.batch` for the batch forms,
:mod:`~probekit.engine.distributed` for one rank's shard of a split
(:func:`shard_batches`, ``extract(comm=...)``) and nothing after it on the
engine's path (no probes, plan or monitor); never the run store, the
diagnosis, the charts or the explorers.
"""

from __future__ import annotations

import inspect
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate

from probekit.engine.batch import MASK_KEY, attention_mask, to_device
from probekit.engine.devices import torch_threads
from probekit.engine.distributed import Collective, shard
from probekit.engine.extract import Extractor
from probekit.params import Options, check_params, choices

__all__ = [
    "AUTOCAST_CONSTRAINTS", "AUTOCAST_DTYPES", "DEFAULT_CACHE_BYTES", "IGNORE_INDEX", "LabelSummary", "SplitFeatures",
    "as_splits", "autocast_dtype", "autocast_name", "batches", "cache_budget", "check_inputs", "check_labels", "collate",
    "example_kind", "extract", "label_summary", "labels_of", "shard_batches", "split_size",
]

_ALIASES = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}
#: Above this many bytes of cached features, the cache goes to disk.
DEFAULT_CACHE_BYTES = 2 * 2**30
#: The label of a token that has none (per-token labels; Hugging Face's convention).
IGNORE_INDEX = -100
#: The names ``autocast=`` takes, and the mixed-precision dtype each stands for.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_AUTOCAST_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


class _MixedDtype:
    """A ``probekit.params`` constraint: ``torch.bfloat16`` or ``torch.float16`` itself."""

    def accepts(self, value: object) -> bool:
        return isinstance(value, torch.dtype) and value in _AUTOCAST_NAMES

    def describe(self) -> str:
        return "torch.bfloat16 or torch.float16"


#: What ``autocast=`` may be: ``None`` (off), a name of :data:`AUTOCAST_DTYPES` or the dtype itself.
AUTOCAST_CONSTRAINTS = {"autocast": [Options(*AUTOCAST_DTYPES), _MixedDtype(), None]}


def autocast_dtype(autocast: str | torch.dtype | None) -> torch.dtype | None:
    """The dtype of an ``autocast=`` argument (checked: a one-line error for anything else); ``None`` is off.

    Example:
        >>> autocast_dtype("bf16")
        torch.bfloat16
    """
    check_params(AUTOCAST_CONSTRAINTS, autocast=autocast)
    return AUTOCAST_DTYPES[autocast] if isinstance(autocast, str) else autocast


def autocast_name(autocast: str | torch.dtype | None) -> str:
    """How a run records its ``autocast=`` setting: ``"bf16"``, ``"fp16"`` or ``"none"``.

    Example:
        >>> autocast_name(torch.float16)
        'fp16'
    """
    dtype = autocast_dtype(autocast)
    return "none" if dtype is None else _AUTOCAST_NAMES[dtype]


_FORMS = (
    "Each split is a DataLoader, a Dataset of (inputs, label) or of rows with label_key=, "
    "or an (inputs, labels) pair"
)


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
            + _FORMS
        )
    splits = {k: v for k, v in splits.items() if v is not None}
    if "train" not in splits:
        raise ValueError("data= has no 'train' split; probes are fitted on it")
    for name, split in splits.items():
        _check_split(name, split)
    return splits


def _is_array(value: object) -> bool:
    return isinstance(value, (torch.Tensor, np.ndarray))


def _positional(inputs: object, n: int) -> bool:
    """Whole-split inputs given as positional arguments: a tuple or list of arrays, each with ``n`` rows.

    Any other list (python lists, a list of per-example arrays) is one input, stacked as an array.
    """
    return (isinstance(inputs, (tuple, list)) and bool(inputs)
            and all(_is_array(v) and v.ndim >= 1 and len(v) == n for v in inputs))


def _is_inputs(value: object, n: int) -> bool:
    """A whole split's inputs for ``n`` labels: an array, a mapping of arrays or positional arrays."""
    if _is_array(value):
        return True
    if isinstance(value, Mapping):
        return any(_is_array(v) for v in value.values())
    return _positional(value, n)


def _is_pair(data: Sequence) -> bool:
    """An ``(inputs, labels)`` pair passed where a tuple of splits was expected."""
    return len(data) == 2 and _is_array(data[1]) and data[1].ndim >= 1 and _is_inputs(data[0], len(data[1]))


def _is_rows(split: object) -> bool:
    """A map-style dataset that is not a torch Dataset (e.g. a Hugging Face ``datasets.Dataset``)."""
    return (not isinstance(split, (tuple, list, Mapping, str, bytes, torch.Tensor, np.ndarray))
            and hasattr(split, "__getitem__") and hasattr(split, "__len__"))


def _sized(dataset: object) -> bool:
    if isinstance(dataset, IterableDataset):
        return False
    try:
        len(dataset)
    except TypeError:
        return False
    return True


def _count(inputs: object, n: int) -> int:
    """Examples in a whole split's inputs (``n``: its labels)."""
    if isinstance(inputs, Mapping):
        first = next((v for v in inputs.values() if _is_array(v) and v.ndim >= 1), None)
        if first is None:
            raise TypeError("a split's mapping of inputs must hold arrays or tensors with a leading example dim")
        return len(first)
    return n if _positional(inputs, n) else len(inputs)


def _check_split(name: str, split: object) -> None:
    if isinstance(split, DataLoader):
        if _sized(split.dataset) and len(split.dataset) == 0:
            raise ValueError(f"the {name} split is empty; give it at least one example per class")
        return
    if isinstance(split, Dataset) or _is_rows(split):
        if _sized(split) and len(split) == 0:
            raise ValueError(f"the {name} split is empty; give it at least one example per class")
        return
    if isinstance(split, (tuple, list)) and len(split) == 2 and hasattr(split[1], "__len__"):
        x, y = split
        n_y = len(y)
        n_x = _count(x, n_y)
        if n_x != n_y:
            raise ValueError(f"the {name} split has {n_x} inputs but {n_y} labels; they must match")
        if n_y == 0:
            raise ValueError(f"the {name} split is empty; give it at least one example per class")
        return
    raise TypeError(f"the {name} split must be a DataLoader, a Dataset or an (inputs, labels) pair; got "
                    f"{type(split).__name__}. {_FORMS}")


def split_size(split: object) -> int | None:
    """Examples (sequences, in a token-level run) in a split; ``None`` when unknown (an ``IterableDataset``)."""
    if isinstance(split, DataLoader):
        return len(split.dataset) if _sized(split.dataset) else None
    if isinstance(split, Dataset) or _is_rows(split):
        return len(split) if _sized(split) else None
    return len(split[1])


# ----------------------------------------------------------------------------- batches
def collate(rows: Sequence[object]) -> object:
    """A batch of a Dataset's items: ``(inputs, label)`` pairs or mapping rows.

    Mapping rows (and mapping inputs of pairs) are collated key by key:
    numbers, arrays and lists of numbers are stacked into one tensor per key
    (every row must have the same shape), other values (strings) stay lists.
    Anything else goes to torch's ``default_collate``.
    """
    first = rows[0]
    if isinstance(first, Mapping):
        return {key: _stack(key, [row[key] for row in rows]) for key in first}
    if isinstance(first, (tuple, list)) and len(first) == 2 and isinstance(first[0], Mapping):
        return collate([row[0] for row in rows]), default_collate([row[1] for row in rows])
    return default_collate(rows)


def _stack(key: str, values: list) -> object:
    if not isinstance(values[0], (torch.Tensor, np.ndarray, np.number, list, tuple, int, float, bool)):
        return list(values)
    try:
        tensors = [torch.as_tensor(v) for v in values]
    except (TypeError, ValueError, RuntimeError):  # ragged lists, lists of strings
        if all(isinstance(v, (list, tuple)) for v in values) and len({len(v) for v in values}) > 1:
            raise ValueError(_ragged(key, sorted({len(v) for v in values}))) from None
        return list(values)
    shapes = sorted({tuple(t.shape) for t in tensors})
    if len(shapes) > 1:
        raise ValueError(_ragged(key, shapes))
    return torch.stack(tensors)


def _ragged(key: str, shapes: list) -> str:
    first, last = (s[0] if isinstance(s, tuple) and len(s) == 1 else s for s in (shapes[0], shapes[-1]))
    return (f"rows of {key!r} differ in length ({first} and {last}); pad them to one length "
            "(e.g. tokenizer(..., padding='max_length')) or pass a DataLoader whose collate_fn pads")


def batches(split: object, batch_size: int, *, label_key: str | None = None,
            name: str = "train") -> Iterator[tuple[object, torch.Tensor]]:
    """``(inputs, labels)`` batches of one split, in a fixed order.

    ``inputs`` keeps its form (a tensor, a tuple of positional arguments or a
    mapping of keyword arguments); a mapping batch's labels are its
    ``label_key`` entry, and its other keys are the inputs.
    """
    if isinstance(split, DataLoader):
        source = split
    elif isinstance(split, Dataset) or _is_rows(split):
        source = DataLoader(split, batch_size=batch_size, shuffle=False, collate_fn=collate)
    else:
        x, y = split
        positional = _positional(x, len(y))
        for start in range(0, len(y), batch_size):
            yield _rows(x, start, start + batch_size, positional), _tensor(y[start:start + batch_size])
        return
    for item in source:
        yield _unpack(item, label_key, name)


def shard_batches(split: object, batch_size: int, comm: Collective, *, label_key: str | None = None,
                  name: str = "train") -> Iterator[tuple[object, torch.Tensor, torch.Tensor]]:
    """This rank's ``(inputs, labels, positions)`` batches of one split (see :func:`probekit.engine.distributed.shard`).

    ``positions`` holds each example's position in the whole split, so that
    the ranks' rows together are the split's, each once.
    """
    part = shard(split, comm, name=name)
    if part.by_batch:
        for inputs, y, offset in part.split.batches(lambda item: _unpack(item, label_key, name), _length):
            yield inputs, y, offset + torch.arange(_length(y))
        return
    seen = 0
    for inputs, y in batches(part.split, batch_size, label_key=label_key, name=name):
        count = _length(y)
        if part.positions is not None:
            positions = part.positions[seen:seen + count]
        else:  # strided over an iterable dataset: local example j is example j * W + rank
            positions = torch.arange(seen, seen + count) * part.world_size + part.rank
        seen += count
        yield inputs, y, positions


def _length(labels: object) -> int:
    labels = _tensor(labels)
    return int(labels.shape[0]) if labels.dim() else 1


def _rows(inputs: object, start: int, stop: int, positional: bool) -> object:
    """Examples ``start:stop`` of a whole split's inputs, as tensors (non-array mapping values untouched)."""
    if isinstance(inputs, Mapping):
        return {key: _tensor(value[start:stop]) if _is_array(value) and value.ndim >= 1 else value
                for key, value in inputs.items()}
    if positional:
        return tuple(_tensor(value[start:stop]) for value in inputs)
    return _tensor(inputs[start:stop])


def _unpack(item: object, label_key: str | None, name: str) -> tuple[object, object]:
    if isinstance(item, Mapping):
        keys = choices(list(item))
        if label_key is None:
            guess = next((k for k in ("label", "labels") if k in item), "label")
            raise ValueError(f"the {name} split yields rows (keys: {keys}) rather than (inputs, label) pairs; "
                             f"pass label_key= naming the key that holds the labels, e.g. label_key={guess!r}")
        if label_key not in item:
            raise ValueError(f"the {name} split's rows have no label key {label_key!r} (keys: {keys}); "
                             "pass label_key= naming the key that holds the labels")
        for key, value in item.items():
            if _transposed(value):
                raise ValueError(
                    f"the {name} split's batches hold {key!r} as a list of {len(value)} tensors (torch's default collate "
                    "splits list-valued rows by position); give the rows tensors (a Hugging Face dataset: "
                    "set_format('torch')) or pass collate_fn=probekit.engine.features.collate to the DataLoader"
                )
        return {k: v for k, v in item.items() if k != label_key}, item[label_key]
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return item[0], item[1]
    raise TypeError(f"each batch of the {name} split must be an (inputs, labels) pair or a row with its label under "
                    f"label_key=; got {type(item).__name__}" + (f" of length {len(item)}" if isinstance(item, (tuple, list)) else ""))


def _transposed(value: object) -> bool:
    """A row's list of numbers after ``default_collate``: a list of equal 1-D tensors, one per position."""
    return (isinstance(value, list) and len(value) > 1 and all(isinstance(v, torch.Tensor) and v.dim() == 1 for v in value)
            and len({v.shape[0] for v in value}) == 1)


def _tensor(value: object) -> torch.Tensor:
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))


def check_inputs(model: nn.Module, inputs: object, *, name: str = "train") -> None:
    """Refuse a mapping batch that lacks an argument ``model.forward`` requires, or holds one it does not take."""
    if not isinstance(inputs, Mapping):
        return
    try:
        parameters = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return
    named = [p for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    missing = [p.name for p in named if p.default is p.empty and p.name not in inputs]
    if missing:
        raise TypeError(_missing(missing, inputs, name))
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        unknown = [k for k in inputs if k not in {p.name for p in named}]
        if unknown:
            raise TypeError(
                f"the {name} split's batches hold {unknown[0]!r}, which {type(model).__name__}.forward does not take "
                f"(it takes {choices([p.name for p in named])}); remove that key from the rows "
                "(e.g. dataset.remove_columns([...])), or name the labels' key with label_key="
            )


def _missing(missing: Sequence[str], inputs: Mapping, name: str) -> str:
    return (f"the model's forward requires {choices([repr(m) for m in missing])}, which the {name} split's batches "
            f"lack (keys: {choices(list(inputs))}); add a {missing[0]!r} key to each batch")


# ----------------------------------------------------------------------------- labels
def example_kind(labels: torch.Tensor, name: str = "train") -> str:
    """``"examples"`` for ``(N,)`` labels, ``"tokens"`` for integer ``(N, T)`` ones; one-line errors otherwise.

    ``(N, 1)`` labels are per-example labels in a column. One-hot (or
    probability) rows are refused: pass class indices.
    """
    if labels.dim() <= 1 or (labels.dim() == 2 and labels.shape[1] == 1):
        return "examples"
    shape = tuple(labels.shape)
    if labels.dim() > 2:
        raise ValueError(f"the {name} split's labels have shape {shape}; labels are (N,) class indices, or (N, T) "
                         f"per-token class indices with {IGNORE_INDEX} for tokens without a label")
    if labels.numel() and _one_hot(labels):
        raise ValueError(f"the {name} split's labels are one-hot rows of shape {shape}; "
                         "pass class indices: y.argmax(1)")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"the {name} split's labels of shape {shape} are per-token labels and must be integer "
                        f"class indices ({IGNORE_INDEX} for no label); got {labels.dtype} values")
    return "tokens"


def _one_hot(labels: torch.Tensor) -> bool:
    if labels.is_complex():
        return False
    values = labels.double()
    if not torch.isfinite(values).all() or (values < 0).any():
        return False
    sums_to_one = torch.allclose(values.sum(1), torch.ones(len(values), dtype=torch.float64), atol=1e-4)
    if labels.is_floating_point():
        return sums_to_one
    return sums_to_one and bool(((values == 0) | (values == 1)).all())


def _flat(labels: object, name: str, kind: str | None = None) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """A batch's probe labels: ``(M,)`` labels, the ``(N, T)`` labelled-token mask (token-level) and the kind."""
    labels = _tensor(labels)
    found = example_kind(labels, name)
    if kind is not None and found != kind:
        raise ValueError(f"the {name} split mixes per-example and per-token labels; give every batch labels of "
                         f"one rank: (N,) per example or (N, T) per token")
    if found == "examples":
        return labels.reshape(-1), None, found
    tokens = labels != IGNORE_INDEX
    return labels[tokens], tokens, found


@dataclass
class LabelSummary:
    """The probe labels of one split: ``labels`` (one per example, or per labelled token), their kind and sizes."""

    labels: torch.Tensor
    kind: str
    sequences: int
    """Examples (sequences) in the split."""

    @property
    def count(self) -> int:
        """The number of probe examples (examples, or labelled tokens in a token-level run)."""
        return int(self.labels.numel())


def label_summary(split: object, batch_size: int, *, label_key: str | None = None, name: str = "train") -> LabelSummary:
    """All probe labels of a split, in one pass (cheap for tensor pairs and datasets with ``targets``)."""
    if isinstance(split, (tuple, list)):
        raw = _tensor(split[1])
    elif isinstance(getattr(split, "targets", None), (torch.Tensor, np.ndarray, list)) and not isinstance(split, DataLoader):
        raw = _tensor(split.targets)
    else:
        raw = None
    if raw is not None:
        labels, _, kind = _flat(raw, name)
        return LabelSummary(labels, kind, int(raw.shape[0]) if raw.dim() else 1)
    parts, kind, sequences = [], None, 0
    for _, y in batches(split, batch_size, label_key=label_key, name=name):
        flat, _, kind = _flat(y, name, kind)
        parts.append(flat)
        sequences += int(_tensor(y).shape[0]) if _tensor(y).dim() else 1
    if not parts:
        raise ValueError(f"the {name} split is empty; give it at least one example per class")
    return LabelSummary(torch.cat(parts), kind, sequences)


def labels_of(split: object, batch_size: int, *, label_key: str | None = None, name: str = "train") -> torch.Tensor:
    """All probe labels of a split: one per example, or one per labelled token in a token-level run."""
    return label_summary(split, batch_size, label_key=label_key, name=name).labels


def check_labels(name: str, labels: torch.Tensor, num_classes: int, *, part: bool = False) -> None:
    """Refuse labels a probe cannot use, naming the split and what to do.

    ``part``: the labels of one rank's shard, which may be empty or lack a
    class (the whole split's classes are checked before it is divided).
    """
    if labels.dim() > 1:
        example_kind(labels, name)  # one-hot rows and wrong ranks get their own message
        labels = labels[labels != IGNORE_INDEX] if labels.shape[1] > 1 else labels.reshape(-1)
    if part and labels.numel() == 0:
        return
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
            f"relabel them as 0..K-1 (per-token labels: {IGNORE_INDEX} for no label) or pass the right num_classes"
        )
    if name == "train" and not part:
        present = int(torch.unique(labels).numel())
        if present < 2:
            raise ValueError(f"the train split holds a single class ({low}); a probe needs at least two classes to separate")
        if present < num_classes:
            missing = sorted(set(range(num_classes)) - set(torch.unique(labels).tolist()))
            raise ValueError(
                f"the train split holds {present} of the {num_classes} declared classes (missing {missing[:10]}); "
                "pass num_classes matching the labels or add examples of the missing classes"
            )


# ----------------------------------------------------------------------------- cache
@dataclass
class SplitFeatures:
    """Reduced features of one split: ``features[layer]`` is ``(n, d)``; ``labels`` is ``(n,)``.

    In a token-level run each row is one labelled token (``kind == "tokens"``)
    and ``groups[i]`` is the index of the sequence row ``i`` came from, so that
    any split of these rows can keep sequences whole; otherwise ``groups`` is
    ``arange(n)``.
    """

    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    nonfinite: dict[str, bool] = field(default_factory=dict)
    _tmp: tempfile.TemporaryDirectory | None = None
    kind: str = "examples"
    groups: torch.Tensor | None = None
    sequences: int = 0
    """Examples (sequences) the split held."""


def cache_budget(cache_bytes: int, device: torch.device) -> int:
    """The bytes of features kept in memory (on ``device``) before the cache goes to disk.

    On a GPU, the default :data:`DEFAULT_CACHE_BYTES` becomes half the
    device's free memory (at least the default), so that the features stay on
    the device, where the probes are fitted, whenever they fit; any other
    value is taken as given.
    """
    if device.type == "cuda" and cache_bytes == DEFAULT_CACHE_BYTES:
        free, _ = torch.cuda.mem_get_info(device)
        return max(cache_bytes, int(free) // 2)
    return cache_bytes


class _Cache:
    """Rows of each layer's features: in memory, moving to files on disk once they pass ``cache_bytes``.

    The row count need not be known in advance (an ``IterableDataset``, a
    token-level run): rows are appended, to files once on disk, and the files
    are memory-mapped at the end.
    """

    def __init__(self, dims: Mapping[str, int], cache_bytes: int, expected_rows: int | None):
        self.dims, self.cache_bytes = dict(dims), cache_bytes
        self.row_bytes = 4 * sum(self.dims.values())
        self.memory: dict[str, list[torch.Tensor]] = {layer: [] for layer in dims}
        self.rows = 0
        self.tmp: tempfile.TemporaryDirectory | None = None
        self.files: dict[str, object] = {}
        if expected_rows is not None and expected_rows * self.row_bytes > cache_bytes:
            self._spill()

    def _spill(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="probekit-cache-")
        self.files = {layer: open(f"{self.tmp.name}/{i}.f32", "wb") for i, layer in enumerate(self.dims)}  # noqa: SIM115
        for layer, parts in self.memory.items():
            for part in parts:
                self.files[layer].write(part.cpu().numpy().tobytes())
        self.memory = {}

    def add(self, values: Mapping[str, torch.Tensor], count: int) -> None:
        if self.tmp is None and (self.rows + count) * self.row_bytes > self.cache_bytes:
            self._spill()
        for layer, value in values.items():
            if self.tmp is not None:
                self.files[layer].write(np.ascontiguousarray(value.cpu().numpy(), dtype=np.float32).tobytes())
            else:
                self.memory[layer].append(value)
        self.rows += count

    def finish(self, device: torch.device) -> dict[str, torch.Tensor]:
        if self.tmp is None:
            out = {}
            for layer in list(self.memory):
                parts = self.memory.pop(layer)
                out[layer] = torch.cat(parts) if parts else torch.empty(0, self.dims[layer], device=device)
            return out
        out = {}
        for layer, handle in self.files.items():
            handle.close()
            if self.rows == 0:
                out[layer] = torch.empty(0, self.dims[layer])
                continue
            array = np.memmap(handle.name, dtype=np.float32, mode="r+", shape=(self.rows, self.dims[layer]))
            out[layer] = torch.from_numpy(array)
        return out


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
    autocast: str | torch.dtype | None = None,
    label_key: str | None = None,
    mask_key: str = MASK_KEY,
    comm: Collective | None = None,
) -> SplitFeatures:
    """Run ``extractor`` over one split and cache every layer's reduced features.

    The model runs under ``torch.no_grad()`` (not ``inference_mode``, whose
    tensors cannot be saved for backward). Features stay in memory while the
    whole cache fits in ``cache_bytes``, else they go to memory-mapped files in
    a temporary folder, removed with the returned object. With ``autocast``
    (``"bf16"``, ``"fp16"`` or the dtype; see :data:`AUTOCAST_DTYPES`) the forward
    pass and the reductions run under ``torch.autocast`` on ``device``; the cached
    features are float32 either way.

    Each batch's ``mask_key`` entry (a mapping batch) reaches the extractor as
    ``mask=``; with per-token labels, the labelled tokens reach it as
    ``tokens=`` and each layer returns one row per labelled token. ``progress``
    is updated with the number of examples (sequences) of each batch.

    With ``comm`` (several ranks), only this rank's shard is extracted (see
    :func:`shard_batches`): ``groups`` then holds each row's position in the
    whole split (its sequence's, in a token-level run), and ``nonfinite``
    is true on every rank for a layer that is not finite on any.
    """
    n = split_size(split)
    if comm is not None and n is not None:
        n = len(range(comm.rank, n, comm.world_size))
    cache = _Cache(dims, cache_budget(cache_bytes, device), n)
    labels, groups, kind, sequences = [], [], None, 0
    totals: dict[str, torch.Tensor] = {}  # each layer's sum of every value, on the device
    autocast = autocast_dtype(autocast)
    mixed = torch.autocast(device.type, dtype=autocast) if autocast is not None else nullcontext()
    if comm is None:
        source = ((inputs, y, None) for inputs, y in batches(split, batch_size, label_key=label_key, name=name))
    else:
        source = shard_batches(split, batch_size, comm, label_key=label_key, name=name)
    with torch.no_grad():
        for inputs, y, positions in source:
            y, tokens, kind = _flat(y, name, kind)
            inputs = to_device(inputs, device, channels_last=channels_last)
            mask = attention_mask(inputs, mask_key)
            extra = {}
            if mask is not None:
                extra["mask"] = mask
            if tokens is not None:
                _check_tokens(tokens, mask, name, mask_key)
                extra["tokens"] = tokens.to(device)
            examples = int(tokens.shape[0]) if tokens is not None else int(y.shape[0])
            with mixed:
                out = _run(extractor, inputs, extra, name)
            count = y.shape[0]
            with torch_threads(1):  # reduced features are small: bookkeeping is cheapest on one thread
                values = {}
                for layer, value in out.items():
                    value = value.float()
                    if value.shape[0] != count:
                        raise ValueError(f"layer {layer!r} gave {value.shape[0]} rows for {count} labels in the {name} "
                                         "split; per-token labels need points of the 'tokens' layout")
                    # One float64 sum (no overflow from float32 values) is finite iff every value
                    # is; several times cheaper than isfinite().all() on every batch and layer. The
                    # sums stay on the device, read once at the end: no host round trip per batch.
                    total = value.sum(dtype=torch.float64)
                    totals[layer] = total if layer not in totals else totals[layer] + total
                    values[layer] = value
                cache.add(values, count)
            labels.append(y)
            rows = tokens.nonzero()[:, 0] if tokens is not None else torch.arange(count)
            groups.append(sequences + rows if positions is None else positions[rows])
            sequences += examples
            if progress is not None:
                progress.update(examples)
    finite = torch.stack(list(totals.values())).isfinite().tolist() if totals else []
    nonfinite = dict.fromkeys(dims, False) | {layer: not ok for layer, ok in zip(totals, finite)}
    if comm is not None:  # every rank keeps the same layers
        nonfinite = dict(zip(nonfinite, comm.any(list(nonfinite.values()))))
    labels_all = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    check_labels(name, labels_all, num_classes, part=comm is not None)
    features = cache.finish(device)
    return SplitFeatures(features=features, labels=labels_all.to(device).long(), nonfinite=nonfinite, _tmp=cache.tmp,
                         kind=kind or "examples", groups=torch.cat(groups) if groups else torch.empty(0, dtype=torch.long),
                         sequences=sequences)


def _check_tokens(tokens: torch.Tensor, mask: torch.Tensor | None, name: str, mask_key: str) -> None:
    if mask is None:
        return
    if tuple(mask.shape) != tuple(tokens.shape):
        raise ValueError(f"the {name} split's per-token labels have shape {tuple(tokens.shape)} but its {mask_key!r} "
                         f"has {tuple(mask.shape)}; give one label per token ({IGNORE_INDEX} for none)")
    on_padding = int((tokens & ~mask.to(tokens.device).bool()).sum())
    if on_padding:
        raise ValueError(f"{on_padding} labelled tokens of the {name} split are padding ({mask_key!r} 0); "
                         f"label padding {IGNORE_INDEX}")


def _run(extractor: Extractor, inputs: object, extra: dict, name: str) -> dict[str, torch.Tensor]:
    try:
        return extractor(inputs, **extra)
    except TypeError as error:
        text = str(error)
        if isinstance(inputs, Mapping) and "required positional argument" in text:
            missing = re.findall(r"'(\w+)'", text.split("argument", 1)[1]) or ["?"]
            raise TypeError(_missing(missing, inputs, name)) from None
        raise
