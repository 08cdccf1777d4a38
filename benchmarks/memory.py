"""Figure 4: peak resident memory of ``pk.probe`` vs the bare forward, one fresh process each.

Both children import the same modules (torch, torchvision, probekit) and
build the same model before the work starts, so the ratio measures the work:
the bare child streams the images through the model in batches; the probe
child runs ``pk.probe`` (every default probe point, store written) over the
same stream. Images are generated one at a time, so neither holds the data
set. The two children run side by side (that changes their speed, not their
peaks). Run as ``python -m benchmarks.memory`` it is one child (its job as a JSON argument).
"""

from __future__ import annotations

import time

from benchmarks.measure import Row, child_main, run_children, start_peak

CONFIG = {
    "quick": {"models": {"resnet50": 64}, "batch": 10, "train": 10, "valid": 10},
    "full": {"models": {"inception_v3": 299, "resnet50": 224}, "batch": 32, "train": 64, "valid": 32},
}


def _work(args: dict) -> dict:
    import tempfile
    from pathlib import Path

    import torch
    from torch.utils.data import DataLoader

    import probekit as pk
    from benchmarks.workloads import NUM_CLASSES, ImageStream, build
    import probekit.engine  # noqa: F401 - the same imports on both sides

    model = build(args["model"])
    train = ImageStream(args["train"], args["size"], seed=1)
    valid = ImageStream(args["valid"], args["size"], seed=2)
    ready = start_peak()
    start = time.perf_counter()
    if args["mode"] == "bare":
        model = model.to(memory_format=torch.channels_last)
        with torch.no_grad():
            for split in (train, valid):
                for x, _ in DataLoader(split, batch_size=args["batch"]):
                    model(x.contiguous(memory_format=torch.channels_last))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            pk.probe(model, {"train": train, "valid": valid}, store=Path(tmp) / "run.zarr", quiet=True,
                     batch_size=args["batch"], num_classes=NUM_CLASSES)
    return {"ready_mib": ready, "seconds": time.perf_counter() - start}


def run(size: str) -> list[Row]:
    config = CONFIG[size]
    rows = []
    for name, pixels in config["models"].items():
        args = {"model": name, "size": pixels, "batch": config["batch"], "train": config["train"], "valid": config["valid"]}
        bare, probed = run_children("benchmarks.memory", [{**args, "mode": "bare"}, {**args, "mode": "probe"}])
        above = (probed["peak_rss_mib"] - probed["ready_mib"]) / max(bare["peak_rss_mib"] - bare["ready_mib"], 1e-9)
        rows.append(Row(
            figure="4 memory", case=f"{name} {pixels}px, batch {config['batch']}, {config['train']}+{config['valid']} images",
            baseline="bare forward peak RSS", baseline_value=bare["peak_rss_mib"], probekit_value=probed["peak_rss_mib"],
            unit="MiB", target=1.25,
            note=f"above the ready process (imports + model): bare {bare['peak_rss_mib'] - bare['ready_mib']:.0f} MiB, "
                 f"probekit {probed['peak_rss_mib'] - probed['ready_mib']:.0f} MiB ({above:.2f}x)",
            extra={"bare": bare, "probekit": probed, "ratio_above_ready": above},
        ))
    return rows


if __name__ == "__main__":
    child_main(_work)
