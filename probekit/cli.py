"""The ``probekit`` command: ``demo``, ``run``, ``sweep``, ``reproduce``, ``show`` and ``dashboard``; every argparse definition of the package.

::

    probekit demo                      # the paper's convnet on embedded digits, probed while it trains
    probekit reproduce bypass          # one of the paper's experiments (see probekit.experiments)
    probekit run --model resnet50 --dataset digits --size 64 --epochs 0 --out runs/r50.zarr
    probekit run --epochs 3 --lr 0.05 --mode online --probe-lr 0.001 --out runs/o.zarr
    probekit run --model timm:vit_tiny_patch16_224 --model-arg img_size=32 --model-arg patch_size=8 \\
        --dataset digits --size 32 --channels 3 --out runs/vit.zarr
    probekit show runs/demo.zarr       # per-layer summary, also while a run writes
    probekit sweep --out runs/sweep --grid seed=0,1 --grid reduce=pool,subset100 -- --epochs 2 --limit 200
    probekit dashboard runs/           # the explorers as a web page on 127.0.0.1, following the stores live

Flags are checked with :func:`probekit.params.check_params` before any work, so
a bad value is one line naming the flag (``--epochs must be an integer >= 0;
got -1``). Heavy modules (torch, the engine) are imported by the command that needs them.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Mapping, Sequence

import pandas as pd

from probekit.params import Interval, Options, check_params, choices

__all__ = ["main", "parser"]

_POSITIVE_INT = [Interval(int, 1, None)]
_POSITIVE_RATE = [Interval(float, 0, None, closed="neither")]
#: What each numeric flag may be, when given.
_FLAGS = {
    "--epochs": [Interval(int, 0, None)],
    "--seed": [Interval(int, 0, None)],
    "--size": _POSITIVE_INT,
    "--channels": [Options(1, 3)],
    "--limit": _POSITIVE_INT,
    "--num-classes": _POSITIVE_INT,
    "--budget": _POSITIVE_INT,
    "--lr": _POSITIVE_RATE,
    "--probe-lr": _POSITIVE_RATE,
    "--momentum": [Interval(float, 0, None)],
    "--l2": [Interval(float, 0, None), Options("auto")],
    "--repeats": _POSITIVE_INT,
    "--batch-size": _POSITIVE_INT,
    "--train-batch-size": _POSITIVE_INT,
    "--workers": _POSITIVE_INT,
    "--cell-threads": _POSITIVE_INT,
    "--port": [Interval(int, 1, 65535)],
    "--interval": _POSITIVE_RATE,
}


def _l2_value(text: str) -> float | str:
    """``--l2``: ``auto`` or a number."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0 or auto; got {text!r}") from None


def _storage_options(text: str) -> dict:
    """``--storage-options``: a JSON object of the store's fsspec options."""
    import json

    try:
        options = json.loads(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}); pass an object such as "
                                         "'{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}'") from None
    if not isinstance(options, dict):
        raise argparse.ArgumentTypeError(f"got a JSON {type(options).__name__}; pass a JSON object of fsspec options")
    return options


def _check_flags(args: argparse.Namespace) -> None:
    """Check every flag of ``args`` that has a constraint and was given (not None)."""
    given = {flag: getattr(args, flag[2:].replace("-", "_"), None) for flag in _FLAGS}
    check_params(_FLAGS, **{flag: value for flag, value in given.items() if value is not None})


def _summary(ds, metric: str) -> pd.DataFrame:
    """Per layer: what it is, and ``metric`` at the first, last and best epoch."""
    if metric not in ds["metric"].values:
        raise ValueError(f"metric {metric!r} is not in this run; it has {list(map(str, ds['metric'].values))}")
    values = ds["probe"].sel(metric=metric)
    frame = pd.DataFrame({
        "layer": ds["layer"].values, "op": ds["op"].values, "shape": ds["shape"].values,
        "reduction": ds["reduction"].values, "features": ds["feature_dim"].values,
    })
    if ds.sizes["epoch"]:
        first, last = int(ds["epoch"].values[0]), int(ds["epoch"].values[-1])
        frame[f"epoch {first}"] = values.isel(epoch=0).values.round(4)
        if last != first:
            frame[f"epoch {last}"] = values.isel(epoch=-1).values.round(4)
            frame["best"] = values.min("epoch", skipna=True).values.round(4)
    flagged = ds["nonfinite"].any("epoch").values
    if flagged.any():
        frame["nonfinite"] = flagged
    return frame


