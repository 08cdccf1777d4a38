"""Chart specs of probekit.plots, snapshotted through ``chart.to_dict()``."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import pytest
from conftest import layer_names, make_run

from probekit import plots

ROOT = Path(__file__).resolve().parents[1]
FORWARD = layer_names(6)  # input, conv1, relu2, pool3, conv4, logits


# --------------------------------------------------------------------------
# Helpers that read a Vega-Lite spec


def units(spec: dict, data: str | None = None) -> list[tuple[dict, str | None]]:
    """Every unit (single-mark) spec with the name of the dataset it draws."""
    data = spec.get("data", {}).get("name", data)
    if "layer" in spec:
        return [unit for child in spec["layer"] for unit in units(child, data)]
    return [(spec, data)]


def mark(unit: dict) -> str:
    return unit["mark"] if isinstance(unit["mark"], str) else unit["mark"]["type"]


def find(spec: dict, mark_type: str) -> list[tuple[dict, list[dict]]]:
    """Units drawing ``mark_type``, each with its data rows."""
    return [(unit, spec["datasets"][name]) for unit, name in units(spec) if mark(unit) == mark_type]


def one(spec: dict, mark_type: str) -> tuple[dict, list[dict]]:
    found = find(spec, mark_type)
    assert len(found) == 1, f"expected one {mark_type} unit, found {len(found)}"
    return found[0]


def tooltip_fields(unit: dict) -> list[str]:
    return [tip["field"] for tip in unit["encoding"]["tooltip"]]


def value_of(ds, layer: str, epoch: int, metric: str) -> float:
    return float(ds["probe"].sel(layer=layer, epoch=epoch, metric=metric))


def row(rows: list[dict], **where) -> dict:
    hits = [r for r in rows if all(r[k] == v for k, v in where.items())]
    assert len(hits) == 1, f"expected one row for {where}, found {len(hits)}"
    return hits[0]


@pytest.fixture
def findings() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "kind": ["dead segment", "non-monotonic step", "chance-level layer"],
            "layers": [["conv1", "relu2", "pool3"], ["conv4"], ["input"]],
            "evidence": ["valid error flat at 0.95 over 3 layers", "error rises 0.61 -> 0.64", "0.95 vs chance 0.90"],
            "suggestion": ["check the skip connection", "probe more epochs", "expected at the input"],
            "severity": [2, 1, 0],
        }
    )


def dashed(spec: dict) -> list[tuple[dict, list[dict]]]:
    """Line units whose dash pattern encodes the baseline."""
    return [(u, r) for u, r in find(spec, "line") if u["encoding"].get("strokeDash", {}).get("field") == "baseline"]


def bands(spec: dict) -> list[tuple[dict, list[dict]]]:
    """Area units spanning a repeats' interval (low to high), coloured like their lines (the gap band is grey)."""
    return [(u, r) for u, r in find(spec, "area") if u["encoding"].get("y2", {}).get("field") == "high" and "color" in u["encoding"]]


@pytest.fixture
def controlled():
    """A run with both baselines and 5 repeats."""
    return make_run(baselines=("random_init", "control"), repeats=5)


# --------------------------------------------------------------------------
# tidy


def test_tidy_columns_rows_and_values(run):
    frame = plots.tidy(run)
    assert list(frame.columns) == list(plots.TIDY_COLUMNS)
    assert len(frame) == 6 * 4 * 6  # layers x epochs x (3 splits x 2 measures)
    assert frame["layer"].drop_duplicates().tolist() == FORWARD
    hit = frame[(frame.layer == "pool3") & (frame.epoch == 2) & (frame.split == "valid") & (frame.measure == "error")]
    assert hit["value"].item() == pytest.approx(value_of(run, "pool3", 2, "valid_error"))
    assert hit[["depth", "shape", "feature_dim", "reduction", "step"]].iloc[0].tolist() == [6, "32x8x8", 32, "pool", 200]
    assert hit["relative_depth"].item() == pytest.approx(0.6)


