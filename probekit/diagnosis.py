"""Findings computed from a run store: what the probes say is wrong with a model.

:func:`diagnose` reads one run (see ``docs/store.md``) and returns
:class:`Findings`, a table with one row per finding: its kind, the layers it
covers, the numbers from the store that triggered it (evidence) and what to
try (suggestion). The kinds, in the order they are looked for:

``dead_segment``
    A run of consecutive layers that carry no usable signal while layers after
    them do better: the paper's pathological skip connection, whose bypassed
    layers are not zero but useless.
``non_monotonic``
    Layers whose separability is clearly worse than an earlier layer's.
``chance_level``
    Probes no better than always predicting the majority class.
``no_better_than_random_init``
    Layers whose probes do no better than the same probes on a freshly
    initialised copy of the model (runs with the ``random_init`` baseline):
    training put nothing there that the architecture does not give at random.
``probe_overfitting``
    Train error far below valid error: the probe memorises the training split.
``stalled``
    Layers that stopped improving while the model's own loss still falls.
``nonfinite``
    Layers whose features held NaN or Inf (their metrics are missing).

"Clearly" means beyond noise. An error rate ``p`` measured on ``n`` examples
has a binomial standard error ``sqrt(p (1 - p) / n)`` (``p`` is shrunk as
``(p n + 1) / (n + 2)`` so that an error of 0 still has some noise); ``n`` is
the split's size from the run's attributes (``n_valid``, ``n_train``,
``n_test``). Two errors differ clearly when the gap exceeds ``z`` standard
errors of the difference *and* ``min_delta``.

With repeated fits (a run made with ``repeats=K``, which has ``probe_repeat``)
a layer's standard error is the larger of the binomial one and the standard
deviation of its ``K`` repeats at the diagnosed epoch (``ddof=1``): the
repeats also see the fit's own variability (resampled training data, random
reductions), which the binomial error of the evaluation split does not. A
random-init baseline's error takes its layer's standard error.

Run validation, split names, metric naming, epoch positions and layer order
come from :mod:`probekit.run.schema`; the thresholds are checked against one
declarative table (:func:`probekit.params.check_params`).

This module imports numpy, pandas and xarray only: never torch, never zarr,
never altair or ipywidgets.
"""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import xarray as xr

from probekit.params import Interval, Options, check_params, choices
from probekit.run.schema import SPLITS, check_run, epoch_position, forward_order, metric_name, splits_of

__all__ = ["FRAME_COLUMNS", "KINDS", "Finding", "Findings", "diagnose"]

#: Finding kinds, in the order :func:`diagnose` reports them for one layer.
KINDS = ("dead_segment", "non_monotonic", "chance_level", "no_better_than_random_init", "probe_overfitting", "stalled",
         "nonfinite")

#: Columns of :meth:`Findings.to_frame`.
FRAME_COLUMNS = ("kind", "layers", "first", "last", "evidence", "suggestion")

#: What :func:`diagnose`'s arguments may be (see :func:`probekit.params.check_params`).
_CONSTRAINTS = {
    "split": [Options(*SPLITS)],
    "z": [Interval(float, 0, None)],
    "min_delta": [Interval(float, 0, None)],
    "min_layers": [Interval(int, 1, None)],
    "overfit_gap": [Interval(float, 0, None)],
    "overfit_ratio": [Interval(float, 0, None)],
    "stall_epochs": [Interval(int, 1, None)],
    "loss_drop": [Interval(float, 0, None)],
    "n_examples": [Interval(int, 1, None), None],
}
#: Layers a per-layer finding may skip and still be reported as one stretch.
_BRIDGE = 1


# ----------------------------------------------------------------------------- reading a run
def _metric(ds: xr.Dataset, split: str, measure: str = "error") -> xr.DataArray | None:
    name = metric_name(split, measure)
    metrics = [str(m) for m in ds["metric"].values]
    return ds["probe"].sel(metric=name) if name in metrics else None


# ----------------------------------------------------------------------------- findings
@dataclass(frozen=True)
class Finding:
    """One finding: its kind, the layers it covers (forward order), evidence and suggestion."""

    kind: str
    """One of :data:`KINDS`."""
    layers: tuple[str, ...]
    """The layers it covers, in forward order (consecutive probe points)."""
    evidence: str
    """The numbers from the store that triggered it."""
    suggestion: str
    """What to try."""

    @property
    def first(self) -> str:
        """The first layer covered."""
        return self.layers[0]

    @property
    def last(self) -> str:
        """The last layer covered."""
        return self.layers[-1]

    def span(self) -> str:
        """``"a"``, or ``"a ... b (n layers)"``."""
        if len(self.layers) == 1:
            return self.first
        return f"{self.first} ... {self.last} ({len(self.layers)} layers)"


