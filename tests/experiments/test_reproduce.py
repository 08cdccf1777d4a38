"""probekit.experiments: each reproduction's qualitative finding at quick size, and the committed stores."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

import probekit.accessor  # noqa: F401 - registers ds.probekit
from probekit import experiments
from probekit.experiments.bypass import BYPASS_QUICK_STEPS, BYPASS_STEPS
from probekit.diagnosis import check_run, diagnose
from probekit.run.store import open_run

RUNS = Path(__file__).resolve().parents[2] / "data" / "runs"
#: The stores committed under data/runs, by the reproduction that wrote them.
COMMITTED = {
    "mnist-convnet": ["mnist-convnet.zarr"],
    "bypass": ["bypass.zarr"],
    "resnet-vs-inception": ["resnet50.zarr", "inception_v3.zarr"],
    "random-init": ["random-init.zarr"],
}
BYPASSED = [f"layers.{i}" for i in range(1, 64)]  # bypass_mlp's skip=(0, 64) goes around layers 1 to 63


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """Runs a reproduction at quick size once per module; returns its Reproduction."""
    done = {}

    def run(name: str) -> experiments.Reproduction:
        if name not in done:
            done[name] = experiments.reproduce(name, out=tmp_path_factory.mktemp(name), quick=True, quiet=True, device="cpu")
        return done[name]

    return run


def assert_dead_segment_in_bypassed_half(ds) -> None:
    """The bypass finding: a dead segment inside the bypassed layers covering most of their deeper half; nothing outside."""
    findings = diagnose(ds)
    dead = findings.of("dead_segment")
    assert dead, str(findings)
    covered = {layer for finding in dead for layer in finding.layers}
    assert covered <= set(BYPASSED), str(findings)
    deeper = [str(layer) for layer in ds["layer"].values if str(layer) in BYPASSED[len(BYPASSED) // 2:]]
    assert sum(layer in covered for layer in deeper) / len(deeper) > 0.5, str(findings)
    outside = [(f.kind, layer) for f in findings for layer in f.layers if layer not in BYPASSED]
    assert outside == [], str(findings)


# --------------------------------------------------------------------- quick reproductions
@pytest.mark.slow
def test_bypass_shows_a_dead_segment_in_the_bypassed_half(quick):
    result = quick("bypass")
    ds = open_run(result.stores["bypass"])
    check_run(ds)
    assert ds["step"].values.tolist() == list(BYPASS_QUICK_STEPS)
    assert_dead_segment_in_bypassed_half(ds)
    assert result.numbers["dead_inside_bypassed"] and result.numbers["deeper_half_covered"] > 0.5
    assert ds["model_loss"].values[-1] < ds["model_loss"].values[1]  # the model trains through the skip
    errors = ds.probekit.errors()
    assert errors["layers.64"] < errors["layers.56"] / 2  # the signal comes back after the skip (0.04 against 0.13-0.14)
    assert result.figure.stat().st_size > 0 and result.figure_html.stat().st_size > 0


@pytest.mark.slow
def test_mnist_convnet_layers_help_at_init_and_training_lowers_the_error(quick):
    result = quick("mnist-convnet")
    ds = open_run(result.stores["mnist-convnet"])
    assert ds["epoch"].values.tolist() == [0, 1, 2]
    init, final = ds.probekit.errors(epoch=0), ds.probekit.errors()
    assert init.drop("input").min() < init["input"]  # even untrained, some layer beats the raw pixels
    assert final["fc2"] < init["fc2"] - 0.1  # training makes the output layer separable
    assert not diagnose(ds).of("dead_segment")  # a healthy model: no dead segment
    assert result.numbers["valid_error_init"]["input"] == pytest.approx(float(init["input"]), abs=1e-4)
    assert set(result.numbers) >= {"valid_error_init", "valid_error_final", "test_error_final"}


@pytest.mark.slow
def test_random_init_separability_degrades_with_depth(quick):
    result = quick("random-init")
    ds = open_run(result.stores["random-init"])
    errors = ds.probekit.errors()
    hidden = [layer for layer in errors.index if layer.startswith("layers.")]
    assert errors[hidden[-1]] > errors["input"] + 0.3
    ranks = np.argsort(np.argsort(errors[hidden].values))
    assert np.corrcoef(ranks, np.arange(len(hidden)))[0, 1] > 0.9  # nearly monotonic worsening
    findings = result.findings["random-init"]
    steps = findings.of("non_monotonic")
    assert steps and hidden[-1] in steps[0].layers
    assert "before training" in steps[0].suggestion
    assert not findings.of("dead_segment")


@pytest.mark.slow
def test_resnet_vs_inception_from_scratch_share_data_and_train_deep_layers_first(quick):
    result = quick("resnet-vs-inception")
    runs = {arch: open_run(path) for arch, path in result.stores.items()}
    assert set(runs) == {"resnet50", "inception_v3"}
    resnet, inception = runs["resnet50"], runs["inception_v3"]
    from probekit import zoo

    assert resnet["layer"].values.tolist() == list(zoo.RESNET50_LAYERS)
    assert inception["layer"].values.tolist() == zoo.default_layers("inception_v3", aux_logits=False)
    for ds in runs.values():
        assert ds["epoch"].values.tolist() == [0, 1, 2]
        assert set(ds["reduction"].values.tolist()) <= {"pool", "flatten"}  # vectors (avgpool, fc) need no pooling
        assert (ds.attrs["n_train"], ds.attrs["n_valid"], ds.attrs["dataset"]) == (128, 128, "digits")
        # Training moves the deep layers' probes more than the early layers': the early layers' features
        # change least (the paper's Inception snapshots; Yosinski et al.).
        errors = ds["probe"].sel(metric="valid_error").values
        change = np.abs(errors[:, 1:] - errors[:, :1]).max(axis=1)
        third = len(change) // 3
        assert change[-third:].mean() > change[1:1 + third].mean(), change
    assert set(result.numbers) == {"resnet50", "inception_v3"}


@pytest.mark.slow
def test_cka_resnet_vs_inception_matches_shallow_layers_with_shallow_ones(quick):
    import xarray as xr

    from probekit import zoo

    result = quick("cka-resnet-vs-inception")
    sim = xr.open_zarr(result.stores["cka"])["cka"].load()
    assert sim.dims == ("layer_a", "layer_b")
    assert sim["layer_a"].values.tolist() == list(zoo.RESNET50_LAYERS)
    assert sim["layer_b"].values.tolist() == zoo.default_layers("inception_v3", aux_logits=False)
    assert (sim.attrs["estimator"], sim.attrs["n_examples"]) == ("debiased", 128)
    assert np.isfinite(sim.values).all() and (sim.values <= 1 + 1e-9).all()
    # The same probe runs as resnet-vs-inception's, beside the similarity.
    assert open_run(result.stores["resnet50"]).attrs["n_train"] == 128
    # Depth corresponds: the closest Inception v3 layer to each ResNet-50 layer lies deeper for
    # ResNet's deep third than for its shallow third (Kornblith et al.'s diagonal structure).
    best = np.nanargmax(sim.values, axis=1)
    third = len(best) // 3
    assert best[-third:].mean() > best[1:1 + third].mean(), best
    assert result.numbers["best_match"]["layer1.0"] == str(sim["layer_b"].values[best[1]])
    assert result.figure.is_file() and result.figure_html.is_file()


# --------------------------------------------------------------------- the API
def test_reproductions_are_listed_with_descriptions():
    assert list(experiments.REPRODUCTIONS) == [
        "mnist-convnet", "bypass", "resnet-vs-inception", "random-init", "cka-resnet-vs-inception"]
    assert all(len(text) > 40 for text in experiments.REPRODUCTIONS.values())


def test_bad_names_and_options_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="unknown reproduction 'bypas'; did you mean 'bypass'"):
        experiments.reproduce("bypas", out=tmp_path)
    with pytest.raises(ValueError, match="pretrained=True .* applies to resnet-vs-inception only"):
        experiments.reproduce("bypass", pretrained=True, out=tmp_path)
    with pytest.raises(ValueError, match="contradict"):
        experiments.reproduce("bypass", quick=True, full=True, out=tmp_path)
    with pytest.raises(TypeError, match="dataset must be a dataset name"):
        experiments.reproduce("bypass", dataset=None, out=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_pretrained_path_probes_the_loaded_weights_once(tmp_path, monkeypatch):
    """--pretrained: weights from zoo.build(arch, weights="DEFAULT"), data fitted to the model, one snapshot."""
    import torch
    from torch import nn

    from probekit import zoo

    built = []

    def fake_build(name, **kwargs):
        built.append((name, kwargs))
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 8, 3, padding=1), nn.AdaptiveAvgPool2d(2)
        )
        model.probe_layers, model.input_shape, model.pretrained = ["input", "1", "2"], (3, 12, 12), True
        return model

    monkeypatch.setattr(zoo, "build", fake_build)
    result = experiments.reproduce("resnet-vs-inception", pretrained=True, out=tmp_path, quiet=True, device="cpu")
    assert [name for name, _ in built] == ["resnet50", "inception_v3"]
    assert all(kwargs == {"weights": "DEFAULT"} for _, kwargs in built)
    for arch, reduction in (("resnet50", "pool"), ("inception_v3", "subset1000(seed=0)")):
        ds = open_run(result.stores[arch])
        assert ds.sizes["epoch"] == 1 and ds["reduction"].values[2] == reduction  # 8 x 12 x 12 features
        assert (ds.attrs["n_train"], ds.attrs["dataset"]) == (1000, "digits")  # at most 1,000 per split unless full
    assert "pretrained" in result.summary()


# --------------------------------------------------------------------- committed stores
def test_committed_stores_open_with_the_current_schema_and_have_their_command():
    readme = (RUNS / "README.md").read_text()
    for name, stores in COMMITTED.items():
        assert re.search(rf"probekit reproduce {name}\b", readme), f"data/runs/README.md lacks the command for {name}"
        for store in stores:
            ds = open_run(RUNS / store)
            check_run(ds)
            assert ds.sizes["epoch"] >= 1 and store in readme
            assert sum(p.stat().st_size for p in (RUNS / store).rglob("*") if p.is_file()) < 5 * 2**20


def test_committed_bypass_run_shows_the_dead_segment():
    ds = open_run(RUNS / "bypass.zarr")
    assert ds["step"].values.tolist() == list(BYPASS_STEPS)
    assert ds.sizes["layer"] == 130  # every layer of the model is probed
    assert_dead_segment_in_bypassed_half(ds)


def test_committed_healthy_and_untrained_runs():
    convnet = open_run(RUNS / "mnist-convnet.zarr")
    assert not diagnose(convnet).of("dead_segment")
    untrained = diagnose(open_run(RUNS / "random-init.zarr"))
    assert untrained.of("non_monotonic") and untrained.of("chance_level") and not untrained.of("dead_segment")
