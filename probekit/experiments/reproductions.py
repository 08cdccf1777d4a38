"""The paper's experiments, one call (or one command) each: ``reproduce(NAME)``.

Each reproduction trains and probes a model, writes its run store(s) and a
figure (PNG and self-contained HTML), prints a short summary with the key
numbers and returns them as a :class:`Reproduction`. By default every one
runs on the embedded digits on a 2-core CPU in a few minutes; the real
dataset, pretrained weights and full sizes are there when asked for:

    >>> from probekit.experiments.reproductions import reproduce
    >>> result = reproduce("bypass", out="runs")          # runs/bypass.zarr, runs/bypass.png
    >>> result.numbers["dead_segments"]      # [[first, last, probed layers], ...]
    >>> reproduce("resnet-vs-inception", dataset="imagenette", pretrained=True)   # the paper's figure 4

or ``probekit reproduce bypass --out runs``. :data:`REPRODUCTIONS` lists them.
``quick=True`` runs a reduced size (the tests' setting), never the
paper's; stores written by a reproduction replace those of an earlier one
at the same path.
"""

from __future__ import annotations

import argparse
import difflib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import xarray as xr

from probekit.diagnosis import Findings, diagnose

__all__ = ["REPRODUCTIONS", "Reproduction", "add_arguments", "command", "reproduce"]

#: Every reproduction, by name: what it shows.
REPRODUCTIONS: dict[str, str] = {
    "mnist-convnet": (
        "the paper's MNIST convnet (two conv layers, one hidden fully connected layer), probed at every conv, ReLU "
        "and pooling op at initialisation and after each epoch of training; the figure shows the error per layer "
        "at initialisation and at the end (paper, figure 2)"
    ),
    "bypass": (
        "128 dense layers of 128 units with one skip connection around the first half, trained with plain SGD and "
        "probed after 0, 500 and 2,000 minibatches: the bypassed layers form a dead segment, which the figure and "
        "pk.diagnose show (paper, 'pathological skip connection')"
    ),
    "resnet-vs-inception": (
        "ResNet-50 and Inception v3 probed on the same data: with --pretrained on Imagenette or ImageNet, the "
        "paper's figure 4 (ResNet-50's validation error falling almost monotonically with depth) next to Inception "
        "v3; offline, both trained from scratch on upsampled digits and probed every epoch"
    ),
    "random-init": (
        "an untrained 128-layer ReLU MLP on the easy digits: linear separability degrades with depth until the "
        "deep layers are no better than chance (paper, untrained deep networks)"
    ),
}


@dataclass
class Reproduction:
    """What a reproduction wrote and found.

    Example:
        >>> result = reproduce("random-init", quick=True, quiet=True)
        >>> result.stores, result.figure
        ({'random-init': PosixPath('runs/random-init.zarr')}, PosixPath('runs/random-init.png'))
    """

    name: str
    """The reproduction's name (a key of :data:`REPRODUCTIONS`)."""
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
    """What was run: data, sizes, optimiser, probe points."""
    command: str
    """The ``probekit reproduce`` command that does the same."""
    wall_time: float = float("nan")
    """Seconds the reproduction took."""
    lines: list[str] = field(default_factory=list)
    """The summary's body, one line each."""

    def summary(self) -> str:
        """The short summary :func:`reproduce` prints."""
        stores = ", ".join(str(p) for p in self.stores.values())
        plural = "s" if len(self.stores) > 1 else ""
        head = f"{self.name}: {self.wall_time:.0f} s; store{plural} {stores}; figure {self.figure}"
        return "\n".join([head, *self.lines])

    def __str__(self) -> str:
        return self.summary()


