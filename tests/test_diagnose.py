"""pk.diagnose and the ds.probekit accessor: each finding kind on synthetic runs, thresholds, and real runs."""

from __future__ import annotations

import subprocess
import sys

import altair as alt
import numpy as np
import pandas as pd
import pytest
import xarray as xr
from conftest import layer_names, make_run

import probekit.accessor  # noqa: F401 - registers ds.probekit
from probekit import plots
from probekit.diagnosis import FRAME_COLUMNS, KINDS, Finding, Findings, diagnose
from probekit.run.schema import check_run


def run_with(valid, *, train=None, model_loss=None, n_valid: int = 400, chance: float = 0.9, steps=None) -> xr.Dataset:
    """A run (docs/store.md) whose valid error is ``valid`` (layers x epochs).

    The train error is ``train`` (per layer, or layers x epochs), by default ``valid - 0.03``.
    """
    valid = np.asarray(valid, dtype=float)
    if valid.ndim == 1:
        valid = valid[:, None]
    n_layers, n_epochs = valid.shape
    ds = make_run(n_layers, n_epochs, splits=("train", "valid"), measures=("error",))
    if train is None:
        train = np.maximum(valid - 0.03, 0.0)
    else:
        train = np.broadcast_to(np.asarray(train, dtype=float).reshape(n_layers, -1), valid.shape)
    ds["probe"].loc[{"metric": "valid_error"}] = valid
    ds["probe"].loc[{"metric": "train_error"}] = train
    if model_loss is not None:
        ds["model_loss"].values[:] = model_loss
    if steps is not None:
        ds = ds.assign_coords(step=("epoch", np.asarray(steps, dtype=np.int64)))
    ds.attrs.update(n_valid=n_valid, chance_error=chance)
    return ds


def bypass_like(n_epochs: int = 3) -> xr.Dataset:
    """12 layers: a good input, a dead stretch (layers 3-7, flat over training) and layers after it that learn."""
    valid = np.empty((12, n_epochs))
    valid[:3] = [[0.03], [0.05], [0.06]]
    valid[3:8] = np.linspace(0.25, 0.45, 5)[:, None]
    valid[8:] = np.linspace(0.5, 0.05, n_epochs)[None, :]
    return run_with(valid)


def kinds(findings: Findings) -> list[str]:
    return [f.kind for f in findings]


# --------------------------------------------------------------------- dead segments
def test_dead_segment_covers_the_flat_stretch_and_nothing_else():
    ds = bypass_like()
    names = layer_names(12)
    findings = diagnose(ds)
    assert kinds(findings) == ["dead_segment"]
    dead = findings[0]
    assert dead.layers == tuple(names[3:8])
    assert (dead.first, dead.last) == (names[3], names[7])
    assert "0.250-0.450" in dead.evidence and "0.050" in dead.evidence  # the segment's errors, and what follows it
    assert "bypassed" in dead.suggestion


def test_dead_segment_needs_a_better_layer_after_it():
    valid = np.array([0.03, 0.05, 0.06, 0.3, 0.35, 0.4, 0.45, 0.5])
    findings = diagnose(run_with(np.repeat(valid[:, None], 3, axis=1)))
    assert "dead_segment" not in kinds(findings)
    assert kinds(findings) == ["non_monotonic"]
    assert findings[0].layers == tuple(layer_names(8)[3:])


def test_a_segment_that_improves_with_training_is_not_dead():
    ds = bypass_like()
    errors = ds["probe"].sel(metric="valid_error").values.copy()
    errors[3:8] = np.linspace(0.6, 0.2, 3)[None, :]  # learns, but still worse than what follows
    ds["probe"].loc[{"metric": "valid_error"}] = errors
    assert "dead_segment" not in kinds(diagnose(ds))


def test_one_bad_layer_is_not_a_segment_unless_min_layers_allows_it():
    valid = np.array([0.03, 0.05, 0.4, 0.06, 0.05, 0.05])
    ds = run_with(np.repeat(valid[:, None], 2, axis=1))
    assert "dead_segment" not in kinds(diagnose(ds))
    assert kinds(diagnose(ds)) == ["non_monotonic"]
    single = diagnose(ds, min_layers=1)
    assert [(f.kind, f.layers) for f in single] == [("dead_segment", (layer_names(6)[2],))]


