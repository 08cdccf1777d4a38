"""Accuracy and speed against the standard pipeline: ResNet-18 blocks, global pooling + scikit-learn.

``python -m benchmarks.sklearn_pipeline [--train 256,1000] [--reps 1] [--out FILE]``

The model is torchvision's ResNet-18 with random weights (seeded; nothing is
downloaded), in eval mode, probed at its eight residual blocks
(``layer1.0`` ... ``layer4.1``). The data are scikit-learn's digits, upscaled
to 32 x 32 and repeated over three channels, shuffled with a fixed seed:
the first ``N`` images train (``N`` from ``--train``, 256 to 1,000), the last
397 are the held-out test split of both sides.

- **Baseline** (what a user writes without probekit, as in the captum /
  thingsvision recipe): forward hooks on the blocks, global average pooling
  of each block output, and ``sklearn.linear_model.LogisticRegression()`` at
  its defaults on the pooled features, one per block.
- **probekit**: ``pk.probe(model, data, layers=blocks)`` at its defaults
  (``reduce="auto"``, ``l2="auto"``), end to end: tracing, extraction, the
  held-out choice of every probe, scoring.
- **References** (untimed): probekit with the fixed ``l2=1e-3`` it used before
  ``l2="auto"``, and the baseline with a ``StandardScaler`` before the
  classifier (a stronger baseline than "the defaults": without it, the
  pooled outputs of a random network's early blocks have tiny variances and
  ``C=1`` regularises them almost to chance).

Both sides see the same images and the same block outputs; the errors are
on the test split, per layer. One row per training size: the mean error gap
(probekit - scikit-learn, points; target <= 0, i.e. at least as accurate on
average) in the note, and the end-to-end time ratio (probekit / baseline,
target < 1: faster), the two timed interleaved ``--reps`` times after one
warm-up of each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from benchmarks.measure import Row, interleave, load_average, machine, timed

BLOCKS = [f"layer{s}.{b}" for s in range(1, 5) for b in range(2)]
N_TEST = 397
SIZE = 32


def digits(n_train: int, *, seed: int = 0) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits at 32 x 32 x 3: the first ``n_train`` shuffled images train, the last 397 test."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    if not 0 < n_train <= len(y) - N_TEST:
        raise SystemExit(f"--train must be between 1 and {len(y) - N_TEST} images; got {n_train}")
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x = torch.tensor(x, dtype=torch.float32).reshape(-1, 1, 8, 8)[order] / 16
    x = nn.functional.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False)
    x = ((x - 0.3) / 0.4).expand(-1, 3, -1, -1).contiguous()
    y = torch.tensor(y)[order]
    return {"train": (x[:n_train], y[:n_train]), "valid": (x[-N_TEST:], y[-N_TEST:])}


def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None, num_classes=10).eval()


def pooled_features(model: nn.Module, data: dict, *, batch_size: int = 256) -> dict[str, dict[str, np.ndarray]]:
    """Forward hooks on the blocks, global average pooling: ``{split: {block: (n, channels)}}``."""
    pooled: dict[str, list] = {}
    hooks = [model.get_submodule(name).register_forward_hook(
        lambda module, args, out, name=name: pooled.setdefault(name, []).append(out.mean((2, 3))))
        for name in BLOCKS]
    features = {}
    try:
        with torch.no_grad():
            for split, (x, _) in data.items():
                pooled.clear()
                for start in range(0, len(x), batch_size):
                    model(x[start:start + batch_size])
                features[split] = {name: torch.cat(parts).numpy() for name, parts in pooled.items()}
    finally:
        for hook in hooks:
            hook.remove()
    return features


def sklearn_errors(features: dict, data: dict, *, scaled: bool = False) -> dict[str, float]:
    """``LogisticRegression()`` at its defaults per block (after a ``StandardScaler`` with ``scaled``): test error."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    errors = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a ConvergenceWarning at max_iter=100 is part of "the defaults"
        for name in BLOCKS:
            classifier = make_pipeline(StandardScaler(), LogisticRegression()) if scaled else LogisticRegression()
            classifier.fit(features["train"][name], data["train"][1].numpy())
            errors[name] = 1 - classifier.score(features["valid"][name], data["valid"][1].numpy())
    return errors


def sklearn_pipeline(model: nn.Module, data: dict) -> dict[str, float]:
    """The baseline end to end: hooks, global average pooling, ``LogisticRegression()``: test error per block."""
    return sklearn_errors(pooled_features(model, data), data)