class Findings(Sequence[Finding]):
    """What :func:`diagnose` found, in forward order: iterable, indexable, and a table.

    ``to_frame()`` gives a pandas DataFrame (columns ``kind``, ``layers``, ``first``,
    ``last``, ``evidence``, ``suggestion``) that :func:`probekit.plots.diagnosis_overlay`
    draws; in a notebook the object shows itself as that table.

    Attributes:
        split: the split whose errors were read.
        epoch: the epoch number diagnosed.
        step: its training step (-1 when unknown).
        settings: the thresholds used, by name.
        model: the run's ``model`` attribute.

    Example:
        >>> findings = pk.diagnose(pk.open_run("data/runs/bypass.zarr"))
        >>> [f.span() for f in findings.of("dead_segment")]
        ['layers.19 ... layers.63 (45 layers)']
    """

    def __init__(self, findings: Sequence[Finding], *, split: str, epoch: int, step: int, settings: dict, model: str = ""):
        self._findings = tuple(findings)
        self.split, self.epoch, self.step = split, int(epoch), int(step)
        self.settings = dict(settings)
        self.model = model

    def __len__(self) -> int:
        return len(self._findings)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Findings(self._findings[index], split=self.split, epoch=self.epoch, step=self.step,
                            settings=self.settings, model=self.model)
        return self._findings[index]

    def __iter__(self) -> Iterator[Finding]:
        return iter(self._findings)

    def of(self, kind: str) -> Findings:
        """Only the findings of one kind.

        Example:
            >>> pk.diagnose(ds).of("dead_segment")
        """
        if kind not in KINDS:
            raise ValueError(f"kind={kind!r} is not a finding kind; choose from: {', '.join(KINDS)}")
        return Findings([f for f in self._findings if f.kind == kind], split=self.split, epoch=self.epoch,
                        step=self.step, settings=self.settings, model=self.model)

    def to_frame(self) -> pd.DataFrame:
        """One row per finding: ``kind``, ``layers`` (list of names), ``first``, ``last``, ``evidence``, ``suggestion``.

        Example:
            >>> plots.diagnosis_overlay(ds, pk.diagnose(ds).to_frame())
        """
        rows = [
            {"kind": f.kind, "layers": list(f.layers), "first": f.first, "last": f.last, "evidence": f.evidence,
             "suggestion": f.suggestion}
            for f in self._findings
        ]
        return pd.DataFrame(rows, columns=list(FRAME_COLUMNS))

    def _header(self) -> str:
        when = f"epoch {self.epoch}" + (f" (step {self.step:,})" if self.step >= 0 else "")
        of = f" of {self.model}" if self.model else ""
        count = f"{len(self)} finding{'s' if len(self) != 1 else ''}" if len(self) else "no findings"
        return f"{count} on {self.split} error at {when}{of}"

    def __str__(self) -> str:
        lines = [self._header()]
        for f in self._findings:
            lines += [f"- {f.kind}: {f.span()}", f"    evidence: {f.evidence}", f"    suggestion: {f.suggestion}"]
        return "\n".join(lines)

    def __repr__(self) -> str:
        kinds = ", ".join(f"{f.kind}@{f.first}" for f in self._findings[:6]) + (", ..." if len(self) > 6 else "")
        return f"<Findings: {self._header()}{': ' + kinds if kinds else ''}>"

    def _repr_html_(self) -> str:
        frame = self.to_frame()
        frame["layers"] = [f.span() for f in self._findings]
        table = frame.drop(columns=["first", "last"]).to_html(index=False, escape=True)
        return f"<p><b>{html.escape(self._header())}</b></p>{table}"


