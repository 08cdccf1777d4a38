"""``random-init``: an untrained 128-layer ReLU MLP, probed once: separability degrades with depth.

Probes through :func:`probekit.engine.probe`; never imports argparse.
"""

from __future__ import annotations

import math

from probekit.diagnosis import diagnose
from probekit.experiments.reproduction import (
    Options, Reproduction, errors, findings_lines, profile_line, seed, side_by_side,
)

__all__ = ["DESCRIPTION", "run"]

DESCRIPTION = (
    "an untrained 128-layer ReLU MLP on the easy digits: linear separability degrades with depth until the "
    "deep layers are no better than chance (paper, untrained deep networks)"
)


def run(options: Options) -> Reproduction:
    """Probe an untrained 128-layer ReLU MLP once: separability by depth at initialisation.

    Example:
        >>> run(Options(out=Path("runs"), dataset="digits", pretrained=False, full=False, quick=True,
        ...             device=None, quiet=True)).numbers["first_chance_layer"]
    """
    from probekit import plots, zoo
    from probekit.engine import probe

    splits = options.splits(limit=options.real_limit)
    info = splits.info
    depth = 32 if options.quick else 128
    seed()
    model = zoo.bypass_mlp(depth=depth, width=128, skip=None, activation="relu", in_features=math.prod(info.input_shape),
                           num_classes=info.num_classes)
    hidden = [f"layers.{i}" for i in range(depth)]
    layers = ["input", *hidden[::2], "output"] if options.quick else list(model.probe_layers)
    store = options.out / "random-init.zarr"
    options.log(f"random-init: untrained {depth}-layer ReLU MLP on {info.name} {splits.sizes()}, {len(layers)} probes")
    ds = probe(model, splits, layers=layers, store=store, overwrite=True, device=options.device, quiet=True,
               model_name="untrained_mlp", dataset_name=info.name, step=0)
    findings = diagnose(ds)
    chart = side_by_side(plots.depth_profile(ds, splits=("train", "valid")),
                          plots.diagnosis_overlay(ds, findings.to_frame()))
    png, page = options.save_figure(chart, "random-init")
    by_layer = errors(ds)
    chance = findings.of("chance_level")
    numbers = {
        "valid_error": by_layer,
        "chance_error": round(float(ds.attrs["chance_error"]), 4),
        "first_chance_layer": chance[0].first if len(chance) else None,
        "worst_hidden_layer": max((layer for layer in by_layer if layer in hidden), key=by_layer.get),
    }
    lines = [f"  valid error by depth: {profile_line(by_layer)}", *findings_lines(findings)]
    return Reproduction(
        name="random-init", stores={"random-init": store}, figure=png, figure_html=page, numbers=numbers,
        findings={"random-init": findings}, command="", lines=lines,
        settings={"model": "bypass_mlp", "depth": depth, "width": 128, "skip": None, "activation": "relu",
                  "init": "Glorot-uniform weights, zero biases", "trained": False, "dataset": info.name,
                  "sizes": splits.sizes(), "layers": layers},
    )