def test_the_input_is_never_part_of_a_dead_segment():
    valid = np.array([0.89, 0.9, 0.9, 0.1, 0.05])  # a pooled input at chance, then the same
    findings = diagnose(run_with(np.repeat(valid[:, None], 2, axis=1)))
    dead = findings.of("dead_segment")
    assert len(dead) == 1 and dead[0].layers == tuple(layer_names(5)[1:3])
    assert [f.layers for f in findings.of("chance_level")] == [(layer_names(5)[0],)]


def test_a_segment_near_chance_is_dead_even_if_better_than_what_came_before():
    valid = np.array([0.97, 0.88, 0.87, 0.88, 0.1, 0.08])  # worse than chance at the input, then at chance
    findings = diagnose(run_with(np.repeat(valid[:, None], 2, axis=1)))
    assert [f.layers for f in findings.of("dead_segment")] == [tuple(layer_names(6)[1:4])]


def test_a_single_snapshot_cannot_show_training_so_only_depth_counts():
    ds = bypass_like(n_epochs=3).isel(epoch=[-1])
    assert [f.layers for f in diagnose(ds).of("dead_segment")] == [tuple(layer_names(12)[3:8])]


# --------------------------------------------------------------------- non-monotonic steps and noise
def test_non_monotonic_step_beyond_noise_depends_on_the_split_size():
    valid = np.array([0.30, 0.20, 0.12, 0.16, 0.10, 0.05])  # a +0.04 step at layer 3
    small = diagnose(run_with(valid, n_valid=400))  # binomial noise on 400 examples hides it
    assert "non_monotonic" not in kinds(small)
    large = diagnose(run_with(valid, n_valid=20_000))
    assert [(f.kind, f.layers) for f in large] == [("non_monotonic", (layer_names(6)[3],))]
    assert "+0.040" in large[0].evidence and "0.120" in large[0].evidence
    assert kinds(diagnose(run_with(valid, n_valid=400), n_examples=20_000)) == ["non_monotonic"]
    assert kinds(diagnose(run_with(valid, n_valid=400), z=1.0)) == ["non_monotonic"]
    assert kinds(diagnose(run_with(valid, n_valid=20_000), min_delta=0.05)) == []


def test_consecutive_worse_layers_are_one_finding_naming_the_worst():
    valid = np.array([0.05, 0.3, 0.5, 0.7, 0.6])
    findings = diagnose(run_with(valid, steps=[0]))
    step = findings.of("non_monotonic")
    assert len(step) == 1 and step[0].layers == tuple(layer_names(5)[1:])
    assert "worst 0.700" in step[0].evidence
    assert "before training" in step[0].suggestion  # step 0: an untrained model


def test_a_reduction_that_discards_features_is_named_in_the_suggestion():
    valid = np.array([0.05, 0.04, 0.3, 0.02])
    ds = run_with(valid, n_valid=2000)
    ds = ds.assign_coords(reduction=("layer", np.array(["flatten", "flatten", "pool", "flatten"], dtype=object)))
    (step,) = diagnose(ds).of("non_monotonic")
    assert "pool" in step.suggestion and "reduction" in step.suggestion


# --------------------------------------------------------------------- chance, overfitting, stalls, nonfinite
def test_chance_level_layers_are_grouped_and_compared_with_the_majority_class():
    valid = np.array([0.05, 0.03, 0.88, 0.895, 0.89])
    findings = diagnose(run_with(valid, chance=0.9))
    chance = findings.of("chance_level")
    assert [f.layers for f in chance] == [tuple(layer_names(5)[2:])]
    assert "0.900" in chance[0].evidence
    assert kinds(diagnose(run_with(valid, chance=0.95))).count("chance_level") == 0


