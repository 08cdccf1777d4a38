"""The run schema: validation, epoch positions, forward order, metric names, and the layout/rows round trip."""

from __future__ import annotations

import numpy as np
import pytest

from probekit.run.schema import (
    MEASURES, SCHEMA_VERSION, SPLIT_MEASURES, SPLITS, EpochRow, RunLayout, build_dataset, check_run, epoch_position,
    forward_order, layout_of, metric_name, metric_names, row_values, rows_of, with_added_variables,
)
from tests.conftest import make_run


def _layout() -> RunLayout:
    return RunLayout(
        layers=["input", "conv", "fc"], depth=[0, 3, 1], relative_depth=[0.0, 1.0, 1 / 3], op=["input", "Conv2d", "Linear"],
        shape=["1x8x8", "4x8x8", "10"], feature_dim=[64, 256, 10], reduction=["flatten", "pool", "flatten"],
        metrics=metric_names(["train", "valid"], 3), attrs={"model": "toy", "seed": 1, "num_classes": 3},
    )


def _row(epoch: int, n_layers: int = 3, n_metrics: int = 4) -> EpochRow:
    return EpochRow(
        epoch=epoch, step=10 * epoch, probe=epoch + np.arange(n_layers * n_metrics).reshape(n_layers, n_metrics) / 100,
        nonfinite=np.array([False, epoch == 1, False]), iterations=np.array([5, 6, 7]) + epoch,
        converged=np.array([True, True, epoch != 2]), model_loss=0.5 * epoch, model_error=0.1 * epoch, wall_time=2.0 * epoch,
        model_valid_loss=0.25 * epoch,
    )


# --------------------------------------------------------------------- metric names
def test_metric_names_follow_split_order_and_drop_top5_for_five_classes_or_fewer():
    assert metric_name("valid", "error") == "valid_error"
    assert metric_names(["valid", "train"], 10) == [metric_name(s, m) for s in ("train", "valid") for m in SPLIT_MEASURES]
    assert metric_names(["test", "train"], 5) == ["train_error", "train_loss", "test_error", "test_loss"]
    assert metric_names(["train", "unknown"], 10) == ["train_error", "train_loss", "train_top5"]
    assert SPLITS == ("train", "valid", "test") and SPLIT_MEASURES == ("error", "loss", "top5")
    assert set(SPLIT_MEASURES) < set(MEASURES)


def test_control_adds_selectivity_on_every_split_and_mdl_only_on_train():
    assert metric_names(["train", "valid"], 3, control=True, mdl=True) == [
        "train_error", "train_loss", "train_selectivity", "train_mdl", "train_compression",
        "valid_error", "valid_loss", "valid_selectivity",
    ]
    assert metric_names(["valid"], 3, mdl=True) == ["valid_error", "valid_loss"]


# --------------------------------------------------------------------- build / layout / rows
def test_build_dataset_layout_of_and_rows_of_round_trip():
    layout = _layout()
    rows = [_row(e) for e in range(3)]
    ds = build_dataset(layout, rows)
    check_run(ds)
    assert ds["probe"].dims == ("layer", "epoch", "metric") and ds.sizes == {"layer": 3, "epoch": 3, "metric": 4}
    assert ds.attrs == {"probekit_schema": SCHEMA_VERSION, **layout.attrs}
    assert ds["split"].values.tolist() == ["train", "train", "valid", "valid"]
    assert ds["measure"].values.tolist() == ["error", "loss", "error", "loss"]
    assert layout_of(ds) == layout
    for got, want in zip(rows_of(ds), rows, strict=True):
        assert (got.epoch, got.step, got.model_loss, got.model_valid_loss, got.model_error, got.wall_time) == \
               (want.epoch, want.step, want.model_loss, want.model_valid_loss, want.model_error, want.wall_time)
        for name in ("probe", "nonfinite", "iterations", "converged"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))
    assert rows_of(build_dataset(layout, [])) == []


def test_a_run_made_before_model_valid_loss_existed_is_still_a_run_and_reads_it_as_nan():
    ds = build_dataset(_layout(), [_row(e) for e in range(3)])
    assert ds["model_valid_loss"].dims == ("epoch",) and ds["model_valid_loss"].values.tolist() == [0.0, 0.25, 0.5]
    old = ds.drop_vars("model_valid_loss")
    check_run(old)
    assert [np.isnan(row.model_valid_loss) for row in rows_of(old)] == [True] * 3
    filled = with_added_variables(old)
    assert filled["model_valid_loss"].dims == ("epoch",) and np.isnan(filled["model_valid_loss"].values).all()
    assert with_added_variables(ds) is ds


