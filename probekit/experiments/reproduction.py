"""What one reproduction is: its :class:`Options`, its result (:class:`Reproduction`), and the steps every one shares.

Each experiment module (:mod:`~probekit.experiments.mnist_convnet`,
:mod:`~probekit.experiments.bypass`, :mod:`~probekit.experiments.resnet_vs_inception`,
:mod:`~probekit.experiments.random_init`) turns :class:`Options` into a
:class:`Reproduction` with these steps: load the data (:meth:`Options.splits`),
save the figure (:meth:`Options.save_figure`), read the key numbers
(:func:`errors`) and write the summary lines (:func:`profile_line`,
:func:`findings_lines`). Everything here goes through the package's public
API; this module never imports argparse (the command line is :mod:`probekit.cli`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import xarray as xr

from probekit.diagnosis import Findings

__all__ = [
    "Options", "Reproduction", "drop_checkpoint", "errors", "findings_lines", "present_splits", "profile_line", "seed", "side_by_side",
    "stacked",
]


@dataclass
class Reproduction:
    """What a reproduction wrote and found.

    Example:
        >>> result = pk.experiments.reproduce("random-init", quick=True, quiet=True)
        >>> result.stores, result.figure
        ({'random-init': PosixPath('runs/random-init.zarr')}, PosixPath('runs/random-init.png'))
    """

    name: str
    """The reproduction's name (a key of :data:`~probekit.experiments.REPRODUCTIONS`)."""
    stores: dict[str, Path]
    """Run stores written, by label (one per model)."""
    figure: Path
    """The figure as PNG."""
    figure_html: Path
    """The same figure as self-contained HTML (opens offline)."""
    numbers: dict[str, object]
    """The key numbers (per-layer errors, the dead segment, ...), JSON-friendly."""
    findings: dict[str, Findings]
    """:func:`probekit.diagnosis.diagnose` of each store, by label."""
    settings: dict[str, object]
    """What was run (data, sizes, optimiser, probe points)."""
    command: str
    """The ``probekit reproduce`` command that does the same."""
    wall_time: float = float("nan")
    """Seconds the reproduction took."""
    lines: list[str] = field(default_factory=list)
    """The summary's body, one line each."""

    def summary(self) -> str:
        """The short summary :func:`~probekit.experiments.reproduce` prints."""
        stores = ", ".join(str(p) for p in self.stores.values())
        plural = "s" if len(self.stores) > 1 else ""
        head = f"{self.name}: {self.wall_time:.0f} s; store{plural} {stores}; figure {self.figure}"
        return "\n".join([head, *self.lines])

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class Options:
    """How :func:`~probekit.experiments.reproduce` was asked to run (see its arguments)."""

    out: Path
    dataset: str
    pretrained: bool
    full: bool
    quick: bool
    device: str | None
    quiet: bool

    def log(self, text: str) -> None:
        """Print ``text`` unless quiet."""
        if not self.quiet:
            print(text, flush=True)

    def flags(self) -> str:
        """The ``probekit reproduce`` flags that ask for these options."""
        parts = [f"--out {self.out}"]
        if self.dataset != "digits":
            parts.append(f"--dataset {self.dataset}")
        switches = (("--pretrained", self.pretrained), ("--full", self.full), ("--quick", self.quick))
        parts += [flag for flag, on in switches if on]
        if self.device:
            parts.append(f"--device {self.device}")
        return " ".join(parts)

    @property
    def real_limit(self) -> int | None:
        """Examples per split (all of the embedded digits; at most 10,000 of a real dataset unless ``full``)."""
        return None if self.full or self.dataset == "digits" else 10_000

    def splits(self, *, limit: int | None, size: int | None = None, channels: int | None = None, model=None):
        """The reproduction's data: the embedded digits, or ``dataset`` through :func:`probekit.data.load`.

        ``model`` (one that declares its ``input_shape``) fits the data to it, as
        :func:`probekit.data.load` does.
        """
        from probekit import data

        if self.dataset == "digits" and model is None:
            fitted = {k: v for k, v in (("size", size), ("channels", channels)) if v is not None}
            return data.digits(seed=0, limit=limit, **fitted)
        return data.load(self.dataset, limit=limit, seed=0, size=size, channels=channels, model=model)

    def save_figure(self, chart, name: str) -> tuple[Path, Path]:
        """Save ``chart`` as ``out/NAME.png`` and ``out/NAME.html``; returns both paths."""
        from probekit import plots

        png, page = self.out / f"{name}.png", self.out / f"{name}.html"
        plots.save(chart, png)
        plots.save(chart, page)
        return png, page


def seed(value: int = 0) -> None:
    """Seed torch's global generator (model initialisation)."""
    import torch

    torch.manual_seed(value)


def drop_checkpoint(store: Path) -> None:
    """A finished reproduction is not resumed: remove :func:`~probekit.engine.train_and_probe`'s checkpoint beside the store."""
    from probekit.engine.training import resume_path

    resume_path(store).unlink(missing_ok=True)


def errors(ds: xr.Dataset, split: str = "valid", epoch: int = -1) -> dict[str, float]:
    """Each layer's probe error on ``split`` at ``epoch``, rounded for the summary and JSON."""
    return {layer: round(float(v), 4) for layer, v in ds.probekit.errors(split, epoch).items()}


def present_splits(ds: xr.Dataset) -> tuple[str, ...]:
    """The splits a run measured, in the usual order."""
    present = {str(s) for s in ds["split"].values}
    return tuple(s for s in ("train", "valid", "test") if s in present)


def profile_line(by_layer: dict[str, float], *, limit: int = 24) -> str:
    """``layer error`` pairs on one line, every k-th layer (and the last) when there are more than ``limit``."""
    items = list(by_layer.items())
    if len(items) > limit:
        step = math.ceil(len(items) / limit)
        items = items[::step] + ([items[-1]] if (len(items) - 1) % step else [])
    return " ".join(f"{layer} {value:.3f}" for layer, value in items)


def findings_lines(findings: Findings) -> list[str]:
    """One summary line per finding (or one saying there are none)."""
    if not len(findings):
        return ["  diagnosis: no findings"]
    return [f"  diagnosis: {f.kind} at {f.span()}" for f in findings]


def side_by_side(*charts):
    """Charts next to each other on one y scale, each with its own colours."""
    import altair as alt

    return alt.hconcat(*charts).resolve_scale(color="independent").resolve_scale(y="shared")


def stacked(*charts):
    """Charts one above the other, each with its own colours."""
    import altair as alt

    return alt.vconcat(*charts).resolve_scale(color="independent")