# ----------------------------------------------------------------------------- noise
@dataclass
class _Noise:
    """Noise of error rates measured on ``n`` examples, and the 'clearly different' test.

    ``spread`` holds each layer's standard deviation across repeated fits (forward
    order; 0 where the run has no repeats); an ``at`` argument names the layer (or
    layers, as an index array; -1 for none) each error belongs to.
    """

    n: int
    z: float
    min_delta: float
    spread: np.ndarray | None = None

    def se(self, p, at=None):
        shrunk = (np.asarray(p, dtype=float) * self.n + 1.0) / (self.n + 2.0)
        binomial = np.sqrt(shrunk * (1.0 - shrunk) / self.n)
        if at is None or self.spread is None:
            return binomial
        at = np.asarray(at)
        repeats = np.where(at >= 0, self.spread[np.clip(at, 0, None)], 0.0)
        return np.maximum(binomial, repeats)

    def threshold(self, p, q, at_p=None, at_q=None):
        """The gap two errors must exceed to differ clearly."""
        return np.maximum(self.z * np.sqrt(self.se(p, at_p) ** 2 + self.se(q, at_q) ** 2), self.min_delta)

    def threshold_vs_constant(self, p, at=None):
        return np.maximum(self.z * self.se(p, at), self.min_delta)


