"""``ProbeMonitor``: probes a model's layers while it trains, one epoch row at a time.

Data flows one way: model -> :mod:`~probekit.engine.points` (probe points) ->
:mod:`~probekit.engine.extract` (one forward pass) with :mod:`~probekit.engine.reduce`
-> :mod:`~probekit.engine.features` (cache) -> :mod:`~probekit.engine.probes` (fits)
-> :mod:`probekit.run.store` (the run). Every call leaves the model exactly as it
found it.

This module owns :class:`ProbeMonitor`, the run's provenance attributes and the
progress display of each extraction stage. It never imports the diagnosis, the
charts or the explorers.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import IO, Literal

import numpy as np
import torch
import xarray as xr
from torch import nn
from torch.utils.data import DataLoader

from probekit import __version__
from probekit.engine.devices import model_device
from probekit.engine.extract import HookExtractor, build_extractor
from probekit.engine.features import (
    AUTOCAST_CONSTRAINTS, DEFAULT_CACHE_BYTES, LabelSummary, as_splits, autocast_dtype, autocast_name, batches,
    check_inputs, check_labels, extract, label_summary, shard_batches, split_size,
)
from probekit.engine.plan import PLAN_CONSTRAINTS, build_plan
from contextlib import nullcontext

from probekit.engine.batch import MASK_KEY, attention_mask, call_model, to_device
from probekit.engine.points import INPUT, TRACE_CONSTRAINTS, LayerGraph, preserved_state
from probekit.engine import controls, distributed
from probekit.engine.features import IGNORE_INDEX
from probekit.engine.online import OnlineProbes
from probekit.engine.probes import FALLBACK_L2, MIN_PER_CLASS, fit_probes, score
from probekit.engine.reduce import DEFAULT_BUDGET, DEFAULT_MAX_FLATTEN
from probekit.params import Interval, Options, check_params
from probekit.run.schema import EpochRow, build_dataset, metric_name, metric_names
from probekit.run.store import RunWriter, store_location

__all__ = ["MONITOR_CONSTRAINTS", "Mode", "ProbeMonitor", "UPDATE_CONSTRAINTS"]

Mode = Literal["snapshot", "online"]

#: Argument checks of :class:`ProbeMonitor` (those of tracing and of the plan included);
#: :func:`~probekit.engine.fixed.probe` and :func:`~probekit.engine.fixed.probe_checkpoints` share them.
MONITOR_CONSTRAINTS = {
    **TRACE_CONSTRAINTS,
    **PLAN_CONSTRAINTS,
    "num_classes": [*PLAN_CONSTRAINTS["num_classes"], None],
    "store": [str, os.PathLike, None],
    "storage_options": [Mapping, None],
    "mode": [Options("snapshot", "online")],
    "resume": [bool],
    "overwrite": [bool],
    "l2": [Interval(float, 0, None), Options("auto")],
    "baselines": [str, list, tuple, None],
    "groups": [Mapping, None],
    "repeats": [Interval(int, 1, None)],
    "metrics": [str, list, tuple, None],
    "probe_lr": [Interval(float, 0, None, closed="neither")],
    "batch_size": [Interval(int, 1, None)],
    "max_iter": [Interval(int, 1, None)],
    "cache_bytes": [Interval(int, 0, None)],
    "quiet": [bool],
    "model_name": [str, None],
    "dataset_name": [str, None],
    "channels_last": [bool],
    **AUTOCAST_CONSTRAINTS,
    "label_key": [str, None],
    "mask_key": [str],
}
#: Argument checks of :meth:`ProbeMonitor.update`. An epoch number is never negative (readers
#: take a negative ``epoch=`` to count from the end); ``step=None`` is an unknown step.
UPDATE_CONSTRAINTS = {"epoch": [Interval(int, 0, None), None], "step": [Interval(int, 0, None), None]}
#: What the run store records for an unknown step (``step=None``); see docs/store.md.
_UNKNOWN_STEP = -1


def _first_batch(split: object, batch_size: int, label_key: str | None = None) -> object:
    for inputs, _ in batches(split, batch_size, label_key=label_key, name="train"):
        return inputs
    raise ValueError("the train split is empty; give it at least one example per class")


class _Labels:
    """Each split's probe labels (per example, or per labelled token), read once and on demand.

    Tensor pairs and datasets with ``targets`` are cheap; any other split costs
    one pass over its batches, so only the splits the monitor needs are read.
    """

    def __init__(self, splits: dict, batch_size: int, label_key: str | None):
        self.splits, self.batch_size, self.label_key = splits, batch_size, label_key
        self.read: dict[str, LabelSummary] = {}

    def cheap(self, name: str) -> bool:
        split = self.splits[name]
        return isinstance(split, (tuple, list)) or (hasattr(split, "targets") and not isinstance(split, DataLoader))

    def __getitem__(self, name: str) -> LabelSummary:
        if name not in self.read:
            self.read[name] = label_summary(self.splits[name], self.batch_size, label_key=self.label_key, name=name)
            first = next(iter(self.read))
            if self.read[name].kind != self.read[first].kind:
                kinds = {"examples": "per-example (N,)", "tokens": "per-token (N, T)"}
                raise ValueError(
                    f"the {first} split has {kinds[self.read[first].kind]} labels but the {name} split "
                    f"{kinds[self.read[name].kind]} ones; give every split labels of one kind"
                )
        return self.read[name]

    @property
    def kind(self) -> str:
        return self["train"].kind


def _infer_classes(splits: dict, num_classes: int | None, labels: _Labels) -> int:
    """Classes of the task (at least 2), from the train and valid labels and any cheap split's."""
    names = [n for n in splits if n in ("train", "valid") or labels.cheap(n)]
    if num_classes is None:
        for name in names:
            if labels[name].labels.is_floating_point() or labels[name].labels.dtype == torch.bool:
                check_labels(name, labels[name].labels, 2)
        # At least 2, so that a single-class split is reported as such by check_labels.
        num_classes = max(max((int(labels[n].labels.max()) for n in names if labels[n].count), default=0) + 1, 2)
    for name in names:
        check_labels(name, labels[name].labels, int(num_classes))
    return int(num_classes)


def _chance_error(splits: dict, num_classes: int, labels: _Labels) -> float:
    """Error of always predicting the training split's majority class (token-level: majority token label), on valid (or train)."""
    train = labels["train"].labels
    majority = int(torch.bincount(train.long(), minlength=num_classes).argmax())
    target = labels["valid"].labels if "valid" in splits else train
    return float((target.long() != majority).float().mean())