def test_tidy_filters_and_keeps_forward_order(run):
    frame = plots.tidy(run, measure="loss", split=["valid", "test"], layers=["logits", "input"], epoch=-1)
    assert frame["layer"].tolist() == ["input", "input", "logits", "logits"]
    assert set(frame["epoch"]) == {3}
    assert frame["split"].tolist() == ["valid", "test"] * 2
    assert set(frame["measure"]) == {"loss"}
    by_label = plots.tidy(run, measure="error", split="train", epoch=[0, 2])
    assert sorted(set(by_label["epoch"])) == [0, 2]


def test_tidy_nan_layer_is_missing_not_an_error():
    ds = make_run(nan_layers=["relu2"])
    frame = plots.tidy(ds, measure="error", split="valid")
    assert frame.loc[frame.layer == "relu2", "value"].isna().all()
    assert frame.loc[frame.layer != "relu2", "value"].notna().all()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"measure": "accuracy"}, r"measure='accuracy' is not in this run; choose from: error, loss$"),
        ({"split": "holdout"}, r"split='holdout' is not in this run; choose from: train, valid, test$"),
        ({"layers": ["conv1", "fc9"]}, r"layer='fc9' is not in this run; choose from: input, conv1, relu2"),
        ({"epoch": 7}, r"epoch=7 is not in this run; choose from: 0, 1, 2, 3 \(or -1 for the last\)"),
        ({"epoch": -5}, r"epoch=-5 reaches before the first epoch; this run has 4 epochs"),
    ],
)
def test_tidy_rejects_what_the_run_lacks(run, kwargs, message):
    with pytest.raises(ValueError, match=message) as caught:
        plots.tidy(run, **kwargs)
    assert "\n" not in str(caught.value)


def test_tidy_rejects_non_runs(run):
    with pytest.raises(TypeError, match=r"expected a probekit run \(an xarray.Dataset"):
        plots.tidy(run.to_dataframe())
    with pytest.raises(ValueError, match=r"not a probekit run: it lacks depth, relative_depth"):
        plots.tidy(run.drop_vars(["depth", "relative_depth"]))
    with pytest.raises(TypeError, match=r"epoch must be an int"):
        plots.tidy(run, epoch=1.5)


def test_long_layer_lists_are_shortened_in_messages():
    with pytest.raises(ValueError, match=r"choose from: input, conv1, .*, logits \(300 in all\)$"):
        plots.tidy(make_run(300, 2), layers="nope")


# --------------------------------------------------------------------------
# thin_epochs


def test_thin_epochs_rule():
    assert plots.thin_epochs(40, 10).tolist() == list(range(40))
    kept = plots.thin_epochs(300, 300)
    assert len(kept) == 16 and kept[0] == 0 and kept[-1] == 299
    assert np.all(np.diff(kept) > 0)
    assert plots.thin_epochs(300, 3000).tolist() == [299]
    with pytest.raises(ValueError, match=r"6000 layers exceed max_rows=5000 even at one epoch; pass layers="):
        plots.thin_epochs(10, 6000)


# --------------------------------------------------------------------------
# training_curves


def test_training_curves_encodings(run):
    spec = plots.training_curves(run).to_dict()
    line, rows = one(spec, "line")
    point, _ = one(spec, "point")
    enc = line["encoding"]
    assert (enc["x"]["field"], enc["x"]["type"]) == ("epoch", "quantitative")
    assert (enc["y"]["field"], enc["y"]["type"], enc["y"]["title"]) == ("value", "quantitative", "valid error")
    colour = enc["color"]
    assert (colour["field"], colour["type"]) == ("layer", "ordinal")
    assert colour["sort"] == FORWARD  # forward order, not alphabetical
    assert colour["sort"] != sorted(FORWARD)
    assert colour["scale"]["scheme"]["name"] == "viridis"
    assert tooltip_fields(point) == ["layer", "depth", "epoch", "step", "value"]
    assert spec["title"]["text"] == "toynet: valid error over training"
    assert len(rows) == 6 * 4
    assert row(rows, layer="relu2", epoch=1)["value"] == pytest.approx(value_of(run, "relu2", 1, "valid_error"))


def test_training_curves_legend_selection_is_declarative(run):
    spec = plots.training_curves(run).to_dict()
    (param,) = spec["params"]
    assert param["select"] == {"type": "point", "fields": ["layer"]}
    assert param["bind"] == "legend"
    line, _ = one(spec, "line")
    (condition,) = line["encoding"]["opacity"]["condition"]
    assert (condition["param"], condition["value"], line["encoding"]["opacity"]["value"]) == (param["name"], 1.0, 0.12)


