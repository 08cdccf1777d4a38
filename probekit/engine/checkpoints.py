"""Loading saved weights safely: the one checkpoint loader of the package."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Literal

import torch
from torch import nn


Mode = Literal["snapshot", "online"]



def load_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Load a state dict into ``model`` safely (``weights_only=True``), with one-line errors."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors (weights_only=True refused it: "
            f"{str(error).splitlines()[0][:160]}). Save checkpoints with torch.save(model.state_dict(), path)"
        ) from None
    except (OSError, RuntimeError, EOFError) as error:
        raise ValueError(f"cannot read checkpoint {str(path)!r}: {str(error).splitlines()[0][:200]}") from error
    if isinstance(state, Mapping):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: {str(error).splitlines()[0][:300]}"
        ) from None
