"""What one batch of a model's inputs is, and how the engine calls a model with it.

A batch's inputs are one of three forms:

- a tensor: the model is called as ``model(x)``;
- a tuple or list: positional arguments, ``model(*inputs)``;
- a mapping (a dict, a Hugging Face ``BatchEncoding``): keyword arguments,
  ``model(**inputs)``, e.g. ``{"input_ids": ..., "attention_mask": ...}``.

Every stage that takes a batch (tracing, shape discovery, extraction, the
monitor's example input) goes through these helpers, so the three forms mean
the same everywhere: a tuple is never passed as one argument, and a mapping's
``attention_mask`` reaches the model by keyword (GPT-2's second positional
argument is its cache, not the mask).

This module owns :func:`call_model`, :func:`batch_size`, :func:`take`,
:func:`to_device` and :func:`attention_mask`. It is the first module of the
engine: it imports only torch, and no other engine module.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["MASK_KEY", "attention_mask", "batch_size", "call_model", "first_tensor", "take", "to_device"]

#: The key of a mapping batch that holds the mask of real (non-padding) tokens.
MASK_KEY = "attention_mask"


def _values(inputs: object) -> list[object]:
    if isinstance(inputs, torch.Tensor):
        return [inputs]
    if isinstance(inputs, Mapping):
        return list(inputs.values())
    if isinstance(inputs, (tuple, list)):
        return list(inputs)
    return [inputs]


def first_tensor(inputs: object) -> torch.Tensor | None:
    """The batch's first tensor (a mapping's first tensor value), or ``None`` when it holds none."""
    for value in _values(inputs):
        if isinstance(value, torch.Tensor):
            return value
    return None


def call_model(model: nn.Module, inputs: object) -> object:
    """``model(x)`` for a tensor, ``model(*inputs)`` for a tuple or list, ``model(**inputs)`` for a mapping.

    Example:
        >>> call_model(bert, {"input_ids": ids, "attention_mask": mask})  # bert(input_ids=ids, attention_mask=mask)
    """
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def batch_size(inputs: object) -> int:
    """The number of examples in a batch: its first tensor's leading dim.

    Example:
        >>> batch_size({"input_ids": torch.zeros(4, 7, dtype=torch.long)})
        4
    """
    first = first_tensor(inputs)
    if first is None or first.dim() == 0:
        got = type(inputs).__name__ if first is None else "a 0-d tensor"
        raise TypeError(
            "a batch of inputs must be a batched tensor, a tuple of positional arguments or a mapping of keyword "
            f"arguments holding at least one tensor with a leading batch dim; got {got}"
        )
    return int(first.shape[0])


def _take_one(value: object, n: int) -> object:
    return value[:n] if isinstance(value, torch.Tensor) and value.dim() >= 1 else value


def take(inputs: object, n: int) -> object:
    """The first ``n`` examples of a batch: tensors sliced on dim 0, everything else untouched.

    The batch keeps its form (a tensor, tuple, list or mapping of the same type when it can be rebuilt).
    """
    if isinstance(inputs, torch.Tensor):
        return _take_one(inputs, n)
    if isinstance(inputs, Mapping):
        return _rebuild(inputs, {key: _take_one(value, n) for key, value in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        taken = [_take_one(value, n) for value in inputs]
        return taken if type(inputs) is list else tuple(taken)
    return inputs


def to_device(inputs: object, device: torch.device | str, *, channels_last: bool = False) -> object:
    """The batch with every tensor on ``device`` (non-blocking); with ``channels_last``, a 4-D first tensor in that format.

    A host tensor bound for a CUDA device is copied into pinned memory first: the copy to
    the device is then asynchronous, so the host prepares the next batch while the device
    still runs this one, instead of waiting for the device's queue at every batch.
    """
    first = first_tensor(inputs)
    pin = torch.device(device).type == "cuda"

    def move(value: object) -> object:
        if not isinstance(value, torch.Tensor):
            return value
        is_first = value is first
        if pin and value.device.type == "cpu" and not value.is_pinned():
            value = value.pin_memory()
        moved = value.to(device, non_blocking=True)
        if channels_last and is_first and moved.dim() == 4:
            moved = moved.contiguous(memory_format=torch.channels_last)
        return moved

    if isinstance(inputs, torch.Tensor):
        return move(inputs)
    if isinstance(inputs, Mapping):
        return _rebuild(inputs, {key: move(value) for key, value in inputs.items()})
    if isinstance(inputs, (tuple, list)):
        moved = [move(value) for value in inputs]
        return list(moved) if type(inputs) is list else tuple(moved)
    return inputs


def attention_mask(inputs: object, mask_key: str = MASK_KEY) -> torch.Tensor | None:
    """The ``(N, T)`` boolean mask of real tokens of a mapping batch (its ``mask_key`` entry); ``None`` when absent.

    Tensor and tuple batches carry no named mask: ``None``.

    Example:
        >>> attention_mask({"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 0]])})
        tensor([[ True,  True, False]])
    """
    if not isinstance(inputs, Mapping):
        return None
    mask = inputs.get(mask_key)
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        got = f"shape {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(
            f"the batch's {mask_key!r} must be an (examples, tokens) tensor of 1 for real tokens and 0 for padding; "
            f"got {got}. Pass mask_key= naming the right entry"
        )
    return mask.bool() if mask.dtype != torch.bool else mask


def _rebuild(original: Mapping, values: dict) -> Mapping:
    """A mapping of ``original``'s type holding ``values`` (a plain dict when the type cannot be rebuilt)."""
    if type(original) is dict:
        return values
    try:
        return type(original)(values)
    except Exception:  # noqa: BLE001 - any mapping type that cannot be built from a dict becomes a dict
        return values