def test_training_curves_arguments_change_the_data(run):
    spec = plots.training_curves(run, layers=["logits", "conv1"], split="train", measure="loss").to_dict()
    line, rows = one(spec, "line")
    assert {r["layer"] for r in rows} == {"conv1", "logits"}
    assert line["encoding"]["color"]["sort"] == ["conv1", "logits"]
    assert line["encoding"]["y"]["title"] == "train loss (nats)"
    assert row(rows, layer="logits", epoch=3)["value"] == pytest.approx(value_of(run, "logits", 3, "train_loss"))


def test_training_curves_over_steps(run):
    spec = plots.training_curves(run, x="step").to_dict()
    line, rows = one(spec, "line")
    assert line["encoding"]["x"]["field"] == "step"
    assert sorted({r["step"] for r in rows}) == [0, 100, 200, 300]
    with pytest.raises(ValueError, match=r"x='step' needs training steps, but this run records none"):
        plots.training_curves(make_run(steps=False), x="step")
    with pytest.raises(ValueError, match=r"x must be one of 'epoch', 'step'; got 'time'"):
        plots.training_curves(run, x="time")


def test_charts_of_a_run_without_epochs_yet():
    ds = make_run(4, 0)
    for chart in (plots.training_curves(ds), plots.heatmap(ds)):
        chart.to_dict()
    with pytest.raises(ValueError, match=r"this run has no completed epochs yet"):
        plots.depth_profile(ds)


# --------------------------------------------------------------------------
# depth_profile


def test_depth_profile_encodings_and_rows(run):
    spec = plots.depth_profile(run).to_dict()
    line, rows = one(spec, "line")
    enc = line["encoding"]
    assert (enc["x"]["field"], enc["x"]["type"], enc["x"]["sort"]) == ("layer", "ordinal", FORWARD)
    assert (enc["color"]["field"], enc["color"]["sort"]) == ("split", ["train", "valid"])
    assert {"layer", "split", "value", "shape", "feature_dim", "reduction"} <= set(tooltip_fields(line))
    assert len(rows) == 6 * 2
    assert {r["epoch"] for r in rows} == {3}
    assert row(rows, layer="conv4", split="valid")["value"] == pytest.approx(value_of(run, "conv4", 3, "valid_error"))
    assert spec["title"]["text"] == "toynet: error by layer at epoch 3"


def test_depth_profile_shades_the_gap(run):
    spec = plots.depth_profile(run).to_dict()
    area, gap = one(spec, "area")
    assert (area["encoding"]["y"]["field"], area["encoding"]["y2"]["field"]) == ("low", "high")
    assert area["encoding"]["x"]["sort"] == FORWARD
    conv4 = row(gap, layer="conv4")
    assert conv4["low"] == pytest.approx(value_of(run, "conv4", 3, "train_error"))
    assert conv4["high"] == pytest.approx(value_of(run, "conv4", 3, "valid_error"))
    assert conv4["gap"] == pytest.approx(0.05)
    single = plots.depth_profile(run, splits=("valid",)).to_dict()
    assert find(single, "area") == []


def test_depth_profile_chance_rule(run):
    spec = plots.depth_profile(run).to_dict()
    rule, rows = one(spec, "rule")
    assert rule["mark"]["strokeDash"] == [6, 4]
    assert rule["encoding"]["y"]["field"] == "chance_error"
    assert rows == [{"chance_error": pytest.approx(0.9), "label": "chance"}]
    assert find(plots.depth_profile(run, measure="loss").to_dict(), "rule") == []
    no_chance = run.copy()
    no_chance.attrs = {k: v for k, v in run.attrs.items() if k != "chance_error"}
    assert find(plots.depth_profile(no_chance).to_dict(), "rule") == []


