"""Controls of a probing run: random-init copies, control tasks, repeats and MDL.

A probe's error means little without a reference point. This module owns the
pieces :class:`~probekit.engine.monitor.ProbeMonitor` combines into a run's
controls (see ``docs/methodology.md``):

- **Random-init baseline** (:func:`random_init_copy`): the same probes on a
  freshly initialised, seeded copy of the same architecture. The copy is made
  with ``copy.deepcopy`` and every module that has ``reset_parameters()`` (or
  ``_reset_parameters()``, as ``nn.MultiheadAttention``) is reset under a
  seeded, forked torch generator, so neither the user's model nor the global
  random state is touched. Parameters that no module resets (a bare
  ``nn.Parameter`` such as a class token) get their entries randomly permuted,
  which keeps their scale and destroys what training put in them; their names
  are returned so that the run can say so. ``random_init`` gain = random-init
  error - task error.
- **Control task** (Hewitt & Liang 2019, :func:`control_labels`): each example
  *type* gets a fixed random label, the same wherever the type occurs. Types
  are token ids in token-level runs; in example-level runs the user's
  ``groups=`` (e.g. the source image of augmented copies), else each example
  is its own type. The types' labels follow the task's class frequencies on
  the training split: types are put in a seeded random order and cut in runs
  whose sizes are those frequencies. Selectivity = control error - task error
  (= task accuracy - control accuracy), per split.
- **Repeats** (:func:`bootstrap_indices`, :func:`repeat_seed`): repeat ``r``
  refits every probe on a stratified bootstrap resample of the training split
  (each class resampled with replacement to its own count) and draws seeded
  reductions (``subsetN``, ``projectN``) from :func:`repeat_seed`.
- **MDL** (Voita & Titov 2020, :func:`online_code_length`): the online
  (prequential) code length of the training labels given the features. The
  training split is put in a seeded random order and cut at the fractions of
  :data:`MDL_BLOCKS` (0.1 %, 0.2 %, 0.4 %, 0.8 %, 1.6 %, 3.2 %, 6.25 %, 12.5 %,
  25 %, 50 %, 100 %, at least one example each); the first block is coded
  with the uniform code (``log2 K`` bits per label), and every next block with
  a probe fitted on all the ``t`` examples before it, its prediction mixed
  with the uniform code as if ``K`` pseudo-examples, one per class, had been
  seen: ``p = (t p_probe + 1) / (t + K)`` (Laplace's rule; without it a probe
  fitted on a few examples, whose bias is not regularised, gives classes it
  has not seen yet a near-zero probability, and on a small split the first
  blocks' cost would swamp the code). Compression = uniform code length
  (``n log2 K``) / MDL.

This module works on models, label tensors and feature tensors; it imports no
other part of the engine (the monitor hands it the probe fitter), and never
the run store, the diagnosis, the charts or the explorers.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from probekit.params import choices

__all__ = [
    "BASELINES", "EXTRA_METRICS", "MDL_BLOCKS", "block_ends", "bootstrap_indices", "check_baselines", "check_groups",
    "check_metrics", "control_labels", "example_types", "online_code_length", "random_init_copy", "repeat_seed",
]

#: The baselines a run can have, in the order they are stored.
BASELINES = ("random_init", "control")
#: Measures every run has (``top5`` with more than 5 classes) and the optional ones ``metrics=`` adds.
STANDARD_METRICS = ("error", "loss", "top5")
EXTRA_METRICS = ("mdl",)
#: MDL block schedule: the fractions of the training split at which the online code's blocks end.
MDL_BLOCKS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.0625, 0.125, 0.25, 0.5, 1.0)


# ----------------------------------------------------------------------------- argument checks
def check_baselines(baselines: str | Sequence[str] | None) -> tuple[str, ...]:
    """The baselines asked for, in :data:`BASELINES` order; a one-line error for an unknown name.

    Args:
        baselines: ``None`` or ``()`` (none), a name, a comma-separated string of names,
            or a sequence of names.

    Example:
        >>> check_baselines(["control", "random_init"])
        ('random_init', 'control')
    """
    if baselines is None:
        return ()
    if isinstance(baselines, str):
        baselines = [b.strip() for b in baselines.split(",") if b.strip()]
    if not isinstance(baselines, Sequence) or not all(isinstance(b, str) for b in baselines):
        raise TypeError(f"baselines= must be a list of names from: {choices(BASELINES)}; got {baselines!r}")
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline {unknown[0]!r} in baselines=; the known baselines are: {choices(BASELINES)}")
    return tuple(b for b in BASELINES if b in baselines)


def check_metrics(metrics: str | Sequence[str] | None) -> tuple[str, ...]:
    """The optional measures asked for (those of :data:`EXTRA_METRICS`); a one-line error for an unknown name.

    The standard measures (error, loss, and top-5 with more than 5 classes) are
    always computed; naming them is allowed and changes nothing.

    Example:
        >>> check_metrics(["error", "mdl"])
        ('mdl',)
    """
    if metrics is None:
        return ()
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if not isinstance(metrics, Sequence) or not all(isinstance(m, str) for m in metrics):
        raise TypeError(f"metrics= must be a list of names from: {choices(STANDARD_METRICS + EXTRA_METRICS)}; got {metrics!r}")
    known = STANDARD_METRICS + EXTRA_METRICS
    unknown = [m for m in metrics if m not in known]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r} in metrics=; choose from: {choices(known)}")
    return tuple(m for m in EXTRA_METRICS if m in metrics)


def check_groups(groups: Mapping[str, object] | None, sizes: Mapping[str, int | None]) -> dict[str, torch.Tensor] | None:
    """``groups=`` as ``{split: (n,) int64 tensor}``, one type id per example of every split.

    Args:
        groups: ``None``, or a mapping from split name (``train``, ``valid``/``val``/``validation``,
            ``test``) to a sequence, array or tensor of whole numbers.
        sizes: the number of examples of each split of the run (``None`` when unknown).
    """
    if groups is None:
        return None
    if not isinstance(groups, Mapping):
        raise TypeError(
            f"groups= must map each split to one type id per example, e.g. {{'train': ids, 'valid': ids}}; got {type(groups).__name__}"
        )
    aliases = {"train": "train", "valid": "valid", "val": "valid", "validation": "valid", "test": "test"}
    out = {}
    for key, value in groups.items():
        split = aliases.get(key)
        if split is None or split not in sizes:
            raise ValueError(f"groups= names split {key!r}, which this run does not have; its splits are: {choices(list(sizes))}")
        ids = torch.as_tensor(np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value))
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"groups[{key!r}] must be a 1-D sequence of whole numbers (one type id per example); got {ids.dtype} of shape {tuple(ids.shape)}")
        if sizes[split] is not None and ids.numel() != sizes[split]:
            raise ValueError(f"groups[{key!r}] has {ids.numel()} entries but the {split} split has {sizes[split]} examples; give one per example")
        out[split] = ids.long()
    missing = [s for s in sizes if s not in out]
    if missing:
        raise ValueError(f"groups= lacks the split(s) {choices(missing)}; give one type id per example of every split")
    return out


# ----------------------------------------------------------------------------- random init
def random_init_copy(model: nn.Module, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A freshly initialised, seeded copy of ``model``'s architecture; ``model`` is not touched.

    Every module of the copy that has ``reset_parameters()`` (or
    ``_reset_parameters()``) is reset, under ``torch.random.fork_rng`` seeded
    with ``seed``; parameters that none of them owns are permuted entry-wise
    with a generator seeded from ``seed``. The copy is in eval mode, on the
    devices of the original.

    Returns:
        ``(copy, permuted)``: the copy, and the names of the parameters that were
        permuted rather than re-initialised.

    Example:
        >>> fresh, permuted = random_init_copy(model, seed=0)
    """
    try:
        fresh = copy.deepcopy(model)
    except Exception as error:  # noqa: BLE001 - any failure of a user's model to copy
        raise TypeError(
            f"the random_init baseline needs a copy of the model, and copy.deepcopy failed "
            f"({type(error).__name__}: {error}); make the model deep-copyable or drop 'random_init' from baselines="
        ) from error
    cuda = sorted({t.device.index or 0 for t in [*fresh.parameters(), *fresh.buffers()] if t.device.type == "cuda"})
    reset: set[int] = set()
    with torch.random.fork_rng(devices=cuda), torch.no_grad():
        torch.manual_seed(seed)
        for module in fresh.modules():
            method = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
            if callable(method):
                method()
                reset.update(id(p) for p in module.parameters(recurse=False))
        generator = torch.Generator().manual_seed(seed)
        permuted = []
        for name, parameter in fresh.named_parameters():
            if id(parameter) in reset or parameter.numel() < 2:
                continue
            order = torch.randperm(parameter.numel(), generator=generator).to(parameter.device)
            parameter.copy_(parameter.reshape(-1)[order].reshape(parameter.shape))
            permuted.append(name)
    fresh.eval()
    return fresh, permuted


