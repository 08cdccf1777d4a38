"""``cka-resnet-vs-inception``: which layers of ResNet-50 and Inception v3 represent the digits alike (linear CKA).

Both models are trained from scratch on the upsampled digits exactly as the
offline ``resnet-vs-inception`` reproduction trains them
(:func:`~probekit.experiments.resnet_vs_inception.train_from_scratch`, which
also writes their probe runs), then :func:`probekit.cka` compares every probed
layer of one with every probed layer of the other on the validation split:
ResNet-50 sees it at 32 px, Inception v3 the same images at 75 px. The
similarity is written to ``cka.zarr`` (a ``(layer_a, layer_b)`` DataArray) and
drawn beside the two probe profiles. Never imports argparse.
"""

from __future__ import annotations

import numpy as np

from probekit.diagnosis import diagnose
from probekit.experiments.reproduction import Options, Reproduction, findings_lines, seed, stacked
from probekit.experiments.resnet_vs_inception import SCRATCH_SIZES, train_from_scratch

__all__ = ["DESCRIPTION", "run"]

DESCRIPTION = (
    "ResNet-50 and Inception v3 trained from scratch on upsampled digits (as in resnet-vs-inception), then "
    "compared layer by layer with linear CKA (Kornblith et al. 2019) on the same validation images: which "
    "layers of the two architectures represent the data alike"
)
_TITLES = {"resnet50": "ResNet-50", "inception_v3": "Inception v3"}


def run(options: Options) -> Reproduction:
    """Train both models, compare their layers with CKA, save the similarity and the figure.

    Example:
        >>> result = run(Options(out=Path("runs"), dataset="digits", pretrained=False, full=False, quick=True,
        ...                      device="cpu", quiet=True))
        >>> result.numbers["cka"]["input"]["input"]
    """
    import xarray as xr

    from probekit import plots
    from probekit.engine.similarity import cka

    models, runs, settings = {}, {}, {}
    for arch in ("resnet50", "inception_v3"):
        models[arch], runs[arch], settings[arch] = train_from_scratch(options, arch)
    views = {arch: options.splits(limit=settings[arch]["limit"], size=SCRATCH_SIZES[arch], channels=3).valid
             for arch in models}
    seed()
    options.log("cka-resnet-vs-inception: linear CKA between every probed layer of the two models on the valid split")
    sim = cka(models["resnet50"], models["inception_v3"], views["resnet50"], data_b=views["inception_v3"],
              layers_a=settings["resnet50"]["layers"], layers_b=settings["inception_v3"]["layers"], reduce="pool",
              device=options.device, batch_size=64)
    sim.attrs.update(model_a=_TITLES["resnet50"], model_b=_TITLES["inception_v3"])
    store = options.out / "cka.zarr"
    sim.to_dataset().to_zarr(store, mode="w", zarr_format=2)
    sim = xr.open_zarr(store)["cka"].load()
    named = {_TITLES[arch]: ds for arch, ds in runs.items()}
    chart = stacked(plots.cka_heatmap(sim), plots.comparison(named))
    png, page = options.save_figure(chart, "cka-resnet-vs-inception")
    values = np.asarray(sim.values, dtype=float)
    best = {str(a): str(sim["layer_b"].values[int(np.nanargmax(row))]) for a, row in zip(sim["layer_a"].values, values)}
    numbers = {
        "cka": {str(a): {str(b): round(float(v), 4) for b, v in zip(sim["layer_b"].values, row)}
                for a, row in zip(sim["layer_a"].values, values)},
        "best_match": best, "estimator": sim.attrs["estimator"], "n_examples": int(sim.attrs["n_examples"]),
    }
    findings = {arch: diagnose(ds) for arch, ds in runs.items()}
    lines = [f"  linear CKA ({sim.attrs['estimator']} estimator, {sim.attrs['n_examples']} valid images); "
             f"store {store}",
             "  closest Inception v3 layer to each ResNet-50 layer: "
             + " ".join(f"{a}->{b} {numbers['cka'][a][b]:.2f}" for a, b in best.items())]
    for arch in runs:
        lines += [f"  {_TITLES[arch]} {line.strip()}" for line in findings_lines(findings[arch])]
    return Reproduction(
        name="cka-resnet-vs-inception",
        stores={"cka": store, **{arch: options.out / f"{arch}.zarr" for arch in runs}},
        figure=png, figure_html=page, numbers=numbers, findings=findings, command="", lines=lines,
        settings={**{arch: settings[arch] for arch in runs}, "cka": {
            "split": "valid", "reduce": "pool", "estimator": sim.attrs["estimator"], "layers_a": "resnet50 probe layers",
            "layers_b": "inception_v3 probe layers"}},
    )
