"""Figure 3: a whole snapshot probe vs one bare forward pass over the same data.

``pk.probe`` on a fixed ResNet-50 with its default probe points does
everything a user waits for: tracing, one forward pass over train and valid
with every reducer, caching, fitting every layer's probe to its optimum,
scoring, and writing the Zarr store. The baseline is the bare model forward
over the same images, batch size and memory format (channels-last).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from benchmarks.measure import Row, interleave
from benchmarks.workloads import NUM_CLASSES, build, images

import probekit as pk

CONFIG = {
    "quick": {"size": 64, "train": 20, "valid": 10, "batch": 10, "reps": 1},
    "full": {"size": 224, "train": 512, "valid": 128, "batch": 32, "reps": 3},
}


def run(size: str) -> list[Row]:
    config = CONFIG[size]
    model = build("resnet50")
    train = images(config["train"], config["size"], seed=1)
    valid = images(config["valid"], config["size"], seed=2)
    batch = config["batch"]
    tmp = tempfile.TemporaryDirectory(prefix="probekit-bench-")
    store = Path(tmp.name) / "run.zarr"
    channels_last = model.to(memory_format=torch.channels_last)

    def bare():
        with torch.no_grad():
            for x, _ in (train, valid):
                for start in range(0, len(x), batch):
                    channels_last(x[start:start + batch].contiguous(memory_format=torch.channels_last))

    results = {}

    def probed():
        results["ds"] = pk.probe(model, {"train": train, "valid": valid}, store=store, overwrite=True, quiet=True,
                                 batch_size=batch, num_classes=NUM_CLASSES)

    try:
        # Warm-up on a few images: first-call costs (imports, thread pools) are not the figure.
        few = {"train": (train[0][:NUM_CLASSES], train[1][:NUM_CLASSES]), "valid": (valid[0][:2], valid[1][:2])}
        pk.probe(model, few, store=store, overwrite=True, quiet=True, batch_size=batch, num_classes=NUM_CLASSES)
        with torch.no_grad():
            channels_last(few["train"][0].contiguous(memory_format=torch.channels_last))
        pairs = interleave(bare, probed, reps=config["reps"], warmup=False)
    finally:
        tmp.cleanup()
    ds = results["ds"]
    n = config["train"] + config["valid"]
    valid_error = ds.probe.sel(metric="valid_error").squeeze("epoch")
    return [Row(
        figure="3 snapshot", case=f"resnet50 {config['size']}px, {config['train']}+{config['valid']} images, {ds.sizes['layer']} layers",
        baseline="bare forward over the data", baseline_value=pairs.baseline_median,
        probekit_value=pairs.candidate_median, unit="s", target=1.5,
        note=f"{n / pairs.baseline_median:.1f} img/s bare; "
             f"all converged: {bool(ds.converged.all())}",
        pair_ratio=pairs.ratio, extra={**pairs.as_dict(),
               "valid_error": {str(k): float(v) for k, v in zip(ds.layer.values, valid_error.values)},
               "iterations": {str(k): int(v) for k, v in zip(ds.layer.values, ds.iterations.squeeze("epoch").values)}},
    )]
