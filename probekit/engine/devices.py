"""Where a probing call runs: the device, and channels-last memory for conv nets on the CPU.

Each helper puts the model back exactly as it found it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn


Mode = Literal["snapshot", "online"]



def model_device(model: nn.Module) -> torch.device:
    for tensor in list(model.parameters()) + list(model.buffers()):
        return tensor.device
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but CUDA is not available here; pass device='cpu' or leave it unset")
    return device



@contextmanager
def placed(model: nn.Module, device: torch.device, channels_last: bool):
    """Move the model to ``device`` (and channels-last memory) for a call, then put it back exactly."""
    originals = {name: (t.device, t.is_contiguous()) for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    home = next(iter(originals.values()))[0] if originals else device
    try:
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        yield
    finally:
        model.to(home)
        if channels_last:
            for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
                if originals[name][1] and not tensor.is_contiguous():
                    tensor.data = tensor.data.contiguous()


def wants_channels_last(model: nn.Module, device: torch.device, channels_last: bool | None) -> bool:
    if channels_last is not None:
        return channels_last
    return device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules())


