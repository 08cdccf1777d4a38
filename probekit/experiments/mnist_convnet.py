"""``mnist-convnet``: the paper's MNIST convnet probed at every layer at initialisation and after each epoch (figure 2).

Trains through :func:`probekit.engine.train_and_probe`; never imports argparse.
"""

from __future__ import annotations

from probekit.diagnosis import diagnose
from probekit.experiments.reproduction import (
    Options, Reproduction, drop_checkpoint, errors, findings_lines, present_splits, profile_line, seed, side_by_side,
)

__all__ = ["DESCRIPTION", "run"]

DESCRIPTION = (
    "the paper's MNIST convnet (two conv layers, one hidden fully connected layer), probed at every conv, ReLU "
    "and pooling op at initialisation and after each epoch of training; the figure shows the error per layer "
    "at initialisation and at the end (paper, figure 2)"
)


def run(options: Options) -> Reproduction:
    """Train the paper's convnet with SGD (lr 0.05, momentum 0.9), probing every layer after each epoch.

    Example:
        >>> run(Options(out=Path("runs"), dataset="digits", pretrained=False, full=False, quick=True,
        ...             device=None, quiet=True)).numbers["valid_error_final"]
    """
    from probekit import plots, zoo
    from probekit.engine.training import train_and_probe

    splits = options.splits(limit=options.real_limit)
    info = splits.info
    epochs = 2 if options.quick else (10 if options.full else 5)
    shape = {"width": (8, 16), "hidden": 32} if options.quick else {}
    seed()
    model = zoo.paper_convnet(in_channels=info.channels, num_classes=info.num_classes, input_size=info.size, **shape)
    store = options.out / "mnist-convnet.zarr"
    options.log(f"mnist-convnet: paper_convnet on {info.name} {splits.sizes()}, {epochs} epochs of SGD "
                "(lr 0.05, momentum 0.9)")
    ds = train_and_probe(
        model, splits, epochs=epochs, store=store, overwrite=True, optimizer="sgd", lr=0.05, momentum=0.9,
        train_batch_size=64, seed=0, device=options.device, quiet=True, model_name="paper_convnet",
        dataset_name=info.name,
    )
    drop_checkpoint(store)
    findings = diagnose(ds)
    chart = side_by_side(
        plots.depth_profile(ds, epoch=0, splits=present_splits(ds)),
        plots.depth_profile(ds, epoch=-1, splits=present_splits(ds)),
    )
    png, page = options.save_figure(chart, "mnist-convnet")
    init, final = errors(ds, epoch=0), errors(ds, epoch=-1)
    test = "test" in present_splits(ds)
    numbers = {
        "epochs": epochs,
        "valid_error_init": init,
        "valid_error_final": final,
        **({"test_error_init": errors(ds, "test", 0), "test_error_final": errors(ds, "test", -1)} if test else {}),
        "model_error_final": round(float(ds["model_error"].values[-1]), 4),
    }
    best_init = min(init, key=init.get)
    lines = [
        f"  valid error at initialisation: {profile_line(init)}",
        f"  valid error after {epochs} epochs: {profile_line(final)}",
        f"  at initialisation the input's probe errs {init['input']:.3f} and {best_init}'s {init[best_init]:.3f}",
        *findings_lines(findings),
    ]
    return Reproduction(
        name="mnist-convnet", stores={"mnist-convnet": store}, figure=png, figure_html=page, numbers=numbers,
        findings={"mnist-convnet": findings}, command="", lines=lines,
        settings={"model": "paper_convnet", **{k: list(v) if isinstance(v, tuple) else v for k, v in shape.items()},
                  "dataset": info.name, "sizes": splits.sizes(), "epochs": epochs, "optimizer": "sgd", "lr": 0.05,
                  "momentum": 0.9, "batch_size": 64, "layers": list(model.probe_layers)},
    )
