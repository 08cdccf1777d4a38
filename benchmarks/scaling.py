"""Figure 6: time and peak memory of ``pk.probe`` as probed layers and data grow.

ResNet-50 (random weights) on small class-structured images: the number of
probed layers at fixed data (1, 4, 16 and every probe point of the model),
then the data size at the 16 block outputs (x1, x4, x16). Time is the
``pk.probe`` call alone (extraction, fitting, store; the model is traced
once per call), measured in this process, configurations interleaved and
repeated; peak memory is that of a fresh child process per configuration.
Growth is linear when k times the layers or data costs at most k times as
much: each row is the ratio to the smallest configuration, with k as its
target.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from benchmarks.measure import Row, child_main, run_children, start_peak

CONFIG = {
    "quick": {"size": 32, "n": 10, "batch": 10, "reps": 1, "layers": (1, 16), "data": (1, 4), "parallel": 3},
    "full": {"size": 64, "n": 200, "batch": 50, "reps": 2, "layers": (1, 4, 16, "all"), "data": (1, 4, 16), "parallel": 2},
}
BLOCKS = [f"layer{s}.{b}" for s, n in enumerate((3, 4, 6, 3), start=1) for b in range(n)]
LAYERS = {1: ["layer4.2"], 4: ["layer1.2", "layer2.3", "layer3.5", "layer4.2"], 16: BLOCKS, "all": "all"}


def _data(args: dict) -> dict:
    from benchmarks.workloads import NUM_CLASSES, images

    n = args["n"]
    return {"train": images(n, args["size"], seed=1), "valid": images(max(n // 4, NUM_CLASSES), args["size"], seed=2)}


def _probe(model, data, args: dict):
    import probekit as pk

    with tempfile.TemporaryDirectory() as tmp:
        return pk.probe(model, data, layers=args["layers"], store=Path(tmp) / "run.zarr", quiet=True,
                        batch_size=args["batch"], num_classes=10)


def _work(args: dict) -> dict:
    import probekit.engine  # noqa: F401 - imported before "ready", as in the parent
    from benchmarks.workloads import build

    model, data = build("resnet50"), _data(args)
    ready = start_peak()
    ds = _probe(model, data, args)
    return {"ready_mib": ready, "layers": int(ds.sizes["layer"]), "features": int(ds.feature_dim.sum())}


def run(size: str) -> list[Row]:
    config = CONFIG[size]
    base = {"size": config["size"], "batch": config["batch"]}
    jobs = {("layers", k): {**base, "n": config["n"], "layers": LAYERS[k]} for k in config["layers"]}
    jobs |= {("data", k): {**base, "n": config["n"] * k, "layers": BLOCKS} for k in config["data"] if k != 1}
    memory = dict(zip(jobs, run_children("benchmarks.scaling", list(jobs.values()), parallel=config["parallel"])))
    from benchmarks.workloads import build

    model = build("resnet50")
    prepared = {key: (model, _data(job)) for key, job in jobs.items()}
    _probe(*prepared[("layers", 1)], jobs[("layers", 1)])  # warm-up: imports, first-call costs
    seconds: dict = {key: [] for key in jobs}
    for rep in range(config["reps"]):
        for key in (list(jobs) if rep % 2 == 0 else list(reversed(jobs))):
            start = time.perf_counter()
            _probe(*prepared[key], jobs[key])
            seconds[key].append(time.perf_counter() - start)
    # The data axis starts from the 16-layer run of the layers axis.
    for target, source in ((memory, memory), (seconds, seconds)):
        target[("data", 1)] = source[("layers", 16)]
    rows = []
    axes = {"layers": [("layers", k) for k in config["layers"]], "data": [("data", k) for k in sorted(config["data"])]}
    for axis, keys in axes.items():
        unit = "layers" if axis == "layers" else "images"
        first = keys[0]
        for key in keys:
            if axis == "layers":
                multiple = memory[key]["layers"] / memory[first]["layers"]
                case = f"{memory[key]['layers']} layers, {config['n']} images"
            else:
                multiple = key[1]
                case = f"16 layers, {config['n'] * key[1]} images"
            time_first, time_here = statistics.median(seconds[first]), statistics.median(seconds[key])
            mem_first = memory[first]["peak_rss_mib"] - memory[first]["ready_mib"]
            mem_here = memory[key]["peak_rss_mib"] - memory[key]["ready_mib"]
            extra = {"seconds": seconds[key], "memory": memory[key], "multiple": multiple, "axis": axis}
            rows.append(Row(figure="6 scaling", case=f"{case}: time", baseline=f"fewest {unit}", baseline_value=time_first,
                            probekit_value=time_here, unit="s", target=multiple,
                            note=f"x{multiple:g} the {unit}; linear allows x{multiple:g}", extra=extra))
            rows.append(Row(figure="6 scaling", case=f"{case}: memory", baseline=f"fewest {unit}",
                            baseline_value=mem_first, probekit_value=mem_here, unit="MiB", target=multiple,
                            note=f"peak above the ready process; peak {memory[key]['peak_rss_mib']:.0f} MiB in all, "
                                 f"{memory[key]['features']:,} probe features", extra=extra))
    return rows


if __name__ == "__main__":
    child_main(_work)