@dataclass(frozen=True)
class _Options:
    out: Path
    dataset: str
    pretrained: bool
    full: bool
    quick: bool
    device: str | None
    quiet: bool

    def log(self, text: str) -> None:
        if not self.quiet:
            print(text, flush=True)

    def flags(self) -> str:
        parts = [f"--out {self.out}"]
        if self.dataset != "digits":
            parts.append(f"--dataset {self.dataset}")
        switches = (("--pretrained", self.pretrained), ("--full", self.full), ("--quick", self.quick))
        parts += [flag for flag, on in switches if on]
        if self.device:
            parts.append(f"--device {self.device}")
        return " ".join(parts)


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
            ``"resnet-vs-inception"`` or ``"random-init"``.
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
        raise ValueError(f"unknown reproduction {name!r}; {hint}choose from: {', '.join(REPRODUCTIONS)}")
    if not isinstance(dataset, str) or not dataset:
        raise TypeError(f"dataset must be a dataset name or folder path (a string); got {dataset!r}")
    if pretrained and name != "resnet-vs-inception":
        raise ValueError(f"pretrained=True (--pretrained) applies to resnet-vs-inception only; got it with {name!r}")
    if quick and full:
        raise ValueError("quick=True (--quick) and full=True (--full) contradict each other; pass one of them")
    options = _Options(out=Path(out), dataset=dataset, pretrained=bool(pretrained), full=bool(full), quick=bool(quick),
                       device=device, quiet=bool(quiet))
    options.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = _RUNNERS[name](options)
    result.wall_time = time.perf_counter() - start
    result.command = f"probekit reproduce {name} {options.flags()}"
    options.log(result.summary())
    return result


# ----------------------------------------------------------------------------- shared helpers
def _seed(seed: int = 0) -> None:
    import torch

    torch.manual_seed(seed)


def _splits(options: _Options, *, limit: int | None, **kwargs):
    """The reproduction's data: the embedded digits, or ``options.dataset`` through :func:`probekit.data.load`."""
    from probekit import data

    if options.dataset == "digits" and "model" not in kwargs:
        digits_kwargs = {k: v for k, v in kwargs.items() if v is not None}
        return data.digits(seed=0, limit=limit, **digits_kwargs)
    return data.load(options.dataset, limit=limit, seed=0, **kwargs)


def _real_limit(options: _Options) -> int | None:
    """Examples per split: all of the embedded digits; at most 10,000 of a real dataset unless ``full``."""
    return None if options.full or options.dataset == "digits" else 10_000


def _errors(ds: xr.Dataset, split: str = "valid", epoch: int = -1) -> dict[str, float]:
    import probekit.accessor  # noqa: F401 - registers ds.probekit

    return {layer: round(float(v), 4) for layer, v in ds.probekit.errors(split, epoch).items()}


def _save_figure(chart, options: _Options, name: str) -> tuple[Path, Path]:
    from probekit import plots

    png, page = options.out / f"{name}.png", options.out / f"{name}.html"
    plots.save(chart, png)
    plots.save(chart, page)
    return png, page


def _drop_checkpoint(store: Path) -> None:
    """A finished reproduction is not resumed: remove train_and_probe's checkpoint beside the store."""
    from probekit.engine.training import resume_path

    resume_path(store).unlink(missing_ok=True)


def _profile_line(errors: dict[str, float], *, limit: int = 24) -> str:
    items = list(errors.items())
    if len(items) > limit:
        step = math.ceil(len(items) / limit)
        items = items[::step] + ([items[-1]] if (len(items) - 1) % step else [])
    return " ".join(f"{layer} {value:.3f}" for layer, value in items)


def _findings_lines(findings: Findings) -> list[str]:
    if not len(findings):
        return ["  diagnosis: no findings"]
    return [f"  diagnosis: {f.kind} at {f.span()}" for f in findings]


# ----------------------------------------------------------------------------- mnist-convnet
def _mnist_convnet(options: _Options) -> Reproduction:
    from probekit import plots, zoo
    from probekit.engine.training import train_and_probe

    splits = _splits(options, limit=_real_limit(options))
    info = splits.info
    epochs = 2 if options.quick else (10 if options.full else 5)
    shape = {"width": (8, 16), "hidden": 32} if options.quick else {}
    _seed()
    model = zoo.paper_convnet(in_channels=info.channels, num_classes=info.num_classes, input_size=info.size, **shape)
    store = options.out / "mnist-convnet.zarr"
    options.log(f"mnist-convnet: paper_convnet on {info.name} {splits.sizes()}, {epochs} epochs of SGD "
                "(lr 0.05, momentum 0.9)")
    ds = train_and_probe(
        model, splits, epochs=epochs, store=store, overwrite=True, optimizer="sgd", lr=0.05, momentum=0.9,
        train_batch_size=64, seed=0, device=options.device, quiet=True, name="paper_convnet", dataset=info.name,
    )
    _drop_checkpoint(store)
    findings = diagnose(ds)
    chart = _side_by_side(
        plots.depth_profile(ds, epoch=0, splits=_present_splits(ds)),
        plots.depth_profile(ds, epoch=-1, splits=_present_splits(ds)),
    )
    png, page = _save_figure(chart, options, "mnist-convnet")
    init, final = _errors(ds, epoch=0), _errors(ds, epoch=-1)
    test = "test" in _present_splits(ds)
    numbers = {
        "epochs": epochs,
        "valid_error_init": init,
        "valid_error_final": final,
        **({"test_error_init": _errors(ds, "test", 0), "test_error_final": _errors(ds, "test", -1)} if test else {}),
        "model_error_final": round(float(ds["model_error"].values[-1]), 4),
    }
    best_init = min(init, key=init.get)
    lines = [
        f"  valid error at initialisation: {_profile_line(init)}",
        f"  valid error after {epochs} epochs: {_profile_line(final)}",
        f"  at initialisation the input's probe errs {init['input']:.3f} and {best_init}'s {init[best_init]:.3f}",
        *_findings_lines(findings),
    ]
    return Reproduction(
        name="mnist-convnet", stores={"mnist-convnet": store}, figure=png, figure_html=page, numbers=numbers,
        findings={"mnist-convnet": findings}, command="", lines=lines,
        settings={"model": "paper_convnet", **{k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()},
                  "dataset": info.name, "sizes": splits.sizes(), "epochs": epochs, "optimizer": "sgd", "lr": 0.05,
                  "momentum": 0.9, "batch_size": 64, "layers": list(model.probe_layers)},
    )