def _split_size(ds: xr.Dataset, split: str, n_examples: int | None) -> int:
    if n_examples is not None:
        return int(n_examples)
    value = ds.attrs.get(f"n_{split}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        n = 0
    if n < 1:
        raise ValueError(
            f"the run does not record the size of its {split} split (attribute n_{split} is {value!r}); "
            f"pass n_examples= (the number of {split} examples) to estimate the noise"
        )
    return n


# ----------------------------------------------------------------------------- the diagnosis
@dataclass
class _Run:
    """The arrays a diagnosis reads, in forward order."""

    names: list[str]
    op: list[str]
    feature_dim: np.ndarray
    reduction: list[str]
    errors: np.ndarray  # (layer, epoch) of the diagnosed split, up to the diagnosed epoch
    train: np.ndarray | None  # (layer,) train error at the diagnosed epoch
    nonfinite: np.ndarray  # (layer, epoch)
    epochs: np.ndarray
    steps: np.ndarray
    model_loss: np.ndarray
    chance: float
    n_train: int
    l2: float
    l2_chosen: bool = False  # l2="auto": chosen per layer on held-out data
    random_init: np.ndarray | None = None  # (layer,) the random-init baseline's error at the diagnosed epoch
    spread: np.ndarray | None = None  # (layer,) standard deviation across repeats at the diagnosed epoch
    trainable: np.ndarray = field(init=False)
    at: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.trainable = np.array([op != "input" for op in self.op])
        self.at = np.arange(len(self.names))

    @property
    def final(self) -> np.ndarray:
        return self.errors[:, -1]

    def when(self, position: int = -1) -> str:
        epoch, step = int(self.epochs[position]), int(self.steps[position])
        return f"epoch {epoch}" + (f", step {step:,}" if step >= 0 else "")


def _runs(mask: np.ndarray, *, bridge: int = 0, over: np.ndarray | None = None) -> list[tuple[int, int]]:
    """``(start, stop)`` of each run of consecutive True values.

    With ``bridge=k``, gaps of at most ``k`` False values between two True
    ones are bridged when every value in the gap is True in ``over``, so that
    a criterion hovering at its threshold along a stretch of layers gives one
    finding rather than many.
    """
    mask = np.asarray(mask, dtype=bool).copy()
    if bridge:
        flagged = np.flatnonzero(mask)
        for left, right in zip(flagged[:-1], flagged[1:]):
            if 1 < right - left <= bridge + 1 and (over is None or over[left:right].all()):
                mask[left:right] = True
    out, start = [], None
    for i, flag in enumerate(list(mask) + [False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            out.append((start, i))
            start = None
    return out


def _fmt(value: float) -> str:
    return f"{value:.3f}"


def _range(values: np.ndarray) -> str:
    low, high = float(np.nanmin(values)), float(np.nanmax(values))
    return _fmt(low) if _fmt(low) == _fmt(high) else f"{_fmt(low)}-{_fmt(high)}"


def diagnose(
    ds: xr.Dataset,
    *,
    split: str = "valid",
    epoch: int = -1,
    z: float = 3.0,
    min_delta: float = 0.01,
    min_layers: int = 2,
    overfit_gap: float = 0.10,
    overfit_ratio: float = 0.5,
    stall_epochs: int = 3,
    loss_drop: float = 0.05,
    n_examples: int | None = None,
) -> Findings:
    """Look for dead segments, non-monotonic steps, chance-level, overfitting, stalled and nonfinite layers.

    Every criterion reads the probes' error on ``split`` at ``epoch`` (and, for
    the training-time criteria, the epochs before it). Layers are compared in
    forward order; two errors differ *clearly* when their gap exceeds ``z``
    standard errors of the difference and ``min_delta``: binomial ones, or the
    repeats' spread where it is larger (see the module docstring). Consecutive layers with the same finding are reported
    as one finding covering them all. A layer inside a dead segment gets no
    other finding but ``probe_overfitting`` and ``nonfinite`` (the segment explains it).

    The criteria:

    - ``dead_segment``: at least ``min_layers`` consecutive layers (never the
      input), each (a) clearly worse than some layer after it; (b) no better
      than the segment's *entry* (the best layer before the segment), or within
      noise of chance; and (c) not clearly better than at the run's first
      epoch. A single snapshot cannot show (c), so there (b) asks for layers
      clearly *worse* than the entry (or at chance). The layers after the
      segment do better, so the signal goes around it: the paper's bypassed half.
    - ``non_monotonic``: a layer clearly worse than the best layer before it.
    - ``chance_level``: a layer within noise of the run's ``chance_error``
      (always predicting the majority class), or worse.
    - ``no_better_than_random_init`` (runs with the ``random_init`` baseline):
      a layer (never the input, which both copies share) whose error is not
      clearly below the random-init copy's error on ``split``. Not at step 0
      (the model then is a random initialisation itself).
    - ``probe_overfitting``: train error far below ``split`` error: lower by
      more than ``overfit_gap`` and beyond noise, and at most ``overfit_ratio``
      times it (a poor layer whose probe errs 0.6 on train and 0.7 on valid is
      not overfitting). Not with ``split="train"``, and only in runs whose probes
      had a fixed ``l2`` (a number, or the fallback of ``l2="auto"``): where each
      probe's L2 was chosen on held-out training data, the gap left is what the
      best-regularised probe leaves on this much data, not a setting to fix; the
      control task (``baselines=["control"]``, selectivity) measures how much a
      probe memorises.
    - ``stalled``: over the last ``stall_epochs`` epochs the model's own loss
      (``model_loss``) fell by at least ``loss_drop`` (relative) while the
      layer's error moved less than one standard error (or ``min_delta``),
      although the layer is clearly worse than the best layer (it has room
      to improve). Needs the model's losses in the store (``train_and_probe``
      records them).
    - ``nonfinite``: the layer's features held NaN or Inf at ``epoch``.

    Args:
        ds: a run (see ``docs/store.md``), e.g. from :func:`probekit.open_run`.
        split: the split whose errors are read: ``"valid"`` (the paper's), ``"test"`` or ``"train"``.
        epoch: the epoch to diagnose: an epoch number or a negative position (-1, the last).
        z: standard errors a gap must exceed to count (3 keeps false alarms rare
            when a hundred layers are compared).
        min_delta: smallest gap (in error) that counts, whatever the noise; keeps
            very large splits from flagging differences nobody cares about.
        min_layers: fewest consecutive layers that make a dead segment.
        overfit_gap: how far train error must lie below ``split`` error.
        overfit_ratio: the largest ratio of train to ``split`` error that counts as overfitting.
        stall_epochs: the window, in epochs, of the stall criterion.
        loss_drop: relative fall of the model's loss over that window that
            makes a flat layer "stalled".
        n_examples: size of ``split``; default: the run's ``n_{split}`` attribute.

    Returns:
        :class:`Findings`, in forward order of their first layer.

    Raises:
        ValueError: ``ds`` is not a run, lacks ``split``, or a threshold is out of range.

    Example:
        >>> findings = pk.diagnose(pk.open_run("data/runs/bypass.zarr"))
        >>> findings.to_frame()[["kind", "first", "last"]]
    """
    check_run(ds)
    check_params(_CONSTRAINTS, split=split, z=z, min_delta=min_delta, min_layers=min_layers, overfit_gap=overfit_gap,
                 overfit_ratio=overfit_ratio, stall_epochs=stall_epochs, loss_drop=loss_drop, n_examples=n_examples)
    errors = _metric(ds, split)
    if errors is None:
        raise ValueError(f"this run has no {split} error; choose split= from: {choices(splits_of(ds)) or 'none'}")
    position = epoch_position(ds, epoch)
    run = _read(ds, errors, split, position)
    noise = _Noise(n=_split_size(ds, split, n_examples), z=float(z), min_delta=float(min_delta), spread=run.spread)
    settings = {"z": z, "min_delta": min_delta, "min_layers": min_layers, "overfit_gap": overfit_gap,
                "overfit_ratio": overfit_ratio, "stall_epochs": stall_epochs, "loss_drop": loss_drop, "n_examples": noise.n,
                "noise": "binomial and repeats" if run.spread is not None else "binomial"}

    found: list[tuple[int, int, Finding]] = []
    finite = np.isfinite(run.final)
    dead = _dead_segments(run, noise, min_layers, finite)
    found += [(start, 0, finding) for start, finding in dead.findings]
    free = finite & ~dead.mask
    found += [(s, 1, f) for s, f in _non_monotonic(run, noise, free)]
    found += [(s, 2, f) for s, f in _chance_level(run, noise, free)]
    found += [(s, 3, f) for s, f in _no_better_than_random_init(run, noise, free, split)]
    if run.train is not None and split != "train" and not run.l2_chosen:
        found += [(s, 4, f) for s, f in _overfitting(run, noise, finite, split, overfit_gap, overfit_ratio)]
    found += [(s, 5, f) for s, f in _stalled(run, noise, free, stall_epochs, loss_drop)]
    found += [(s, 6, f) for s, f in _nonfinite(run)]
    found.sort(key=lambda item: (item[0], item[1]))
    return Findings([f for _, _, f in found], split=split, epoch=int(run.epochs[-1]), step=int(run.steps[-1]),
                    settings=settings, model=str(ds.attrs.get("model", "")))


def _read(ds: xr.Dataset, errors: xr.DataArray, split: str, position: int) -> _Run:
    order = forward_order(ds)
    upto = slice(0, position + 1)
    values = errors.transpose("layer", "epoch").values[order, upto].astype(float)
    nonfinite = ds["nonfinite"].transpose("layer", "epoch").values[order, upto].astype(bool)
    values = np.where(nonfinite | ~np.isfinite(values), np.nan, values)
    train = _metric(ds, "train")
    train_final = None if train is None else train.transpose("layer", "epoch").values[order, position].astype(float)
    chance = float(ds.attrs.get("chance_error", np.nan))
    if not math.isfinite(chance):
        raise ValueError(
            f"the run does not record its chance error (attribute chance_error is {ds.attrs.get('chance_error')!r}); "
            "set ds.attrs['chance_error'] to the error of always predicting the majority class"
        )
    try:
        n_train = int(ds.attrs.get("n_train", 0))
    except (TypeError, ValueError):
        n_train = 0
    name = metric_name(split, "error")
    random_init = None
    if "baselines" in ds.data_vars and "random_init" in [str(b) for b in ds["baseline"].values]:
        baseline = ds["baselines"].sel(baseline="random_init", metric=name).transpose("layer", "epoch")
        random_init = baseline.values[order, position].astype(float)
    spread = None
    if "probe_repeat" in ds.data_vars and ds.sizes.get("repeat", 1) > 1:
        repeats = ds["probe_repeat"].sel(metric=name).transpose("layer", "epoch", "repeat").values[order, position]
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nonfinite layers: all-NaN repeats
            spread = np.nan_to_num(np.nanstd(repeats.astype(float), axis=-1, ddof=1), nan=0.0)
    return _Run(
        names=[str(v) for v in np.asarray(ds["layer"].values)[order]],
        op=[str(v) for v in np.asarray(ds["op"].values)[order]],
        feature_dim=np.asarray(ds["feature_dim"].values)[order].astype(int),
        reduction=[str(v) for v in np.asarray(ds["reduction"].values)[order]],
        errors=values, train=train_final, nonfinite=nonfinite,
        epochs=np.asarray(ds["epoch"].values)[upto].astype(int), steps=np.asarray(ds["step"].values)[upto].astype(int),
        model_loss=np.asarray(ds["model_loss"].values)[upto].astype(float), chance=chance, n_train=n_train,
        l2=_fixed_l2(ds.attrs.get("l2")), l2_chosen=ds.attrs.get("l2") == "auto" and "l2_fallback" not in ds.attrs, random_init=random_init, spread=spread,
    )


def _fixed_l2(value: object) -> float:
    """The run's fixed L2 strength; NaN when it was chosen per layer (``"auto"``) or is not recorded."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _best_before(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per layer: the lowest finite value among earlier layers, and its position (-1 where none)."""
    best = np.full(len(values), np.nan)
    where = np.full(len(values), -1)
    current, at = np.inf, -1
    for i, value in enumerate(values):
        if at >= 0:
            best[i], where[i] = current, at
        if np.isfinite(value) and value < current:
            current, at = value, i
    return best, where


def _best_after(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    best, where = _best_before(values[::-1])
    n = len(values)
    return best[::-1], np.where(where[::-1] >= 0, n - 1 - where[::-1], -1)


@dataclass
class _Dead:
    mask: np.ndarray
    findings: list[tuple[int, Finding]]


def _dead_segments(run: _Run, noise: _Noise, min_layers: int, finite: np.ndarray) -> _Dead:
    """Runs of layers that carry no usable signal while a later layer does better (see :func:`diagnose`).

    Every layer of a segment is compared with the segment's *entry*, the best
    layer before its first one, so that a stretch that improves slowly (each
    step within noise) does not count as flat.
    """
    e, e0 = run.final, run.errors[:, 0]
    before, before_at = _best_before(e)
    after, after_at = _best_after(e)
    trained = len(run.epochs) > 1
    with np.errstate(invalid="ignore"):
        near_chance = e >= run.chance - noise.threshold_vs_constant(e, run.at)
        behind = np.isfinite(after) & (e - after > noise.threshold(e, after, run.at, after_at))
        not_improving = ((e0 - e <= noise.threshold(e0, e, run.at, run.at)) | ~np.isfinite(e0) if trained
                         else np.ones(len(e), bool))
    eligible = finite & run.trainable & behind & not_improving

    def useless(k: int, entry: float, entry_at: int) -> bool:
        if near_chance[k]:
            return True
        if not np.isfinite(entry):
            return False
        gap = noise.threshold(e[k], entry, k, entry_at)
        # Over training, "no better than the entry" suffices; a single snapshot cannot show
        # that training left the layers alone, so it must show them clearly worse.
        return bool(e[k] >= entry - gap) if trained else bool(e[k] > entry + gap)

    mask = np.zeros(len(e), bool)
    findings = []
    start = 0
    while start < len(e):
        entry, entry_at = before[start], int(before_at[start])
        if not (eligible[start] and useless(start, entry, entry_at)):
            start += 1
            continue
        stop = start + 1
        while stop < len(e) and eligible[stop] and useless(stop, entry, entry_at):
            stop += 1
        if stop - start < min_layers:
            start += 1
            continue
        mask[start:stop] = True
        findings.append((start, _dead_finding(run, noise, start, stop, int(before_at[start]), int(after_at[stop - 1]))))
        start = stop
    return _Dead(mask=mask, findings=findings)


def _dead_finding(run: _Run, noise: _Noise, start: int, stop: int, entry: int, later: int) -> Finding:
    e, e0 = run.final, run.errors[:, 0]
    segment = slice(start, stop)
    parts = [f"{run.names[start]} ... {run.names[stop - 1]}: error {_range(e[segment])} at {run.when()}"]
    if entry >= 0:
        parts.append(f"no better than {_fmt(e[entry])} at {run.names[entry]} before it")
    if len(run.epochs) > 1:
        parts.append(f"{_range(e0[segment])} at {run.when(0)}, so no gain from training beyond noise")
    parts.append(f"{run.names[later]} after it reaches {_fmt(e[later])}")
    parts.append(f"chance {_fmt(run.chance)}; noise threshold {_fmt(float(noise.threshold(e[start], e[later], start, later)))}")
    return Finding(
        kind="dead_segment",
        layers=tuple(run.names[segment]),
        evidence="; ".join(parts),
        suggestion=(
            "these layers are bypassed: a later layer separates the classes better, so the signal reaches it "
            "around them (a long skip connection) while they learn nothing. Remove them, end the skip before "
            "them, or give them shorter skips (a residual block every few layers) so that gradient reaches them"
        ),
    )


def _untrained(run: _Run) -> bool:
    return int(run.steps[-1]) == 0


def _non_monotonic(run: _Run, noise: _Noise, free: np.ndarray) -> list[tuple[int, Finding]]:
    e = run.final
    before, where = _best_before(e)
    with np.errstate(invalid="ignore"):
        worse = free & np.isfinite(before) & (e - before > noise.threshold(e, before, run.at, where))
    out = []
    for start, stop in _runs(worse, bridge=_BRIDGE, over=free):
        ref = int(where[start])
        worst = start + int(np.nanargmax(e[start:stop]))
        gap = e[start] - e[ref]
        threshold = _fmt(float(noise.threshold(e[start], e[ref], start, ref)))
        text = (f"error {_fmt(e[start])} at {run.names[start]} against {_fmt(e[ref])} at {run.names[ref]}, the best "
                f"layer before it, at {run.when()} (+{gap:.3f}; noise threshold {threshold})")
        if stop - start > 1:
            text += f"; it stays above through {run.names[stop - 1]}, worst {_fmt(e[worst])} at {run.names[worst]}"
        if _untrained(run):
            suggestion = ("before training, separability often decays with depth (the paper's untrained deep nets): "
                          "train the model and diagnose again; if it persists, check the initialisation and normalisation")
        else:
            suggestion = ("separability should not fall with depth in a trained model: look for a bottleneck here "
                          "(a narrow layer, aggressive pooling or stride, saturated activations)")
        if run.reduction[worst] != run.reduction[ref] or run.feature_dim[worst] < run.feature_dim[ref]:
            suggestion += (f", or a probe reduction that discards information ({run.names[worst]}: {run.reduction[worst]}, "
                           f"{run.feature_dim[worst]:,} features; {run.names[ref]}: {run.reduction[ref]}, "
                           f"{run.feature_dim[ref]:,}); try a finer reduction such as poolK or subsetN")
        out.append((start, Finding(kind="non_monotonic", layers=tuple(run.names[start:stop]), evidence=text,
                                   suggestion=suggestion)))
    return out


def _chance_level(run: _Run, noise: _Noise, free: np.ndarray) -> list[tuple[int, Finding]]:
    e = run.final
    with np.errstate(invalid="ignore"):
        at_chance = free & (e >= run.chance - noise.threshold_vs_constant(e, run.at))
    out = []
    for start, stop in _runs(at_chance, bridge=_BRIDGE, over=free):
        segment = slice(start, stop)
        names = run.names[segment]
        where = names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}"
        text = (f"error {_range(e[segment])} at {where} ({run.when()}) against chance {_fmt(run.chance)} "
                f"(always the majority class); noise threshold {_fmt(float(noise.threshold_vs_constant(run.chance)))}")
        small = [n for n, d, r in zip(names, run.feature_dim[segment], run.reduction[segment])
                 if r.startswith("pool") or d < 32]
        if small:
            suggestion = (f"the probe may see too little: {small[0]} has {run.feature_dim[run.names.index(small[0])]:,} "
                          f"features ({run.reduction[run.names.index(small[0])]}); try a finer reduction (poolK, subsetN). "
                          "Otherwise the layer carries no linearly usable class information")
        elif _untrained(run):
            suggestion = ("untrained deep layers often carry no usable signal; if it persists after training, "
                          "check for vanishing or saturated activations (initialisation, normalisation, learning rate)")
        else:
            suggestion = ("the layer carries no linearly usable class information: check for vanishing or saturated "
                          "activations (initialisation, normalisation, learning rate) or a path that bypasses it")
        out.append((start, Finding(kind="chance_level", layers=tuple(names), evidence=text, suggestion=suggestion)))
    return out


def _no_better_than_random_init(run: _Run, noise: _Noise, free: np.ndarray, split: str) -> list[tuple[int, Finding]]:
    """Layers whose error is not clearly below the random-init copy's (see :func:`diagnose`)."""
    if run.random_init is None or _untrained(run):
        return []
    e, r = run.final, run.random_init
    with np.errstate(invalid="ignore"):
        same = free & run.trainable & np.isfinite(r) & (r - e <= noise.threshold(e, r, run.at, run.at))
    out = []
    for start, stop in _runs(same, bridge=_BRIDGE, over=free & run.trainable):
        segment = slice(start, stop)
        names = run.names[segment]
        where = names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}"
        gain = r[segment] - e[segment]
        threshold = float(np.nanmax(noise.threshold(e[segment], r[segment], run.at[segment], run.at[segment])))
        text = (f"{split} error {_range(e[segment])} at {where} ({run.when()}) against {_range(r[segment])} for the same "
                f"probes on a random-init copy: gain {_range(gain)}, within noise (threshold {_fmt(threshold)})")
        suggestion = ("training put nothing linearly usable here beyond what the architecture gives at random weights "
                      "(random features of a wide layer are often separable): check that these layers receive gradient "
                      "(skips around them, saturated activations, frozen parameters), or train longer")
        out.append((start, Finding(kind="no_better_than_random_init", layers=tuple(names), evidence=text,
                                   suggestion=suggestion)))
    return out


def _overfitting(run: _Run, noise: _Noise, finite: np.ndarray, split: str, overfit_gap: float,
                 overfit_ratio: float) -> list[tuple[int, Finding]]:
    e, t = run.final, run.train
    with np.errstate(invalid="ignore"):
        gap = e - t
        far = (gap > overfit_gap) & (gap > noise.threshold_vs_constant(e, run.at)) & (t <= overfit_ratio * e)
        flagged = finite & np.isfinite(t) & far
    out = []
    for start, stop in _runs(flagged, bridge=_BRIDGE, over=finite):
        segment = slice(start, stop)
        names = run.names[segment]
        widest = start + int(np.argmax(run.feature_dim[segment]))
        where = names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}"
        text = (f"train error {_range(t[segment])} against {split} error {_range(e[segment])} at {where} ({run.when()}): "
                f"gap up to {float(np.nanmax(gap[segment])):.2f}; {run.names[widest]} has {run.feature_dim[widest]:,} "
                f"features ({run.reduction[widest]}) for {run.n_train:,} training examples")
        target = max(16, run.n_train // 10)
        l2 = f" (now {run.l2:g})" if math.isfinite(run.l2) else ""
        reduce = (f"the probe memorises the training split: the layer is too wide for the data. Reduce it "
                  f"(reduce='pool' or 'pool2' for feature maps, 'subset{target}' otherwise)")
        suggestion = f"{reduce}, raise the probes' l2{l2}, or let it be chosen on held-out data (l2='auto')"
        out.append((start, Finding(kind="probe_overfitting", layers=tuple(names), evidence=text, suggestion=suggestion)))
    return out


def _stalled(run: _Run, noise: _Noise, free: np.ndarray, stall_epochs: int, loss_drop: float) -> list[tuple[int, Finding]]:
    if len(run.epochs) <= stall_epochs:
        return []
    window = slice(len(run.epochs) - 1 - stall_epochs, len(run.epochs))
    losses = run.model_loss[window]
    known = np.flatnonzero(np.isfinite(losses))
    if len(known) < 2 or known[-1] != len(losses) - 1:
        return []
    first, last = float(losses[known[0]]), float(losses[-1])
    if first == 0 or (first - last) / abs(first) < loss_drop:
        return []
    e, start_e = run.final, run.errors[:, window.start]
    best = float(np.nanmin(e))
    at_best = int(np.nanargmin(e))
    with np.errstate(invalid="ignore"):
        flat = start_e - e <= np.maximum(np.sqrt(noise.se(start_e, run.at) ** 2 + noise.se(e, run.at) ** 2), noise.min_delta)
        lagging = e - best > noise.threshold(e, best, run.at, at_best)
        stalled = free & run.trainable & np.isfinite(start_e) & flat & lagging
    out = []
    since = run.when(window.start)
    for start, stop in _runs(stalled, bridge=_BRIDGE, over=free):
        segment = slice(start, stop)
        names = run.names[segment]
        where = names[0] if len(names) == 1 else f"{names[0]} ... {names[-1]}"
        text = (f"{where}: error {_range(start_e[segment])} at {since} and {_range(e[segment])} at {run.when()}, "
                f"while the model's loss fell from {first:.3f} to {last:.3f} ({(first - last) / abs(first):.0%}); "
                f"{run.names[at_best]} reaches {_fmt(best)}")
        suggestion = ("the model improves without these layers: they may receive little gradient (too deep without "
                      "skips, saturated activations) or have converged early; compare with a lower/higher learning "
                      "rate, or a skip connection or normalisation around them")
        out.append((start, Finding(kind="stalled", layers=tuple(names), evidence=text, suggestion=suggestion)))
    return out


def _nonfinite(run: _Run) -> list[tuple[int, Finding]]:
    out = []
    for start, stop in _runs(run.nonfinite[:, -1]):
        first_bad = min(int(run.epochs[np.flatnonzero(run.nonfinite[i])[0]]) for i in range(start, stop))
        text = (f"features held NaN or Inf at {run.when()} (first at epoch {first_bad}); their probes' metrics are "
                "missing (NaN) in the store")
        out.append((start, Finding(
            kind="nonfinite", layers=tuple(run.names[start:stop]), evidence=text,
            suggestion=("the activations overflow here: lower the learning rate, add normalisation, "
                        "or check the input scaling"),
        )))
    return out