def _provenance(model: nn.Module, splits: dict, *, num_classes: int, mode: str, l2: float | str, seed: int, device,
                batch_size: int, budget: int, model_name: str | None, dataset_name: str | None, chance: float,
                labels: _Labels, mask_key: str, label_key: str | None, autocast: str) -> dict:
    def size(name: str) -> int:
        known = split_size(splits[name])
        if known is None and name in labels.read:
            known = labels.read[name].sequences
        return -1 if known is None else int(known)

    sizes = {f"n_{k}": size(k) for k in splits}
    tokens = labels.kind == "tokens"
    data_attrs = {"examples": labels.kind, "mask_key": mask_key}
    if tokens:
        data_attrs.update({f"n_{k}_tokens": labels[k].count if k in splits else 0 for k in ("train", "valid", "test")})
    if label_key is not None:
        data_attrs["label_key"] = label_key
    return {
        "mode": mode,
        "model": model_name or type(model).__name__,
        "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
        "model_parameters": int(sum(p.numel() for p in model.parameters())),
        "dataset": dataset_name or "user data",
        **{f"n_{k}": sizes.get(f"n_{k}", 0) for k in ("train", "valid", "test")},
        **data_attrs,
        "num_classes": num_classes,
        "chance_error": chance,
        "l2": l2 if l2 == "auto" else float(l2),
        "seed": int(seed),
        "batch_size": int(batch_size),
        "budget": int(budget),
        "autocast": autocast,
        "device": str(device),
        "probekit_version": __version__,
        "torch_version": torch.__version__,
        "python_version": platform.python_version(),
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:1000],
        "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _progress(total: int | None, desc: str, quiet: bool, file: IO[str] | None = None):
    """The progress display of one stage (``update(n)``, a context manager).

    In Jupyter: tqdm's widget bar. On a terminal: a tqdm bar that clears itself
    when done. Anywhere else (a CI log, ``probekit demo > log``): one line when
    the stage ends, never a stream of carriage-return updates. ``quiet``: nothing.
    """
    from tqdm import auto, std

    file = sys.stderr if file is None else file
    if quiet:
        return std.tqdm(total=total, disable=True)
    if "ipykernel" in sys.modules:  # maybe a notebook: tqdm.auto decides (a console kernel gets the text bar)
        from tqdm.notebook import tqdm as widget_bar

        if issubclass(auto.tqdm, widget_bar):
            return auto.tqdm(total=total, desc=desc, unit="ex", leave=False)
    if getattr(file, "isatty", lambda: False)():
        return std.tqdm(total=total, desc=desc, unit="ex", leave=False, file=file)
    return _StageLine(desc, file)


class _StageLine:
    """Progress for output that is not a terminal: one line per stage, written when it ends."""

    def __init__(self, desc: str, file: IO[str]):
        self.desc, self.file, self.n = desc, file, 0
        self._start = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n

    def __enter__(self) -> _StageLine:
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            print(f"{self.desc}: {self.n:,} examples in {time.monotonic() - self._start:.1f} s", file=self.file, flush=True)