def _present_splits(ds: xr.Dataset) -> tuple[str, ...]:
    present = {str(s) for s in ds["split"].values}
    return tuple(s for s in ("train", "valid", "test") if s in present)


def _side_by_side(*charts, shared_y: bool = True):
    import altair as alt

    chart = alt.hconcat(*charts).resolve_scale(color="independent")
    return chart.resolve_scale(y="shared") if shared_y else chart


# ----------------------------------------------------------------------------- bypass
#: Minibatches after which the bypass model is probed: the paper's 0, 500 and 2,000. On the
#: digits (17 minibatches of 64 per epoch) 500 minibatches train the layers after the skip
#: halfway and 2,000 to convergence, the phases the paper shows on MNIST.
BYPASS_STEPS = (0, 500, 2000)
#: ``quick=True``: the layers after the skip need about 1,000 minibatches to converge.
BYPASS_QUICK_STEPS = (0, 250, 1000)


def _bypass(options: _Options) -> Reproduction:
    """The pathological skip connection.

    Choices where the paper is silent, and why: tanh units with Glorot-uniform
    weights and zero biases (the zoo's defaults): the untrained stack then
    keeps a usable signal for a few dozen layers and degrades slowly, so the
    dead segment is caused by the skip, not by the initialisation; plain SGD
    (no momentum) at lr 0.01, batch 64: the paper's optimiser; a trial at 0.02
    trained the 64 layers after the skip no faster (their probes were worse
    after 400 minibatches than at 0.01 after 500). Every layer is probed (130
    probe points; every eighth with ``quick=True``).
    """
    from probekit import plots, zoo
    from probekit.engine.devices import resolve_device
    from probekit.engine.monitor import ProbeMonitor

    splits = _splits(options, limit=_real_limit(options))
    info = splits.info
    steps = BYPASS_QUICK_STEPS if options.quick else BYPASS_STEPS
    depth, skip = 128, (0, 64)
    lr, batch_size = 0.01, 64
    _seed()
    model = zoo.bypass_mlp(depth=depth, width=128, skip=skip, activation="tanh", in_features=math.prod(info.input_shape),
                           num_classes=info.num_classes)
    hidden = [f"layers.{i}" for i in range(depth)]
    layers = ["input", *hidden[::8], hidden[-1], "output"] if options.quick else list(model.probe_layers)
    device = resolve_device(options.device)
    model.to(device)
    store = options.out / "bypass.zarr"
    options.log(
        f"bypass: bypass_mlp ({depth} tanh layers, skip {skip[0]}->{skip[1]}) on {info.name} {splits.sizes()}, plain SGD "
        f"(lr {lr}, batch {batch_size}), {len(layers)} probes after {', '.join(f'{s:,}' for s in steps)} minibatches"
    )
    with ProbeMonitor(model, splits, layers=layers, store=store, overwrite=True, quiet=True, name="bypass_mlp",
                      dataset=info.name) as monitor:
        _sgd_with_probes(model, splits.train, monitor, steps=steps, lr=lr, batch_size=batch_size, device=device)
        ds = monitor.dataset
    findings = diagnose(ds)
    snapshots = {f"after {int(s):,} minibatches": ds.isel(epoch=[i]) for i, s in enumerate(ds["step"].values)}
    chart = _stacked(plots.comparison(snapshots), plots.diagnosis_overlay(ds, findings.to_frame()))
    png, page = _save_figure(chart, options, "bypass")
    bypassed = list(model.bypassed_layers)
    dead = findings.of("dead_segment")
    deeper = bypassed[len(bypassed) // 2:]
    probed_deeper = [layer for layer in layers if layer in deeper]
    covered = {layer for f in dead for layer in f.layers}
    numbers = {
        "steps": [int(s) for s in ds["step"].values],
        "valid_error": {int(s): _errors(ds, epoch=int(e)) for e, s in zip(ds["epoch"].values, ds["step"].values)},
        "bypassed": [bypassed[0], bypassed[-1]],
        "dead_segments": [[f.first, f.last, len(f.layers)] for f in dead],
        "dead_inside_bypassed": bool(dead) and all(layer in bypassed for f in dead for layer in f.layers),
        "deeper_half_covered": round(sum(layer in covered for layer in probed_deeper) / max(len(probed_deeper), 1), 3),
        "model_loss_final": round(float(ds["model_loss"].values[-1]), 4),
    }
    final = numbers["valid_error"][numbers["steps"][-1]]
    shown = dict.fromkeys(["input", deeper[0], _last_probed(layers, bypassed), _first_after(layers, bypassed), "output"])
    lines = [
        f"  bypassed layers {bypassed[0]} ... {bypassed[-1]}; valid error after {numbers['steps'][-1]:,} minibatches: "
        + ", ".join(f"{layer} {final[layer]:.3f}" for layer in shown if layer in final),
        *(f"  dead segment {first} ... {last} ({n} probed layers); it covers {numbers['deeper_half_covered']:.0%} "
          "of the probed deeper half of the bypassed layers" for first, last, n in numbers["dead_segments"]),
        *_findings_lines(findings),
    ]
    return Reproduction(
        name="bypass", stores={"bypass": store}, figure=png, figure_html=page, numbers=numbers,
        findings={"bypass": findings}, command="", lines=lines,
        settings={"model": "bypass_mlp", "depth": depth, "width": 128, "skip": list(skip), "activation": "tanh",
                  "init": "Glorot-uniform weights, zero biases", "dataset": info.name, "sizes": splits.sizes(),
                  "optimizer": "plain SGD (no momentum)", "lr": lr, "batch_size": batch_size, "steps": list(steps),
                  "layers": layers},
    )


def _last_probed(layers: Sequence[str], bypassed: Sequence[str]) -> str:
    return [layer for layer in layers if layer in bypassed][-1]


def _first_after(layers: Sequence[str], bypassed: Sequence[str]) -> str:
    last = layers.index(_last_probed(layers, bypassed))
    return layers[last + 1]


def _stacked(*charts):
    import altair as alt

    return alt.vconcat(*charts).resolve_scale(color="independent")


def _sgd_with_probes(model, train, monitor, *, steps: Sequence[int], lr: float, batch_size: int, device) -> None:
    """Plain SGD on ``train``, probing the model with ``monitor`` after each of ``steps`` minibatches.

    Rows are labelled with the epoch in progress (``ceil(step / minibatches per
    epoch)``, 0 before training) and the step; the model's loss and error are
    the means over the minibatches since the previous probe.
    """
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    dataset = train if isinstance(train, Dataset) else TensorDataset(*train)
    per_epoch = math.ceil(len(dataset) / batch_size)
    labels = [math.ceil(s / per_epoch) for s in steps]
    if len(set(labels)) < len(labels):
        labels = list(range(len(steps)))
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    monitor.update(epoch=labels[0], step=steps[0])
    step, losses, errors = steps[0], [], []
    targets = dict(zip(steps[1:], labels[1:]))
    while step < steps[-1]:
        model.train()
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator):
            x, y = x.to(device), y.to(device).long()
            optimizer.zero_grad()
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            if not math.isfinite(loss.item()):
                raise FloatingPointError(
                    f"the model's training loss became {loss.item()} at step {step}; lower the learning rate"
                )
            loss.backward()
            optimizer.step()
            step += 1
            losses.append(loss.item())
            errors.append((logits.argmax(1) != y).float().mean().item())
            if step in targets:
                monitor.update(epoch=targets[step], step=step, model_loss=sum(losses) / len(losses),
                               model_error=sum(errors) / len(errors))
                losses, errors = [], []
            if step >= steps[-1]:
                break


# ----------------------------------------------------------------------------- resnet-vs-inception
#: Offline input sizes: the smallest each architecture handles well (Inception v3 needs 75 px).
SCRATCH_SIZES = {"resnet50": 32, "inception_v3": 75}
_TITLES = {"resnet50": "ResNet-50", "inception_v3": "Inception v3"}


def _resnet_vs_inception(options: _Options) -> Reproduction:
    import altair as alt

    from probekit import plots

    runs, settings = {}, {}
    for arch in ("resnet50", "inception_v3"):
        runner = _pretrained_arch if options.pretrained else _scratch_arch
        runs[arch], settings[arch] = runner(options, arch)
    findings = {arch: diagnose(ds) for arch, ds in runs.items()}
    named = {_TITLES[arch]: ds for arch, ds in runs.items()}
    if options.pretrained:
        detail = _side_by_side(*(plots.depth_profile(ds, splits=("train", "valid")) for ds in runs.values()))
    else:
        # Layer x epoch heatmaps on one colour scale; the pooled input (3 features, near chance) would
        # flatten it, so it is left out here (the comparison above shows it).
        detail = alt.hconcat(*(
            plots.heatmap(ds, layers=[str(v) for v in ds["layer"].values if str(v) != "input"]) for ds in runs.values()
        )).resolve_scale(color="shared")
    chart = _stacked(plots.comparison(named), detail)
    png, page = _save_figure(chart, options, "resnet-vs-inception")
    numbers: dict[str, object] = {}
    lines = []
    for arch, ds in runs.items():
        first, last = _errors(ds, epoch=0), _errors(ds, epoch=-1)
        numbers[arch] = {"valid_error_final": last, "valid_error_init": first, "epochs": int(ds["epoch"].values[-1])}
        when = "pretrained" if options.pretrained else f"after {int(ds['epoch'].values[-1])} epochs"
        lines.append(f"  {_TITLES[arch]} valid error {when}: {_profile_line(last)}")
        lines += [f"  {_TITLES[arch]} {line.strip()}" for line in _findings_lines(findings[arch])]
    return Reproduction(
        name="resnet-vs-inception", stores={arch: options.out / f"{arch}.zarr" for arch in runs}, figure=png,
        figure_html=page, numbers=numbers, findings=findings, command="", lines=lines, settings=settings,
    )


