"""Figure 1: the pass that feeds every default probe point vs the bare model forward.

Same model (random weights, eval mode), same batch, same precision (float32)
and memory format (channels-last, what ``pk.probe`` uses on the CPU). The
probekit side is :func:`probekit.engine.features.extract` over that one batch: the
traced graph with every reducer inserted after its node, the finiteness
check and the in-memory cache, i.e. everything ``pk.probe`` does per batch.
"""

from __future__ import annotations

import torch

from benchmarks.measure import Row, interleave
from benchmarks.workloads import NUM_CLASSES, SIZES, build, images
from probekit.engine import plan
from probekit.engine.extract import build_extractor
from probekit.engine.features import extract

CONFIG = {
    "quick": {"batch": 1, "reps": 1, "models": {"resnet50": 224, "inception_v3": 299}},
    "full": {"batch": 32, "reps": 9, "models": SIZES},
}


def extraction_pair(name: str, size: int, batch: int):
    """The bare forward and probekit's extraction of one batch, as two callables."""
    model = build(name)
    x, y = images(batch, size)
    probe_plan = plan(model, x[:2], num_classes=NUM_CLASSES)
    model = model.to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    extractor = build_extractor(probe_plan.graph, probe_plan.reducers)
    dims = {n: r.out_features for n, r in probe_plan.reducers.items()}

    def bare():
        with torch.no_grad():
            return model(x)

    def probed():
        return extract(extractor, (x, y), name="valid", dims=dims, num_classes=NUM_CLASSES, batch_size=batch,
                       device=torch.device("cpu"))

    return bare, probed, probe_plan


def run(size: str) -> list[Row]:
    config = CONFIG[size]
    rows = []
    for name, pixels in config["models"].items():
        bare, probed, probe_plan = extraction_pair(name, pixels, config["batch"])
        pairs = interleave(bare, probed, reps=config["reps"])
        batch = config["batch"]
        rows.append(Row(
            figure="1 extraction", case=f"{name} {pixels}px, batch {batch}, {len(probe_plan.layers)} points",
            baseline="bare forward", baseline_value=pairs.baseline_median, probekit_value=pairs.candidate_median,
            unit="s/batch", target=1.15,
            note=f"bare {batch / pairs.baseline_median:.1f} img/s, "
                 f"probekit {batch / pairs.candidate_median:.1f} img/s",
            pair_ratio=pairs.ratio, extra={**pairs.as_dict(), "layers": probe_plan.layers,
                   "reductions": {n: r.describe() for n, r in probe_plan.reducers.items()}},
        ))
    return rows
