"""Figure 7 (a lent GPU): bf16-autocast throughput of the bare forward vs probekit's extraction,
probe-fitting throughput, and a whole end-to-end probe. Run through ``benchmarks/gpu.sh``.

Extraction: ResNet-50 (224 px) and Inception v3 (299 px), random weights, batch 256,
channels-last, ``torch.autocast("cuda", torch.bfloat16)`` on both sides; the
probekit side is :func:`probekit.engine.features.extract` with ``autocast``. Times
are CUDA-synchronised, interleaved and repeated; peak GPU memory is
``torch.cuda.max_memory_allocated`` of each side alone.

Fitting: :func:`probekit.engine.probes.fit_probes` (at its defaults: the L2 path
and the refit) on synthetic cached features already on the device, one layer
and all 17 ResNet-50 layers; the host synchronisations of a whole fit, counted
with ``torch.cuda.set_sync_debug_mode("warn")`` (the solver reads its
convergence flags every few rounds, never per iteration); and the valid error of
the device's fit against the CPU's on the same features (target: within 0.5
point).

End to end: :func:`probekit.probe` on Inception v3 with its 17 default probe
points over 50,000 synthetic 299-px images (40,000 train, 10,000 valid), tracing,
extraction, every fit and the store included, against the bare bf16 forward over
the same images. The images are generated on the device a batch at a time (the
same images for both sides), so neither host memory nor host-to-device copies
set the pace. ``probekit.probe`` runs with ``autocast="bf16"`` (its fits read
float32 features); the bare float32 forward over the same images is recorded
beside it.
Each side runs once, after a warm-up of both at a few hundred images.

``--smoke`` runs every row at toy size (under a minute on a GPU); the full run
is sized to about five minutes of device time at most.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler

from benchmarks.measure import Row, interleave, load_average, machine
from benchmarks.workloads import NUM_CLASSES, SIZES, _patterns, build, feature_split, images
from benchmarks.fitting import RESNET50_DIMS
from probekit.engine import plan
from probekit.engine.extract import build_extractor
from probekit.engine.features import extract
from probekit.engine.probes import fit_probes

import probekit as pk

#: Sizes of the full run and of ``--smoke``; any size flag given on the command line wins.
PRESETS = {
    "full": {"batch": 256, "reps": 10, "fit_examples": 20_000, "e2e_images": 50_000},
    "smoke": {"batch": 16, "reps": 2, "fit_examples": 2_000, "e2e_images": 512},
}
E2E_MODEL = "inception_v3"
#: The end-to-end row's wall-time goal for the probekit side on an H200 (full size).
E2E_WALL_TARGET_S = 30.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _synced(fn, device: torch.device):
    def run():
        value = fn()
        _sync(device)
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


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def extraction_rows(models: dict, batch: int, reps: int, device: torch.device) -> list[Row]:
    rows = []
    for name, size in SIZES.items():
        model = models[name]
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
            baseline_value=pairs.baseline_median, probekit_value=pairs.candidate_median, unit="s/batch", target=1.10,
            note=f"bare {batch / pairs.baseline_median:,.0f} img/s, probekit {batch / pairs.candidate_median:,.0f} img/s; "
                 f"peak GPU memory bare {memory['bare_mib']:,.0f} MiB, probekit {memory['probekit_mib']:,.0f} MiB",
            pair_ratio=pairs.ratio, extra={"kind": "extraction", **pairs.as_dict(), **memory},
        ))
        del extractor, x, probe_plan
        _free(device)
    return rows


def _host_syncs(fn, device: torch.device) -> tuple[object, int | None]:
    """``fn()`` and how many times it made the host wait for the GPU (None on the CPU, which never waits)."""
    if device.type != "cuda":
        return fn(), None
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            result = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return result, sum("synchroniz" in str(w.message) for w in caught)


def _valid_error(fits: dict, valid: dict) -> float:
    errors = [float((fits[k].logits(x.to(fits[k].weight.device)).argmax(1).cpu() != y).float().mean())
              for k, (x, y) in valid.items()]
    return sum(errors) / len(errors)


def fitting_rows(n: int, device: torch.device) -> list[Row]:
    """Fitting throughput on the device, the host syncs of a fit, and the device's answer against the CPU's."""
    rows = []
    cases = {"1 layer x 2,048": [2048], "1 layer x 8,192": [8192], "all 17 ResNet-50 layers": RESNET50_DIMS}
    warm = feature_split(256, 64, layer_seed=0, sample_seed=1)
    fit_probes({"w": warm[0].to(device)}, warm[1].to(device), NUM_CLASSES)
    for case, dims in cases.items():
        layers = {f"layer{i}": feature_split(n, d, layer_seed=100 + i, sample_seed=1) for i, d in enumerate(dims)}
        valid = {f"layer{i}": feature_split(max(n // 4, 200), d, layer_seed=100 + i, sample_seed=2)
                 for i, d in enumerate(dims)}
        labels = next(iter(layers.values()))[1].to(device)
        features = {k: v[0].to(device) for k, v in layers.items()}
        _sync(device)
        start = time.perf_counter()
        fits = _synced(lambda: fit_probes(features, labels, NUM_CLASSES), device)()
        seconds = time.perf_counter() - start
        _, syncs = _host_syncs(lambda: _synced(lambda: fit_probes(features, labels, NUM_CLASSES), device)(), device)
        iterations = sorted(f.iterations + f.path_iterations for f in fits.values())
        rows.append(Row(
            figure="7 gpu", case=f"fit {case}, {n:,} examples", baseline="-", baseline_value=float("nan"),
            probekit_value=seconds, unit="s", target=None,
            note=f"{n * len(dims) / seconds:,.0f} example-probes/s; iterations (path and refit) {iterations}; "
                 f"host syncs of the whole fit: {syncs if syncs is not None else '- (cpu)'}",
            extra={"kind": "fitting", "seconds": seconds, "dims": dims, "n": n, "host_syncs": syncs,
                   "iterations": iterations},
        ))
        if case == "1 layer x 2,048":  # the device's answer against the CPU's, same features
            on_cpu = fit_probes({k: v[0] for k, v in layers.items()}, labels.cpu(), NUM_CLASSES)
            gap = abs(_valid_error(fits, valid) - _valid_error(on_cpu, valid))
            rows.append(Row(
                figure="7 gpu", case=f"fit {case}, {n:,} examples: {device.type} against cpu", baseline="cpu fit",
                baseline_value=100 * _valid_error(on_cpu, valid), probekit_value=100 * _valid_error(fits, valid),
                unit="% valid error", target=None,
                note=f"gap {100 * gap:.2f} pt (target <= 0.5); chosen l2 {device.type} "
                     f"{[f.l2 for f in fits.values()]}, cpu {[f.l2 for f in on_cpu.values()]}",
                extra={"kind": "agreement", "gap_pt": 100 * gap, "target_pt": 0.5},
            ))
        del features, layers, labels, fits
        _free(device)
    return rows


class DeviceImages(Dataset):
    """``n`` class-pattern-plus-noise images made on ``device``, one batch per item.

    Indexed by a list of example indices (a batch sampler's), it returns that
    batch, channels-last, generated from a seed of the batch's first index: the
    same images at every pass, with nothing held in host or device memory.
    """

    def __init__(self, n: int, size: int, device: torch.device, *, seed: int = 0, signal: float = 0.5):
        self.n, self.size, self.device, self.seed = n, size, device, seed
        self.patterns = (signal * _patterns(size, 0)).to(device)
        self.targets = torch.arange(n) % NUM_CLASSES

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator(self.device).manual_seed(self.seed * 1_000_003 + int(rows[0]))
        y = self.targets[torch.as_tensor(rows)]
        # (n, H, W, 3) permuted to NCHW: channels-last strides from the start, as both sides run.
        x = torch.randn(len(rows), self.size, self.size, 3, generator=generator, device=self.device).permute(0, 3, 1, 2)
        x.add_(self.patterns[y.to(self.device)])
        return x, y


def stream(n: int, size: int, batch: int, device: torch.device, *, seed: int) -> DataLoader:
    data = DeviceImages(n, size, device, seed=seed)
    return DataLoader(data, sampler=BatchSampler(SequentialSampler(data), batch, drop_last=False), batch_size=None)


def _bare_pass(model, splits: dict, device: torch.device, dtype: torch.dtype | None) -> None:
    mixed = torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)
    with torch.no_grad(), mixed:
        for loader in splits.values():
            for x, _ in loader:
                model(x)
    _sync(device)


def end_to_end_row(model, n: int, batch: int, device: torch.device, *, size: int = SIZES[E2E_MODEL]) -> Row:
    valid_n = n // 5
    train_n = n - valid_n
    model = model.to(device, memory_format=torch.channels_last)
    tmp = tempfile.TemporaryDirectory(prefix="probekit-gpu-")
    store = Path(tmp.name) / "run.zarr"
    # Features of 17 points stay on the device (about 11 GiB at full size), as they would for a user who
    # gives the cache room; the default limit would send them to disk.
    cache_bytes = 64 * 2**30 if device.type == "cuda" else None
    options = {"store": store, "overwrite": True, "quiet": True, "batch_size": batch, "num_classes": NUM_CLASSES,
               "device": device, "channels_last": True, "autocast": "bf16"}
    if cache_bytes is not None:
        options["cache_bytes"] = cache_bytes

    def splits(train: int, valid: int, seed: int) -> dict:
        return {"train": stream(train, size, batch, device, seed=seed),
                "valid": stream(valid, size, batch, device, seed=seed + 1)}

    def warm(k: int) -> int:  # a few batches, with the same last partial batch as the timed run
        return min(k, max(NUM_CLASSES, batch + k % batch))

    try:
        few = splits(warm(train_n), warm(valid_n), seed=10)
        _bare_pass(model, few, device, torch.bfloat16)
        _bare_pass(model, few, device, None)
        pk.probe(model, few, **options)
        _sync(device)
        data = splits(train_n, valid_n, seed=1)
        start = time.perf_counter()
        _bare_pass(model, data, device, torch.bfloat16)
        bare_s = time.perf_counter() - start
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        ds = pk.probe(model, data, **options)
        _sync(device)
        probe_s = time.perf_counter() - start
        peak_mib = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        start = time.perf_counter()
        _bare_pass(model, data, device, None)
        fp32_s = time.perf_counter() - start
    finally:
        tmp.cleanup()
    layers = int(ds.sizes["layer"])
    converged = bool(ds.converged.all())
    return Row(
        figure="7 gpu",
        case=f"{E2E_MODEL} {size}px end to end, {train_n:,}+{valid_n:,} images, {layers} layers, batch {batch}",
        baseline="bare bf16 forward over the data", baseline_value=bare_s, probekit_value=probe_s, unit="s",
        target=1.3,
        note=f"wall: bare bf16 {bare_s:.1f} s ({n / bare_s:,.0f} img/s), pk.probe {probe_s:.1f} s "
             f"(goal under {E2E_WALL_TARGET_S:.0f} s on an H200), both bf16; "
             f"bare float32 forward {fp32_s:.1f} s; peak GPU memory {peak_mib:,.0f} MiB; "
             f"all converged: {converged}",
        extra={"kind": "end-to-end", "bare_s": bare_s, "probekit_s": probe_s, "bare_fp32_s": fp32_s,
               "wall_target_s": E2E_WALL_TARGET_S, "images": n, "train": train_n, "valid": valid_n, "layers": layers,
               "converged": converged, "peak_mib": peak_mib,
               "valid_error": [float(v) for v in ds.probe.sel(metric="valid_error").squeeze("epoch").values]},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu.sh", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="every row at toy size (under a minute on a GPU)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (256; smoke 16)")
    parser.add_argument("--reps", type=int, default=None, help="timed pairs per extraction row (10; smoke 2)")
    parser.add_argument("--fit-examples", type=int, default=None, help="examples per fitting row (20,000; smoke 2,000)")
    parser.add_argument("--e2e-images", type=int, default=None,
                        help="images of the end-to-end probe, a fifth of them valid (50,000; smoke 512)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu.json"))
    parser.add_argument("--device", default="cuda", help="'cpu' only to check this script on a machine without a GPU")
    args = parser.parse_args(argv)
    sizes = dict(PRESETS["smoke" if args.smoke else "full"])
    for key in sizes:
        if getattr(args, key) is not None:
            sizes[key] = getattr(args, key)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.sh needs a CUDA device; torch.cuda.is_available() is False here")
    torch.backends.cudnn.benchmark = True
    from benchmarks.run import print_table

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    clock = time.perf_counter()
    seconds = {}
    models = {name: build(name) for name in SIZES}
    seconds["build"] = time.perf_counter() - clock
    rows = []
    for section, make in (
        ("extraction", lambda: extraction_rows(models, sizes["batch"], sizes["reps"], device)),
        ("fitting", lambda: fitting_rows(sizes["fit_examples"], device)),
        ("end-to-end", lambda: [end_to_end_row(models[E2E_MODEL], sizes["e2e_images"], sizes["batch"], device)]),
    ):
        start = time.perf_counter()
        rows += make()
        seconds[section] = time.perf_counter() - start
        print(f"{section} rows: {seconds[section]:.1f} s", flush=True)
    seconds["total"] = time.perf_counter() - clock
    print_table(rows)
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in seconds.items()))
    bad = [r.case for r in rows if not math.isfinite(r.probekit_value)]
    if bad:
        print(f"non-finite values: {bad}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"started": started, "machine": machine(), "load_average": load_average(),
                                    "smoke": args.smoke, "sizes": sizes, "seconds": seconds,
                                    "rows": [r.as_dict() for r in rows]}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
