"""Several runs aligned by relative depth: one selection for all, from widgets or code."""

from __future__ import annotations

import pytest
from conftest import layer_names, make_run
from vega_specs import encoding, rows, spec

from probekit.explorers import compare
from probekit.run.schema import layout_of, rows_of
from probekit.run.store import RunWriter


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
    cmp.controls.rule.value = "merges"
    assert cmp.state.rule == "merges" and cmp.selected_layers["deep"] == layer_names(9)[4:]
    assert dict(cmp.controls.rule.options)["merge points only"] == "merges"
    cmp.controls.rule.value = "all"
    cmp.controls.depth.value = (0.0, 1.0)
    cmp.controls.epoch.widget.value = 1
    assert cmp.epochs_shown == {"deep": 1, "shallow": 0}
    assert {(r["run"], r["epoch"]) for r in rows(spec(cmp, "comparison"), "line")} == {("deep", 1), ("shallow", 0)}
    cmp.controls.measure.value = "loss"
    assert encoding(spec(cmp, "comparison"), "line", "y")["title"] == "valid loss (nats)"
    assert ">shallow</td>" in cmp._table.value


def test_compare_epoch_is_a_number_or_counts_from_the_end_of_the_runs_epochs(two_runs):
    cmp = compare(two_runs, epoch=-2)  # the runs' epochs together are 0..3: -2 is epoch 2
    assert cmp.epoch == 2 and cmp.epochs_shown == {"deep": 2, "shallow": 0}
    assert cmp.select(epoch=1).epochs_shown == {"deep": 1, "shallow": 0}
    assert cmp.select(epoch=-1).epochs_shown == {"deep": 3, "shallow": 0}
    with pytest.raises(ValueError, match=r"epoch=7 is not in this run; choose from: 0, 1, 2, 3 \(or -1 for the last\)"):
        cmp.select(epoch=7)


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
    with pytest.raises(ValueError, match="layers must be one of 'all', 'merges' or None; got 'conv1'"):
        cmp.select(layers="conv1")
    with pytest.raises(ValueError, match=r"depth_range must be a pair \(low, high\) with 0 <= low <= high <= 1"):
        cmp.select(depth_range=(0.8, 0.2))
    with pytest.raises(ValueError, match="split='dev' is not in this run; choose from: train, valid, test"):
        cmp.select(split="dev")


def test_compare_baselines_menu_and_dashed_lines(two_runs):
    runs = {**two_runs, "controlled": make_run(n_layers=6, n_epochs=4, baselines=("random_init",), model="c")}
    cmp = compare(runs)
    assert cmp.controls.baselines.options == ("random_init",) and cmp.controls.baselines.layout.display is None
    dashed = [u for u in spec(cmp, "comparison")["layer"] if u["encoding"].get("strokeDash", {}).get("field") == "baseline"]
    assert len(dashed) == 1
    cmp.controls.baselines.value = ()
    assert cmp.state.baselines_shown == ()
    assert not [u for u in spec(cmp, "comparison")["layer"] if "strokeDash" in u.get("encoding", {})]
    with pytest.raises(ValueError, match="baseline='control' is not in this run; choose from: random_init"):
        cmp.select(baselines="control")
    plain = compare(two_runs)
    assert plain.controls.baselines.layout.display == "none"


def test_compare_shows_a_cka_heatmap_beside_the_runs(two_runs):
    import numpy as np
    import xarray as xr

    sim = xr.DataArray(np.eye(3), dims=("layer_a", "layer_b"), name="cka",
                       coords={"layer_a": ["a", "b", "c"], "layer_b": ["x", "y", "z"]},
                       attrs={"estimator": "debiased", "n_examples": 50, "model_a": "deep", "model_b": "shallow"})
    cmp = compare(two_runs, cka=sim)
    assert set(cmp.charts) == {"comparison", "cka"}
    heat = spec(cmp, "cka")
    assert {(r["layer_a"], r["layer_b"]) for r in rows(heat, "rect") if r["cka"] == 1.0} == {("a", "x"), ("b", "y"), ("c", "z")}
    assert "cka" not in compare(two_runs).charts
    with pytest.raises(TypeError, match="cka_heatmap takes pk.cka's result"):
        compare(two_runs, cka=two_runs["deep"])
