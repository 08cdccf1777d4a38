"""One rank of the data-parallel tests (``tests/engine/test_distributed.py`` starts it under torchrun).

``python -m torch.distributed.run --standalone --nproc_per_node=2 distributed_worker.py SCENARIO OUT``:
each rank writes what it found under ``OUT`` (``rank{r}.npz`` or ``error{r}.txt``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import probekit as pk
from probekit.engine import monitor as monitor_module
from probekit.run import store as store_module


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 10))


def digits() -> dict:
    splits = pk.data.digits()
    return {name: getattr(splits, name) for name in ("train", "valid", "test")}


class Stream(IterableDataset):
    """An iterable dataset without a length: (x, y) pairs in order."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y)


def forms(which: str) -> dict:
    """The digits' splits in every form probekit takes, mixed two ways."""
    d = digits()
    (xt, yt), (xv, yv), (xs, ys) = d["train"], d["valid"], d["test"]
    if which == "a":  # a pair, a bare iterable dataset, a DataLoader over a dataset
        return {"train": (xt, yt), "valid": Stream(xv, yv), "test": DataLoader(TensorDataset(xs, ys), batch_size=64)}
    # a Dataset, a DataLoader over an iterable dataset (divided by batch), a shuffled DataLoader
    return {"train": TensorDataset(xt, yt), "valid": DataLoader(Stream(xv, yv), batch_size=50),
            "test": DataLoader(TensorDataset(xs, ys), batch_size=32, shuffle=True)}


def result(ds) -> dict:
    return {"probe": ds.probe.values, "l2": ds.l2.values, "layers": np.array(ds.layer.values, dtype=str),
            "metrics": np.array(ds.metric.values, dtype=str), "world_size": ds.attrs.get("world_size", -1)}


def forbid_store_writes() -> None:
    """On ranks other than 0, any attempt to create a run writer or write a file through the store fails loudly."""

    def refuse(*args, **kwargs):
        raise RuntimeError("a rank other than 0 touched the run store")

    monitor_module.RunWriter = refuse
    store_module.write_atomic = refuse


def main(scenario: str, out: Path) -> None:
    if scenario in USER_GROUP:  # the caller's own group, which probekit uses as it is
        torch.distributed.init_process_group("gloo")
    comm = pk.engine.distributed.current()
    rank = 0 if comm is None else comm.rank
    if rank:
        forbid_store_writes()
    try:
        found = SCENARIOS[scenario](out, rank)
    except Exception as error:  # noqa: BLE001 - written for the test to read
        (out / f"error{rank}.txt").write_text(f"{type(error).__name__}: {error}")
        return
    np.savez(out / f"rank{rank}.npz", **found)


def probe_forms(out: Path, rank: int) -> dict:
    found = {}
    for which in ("a", "b"):
        ds = pk.probe(model(), forms(which), store=out / f"{which}.zarr", quiet=True, device="cpu")
        again = pk.probe(model(), forms(which), store=out / f"{which}.zarr", quiet=True, device="cpu", resume=True)
        if not np.array_equal(again.probe.values, ds.probe.values, equal_nan=True):  # resumed from rank 0's store, not refitted
            raise RuntimeError(f"rank {rank} resumed other values than it wrote")
        found.update({f"{which}_{k}": v for k, v in result(ds).items()})
    return found


def tokens_and_checkpoints(out: Path, rank: int) -> dict:
    """A token-level run (whole sequences on each rank, the fold by sequence) and a series of saved snapshots."""
    from tests.engine.test_tokens import Tagger, tagged

    token_splits = {"train": tagged(200, 0), "valid": tagged(100, 1), "test": tagged(60, 2)}
    tokens = pk.probe(Tagger(), token_splits, layers=["embed", "encoder"], quiet=True, device="cpu",
                      store=out / "tokens.zarr")
    series = pk.probe_checkpoints(model, [out / "c0.pt", out / "c1.pt"], digits(), quiet=True, device="cpu",
                                  store=out / "series.zarr")
    return {**{f"tokens_{k}": v for k, v in result(tokens).items()}, **{f"series_{k}": v for k, v in result(series).items()}}


def tiny(out: Path, rank: int) -> dict:
    """A valid split of one example (rank 1's shard of it is empty) and the random-init baseline, in a process group
    the script initialised itself."""
    ds = pk.probe(model(), tiny_splits(), quiet=True, device="cpu", baselines=["random_init"])
    return {**result(ds), "baseline": ds.baselines.values}


def tiny_splits() -> dict:
    d = digits()
    (xv, yv), (xs, ys) = d["valid"], d["test"]
    return {"train": d["train"], "valid": (xv[:1], yv[:1]), "test": Stream(xs[:3], ys[:3])}


def one_process_controls(out: Path, rank: int) -> dict:
    """repeats= (also metrics=['mdl'] and the control baseline) need one process."""
    pk.probe(model(), digits(), quiet=True, device="cpu", repeats=2)
    return {}


def mismatch(out: Path, rank: int) -> dict:
    """Rank 1 holds other data: 5 classes where rank 0 has 10."""
    d = digits()
    (x, y), (xv, yv) = d["train"], d["valid"]
    if rank == 1:
        y, yv = y % 5, yv % 5
    pk.probe(model(), {"train": (x, y), "valid": (xv, yv)}, quiet=True, device="cpu")
    return {}