def test_probe_overfitting_flags_a_wide_gap_and_suggests_a_reduction():
    valid = np.array([0.10, 0.08, 0.25, 0.06])
    train = np.array([0.05, 0.06, 0.0, 0.04])
    findings = diagnose(run_with(valid, train=train, n_valid=2000))
    over = findings.of("probe_overfitting")
    assert [f.layers for f in over] == [(layer_names(4)[2],)]
    assert "train error 0.000" in over[0].evidence and "features" in over[0].evidence
    assert "reduce=" in over[0].suggestion and "l2" in over[0].suggestion
    assert not diagnose(run_with(valid, train=train, n_valid=2000), overfit_gap=0.3).of("probe_overfitting")
    assert not diagnose(run_with(valid, train=train, n_valid=2000), split="train").of("probe_overfitting")


def test_a_poor_layer_with_a_gap_is_not_overfitting_unless_the_ratio_allows_it():
    valid = np.array([0.10, 0.70, 0.72, 0.05])
    train = np.array([0.05, 0.55, 0.58, 0.03])  # 0.15 below, but not far below: the layer is poor, not too wide
    ds = run_with(valid, train=train, n_valid=2000)
    assert not diagnose(ds).of("probe_overfitting")
    assert [f.layers for f in diagnose(ds, overfit_ratio=0.9).of("probe_overfitting")] == [tuple(layer_names(4)[1:3])]


def test_a_criterion_hovering_at_its_threshold_gives_one_finding():
    valid = np.array([0.05, 0.30, 0.30, 0.30, 0.30, 0.30, 0.05])
    train = np.array([0.02, 0.05, 0.05, 0.25, 0.05, 0.05, 0.02])  # layer 3 alone is not overfitting
    findings = diagnose(run_with(valid, train=train, n_valid=2000), min_layers=10)
    assert [f.layers for f in findings.of("probe_overfitting")] == [tuple(layer_names(7)[1:6])]


def test_stalled_layer_flat_while_the_model_loss_falls():
    valid = np.array([
        [0.10, 0.10, 0.10, 0.10, 0.10],   # input
        [0.40, 0.30, 0.30, 0.30, 0.30],   # stops improving after epoch 1
        [0.40, 0.30, 0.20, 0.12, 0.05],   # keeps improving
    ])
    loss = [np.nan, 2.0, 1.5, 1.0, 0.5]
    findings = diagnose(run_with(valid, model_loss=loss))
    stalled = findings.of("stalled")
    assert [f.layers for f in stalled] == [(layer_names(3)[1],)]
    assert "2.000 to 0.500" in stalled[0].evidence
    assert not diagnose(run_with(valid, model_loss=[np.nan, 1.0, 1.0, 1.0, 0.99])).of("stalled")
    assert not diagnose(run_with(valid, model_loss=loss), stall_epochs=4, loss_drop=0.9).of("stalled")
    assert not diagnose(run_with(valid)).of("stalled")  # no model losses recorded


def test_nonfinite_layers_are_reported_and_skipped_by_the_other_criteria():
    ds = make_run(6, 3, nan_layers=["relu2", "pool3"])
    findings = diagnose(ds)
    bad = findings.of("nonfinite")
    assert [f.layers for f in bad] == [("relu2", "pool3")]
    assert all("relu2" not in f.layers for f in findings if f.kind != "nonfinite")


def test_a_healthy_profile_has_no_findings():
    valid = np.array([[0.30, 0.30], [0.25, 0.15], [0.22, 0.10], [0.20, 0.06], [0.20, 0.04]])
    findings = diagnose(run_with(valid, train=valid * 0.8))
    assert len(findings) == 0
    assert str(findings).startswith("no findings on valid error at epoch 1")


def test_epoch_selects_the_snapshot_diagnosed():
    ds = bypass_like(n_epochs=3)
    first = diagnose(ds, epoch=0)  # before training, the layers after the stretch are worse still
    assert first.epoch == 0 and kinds(first) == ["non_monotonic"]
    assert diagnose(ds, epoch=-2).epoch == 1
    with pytest.raises(ValueError, match="epoch=7 is not in this run; choose from: 0, 1, 2"):
        diagnose(ds, epoch=7)


