"""``bypass``: the paper's pathological skip connection, probed after 0, 500 and 2,000 minibatches.

128 tanh layers with one skip around the first half, trained with plain SGD
through the engine's one training loop (:func:`probekit.engine.training.train_epoch`),
with a :class:`~probekit.engine.ProbeMonitor` row at each chosen step. Never imports argparse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from probekit.diagnosis import diagnose
from probekit.experiments.reproduction import Options, Reproduction, errors, findings_lines, seed, stacked

__all__ = ["BYPASS_QUICK_STEPS", "BYPASS_STEPS", "DESCRIPTION", "run"]

DESCRIPTION = (
    "128 dense layers of 128 units with one skip connection around the first half, trained with plain SGD and "
    "probed after 0, 500 and 2,000 minibatches: the bypassed layers form a dead segment, which the figure and "
    "pk.diagnose show (paper, 'pathological skip connection')"
)

#: Minibatches after which the bypass model is probed: the paper's 0, 500 and 2,000. On the
#: digits (17 minibatches of 64 per epoch) 500 minibatches train the layers after the skip
#: halfway and 2,000 to convergence, the phases the paper shows on MNIST.
BYPASS_STEPS = (0, 500, 2000)
#: ``quick=True``: the layers after the skip need about 1,000 minibatches to converge.
BYPASS_QUICK_STEPS = (0, 250, 1000)


def run(options: Options) -> Reproduction:
    """The pathological skip connection.

    Choices where the paper is silent, and why: tanh units with Glorot-uniform
    weights and zero biases (the zoo's defaults): the untrained stack then
    keeps a usable signal for a few dozen layers and degrades slowly, so the
    dead segment is caused by the skip, not by the initialisation; plain SGD
    (no momentum) at lr 0.01, batch 64: the paper's optimiser; a trial at 0.02
    trained the 64 layers after the skip no faster (their probes were worse
    after 400 minibatches than at 0.01 after 500). Every layer is probed (130
    probe points; every eighth with ``quick=True``).

    Example:
        >>> run(Options(out=Path("runs"), dataset="digits", pretrained=False, full=False, quick=True,
        ...             device=None, quiet=True)).numbers["dead_segments"]
    """
    from probekit import plots, zoo
    from probekit.engine.devices import resolve_device
    from probekit.engine.monitor import ProbeMonitor

    splits = options.splits(limit=options.real_limit)
    info = splits.info
    steps = BYPASS_QUICK_STEPS if options.quick else BYPASS_STEPS
    depth, skip = 128, (0, 64)
    lr, batch_size = 0.01, 64
    seed()
    model = zoo.bypass_mlp(depth=depth, width=128, skip=skip, activation="tanh", in_features=math.prod(info.input_shape),
                           num_classes=info.num_classes)
    hidden = [f"layers.{i}" for i in range(depth)]
    layers = ["input", *hidden[::8], hidden[-1], "output"] if options.quick else list(model.probe_layers)
    device = resolve_device(options.device)
    model.to(device)
    store = options.out / "bypass.zarr"
    options.log(
        f"bypass: bypass_mlp ({depth} tanh layers, skip {skip[0]}->{skip[1]}) on {info.name} {splits.sizes()}, plain SGD "
        f"(lr {lr}, batch {batch_size}), {len(layers)} probes after {', '.join(f'{s:,}' for s in steps)} minibatches"
    )
    with ProbeMonitor(model, splits, layers=layers, store=store, overwrite=True, quiet=True, model_name="bypass_mlp",
                      dataset_name=info.name) as monitor:
        _sgd_with_probes(model, splits.train, monitor, steps=steps, lr=lr, batch_size=batch_size, device=device)
        ds = monitor.dataset
    findings = diagnose(ds)
    snapshots = {f"after {int(s):,} minibatches": ds.isel(epoch=[i]) for i, s in enumerate(ds["step"].values)}
    chart = stacked(plots.comparison(snapshots), plots.diagnosis_overlay(ds, findings.to_frame()))
    png, page = options.save_figure(chart, "bypass")
    bypassed = list(model.bypassed_layers)
    dead = findings.of("dead_segment")
    deeper = bypassed[len(bypassed) // 2:]
    probed_deeper = [layer for layer in layers if layer in deeper]
    covered = {layer for f in dead for layer in f.layers}
    numbers = {
        "steps": [int(s) for s in ds["step"].values],
        "valid_error": {int(s): errors(ds, epoch=int(e)) for e, s in zip(ds["epoch"].values, ds["step"].values)},
        "bypassed": [bypassed[0], bypassed[-1]],
        "dead_segments": [[f.first, f.last, len(f.layers)] for f in dead],
        "dead_inside_bypassed": bool(dead) and all(layer in bypassed for f in dead for layer in f.layers),
        "deeper_half_covered": round(sum(layer in covered for layer in probed_deeper) / max(len(probed_deeper), 1), 3),
        "model_loss_final": round(float(ds["model_loss"].values[-1]), 4),
    }
    final = numbers["valid_error"][numbers["steps"][-1]]
    shown = dict.fromkeys(["input", deeper[0], _last_probed(layers, bypassed), _first_after(layers, bypassed), "output"])
    lines = [
        f"  bypassed layers {bypassed[0]} ... {bypassed[-1]}; valid error after {numbers['steps'][-1]:,} minibatches: "
        + ", ".join(f"{layer} {final[layer]:.3f}" for layer in shown if layer in final),
        *(f"  dead segment {first} ... {last} ({n} probed layers); it covers {numbers['deeper_half_covered']:.0%} "
          "of the probed deeper half of the bypassed layers" for first, last, n in numbers["dead_segments"]),
        *findings_lines(findings),
    ]
    return Reproduction(
        name="bypass", stores={"bypass": store}, figure=png, figure_html=page, numbers=numbers,
        findings={"bypass": findings}, command="", lines=lines,
        settings={"model": "bypass_mlp", "depth": depth, "width": 128, "skip": list(skip), "activation": "tanh",
                  "init": "Glorot-uniform weights, zero biases", "dataset": info.name, "sizes": splits.sizes(),
                  "optimizer": "plain SGD (no momentum)", "lr": lr, "batch_size": batch_size, "steps": list(steps),
                  "layers": layers},
    )


def _last_probed(layers: Sequence[str], bypassed: Sequence[str]) -> str:
    return [layer for layer in layers if layer in bypassed][-1]


def _first_after(layers: Sequence[str], bypassed: Sequence[str]) -> str:
    last = layers.index(_last_probed(layers, bypassed))
    return layers[last + 1]


def _sgd_with_probes(model, train, monitor, *, steps: Sequence[int], lr: float, batch_size: int, device) -> None:
    """Plain SGD on ``train``, probing the model with ``monitor`` after each of ``steps`` minibatches.

    Training runs through :func:`~probekit.engine.training.train_epoch`, epoch
    after epoch on one shuffling generator (seed 0), until the last of
    ``steps``. Rows are labelled with the epoch in progress (``ceil(step /
    minibatches per epoch)``, 0 before training) and the step; the model's loss
    and error are the means over the minibatches since the previous probe.
    """
    import torch
    from torch.utils.data import DataLoader, Dataset, TensorDataset

    from probekit.engine.training import Minibatch, train_epoch

    dataset = train if isinstance(train, Dataset) else TensorDataset(*train)
    per_epoch = math.ceil(len(dataset) / batch_size)
    labels = [math.ceil(s / per_epoch) for s in steps]
    if len(set(labels)) < len(labels):
        labels = list(range(len(steps)))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    targets = dict(zip(steps[1:], labels[1:]))
    batch_losses: list[float] = []
    batch_errors: list[float] = []

    def probe_at_targets(batch: Minibatch) -> None:
        batch_losses.append(batch.loss)
        batch_errors.append(batch.error)
        if batch.step in targets:
            monitor.update(epoch=targets[batch.step], step=batch.step, model_loss=sum(batch_losses) / len(batch_losses),
                           model_error=sum(batch_errors) / len(batch_errors))
            batch_losses.clear()
            batch_errors.clear()

    monitor.update(epoch=labels[0], step=steps[0])
    step = steps[0]
    while step < steps[-1]:
        step = train_epoch(model, optimizer, loader, device=device, step=step, stop_at=steps[-1],
                           on_step=probe_at_targets).step
