"""``resnet-vs-inception``: ResNet-50 and Inception v3 probed on the same data (the paper's figure 4).

With ``pretrained=True`` torchvision's ImageNet weights are probed once each
(:func:`probekit.engine.probe`); offline both are trained from scratch on
upsampled digits (:func:`probekit.engine.train_and_probe`) and probed every
epoch. Never imports argparse.
"""

from __future__ import annotations

import xarray as xr

from probekit.diagnosis import diagnose
from probekit.experiments.reproduction import (
    Options, Reproduction, drop_checkpoint, errors, findings_lines, profile_line, seed, side_by_side, stacked,
)

__all__ = ["DESCRIPTION", "SCRATCH_SIZES", "run", "train_from_scratch"]

DESCRIPTION = (
    "ResNet-50 and Inception v3 probed on the same data: with --pretrained on Imagenette or ImageNet, the "
    "paper's figure 4 (ResNet-50's validation error falling almost monotonically with depth) next to Inception "
    "v3; offline, both trained from scratch on upsampled digits and probed every epoch"
)

#: Offline input sizes: the smallest each architecture handles well (Inception v3 needs 75 px).
SCRATCH_SIZES = {"resnet50": 32, "inception_v3": 75}
_TITLES = {"resnet50": "ResNet-50", "inception_v3": "Inception v3"}


def run(options: Options) -> Reproduction:
    """Probe ResNet-50 and Inception v3 on the same data: pretrained (one snapshot each) or trained from scratch.

    Example:
        >>> run(Options(out=Path("runs"), dataset="imagenette", pretrained=True, full=False, quick=False,
        ...             device=None, quiet=False)).numbers["resnet50"]["valid_error_final"]
    """
    import altair as alt

    from probekit import plots

    runs, settings = {}, {}
    for arch in ("resnet50", "inception_v3"):
        runner = _pretrained_arch if options.pretrained else _scratch_arch
        runs[arch], settings[arch] = runner(options, arch)
    findings = {arch: diagnose(ds) for arch, ds in runs.items()}
    named = {_TITLES[arch]: ds for arch, ds in runs.items()}
    if options.pretrained:
        detail = side_by_side(*(plots.depth_profile(ds, splits=("train", "valid")) for ds in runs.values()))
    else:
        # Layer x epoch heatmaps on one colour scale; the pooled input (3 features, near chance) would
        # flatten it, so it is left out here (the comparison above shows it).
        detail = alt.hconcat(*(
            plots.heatmap(ds, layers=[str(v) for v in ds["layer"].values if str(v) != "input"]) for ds in runs.values()
        )).resolve_scale(color="shared")
    chart = stacked(plots.comparison(named), detail)
    png, page = options.save_figure(chart, "resnet-vs-inception")
    numbers: dict[str, object] = {}
    lines = []
    for arch, ds in runs.items():
        first, last = errors(ds, epoch=0), errors(ds, epoch=-1)
        numbers[arch] = {"valid_error_final": last, "valid_error_init": first, "epochs": int(ds["epoch"].values[-1])}
        when = "pretrained" if options.pretrained else f"after {int(ds['epoch'].values[-1])} epochs"
        lines.append(f"  {_TITLES[arch]} valid error {when}: {profile_line(last)}")
        lines += [f"  {_TITLES[arch]} {line.strip()}" for line in findings_lines(findings[arch])]
    return Reproduction(
        name="resnet-vs-inception", stores={arch: options.out / f"{arch}.zarr" for arch in runs}, figure=png,
        figure_html=page, numbers=numbers, findings=findings, command="", lines=lines, settings=settings,
    )


def _scratch_arch(options: Options, arch: str) -> tuple[xr.Dataset, dict]:
    _, ds, settings = train_from_scratch(options, arch)
    return ds, settings


def train_from_scratch(options: Options, arch: str):
    """Train ``arch`` from scratch on the upsampled digits, probing every epoch: ``(model, run, settings)``.

    The recipe of the offline reproduction (also the models of ``cka-resnet-vs-inception``).
    """
    from probekit import zoo
    from probekit.engine.training import train_and_probe

    size = SCRATCH_SIZES[arch]
    limit = 128 if options.quick else (None if options.full else 300)
    epochs = 2 if options.quick else (10 if options.full else 5)
    splits = options.splits(limit=limit, size=size, channels=3)
    info = splits.info
    data = {"train": splits.train, "valid": splits.valid}  # no test split: probing it every epoch costs time
    sizes = {name: n for name, n in splits.sizes().items() if name in data}
    seed()
    # Inception's auxiliary head needs about 299 px; at 75 px the model runs without it.
    model = zoo.build(arch, num_classes=info.num_classes, **({"aux_logits": False} if arch == "inception_v3" else {}))
    store = options.out / f"{arch}.zarr"
    options.log(f"resnet-vs-inception: {arch} from scratch on {info.name} at {size} px {sizes}, {epochs} epochs of Adam")
    ds = train_and_probe(
        model, data, epochs=epochs, store=store, overwrite=True,
        optimizer="adam", lr=1e-3, train_batch_size=16, seed=0, device=options.device, quiet=True,
        reduce="pool", model_name=arch, dataset_name=info.name, batch_size=64,
    )
    drop_checkpoint(store)
    return model, ds, {"model": arch, "weights": None, "dataset": info.name, "size": size, "limit": limit, "sizes": sizes,
                       "epochs": epochs, "optimizer": "adam", "lr": 1e-3, "batch_size": 16, "reduce": "pool",
                       "layers": list(model.probe_layers)}


def _pretrained_arch(options: Options, arch: str) -> tuple[xr.Dataset, dict]:
    from probekit import zoo
    from probekit.engine import probe

    model = zoo.build(arch, weights="DEFAULT")
    limit = 64 if options.quick else (None if options.full else 1000)
    splits = options.splits(limit=limit, model=model)
    reduce = "pool" if arch == "resnet50" else "subset1000"
    store = options.out / f"{arch}.zarr"
    options.log(f"resnet-vs-inception: pretrained {arch} on {splits.info.name} {splits.sizes()}, reduce={reduce}")
    ds = probe(model, splits, store=store, overwrite=True, reduce=reduce, device=options.device, quiet=True,
               model_name=arch, dataset_name=splits.info.name, num_classes=splits.info.num_classes)
    return ds, {"model": arch, "weights": "DEFAULT", "dataset": splits.info.name, "sizes": splits.sizes(),
                "reduce": reduce, "layers": list(model.probe_layers)}
