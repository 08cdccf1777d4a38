"""Figure 5: training a model with a ProbeMonitor vs training without.

The paper's MNIST convnet on the embedded digits upsampled to 28 x 28
(1,400 train, 397 valid), and a ResNet-18 (its 15 default probe points) on
64 x 64 generated images, which shows how the cost scales once the model is
more than a few small layers; SGD with momentum, batch 64. Every run starts
from the same weights. ``online``: forward hooks capture each training
batch's reduced features, ``monitor.step`` gives every probe one optimiser
step, and each epoch ends with ``monitor.update`` (probes scored on valid).
``snapshot``: each epoch ends with ``monitor.update``, which runs the model
over train and valid and fits every probe to its optimum. Building the
monitor (tracing, plan) is inside the timer.

``online, in the loop's validation pass`` (the convnet): a training loop that
validates after every epoch, as most do; the baseline is that loop without a
monitor (training and its validation pass), and the monitored loop calls
``monitor.observe`` after each validation batch, so that ``monitor.update``
runs no pass of its own over valid.
"""

from __future__ import annotations

import copy

import torch
from torch.nn import functional as F

from benchmarks.measure import Row, interleave
from benchmarks.workloads import NUM_CLASSES, digits28, images, paper_convnet

import probekit as pk

CONFIG = {
    "quick": {"epochs": 1, "reps": 1, "train": 320, "resnet": {"size": 32, "train": 40, "valid": 20, "epochs": 1, "reps": 1}},
    "full": {"epochs": 3, "reps": 5, "train": 1400, "resnet": {"size": 64, "train": 512, "valid": 128, "epochs": 2, "reps": 3}},
}


def _train(model, data, epochs: int, monitor=None, validate: bool = False) -> None:
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
        if validate:  # the loop's own validation pass, which an online monitor observes
            model.eval()
            vx, vy = data["valid"]
            with torch.no_grad():
                for start in range(0, len(vy), 256):
                    model(vx[start:start + 256])
                    if monitor is not None:
                        monitor.observe(vy[start:start + 256], split="valid")
        if monitor is not None:
            monitor.update(epoch=epoch)


def _cases(config: dict):
    """(case, initial model, data, epochs, reps, validated) of each model this figure trains;
    ``validated``: also the online row of a loop with its own validation pass."""
    data = digits28()
    data["train"] = tuple(t[: config["train"]] for t in data["train"])
    yield "paper convnet, digits 28px", paper_convnet(), data, config["epochs"], config["reps"], True
    import torchvision

    resnet = config["resnet"]
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=NUM_CLASSES)
    data = {"train": images(resnet["train"], resnet["size"], seed=1), "valid": images(resnet["valid"], resnet["size"], seed=2)}
    yield f"resnet18 {resnet['size']}px, {resnet['train']} images", model, data, resnet["epochs"], resnet["reps"], False


def run(size: str) -> list[Row]:
    config = CONFIG[size]
    rows = []
    for case, initial, data, epochs, reps, validated in _cases(config):
        points = {}
        variants = [("online", 1.25, False), ("snapshot", None, False)] + ([("online", 1.25, True)] if validated else [])
        for mode, target, validate in variants:
            def plain(initial=initial, data=data, epochs=epochs, validate=validate):
                _train(copy.deepcopy(initial), data, epochs, validate=validate)

            def monitored(mode=mode, initial=initial, data=data, epochs=epochs, validate=validate):
                model = copy.deepcopy(initial)
                with pk.ProbeMonitor(model, data, mode=mode, quiet=True, num_classes=NUM_CLASSES) as monitor:
                    _train(model, data, epochs, monitor, validate=validate)
                points["n"] = len(monitor.layers)

            pairs = interleave(plain, monitored, reps=reps)  # the warm-up also takes first-call costs
            rows.append(Row(
                figure="5 monitoring", case=f"{case}, {epochs} epochs, {mode}" + (", in the loop's validation pass" if validate else ""),
                baseline="training and its validation pass" if validate else "training alone",
                baseline_value=pairs.baseline_median, probekit_value=pairs.candidate_median,
                unit="s", target=target, note=f"{points['n']} probe points, update every epoch",
                pair_ratio=pairs.ratio, extra={**pairs.as_dict()},
            ))
    return rows