def one_refuses(out: Path, rank: int) -> dict:
    """Rank 1's training labels lack classes its valid split has: rank 1 refuses its data, and every rank stops."""
    d = digits()
    x, y = d["train"]
    if rank == 1:
        y = y % 5
    pk.probe(model(), {"train": (x, y), "valid": d["valid"]}, quiet=True, device="cpu")
    return {}


def online_step(out: Path, rank: int) -> dict:
    """Probes stepped on each rank's half of a batch equal probes stepped in one process on the whole batch."""
    from probekit.engine.distributed import Collective
    from probekit.engine.online import OnlineProbes

    torch.manual_seed(0)
    features = {"a": torch.randn(8, 40, 12), "b": torch.randn(8, 40, 5) * 3 + 1}
    labels = torch.randint(0, 4, (8, 40))
    shared = OnlineProbes({"a": 12, "b": 5}, 4, lr=1e-2, l2="auto", comm=Collective())
    alone = OnlineProbes({"a": 12, "b": 5}, 4, lr=1e-2, l2="auto")
    half = slice(rank * 20, rank * 20 + 20)
    for step in range(8):
        shared.step({k: v[step, half] for k, v in features.items()}, labels[step, half])
        alone.step({k: v[step] for k, v in features.items()}, labels[step])
    shared.sum_running()
    found = {}
    for name, probes in (("shared", shared), ("alone", alone)):
        for key, value in probes.state_dict().items():
            found[f"{name}.{key}"] = value.double().numpy()
        found[f"{name}.loss"] = np.array([probes.train_scores(n)["loss"] for n in ("a", "b")])
    return found


def online_ddp(out: Path, rank: int) -> dict:
    """ProbeMonitor in online mode on a DistributedDataParallel model, each rank training on its half."""
    d = digits()
    net = nn.parallel.DistributedDataParallel(model())
    mon = pk.ProbeMonitor(net, {"train": d["train"], "valid": d["valid"]}, mode="online", store=out / "online.zarr",
                          quiet=True, probe_lr=1e-2)
    x, y = d["train"]
    opt = torch.optim.SGD(net.parameters(), lr=0.05)
    mine = torch.arange(rank, x.shape[0], 2)
    for epoch in range(1, 3):
        for start in range(0, mine.numel(), 64):
            rows = mine[start:start + 64]
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[rows]), y[rows])
            loss.backward()
            opt.step()
            mon.step(y[rows])
        mon.update(epoch=epoch)
    mon.close()
    weights = torch.cat([p.detach().reshape(-1) for p in mon._online.parameters()]).numpy()
    return {**result(mon.dataset), "weights": weights}


#: Scenarios whose process group the script initialises itself (the others let probekit initialise it).
def wide_and_narrow() -> tuple[dict, torch.Tensor, dict]:
    """A wide layer on few examples (one process fits it in the span of its examples) and a narrow one."""
    generator = torch.Generator().manual_seed(0)
    y = torch.arange(300) % 4
    wide = torch.randn(300, 1000, generator=generator)
    wide[:, :10] += 1.5 * torch.randn(4, 10, generator=generator)[y]
    narrow = torch.randn(300, 20, generator=generator) + 0.6 * torch.randn(4, 20, generator=generator)[y]
    return {"wide": wide, "narrow": narrow}, y, {"wide": {"half": slice(0, 500), "all": slice(0, 1000)}}


def gathered_fit(out: Path, rank: int) -> dict:
    """fit_probes on each rank's shard (rows r, r + 2, ...): the wide layer is gathered, the narrow one summed."""
    from probekit.engine.probes import fit_probes

    features, y, candidates = wide_and_narrow()
    comm = pk.engine.distributed.current()
    rows = torch.arange(300)[rank::2]
    fits = fit_probes({k: v[rows] for k, v in features.items()}, y[rows], 4, candidates=candidates, comm=comm,
                      positions=rows)
    found = {}
    for name, fit in fits.items():
        found.update({f"{name}_weight": fit.weight.numpy(), f"{name}_bias": fit.bias.numpy(), f"{name}_l2": fit.l2,
                      f"{name}_spec": str(fit.spec), f"{name}_path": np.array([p[2] for p in fit.path])})
    return found


def full_disk(out: Path, rank: int) -> dict:
    """Rank 0's store write fails at epoch 1 (as on a full disk): every rank must stop, none wait at a collective."""
    from probekit.run.store import StoreFullError

    d = digits()
    mon = pk.ProbeMonitor(model(), {"train": d["train"], "valid": d["valid"]}, store=out / "full.zarr", quiet=True,
                          l2=1e-3)
    mon.update(epoch=0)
    if rank == 0:
        def no_space(row):
            raise StoreFullError(f"no space left on the device of {out / 'full.zarr'} while writing epoch 1")

        mon._writer.append = no_space
    mon.update(epoch=1)
    return {}


USER_GROUP = ("tiny",)
SCENARIOS = {"forms": probe_forms, "more": tokens_and_checkpoints, "tiny": tiny, "controls": one_process_controls, "mismatch": mismatch, "one_refuses": one_refuses, "online_step": online_step, "online_ddp": online_ddp, "gathered": gathered_fit, "full_disk": full_disk}

if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