def test_baselines_and_repeats_round_trip_on_their_own_dims():
    base = _layout()
    layout = RunLayout(**{**base.__dict__, "baselines": ("random_init", "control"), "repeats": 3, "layouts": None})
    assert layout.layouts == ["map", "map", "vector"]  # inferred from the shapes
    rows = []
    for epoch in range(2):
        row = _row(epoch)
        row.l2 = np.array([1e-3, 1e-1, np.nan])
        row.reduction_used = ["flatten", "pool2" if epoch else "pool", "flatten"]
        row.baseline = np.arange(3 * 2 * 4, dtype=float).reshape(3, 2, 4) + epoch
        row.repeat = np.arange(3 * 3 * 4, dtype=float).reshape(3, 3, 4) - epoch
        rows.append(row)
    ds = build_dataset(layout, rows)
    check_run(ds)
    assert ds["baselines"].dims == ("layer", "epoch", "baseline", "metric")
    assert ds["probe_repeat"].dims == ("layer", "epoch", "repeat", "metric")
    assert ds["baselines"].baseline.values.tolist() == ["random_init", "control"] and ds.sizes["repeat"] == 3
    assert ds["l2"].sel(layer="conv").values.tolist() == [1e-1, 1e-1]
    assert ds["reduction_used"].sel(layer="conv").values.tolist() == ["pool", "pool2"]
    assert layout_of(ds) == layout
    for got, want in zip(rows_of(ds), rows, strict=True):
        assert got.reduction_used == want.reduction_used
        for name in ("l2", "baseline", "repeat"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name))


def test_a_row_without_what_the_run_needs_is_refused_in_one_line():
    layout = RunLayout(**{**_layout().__dict__, "baselines": ("control",)})
    with pytest.raises(ValueError, match=r"epoch 0's row has none for 'baselines'; this run needs shape \(3, 1, 4\)"):
        row_values(_row(0), layout)
    with pytest.raises(ValueError, match="unknown baselines \\['shuffled'\\]; choose from random_init, control"):
        RunLayout(**{**_layout().__dict__, "baselines": ("shuffled",)})
    with pytest.raises(ValueError, match="repeats=0 is below 1"):
        RunLayout(**{**_layout().__dict__, "repeats": 0})
    with pytest.raises(ValueError, match="unknown layouts \\['image'\\]"):
        RunLayout(**{**_layout().__dict__, "layouts": ["image", "map", "vector"]})


def test_capacity_preallocates_empty_epochs_after_the_rows():
    ds = build_dataset(_layout(), [_row(0)], capacity=4)
    assert ds.sizes["epoch"] == 4
    assert ds["epoch"].values.tolist() == [0, -1, -1, -1] and ds["step"].values.tolist() == [0, -1, -1, -1]
    assert np.isnan(ds["probe"].values[:, 1:]).all() and not ds["converged"].values[:, 1:].any()


# --------------------------------------------------------------------- validation
def test_check_run_accepts_a_run_and_names_what_is_wrong(run):
    check_run(run)
    with pytest.raises(TypeError, match=r"expected a probekit run \(an xarray.Dataset, see docs/store.md\); got dict"):
        check_run({"probe": 1})
    with pytest.raises(ValueError, match=r"is not a probekit run: it lacks nonfinite, wall_time, depth; open runs"):
        check_run(run.drop_vars(["nonfinite", "wall_time", "depth"]))
    with pytest.raises(ValueError, match=r"has dims \('epoch', 'layer', 'metric'\), not \('layer', 'epoch', 'metric'\)"):
        check_run(run.transpose("epoch", "layer", "metric"))
    no_version = run.copy()
    del no_version.attrs["probekit_schema"]
    with pytest.raises(ValueError, match=r"has no 'probekit_schema' attribute; this probekit reads schema version 2"):
        check_run(no_version)
    with pytest.raises(ValueError, match=r"has schema version 3; this probekit reads schema version 2"):
        check_run(run.assign_attrs(probekit_schema=3))


# --------------------------------------------------------------------- epoch positions
def test_epoch_position_reads_epoch_numbers_and_negative_positions():
    ds = make_run(n_epochs=4).assign_coords(epoch=[0, 5, 10, 15])
    assert [epoch_position(ds, e) for e in (0, 5, 15, -1, -2, -4)] == [0, 1, 3, 3, 2, 0]
    with pytest.raises(ValueError, match=r"epoch=3 is not in this run; choose from: 0, 5, 10, 15 \(or -1 for the last\)"):
        epoch_position(ds, 3)
    with pytest.raises(ValueError, match=r"epoch=-5 reaches before the first epoch; this run has 4 epochs"):
        epoch_position(ds, -5)
    for bad in (1.0, True, "1"):
        with pytest.raises(TypeError, match=r"epoch must be an int \(an epoch number, or -1 for the last\); got"):
            epoch_position(ds, bad)
    with pytest.raises(ValueError, match="this run has no completed epochs yet"):
        epoch_position(make_run(n_epochs=0), -1)


# --------------------------------------------------------------------- forward order
def test_forward_order_sorts_by_depth_and_keeps_ties_in_axis_order():
    ds = build_dataset(_layout(), [_row(0)])
    assert ds["layer"].values[forward_order(ds)].tolist() == ["input", "fc", "conv"]
    assert ds["layer"].values[forward_order(ds, ["conv", "input"])].tolist() == ["input", "conv"]
    tied = ds.assign_coords(depth=("layer", [2, 1, 1]))
    assert tied["layer"].values[forward_order(tied)].tolist() == ["conv", "fc", "input"]
    assert forward_order(ds, []).tolist() == []
