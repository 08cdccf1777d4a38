"""Reading runs for the explorers: once, on refresh, and live off the kernel's event loop."""

from __future__ import annotations

import asyncio
import threading

import pytest
from conftest import layer_names, make_run
from vega_specs import layers_drawn, rows, spec

from probekit.explorers import compare, explore, live
from probekit.run.schema import layout_of, rows_of
from probekit.run.store import RunWriter, open_run

FORWARD = layer_names(6)  # input, conv1, relu2, pool3, conv4, logits
#: Only catches a hang: every wait below ends on a condition, never on time.
HANG = 120


async def until(condition, what: str) -> None:
    """Wait (yielding to the event loop) until ``condition()`` holds."""

    async def poll():
        while not condition():
            await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(poll(), timeout=HANG)
    except asyncio.TimeoutError:
        pytest.fail(f"no {what} after {HANG} s: the live app hangs")


@pytest.fixture
def read_threads(monkeypatch):
    """The thread of every store read the live code makes (``live.open_run``, recorded)."""
    threads: list[int] = []

    def recording_open_run(path):
        threads.append(threading.get_ident())
        return open_run(path)

    monkeypatch.setattr(live, "open_run", recording_open_run)
    return threads


def test_explorer_opens_a_store_and_refresh_reads_new_epochs(tmp_path, run):
    path = tmp_path / "run.zarr"
    with RunWriter(path, layout_of(run)) as writer:
        for row in rows_of(run)[:2]:
            writer.append(row)
        explorer = explore(path)
        assert explorer.epoch == 1
        explorer.controls.layers.value = ("conv1", "logits")
        writer.append(rows_of(run)[2])
        explorer.refresh()
    assert explorer.epoch == 2
    assert explorer.selected_layers == ["conv1", "logits"]  # the selection survives new epochs
    assert {r["epoch"] for r in rows(spec(explorer, "curves"), "line")} == {0, 1, 2}
    assert "live" not in repr(explorer)


def test_a_store_without_epochs_waits_for_the_first(tmp_path, run):
    path = tmp_path / "new.zarr"
    with RunWriter(path, layout_of(run)) as writer:
        explorer = explore(path)
        assert explorer.epoch is None and explorer.selected_layers == FORWARD
        assert all(chart.spec is None for chart in explorer.charts.values())
        assert "waiting for the first epoch" in explorer._findings_view.value
        assert explorer.controls.epoch.widget.disabled
        writer.append(rows_of(run)[0])
        explorer.refresh()
    assert explorer.epoch == 0
    assert layers_drawn(spec(explorer, "curves")) == FORWARD
    cmp = compare({"empty": run.isel(epoch=slice(0, 0)), "full": run})
    assert cmp.epochs_shown == {"empty": None, "full": 3}
    assert {r["run"] for r in rows(spec(cmp, "comparison"), "line")} == {"full"}
    assert "no epoch yet" in cmp._table.value


def test_live_explorer_reads_off_the_event_loop_and_follows_the_store(tmp_path, run, read_threads):
    path = tmp_path / "live.zarr"
    epochs = rows_of(run)

    async def scenario():
        loop_thread = threading.get_ident()
        explorer = explore(path, live=True, interval=0.01)  # the store does not exist yet
        assert explorer.live and explorer.dataset is None
        assert "waiting for the run store" in explorer.controls.status.value
        seen = []
        with RunWriter(path, layout_of(run)) as writer:
            for row in epochs:
                writer.append(row)
                completed = open_run(path).sizes["epoch"]  # the store's own count of completed epochs
                slider = explorer.controls.epoch.widget
                await until(lambda: explorer.dataset is not None and explorer.dataset.sizes["epoch"] == completed
                            and slider.options[-1][1] == row.epoch and f"{completed} epoch" in explorer._header.value,
                            f"widgets showing the store's {completed} epochs")
                seen.append(explorer.epoch)
                if row.epoch == 1:
                    explorer.select(epoch=1, layers=["input", "logits"])  # pinned: stays while epochs land
        pinned_epoch, pinned_layers = explorer.epoch, explorer.selected_layers
        explorer.select(epoch=-1)
        latest = explorer.epoch
        lines = layers_drawn(spec(explorer, "curves"))
        explorer.stop()
        return explorer, seen, pinned_epoch, pinned_layers, latest, lines, loop_thread

    explorer, seen, pinned_epoch, pinned_layers, latest, lines, loop_thread = asyncio.run(scenario())
    assert seen == [0, 1, 1, 1]
    assert pinned_epoch == 1 and pinned_layers == ["input", "logits"]
    assert latest == 3 and lines == ["input", "logits"]
    assert explorer.dataset.sizes["epoch"] == 4
    assert not explorer.live and "live" not in explorer._header.value
    assert read_threads, "the live explorer never read the store"
    assert loop_thread not in read_threads, "a live read ran on the event loop's thread, blocking the kernel"


def test_live_needs_a_store_and_an_event_loop(tmp_path, run):
    with pytest.raises(ValueError, match="live=True follows a run store on disk, but an in-memory dataset"):
        explore(run, live=True)
    with pytest.raises(RuntimeError, match="live=True needs a running asyncio event loop"):
        explore(tmp_path / "x.zarr", live=True)


def test_live_status_reports_a_store_that_cannot_be_read(tmp_path, run):
    path = tmp_path / "bad.zarr"

    async def scenario():
        explorer = explore(path, live=True, interval=0.02)
        path.mkdir()
        (path / ".zmetadata").write_text("{not json")
        await until(lambda: "cannot read" in explorer.controls.status.value, "report of the unreadable store")
        running = explorer.live
        explorer.stop()
        return explorer, running

    explorer, running = asyncio.run(scenario())
    assert "broken metadata file" in explorer.controls.status.value
    assert running  # a damaged read is reported, and the explorer keeps trying


def test_compare_live_follows_a_growing_store_off_the_event_loop(tmp_path, read_threads):
    deep, shallow = make_run(n_layers=9, n_epochs=4, model="deep"), make_run(n_layers=5, n_epochs=1, model="shallow")
    path = tmp_path / "deep.zarr"

    async def scenario():
        loop_thread = threading.get_ident()
        cmp = compare({"deep": path, "shallow": shallow}, live=True, interval=0.02)
        assert cmp.datasets["deep"] is None
        with RunWriter(path, layout_of(deep)) as writer:
            for row in rows_of(deep)[:2]:
                writer.append(row)
        completed = open_run(path).sizes["epoch"]
        await until(lambda: cmp.datasets["deep"] is not None and cmp.datasets["deep"].sizes["epoch"] == completed
                    and cmp.controls.epoch.widget.options[-1][1] == completed - 1,
                    f"the comparison showing the store's {completed} epochs")
        cmp.stop()
        return cmp, loop_thread

    cmp, loop_thread = asyncio.run(scenario())
    assert cmp.epochs_shown == {"deep": 1, "shallow": 0}
    assert {r["run"] for r in rows(spec(cmp, "comparison"), "line")} == {"deep", "shallow"}
    assert not cmp.live
    assert read_threads and loop_thread not in read_threads
