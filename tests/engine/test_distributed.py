"""Data-parallel probing: shards without padding, 2 ranks on gloo against 1 process, online probes, the CLI.

The multi-process tests start ``torchrun --standalone`` (a free port of its own) with 2 CPU processes on
gloo, each bounded by a timeout so that a hung rank cannot hang the suite.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset, WeightedRandomSampler

import probekit as pk
from probekit.engine.distributed import current, shard, unwrap
from probekit.engine.features import shard_batches
from probekit.run.store import open_run

WORKER = Path(__file__).with_name("distributed_worker.py")
ROOT = Path(__file__).resolve().parents[2]
#: Seconds a whole torchrun may take before the test fails (a hung rank is killed with it).
LIMIT = 420

pytestmark = pytest.mark.slow


class _Ranks:
    """What :func:`shard` reads of a process group: a rank and the world size."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size


class _Stream(IterableDataset):
    def __init__(self, n: int):
        self.n = n

    def __iter__(self):
        for i in range(self.n):
            yield torch.tensor([float(i)]), torch.tensor(i % 3)


def _seen(split, world_size: int) -> list[tuple[list[float], list[int]]]:
    """Each rank's (input values, positions) of ``split``."""
    out = []
    for rank in range(world_size):
        values, positions = [], []
        for inputs, _, where in shard_batches(split, 4, _Ranks(rank, world_size)):
            values += torch.as_tensor(inputs).reshape(-1).tolist()
            positions += where.tolist()
        out.append((values, positions))
    return out


@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("form", ["pair", "dataset", "loader", "shuffled", "iterable", "iterable_loader", "mapping"])
def test_shards_cover_every_example_once(form, world_size):
    n = 23  # not a multiple of the world size or of a batch: ranks hold unequal counts, nothing is padded
    x, y = torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n) % 3
    split = {
        "pair": (x, y), "dataset": TensorDataset(x, y), "loader": DataLoader(TensorDataset(x, y), batch_size=5),
        "shuffled": DataLoader(TensorDataset(x, y), batch_size=5, shuffle=True),
        "iterable": _Stream(n), "iterable_loader": DataLoader(_Stream(n), batch_size=5),
        "mapping": ({"x": x}, y),
    }[form]
    if form == "mapping":
        out = []
        for rank in range(world_size):
            rows = [(b["x"].reshape(-1).tolist(), p.tolist()) for b, _, p in shard_batches(split, 4, _Ranks(rank, world_size))]
            out.append(([v for r in rows for v in r[0]], [v for r in rows for v in r[1]]))
    else:
        out = _seen(split, world_size)
    positions = [p for _, ps in out for p in ps]
    assert sorted(positions) == list(range(n))  # every example once: no padding, no repeat
    for values, ps in out:  # each row's position is the example it holds
        assert [int(v) for v in values] == ps
    assert max(len(ps) for _, ps in out) - min(len(ps) for _, ps in out) <= (5 if "loader" in form else 1)


def test_a_sampler_that_cannot_be_divided_is_refused_in_one_line():
    data = TensorDataset(torch.zeros(10, 1), torch.zeros(10, dtype=torch.long))
    loader = DataLoader(data, batch_size=2, sampler=WeightedRandomSampler(torch.ones(10), 10))
    with pytest.raises(ValueError, match=r"^the valid split's DataLoader draws its examples with a WeightedRandomSampler.*"
                                         r"pass its Dataset") as info:
        shard(loader, _Ranks(0, 2), name="valid")
    assert "\n" not in str(info.value)


def test_one_process_has_no_group_and_no_collective(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    assert current() is None
    assert not torch.distributed.is_initialized()
    net = torch.nn.Linear(2, 2)
    assert unwrap(net) is net


def _torchrun(args: list[str], out: Path, *, module: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", *args] if module else args
    try:
        return subprocess.run(command, cwd=out, env=env, capture_output=True, text=True, timeout=LIMIT)
    except subprocess.TimeoutExpired as error:
        pytest.fail(f"torchrun did not finish in {LIMIT} s (a hung rank?): {error.stderr!s:.2000}")


def _worker(scenario: str, out: Path) -> list[dict]:
    done = _torchrun([str(WORKER), scenario, str(out)], out)
    errors = sorted(out.glob("error*.txt"))
    assert done.returncode == 0 and not errors, (done.stderr[-3000:], [e.read_text() for e in errors])
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]


def test_two_ranks_equal_one_process_on_every_split_form(tmp_path):
    from tests.engine.distributed_worker import forms, model

    ranks = _worker("forms", tmp_path)
    for which in ("a", "b"):
        one = pk.probe(model(), forms(which), quiet=True, device="cpu")
        both = ranks[0]
        assert both[f"{which}_world_size"] == 2
        np.testing.assert_array_equal(ranks[1][f"{which}_probe"], both[f"{which}_probe"])  # every rank, one run
        assert list(both[f"{which}_layers"]) == list(one.layer.values)
        sizes = {"train": 1079, "valid": 359, "test": 359}
        for m, metric in enumerate(both[f"{which}_metrics"]):
            split, measure = metric.split("_", 1)
            mine, theirs = both[f"{which}_probe"][:, 0, m], one.probe.sel(metric=metric).values[:, 0]
            if measure == "error":  # within one example of error, every layer
                assert np.all(np.abs(mine - theirs) <= 1 / sizes[split] + 1e-9), (which, metric, mine, theirs)
            elif measure == "loss":
                np.testing.assert_allclose(mine, theirs, rtol=0.05, atol=0.01)
        stored = open_run(tmp_path / f"{which}.zarr")  # written by rank 0 alone (rank 1 would have failed)
        assert stored.attrs["world_size"] == 2
        np.testing.assert_allclose(stored.probe.values, both[f"{which}_probe"])


def _within_one_example(mine: np.ndarray, theirs: np.ndarray, metrics, counts: dict) -> None:
    for m, metric in enumerate(metrics):
        split, measure = str(metric).split("_", 1)
        if measure == "error":
            gap = np.abs(mine[..., m] - theirs[..., m])
            assert np.all(gap <= 1 / counts[split] + 1e-9), (metric, mine[..., m], theirs[..., m])


def test_token_level_runs_and_checkpoint_series_on_two_ranks(tmp_path):
    from tests.engine.distributed_worker import digits, model
    from tests.engine.test_tokens import Tagger, tagged

    for i in range(2):  # two snapshots: the untrained model, and one with its last layer zeroed
        net = model()
        if i:
            torch.nn.init.zeros_(net[-1].weight)
        torch.save(net.state_dict(), tmp_path / f"c{i}.pt")
    ranks = _worker("more", tmp_path)
    token_splits = {"train": tagged(200, 0), "valid": tagged(100, 1), "test": tagged(60, 2)}
    one = pk.probe(Tagger(), token_splits, layers=["embed", "encoder"], quiet=True, device="cpu")
    two = ranks[0]
    np.testing.assert_array_equal(two["tokens_probe"], ranks[1]["tokens_probe"])
    counts = {k: int(one.attrs[f"n_{k}_tokens"]) for k in ("train", "valid", "test")}
    _within_one_example(two["tokens_probe"], one.probe.values, two["tokens_metrics"], counts)
    series = pk.probe_checkpoints(model, [tmp_path / "c0.pt", tmp_path / "c1.pt"], digits(), quiet=True, device="cpu")
    assert two["series_probe"].shape == series.probe.shape == (len(series.layer), 2, len(series.metric))
    _within_one_example(two["series_probe"], series.probe.values, two["series_metrics"],
                        {"train": 1079, "valid": 359, "test": 359})
    assert open_run(tmp_path / "series.zarr").attrs["world_size"] == 2


def test_a_rank_with_an_empty_shard_and_the_random_init_baseline(tmp_path):
    from tests.engine.distributed_worker import model, tiny_splits

    two = _worker("tiny", tmp_path)[0]
    one = pk.probe(model(), tiny_splits(), quiet=True, device="cpu", baselines=["random_init"])
    counts = {"train": 1079, "valid": 1, "test": 3}
    _within_one_example(two["probe"], one.probe.values, two["metrics"], counts)
    _within_one_example(two["baseline"], one.baselines.values, two["metrics"], counts)
    np.testing.assert_allclose(two["probe"], one.probe.values, atol=0.02)  # losses and errors alike


def test_a_wide_layer_on_few_examples_is_gathered_and_fitted_as_one_process_fits_it(tmp_path):
    from probekit.engine.probes import fit_probes
    from tests.engine.distributed_worker import wide_and_narrow

    ranks = _worker("gathered", tmp_path)
    features, y, candidates = wide_and_narrow()
    one = fit_probes(features, y, 4, candidates=candidates)
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)  # every rank holds one fit
    wide, narrow = one["wide"], one["narrow"]
    # The wide layer (fitted in the span of its 300 examples by one process): the same fit, to the last bit.
    np.testing.assert_array_equal(ranks[0]["wide_path"], [p[2] for p in wide.path])
    np.testing.assert_array_equal(ranks[0]["wide_weight"], wide.weight.numpy())
    assert ranks[0]["wide_spec"] == str(wide.spec) and ranks[0]["wide_l2"] == wide.l2
    # The narrow one, summed over the ranks: the same choice, and the same optimum to the solver's tolerance.
    assert ranks[0]["narrow_l2"] == narrow.l2
    np.testing.assert_allclose(ranks[0]["narrow_weight"], narrow.weight.numpy(), atol=2e-3)


def test_a_store_write_that_fails_on_rank_0_stops_every_rank_with_one_line(tmp_path):
    done = _torchrun([str(WORKER), "full_disk", str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):  # the same line on both ranks, none left waiting at its next collective
        text = (tmp_path / f"error{rank}.txt").read_text()
        assert text == f"StoreFullError: no space left on the device of {tmp_path / 'full.zarr'} while writing epoch 1"
    assert list(open_run(tmp_path / "full.zarr").epoch.values) == [0]  # the completed epoch is kept


def test_ranks_that_disagree_on_the_data_stop_with_one_line(tmp_path):
    done = _torchrun([str(WORKER), "mismatch", str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        text = (tmp_path / f"error{rank}.txt").read_text()
        assert "\n" not in text
        assert text.startswith("ValueError: the 2 ranks of the process group disagree on the number of classes "
                               "(rank 0: 10, rank 1: 5)"), text


def test_a_refusal_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    done = _torchrun([str(WORKER), "one_refuses", str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    own = "ValueError: the train split holds 5 of the 10 declared classes"
    assert (tmp_path / "error1.txt").read_text().startswith(own)
    text = (tmp_path / "error0.txt").read_text()
    assert text.startswith("ValueError: rank 1 of 2 stopped: the train split holds 5 of the 10") and "\n" not in text


def test_controls_that_need_one_process_are_refused_in_one_line(tmp_path):
    done = _torchrun([str(WORKER), "controls", str(tmp_path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in range(2):
        text = (tmp_path / f"error{rank}.txt").read_text()
        assert "\n" not in text and text.startswith("ValueError: repeats=, metrics=['mdl'] and the 'control' baseline")
        assert f"this one is rank {rank} of 2" in text and "run them without torch.distributed" in text


def test_online_probes_sum_their_gradients_over_the_ranks(tmp_path):
    ranks = _worker("online_step", tmp_path)
    for rank in ranks:
        for key in rank:
            if key.startswith("shared."):
                np.testing.assert_allclose(rank[key], rank["alone." + key[len("shared."):]], rtol=1e-4, atol=1e-5,
                                           err_msg=key)
    for key in ranks[0]:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key])


def test_online_monitor_under_distributed_data_parallel(tmp_path):
    ranks = _worker("online_ddp", tmp_path)
    np.testing.assert_array_equal(ranks[0]["weights"], ranks[1]["weights"])  # the probes stayed one
    np.testing.assert_array_equal(ranks[0]["probe"], ranks[1]["probe"])
    stored = open_run(tmp_path / "online.zarr")
    assert stored.attrs["world_size"] == 2 and stored.sizes["epoch"] == 2
    valid = stored.probe.sel(metric="valid_error").values
    assert np.isfinite(valid).all() and (valid < 0.9).all()


def test_cli_under_torchrun_equals_one_process(tmp_path):
    # l2='auto' (the default) chooses each layer's value on the held-out fold as one process does.
    args = ["probekit", "run", "--model", "paper_convnet", "--dataset", "digits", "--epochs", "1", "--quiet"]
    done = _torchrun([*args, "--out", "two.zarr"], tmp_path, module=True)
    assert done.returncode == 0, done.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", *args, "--out", "one.zarr"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=LIMIT)
    assert one.returncode == 0, one.stderr[-3000:]
    # Resumed for a second epoch: rank 0 reads the training checkpoint and sends it to rank 1.
    resumed = _torchrun([*args[:6], "--epochs", "2", "--quiet", "--out", "two.zarr", "--resume"], tmp_path, module=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    two, one = open_run(tmp_path / "two.zarr"), open_run(tmp_path / "one.zarr")
    assert list(two.epoch.values) == [0, 1, 2]
    two = two.isel(epoch=[0, 1])
    assert two.attrs["world_size"] == 2 and one.attrs["world_size"] == 1
    np.testing.assert_array_equal(two.l2.values, one.l2.values)  # every layer chose the same value
    for split, n in (("train", 1079), ("valid", 359), ("test", 359)):
        gap = np.abs(two.probe.sel(metric=f"{split}_error").values - one.probe.sel(metric=f"{split}_error").values)
        assert np.all(gap <= 1 / n + 1e-9), (split, gap)


def test_cli_error_under_torchrun_is_one_line_and_exit_code_2(tmp_path):
    (tmp_path / "taken").write_text("not a store")
    done = _torchrun(["probekit", "run", "--epochs", "0", "--quiet", "--out", "taken"], tmp_path, module=True)
    assert done.returncode != 0
    # Rank 0's line, plain; rank 1's, marked, when it is not stopped first; in whichever order they reach stderr.
    lines = [line for line in done.stderr.splitlines() if line.startswith("probekit: error")]
    plain = [line for line in lines if line.startswith("probekit: error: ")]
    assert len(plain) == 1 and plain[0].startswith("probekit: error: store path") and "is a file" in plain[0], lines
    others = [line for line in lines if line not in plain]
    assert all(line.startswith("probekit: error (rank 1): store path") for line in others), lines
    assert (tmp_path / "taken").read_text() == "not a store"


def test_python_dash_m_probekit_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "probekit", "--help"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0 and "usage: probekit" in done.stdout
