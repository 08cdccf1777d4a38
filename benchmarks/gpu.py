"""Figure 7 (a lent GPU): bf16-autocast throughput of the bare forward vs probekit's extraction,
and probe-fitting throughput. Run through ``benchmarks/gpu.sh``.

ResNet-50 (224 px) and Inception v3 (299 px), random weights, batch 256,
channels-last, ``torch.autocast("cuda", torch.bfloat16)`` on both sides; the
probekit side is :func:`probekit.engine.features.extract` with ``autocast``. Times
are CUDA-synchronised, interleaved and repeated; peak GPU memory is
``torch.cuda.max_memory_allocated`` of each side alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.measure import Row, interleave, load_average, machine
from benchmarks.workloads import NUM_CLASSES, SIZES, build, feature_split, images
from benchmarks.fitting import RESNET50_DIMS
from probekit.engine import plan
from probekit.engine.extract import build_extractor
from probekit.engine.features import extract
from probekit.engine.probes import fit_probes


def _synced(fn, device: torch.device):
    def run():
        value = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return value
    return run


def _peak(fn, device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def extraction_rows(batch: int, reps: int, device: torch.device) -> list[Row]:
    rows = []
    for name, size in SIZES.items():
        model = build(name)
        x, y = images(batch, size)
        probe_plan = plan(model, x[:2], num_classes=NUM_CLASSES)
        model = model.to(device, memory_format=torch.channels_last)
        for reducer in probe_plan.reducers.values():
            reducer.to(device)
        extractor = build_extractor(probe_plan.graph, probe_plan.reducers)
        x = x.to(device).contiguous(memory_format=torch.channels_last)
        dims = {n: r.out_features for n, r in probe_plan.reducers.items()}

        def bare():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                return model(x)

        def probed():
            return extract(extractor, (x, y), name="valid", dims=dims, num_classes=NUM_CLASSES, batch_size=batch,
                           device=device, autocast=torch.bfloat16)

        pairs = interleave(_synced(bare, device), _synced(probed, device), reps=reps)
        memory = {"bare_mib": _peak(bare, device), "probekit_mib": _peak(probed, device)}
        rows.append(Row(
            figure="7 gpu", case=f"{name} {size}px, batch {batch}, bf16 autocast", baseline="bare forward",
            baseline_value=pairs.baseline_median, probekit_value=pairs.candidate_median, unit="s/batch", target=1.15,
            note=f"bare {batch / pairs.baseline_median:,.0f} img/s, probekit {batch / pairs.candidate_median:,.0f} img/s; "
                 f"peak GPU memory bare {memory['bare_mib']:,.0f} MiB, probekit {memory['probekit_mib']:,.0f} MiB",
            pair_ratio=pairs.ratio, extra={**pairs.as_dict(), **memory},
        ))
        del model, extractor, x
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def fitting_rows(n: int, device: torch.device) -> list[Row]:
    rows = []
    cases = {"1 layer x 2,048": [2048], "1 layer x 8,192": [8192], "all 17 ResNet-50 layers": RESNET50_DIMS}
    warm = feature_split(256, 64, layer_seed=0, sample_seed=1)
    fit_probes({"w": warm[0].to(device)}, warm[1].to(device), NUM_CLASSES)
    for case, dims in cases.items():
        layers = {f"layer{i}": feature_split(n, d, layer_seed=100 + i, sample_seed=1) for i, d in enumerate(dims)}
        labels = next(iter(layers.values()))[1].to(device)
        features = {k: v[0].to(device) for k, v in layers.items()}
        start = time.perf_counter()
        fits = _synced(lambda: fit_probes(features, labels, NUM_CLASSES), device)()
        seconds = time.perf_counter() - start
        rows.append(Row(
            figure="7 gpu", case=f"fit {case}, {n:,} examples", baseline="-", baseline_value=float("nan"),
            probekit_value=seconds, unit="s", target=None,
            note=f"{n * len(dims) / seconds:,.0f} example-probes/s; iterations "
                 f"{sorted(f.iterations for f in fits.values())}",
            extra={"seconds": seconds, "dims": dims, "n": n},
        ))
        del features, layers
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--fit-examples", type=int, default=20_000)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    parser.add_argument("--device", default="cuda", help="'cpu' only to check this script on a machine without a GPU")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.sh needs a CUDA device; torch.cuda.is_available() is False here")
    torch.backends.cudnn.benchmark = True
    from benchmarks.run import print_table

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    rows = extraction_rows(args.batch, args.reps, device) + fitting_rows(args.fit_examples, device)
    print_table(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"started": started, "machine": machine(), "load_average": load_average(),
                                    "rows": [r.as_dict() for r in rows]}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