def test_depth_profile_arguments_change_the_data(run):
    spec = plots.depth_profile(run, epoch=0, splits=("train", "valid", "test"), layers=["pool3", "input"]).to_dict()
    line, rows = one(spec, "line")
    assert line["encoding"]["x"]["sort"] == ["input", "pool3"]
    assert len(rows) == 2 * 3
    assert {r["epoch"] for r in rows} == {0}
    assert row(rows, layer="pool3", split="test")["value"] == pytest.approx(value_of(run, "pool3", 0, "test_error"))
    relative = plots.depth_profile(run, x="relative_depth").to_dict()
    line, _ = one(relative, "line")
    assert (line["encoding"]["x"]["field"], line["encoding"]["x"]["type"]) == ("relative_depth", "quantitative")
    assert line["encoding"]["x"]["scale"]["domain"] == [0, 1]


def test_depth_profile_rejects_bad_arguments(run):
    with pytest.raises(ValueError, match=r"x must be one of 'layer', 'relative_depth'; got 'depth'"):
        plots.depth_profile(run, x="depth")
    with pytest.raises(ValueError, match=r"split='holdout' is not in this run; choose from: train, valid, test"):
        plots.depth_profile(run, splits=("train", "holdout"))
    with pytest.raises(ValueError, match=r"measure='top5' is not in this run; choose from: error, loss"):
        plots.depth_profile(run, measure="top5")
    with pytest.raises(ValueError, match=r"splits is empty; choose from: train, valid, test"):
        plots.depth_profile(run, splits=())


# --------------------------------------------------------------------------
# heatmap


def test_heatmap_encodings_and_rows(run):
    spec = plots.heatmap(run).to_dict()
    cells = [unit for unit, _ in units(spec) if "color" in unit["encoding"]]
    (cell,) = cells
    enc = cell["encoding"]
    assert mark(cell) == "rect"
    assert (enc["x"]["field"], enc["x"]["type"]) == ("epoch", "ordinal")
    assert (enc["y"]["field"], enc["y"]["type"], enc["y"]["sort"]) == ("layer", "ordinal", FORWARD)
    assert (enc["color"]["field"], enc["color"]["type"]) == ("value", "quantitative")
    assert tooltip_fields(cell) == ["layer", "depth", "epoch", "step", "value"]
    rows = spec["datasets"][spec["data"]["name"]]
    assert len(rows) == 6 * 4
    assert row(rows, layer="relu2", epoch=2)["value"] == pytest.approx(value_of(run, "relu2", 2, "valid_error"))
    assert "subtitle" not in spec["title"]


def test_heatmap_split_and_layers(run):
    spec = plots.heatmap(run, split="test", measure="loss", layers=["logits", "relu2"]).to_dict()
    rows = spec["datasets"][spec["data"]["name"]]
    assert {r["layer"] for r in rows} == {"relu2", "logits"}
    assert row(rows, layer="logits", epoch=0)["value"] == pytest.approx(value_of(run, "logits", 0, "test_loss"))
    assert spec["title"]["text"] == "toynet: test loss (nats) by layer and epoch"


def test_heatmap_greys_missing_cells():
    spec = plots.heatmap(make_run(nan_layers=["relu2"])).to_dict()
    rows = spec["datasets"][spec["data"]["name"]]
    assert all(r["value"] is None for r in rows if r["layer"] == "relu2")
    (missing,) = [unit for unit, _ in units(spec) if "color" not in unit["encoding"]]
    assert missing["mark"]["color"] == "#d9d9d9"
    assert missing["transform"] == [{"filter": "!isValid(datum.value)"}]


# --------------------------------------------------------------------------
# Large runs stay under Altair's row limit


