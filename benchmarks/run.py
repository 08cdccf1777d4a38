"""The benchmark suite's entry point: ``python -m benchmarks [--quick] [--only 1,2] [--out FILE]``.

Runs the figures of issue 5 (see ``benchmarks/README.md``), prints one table
and writes every figure, with its raw timings, the machine and the load
average, as JSON (default ``benchmarks/results/{quick,full}.json``).
``--quick`` is a smoke-sized run (about a minute on 2 idle cores; its ratios
are not the reported figures); the default is the full size.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import time
from pathlib import Path

from benchmarks.measure import ROOT, Row, load_average, machine

FIGURES = {
    "1": "benchmarks.extraction",
    "2": "benchmarks.fitting",
    "3": "benchmarks.snapshot",
    "4": "benchmarks.memory",
    "5": "benchmarks.monitoring",
    "6": "benchmarks.scaling",
    "8": "benchmarks.notebooks",
    "10": "benchmarks.many_runs",
    "11": "benchmarks.distributed",
}


def _number(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


def table(rows: list[Row], *, markdown: bool = False) -> str:
    header = ["figure", "case", "baseline", "unit", "baseline", "probekit", "ratio", "target", "met", "note"]
    lines = []
    for row in rows:
        met = {True: "yes", False: "NO", None: "-"}[row.met]
        target = f"<= {_number(row.target)}" if row.target is not None else "-"
        lines.append([row.figure, row.case, row.baseline, row.unit, _number(row.baseline_value),
                      _number(row.probekit_value), f"{row.ratio:.3f}" if not math.isnan(row.ratio) else "-", target, met,
                      row.note])
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(cell.replace("|", "/") for cell in line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header[:-1])]
    fmt = "  ".join(f"{{:{'<' if i < 4 else '>'}{w}}}" for i, w in enumerate(widths)) + "  {}"
    return "\n".join([fmt.format(*header), *(fmt.format(*line) for line in lines)])


def print_table(rows: list[Row]) -> None:
    print(table(rows), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke-sized run (about a minute)")
    size.add_argument("--full", action="store_true", help="full size (the default; tens of minutes)")
    parser.add_argument("--only", default=",".join(FIGURES), help="figures to run, e.g. '1,2' (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (default benchmarks/results/SIZE.json)")
    parser.add_argument("--markdown", action="store_true", help="also print the table as Markdown (for the README)")
    args = parser.parse_args(argv)
    size_name = "quick" if args.quick else "full"
    wanted = [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in FIGURES]
    if unknown:
        parser.error(f"unknown figure(s) {unknown}; choose from {', '.join(FIGURES)} (figure 7 is benchmarks/gpu.sh)")
    out = args.out or ROOT / "benchmarks" / "results" / f"{size_name}.json"
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    info = machine()
    print(f"probekit benchmarks ({size_name}) {started} on {info['cpu']}, {info['cores']} cores, "
          f"torch {info['torch']} ({info['torch_threads']} threads); load average {load_average()}", flush=True)
    rows: list[Row] = []
    timings, loads = {}, {"start": load_average()}
    for figure in wanted:
        start = time.perf_counter()
        module = importlib.import_module(FIGURES[figure])
        new = module.run(size_name)
        timings[figure] = time.perf_counter() - start
        loads[f"after figure {figure}"] = load_average()
        rows += new
        print_table(new)
        print(f"  (figure {figure}: {timings[figure]:.0f} s, load average {loads[f'after figure {figure}']})", flush=True)
    print()
    print_table(rows)
    if args.markdown:
        print()
        print(table(rows, markdown=True))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"size": size_name, "started": started, "machine": info, "load_average": loads,
                               "seconds": timings, "rows": [r.as_dict() for r in rows]}, indent=1, default=str))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