def _scratch_arch(options: _Options, arch: str) -> tuple[xr.Dataset, dict]:
    from probekit import zoo
    from probekit.engine.training import train_and_probe

    size = SCRATCH_SIZES[arch]
    limit = 128 if options.quick else (None if options.full else 300)
    epochs = 2 if options.quick else (10 if options.full else 5)
    splits = _splits(options, limit=limit, size=size, channels=3)
    info = splits.info
    data = {"train": splits.train, "valid": splits.valid}  # no test split: probing it every epoch costs time
    sizes = {name: n for name, n in splits.sizes().items() if name in data}
    _seed()
    # Inception's auxiliary head needs about 299 px; at 75 px the model runs without it.
    model = zoo.build(arch, num_classes=info.num_classes, **({"aux_logits": False} if arch == "inception_v3" else {}))
    store = options.out / f"{arch}.zarr"
    options.log(f"resnet-vs-inception: {arch} from scratch on {info.name} at {size} px {sizes}, {epochs} epochs of Adam")
    ds = train_and_probe(
        model, data, epochs=epochs, store=store, overwrite=True,
        optimizer="adam", lr=1e-3, train_batch_size=16, seed=0, device=options.device, quiet=True,
        reduce="pool", name=arch, dataset=info.name, batch_size=64,
    )
    _drop_checkpoint(store)
    return ds, {"model": arch, "weights": None, "dataset": info.name, "size": size, "sizes": sizes,
                "epochs": epochs, "optimizer": "adam", "lr": 1e-3, "batch_size": 16, "reduce": "pool",
                "layers": list(model.probe_layers)}