# --------------------------------------------------------------------- the Findings table
def test_findings_table_frame_text_and_html():
    findings = diagnose(bypass_like())
    frame = findings.to_frame()
    assert tuple(frame.columns) == FRAME_COLUMNS
    row = frame.iloc[0]
    assert row["kind"] == "dead_segment" and isinstance(row["layers"], list) and row["first"] == row["layers"][0]
    assert len(findings) == 1 and list(findings) == [findings[0]] and isinstance(findings[:1], Findings)
    text = str(findings)
    assert text.splitlines()[0] == "1 finding on valid error at epoch 2 (step 200) of toynet"
    assert "evidence:" in text and "suggestion:" in text
    html = findings._repr_html_()
    assert "<table" in html and "dead_segment" in html and "(5 layers)" in html
    assert "dead_segment@" in repr(findings)
    assert set(findings.settings) >= {"z", "min_delta", "min_layers", "overfit_gap", "stall_epochs", "loss_drop"}


def test_empty_findings_frame_keeps_its_columns_and_draws():
    findings = diagnose(run_with(np.array([0.3, 0.2, 0.1])))
    frame = findings.to_frame()
    assert frame.empty and tuple(frame.columns) == FRAME_COLUMNS
    assert isinstance(plots.diagnosis_overlay(run_with(np.array([0.3, 0.2, 0.1])), frame), alt.LayerChart)


def test_findings_draw_on_the_overlay():
    ds = bypass_like()
    chart = plots.diagnosis_overlay(ds, diagnose(ds).to_frame())
    spec = chart.to_dict()
    assert spec["title"]["subtitle"] == "1 findings"


def test_finding_kinds_are_documented_and_filterable():
    assert KINDS[0] == "dead_segment"
    findings = diagnose(bypass_like())
    assert len(findings.of("stalled")) == 0
    with pytest.raises(ValueError, match="kind='dead' is not a finding kind; choose from: dead_segment"):
        findings.of("dead")
    assert Finding("stalled", ("a",), "e", "s").span() == "a"


# --------------------------------------------------------------------- random-init baseline and repeats
def with_controls(ds: xr.Dataset, *, random_init=None, repeat_sd=None, repeats: int = 5) -> xr.Dataset:
    """``ds`` with a random-init baseline whose errors are ``random_init`` (layers x epochs, or per layer),
    and/or repeats spread around ``probe`` with standard deviation ``repeat_sd`` (per layer, or one value)."""
    n_layers, n_epochs, n_metrics = ds.sizes["layer"], ds.sizes["epoch"], ds.sizes["metric"]
    if random_init is not None:
        base = np.repeat(ds["probe"].values[:, :, None, :], 1, axis=2).copy()
        values = np.broadcast_to(np.asarray(random_init, dtype=float).reshape(n_layers, -1), (n_layers, n_epochs))
        base[:, :, 0, list(ds["metric"].values).index("valid_error")] = values
        ds = ds.assign(baselines=(("layer", "epoch", "baseline", "metric"), base)).assign_coords(baseline=["random_init"])
    if repeat_sd is not None:
        unit = np.random.default_rng(0).normal(size=(n_layers, n_epochs, repeats, n_metrics))
        unit = (unit - unit.mean(2, keepdims=True)) / unit.std(2, ddof=1, keepdims=True)
        sd = np.broadcast_to(np.asarray(repeat_sd, dtype=float).reshape(-1), (n_layers,))[:, None, None, None]
        ds = ds.assign(probe_repeat=(("layer", "epoch", "repeat", "metric"), ds["probe"].values[:, :, None, :] + sd * unit))
        ds = ds.assign_coords(repeat=np.arange(repeats))
    check_run(ds)
    return ds


def test_layers_no_better_than_random_init_are_one_finding_and_the_input_none():
    valid = np.array([0.60, 0.50, 0.40, 0.30, 0.20, 0.10])
    # conv1 ... pool3 match their random-init copy; the last two layers beat it clearly.
    ds = with_controls(run_with(valid, n_valid=2000, steps=[500]), random_init=[0.60, 0.50, 0.41, 0.29, 0.45, 0.50])
    findings = diagnose(ds)
    assert [(f.kind, f.layers) for f in findings] == [("no_better_than_random_init", tuple(layer_names(6)[1:4]))]
    evidence = findings[0].evidence
    assert "against 0.290-0.500 for the same probes on a random-init copy" in evidence and "within noise" in evidence
    assert "receive gradient" in findings[0].suggestion
    assert findings.of("no_better_than_random_init")[0].first == "conv1"


