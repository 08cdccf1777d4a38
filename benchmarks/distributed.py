"""Figure 10: data-parallel probing, 1 -> 2 processes on the CPU with gloo (extraction plus fitting).

``pk.probe`` of the paper's convnet on the embedded digits (every layer, the
default ``l2="auto"`` and ``reduce="auto"``), timed inside each process around
the call alone (after one warm-up call), in three set-ups started one after
another as fresh processes: one process with one thread (the baseline), one
process with two threads, and two processes of one thread each under
``torchrun --standalone`` (gloo). The rows give the scaling (two processes
against each one-process set-up; perfect scaling halves the one-thread time)
and its cost: the share of the two-process call spent in probekit's
collectives (all-reduces, gathers and broadcasts, timed on rank 0), and the
largest gap in any layer's error between one and two processes, in examples.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measure import ROOT, Row

CONFIG = {
    "quick": {"size": 8, "limit": 200, "reps": 1},
    "full": {"size": 28, "limit": None, "reps": 3},
}
#: Most seconds one set-up may take before the figure fails.
_TIMEOUT = 1800


def _probe_once(config: dict):
    import torch

    import probekit as pk

    splits = pk.data.digits(size=config["size"], limit=config["limit"])
    torch.manual_seed(0)
    model = pk.zoo.paper_convnet(in_channels=1, num_classes=10, input_size=config["size"])
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        ds = pk.probe(model, splits, store=Path(tmp) / "run.zarr", quiet=True, device="cpu")
        return time.perf_counter() - start, ds


def child(config: dict, out: Path) -> None:
    """One process of a set-up: a warm-up call, then ``reps`` timed calls; rank 0 writes ``out`` (JSON)."""
    import torch.distributed as dist

    from probekit.engine import distributed

    comm = distributed.current()
    spent = {"seconds": 0.0}
    if comm is not None:  # time every collective probekit makes
        for name in ("all_reduce", "all_gather", "all_gather_object", "broadcast", "broadcast_object_list"):
            original = getattr(dist, name)

            def timed(*args, _original=original, **kwargs):
                start = time.perf_counter()
                try:
                    return _original(*args, **kwargs)
                finally:
                    spent["seconds"] += time.perf_counter() - start

            setattr(distributed.dist, name, timed)
    _probe_once(config)
    spent["seconds"] = 0.0
    seconds, ds = [], None
    for _ in range(config["reps"]):
        took, ds = _probe_once(config)
        seconds.append(took)
    if comm is None or comm.root:
        errors = {m: ds.probe.sel(metric=m).values[:, 0].tolist() for m in ds.metric.values if m.endswith("_error")}
        out.write_text(json.dumps({"seconds": seconds, "collectives": spent["seconds"] / config["reps"],
                                   "errors": errors, "sizes": {k: ds.attrs[f"n_{k}"] for k in ("train", "valid", "test")},
                                   "world_size": ds.attrs.get("world_size")}))


def _setup(config: dict, processes: int, threads: int, out: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launch = [sys.executable]
    if processes > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    command = [*launch, "-m", "benchmarks.distributed", json.dumps(config), str(out)]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"the {processes}-process set-up failed: {done.stderr[-2000:]}")
    return json.loads(out.read_text())


def run(size: str) -> list[Row]:
    config = CONFIG[size]
    with tempfile.TemporaryDirectory() as tmp:
        one = _setup(config, 1, 1, Path(tmp) / "one.json")
        one_two_threads = _setup(config, 1, 2, Path(tmp) / "threads.json")
        two = _setup(config, 2, 1, Path(tmp) / "two.json")
    median = lambda values: sorted(values)[len(values) // 2]  # noqa: E731
    t_one, t_threads, t_two = median(one["seconds"]), median(one_two_threads["seconds"]), median(two["seconds"])
    gap = max(abs(a - b) * two["sizes"][m.split("_")[0]]
              for m in two["errors"] for a, b in zip(two["errors"][m], one["errors"][m]))
    case = f"paper convnet, digits at {config['size']} px, {two['sizes']['train']} train examples"
    extra = {"one": one, "one_two_threads": one_two_threads, "two": two, "error_gap_examples": gap}
    return [
        Row(figure="11 distributed", case=f"{case}: 2 processes x 1 thread", baseline="1 process x 1 thread",
            baseline_value=t_one, probekit_value=t_two, unit="s", target=0.75,
            note=f"perfect scaling 0.5; largest error gap to 1 process: {gap:.0f} examples", extra=extra),
        Row(figure="11 distributed", case=f"{case}: 2 processes x 1 thread", baseline="1 process x 2 threads",
            baseline_value=t_threads, probekit_value=t_two, unit="s", target=1.0,
            note="the same two cores, shared by threads or by processes", extra=extra),
        Row(figure="11 distributed", case=f"{case}: collectives (rank 0)", baseline="2-process call",
            baseline_value=t_two, probekit_value=max(two["collectives"], 1e-9), unit="s", target=0.25,
            note="all-reduces, gathers and broadcasts, waiting for the other rank included", extra=extra),
    ]


if __name__ == "__main__":
    child(json.loads(sys.argv[1]), Path(sys.argv[2]))