# ----------------------------------------------------------------------------- monitor
class ProbeMonitor:
    """Probes a model's layers while it trains, one epoch row at a time.

    Call :meth:`update` from your own training loop; the run so far is
    :attr:`dataset` (and, with ``store=``, a Zarr store that
    :func:`probekit.open_run` reads live).

    Modes:
        ``"snapshot"`` (default): each update runs the model once (eval mode,
        no gradients) over every split, caches the reduced features and fits
        every probe to its optimum. ``"online"``: forward hooks capture each
        training batch's features as your model computes them; call
        :meth:`step` after each training step to give every probe one
        optimiser step; each update evaluates the probes on valid/test.
        Online mode probes module outputs only (hooks cannot see functional
        nodes such as a residual ``add``; probe the enclosing block instead).

    Scoring in your own validation pass (online mode):
        A loop that already runs the model over a held-out split can score the
        probes there, so that :meth:`update` need not run the model over that
        split again: after each validation batch's forward pass (the hooks
        capture its features, as they do a training batch's), call
        :meth:`observe` with its labels and the split's name. The probes take no
        step on these batches; every head is scored and the layer's reported head
        (see ``l2``) is chosen at the update, as for the training scores. The
        next :meth:`update` reports the batches observed since the last one for
        that split, and runs its own pass only over the held-out splits you did
        not observe. The split must be one of ``data``'s (``"valid"`` or
        ``"test"``), which still fixes the run's layout and sizes; feed it the
        batches you validate on after the epoch's training steps::

            for x, y in train_loader:
                ...; loss.backward(); opt.step()
                mon.step(y)
            model.eval()
            with torch.no_grad():
                for x, y in valid_loader:
                    model(x)
                    mon.observe(y, split="valid")
            mon.update(epoch=epoch)

    Args:
        model: the model being trained; parameters, buffers and train/eval flags
            are left as they were after every call.
        data: train/valid(/test) splits (see :mod:`probekit.engine.features`).
        layers: probe point names, ``"blocks"`` or ``"all"``; default: the model's
            ``probe_layers`` attribute, else ``"blocks"``.
        reduce: reduction for every layer or ``{layer: spec}`` (see :mod:`probekit.engine.reduce`).
        store: Zarr store to write: a folder, or an fsspec URL (``s3://bucket/run.zarr``,
            ``memory://run.zarr``; see docs/store.md); ``None`` keeps the run in memory only.
        storage_options: the fsspec filesystem's options for a URL ``store`` (credentials,
            ``client_kwargs={"endpoint_url": ...}``), as :func:`probekit.open_run` takes them.
        mode: ``"snapshot"`` or ``"online"``.
        resume: continue an existing store made by the same setup.
        overwrite: replace an existing store.
        num_classes: classes of the probing task; when not given, ``data.info.num_classes``
            (a :class:`probekit.data.Splits`), else inferred from the labels.
        l2: probe L2 strength (per example, standardised features), or ``"auto"`` (the
            default): per layer and epoch, the value (and, under ``reduce="auto"``, the
            pooling candidate) with the lowest cross-entropy on a seeded held-out fold of
            the training split, then a refit on the whole split (see
            :mod:`probekit.engine.probes`); the run's ``l2`` variable records the value.
            A training split with fewer than 5 examples of some class falls back to
            ``l2=1e-3``, and the run's ``l2_fallback`` attribute says so. Online mode
            with ``"auto"`` runs a few L2 values as parallel heads per layer and reports
            the head with the lowest running training loss, each batch scored before
            the heads step on it (held-out batches).
        baselines: ``["random_init", "control"]`` or a subset (snapshot mode): ``random_init``
            fits the same probes on a freshly initialised, seeded copy of the architecture
            (computed once per run: it does not change as the model trains); ``control``
            fits them to Hewitt & Liang's control task and adds ``{split}_selectivity``
            (control error - task error). Stored in the run's ``baseline`` variable; see
            :mod:`probekit.engine.controls` and ``docs/methodology.md``.
        groups: the control task's example types, ``{split: one integer per example}``
            (e.g. the source image of augmented copies); default: each example is its own
            type (token-level runs: the token id, ``input_ids``).
        repeats: refit every probe this many times (snapshot mode), on stratified bootstrap
            resamples of the training split, with per-repeat seeds for random reductions,
            at the L2 value and candidate chosen on the whole split; with more than one,
            ``probe_repeat`` holds every repeat and ``probe`` their mean.
        metrics: optional measures: ``["mdl"]`` adds ``train_mdl`` (online code length in
            bits on the block schedule of :data:`probekit.engine.controls.MDL_BLOCKS`) and
            ``train_compression`` (uniform code / MDL), per layer (snapshot mode).
        probe_lr: the online probes' learning rate (``mode="online"``; never the model's).
        batch_size: extraction batch size for splits that are not DataLoaders.
        budget: the ``"auto"`` reduction's feature budget per probe.
        max_flatten: largest layer ``"flatten"`` accepts.
        seed: seed of random reductions (recorded in the store).
        max_iter: most L-BFGS iterations per probe fit.
        cache_bytes: above this many bytes, cached features go to disk (on a GPU the default is half its
            free memory, so that features stay on the device when they fit).
        quiet: no progress display and no plan printout.
        model_name: the model's name recorded in the run (default: its class name).
        dataset_name: the data's name recorded in the run (default: ``data.info.name``, else ``"user data"``).
        channels_last: extract with channels-last inputs (a conv net whose weights are channels-last).
        autocast: run the model's forward passes for the probes (and the reductions) under
            ``torch.autocast`` on the model's device: ``"bf16"`` (``"bfloat16"``), ``"fp16"``
            (``"float16"``) or the dtype; ``None`` (the default) is off. Features are cast to
            float32 before they are cached or fitted, so every fit reads float32. The run's
            ``autocast`` attribute records it (``"bf16"``, ``"fp16"`` or ``"none"``). Online mode
            applies it to the valid/test passes of :meth:`update`; the training batches' features
            come from your own forward pass, under whatever precision it runs.
        tracer_kwargs: added to the tracer's defaults (see :func:`probekit.list_layers`), e.g.
            ``{"leaf_modules": [MyBlock]}``.
        layouts: ``{layer: "map" | "tokens" | "vector"}`` where the inferred layout (see
            :func:`probekit.list_layers`) is wrong or unknown.
        label_key: the key of a row's label, for data whose items are mappings (a Hugging Face
            ``datasets`` row); the model's keyword arguments are all the row's other keys.
        mask_key: the key of a mapping batch's mask of real tokens, passed to mask-aware sequence
            reductions (``"attention_mask"``).

    Integer ``(N, T)`` labels with ``-100`` for "no label" make a token-level run
    (:attr:`examples` is ``"tokens"``): every labelled token is one probe example
    and metrics count tokens (see :mod:`probekit.engine.features`).

    Progress goes to stderr: a widget bar in Jupyter, a bar on a terminal, and
    one line per extraction stage when stderr is not a terminal (a log file).

    Data-parallel (``torch.distributed``, e.g. under ``torchrun``; see
    :mod:`probekit.engine.distributed`): every rank builds the same monitor
    with the same model and data, and each extracts its own shard of every
    split; the probes are fitted with sums over every rank, so every rank gets
    the same rows, which equal one process's to within one example of error.
    Only rank 0 writes ``store`` and prints; the run records ``world_size``.
    A model wrapped in ``DistributedDataParallel`` is probed through the module
    it wraps. In online mode every rank calls :meth:`step` after each of its
    training steps (the probes' gradients are summed over the ranks, so every
    rank must step the same number of times) and :meth:`update` at the same
    epochs. ``repeats=``, ``metrics=["mdl"]`` and the ``control`` baseline need
    one process.

    Example:
        >>> mon = pk.ProbeMonitor(model, (train, valid), store="runs/b.zarr")
        >>> for epoch in range(1, 6):
        ...     train_one_epoch(model)
        ...     mon.update(epoch=epoch, step=epoch * steps_per_epoch)
        >>> mon.dataset.probe.sel(metric="valid_error")
    """

    def __init__(
        self,
        model: nn.Module,
        data: object,
        *,
        layers: str | Sequence[str] | None = None,
        reduce: str | Mapping[str, str] | None = None,
        store: str | os.PathLike | None = None,
        storage_options: Mapping[str, object] | None = None,
        mode: Mode = "snapshot",
        resume: bool = False,
        overwrite: bool = False,
        num_classes: int | None = None,
        l2: float | Literal["auto"] = "auto",
        baselines: str | Sequence[str] | None = None,
        groups: Mapping[str, object] | None = None,
        repeats: int = 1,
        metrics: str | Sequence[str] | None = None,
        probe_lr: float = 1e-3,
        batch_size: int = 256,
        budget: int = DEFAULT_BUDGET,
        max_flatten: int = DEFAULT_MAX_FLATTEN,
        seed: int = 0,
        max_iter: int = 1000,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        quiet: bool = False,
        model_name: str | None = None,
        dataset_name: str | None = None,
        channels_last: bool = False,
        tracer_kwargs: Mapping[str, object] | None = None,
        layouts: Mapping[str, str] | None = None,
        label_key: str | None = None,
        mask_key: str = MASK_KEY,
        autocast: str | torch.dtype | None = None,
    ):
        check_params(
            MONITOR_CONSTRAINTS, model=model, tracer_kwargs=tracer_kwargs, layouts=layouts, num_classes=num_classes, budget=budget,
            max_flatten=max_flatten, seed=seed, store=store, storage_options=storage_options, mode=mode, resume=resume, overwrite=overwrite, l2=l2,
            baselines=baselines, groups=groups, repeats=repeats, metrics=metrics, probe_lr=probe_lr,
            batch_size=batch_size, max_iter=max_iter, cache_bytes=cache_bytes, quiet=quiet,
            model_name=model_name, dataset_name=dataset_name, channels_last=channels_last, label_key=label_key,
            mask_key=mask_key, autocast=autocast,
        )
        #: The ranks of a data-parallel run; None in one process (then no collective call is ever made).
        self.comm = distributed.current()
        model = distributed.unwrap(model)
        if self.comm is not None and not self.comm.root:
            quiet = True  # rank 0 prints
        self.model, self.mode, self.quiet = model, mode, quiet
        #: The dtype the probes' forward passes autocast to (``None`` when off, in full precision).
        self.autocast = autocast_dtype(autocast)
        self.label_key, self.mask_key = label_key, mask_key
        self.l2 = l2 if l2 == "auto" else float(l2)
        self.max_iter, self.batch_size, self.cache_bytes = int(max_iter), int(batch_size), cache_bytes
        self.baselines, self.repeats = controls.check_baselines(baselines), int(repeats)
        self.extra_metrics = controls.check_metrics(metrics)
        self.seed, self._reduce, self._budget, self._max_flatten = int(seed), reduce, budget, max_flatten
        if mode == "online" and (self.baselines or self.repeats > 1 or self.extra_metrics):
            raise ValueError(
                "baselines=, repeats= and metrics=['mdl'] refit probes to their optimum, which online mode never does; "
                "use mode='snapshot' (or pk.probe_checkpoints on saved snapshots)"
            )
        if self.comm is not None and (self.repeats > 1 or self.extra_metrics or "control" in self.baselines):
            raise ValueError(
                "repeats=, metrics=['mdl'] and the 'control' baseline resample or relabel the whole training split "
                f"in one process, and this one is rank {self.comm.rank} of {self.comm.world_size}; run them without "
                "torch.distributed (one process), or drop them"
            )
        self.channels_last = channels_last
        failure = None  # data-parallel: a refusal on one rank stops every rank (see Collective.settle)
        try:
            self.splits = as_splits(data)
            info = getattr(data, "info", None)
            # What the caller says wins over what the data implies.
            if dataset_name is None:
                dataset_name = getattr(info, "name", None)
            if num_classes is None:
                num_classes = getattr(info, "num_classes", None)
            labels = _Labels(self.splits, self.batch_size, label_key)
            self.num_classes = _infer_classes(self.splits, num_classes, labels)
            #: What a probe's examples are, ``"examples"`` or ``"tokens"`` (per-token labels).
            self.examples = labels.kind
            if self.examples == "tokens" and mode == "online":
                raise ValueError("per-token labels need mode='snapshot' (online probes read whole training batches)")
            self.device = model_device(model)
            example = _first_batch(self.splits["train"], 2, label_key)
            check_inputs(model, example)
            example = to_device(example, self.device)
            self.graph = LayerGraph(model, example, tracer_kwargs=tracer_kwargs, layouts=layouts)
            self.plan = build_plan(self.graph, layers, reduce, num_classes=self.num_classes, seed=seed, budget=budget,
                                    max_flatten=max_flatten, token_level=self.examples == "tokens",
                                    examples=split_size(self.splits["train"]))
            for reducer in self.plan.reducers.values():
                reducer.to(self.device)
            self.layers = self.plan.layers
            self.metrics = metric_names(list(self.splits), self.num_classes, control="control" in self.baselines,
                                        mdl="mdl" in self.extra_metrics)
            self.groups = controls.check_groups(groups, {k: split_size(v) for k, v in self.splits.items()})
            if self.groups is not None and (self.examples == "tokens" or "control" not in self.baselines):
                raise ValueError("groups= are the control task's example types: pass them with baselines=['control'] "
                                 "in a run of per-example labels (token-level runs take each token's id as its type)")
            chance = _chance_error(self.splits, self.num_classes, labels)
            attrs = _provenance(model, self.splits, num_classes=self.num_classes, mode=mode, l2=l2, seed=seed,
                                device=self.device, batch_size=self.batch_size, budget=budget, model_name=model_name,
                                dataset_name=dataset_name, chance=chance, labels=labels, mask_key=mask_key,
                                label_key=label_key, autocast=autocast_name(self.autocast))
            attrs.update(self._control_attrs(labels["train"].labels))
            attrs["world_size"] = 1 if self.comm is None else self.comm.world_size
        except Exception as error:
            if self.comm is None:
                raise
            failure = error
        if self.comm is not None:
            self.comm.settle(failure)
            self.comm.agree({
                "number of classes": self.num_classes, "kind of labels": self.examples,
                "split sizes": {k: split_size(v) for k, v in self.splits.items()}, "layers": list(self.layers),
                "features per layer": [self.plan.reducers[n].out_features for n in self.layers],
                "mode": mode, "l2": self.l2, "seed": self.seed,
            })
        self.layout = self.plan.layout(self.metrics, attrs)
        self.layout.baselines, self.layout.repeats = self.baselines, self.repeats
        self._random_init: tuple | None = None  # the random-init baseline, computed once
        # Built once and reused every epoch: the extractors and the repeats' seeded plans.
        self._built_on = self._modules()
        # Online mode scores held-out splits through its hooks: its extractor is built only if asked for.
        self._run_extractor = build_extractor(self.graph, self.plan.reducers) if mode == "snapshot" else None
        self._repeat_extractors: dict[tuple[int, tuple[str, ...]], tuple[dict, object]] = {}
        if "random_init" in self.baselines:
            self._fresh, permuted = controls.random_init_copy(model, seed=self.seed)
            self._fresh_graph = LayerGraph(self._fresh, example, tracer_kwargs=tracer_kwargs, layouts=layouts)
            if permuted:
                self.layout.attrs["random_init_permuted"] = ", ".join(permuted)[:1000]
        self._writer = self._open_writer(store, resume=resume, overwrite=overwrite, storage_options=storage_options)
        #: The store, a local ``Path`` or the URL of an object store.
        self.store = store_location(store) if store is not None else None
        self.rows: list[EpochRow] = list(self._writer.rows) if self._writer else []
        if self.comm is not None and store is not None:  # the rows rank 0 found when resuming
            self.rows = self.comm.broadcast(self.rows)
        self._clock = time.monotonic() - (self.rows[-1].wall_time if self.rows and math.isfinite(self.rows[-1].wall_time) else 0.0)
        if not quiet:
            print(self.plan)
        self._online: OnlineProbes | None = None
        #: Online mode: per held-out split, the scores of the batches fed to observe() since the last update.
        self._observed: dict[str, dict] = {}
        if mode == "online":
            self._start_online(probe_lr)

    def _open_writer(self, store, *, resume: bool, overwrite: bool,
                     storage_options: Mapping[str, object] | None) -> RunWriter | None:
        """The run's writer: on rank 0 only when data-parallel (its refusal stops every rank)."""
        if store is None:
            return None

        def open_writer() -> RunWriter:
            return RunWriter(store, self.layout, resume=resume, overwrite=overwrite, storage_options=storage_options)

        return open_writer() if self.comm is None else self.comm.on_root(open_writer)

    def _start_online(self, probe_lr: float) -> None:
        modules = {}
        for name in self.layers:
            point = self.graph.point(name)
            module = None if point.name == INPUT else (name if self._is_module(name) else point.module)
            if point.name != INPUT and module is None:
                parts = point.name.split(".")
                enclosing = [".".join(parts[:k]) for k in range(len(parts) - 1, 0, -1) if self._is_module(".".join(parts[:k]))]
                hint = repr(enclosing[0]) if enclosing else "a module output"
                raise ValueError(
                    f"online mode reads module outputs with hooks, and {name!r} is a functional node ({point.op}); "
                    f"probe {hint} instead, or use mode='snapshot'"
                )
            modules[name] = module
        self._hooks = HookExtractor(self.model, self.plan.reducers, modules)
        self._hooks.attach()
        dims = {n: self.plan.reducers[n].out_features for n in self.layers}
        self._online = OnlineProbes(dims, self.num_classes, lr=probe_lr, l2=self.l2, comm=self.comm).to(self.device)

    def _control_attrs(self, train_labels: torch.Tensor) -> dict:
        """The run attributes of its controls: baselines, repeats, metrics, and the ``l2="auto"`` fallback."""
        attrs = {"baselines": ", ".join(self.baselines), "repeats": self.repeats}
        if self.extra_metrics:
            attrs["metrics"] = ", ".join(self.extra_metrics)
            attrs["mdl_blocks"] = ", ".join(f"{f:g}" for f in controls.MDL_BLOCKS)
        if self.l2 == "auto" and self.mode == "snapshot":
            counts = torch.bincount(train_labels.reshape(-1).long().cpu(), minlength=self.num_classes)
            fewest = int(counts.min())
            if fewest < MIN_PER_CLASS:
                attrs["l2_fallback"] = (
                    f"l2='auto' needs at least {MIN_PER_CLASS} training examples of every class to hold out a fold, and "
                    f"class {int(counts.argmin())} has {fewest}; every probe was fitted with the fixed l2={FALLBACK_L2:g}"
                )
                warnings.warn(attrs["l2_fallback"] + " (recorded as the run's l2_fallback attribute)",
                              RuntimeWarning, stacklevel=3)
        return attrs

    def _is_module(self, name: str) -> bool:
        try:
            self.model.get_submodule(name)
            return True
        except AttributeError:
            return False

    # ---------------------------------------------------------------- state
    @property
    def completed_epochs(self) -> int:
        """Epoch rows written so far (including those found when resuming)."""
        return len(self.rows)

    @property
    def next_epoch(self) -> int:
        """The epoch number :meth:`update` uses when none is given."""
        return self.rows[-1].epoch + 1 if self.rows else 0

    @property
    def dataset(self) -> xr.Dataset:
        """The run so far, as an ``xarray.Dataset`` (see docs/store.md)."""
        return build_dataset(self.layout, self.rows)

    # ---------------------------------------------------------------- online
    def step(self, labels: torch.Tensor) -> None:
        """Online mode: one optimiser step of every probe on the batch the model just saw.

        Call it after your model's forward pass (the hooks captured that batch's
        features); it does not touch the model or its gradients.
        """
        if self._online is None:
            raise RuntimeError("step() is for mode='online'; in snapshot mode call update() once per epoch")
        features = self._hooks.latest
        if not features:
            raise RuntimeError("step() found no captured features; call it after the model's forward pass on the batch")
        labels = torch.as_tensor(labels).to(self.device).long().reshape(-1)
        self._online.step(features, labels)

    def observe(self, labels: torch.Tensor, *, split: str = "valid") -> None:
        """Online mode: score every probe on a held-out batch the model just saw, in your own validation loop.

        Call it after the model's forward pass on a batch of ``split`` (the
        hooks captured that batch's features); the probes take no step. The next
        :meth:`update` reports the batches of ``split`` observed since the last
        update instead of running the model over that split itself (see
        "Scoring in your own validation pass" above).

        Example:
            >>> with torch.no_grad():
            ...     for x, y in valid_loader:
            ...         model(x)
            ...         mon.observe(y, split="valid")
        """
        if self._online is None:
            raise RuntimeError("observe() is for mode='online'; in snapshot mode update() scores every split itself")
        held_out = [s for s in self.splits if s != "train"]
        if split not in held_out:
            raise ValueError(f"split={split!r} is not a held-out split of this monitor; choose from: "
                             f"{', '.join(map(repr, held_out)) or 'none (give data= a valid or test split)'}")
        features = self._hooks.latest
        if not features:
            raise RuntimeError("observe() found no captured features; call it after the model's forward pass on the batch")
        labels = torch.as_tensor(labels).to(self.device).long().reshape(-1)
        rows = {int(v.shape[0]) for v in features.values()}
        if rows != {labels.shape[0]}:
            raise ValueError(f"observe() got {labels.shape[0]} labels for a batch of {min(rows)} examples; pass the "
                             "labels of the batch the model just ran on, once")
        totals, finite = self._online.evaluate(features, labels)
        self._hooks.latest = {}  # each batch is observed once
        seen = self._observed.get(split)
        if seen is None:
            self._observed[split] = {"totals": totals, "n": int(labels.shape[0]), "finite": finite}
        else:
            seen["totals"] += totals
            seen["n"] += int(labels.shape[0])
            seen["finite"] = [a and b for a, b in zip(seen["finite"], finite)]

    # ---------------------------------------------------------------- update
    def update(self, *, epoch: int | None = None, step: int | None = None, model_loss: float | None = None,
               model_error: float | None = None, model_valid_loss: float | None = None) -> xr.Dataset:
        """Probe the model as it is now and write one epoch row.

        Args:
            epoch: the row's epoch number, 0 or more (default: one more than the last).
            step: the global training step (minibatches seen); ``None`` when unknown
                (the store records an unknown step as -1).
            model_loss, model_error: the model's own figures for this epoch (its training loss and error).
            model_valid_loss: the model's own loss on its validation data, as your loop measured it
                (the run's ``model_valid_loss``; NaN when not given).

        Returns:
            The new row as a one-epoch dataset.

        Example:
            >>> mon.update(epoch=3, step=3 * steps_per_epoch, model_loss=0.41)
        """
        check_params(UPDATE_CONSTRAINTS, epoch=epoch, step=step)
        epoch = self.next_epoch if epoch is None else int(epoch)
        if self.rows and epoch <= self.rows[-1].epoch:
            raise ValueError(f"epoch {epoch} is not after the last written epoch {self.rows[-1].epoch}; epochs must increase")
        with preserved_state(self.model):
            self.model.eval()
            parts = self._snapshot() if self._online is None else self._online_scores()
        nonfinite = parts["nonfinite"]
        row = EpochRow(
            epoch=epoch, step=_UNKNOWN_STEP if step is None else int(step), **parts,
            model_loss=float("nan") if model_loss is None else float(model_loss),
            model_error=float("nan") if model_error is None else float(model_error),
            model_valid_loss=float("nan") if model_valid_loss is None else float(model_valid_loss),
            wall_time=time.monotonic() - self._clock,
        )
        bad = [n for n, flag in zip(self.layers, nonfinite) if flag]
        if bad:
            warnings.warn(
                f"layers {bad} produced NaN or Inf features at epoch {epoch}; their metrics are NaN and flagged "
                "in the store ('nonfinite'); every other layer was probed normally",
                RuntimeWarning, stacklevel=2,
            )
        def append() -> None:
            if self._writer is not None:
                self._writer.append(row)

        if self.comm is None:
            append()
        else:  # rank 0 writes; a write that fails there (a full disk) stops every rank, none waits at a collective
            self.comm.on_root(append)
        if self._writer is not None:
            self.rows = self._writer.rows
        else:
            self.rows.append(row)
        if self._online is not None:
            self._online.reset_running()
        return build_dataset(self.layout, [row])

    def _extract_all(self, run, splits: Sequence[str], reducers: Mapping | None = None) -> dict:
        reducers = self.plan.reducers if reducers is None else reducers
        dims = {n: reducers[n].out_features for n in self.layers if n in reducers}
        out = {}
        for split in splits:
            data = self.splits[split]
            with _progress(split_size(data), f"{split} features", self.quiet) as bar:
                out[split] = extract(
                    run, data, name=split, dims=dims, num_classes=self.num_classes, batch_size=self.batch_size,
                    device=self.device, channels_last=self.channels_last, cache_bytes=self.cache_bytes, progress=bar,
                    autocast=self.autocast, label_key=self.label_key, mask_key=self.mask_key, comm=self.comm,
                )
        return out

    def _snapshot(self) -> dict:
        """Every probe fitted to its optimum on this epoch's features, with the run's controls."""
        cached = self._extract_all(self._extractor(), list(self.splits))
        nonfinite = np.array([any(c.nonfinite[layer] for c in cached.values()) for layer in self.layers], bool)
        kept = [layer for layer, bad in zip(self.layers, nonfinite) if not bad]
        views = {split: c.features for split, c in cached.items()}
        labels = {split: c.labels for split, c in cached.items()}
        fits = self._fit(views["train"], labels["train"], kept, self.l2, groups=self._sequences(cached),
                         positions=self._positions(cached))
        probe = self._scores(fits, views, labels)
        parts = {
            "nonfinite": nonfinite,
            "iterations": np.array([fits[n].iterations if n in fits else 0 for n in self.layers], np.int64),
            "converged": np.array([fits[n].converged if n in fits else False for n in self.layers], bool),
            "l2": np.array([fits[n].l2 if n in fits else np.nan for n in self.layers], np.float64),
            "reduction_used": [self._reduction_used(n, fits.get(n)) for n in self.layers],
        }
        if self.repeats > 1:
            parts["repeat"] = self._repeat_scores(cached, fits)
            with warnings.catch_warnings():  # a layer with no finite repeat stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                probe = np.nanmean(parts["repeat"], axis=1)
        if "mdl" in self.extra_metrics:
            self._mdl(views["train"], labels["train"], fits, probe)
        if self.baselines:
            baseline = np.full((len(self.layers), len(self.baselines), len(self.metrics)), np.nan)
            if "random_init" in self.baselines:
                baseline[:, self.baselines.index("random_init")] = self._random_init_scores()
            if "control" in self.baselines:
                control = self._control_labels(cached)
                control_fits = self._fit(views["train"], control["train"], kept, self.l2, groups=self._sequences(cached))
                baseline[:, self.baselines.index("control")] = self._scores(control_fits, views, control)
                self._selectivity(probe, baseline[:, self.baselines.index("control")])
                if "repeat" in parts:
                    for r in range(self.repeats):
                        self._selectivity(parts["repeat"][:, r], baseline[:, self.baselines.index("control")])
            parts["baseline"] = baseline
        return {"probe": probe, **parts}

    def _fit(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor, layers: Sequence[str],
             l2: float | str | Mapping[str, float], candidates: Mapping[str, Mapping[str, slice]] | None = None,
             groups: torch.Tensor | None = None, positions: torch.Tensor | None = None) -> dict:
        """One probe per layer of ``layers``; by default each reducer's candidates (a ``reduce="auto"`` pyramid) compete.

        ``groups`` (each row's sequence, in a token-level run) keeps sequences whole in the held-out fold;
        ``positions`` (data-parallel) places each row of this rank's shard in the whole split.
        """
        if candidates is None:
            candidates = {n: dict(getattr(self.plan.reducers[n], "candidates", None) or {}) for n in layers}
        return fit_probes(
            {n: features[n].to(self.device) for n in layers}, labels, self.num_classes, l2=l2,
            candidates={n: c for n, c in candidates.items() if n in layers and c}, seed=self.seed, max_iter=self.max_iter,
            groups=groups, comm=self.comm, positions=positions,
        )

    def _positions(self, cached: Mapping) -> torch.Tensor | None:
        """Data-parallel: each training row's position in the whole split (its sequence's); None in one process."""
        return cached["train"].groups if self.comm is not None else None

    def _sequences(self, cached: Mapping) -> torch.Tensor | None:
        """The training rows' sequences in a token-level run (for folds and resamples), else None."""
        return cached["train"].groups if self.examples == "tokens" else None

    def _scores(self, fits: Mapping, features: Mapping[str, Mapping[str, torch.Tensor]],
                labels: Mapping[str, torch.Tensor]) -> np.ndarray:
        """``(layer, metric)`` scores of ``fits`` on every split (NaN for layers without a fit and unscored metrics)."""
        probe = np.full((len(self.layers), len(self.metrics)), np.nan)
        for i, layer in enumerate(self.layers):
            if layer not in fits:
                continue
            for split, by_layer in features.items():
                scores = score(fits[layer].logits, by_layer[layer].to(self.device), labels[split].to(self.device),
                               self.num_classes, comm=self.comm)
                for measure, value in scores.items():
                    probe[i, self.metrics.index(metric_name(split, measure))] = value
        return probe

    def _reduction_used(self, layer: str, fit) -> str:
        """The reduction ``fit`` read: the candidate it chose among an ``auto(...)`` pyramid's, else the layer's own."""
        spec = getattr(fit, "spec", None)
        return spec if spec is not None else self.plan.reducers[layer].describe()

    def _chosen(self, fits: Mapping) -> tuple[dict, dict]:
        """The L2 value and the candidate each fit chose, to refit with them fixed."""
        l2 = {n: float(f.l2) for n, f in fits.items()}
        candidates = {n: {f.spec: f.columns} for n, f in fits.items() if getattr(f, "spec", None) is not None}
        return l2, candidates

    def _selectivity(self, probe: np.ndarray, control: np.ndarray) -> None:
        """``{split}_selectivity`` = control error - task error, in place."""
        for split in self.splits:
            error = self.metrics.index(metric_name(split, "error"))
            probe[:, self.metrics.index(metric_name(split, "selectivity"))] = control[:, error] - probe[:, error]

    def _repeat_scores(self, cached: Mapping, fits: Mapping) -> np.ndarray:
        """``(layer, repeat, metric)``: each repeat refits on a stratified bootstrap resample of the training split,
        with its own seed for random reductions, at the L2 value and candidate chosen on the whole split."""
        l2, candidates = self._chosen(fits)
        out = np.full((len(self.layers), self.repeats, len(self.metrics)), np.nan)
        labels = {split: c.labels for split, c in cached.items()}
        for r in range(self.repeats):
            views = {split: dict(c.features) for split, c in cached.items()}
            seeded, run = self._repeat_extractor(r, list(fits))
            bad = set()
            if seeded:
                extra = self._extract_all(run, list(self.splits), reducers=seeded)
                for split, c in extra.items():
                    views[split].update(c.features)
                    bad.update(n for n, flag in c.nonfinite.items() if flag)
            rows = controls.bootstrap_indices(labels["train"], self.seed, r, groups=self._sequences(cached))
            layers = [n for n in fits if n not in bad]
            train = {n: views["train"][n].to(self.device)[rows.to(self.device)] for n in layers}
            refits = self._fit(train, labels["train"][rows], layers, {n: l2[n] for n in layers}, candidates)
            out[:, r] = self._scores(refits, views, labels)
        return out

    def _modules(self) -> tuple[int, ...]:
        """The identity of every module of the model: the extractors hold these very modules."""
        return tuple(id(module) for module in self.model.modules())

    def _extractor(self):
        """The run's extractor, built once; rebuilt (the repeats' too) if a module of the model was replaced."""
        modules = self._modules()
        if modules != self._built_on or self._run_extractor is None:
            self._built_on = modules
            self._run_extractor = build_extractor(self.graph, self.plan.reducers)
            self._repeat_extractors.clear()
        return self._run_extractor

    def _repeat_extractor(self, repeat: int, layers: Sequence[str]) -> tuple[dict, object]:
        """``(reducers, extractor)`` of repeat ``repeat`` (see :meth:`_repeat_reducers`), built on first use and kept."""
        key = (repeat, tuple(layers))
        if key not in self._repeat_extractors:
            seeded = self._repeat_reducers(repeat, layers)
            self._repeat_extractors[key] = (seeded, build_extractor(self.graph, seeded) if seeded else None)
        return self._repeat_extractors[key]

    def _repeat_reducers(self, repeat: int, layers: Sequence[str]) -> dict:
        """The reducers of repeat ``repeat`` that differ from the run's (seeded ones: subsets, projections)."""
        plan = build_plan(self.graph, self.layers, self._reduce, num_classes=self.num_classes,
                          seed=controls.repeat_seed(self.seed, repeat), budget=self._budget, max_flatten=self._max_flatten,
                          token_level=self.examples == "tokens", examples=split_size(self.splits["train"]))
        return {n: plan.reducers[n].to(self.device) for n in layers
                if plan.reducers[n].describe() != self.plan.reducers[n].describe()}

    def _mdl(self, features: Mapping[str, torch.Tensor], labels: torch.Tensor, fits: Mapping, probe: np.ndarray) -> None:
        """``train_mdl`` and ``train_compression`` in place: the online code at each layer's chosen L2 and candidate."""
        l2, candidates = self._chosen(fits)

        def fit(block: Mapping[str, torch.Tensor], block_labels: torch.Tensor) -> dict:
            refits = self._fit(block, block_labels, list(block), {n: l2[n] for n in block}, candidates)
            return {n: f.logits for n, f in refits.items()}

        codes = controls.online_code_length({n: features[n].to(self.device) for n in fits}, labels, self.num_classes,
                                            fit=fit, seed=self.seed)
        for layer, (bits, uniform) in codes.items():
            i = self.layers.index(layer)
            probe[i, self.metrics.index(metric_name("train", "mdl"))] = bits
            probe[i, self.metrics.index(metric_name("train", "compression"))] = uniform / bits

    def _random_init_scores(self) -> np.ndarray:
        """The random-init baseline's ``(layer, metric)`` scores, computed on the first call and kept."""
        if self._random_init is None:
            cached = self._extract_all(build_extractor(self._fresh_graph, self.plan.reducers), list(self.splits))
            kept = [n for n in self.layers if not any(c.nonfinite[n] for c in cached.values())]
            views = {split: c.features for split, c in cached.items()}
            labels = {split: c.labels for split, c in cached.items()}
            fits = self._fit(views["train"], labels["train"], kept, self.l2, groups=self._sequences(cached),
                             positions=self._positions(cached))
            self._random_init = self._scores(fits, views, labels)
            del self._fresh, self._fresh_graph  # the copy's memory goes back
        return self._random_init

    def _control_labels(self, cached: Mapping) -> dict:
        """The control task's labels of every split (fixed for the run)."""
        if getattr(self, "_control", None) is None:
            if self.examples == "tokens":
                types = {split: self._token_types(split) for split in cached}
            else:
                types = controls.example_types({split: int(c.labels.shape[0]) for split, c in cached.items()}, self.groups)
            for split, c in cached.items():
                if types[split].numel() != c.labels.shape[0]:
                    raise ValueError(
                        f"the control task found {types[split].numel()} example types in the {split} split for "
                        f"{c.labels.shape[0]} probe examples; give groups= one entry per example"
                    )
            self._control = controls.control_labels(types, cached["train"].labels, self.num_classes, seed=self.seed)
        return {split: labels.to(self.device) for split, labels in self._control.items()}

    def _token_types(self, split: str) -> torch.Tensor:
        """A token-level split's token ids at its labelled tokens, in the order of its probe examples."""
        out = []
        for inputs, y in batches(self.splits[split], self.batch_size, label_key=self.label_key, name=split):
            ids = inputs.get("input_ids") if isinstance(inputs, Mapping) else inputs
            ids = ids[0] if isinstance(ids, (tuple, list)) else ids
            y = torch.as_tensor(y)
            if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or tuple(ids.shape) != tuple(y.shape):
                raise ValueError(
                    f"the control task of a token-level run takes each token's id as its type, and the {split} split's "
                    "batches hold no integer (N, T) token ids ('input_ids') matching the labels; drop 'control' from baselines="
                )
            out.append(ids[y != IGNORE_INDEX].cpu())
        return torch.cat(out)

    def _held_out_pass(self, split: str) -> dict:
        """Online mode: one pass of the model over a held-out split, each batch scored as :meth:`observe` scores it.

        The hooks that capture the training batches reduce these batches too, so no
        feature is cached: every head of every probe is scored batch by batch.
        """
        data, seen = self.splits[split], {"totals": None, "n": 0, "finite": [True] * len(self.layers)}
        reducers = list(self._hooks.reducers.values())
        mixed = torch.autocast(self.device.type, dtype=self.autocast) if self.autocast is not None else nullcontext()
        if self.comm is None:
            source = batches(data, self.batch_size, label_key=self.label_key, name=split)
        else:  # this rank's shard; the totals are summed over the ranks in _online_scores
            source = ((inputs, y) for inputs, y, _ in shard_batches(data, self.batch_size, self.comm,
                                                                     label_key=self.label_key, name=split))
        with _progress(split_size(data), f"{split} scores", self.quiet) as bar, torch.no_grad():
            for inputs, y in source:
                y = torch.as_tensor(y).reshape(-1)
                check_labels(split, y, self.num_classes, part=self.comm is not None)
                inputs = to_device(inputs, self.device, channels_last=self.channels_last)
                mask = attention_mask(inputs, self.mask_key)
                for reducer in reducers:
                    reducer.batch_mask = mask
                self._hooks.latest = {}
                try:
                    with mixed:
                        call_model(self.model, inputs)
                finally:
                    for reducer in reducers:
                        reducer.batch_mask = None
                totals, finite = self._online.evaluate(self._hooks.latest, y.to(self.device).long())
                self._hooks.latest = {}
                seen["totals"] = totals if seen["totals"] is None else seen["totals"] + totals
                seen["n"] += int(y.shape[0])
                seen["finite"] = [a and b for a, b in zip(seen["finite"], finite)]
                bar.update(int(y.shape[0]))
        if not seen["n"] and self.comm is None:
            raise ValueError(f"the {split} split is empty; give it at least one example per class")
        return seen

    def _sum_observed(self, observed: dict) -> None:
        """Data-parallel: every held-out split's totals, counts and finite flags summed over the ranks, in place."""
        heads = len(self._online.l2_path)
        for split in sorted(observed):
            seen = observed[split]
            totals = seen["totals"]
            if totals is None:  # this rank's shard held no example
                totals = torch.zeros(len(self.layers), 3, heads, dtype=torch.float64, device=self.device)
            count = torch.full((1, 3, heads), float(seen["n"]), dtype=torch.float64, device=totals.device)
            summed = self.comm.sum_(torch.cat([totals.nan_to_num(0.0), count]))
            bad = self.comm.any([not ok for ok in seen["finite"]])
            seen["totals"], seen["n"] = summed[:-1], int(summed[-1, 0, 0].item())
            seen["finite"] = [not b for b in bad]
            if not seen["n"]:
                raise ValueError(f"the {split} split is empty; give it at least one example per class")

    def _online_scores(self) -> dict:
        """Online mode's row: the running training scores, and every held-out split's (observed, else one pass)."""
        observed, self._observed = self._observed, {}
        for split in self.splits:
            if split != "train" and split not in observed:
                observed[split] = self._held_out_pass(split)
        if self.comm is not None:
            self._online.sum_running()
            self._sum_observed(observed)
        n_layers, metrics = len(self.layers), self.metrics
        probe = np.full((n_layers, len(metrics)), np.nan)
        nonfinite = np.zeros(n_layers, bool)
        for i, layer in enumerate(self.layers):
            for measure, value in self._online.train_scores(layer).items():
                probe[i, metrics.index(f"train_{measure}")] = value
            nonfinite[i] = any(not seen["finite"][i] for seen in observed.values())
            if nonfinite[i]:
                probe[i] = np.nan
                continue
            head = self._online.head_of(layer)
            for split, seen in observed.items():
                loss, error, top5 = (seen["totals"][i, :, head] / seen["n"]).tolist()
                measures = {"error": error, "loss": loss, **({"top5": top5} if self.num_classes > 5 else {})}
                for measure, value in measures.items():
                    probe[i, metrics.index(f"{split}_{measure}")] = value
        l2_of = getattr(self._online, "l2_of", None)
        l2 = [l2_of(layer) if l2_of is not None else self.l2 for layer in self.layers]
        return {"probe": probe, "nonfinite": nonfinite, "iterations": np.full(n_layers, self._online.steps, np.int64),
                "converged": np.ones(n_layers, bool), "l2": np.array(l2, np.float64)}

    # ---------------------------------------------------------------- lifetime
    def close(self) -> None:
        """Remove hooks and release the store; the run stays readable."""
        if self._online is not None:
            self._hooks.detach()
        if self._writer is not None:
            self._writer.close()

    def __enter__(self) -> ProbeMonitor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            return