def test_random_init_gain_beyond_noise_is_no_finding_and_untrained_runs_are_skipped():
    valid = np.array([0.60, 0.50, 0.40, 0.30, 0.20, 0.10])
    assert len(diagnose(with_controls(run_with(valid, n_valid=2000, steps=[500]), random_init=valid + 0.2))) == 0
    # At step 0 the model is a random initialisation itself: equal errors say nothing.
    untrained = with_controls(run_with(valid, n_valid=2000, steps=[0]), random_init=valid)
    assert "no_better_than_random_init" not in kinds(diagnose(untrained))
    assert kinds(diagnose(with_controls(run_with(valid, n_valid=2000, steps=[500]), random_init=valid))) == [
        "no_better_than_random_init"]


def test_the_noise_model_uses_the_repeats_spread_where_it_exceeds_the_binomial_error():
    valid = np.array([0.30, 0.20, 0.12, 0.16, 0.10, 0.05])  # a +0.04 step at layer 3
    plain = run_with(valid, n_valid=20_000)
    assert kinds(diagnose(plain)) == ["non_monotonic"]
    # Repeats that scatter by 0.03 make a 0.04 step noise; a tiny spread leaves the binomial error in charge.
    noisy = diagnose(with_controls(plain, repeat_sd=0.03))
    assert kinds(noisy) == [] and noisy.settings["noise"] == "binomial and repeats"
    tight = diagnose(with_controls(plain, repeat_sd=1e-4))
    assert kinds(tight) == ["non_monotonic"] and tight[0].evidence == diagnose(plain)[0].evidence
    # Only the layers that scatter widen their noise.
    one_layer = diagnose(with_controls(plain, repeat_sd=[0, 0, 0.03, 0, 0, 0]))
    assert kinds(one_layer) == []
    assert diagnose(plain).settings["noise"] == "binomial"


def test_a_train_valid_gap_is_a_finding_only_when_the_probes_l2_was_fixed():
    valid = np.array([0.30, 0.25, 0.20, 0.18, 0.15, 0.12])
    ds = run_with(valid, train=np.zeros(6), n_valid=2000)
    fixed = diagnose(ds).of("probe_overfitting")[0].suggestion
    assert "raise the probes' l2 (now 0.0001)" in fixed and "l2='auto'" in fixed
    # Chosen on held-out data, the gap is what the best-regularised probe leaves: not a knob to fix.
    assert len(diagnose(ds.assign_attrs(l2="auto")).of("probe_overfitting")) == 0
    # Where the choice fell back to a fixed value, the gap is again the fixed value's.
    fell_back = ds.assign_attrs(l2="auto", l2_fallback="class 3 has 4 training examples; fitted with l2=0.001")
    assert diagnose(fell_back).of("probe_overfitting")


def test_random_init_and_repeats_from_make_run_are_read():
    ds = make_run(baselines=("random_init", "control"), repeats=4, repeat_sd=0.001)
    ds.attrs["n_valid"] = 100_000
    findings = diagnose(ds)
    # make_run's random-init errors equal the task's at the input only, which is never flagged.
    assert "no_better_than_random_init" not in kinds(findings)
    assert findings.settings["noise"] == "binomial and repeats"


# --------------------------------------------------------------------- errors
def test_not_a_run_is_refused_in_one_line():
    with pytest.raises(TypeError, match="expected a probekit run .* got dict"):
        diagnose({"probe": 1})
    with pytest.raises(ValueError, match="not a probekit run: it lacks nonfinite") as info:
        diagnose(make_run().drop_vars("nonfinite"))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="schema version 3"):
        check_run(make_run().assign_attrs(probekit_schema=3))
    with pytest.raises(ValueError, match="dims"):
        check_run(make_run().transpose("epoch", "layer", "metric"))


