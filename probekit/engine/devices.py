"""Where a probing call runs: the device, torch's thread count, channels-last memory for conv nets on the CPU.

Each helper puts the model (or torch's settings) back exactly as it found them.
This module imports only torch: no other part of the package.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["model_device", "placed", "resolve_device", "torch_threads", "wants_channels_last"]


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
def torch_threads(threads: int) -> Iterator[None]:
    """Run torch with ``threads`` threads in this thread for the block, then as before.

    Many small operations each split across cores wait at a barrier for every
    core; on a shared machine one descheduled thread stalls them all (a
    10-50x slowdown measured on 2 busy cores), and they are too small to gain
    from more than one core anyway. ``torch.set_num_threads`` sets the calling
    thread's team size and a process-wide default for threads started later,
    which is put back on exit.
    """
    saved = torch.get_num_threads()
    if saved == threads:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


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
