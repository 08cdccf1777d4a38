"""The explorers driven from Python: widgets in, chart specs out, live stores followed."""

from __future__ import annotations

import asyncio
import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import layer_names, make_run

from probekit.explore.explorer import block_layers, compare, explore
from probekit.run.schema import layout_of, rows_of
from probekit.run.store import RunWriter

ROOT = Path(__file__).resolve().parents[1]
FORWARD = layer_names(6)  # input, conv1, relu2, pool3, conv4, logits


# --------------------------------------------------------------------------
# Reading the Vega-Lite that the page receives


def units(spec: dict, data: str | None = None) -> list[tuple[dict, str | None]]:
    data = spec.get("data", {}).get("name", data)
    if "layer" in spec:
        return [unit for child in spec["layer"] for unit in units(child, data)]
    return [(spec, data)]


def mark(unit: dict) -> str:
    return unit["mark"] if isinstance(unit["mark"], str) else unit["mark"]["type"]


def rows(spec: dict, mark_type: str) -> list[dict]:
    """Data rows of the units drawing ``mark_type`` (all of them together)."""
    found = [spec["datasets"][name] for unit, name in units(spec) if mark(unit) == mark_type and name]
    assert found, f"no {mark_type} unit with data in this spec"
    return [row for data in found for row in data]


def encoding(spec: dict, mark_type: str, channel: str) -> dict:
    return next(unit["encoding"][channel] for unit, _ in units(spec) if mark(unit) == mark_type)


def layers_drawn(spec: dict, mark_type: str = "line") -> list[str]:
    return list(dict.fromkeys(row["layer"] for row in rows(spec, mark_type)))


def spec(explorer, name: str) -> dict:
    return explorer.charts[name].spec


@pytest.fixture
def ex(run):
    return explore(run)


# --------------------------------------------------------------------------
# Layer shortcuts


def test_blocks_keep_input_output_indexed_children_and_merges():
    names = ["input", "conv1", "bn1", "maxpool", "layer1.0", "layer1.1", "layer2.0", "avgpool", "fc"]
    assert block_layers(names) == ["input", "layer1.0", "layer1.1", "layer2.0", "fc"]
    inception = ["maxpool1", "Conv2d_3b_1x1", "maxpool2", "Mixed_5b", "Mixed_6a", "AuxLogits", "avgpool", "fc"]
    ops = ["MaxPool2d", "BasicConv2d", "MaxPool2d", "cat", "cat", "InceptionAux", "AdaptiveAvgPool2d", "Linear"]
    assert block_layers(inception, ops) == ["maxpool1", "Mixed_5b", "Mixed_6a", "fc"]


def test_blocks_of_a_run_without_blocks_is_every_layer():
    names = ["input", "conv1", "relu1", "pool1", "fc1", "fc2"]
    assert block_layers(names) == names
    with pytest.raises(ValueError, match="got 6 names but 2 ops"):
        block_layers(names, ["input", "Conv2d"])


def test_every_kth_keeps_the_last_layer(ex):
    ex.select(every=2)
    assert ex.selected_layers == ["input", "relu2", "conv4", "logits"]
    ex.select(every=5)
    assert ex.selected_layers == ["input", "logits"]
    with pytest.raises(ValueError, match="every must be a whole number of at least 1"):
        ex.select(every=0)


# --------------------------------------------------------------------------
# One run: selections change the charts


def test_explorer_starts_on_every_layer_at_the_latest_epoch(ex, run):
    assert ex.selected_layers == FORWARD
    assert (ex.measure, ex.split, ex.epoch) == ("error", "valid", 3)
    assert layers_drawn(spec(ex, "curves")) == FORWARD
    profile = rows(spec(ex, "profile"), "line")
    assert {row["split"] for row in profile} == {"train", "valid"}  # train beside valid: the gap
    assert set(ex.charts) == {"profile", "curves", "heatmap", "diagnosis"}
    assert "6 layers, 6 selected" in ex._header.value


def test_a_large_run_starts_on_every_kth_layer():
    big = make_run(n_layers=60, n_epochs=2)
    explorer = explore(big)
    assert len(explorer.selected_layers) <= 25
    assert explorer.selected_layers[0] == "input" and explorer.selected_layers[-1] == "logits"