def _pretrained_arch(options: _Options, arch: str) -> tuple[xr.Dataset, dict]:
    from probekit import zoo
    from probekit.engine import probe

    model = zoo.build(arch, weights="DEFAULT")
    limit = 64 if options.quick else (None if options.full else 1000)
    splits = _splits(options, limit=limit, model=model)
    reduce = "pool" if arch == "resnet50" else "subset1000"
    store = options.out / f"{arch}.zarr"
    options.log(f"resnet-vs-inception: pretrained {arch} on {splits.info.name} {splits.sizes()}, reduce={reduce}")
    ds = probe(model, splits, store=store, overwrite=True, reduce=reduce, device=options.device, quiet=True,
               name=arch, dataset=splits.info.name, num_classes=splits.info.num_classes)
    return ds, {"model": arch, "weights": "DEFAULT", "dataset": splits.info.name, "sizes": splits.sizes(),
                "reduce": reduce, "layers": list(model.probe_layers)}


# ----------------------------------------------------------------------------- random-init
def _random_init(options: _Options) -> Reproduction:
    from probekit import plots, zoo
    from probekit.engine import probe

    splits = _splits(options, limit=_real_limit(options))
    info = splits.info
    depth = 32 if options.quick else 128
    _seed()
    model = zoo.bypass_mlp(depth=depth, width=128, skip=None, activation="relu", in_features=math.prod(info.input_shape),
                           num_classes=info.num_classes)
    hidden = [f"layers.{i}" for i in range(depth)]
    layers = ["input", *hidden[::2], "output"] if options.quick else list(model.probe_layers)
    store = options.out / "random-init.zarr"
    options.log(f"random-init: untrained {depth}-layer ReLU MLP on {info.name} {splits.sizes()}, {len(layers)} probes")
    ds = probe(model, splits, layers=layers, store=store, overwrite=True, device=options.device, quiet=True,
               name="untrained_mlp", dataset=info.name, step=0)
    findings = diagnose(ds)
    chart = _side_by_side(plots.depth_profile(ds, splits=("train", "valid")),
                          plots.diagnosis_overlay(ds, findings.to_frame()))
    png, page = _save_figure(chart, options, "random-init")
    errors = _errors(ds)
    chance = findings.of("chance_level")
    numbers = {
        "valid_error": errors,
        "chance_error": round(float(ds.attrs["chance_error"]), 4),
        "first_chance_layer": chance[0].first if len(chance) else None,
        "worst_hidden_layer": max((layer for layer in errors if layer in hidden), key=errors.get),
    }
    lines = [f"  valid error by depth: {_profile_line(errors)}", *_findings_lines(findings)]
    return Reproduction(
        name="random-init", stores={"random-init": store}, figure=png, figure_html=page, numbers=numbers,
        findings={"random-init": findings}, command="", lines=lines,
        settings={"model": "bypass_mlp", "depth": depth, "width": 128, "skip": None, "activation": "relu",
                  "init": "Glorot-uniform weights, zero biases", "trained": False, "dataset": info.name,
                  "sizes": splits.sizes(), "layers": layers},
    )


_RUNNERS: dict[str, Callable[[_Options], Reproduction]] = {
    "mnist-convnet": _mnist_convnet,
    "bypass": _bypass,
    "resnet-vs-inception": _resnet_vs_inception,
    "random-init": _random_init,
}


# ----------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``reproduce``'s arguments to a (sub)parser.

    ``NAME [--dataset D] [--pretrained] [--full] [--out DIR] [--quick] [--device D] [--quiet]``.

    Example:
        >>> sub = top.add_subparsers().add_parser("reproduce")
        >>> add_arguments(sub).set_defaults(func=command)
    """
    parser.add_argument("name", choices=list(REPRODUCTIONS), metavar="NAME",
                        help="one of: " + ", ".join(REPRODUCTIONS))
    parser.add_argument("--dataset", default="digits",
                        help="digits (embedded, default), mnist, fashion-mnist, cifar10, imagenette "
                             "or an ImageNet-layout folder")
    parser.add_argument("--pretrained", action="store_true",
                        help="resnet-vs-inception: probe torchvision's ImageNet weights (downloaded) "
                             "instead of training from scratch")
    parser.add_argument("--full", action="store_true", help="the paper's sizes: the whole dataset and longer training")
    parser.add_argument("--out", default="runs", help="folder for the stores and the figure (default: runs)")
    parser.add_argument("--quick", action="store_true", help="a reduced size for tests and smoke runs")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")
    return parser


def command(args: argparse.Namespace) -> int:
    """Run the reproduction ``args`` (from a parser set up by :func:`add_arguments`) names; returns 0."""
    reproduce(args.name, out=args.out, dataset=args.dataset, pretrained=args.pretrained, full=args.full,
              quick=args.quick, device=args.device, quiet=args.quiet)
    return 0