# ----------------------------------------------------------------------------- control task
def example_types(sizes: Mapping[str, int], groups: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Each example's type in an example-level run: ``groups`` when given, else a distinct id per example.

    Example:
        >>> example_types({"train": 3, "valid": 2})["valid"]
        tensor([3, 4])
    """
    if groups is not None:
        return {split: groups[split].long() for split in sizes}
    out, start = {}, 0
    for split, n in sizes.items():
        out[split] = torch.arange(start, start + int(n))
        start += int(n)
    return out


def control_labels(types: Mapping[str, torch.Tensor], train_labels: torch.Tensor, num_classes: int, *,
                   seed: int = 0) -> dict[str, torch.Tensor]:
    """Hewitt & Liang's control task: a fixed random label per type, the same in every split.

    The distinct types of all splits are put in a seeded random order and cut
    into ``num_classes`` runs whose sizes follow the class frequencies of
    ``train_labels`` (largest-remainder rounding), so the control labels of
    the types match the task's class frequencies.

    Args:
        types: ``{split: (n,) integer tensor}``, the type of every example (or token).
        train_labels: the task's training labels, for the class frequencies.
        num_classes: number of classes ``K``.
        seed: seed of the assignment.

    Returns:
        ``{split: (n,) int64 tensor}`` of control labels in ``[0, K)``.

    Example:
        >>> control_labels({"train": torch.tensor([5, 5, 7])}, torch.tensor([0, 1, 1]), 2)["train"].tolist()
        [0, 0, 1]
    """
    devices = {split: t.device for split, t in types.items()}
    flat = torch.cat([t.reshape(-1).long().cpu() for t in types.values()])
    unique, inverse = torch.unique(flat, return_inverse=True)
    counts = torch.bincount(train_labels.reshape(-1).long().cpu(), minlength=num_classes).double()
    share = counts / counts.sum() * unique.numel()
    runs = share.floor().long()
    remainder = unique.numel() - int(runs.sum())
    if remainder:
        runs[torch.argsort(share - share.floor(), descending=True, stable=True)[:remainder]] += 1
    assigned = torch.repeat_interleave(torch.arange(num_classes), runs)  # labels of the types in random order
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(unique.numel(), generator=generator)
    label_of = torch.empty(unique.numel(), dtype=torch.long)
    label_of[order] = assigned
    out, start = {}, 0
    for split, t in types.items():
        n = t.numel()
        out[split] = label_of[inverse[start:start + n]].reshape(t.shape).to(devices[split])
        start += n
    return out


# ----------------------------------------------------------------------------- repeats
def repeat_seed(seed: int, repeat: int) -> int:
    """The reduction seed of repeat ``repeat`` (0, 1, ...) of a run seeded ``seed``: distinct per repeat."""
    return int(np.random.SeedSequence([int(seed), int(repeat)]).generate_state(1)[0] % 2**31)


def bootstrap_indices(labels: torch.Tensor, seed: int, repeat: int, groups: torch.Tensor | None = None) -> torch.Tensor:
    """A stratified bootstrap resample of the training split: each class drawn with replacement to its own count.

    Every class keeps its number of examples, so every resample has every class.
    With ``groups`` (each token's sequence, in a token-level run) whole groups
    are drawn with replacement instead, as many as there are (a cluster
    bootstrap: tokens of one sequence are not independent examples).

    Returns:
        ``(n,)`` int64 row indices, on ``labels``' device, grouped by class
        (with ``groups``: by drawn group, as many rows as the drawn groups hold).

    Example:
        >>> rows = bootstrap_indices(torch.tensor([0, 0, 1, 1, 1]), seed=0, repeat=1)
    """
    generator = torch.Generator().manual_seed(repeat_seed(seed, repeat) + 1)
    if groups is not None:
        g = groups.reshape(-1).long().cpu()
        ids, member = torch.unique(g, return_inverse=True)
        rows_of = [torch.nonzero(member == k).reshape(-1) for k in range(ids.numel())]
        drawn = torch.randint(ids.numel(), (ids.numel(),), generator=generator)
        return torch.cat([rows_of[k] for k in drawn.tolist()]).to(labels.device)
    y = labels.reshape(-1).long().cpu()
    rows = []
    for k in torch.unique(y):
        members = torch.nonzero(y == k).reshape(-1)
        rows.append(members[torch.randint(members.numel(), (members.numel(),), generator=generator)])
    return torch.cat(rows).to(labels.device)


# ----------------------------------------------------------------------------- MDL
def block_ends(n: int, schedule: Sequence[float] = MDL_BLOCKS) -> list[int]:
    """Where the online code's blocks end, in examples: ``ceil(f n)`` for each fraction, at least 1, increasing, ending at ``n``.

    Example:
        >>> block_ends(1000)
        [1, 2, 4, 8, 16, 32, 63, 125, 250, 500, 1000]
    """
    if n < 1:
        raise ValueError("the online code needs at least one training example")
    ends = []
    for fraction in schedule:
        end = min(n, max(1, math.ceil(fraction * n - 1e-9)))
        if not ends or end > ends[-1]:
            ends.append(end)
    if ends[-1] != n:
        ends.append(n)
    return ends


def online_code_length(
    features: Mapping[str, torch.Tensor],
    labels: torch.Tensor,
    num_classes: int,
    *,
    fit: Callable[[Mapping[str, torch.Tensor], torch.Tensor], Mapping[str, Callable[[torch.Tensor], torch.Tensor]]],
    seed: int = 0,
    schedule: Sequence[float] = MDL_BLOCKS,
) -> dict[str, tuple[float, float]]:
    """Online (prequential) code length of ``labels`` given each layer's ``features``, in bits.

    The examples are put in a seeded random order and cut at :func:`block_ends`;
    the first block costs ``log2 K`` bits per label, and each next block the
    cross-entropy (in bits) of a probe fitted on the ``t`` examples before it,
    mixed with the uniform code: ``p = (t p_probe + 1) / (t + K)``.

    Args:
        features: ``{layer: (n, d) tensor}`` of the training split.
        labels: ``(n,)`` integer labels.
        num_classes: ``K``.
        fit: fits one probe per layer on ``({layer: rows}, labels)`` and returns
            ``{layer: logits function}`` (e.g. a wrapper of :func:`~probekit.engine.probes.fit_probes`).
        seed: seed of the order.
        schedule: fractions of the split at which blocks end (:data:`MDL_BLOCKS`).

    Returns:
        ``{layer: (mdl_bits, uniform_bits)}``; compression is their ratio ``uniform / mdl``.
    """
    y = labels.reshape(-1).long()
    n = y.shape[0]
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator).to(y.device)
    ends = block_ends(n, schedule)
    uniform = n * math.log2(num_classes)
    bits = dict.fromkeys(features, ends[0] * math.log2(num_classes))
    for start, end in zip(ends[:-1], ends[1:]):
        seen, coded = order[:start], order[start:end]
        logits = fit({layer: x[seen.to(x.device)] for layer, x in features.items()}, y[seen])
        for layer, x in features.items():
            probs = F.softmax(logits[layer](x[coded.to(x.device)].float()).double(), dim=1)
            mixed = (start * probs + 1.0) / (start + num_classes)
            picked = mixed.gather(1, y[coded].to(mixed.device).reshape(-1, 1))
            bits[layer] += float(-picked.log2().sum())
    return {layer: (bits[layer], uniform) for layer in features}