def test_large_run_is_thinned_and_renders(tmp_path):
    ds = make_run(300, 300, splits=("train", "valid"))
    heat = plots.heatmap(ds)
    spec = heat.to_dict()
    rows = spec["datasets"][spec["data"]["name"]]
    assert len(rows) <= plots.MAX_ROWS
    epochs = sorted({r["epoch"] for r in rows})
    assert (len(epochs), epochs[0], epochs[-1]) == (16, 0, 299)
    assert spec["title"]["subtitle"] == "16 of 300 epochs shown, evenly spaced (first and last kept)"
    curves = plots.training_curves(ds)
    curve_rows = one(curves.to_dict(), "line")[1]
    assert len(curve_rows) <= plots.MAX_ROWS
    profile = plots.depth_profile(ds)
    profile.to_dict()
    plots.save(heat, tmp_path / "heat.png")
    plots.save(heat, tmp_path / "heat.svg")
    plots.save(curves, tmp_path / "curves.png")
    assert (tmp_path / "heat.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert (tmp_path / "heat.svg").read_text().count("<path") > 0


def test_max_rows_is_a_budget(run):
    spec = plots.heatmap(run, max_rows=12).to_dict()
    rows = spec["datasets"][spec["data"]["name"]]
    assert sorted({r["epoch"] for r in rows}) == [0, 3]
    assert spec["title"]["subtitle"].startswith("2 of 4 epochs shown")


# --------------------------------------------------------------------------
# comparison


@pytest.fixture
def two_models():
    shallow = make_run(6, 3, model="resnet50")
    deep = make_run(11, 5, model="inception_v3", num_classes=20)
    return shallow, deep


def test_comparison_encodings_and_rows(two_models):
    shallow, deep = two_models
    spec = plots.comparison([shallow, deep]).to_dict()
    line, rows = one(spec, "line")
    enc = line["encoding"]
    assert (enc["x"]["field"], enc["x"]["type"]) == ("relative_depth", "quantitative")
    assert (enc["color"]["field"], enc["color"]["type"], enc["color"]["sort"]) == ("run", "nominal", ["resnet50", "inception_v3"])
    assert {"run", "layer", "shape", "feature_dim", "reduction", "value"} <= set(tooltip_fields(line))
    assert len(rows) == 6 + 11
    hit = row(rows, run="inception_v3", layer="pool6")
    assert hit["value"] == pytest.approx(value_of(deep, "pool6", 4, "valid_error"))
    assert (hit["relative_depth"], hit["shape"], hit["feature_dim"], hit["reduction"]) == (0.6, "48x8x8", 48, "pool")
    assert row(rows, run="resnet50", layer="logits")["epoch"] == 2  # each run's last epoch
    rule, chances = one(spec, "rule")
    assert rule["encoding"]["color"]["field"] == "run"
    assert chances == [
        {"run": "resnet50", "chance_error": pytest.approx(0.9)},
        {"run": "inception_v3", "chance_error": pytest.approx(0.95)},
    ]
    (param,) = spec["params"]
    assert (param["select"]["fields"], param["bind"]) == (["run"], "legend")


def test_comparison_names(two_models):
    shallow, deep = two_models
    named = plots.comparison({"ResNet-50": shallow, "Inception v3": deep}).to_dict()
    assert {r["run"] for r in one(named, "line")[1]} == {"ResNet-50", "Inception v3"}
    listed = plots.comparison([shallow, deep], names=["a", "b"], epoch=0, split="train").to_dict()
    rows = one(listed, "line")[1]
    assert {r["run"] for r in rows} == {"a", "b"} and {r["epoch"] for r in rows} == {0}
    same = plots.comparison([shallow, shallow]).to_dict()
    assert one(same, "line")[0]["encoding"]["color"]["sort"] == ["resnet50", "resnet50 (2)"]


def test_comparison_rejects_bad_arguments(two_models):
    shallow, deep = two_models
    with pytest.raises(ValueError, match=r"names has 1 entries for 2 runs; give one name per run"):
        plots.comparison([shallow, deep], names=["a"])
    with pytest.raises(ValueError, match=r"names must be distinct; got a, a"):
        plots.comparison([shallow, deep], names=["a", "a"])
    with pytest.raises(TypeError, match=r"names= is for a list of runs"):
        plots.comparison({"a": shallow}, names=["b"])
    with pytest.raises(TypeError, match=r"for one run use depth_profile"):
        plots.comparison(shallow)
    with pytest.raises(ValueError, match=r"comparison needs at least one run"):
        plots.comparison([])
    with pytest.raises(ValueError, match=r"run 'resnet50': epoch=4 is not in this run; choose from: 0, 1, 2"):
        plots.comparison([shallow, deep], epoch=4)
    with pytest.raises(ValueError, match=r"run 'b': split='test' is not in this run; choose from: train, valid$"):
        plots.comparison({"a": shallow, "b": make_run(splits=("train", "valid"))}, split="test")


# --------------------------------------------------------------------------
# diagnosis_overlay


def test_diagnosis_overlay_marks_findings(run, findings):
    spec = plots.diagnosis_overlay(run, findings).to_dict()
    rect, spans = one(spec, "rect")
    assert [r["layer"] for r in spans] == ["conv1", "relu2", "pool3"]
    assert {r["kind"] for r in spans} == {"dead segment"}
    assert rect["encoding"]["x"]["sort"] == FORWARD
    assert rect["encoding"]["color"]["field"] == "kind"
    assert {"kind", "evidence", "suggestion"} <= set(tooltip_fields(rect))
    point, singles = one(spec, "point")
    assert [(r["kind"], r["layer"]) for r in singles] == [("non-monotonic step", "conv4"), ("chance-level layer", "input")]
    assert row(singles, layer="conv4")["value"] == pytest.approx(value_of(run, "conv4", 3, "valid_error"))
    assert row(singles, layer="input")["evidence"] == "0.95 vs chance 0.90"
    assert {"kind", "evidence"} <= set(tooltip_fields(point))
    assert point["encoding"]["color"]["sort"] == ["dead segment", "non-monotonic step", "chance-level layer"]
    line, profile = one(spec, "line")
    assert line["encoding"]["x"]["sort"] == FORWARD and len(profile) == 6
    assert one(spec, "rule")[1][0]["chance_error"] == pytest.approx(0.9)
    assert spec["title"]["subtitle"] == "3 findings"


@pytest.mark.parametrize(
    "empty",
    [pd.DataFrame(columns=list(plots.FINDING_COLUMNS)), pd.DataFrame()],
    ids=["with-columns", "bare"],
)
def test_diagnosis_overlay_without_findings(run, empty):
    spec = plots.diagnosis_overlay(run, empty).to_dict()
    assert [mark(unit) for unit, _ in units(spec)] == ["line", "rule", "text"]
    assert spec["title"]["subtitle"] == "no findings"


def test_diagnosis_overlay_nan_layer_and_arguments(findings):
    ds = make_run(nan_layers=["conv4"])
    spec = plots.diagnosis_overlay(ds, findings, split="train", epoch=1).to_dict()
    _, singles = one(spec, "point")
    assert row(singles, layer="conv4")["value"] == 0.0  # drawn at the axis floor
    _, profile = one(spec, "line")
    assert row(profile, layer="conv4")["value"] is None
    assert row(profile, layer="pool3")["value"] == pytest.approx(value_of(ds, "pool3", 1, "train_error"))


def test_diagnosis_overlay_rejects_bad_findings(run, findings):
    with pytest.raises(ValueError, match=r"findings lacks the columns evidence, suggestion; it needs kind, layers, evidence, suggestion"):
        plots.diagnosis_overlay(run, findings[["kind", "layers"]])
    stray = findings.assign(layers=[["conv1", "fc9"], ["conv4"], ["input"]])
    with pytest.raises(ValueError, match=r"finding 0 \(dead segment\) names layers not in this run: fc9; this run has: input, conv1"):
        plots.diagnosis_overlay(run, stray)
    with pytest.raises(TypeError, match=r"findings must be pk.diagnose.s result or a DataFrame of findings"):
        plots.diagnosis_overlay(run, findings.to_dict("records"))


# --------------------------------------------------------------------------
# NaN layers everywhere


def test_nan_layers_render(tmp_path):
    ds = make_run(nan_layers=["input", "pool3"])
    for name, chart in {
        "curves": plots.training_curves(ds),
        "profile": plots.depth_profile(ds),
        "heat": plots.heatmap(ds),
        "compare": plots.comparison([ds, make_run()]),
    }.items():
        spec = chart.to_dict()
        values = [r.get("value") for rows in spec["datasets"].values() for r in rows]
        assert None in values
        assert not any(isinstance(v, float) and math.isnan(v) for v in values)
        plots.save(chart, tmp_path / f"{name}.svg")
        assert "<svg" in (tmp_path / f"{name}.svg").read_text()


# --------------------------------------------------------------------------
# save and enable_offline


def test_save_svg_png_html(run, tmp_path):
    chart = plots.depth_profile(run)
    svg = plots.save(chart, tmp_path / "profile.svg")
    assert svg == tmp_path / "profile.svg"
    text = svg.read_text()
    assert text.startswith("<svg") and 'class="mark-line' in text and 'class="mark-rule' in text
    assert "toynet: error by layer at epoch 3" in text
    png = plots.save(chart, str(tmp_path / "profile.png"))
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    html = plots.save(chart, tmp_path / "profile.html").read_text()
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert "cdn.jsdelivr" not in html and "<script src=" not in html  # JavaScript inlined: works offline
    assert "chance_error" in html and len(html) > 100_000


def test_save_rejects_unknown_suffix(run, tmp_path):
    with pytest.raises(ValueError, match=r"cannot save a chart as '.pdf'; use one of: .html, .png, .svg"):
        plots.save(plots.heatmap(run), tmp_path / "heat.pdf")
    with pytest.raises(ValueError, match=r"cannot save a chart as 'a file without suffix'"):
        plots.save(plots.heatmap(run), tmp_path / "heat")


@pytest.fixture
def restore_altair():
    renderer, offline = alt.renderers.active, alt.JupyterChart._is_offline
    yield
    alt.renderers.enable(renderer)
    alt.JupyterChart.enable_offline(offline=offline)


def test_enable_offline(restore_altair):
    plots.enable_offline(renderer=False)
    assert alt.JupyterChart._is_offline
    assert alt.renderers.active != "jupyter"
    plots.enable_offline()
    assert alt.renderers.active == "jupyter"
    assert alt.renderers.active != "mimetype"


def test_plots_does_not_import_torch():
    code = "import sys, probekit.plots; print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


# --------------------------------------------------------------------------
# Baselines (dashed) and repeats (bands)


def test_tidy_baselines_and_interval_frames(controlled):
    base = plots.tidy_baselines(controlled, measure="error", split="valid", epoch=-1)
    assert list(base.columns) == [*plots.TIDY_COLUMNS, "baseline"]
    assert len(base) == 6 * 2
    hit = base[(base.layer == "pool3") & (base.baseline == "random_init")].iloc[0]
    assert hit.value == pytest.approx(float(controlled["baselines"].sel(layer="pool3", baseline="random_init",
                                                                         metric="valid_error").isel(epoch=-1)))
    # A baseline has no selectivity of its own: those rows are left out, not drawn as NaN.
    assert plots.tidy_baselines(controlled, measure="selectivity").empty
    assert plots.tidy_baselines(make_run()).empty
    band = plots.tidy_interval(controlled, measure="error", split="valid")
    repeats = controlled["probe_repeat"].sel(metric="valid_error")
    assert len(band) == 6 * 4
    assert np.allclose(band.low, repeats.min("repeat").values.reshape(-1))
    assert np.allclose(band.high, repeats.max("repeat").values.reshape(-1))
    assert np.allclose(band.value, repeats.mean("repeat").values.reshape(-1))
    assert (band.low <= band.value).all() and (band.value <= band.high).all()
    assert plots.tidy_interval(make_run()).empty
    with pytest.raises(ValueError, match="baseline='shuffled' is not in this run; choose from: random_init, control"):
        plots.tidy_baselines(controlled, baselines="shuffled")


def test_interval_is_min_to_max_below_ten_repeats_and_central_95_percent_above():
    few = np.array([0.1, 0.5, 0.2, 0.3])
    assert [float(v) for v in plots.interval_bounds(few)] == [0.1, 0.5]
    many = np.linspace(0.0, 1.0, 41)
    low, high = plots.interval_bounds(many)
    assert (float(low), float(high)) == (pytest.approx(0.025), pytest.approx(0.975))
    low, high = plots.interval_bounds(np.full((2, 3), np.nan))
    assert np.isnan(low).all() and np.isnan(high).all()


def test_training_curves_draw_baselines_dashed_and_repeats_as_bands(controlled):
    spec = plots.training_curves(controlled).to_dict()
    (line, rows), = dashed(spec)
    assert line["encoding"]["color"]["field"] == "layer"
    assert line["encoding"]["strokeDash"]["scale"]["domain"] == ["random_init", "control"]
    assert line["encoding"]["strokeDash"]["legend"]["title"] == "baseline (dashed)"
    assert len(rows) == 6 * 4 * 2
    hit = row(rows, layer="logits", epoch=2, baseline="control")
    assert hit["value"] == pytest.approx(0.95)
    (area, band), = bands(spec)
    assert (area["encoding"]["y"]["field"], area["encoding"]["color"]["field"]) == ("low", "layer")
    assert all(r["low"] <= r["value"] <= r["high"] for r in band)
    plain = plots.training_curves(controlled, baselines=False, interval=False).to_dict()
    assert not dashed(plain) and not bands(plain)
    only = plots.training_curves(controlled, baselines="random_init").to_dict()
    assert {r["baseline"] for r in dashed(only)[0][1]} == {"random_init"}
    # Runs without them draw neither, and their specs keep their shape.
    assert plots.training_curves(make_run()).to_dict()["layer"].__len__() == 2


def test_depth_profile_draws_baselines_per_split_and_bands(controlled):
    spec = plots.depth_profile(controlled, splits=("train", "valid")).to_dict()
    (line, rows), = dashed(spec)
    assert line["encoding"]["color"]["field"] == "split"
    assert {(r["split"], r["baseline"]) for r in rows} == {
        (s, b) for s in ("train", "valid") for b in ("random_init", "control")}
    assert row(rows, layer="logits", split="valid", baseline="random_init")["value"] == pytest.approx(0.75)
    (area, band), = bands(spec)
    assert area["encoding"]["color"]["field"] == "split"
    assert len(band) == 6 * 2
    selectivity = plots.depth_profile(controlled, measure="selectivity").to_dict()
    assert not dashed(selectivity) and bands(selectivity)


def test_comparison_draws_each_runs_baselines_in_its_colour(controlled):
    spec = plots.comparison({"trained": controlled, "plain": make_run()}).to_dict()
    (line, rows), = dashed(spec)
    assert line["encoding"]["color"]["field"] == "run"
    assert {r["run"] for r in rows} == {"trained"}
    (area, band), = bands(spec)
    assert {r["run"] for r in band} == {"trained"}
    assert not dashed(plots.comparison([controlled, make_run()], baselines=False).to_dict())


def test_charts_with_baselines_and_repeats_render(controlled, tmp_path):
    chart = plots.depth_profile(controlled) | plots.training_curves(controlled) | plots.comparison([controlled, make_run()])
    path = plots.save(chart, tmp_path / "controls.svg")
    assert path.read_text().count("stroke-dasharray") >= 4


def _similarity(rows: int = 4, cols: int = 3):
    import xarray as xr

    values = np.linspace(0, 1, rows * cols).reshape(rows, cols)
    values[1, 2] = np.nan
    return xr.DataArray(
        values, dims=("layer_a", "layer_b"), name="cka",
        coords={"layer_a": [f"a{i}" for i in range(rows)], "layer_b": [f"b{j}" for j in range(cols)]},
        attrs={"estimator": "debiased", "n_examples": 300, "model_a": "ResNet", "model_b": "Inception"},
    )


def test_cka_heatmap_encodings_and_rows():
    spec = plots.cka_heatmap(_similarity()).to_dict()
    cells = [(u, r) for u, r in find(spec, "rect") if "color" in u["encoding"]]
    (cell, rows), = cells
    enc = cell["encoding"]
    assert (enc["y"]["field"], enc["y"]["sort"], enc["y"]["title"]) == ("layer_a", ["a0", "a1", "a2", "a3"], "ResNet layer")
    assert (enc["x"]["field"], enc["x"]["title"]) == ("layer_b", "Inception layer")
    assert enc["color"]["scale"]["domain"] == [0, 1]
    assert len(rows) == 12
    assert row(rows, layer_a="a3", layer_b="b2")["cka"] == pytest.approx(1.0)
    assert row(rows, layer_a="a1", layer_b="b2")["cka"] is None
    assert spec["title"]["subtitle"] == "debiased estimator, 300 examples"
    named = plots.cka_heatmap(_similarity(), names=("R", "I")).to_dict()
    assert named["title"]["text"] == "linear CKA: R vs I"


def test_cka_heatmap_rejects_what_is_not_a_similarity(run):
    with pytest.raises(TypeError, match=r"pk.cka's result.*got Dataset"):
        plots.cka_heatmap(run)
    with pytest.raises(TypeError, match=r"got dims \('x', 'y'\)"):
        plots.cka_heatmap(_similarity().rename(layer_a="x", layer_b="y"))
    with pytest.raises(ValueError, match="exceed 5000 cells; select fewer"):
        plots.cka_heatmap(_similarity(80, 70))