def _print_summary(ds, metric: str, title: str) -> None:
    epochs = ds.sizes["epoch"]
    print(f"{title}: {ds.attrs.get('model')} on {ds.attrs.get('dataset')}, {ds.attrs.get('mode')} probes, "
          f"{epochs} epoch{'s' if epochs != 1 else ''} completed, chance error {ds.attrs.get('chance_error', float('nan')):.3f}")
    print(f"{metric} per layer:")
    print(_summary(ds, metric).to_string(index=False))


def _dataset(args):
    from probekit import data

    kwargs = {}
    if args.size:
        kwargs["size"] = args.size
    if args.channels:
        kwargs["channels"] = args.channels
    if args.dataset == "digits":
        return data.digits(seed=args.seed, limit=args.limit, **kwargs)
    return data.load(args.dataset, root=args.data_root, limit=args.limit, seed=args.seed, **kwargs)


def _model(args, splits):
    """The model ``--model`` names, built with ``--model-arg`` keywords over the defaults the data implies.

    Zoo, timm and torchvision models get ``num_classes`` (``--num-classes``, else the
    data's); timm models also get ``in_chans`` from the data when it is not 3. A
    ``package.module:callable`` gets only what is given. A spec that cannot be
    imported, or arguments the factory does not take, are one line.
    """
    from probekit import zoo

    source = f"--model {args.model}"
    try:
        factory = zoo.resolve(args.model, source=source)
    except (ImportError, AttributeError) as error:
        raise ValueError(str(error)) from error
    given = zoo.parse_model_args(args.model_arg)
    info = splits.info
    kwargs: dict[str, object] = {}
    if zoo.is_library_spec(args.model):
        kwargs["num_classes"] = args.num_classes or info.num_classes
        if args.model.startswith("timm:") and info.input_shape and info.input_shape[0] != 3:
            kwargs["in_chans"] = int(info.input_shape[0])
    elif ":" in args.model:
        if args.num_classes:
            kwargs["num_classes"] = args.num_classes
    else:
        kwargs["num_classes"] = args.num_classes or info.num_classes
        if args.model in ("paper_convnet",):
            kwargs.update(in_channels=info.input_shape[0], input_size=info.input_shape[-1])
        elif args.model in ("bypass_mlp", "residual_mlp"):
            kwargs["in_features"] = int(info.input_shape[0] * info.input_shape[1] * info.input_shape[2])
    if args.weights:
        kwargs["weights"] = args.weights
    kwargs.update(given)
    try:
        return factory(**kwargs)
    except TypeError as error:
        if "argument" not in str(error):
            raise
        passed = ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) or "no arguments"
        raise TypeError(f"{source} called with {passed}: {' '.join(str(error).split())}; "
                        "fix or drop the --model-arg it names") from error


def cmd_demo(args) -> int:
    import torch

    from probekit import data, zoo
    from probekit.engine.training import train_and_probe

    start = time.perf_counter()
    torch.manual_seed(args.seed)
    splits = data.digits(seed=args.seed)
    model = zoo.paper_convnet(in_channels=1, num_classes=10, input_size=splits.info.input_shape[-1])
    ds = train_and_probe(
        model, splits, epochs=args.epochs, store=args.out, overwrite=True, lr=0.05, momentum=0.9, seed=args.seed,
        device="cpu", quiet=args.quiet, model_name="paper_convnet", channels_last=False,
    )
    _print_summary(ds, "valid_error", f"demo run in {args.out}")
    print(f"done in {time.perf_counter() - start:.1f} s; explore it with pk.open_run({args.out!r}) or `probekit show {args.out}`")
    return 0


def cmd_run(args) -> int:
    import torch

    from probekit.engine import probe
    from probekit.engine.training import train_and_probe

    torch.manual_seed(args.seed)
    splits = _dataset(args)
    torch.manual_seed(args.seed)
    model = _model(args, splits)
    layers = args.layers.split(",") if args.layers and "," in args.layers else args.layers
    shared: Mapping[str, object] = dict(
        layers=layers, reduce=args.reduce, quiet=args.quiet, model_name=args.name or args.model.split(":")[-1],
        batch_size=args.batch_size, budget=args.budget, l2=args.l2, baselines=args.baselines, repeats=args.repeats,
        metrics=args.metrics, store=args.out, storage_options=args.storage_options, resume=args.resume,
        overwrite=args.overwrite, device=args.device, seed=args.seed, autocast=args.autocast,
    )
    if args.epochs == 0 and args.mode == "snapshot":
        ds = probe(model, splits, **shared)
    else:
        ds = train_and_probe(model, splits, epochs=args.epochs, mode=args.mode, probe_lr=args.probe_lr, lr=args.lr,
                             momentum=args.momentum, optimizer=args.optimizer,
                             train_batch_size=args.train_batch_size, **shared)
    from probekit.engine.distributed import is_root

    if is_root():  # under torchrun, rank 0 speaks for every rank
        _print_summary(ds, "valid_error" if "valid_error" in ds["metric"].values else "train_error", f"run in {args.out}")
    return 0


