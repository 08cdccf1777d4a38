"""The paper's experiments, one call (or one command) each: ``reproduce(NAME)``.

Each reproduction trains and probes a model, writes its run store(s) and a
figure (PNG and self-contained HTML), prints a short summary with the key
numbers and returns them as a :class:`~probekit.experiments.reproduction.Reproduction`.
By default every one runs on the embedded digits on a 2-core CPU in a few
minutes; the real dataset, pretrained weights and full sizes are there when asked for:

    >>> from probekit.experiments import reproduce
    >>> result = reproduce("bypass", out="runs")          # runs/bypass.zarr, runs/bypass.png
    >>> result.numbers["dead_segments"]      # [[first, last, probed layers], ...]
    >>> reproduce("resnet-vs-inception", dataset="imagenette", pretrained=True)   # the paper's figure 4

or ``probekit reproduce bypass --out runs`` (the command line is :mod:`probekit.cli`).
:data:`REPRODUCTIONS` lists them; each lives in its own module
(:mod:`~probekit.experiments.mnist_convnet`, :mod:`~probekit.experiments.bypass`,
:mod:`~probekit.experiments.resnet_vs_inception`, :mod:`~probekit.experiments.random_init`,
:mod:`~probekit.experiments.cka`).
``quick=True`` runs a reduced size (the tests' setting), never the paper's;
stores written by a reproduction replace those of an earlier one at the same
path. This module never imports argparse.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Callable
from pathlib import Path

from probekit.experiments import bypass, cka, mnist_convnet, random_init, resnet_vs_inception
from probekit.experiments.reproduction import Options, Reproduction
from probekit.params import choices

__all__ = ["REPRODUCTIONS", "Reproduction", "reproduce"]

_RUNNERS: dict[str, Callable[[Options], Reproduction]] = {
    "mnist-convnet": mnist_convnet.run,
    "bypass": bypass.run,
    "resnet-vs-inception": resnet_vs_inception.run,
    "random-init": random_init.run,
    "cka-resnet-vs-inception": cka.run,
}
#: Every reproduction, by name: what it shows.
REPRODUCTIONS: dict[str, str] = {
    "mnist-convnet": mnist_convnet.DESCRIPTION,
    "bypass": bypass.DESCRIPTION,
    "resnet-vs-inception": resnet_vs_inception.DESCRIPTION,
    "random-init": random_init.DESCRIPTION,
    "cka-resnet-vs-inception": cka.DESCRIPTION,
}


def reproduce(
    name: str,
    *,
    out: str | Path = "runs",
    dataset: str = "digits",
    pretrained: bool = False,
    full: bool = False,
    quick: bool = False,
    device: str | None = None,
    quiet: bool = False,
) -> Reproduction:
    """Run one of the paper's experiments: stores, a figure, a summary.

    Args:
        name: a key of :data:`REPRODUCTIONS`: ``"mnist-convnet"``, ``"bypass"``,
            ``"resnet-vs-inception"``, ``"random-init"`` or ``"cka-resnet-vs-inception"``
            (``cka.zarr`` beside the two models' stores).
        out: folder for the stores (``NAME.zarr``; ``resnet50.zarr`` and
            ``inception_v3.zarr`` for ``resnet-vs-inception``) and the figure
            (``NAME.png``, ``NAME.html``); existing ones are replaced.
        dataset: ``"digits"`` (embedded, the default), or any name or folder
            :func:`probekit.data.load` opens (``"mnist"``, ``"imagenette"``, an
            ImageNet-layout folder); real datasets are downloaded when missing.
        pretrained: ``resnet-vs-inception`` only: probe torchvision's ImageNet
            weights instead of training from scratch (downloads them).
        full: the paper's sizes: all of a real dataset (otherwise at most 10,000
            examples per split; 1,000 with ``pretrained``) and longer training.
        quick: the reduced size the tests use (smaller models, fewer steps and probes).
        device: ``"cuda"`` or ``"cpu"``; default CUDA when available.
        quiet: print nothing (no summary, no progress bars).

    Returns:
        A :class:`Reproduction` with the store and figure paths, key numbers,
        findings and wall time.

    Raises:
        ValueError: an unknown name, or options that do not apply to it.

    Example:
        >>> result = reproduce("bypass", out="runs")
        >>> print(result.findings["bypass"].of("dead_segment"))
    """
    if name not in REPRODUCTIONS:
        close = difflib.get_close_matches(str(name), REPRODUCTIONS, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(f"unknown reproduction {name!r}; {hint}choose from: {choices(REPRODUCTIONS)}")
    if not isinstance(dataset, str) or not dataset:
        raise TypeError(f"dataset must be a dataset name or folder path (a string); got {dataset!r}")
    if pretrained and name != "resnet-vs-inception":
        raise ValueError(f"pretrained=True (--pretrained) applies to resnet-vs-inception only; got it with {name!r}")
    if quick and full:
        raise ValueError("quick=True (--quick) and full=True (--full) contradict each other; pass one of them")
    options = Options(out=Path(out), dataset=dataset, pretrained=bool(pretrained), full=bool(full), quick=bool(quick),
                       device=device, quiet=bool(quiet))
    options.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = _RUNNERS[name](options)
    result.wall_time = time.perf_counter() - start
    result.command = f"probekit reproduce {name} {options.flags()}"
    options.log(result.summary())
    return result