def test_bad_split_size_and_thresholds_say_what_to_do():
    ds = make_run(splits=("train", "valid"))
    with pytest.raises(ValueError, match="this run has no test error; choose split= from: train, valid"):
        diagnose(ds, split="test")
    with pytest.raises(ValueError, match="split must be one of 'train', 'valid', 'test'; got 'val'"):
        diagnose(ds, split="val")
    ds.attrs["n_valid"] = -1
    with pytest.raises(ValueError, match="pass n_examples="):
        diagnose(ds)
    assert isinstance(diagnose(ds, n_examples=400), Findings)
    with pytest.raises(ValueError, match="z must be a finite number >= 0; got -1"):
        diagnose(make_run(), z=-1)
    with pytest.raises(ValueError, match="min_layers must be an integer >= 1; got 0"):
        diagnose(make_run(), min_layers=0)
    with pytest.raises(ValueError, match="n_examples must be an integer >= 1 or None; got 0"):
        diagnose(make_run(), n_examples=0)


# --------------------------------------------------------------------- the accessor
def test_accessor_errors_series_in_forward_order():
    ds = make_run(5, 3)
    series = ds.probekit.errors()
    assert isinstance(series, pd.Series) and series.name == "valid_error"
    assert list(series.index) == layer_names(5) and series.index.name == "layer"
    np.testing.assert_allclose(series.values, ds["probe"].sel(metric="valid_error").isel(epoch=-1).values)
    first_test = ds.probekit.errors("test", epoch=0)
    assert first_test.name == "test_error"
    np.testing.assert_allclose(first_test.values, ds["probe"].sel(metric="test_error").isel(epoch=0).values)
    with pytest.raises(ValueError, match="split='val' has no error in this run; choose from: train, valid, test"):
        ds.probekit.errors("val")


def test_accessor_wraps_diagnose_and_the_charts():
    ds = bypass_like()
    assert [f.kind for f in ds.probekit.diagnose()] == ["dead_segment"]
    assert ds.probekit.diagnose(min_layers=10).to_frame()["kind"].tolist() == ["non_monotonic"]
    assert isinstance(ds.probekit.depth_profile(epoch=0), alt.LayerChart)
    assert isinstance(ds.probekit.heatmap(), alt.LayerChart)
    assert isinstance(ds.probekit.training_curves(x="step"), alt.LayerChart)
    overlay = ds.probekit.diagnosis_overlay().to_dict()
    assert overlay["title"]["subtitle"] == "1 findings"
    controlled = make_run(baselines=("random_init",), repeats=3)
    for chart in (controlled.probekit.depth_profile(), controlled.probekit.training_curves()):
        dashes = [u for u in chart.to_dict()["layer"] if "strokeDash" in u.get("encoding", {})]
        assert len(dashes) == 1
    plain = controlled.probekit.training_curves(baselines=False, interval=False).to_dict()
    assert len(plain["layer"]) == 2


def test_accessor_refuses_a_dataset_that_is_not_a_run_when_a_method_is_called():
    plain = xr.Dataset({"a": ("x", [0, 1, 2])})
    assert hasattr(plain, "probekit")  # completion, dir() and attribute probes work on every dataset
    assert "probekit" in dir(plain)
    with pytest.raises(ValueError, match="not a probekit run: it lacks probe") as info:
        plain.probekit.errors()
    assert "\n" not in str(info.value)
    for method in ("diagnose", "depth_profile", "heatmap", "training_curves", "diagnosis_overlay"):
        with pytest.raises(ValueError, match="not a probekit run: it lacks probe"):
            getattr(plain.probekit, method)()


def test_diagnose_and_accessor_do_not_import_torch():
    code = "import sys, probekit.diagnosis, probekit.accessor; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# --------------------------------------------------------------------- real runs
@pytest.mark.slow
def test_healthy_residual_mlp_has_no_dead_segment(digits_tensors):
    import torch

    from probekit import zoo
    from probekit.engine.training import train_and_probe

    torch.manual_seed(0)
    model = zoo.residual_mlp(depth=8)
    ds = train_and_probe(model, digits_tensors, epochs=3, lr=0.01, momentum=0.9, device="cpu", quiet=True)
    findings = diagnose(ds)
    assert not findings.of("dead_segment"), str(findings)
    errors = ds.probekit.errors()
    assert errors["output"] < 0.1