def cmd_show(args) -> int:
    from probekit.run.store import open_run

    ds = open_run(args.run, storage_options=args.storage_options)
    _print_summary(ds, args.metric, str(args.run))
    return 0


def _run_options(run_parser: argparse.ArgumentParser) -> list[str]:
    """The long options of ``probekit run``, without their dashes."""
    return [option[2:] for action in run_parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"]


def _check_cell(run_parser: argparse.ArgumentParser, name: str, argv: Sequence[str]) -> None:
    """Parse a sweep cell's arguments as ``probekit run`` would, and check its flags: one line naming the cell."""
    def refuse(message: str) -> None:
        raise ValueError(f"sweep cell {name!r}: {message}; fix the grid or the shared arguments")

    run_parser.error = refuse  # argparse would print the usage and exit; one line instead
    try:
        _check_flags(run_parser.parse_args([*argv, "--out", "cell.zarr"]))
    except ValueError as error:
        if str(error).startswith("sweep cell"):
            raise
        refuse(str(error))


def cmd_sweep(args) -> int:
    from probekit.sweep import RESERVED, cells_of, load_spec, parse_grid, run_sweep

    if args.scheduler and args.workers:
        raise ValueError("--workers sizes the LocalCluster made here; with --scheduler, that scheduler's workers run "
                         "the cells: drop one of the two")
    run_parser = _subparsers(parser())["run"]
    grid, shared = load_spec(args.spec) if args.spec else ({}, [])
    for key, values in parse_grid(args.grid or []).items():
        if key in grid:
            raise ValueError(f"--grid {key} is also in the spec {args.spec!r}; give its values in one place")
        grid[key] = values
    shared = [*shared, *(args.args[1:] if args.args[:1] == ["--"] else args.args)]
    known = _run_options(run_parser)
    for key in grid:
        if key not in known:
            shown = [option for option in known if option not in RESERVED]
            raise ValueError(f"--grid {key!r} is not an option of probekit run; choose from: {choices(shown, limit=40)}")
    cells = cells_of(grid, shared)
    for cell in cells:
        _check_cell(run_parser, cell.name, cell.argv)

    def report(result) -> None:
        extra = " (resumed)" if result.resumed else ""
        line = f"{result.status:>7}  {result.name}" + (f"  {result.seconds:.1f} s{extra}" if result.status != "skipped" else "")
        print(line + (f": {result.error}" if result.error else ""), flush=True)

    where = args.scheduler or f"a LocalCluster of {args.workers or 'up to ' + str(len(cells))} workers"
    print(f"sweep of {len(cells)} cell{'s' if len(cells) != 1 else ''} into {args.out} on {where}", flush=True)
    results = run_sweep(cells, args.out, grid=grid, shared=shared, scheduler=args.scheduler, workers=args.workers,
                        cell_threads=args.cell_threads, on_result=report)
    frame = pd.DataFrame([{"cell": r.name, "status": r.status, "seconds": round(r.seconds, 1), "error": r.error}
                          for r in results])
    print(frame.to_string(index=False))
    counts = {status: sum(r.status == status for r in results) for status in ("done", "skipped", "failed")}
    print(f"{len(results)} cells: {counts['done']} done, {counts['skipped']} skipped (done before), "
          f"{counts['failed']} failed; read the done ones with probekit.sweep.open_sweep({args.out!r})")
    return 1 if counts["failed"] else 0


def cmd_dashboard(args) -> int:
    from probekit.dashboard import serve

    given = {name: getattr(args, name) for name in ("host", "port", "token", "interval") if getattr(args, name) is not None}
    serve(args.runs, **given)
    return 0


def cmd_reproduce(args) -> int:
    from probekit.experiments import reproduce

    reproduce(args.name, out=args.out, dataset=args.dataset, pretrained=args.pretrained, full=args.full,
              quick=args.quick, device=args.device, quiet=args.quiet)
    return 0


def _add_reproduce_arguments(parser: argparse.ArgumentParser) -> None:
    """``NAME [--dataset D] [--pretrained] [--full] [--out DIR] [--quick] [--device D] [--quiet]``."""
    from probekit.experiments import REPRODUCTIONS

    parser.add_argument("name", choices=list(REPRODUCTIONS), metavar="NAME",
                        help="one of: " + choices(REPRODUCTIONS))
    parser.add_argument("--dataset", default="digits",
                        help="digits (embedded, default), mnist, fashion-mnist, cifar10, imagenette "
                             "or an ImageNet-layout folder")
    parser.add_argument("--pretrained", action="store_true",
                        help="resnet-vs-inception: probe torchvision's ImageNet weights (downloaded) "
                             "instead of training from scratch")
    parser.add_argument("--full", action="store_true", help="the paper's sizes: the whole dataset and longer training")
    parser.add_argument("--out", default="runs", help="folder for the stores and the figure (default: runs)")
    parser.add_argument("--quick", action="store_true", help="a reduced size for tests and smoke runs")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--quiet", action="store_true", help="print nothing")


def _subparsers(top: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands' parsers of ``top``, by name."""
    action = next(a for a in top._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parser() -> argparse.ArgumentParser:
    """The ``probekit`` argument parser, with one subcommand per command.

    Example:
        >>> parser().parse_args(["reproduce", "bypass", "--quick"]).quick
        True
    """
    top = argparse.ArgumentParser(prog="probekit", description="Linear classifier probes for the layers of PyTorch models.")
    sub = top.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="train the paper's convnet on the embedded digits while probing every layer")
    demo.add_argument("--out", default="runs/demo.zarr", help="run store to write (replaced if it exists)")
    demo.add_argument("--epochs", type=int, default=5)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)

    run = sub.add_parser("run", help="probe a model (zoo name or package.module:callable) on a dataset, while training it or fixed")
    run.add_argument("--model", default="paper_convnet",
                     help="zoo name (see probekit.zoo.available()), timm:NAME, torchvision:NAME (random weights unless "
                          "--model-arg pretrained=true) or package.module:callable")
    run.add_argument("--model-arg", action="append", metavar="KEY=VALUE",
                     help="keyword argument of the model's factory, repeatable (values read as int, float, "
                          "true/false, none or text), e.g. --model-arg img_size=32 --model-arg patch_size=8")
    run.add_argument("--num-classes", type=int,
                     help="outputs of the model's head (default: the dataset's classes; the probes always use the dataset's)")
    run.add_argument("--weights", help="pretrained weights: a torchvision weight name (e.g. DEFAULT) or a local .pth state dict")
    run.add_argument("--dataset", default="digits", help="digits (embedded), mnist, fashion-mnist, cifar10, imagenette or an ImageFolder path")
    run.add_argument("--data-root", help="folder holding (or to download) the dataset")
    run.add_argument("--size", type=int, help="resize inputs to SIZE x SIZE")
    run.add_argument("--channels", type=int, help="replicate grey inputs to this many channels")
    run.add_argument("--limit", type=int, help="at most this many examples per split")
    run.add_argument("--layers", help="comma-separated probe points, 'blocks' or 'all' (default: the model's own)")
    run.add_argument("--reduce", help="reduction for every layer: auto, flatten, pool, poolK, subsetN, projectN")
    run.add_argument("--budget", type=int, default=4096, help="feature budget of the auto reduction")
    run.add_argument("--mode", choices=("snapshot", "online"), default="snapshot")
    run.add_argument("--epochs", type=int, default=0, help="training epochs (0: probe the model as it is)")
    run.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    run.add_argument("--lr", type=float, default=0.05, help="the model's learning rate (default: 0.05)")
    run.add_argument("--momentum", type=float, default=0.9, help="SGD momentum of the model's optimiser")
    run.add_argument("--probe-lr", type=float, default=1e-3,
                     help="the online probes' learning rate, --mode online (default: 0.001); not the model's (--lr)")
    run.add_argument("--l2", type=_l2_value, default="auto",
                     help="probe L2 strength, or auto (default): chosen per layer on a held-out fold of the training split")
    run.add_argument("--baselines", help="comma-separated baselines: random_init, control")
    run.add_argument("--repeats", type=int, default=1, help="fits per probe on bootstrap resamples (default: 1)")
    run.add_argument("--metrics", help="comma-separated optional measures: mdl")
    run.add_argument("--batch-size", type=int, default=256, help="feature extraction batch size")
    run.add_argument("--train-batch-size", type=int, default=64, help="the model's training minibatch size")
    run.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    run.add_argument("--autocast", choices=("bf16", "fp16"),
                     help="run the probes' forward passes under torch.autocast in this precision (default: off); "
                          "the probes are fitted on float32 features either way")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--name", help="model name recorded in the store")
    run.add_argument("--out", "--store", dest="out", required=True,
                     help="run store to write: a folder, or an fsspec URL (s3://bucket/run.zarr, gs://..., memory://...)")
    run.add_argument("--storage-options", type=_storage_options, metavar="JSON",
                     help="the store URL's fsspec options as a JSON object, e.g. "
                          "'{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}'")
    run.add_argument("--resume", action="store_true", help="continue the run in --out")
    run.add_argument("--overwrite", action="store_true", help="replace the run in --out")
    run.add_argument("--quiet", action="store_true")
    run.set_defaults(func=cmd_run)

    reproduce = sub.add_parser("reproduce", help="run one of the paper's experiments: run store(s), figure and summary")
    _add_reproduce_arguments(reproduce)
    reproduce.set_defaults(func=cmd_reproduce)

    sweep = sub.add_parser(
        "sweep", help="run a grid of `probekit run` cells on a dask cluster: one store per cell, resumable",
        description="Run every cell of a grid over probekit run's options on a dask.distributed cluster, each into "
                    "OUT/CELL.zarr. Running it again skips the cells done and resumes the others. Exit code 1 when "
                    "a cell failed (the summary gives its error), 2 for a bad grid.",
    )
    sweep.add_argument("--grid", action="append", metavar="KEY=V1,V2",
                       help="an option of probekit run and its values, repeatable: the sweep is their product "
                            "(e.g. --grid seed=0,1 --grid reduce=pool,subset100)")
    sweep.add_argument("--spec", help="a JSON (or TOML) file with a 'grid' table {option: [values]} and an optional "
                                      "'args' table {option: value} of arguments every cell shares")
    sweep.add_argument("--out", required=True, help="folder of the cells' stores and the summary sweep.json")
    sweep.add_argument("--scheduler", help="address of a dask scheduler (e.g. tcp://host:8786) whose workers reach "
                                           "--out; default: a LocalCluster on this machine")
    sweep.add_argument("--workers", type=int, help="LocalCluster workers (default: one per cell, at most the CPU count)")
    sweep.add_argument("--cell-threads", type=int,
                       help="threads of each cell's process (default: on a LocalCluster, the CPUs shared among the "
                            "workers; with --scheduler, the worker's own setting)")
    sweep.add_argument("args", nargs=argparse.REMAINDER, metavar="-- RUN_ARGS",
                       help="after --, the probekit run arguments every cell shares (e.g. -- --epochs 2 --limit 200)")
    sweep.set_defaults(func=cmd_sweep)

    show = sub.add_parser("show", help="per-layer summary of a run store (works while it is written)")
    show.add_argument("run", help="the run store: a folder or an fsspec URL")
    show.add_argument("--storage-options", type=_storage_options, metavar="JSON", help="the store URL's fsspec options")
    show.add_argument("--metric", default="valid_error")
    show.set_defaults(func=cmd_show)

    dashboard = sub.add_parser("dashboard", help="serve the explorer (and, for several runs, a run picker and the "
                                                 "comparison) as a web page that follows the stores live")
    dashboard.add_argument("runs", nargs="+", metavar="RUN_OR_FOLDER",
                           help="run stores, or folders searched (with their subfolders) for run stores")
    dashboard.add_argument("--host",
                           help="address to listen on (default: 127.0.0.1, this machine only; others warn)")
    dashboard.add_argument("--port", type=int, help="port to listen on (default: 8866)")
    dashboard.add_argument("--token", help="access token, part of the URL printed (default: a new random one)")
    dashboard.add_argument("--interval", type=float,
                           help="seconds between two checks of the stores (default: 2)")
    dashboard.set_defaults(func=cmd_dashboard)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``probekit`` command with ``argv`` (default: the process's); returns the exit code.

    Errors are one line on stderr and exit code 2; an interrupt exits with 130.

    Example:
        >>> main(["show", "runs/demo.zarr"])
        0
    """
    args = parser().parse_args(argv)
    try:
        _check_flags(args)
        return args.func(args)
    except KeyboardInterrupt:
        again = "run the same sweep again" if args.command == "sweep" else "continue with --resume"
        print(f"probekit: interrupted; completed epochs are in the store ({again})", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileExistsError, FileNotFoundError, OSError, RuntimeError, ImportError) as error:
        print(f"probekit: error{_rank_note()}: {error}", file=sys.stderr)
        return 2


def _rank_note() -> str:
    """`` (rank N)`` on a rank other than 0 of a torchrun group (where each rank may have its own error), else nothing."""
    if "torch" not in sys.modules:
        return ""
    from probekit.engine.distributed import is_root

    if is_root():
        return ""
    import torch.distributed as dist

    return f" (rank {dist.get_rank()})"


if __name__ == "__main__":
    sys.exit(main())