def test_picking_layers_in_the_widget_redraws_one_line_per_layer(ex):
    ex.controls.layers.value = ("logits", "conv1")
    assert ex.selected_layers == ["conv1", "logits"]  # forward order, whatever the click order
    assert layers_drawn(spec(ex, "curves")) == ["conv1", "logits"]
    assert {row["layer"] for row in rows(spec(ex, "profile"), "line")} == {"conv1", "logits"}
    assert {row["layer"] for row in rows(spec(ex, "heatmap"), "rect") if "layer" in row} == {"conv1", "logits"}
    assert "6 layers, 2 selected" in ex._header.value


def test_shortcut_buttons_select_layers(ex):
    ex.controls.layers.value = ("conv1",)
    ex.controls.all.click()
    assert ex.selected_layers == FORWARD
    ex.controls.k.value = 3
    ex.controls.every.click()
    assert ex.selected_layers == ["input", "pool3", "logits"]
    assert ex.controls.layers.value == ("input", "pool3", "logits")
    assert layers_drawn(spec(ex, "curves")) == ["input", "pool3", "logits"]
    ex.controls.blocks.click()
    assert ex.selected_layers == FORWARD  # no indexed blocks or merges in this run: all of them


def test_measure_and_split_change_data_and_encoding(ex, run):
    ex.controls.measure.value = "loss"
    curves = spec(ex, "curves")
    assert encoding(curves, "line", "y")["title"] == "valid loss (nats)"
    value = next(r["value"] for r in rows(curves, "line") if r["layer"] == "conv1" and r["epoch"] == 2)
    assert value == pytest.approx(float(run.probe.sel(layer="conv1", epoch=2, metric="valid_loss")))
    ex.controls.split.value = "test"
    assert encoding(spec(ex, "curves"), "line", "y")["title"] == "test loss (nats)"
    assert {row["split"] for row in rows(spec(ex, "profile"), "line")} == {"train", "test"}
    assert ex.select(split="train").split == "train"
    assert {row["split"] for row in rows(spec(ex, "profile"), "line")} == {"train"}


def test_epoch_slider_moves_profile_heatmap_and_diagnosis(ex, run):
    ex.controls.epoch.widget.value = 1
    assert ex.epoch == 1 and ex.state.epoch == 1
    profile = spec(ex, "profile")
    assert {row["epoch"] for row in rows(profile, "line")} == {1}
    assert "epoch 1" in profile["title"]["text"]
    assert rows(spec(ex, "curves"), "rule") == [{"epoch": 1}]
    heatmap = spec(ex, "heatmap")
    assert [r["epoch"] for r in rows(heatmap, "rect") if "layer" not in r] == [1]  # the outlined column
    assert "epoch 1" in spec(ex, "diagnosis")["title"]["text"]
    assert "diagnosis at epoch 1" in ex._findings_view.value
    ex.controls.epoch.widget.value = 3  # the last epoch: follow the latest again
    assert ex.state.epoch is None and ex.epoch == 3


def test_diagnosis_panel_shows_pk_diagnose_findings(run):
    import numpy as np

    from probekit.diagnosis import diagnose

    stuck = run.copy(deep=True)
    stuck["probe"].loc[{"layer": ["relu2", "pool3"]}] = 0.9  # at chance: worse than conv1 and than conv4
    explorer = explore(stuck)
    expected = diagnose(stuck, split="valid", epoch=-1).to_frame()
    assert list(explorer.findings["kind"]) == list(expected["kind"]) and len(expected)
    assert expected["kind"].iloc[0] in explorer._findings_view.value
    drawn = {row["layer"] for row in rows(spec(explorer, "diagnosis"), "rect")} | {
        row["layer"] for unit, name in units(spec(explorer, "diagnosis")) if mark(unit) == "point" and name
        for row in spec(explorer, "diagnosis")["datasets"][name]
    }
    covered = {layer for layers in expected["layers"] for layer in np.atleast_1d(layers)}
    assert covered <= drawn


def test_select_errors_name_the_choices(ex):
    with pytest.raises(ValueError, match=r"layers nope are not in this run; choose from: input, conv1"):
        ex.select(layers=["nope"])
    with pytest.raises(ValueError, match="neither a layer of this run nor a shortcut; use 'all', 'blocks'"):
        ex.select(layers="everything")
    with pytest.raises(ValueError, match="pass layers= or every=, not both"):
        ex.select(layers="all", every=2)
    with pytest.raises(ValueError, match="measure='top5' is not in this run; choose from: error, loss"):
        ex.select(measure="top5")
    with pytest.raises(ValueError, match=r"epoch=9 is not in this run; choose from: 0, 1, 2, 3 \(or -1"):
        ex.select(epoch=9)
    with pytest.raises(TypeError, match="a run is an xarray.Dataset or the path of its store"):
        explore(42)
    with pytest.raises(FileNotFoundError, match="no run store at"):
        explore("no/such/run.zarr")
    with pytest.raises(ValueError, match="interval must be a positive number of seconds"):
        explore(make_run(), interval=0)


