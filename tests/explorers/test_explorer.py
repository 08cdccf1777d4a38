"""The single-run explorer driven from Python: widgets in, chart specs out."""

from __future__ import annotations

import pytest
from conftest import layer_names, make_run
from vega_specs import encoding, layers_drawn, mark, rows, rows_or_none, spec, units

from probekit.explorers import explore
from probekit.run.schema import layout_of, rows_of
from probekit.run.store import RunWriter

FORWARD = layer_names(6)  # input, conv1, relu2, pool3, conv4, logits


@pytest.fixture
def ex(run):
    return explore(run)


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
    ex.controls.merges.click()
    assert ex.selected_layers == FORWARD  # no indexed children or merges in this run: all of them
    assert ex.controls.merges.description == "merge points only"


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
    assert ex.state.epoch == -1 and ex.epoch == 3


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
    with pytest.raises(ValueError, match="neither a layer of this run nor a shortcut; use 'all', 'merges'"):
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
    with pytest.raises(ValueError, match="interval must be a finite number > 0; got 0"):
        explore(make_run(), interval=0)


def test_an_epoch_argument_is_a_number_or_counts_from_the_end(tmp_path, run):
    at_number = explore(run, epoch=1)
    assert at_number.epoch == 1 and at_number.state.epoch == 1
    with pytest.raises(ValueError, match="epoch=-5 reaches before the first epoch; this run has 4 epochs"):
        explore(run, epoch=-5)
    path = tmp_path / "growing.zarr"
    with RunWriter(path, layout_of(run)) as writer:
        for row in rows_of(run)[:3]:
            writer.append(row)
        before_last = explore(path, epoch=-2)  # a position from the end, as schema.epoch_position reads it
        pinned = explore(path, epoch=1)
        assert before_last.epoch == 1 and pinned.epoch == 1
        writer.append(rows_of(run)[3])
    assert before_last.refresh().epoch == 2  # still the one before the last
    assert pinned.refresh().epoch == 1  # an epoch number stays


def test_empty_selection_draws_empty_charts_and_says_so(ex):
    ex.controls.layers.value = ()
    assert ex.selected_layers == []
    assert rows_or_none(spec(ex, "curves"), "line") == []
    assert "0 selected" in ex._header.value


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
# Baselines: entries of a menu, dashed curves in the charts


def _dashed_rows(chart: dict) -> list[dict]:
    found = [chart["datasets"][name] for unit, name in units(chart)
             if mark(unit) == "line" and unit["encoding"].get("strokeDash", {}).get("field") == "baseline"]
    return [row for data in found for row in data]


def test_the_baselines_menu_lists_the_runs_baselines_and_draws_the_selected_ones_dashed():
    ex = explore(make_run(baselines=("random_init", "control"), repeats=3))
    assert ex.controls.baselines.options == ("random_init", "control")
    assert ex.controls.baselines.value == ("random_init", "control")
    assert ex.controls.baselines.layout.display is None
    for name in ("profile", "curves"):
        assert {row["baseline"] for row in _dashed_rows(spec(ex, name))} == {"random_init", "control"}
    ex.controls.baselines.value = ("control",)
    assert ex.state.baselines_shown == ("control",)
    assert {row["baseline"] for row in _dashed_rows(spec(ex, "curves"))} == {"control"}
    ex.controls.baselines.value = ()
    assert not _dashed_rows(spec(ex, "profile")) and not _dashed_rows(spec(ex, "curves"))
    assert ex.select(baselines="all").controls.baselines.value == ("random_init", "control")
    with pytest.raises(ValueError, match="baseline='shuffled' is not in this run; choose from: random_init, control"):
        ex.select(baselines=["shuffled"])


def test_a_run_without_baselines_hides_the_menu(ex):
    assert ex.controls.baselines.options == () and ex.controls.baselines.layout.display == "none"
    assert not _dashed_rows(spec(ex, "curves"))
    with pytest.raises(ValueError, match="has no baselines; probe with baselines="):
        ex.select(baselines="control")