def probekit_errors(model: nn.Module, data: dict, **kwargs) -> tuple[dict[str, float], object]:
    """``pk.probe`` on the blocks: test error per block, and the run."""
    import probekit as pk

    ds = pk.probe(model, data, layers=BLOCKS, quiet=True, **kwargs)
    errors = ds.probe.sel(metric="valid_error").squeeze("epoch", drop=True)
    return {str(layer): float(errors.sel(layer=layer)) for layer in ds.layer.values}, ds


def rows(train_sizes: list[int], reps: int) -> list[Row]:
    out = []
    for n_train in train_sizes:
        model, data = resnet18(), digits(n_train)
        answers = {}

        def baseline():
            answers["sklearn"] = sklearn_pipeline(model, data)

        def ours():
            answers["probekit"], answers["run"] = probekit_errors(model, data)

        pairs = interleave(baseline, ours, reps=reps)
        fixed, _ = probekit_errors(model, data, l2=1e-3)
        forward_s, features = timed(lambda: pooled_features(model, data))
        fits_s, _ = timed(lambda: sklearn_errors(features, data))
        scaled = sklearn_errors(features, data, scaled=True)
        ds = answers["run"]
        table = [{"layer": name, "sklearn": answers["sklearn"][name], "probekit": answers["probekit"][name],
                  "probekit_l2_1e-3": fixed[name], "sklearn_scaled": scaled[name],
                  "l2": float(ds.l2.sel(layer=name).squeeze()) if "l2" in ds else None,
                  "reduce": str(ds.reduction.sel(layer=name).values) if "reduction" in ds.coords else None}
                 for name in BLOCKS]
        gap = statistics.mean(r["probekit"] - r["sklearn"] for r in table)
        gap_fixed = statistics.mean(r["probekit_l2_1e-3"] - r["sklearn"] for r in table)
        note = (f"mean test error gap probekit - sklearn {100 * gap:+.1f} pt (target <= 0; "
                f"at l2=1e-3: {100 * gap_fixed:+.1f} pt); mean error sklearn "
                f"{statistics.mean(r['sklearn'] for r in table):.3f}, probekit "
                f"{statistics.mean(r['probekit'] for r in table):.3f} (sklearn with StandardScaler: "
                f"{statistics.mean(r['sklearn_scaled'] for r in table):.3f}); baseline time: forward + pooling "
                f"{forward_s:.1f} s, fits {fits_s:.1f} s")
        out.append(Row(
            figure="9 sklearn pipeline", case=f"resnet18 blocks, digits {SIZE}px, {n_train} train / {N_TEST} test",
            baseline="hooks + global pool + LogisticRegression()", baseline_value=pairs.baseline_median,
            probekit_value=pairs.candidate_median, unit="s", target=1.0, note=note, pair_ratio=pairs.ratio,
            accurate=gap <= 0, extra={"times_s": pairs.as_dict(), "layers": table, "mean_gap": gap,
                                      "mean_gap_l2_1e-3": gap_fixed, "baseline_forward_s": forward_s,
                                      "baseline_fits_s": fits_s, "l2_fallback": ds.attrs.get("l2_fallback")},
        ))
    return out


def markdown(row: Row) -> str:
    lines = ["| layer | reduce | l2 | sklearn error | probekit error | probekit, l2=1e-3 | sklearn + StandardScaler |",
             "|---|---|---|---|---|---|---|"]
    for r in row.extra["layers"]:
        l2 = "-" if r["l2"] is None or not np.isfinite(r["l2"]) else f"{r['l2']:g}"
        lines.append(f"| {r['layer']} | {r['reduce'] or '-'} | {l2} | {r['sklearn']:.3f} | {r['probekit']:.3f} | "
                     f"{r['probekit_l2_1e-3']:.3f} | {r['sklearn_scaled']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sklearn_pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--train", default="256,1000", help="training sizes, e.g. '256,1000'")
    parser.add_argument("--reps", type=int, default=1, help="timed pairs after the warm-up")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sklearn_pipeline.json"))
    args = parser.parse_args(argv)
    from benchmarks.run import print_table

    started = time.strftime("%Y-%m-%d %H:%M:%S")
    result = rows([int(n) for n in args.train.split(",") if n.strip()], args.reps)
    print_table(result)
    for row in result:
        print(f"\n{row.case}\n{markdown(row)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"started": started, "machine": machine(), "load_average": load_average(),
                                    "rows": [r.as_dict() for r in result]}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