def test_empty_selection_draws_empty_charts_and_says_so(ex):
    ex.controls.layers.value = ()
    assert ex.selected_layers == []
    assert rows_or_none(spec(ex, "curves"), "line") == []
    assert "0 selected" in ex._header.value


def rows_or_none(spec_dict: dict, mark_type: str) -> list[dict]:
    found = [spec_dict["datasets"].get(name, []) for unit, name in units(spec_dict) if mark(unit) == mark_type]
    return [row for data in found for row in data]


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


def test_explorer_displays_as_its_widget(ex):
    bundle = ex._repr_mimebundle_()
    assert bundle["application/vnd.jupyter.widget-view+json"]["model_id"] == ex.widget.model_id
    assert "probekit-explorer" in ex.widget._dom_classes
    assert "probekit-curves" in ex.charts["curves"]._dom_classes
    assert ex.charts["curves"].embed_options == {"renderer": "svg", "actions": False}


def test_explorer_uses_the_offline_vega_bundle(ex):
    import altair as alt

    assert alt.JupyterChart._is_offline
    assert "esm.sh" not in ex.charts["profile"]._esm  # the JavaScript is inlined, no CDN


def test_close_closes_only_the_explorers_widgets(run):
    first, second = explore(run), explore(run)
    first.close()
    assert first.widget.comm is None and first.charts["curves"].comm is None
    assert second.widget.comm is not None


# --------------------------------------------------------------------------
# Live: following a store that a run is still writing


def test_live_explorer_follows_a_store_without_blocking_the_loop(tmp_path, run):
    path = tmp_path / "live.zarr"
    epochs = rows_of(run)

    async def scenario():
        gaps, stop = [], asyncio.Event()

        async def ticker():  # another coroutine of the kernel: must keep running
            last = time.perf_counter()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        tick = asyncio.get_running_loop().create_task(ticker())
        explorer = explore(path, live=True, interval=0.05)  # the store does not exist yet
        assert explorer.live and explorer.dataset is None
        assert "waiting for the run store" in explorer.controls.status.value
        seen = []
        with RunWriter(path, layout_of(run)) as writer:
            for row in epochs:
                writer.append(row)
                for _ in range(200):
                    await asyncio.sleep(0.02)
                    if explorer.dataset is not None and explorer.dataset.sizes["epoch"] == row.epoch + 1:
                        break
                seen.append(explorer.epoch)
                if row.epoch == 1:
                    explorer.select(epoch=1, layers=["input", "logits"])  # pinned: stays while epochs land
        pinned_epoch, pinned_layers = explorer.epoch, explorer.selected_layers
        explorer.select(epoch=-1)
        latest = explorer.epoch
        lines = layers_drawn(spec(explorer, "curves"))
        explorer.stop()
        await asyncio.sleep(0.1)
        stop.set()
        await tick
        return explorer, seen, pinned_epoch, pinned_layers, latest, lines, gaps

    explorer, seen, pinned_epoch, pinned_layers, latest, lines, gaps = asyncio.run(scenario())
    assert seen == [0, 1, 1, 1]
    assert pinned_epoch == 1 and pinned_layers == ["input", "logits"]
    assert latest == 3 and lines == ["input", "logits"]
    assert explorer.dataset.sizes["epoch"] == 4
    assert not explorer.live and "live" not in explorer._header.value
    assert max(gaps) < 1.0, f"the event loop was blocked for {max(gaps):.2f} s"


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
        for _ in range(100):
            await asyncio.sleep(0.02)
            if "cannot read" in explorer.controls.status.value:
                break
        running = explorer.live
        explorer.stop()
        return explorer, running

    explorer, running = asyncio.run(scenario())
    assert "broken metadata file" in explorer.controls.status.value
    assert running  # a damaged read is reported, and the explorer keeps trying


# --------------------------------------------------------------------------
# Several runs, aligned by relative depth


@pytest.fixture
def two_runs():
    return {"deep": make_run(n_layers=9, n_epochs=4, model="deep"), "shallow": make_run(n_layers=5, n_epochs=1,
                                                                                        model="shallow")}


def test_compare_draws_every_run_on_relative_depth(two_runs):
    cmp = compare(two_runs)
    chart = spec(cmp, "comparison")
    drawn = rows(chart, "line")
    assert {row["run"] for row in drawn} == {"deep", "shallow"}
    assert encoding(chart, "line", "x")["field"] == "relative_depth"
    assert {row["relative_depth"] for row in drawn if row["run"] == "shallow"} == {0.0, 0.25, 0.5, 0.75, 1.0}
    assert cmp.epochs_shown == {"deep": 3, "shallow": 0}
    assert cmp.selected_layers["shallow"] == layer_names(5)


def test_compare_applies_one_selection_to_every_run(two_runs):
    cmp = compare(two_runs)
    cmp.controls.depth.value = (0.5, 1.0)
    assert cmp.selected_layers == {"deep": layer_names(9)[4:], "shallow": layer_names(5)[2:]}
    assert min(row["relative_depth"] for row in rows(spec(cmp, "comparison"), "line")) == 0.5
    cmp.controls.k.value = 2
    cmp.controls.rule.value = "every"
    assert cmp.selected_layers["deep"] == [layer_names(9)[i] for i in (4, 6, 8)]
    cmp.controls.rule.value = "all"
    cmp.controls.depth.value = (0.0, 1.0)
    cmp.controls.epoch.widget.value = 1
    assert cmp.epochs_shown == {"deep": 1, "shallow": 0}
    assert {(r["run"], r["epoch"]) for r in rows(spec(cmp, "comparison"), "line")} == {("deep", 1), ("shallow", 0)}
    cmp.controls.measure.value = "loss"
    assert encoding(spec(cmp, "comparison"), "line", "y")["title"] == "valid loss (nats)"
    assert ">shallow</td>" in cmp._table.value


def test_compare_runs_from_stores_and_names(tmp_path, two_runs):
    paths = []
    for name, ds in two_runs.items():
        path = tmp_path / f"{name}.zarr"
        with RunWriter(path, layout_of(ds)) as writer:
            for row in rows_of(ds):
                writer.append(row)
        paths.append(path)
    cmp = compare(paths, names=["A", "B"])
    assert list(cmp.datasets) == ["A", "B"]
    same = compare([two_runs["deep"], two_runs["deep"]])
    assert list(same.datasets) == ["deep (1)", "deep (2)"]


def test_compare_errors(two_runs):
    with pytest.raises(TypeError, match="compare takes several runs"):
        compare(two_runs["deep"])
    with pytest.raises(ValueError, match="names has 1 entries for 2 runs"):
        compare(list(two_runs.values()), names=["a"])
    with pytest.raises(ValueError, match="names must be distinct"):
        compare(list(two_runs.values()), names=["a", "a"])
    with pytest.raises(ValueError, match="compare needs at least one run"):
        compare([])
    cmp = compare(two_runs)
    with pytest.raises(ValueError, match="layers='conv1' is not one of: all, blocks"):
        cmp.select(layers="conv1")
    with pytest.raises(ValueError, match="depth_range must satisfy 0 <= low <= high <= 1"):
        cmp.select(depth_range=(0.8, 0.2))
    with pytest.raises(ValueError, match="split='dev' is not in this run; choose from: train, valid, test"):
        cmp.select(split="dev")


def test_compare_live_follows_a_growing_store(tmp_path, two_runs):
    deep = two_runs["deep"]
    path = tmp_path / "deep.zarr"

    async def scenario():
        cmp = compare({"deep": path, "shallow": two_runs["shallow"]}, live=True, interval=0.02)
        assert cmp.datasets["deep"] is None
        with RunWriter(path, layout_of(deep)) as writer:
            for row in rows_of(deep)[:2]:
                writer.append(row)
            for _ in range(200):
                await asyncio.sleep(0.02)
                if cmp.epochs_shown["deep"] == 1:
                    break
        cmp.stop()
        return cmp

    cmp = asyncio.run(scenario())
    assert cmp.epochs_shown == {"deep": 1, "shallow": 0}
    assert {r["run"] for r in rows(spec(cmp, "comparison"), "line")} == {"deep", "shallow"}
    assert not cmp.live


# --------------------------------------------------------------------------
# No torch


def test_explore_does_not_import_torch():
    code = "import sys, probekit.explore.explorer; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    module = importlib.import_module("probekit.explore.explorer")  # pk.explore is the function, this the module
    assert module.__all__ == sorted(module.__all__)
