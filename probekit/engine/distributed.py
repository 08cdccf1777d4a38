"""Data-parallel probing on ``torch.distributed``: ranks, shards of the data, and sums over every rank.

probekit runs data-parallel when it finds a process group of more than one
rank: one the caller initialised, or the environment ``torchrun`` sets
(``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), in which case
:func:`current` initialises the default group itself, once, with gloo for
CPU tensors and NCCL for CUDA ones (``"cpu:gloo,cuda:nccl"``; each rank then
takes the GPU ``LOCAL_RANK``), and destroys it at exit. In a single process
(no group, or a group of one rank) :func:`current` is ``None`` and nothing
here is ever called: the single-process path has no collective call and no
extra synchronisation.

What each rank does:

- **Shards** (:func:`shard`): every split is divided by example index
  modulo the world size (rank ``r`` of ``W`` holds examples ``r, r + W, r +
  2W, ...``), without padding, so no example is counted twice and ranks may
  hold one example more or less than each other. A ``DataLoader`` over an
  ``IterableDataset`` is divided by batch instead (batch ``b`` on rank ``b
  mod W``: each rank reads every batch and runs the model on its own). Each
  row keeps its position in the whole split, from which the held-out fold
  of ``l2="auto"`` is drawn exactly as in one process.
- **Sums** (:class:`Collective`): the probes are fitted with all-reduced
  sums, not on gathered features, so that each rank holds only its own
  shard's features: the standardisation's sums, the solver's loss and
  gradient sums (one all-reduce per solver round for every problem at
  once), the preconditioner's products, the held-out losses of the L2 path
  and every score's counts. Metrics are therefore exact over the whole
  split. Only the labels and positions of the training split (two integers
  per example) are gathered, to draw the fold, and the one kind of layer
  that one process fits in the span of its examples (at least twice as
  many features as examples, few examples per class: few rows by that
  rule), which every rank gathers and fits as one process does.
- **Agreement** (:meth:`Collective.agree`): before any work, one small
  all-gather compares what every rank sees (classes, split sizes, layers,
  feature sizes); a difference stops every rank with one line naming it.

Only rank 0 writes a run store; the other ranks hold the run in memory.
This module imports nothing of probekit but :mod:`probekit.params`, and never
the run store, the diagnosis, the charts or the explorers.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import distributed as dist
from torch import nn
from torch.utils.data import (
    BatchSampler, DataLoader, IterableDataset, RandomSampler, SequentialSampler, Subset,
)

from probekit.params import choices

__all__ = ["TORCHRUN_ENV", "Collective", "Shard", "current", "is_root", "shard", "unwrap"]

#: The variables ``torchrun`` sets that make :func:`current` initialise the default group.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def current() -> Collective | None:
    """The process group probekit works in, or ``None`` in a single process.

    An initialised default group of more than one rank is used as it is.
    Without one, the ``torchrun`` environment (:data:`TORCHRUN_ENV`, with
    ``WORLD_SIZE`` above 1) makes probekit initialise the default group here
    (gloo for CPU tensors, NCCL for CUDA ones) and destroy it at exit.

    Example:
        >>> current() is None   # a plain python process
        True
    """
    if not dist.is_available():
        return None
    if not dist.is_initialized():
        if not all(key in os.environ for key in TORCHRUN_ENV) or int(os.environ["WORLD_SIZE"]) <= 1:
            return None
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
        atexit.register(_destroy)
    if dist.get_world_size() <= 1:
        return None
    return Collective()


def is_root() -> bool:
    """Whether this process prints for the group: rank 0 of an initialised group, or a process without one.

    Never initialises a group (see :func:`current`).
    """
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The module a ``DistributedDataParallel`` (or ``DataParallel``) wrapper holds; any other model as it is.

    Probe points are named after the user's module (``layer1``, not ``module.layer1``),
    and its forward is what the hooks see when the wrapper runs it.
    """
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    return model.module if isinstance(model, wrappers) else model


class Collective:
    """Sums and checks over every rank of the default process group.

    Every method is a collective: every rank must call it, in the same order.
    """

    def __init__(self) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # A group of NCCL alone reduces CUDA tensors only: small host values travel through the GPU.
        only_nccl = dist.get_backend() == "nccl"
        self._host = torch.device("cuda", torch.cuda.current_device()) if only_nccl else None

    @property
    def root(self) -> bool:
        """Whether this is rank 0, the one that writes the run store and prints."""
        return self.rank == 0

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over every rank, in place (and returned)."""
        if self._host is not None and tensor.device.type == "cpu":
            moved = tensor.to(self._host)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            return tensor.copy_(moved)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """A float64 copy of ``tensor``, summed over every rank."""
        return self.sum_(tensor.detach().to(torch.float64).clone())

    def any(self, flags: Sequence[bool]) -> list[bool]:
        """Each flag, true where it is true on any rank."""
        if not flags:
            return []
        out = torch.tensor([1.0 if f else 0.0 for f in flags], dtype=torch.float64)
        return [bool(v > 0) for v in self.sum_(out).tolist()]

    def count(self, n: int) -> int:
        """``n`` summed over every rank."""
        return int(self.sum_(torch.tensor([float(n)], dtype=torch.float64)).item())

    def gather_rows(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``tensor`` (1-D, on the CPU, any length), in rank order."""
        device = self._host or torch.device("cpu")
        tensor = tensor.detach().to(device).reshape(-1)
        lengths = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.world_size)]
        dist.all_gather(lengths, torch.tensor([tensor.numel()], dtype=torch.long, device=device))
        lengths = [int(n) for n in lengths]
        padded = torch.zeros(max(lengths), dtype=tensor.dtype, device=device)
        padded[:tensor.numel()] = tensor
        out = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(out, padded)
        return [part[:n].cpu() for part, n in zip(out, lengths)]

    def broadcast(self, value: object) -> object:
        """Rank 0's ``value`` (any picklable object), on every rank."""
        box = [value if self.root else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_root(self, work: Callable[[], object]) -> object:
        """``work()`` on rank 0 only; an error it raises is raised on every rank (the same type and line).

        The other ranks get ``None``. Without this, a refusal on rank 0 (a store that
        already exists) would leave the others waiting at their next collective.
        """
        result, failure = None, None
        if self.root:
            try:
                result = work()
            except Exception as error:  # noqa: BLE001 - passed on to every rank, then raised
                failure = error
        message = self.broadcast(None if failure is None else (type(failure), str(failure)))
        if failure is not None:
            raise failure
        if message is not None:
            raise _rebuilt(*message) from None
        return result

    def settle(self, failure: Exception | None) -> None:
        """Raise on every rank when any rank failed: each failing rank its own error, the others the first one's
        line, naming its rank (without this, the others would wait for it at their next collective)."""
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, None if failure is None else (type(failure), str(failure)))
        if failure is not None:
            raise failure
        failed = [(rank, found) for rank, found in enumerate(everyone) if found is not None]
        if failed:
            rank, (kind, text) = failed[0]
            raise _rebuilt(kind, f"rank {rank} of {self.world_size} stopped: {text}") from None

    def copy_module(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers into ``module`` on every rank (in place)."""
        for tensor in module.state_dict(keep_vars=True).values():
            if isinstance(tensor, torch.Tensor):
                data = tensor.data
                if self._host is not None and data.device.type == "cpu":
                    moved = data.to(self._host)
                    dist.broadcast(moved, src=0)
                    data.copy_(moved)
                else:
                    dist.broadcast(data, src=0)

    def agree(self, facts: Mapping[str, object]) -> None:
        """Refuse, on every rank, facts that differ between ranks: one line naming the first one and its values.

        Example:
            >>> comm.agree({"classes": 10, "train examples": 1797})
        """
        everyone: list = [None] * self.world_size
        dist.all_gather_object(everyone, dict(facts))
        for key in facts:
            values = [ranks.get(key) for ranks in everyone]
            if any(v != values[0] for v in values[1:]):
                seen = choices([f"rank {r}: {_short(v)}" for r, v in enumerate(values)], limit=6)
                raise ValueError(
                    f"the {self.world_size} ranks of the process group disagree on the {key} ({seen}); give every "
                    "rank the same model, data and arguments (each rank takes its own shard of the same splits)"
                )


def _rebuilt(kind: type, text: str) -> Exception:
    """An error of type ``kind`` with the line ``text`` (a ``RuntimeError`` for a type that takes other arguments)."""
    try:
        return kind(text)
    except Exception:  # noqa: BLE001 - an exception type without a one-argument constructor
        return RuntimeError(text)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ----------------------------------------------------------------------------- shards
@dataclass
class Shard:
    """One rank's part of a split: ``split`` (a split of the same kind) and each of its examples' positions.

    ``positions`` is the position in the whole split of each example of
    ``split``, in its order; ``None`` for a split whose length is unknown
    (an ``IterableDataset``), where :meth:`position` computes it from the
    rank and world size (strided) or the batches read so far (by batch).
    """

    split: object
    positions: torch.Tensor | None
    rank: int
    world_size: int
    by_batch: bool = False
    """A ``DataLoader`` over an ``IterableDataset``: ``split`` yields ``(offset, batch)`` pairs."""


def shard(split: object, comm: Collective, *, name: str = "train") -> Shard:
    """This rank's part of ``split``: examples ``rank, rank + W, ...`` of it (a DataLoader of an
    ``IterableDataset``: its batches ``rank, rank + W, ...``), never padded.

    A ``DataLoader`` keeps its batch size, collate function and workers; its
    sampler must be sequential or a shuffle of every example (the order does
    not change any result): another sampler (a subset, weights, replacement,
    a ``batch_sampler``) is refused with one line, since its examples could
    not be divided without counting one twice.
    """
    rank, world = comm.rank, comm.world_size
    if isinstance(split, DataLoader):
        return _shard_loader(split, rank, world, name)
    if isinstance(split, IterableDataset):
        return Shard(_Strided(split, rank, world), None, rank, world)
    if isinstance(split, (tuple, list)) and len(split) == 2 and not _is_dataset(split):
        x, y = split
        n = len(y)
        rows = torch.arange(rank, n, world)
        return Shard((_take(x, rows, n), _take(y, rows, n)), rows, rank, world)
    n = len(split)
    rows = torch.arange(rank, n, world)
    return Shard(Subset(split, rows.tolist()), rows, rank, world)


def _is_dataset(split: object) -> bool:
    return isinstance(split, torch.utils.data.Dataset)


def _shard_loader(loader: DataLoader, rank: int, world: int, name: str) -> Shard:
    dataset = loader.dataset
    if isinstance(dataset, IterableDataset):
        return Shard(_OwnBatches(loader, rank, world), None, rank, world, by_batch=True)
    sampler = loader.sampler
    plain = isinstance(sampler, SequentialSampler) or (
        isinstance(sampler, RandomSampler) and not sampler.replacement and sampler.num_samples == len(dataset))
    if loader.batch_size is None:
        raise ValueError(f"the {name} split's DataLoader has batch_size=None (its dataset yields whole batches), "
                         "which cannot be divided between ranks by example; give it a batch_size=")
    if not plain or type(loader.batch_sampler) is not BatchSampler:
        kind = type(loader.batch_sampler if plain else sampler).__name__
        raise ValueError(
            f"the {name} split's DataLoader draws its examples with a {kind}, which cannot be divided between ranks "
            "without counting an example twice or missing one; pass its Dataset, or a DataLoader with batch_size= "
            "and shuffle=False"
        )
    n = len(dataset)
    if loader.drop_last:
        n -= n % loader.batch_size
    rows = torch.arange(rank, n, world)
    sharded = DataLoader(
        Subset(dataset, rows.tolist()), batch_size=loader.batch_size, shuffle=False, collate_fn=loader.collate_fn,
        num_workers=loader.num_workers, pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
        timeout=loader.timeout, multiprocessing_context=loader.multiprocessing_context,
    )
    return Shard(sharded, rows, rank, world)


def _take(values: object, rows: torch.Tensor, n: int) -> object:
    """Rows ``rows`` of a whole split's inputs or labels: arrays, tuples of arrays, mappings of them, lists."""
    if isinstance(values, torch.Tensor):
        return values[rows.to(values.device)]
    if isinstance(values, np.ndarray):
        return values[rows.numpy()]
    if isinstance(values, Mapping):
        return {key: _take(value, rows, n) if _rowwise(value, n) else value for key, value in values.items()}
    if isinstance(values, tuple) and values and all(_rowwise(v, n) for v in values):
        return tuple(_take(v, rows, n) for v in values)
    if isinstance(values, (list, tuple)):
        if values and all(_rowwise(v, n) for v in values) and len(values) != n:
            return type(values)(_take(v, rows, n) for v in values)
        return [values[i] for i in rows.tolist()]
    return values


def _rowwise(value: object, n: int) -> bool:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return value.ndim >= 1 and len(value) == n
    return isinstance(value, (list, tuple)) and len(value) == n


class _Strided(IterableDataset):
    """Items ``rank, rank + W, ...`` of an iterable dataset (each rank reads the stream, keeps its own)."""

    def __init__(self, dataset: IterableDataset, rank: int, world: int):
        self.dataset, self.rank, self.world = dataset, rank, world

    def __iter__(self) -> Iterator:
        for i, item in enumerate(self.dataset):
            if i % self.world == self.rank:
                yield item


class _OwnBatches:
    """The batches ``rank, rank + W, ...`` of a DataLoader, each with the position of its first example.

    Every batch is read (its length counts for the positions); only this rank's are yielded.
    """

    def __init__(self, loader: DataLoader, rank: int, world: int):
        self.loader, self.rank, self.world = loader, rank, world

    def batches(self, unpack: Callable[[object], tuple[object, object]], length: Callable[[object], int]) -> Iterator:
        offset = 0
        for b, item in enumerate(self.loader):
            inputs, labels = unpack(item)
            count = length(labels)
            if b % self.world == self.rank:
                yield inputs, labels, offset
            offset += count
