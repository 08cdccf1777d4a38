"""Figure 5: training the paper's convnet with a ProbeMonitor vs training without.

The paper's MNIST convnet on the embedded digits upsampled to 28 x 28
(1,400 train, 397 valid), SGD with momentum, batch 64. Every run starts
from the same weights. ``online``: forward hooks capture each training
batch's reduced features, ``monitor.step`` gives every probe one optimiser
step, and each epoch ends with ``monitor.update`` (probes scored on valid).
``snapshot``: each epoch ends with ``monitor.update``, which runs the model
over train and valid and fits every probe to its optimum. Building the
monitor (tracing, plan) is inside the timer.
"""

from __future__ import annotations

import copy

import torch
from torch.nn import functional as F

from benchmarks.measure import Row, interleave
from benchmarks.workloads import digits28, paper_convnet

import probekit as pk

CONFIG = {"quick": {"epochs": 1, "reps": 1, "train": 320}, "full": {"epochs": 3, "reps": 5, "train": 1400}}


def _train(model, data, epochs: int, monitor=None) -> None:
    x, y = data["train"]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for start in range(0, len(y), 64):
            index = order[start:start + 64]
            opt.zero_grad()
            loss = F.cross_entropy(model(x[index]), y[index])
            loss.backward()
            opt.step()
            if monitor is not None and monitor.mode == "online":
                monitor.step(y[index])
        if monitor is not None:
            monitor.update(epoch=epoch)


def run(size: str) -> list[Row]:
    config = CONFIG[size]
    data = digits28()
    data["train"] = tuple(t[: config["train"]] for t in data["train"])
    initial = paper_convnet()
    rows = []

    def plain():
        _train(copy.deepcopy(initial), data, config["epochs"])

    for mode, target in (("online", 1.25), ("snapshot", None)):
        def monitored(mode=mode):
            model = copy.deepcopy(initial)
            with pk.ProbeMonitor(model, data, mode=mode, quiet=True, num_classes=10) as monitor:
                _train(model, data, config["epochs"], monitor)

        pairs = interleave(plain, monitored, reps=config["reps"], warmup=size == "full")
        rows.append(Row(
            figure="5 monitoring", case=f"paper convnet, digits 28px, {config['epochs']} epochs, {mode}",
            baseline="training alone", baseline_value=pairs.baseline_median, probekit_value=pairs.candidate_median,
            unit="s", target=target,
            note=f"{len(initial.probe_layers)} probe points, update every epoch",
            pair_ratio=pairs.ratio, extra={**pairs.as_dict()},
        ))
    return rows
