"""How every figure is measured: side-by-side ratios, child-process memory peaks, the machine.

These machines are shared and noisy, so no figure is an absolute time: each
is the ratio of probekit to a baseline measured in the same process, the two
interleaved (ABBA order, so that drift hits both alike), repeated, and the
median of the per-pair ratios reported. Peak memory is the maximum resident
set size of a fresh child process per measurement, so that peaks never
contaminate each other.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Row:
    """One line of the table: a probekit cost against its baseline."""

    figure: str
    case: str
    baseline: str
    baseline_value: float
    probekit_value: float
    unit: str
    target: float | None = None  # the ratio probekit / baseline must not exceed this
    better: str = "lower"  # "higher" when a larger probekit value is better (throughput)
    note: str = ""
    extra: dict = field(default_factory=dict)
    #: The median of per-pair ratios when the two sides were timed in interleaved pairs.
    pair_ratio: float | None = None
    #: False when probekit's answer is off the baseline's by more than the figure allows.
    accurate: bool = True

    @property
    def ratio(self) -> float:
        if self.pair_ratio is not None:
            return self.pair_ratio
        if self.baseline_value == 0:
            return float("nan")
        return self.probekit_value / self.baseline_value

    @property
    def met(self) -> bool | None:
        if self.target is None:
            return None
        return self.ratio <= self.target and self.accurate

    def as_dict(self) -> dict:
        return {
            "figure": self.figure, "case": self.case, "baseline": self.baseline,
            "baseline_value": self.baseline_value, "probekit_value": self.probekit_value, "unit": self.unit,
            "ratio": self.ratio, "target": self.target, "met": self.met, "note": self.note, **self.extra,
        }


@dataclass
class Pairs:
    """Interleaved timings of a baseline and a candidate, and their per-pair ratios."""

    baseline: list[float]
    candidate: list[float]

    @property
    def ratios(self) -> list[float]:
        return [c / b for b, c in zip(self.baseline, self.candidate)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)

    @property
    def baseline_median(self) -> float:
        return statistics.median(self.baseline)

    @property
    def candidate_median(self) -> float:
        return statistics.median(self.candidate)

    def as_dict(self) -> dict:
        return {"baseline_s": self.baseline, "probekit_s": self.candidate, "pair_ratios": self.ratios}


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def interleave(baseline: Callable[[], object], candidate: Callable[[], object], *, reps: int, warmup: bool = True) -> Pairs:
    """Time ``baseline`` and ``candidate`` ``reps`` times each, alternating ABBA, after one warm-up of each."""
    if warmup:
        baseline()
        candidate()
    base, cand = [], []
    for rep in range(reps):
        if rep % 2 == 0:
            base.append(timed(baseline)[0])
            cand.append(timed(candidate)[0])
        else:
            cand.append(timed(candidate)[0])
            base.append(timed(baseline)[0])
    return Pairs(base, cand)


def run_children(module: str, jobs: list[dict], *, parallel: int = 2, timeout: float = 3600) -> list[dict]:
    """Run ``python -m module`` once per job, in fresh processes, ``parallel`` at a time.

    Each child gets its job as a JSON argument and prints one JSON object as
    the last line of its output, with its own peak resident set size (see
    :func:`child_main`): running children side by side does not change any
    child's peak, only their speed, so only memory is read from them.
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    answers: list[dict | None] = [None] * len(jobs)
    pending = list(enumerate(jobs))
    running: list[tuple[int, dict, subprocess.Popen]] = []
    deadline = time.monotonic() + timeout
    while pending or running:
        while pending and len(running) < parallel:
            index, job = pending.pop(0)
            proc = subprocess.Popen([sys.executable, "-m", module, json.dumps(job)], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
            running.append((index, job, proc))
        index, job, proc = running.pop(0)
        try:
            stdout, stderr = proc.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for _, _, other in running + [(index, job, proc)]:
                other.kill()
            raise
        if proc.returncode != 0:
            for _, _, other in running:
                other.kill()
            raise RuntimeError(f"benchmark child {module} {job} failed:\n{stderr[-3000:]}")
        answers[index] = json.loads(stdout.strip().splitlines()[-1])
    return answers


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise OSError(f"no {field} in /proc/self/status")


def start_peak() -> float:
    """Resident memory now (MiB), and restart the peak count from here.

    Linux resets the peak resident set size (``VmHWM``) when 5 is written to
    ``/proc/self/clear_refs``, so what :func:`child_main` reports is the peak
    of the work alone, not of building the model before it.
    """
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_mib("VmRSS")


def child_main(work: Callable[[dict], dict]) -> None:
    """Entry point of a child: read the JSON job argument, run ``work``, print its answer with the peak RSS.

    ``work`` calls :func:`start_peak` once everything both sides share is in
    memory and returns that value as ``ready_mib``.
    """
    args = json.loads(sys.argv[1] if len(sys.argv) > 1 else "{}")
    answer = work(args)
    answer["peak_rss_mib"] = _status_mib("VmHWM")
    print(json.dumps(answer))


def machine() -> dict:
    """What the figures were measured on."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as handle:
            memory = round(int(handle.readline().split()[1]) / 2**20, 1)
    except OSError:
        memory = None
    return {
        "cpu": cpu, "cores": os.cpu_count(), "memory_gib": memory, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []
