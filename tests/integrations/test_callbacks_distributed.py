"""The trainer callbacks under data parallelism: Lightning's DDP and transformers' Trainer under torchrun, 2 CPU
processes on gloo, against one process; data that does not fit the model, on one rank or on every rank.

Each test starts ``ddp_worker.py`` in a subprocess of its own session, bounded by a timeout that kills every
process of it, so that a hung rank cannot hang the suite. The model trains with a learning rate of 0: two
processes train on other batches than one does, and the rows compare only if the model is the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import probekit as pk

pytest.importorskip("lightning")
pytest.importorskip("transformers")

from tests.integrations import ddp_worker  # noqa: E402 - after the frameworks are known to be there

WORKER = Path(ddp_worker.__file__)
ROOT = Path(__file__).resolve().parents[2]
#: Seconds a whole multi-process run may take before the test fails (every process of it is killed).
LIMIT = 600

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:BertForSequenceClassification cannot be traced:UserWarning")]


def _launch(command: list[str], out: Path) -> subprocess.CompletedProcess:
    """``command`` in ``out``, in a session of its own; past :data:`LIMIT`, it is stopped and the test fails with
    the tail of its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.Popen(command, cwd=out, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=LIMIT)
    except subprocess.TimeoutExpired:
        stderr = _stop(proc)
        pytest.fail(f"{' '.join(command[-3:])} did not finish in {LIMIT} s (a hung rank?): {stderr[-3000:]}")
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def _stop(proc: subprocess.Popen) -> str:
    """Stop every process ``proc`` started; its stderr so far.

    SIGTERM first, to the session: Lightning's rank 1 is in it, and torchrun, whose workers each run in a session
    of their own, stops them when it gets SIGTERM. Then SIGKILL. A worker left alive would hold the pipes open, so
    the output is read with a timeout.
    """
    for sig, wait in ((signal.SIGTERM, 60), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            return proc.communicate(timeout=wait)[1]
        except subprocess.TimeoutExpired:
            continue
    return "(its stderr could not be read: a process it started still holds it)"


def _lightning(scenario: str, out: Path) -> subprocess.CompletedProcess:
    """Rank 0 of a Lightning DDP fit; Lightning starts rank 1 by running the same command again."""
    return _launch([sys.executable, str(WORKER), "lightning", scenario, str(out)], out)


def _torchrun(scenario: str, out: Path) -> subprocess.CompletedProcess:
    return _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(WORKER),
                    "hf", scenario, str(out)], out)


def _ranks(done: subprocess.CompletedProcess, out: Path) -> list[dict]:
    errors = sorted(out.glob("error*.txt"))
    assert done.returncode == 0 and not errors, (done.stderr[-3000:], [e.read_text() for e in errors])
    missing = [r for r in range(2) if not (out / f"rank{r}.npz").exists()]
    assert not missing, (f"ranks {missing} wrote nothing", done.stderr[-3000:])
    return [dict(np.load(out / f"rank{r}.npz")) for r in range(2)]


def _check_against_one_process(store: Path, ranks: list[dict], one: dict, sizes: dict) -> None:
    """The store rank 0 wrote, once; both ranks' runs equal; each probe error within one example of one process's."""
    stored = pk.open_run(store)
    assert stored.attrs["world_size"] == 2 and one["world_size"] == 1
    assert stored.epoch.values.tolist() == [0, 1, 2] == one["epoch"].tolist()
    for rank in ranks:  # every rank holds the run rank 0 wrote (rank 1 would have failed writing it)
        assert rank["world_size"] == 2 and rank["epoch"].tolist() == [0, 1, 2]
        np.testing.assert_array_equal(rank["probe"], stored.probe.values)
    for m, metric in enumerate(stored.metric.values):
        split, measure = str(metric).split("_", 1)
        if measure == "error":
            two = stored.probe.sel(metric=metric).values
            assert np.isfinite(two).all(), metric
            gap = np.abs(two - one["probe"][:, :, m])
            assert np.all(gap <= 1 / sizes[split] + 1e-9), (metric, two, one["probe"][:, :, m])


def _check_online(ranks: list[dict]) -> None:
    """Online probes stepped on each rank's own batches, their gradients summed: the same probes on both ranks."""
    for key in ("online_probe", "online_iterations", "online_epoch"):
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)
    assert ranks[0]["online_world_size"] == 2
    assert np.isfinite(ranks[0]["online_probe"][:, :, list(ranks[0]["online_metrics"]).index("valid_error")]).all()


def test_lightning_ddp_on_two_processes_writes_the_run_of_one(tmp_path):
    ranks = _ranks(_lightning("fit", tmp_path), tmp_path)
    (tmp_path / "one").mkdir()
    one = ddp_worker.lightning_fit(tmp_path / "one", devices=1)
    _check_against_one_process(tmp_path / "l.zarr", ranks, one, {"train": 200, "valid": 200, "test": 200})
    assert ranks[0]["step"].tolist() == [0, 2, 4]  # each rank's loader holds half of the 4 batches of an epoch
    assert {int(r["global_rank"]) for r in ranks} == {0, 1}
    # callback_metrics holds the figure the online callback, the last to log it, logged: alike on every rank.
    online_valid = ranks[0]["online_probe"][:, -1, list(ranks[0]["online_metrics"]).index("valid_error")]
    assert float(ranks[0]["best"]) == float(ranks[1]["best"]) == pytest.approx(np.nanmin(online_valid))
    stored = pk.open_run(tmp_path / "l.zarr")
    assert np.isnan(stored.model_valid_loss.values[0]) and np.isfinite(stored.model_valid_loss.values[1:]).all()
    np.testing.assert_array_equal(stored.model_valid_loss.values, ranks[0]["model_valid_loss"])  # rank 0's, as logged
    _check_online(ranks)
    assert ranks[0]["online_iterations"][:, -1].tolist() == [4] * len(ddp_worker.LAYERS)  # 2 steps an epoch, 2 epochs


def test_hf_trainer_under_torchrun_on_two_processes_writes_the_run_of_one(tmp_path):
    ranks = _ranks(_torchrun("fit", tmp_path), tmp_path)
    (tmp_path / "one").mkdir()
    one = ddp_worker.hf_fit(tmp_path / "one", processes=1)
    _check_against_one_process(tmp_path / "hf.zarr", ranks, one, {"train": 160, "valid": 80})
    assert ranks[0]["step"].tolist() == [0, 3, 6]  # 80 examples a process, 32 a batch
    stored = pk.open_run(tmp_path / "hf.zarr")
    np.testing.assert_allclose(stored.model_valid_loss.values[1:], ranks[0]["logged_valid"], rtol=1e-6)
    # Every on_log of every rank heard each row's figure, the snapshot callback's then the online one's.
    np.testing.assert_array_equal(ranks[0]["best"], ranks[1]["best"])
    np.testing.assert_allclose(ranks[0]["best"][0::2], stored.probe.sel(metric="valid_error").min("layer").values)
    _check_online(ranks)
    assert ranks[0]["online_iterations"][:, -1].tolist() == [6] * ranks[0]["online_iterations"].shape[0]


@pytest.mark.parametrize("scenario", ["bad_on_rank_1", "bad_on_every_rank"])
def test_data_that_does_not_fit_the_model_under_ddp_stops_every_rank_with_one_line(scenario, tmp_path):
    done = _lightning(scenario, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    own = ("ValueError: the callback's train split does not fit Sequential: its inputs (per-example shape 3x8x8) make "
           "the model raise RuntimeError: ")
    for rank in range(2):
        text = (tmp_path / f"error{rank}.txt").read_text()
        assert "\n" not in text, text
        if rank == 1 or scenario == "bad_on_every_rank":
            assert text.startswith(own), text
        else:  # stopped by rank 1's refusal instead of waiting for it in the monitor's first collective
            assert text.startswith("ValueError: rank 1 of 2 stopped: " + own.removeprefix("ValueError: ")), text
        assert (tmp_path / f"steps{rank}.txt").read_text() == "0"  # before any training step
    assert not (tmp_path / "rank0.npz").exists() and not (tmp_path / "rank1.npz").exists()
