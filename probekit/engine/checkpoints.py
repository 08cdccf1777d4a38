"""Loading saved weights safely: the one checkpoint loader of the package.

Every file of weights the package reads goes through :func:`safe_load`
(``torch.load`` with ``weights_only=True``, so a file carrying pickled code is
refused with one line and its code never runs). :func:`read_state_dict` finds the
state dict inside the usual wrappers (``{"model": ...}``, ``{"state_dict": ...}``,
``{"model_state_dict": ...}``) and strips the ``module.`` prefix that
``DataParallel`` / ``DistributedDataParallel`` add; :func:`load_state` puts it
into a model with a one-line error when it does not fit; :func:`load_checkpoint`
does all three. A checkpoint beside a run store on an object store is read
through its fsspec URL. This module imports only torch (and fsspec, for a URL):
never the run store, the data or the zoo.
"""

from __future__ import annotations

import io
import os
import pickle
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["WRAPPER_KEYS", "load_checkpoint", "load_state", "read_state_dict", "safe_load"]

#: Keys under which checkpoints commonly wrap the model's state dict, in the order they are tried.
WRAPPER_KEYS = ("model", "state_dict", "model_state_dict")

_PREFIX = "module."


def _reason(error: BaseException) -> str:
    """The line of a weights-only refusal that says what was found, else the error's first line."""
    text = str(error)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:160] if lines else type(error).__name__


def safe_load(path: str | os.PathLike, *, storage_options: Mapping[str, object] | None = None) -> object:
    """What ``torch.save`` wrote to ``path``, read with ``weights_only=True`` onto the CPU.

    ``path`` may be an fsspec URL (``s3://bucket/.run.zarr.resume.pt``), read with
    ``storage_options``.

    Raises:
        ValueError: in one line, if the file holds pickled objects other than
            tensors (which could run code) or cannot be read.

    Example:
        >>> torch.save({"w": torch.zeros(2)}, "w.pt")
        >>> safe_load("w.pt")["w"].shape
        torch.Size([2])
    """
    try:
        if isinstance(path, str) and "://" in path:
            import fsspec

            with fsspec.open(path, "rb", **dict(storage_options or {})) as handle:
                return torch.load(io.BytesIO(handle.read()), map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {str(path)!r}: it holds pickled Python objects other than tensors, which could run code, "
            f"or is not a torch.save file (torch.load with weights_only=True stopped at: {_reason(error)}). Save weights "
            "with torch.save(model.state_dict(), path); a file you trust you can load yourself and re-save that way"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise ValueError(
            f"could not read weights from {str(path)!r} ({type(error).__name__}: {_reason(error)}); "
            "it must be a file written by torch.save(model.state_dict(), path)"
        ) from error


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state dict saved in ``path``: unwrapped from :data:`WRAPPER_KEYS`, without a ``module.`` prefix.

    Example:
        >>> torch.save({"state_dict": {"module.w": torch.zeros(2)}, "epoch": 3}, "c.pt")
        >>> list(read_state_dict("c.pt"))
        ['w']
    """
    loaded = safe_load(path)
    if isinstance(loaded, Mapping):
        for key in WRAPPER_KEYS:
            if isinstance(loaded.get(key), Mapping):
                loaded = loaded[key]
                break
    if not (isinstance(loaded, Mapping) and loaded and all(isinstance(v, torch.Tensor) for v in loaded.values())):
        raise ValueError(
            f"{str(path)!r} does not hold a state dict (a mapping of parameter names to tensors); "
            f"got {type(loaded).__name__}. Save one with torch.save(model.state_dict(), path)"
        )
    state = dict(loaded)
    if all(key.startswith(_PREFIX) for key in state):  # saved from DataParallel / DistributedDataParallel
        state = {key[len(_PREFIX):]: value for key, value in state.items()}
    return state


def load_state(
    model: nn.Module,
    state: Mapping[str, torch.Tensor],
    *,
    source: str,
    target: str | None = None,
    hint: str = "they must come from a model of the same architecture",
) -> None:
    """``model.load_state_dict(state)``, with a one-line ``ValueError`` naming ``source`` when it does not fit.

    Args:
        model: the model to load into (strictly: every key must match).
        state: the state dict.
        source: where the weights came from, for the message (a path, a weights name).
        target: what the model is, for the message; default its class name.
        hint: what to do when the weights do not fit.

    Example:
        >>> load_state(model, read_state_dict("c.pt"), source="'c.pt'")
    """
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = " ".join(str(error).split())[:300]
        raise ValueError(
            f"the weights in {source} do not fit {target or type(model).__name__} ({detail}); {hint}"
        ) from None


def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load the state dict saved in ``path`` into ``model``, safely (``weights_only=True``), with one-line errors.

    The file may hold the state dict itself or wrap it (see :data:`WRAPPER_KEYS`);
    a ``module.`` prefix from ``DataParallel`` is stripped.

    Example:
        >>> torch.save(model.state_dict(), "c0.pt")
        >>> load_checkpoint(model, "c0.pt")
    """
    load_state(model, read_state_dict(path), source=repr(str(path)))
