"""Linear CKA (probekit.engine.similarity): hand computations, invariances, estimators, bad input, Zarr."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import probekit as pk
from probekit.engine.similarity import cka, cka_matrix


def _hand_biased(x: np.ndarray, y: np.ndarray) -> float:
    """Kornblith et al. (2019), eq. for linear CKA on centred features: ||YᵀX||² / (||XᵀX|| ||YᵀY||)."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return float(np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y)))


def _hand_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), the unbiased HSIC estimator, written with explicit ones vectors."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return float((np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
                  - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3)))


def _hand_debiased(x: np.ndarray, y: np.ndarray) -> float:
    k, l = x @ x.T, y @ y.T
    return _hand_unbiased_hsic(k, l) / np.sqrt(_hand_unbiased_hsic(k, k) * _hand_unbiased_hsic(l, l))


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 8), nn.Tanh(), nn.Linear(8, 3))


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(60, 12, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("estimator, hand", [("biased", _hand_biased), ("debiased", _hand_debiased)])
def test_cka_of_two_models_equals_a_hand_computation(inputs, estimator, hand):
    a, b = _mlp(0), _mlp(1)
    sim = cka(a, b, inputs, layers_a=["0", "2"], layers_b=["2", "4"], estimator=estimator, device="cpu")
    with torch.no_grad():
        feats_a = {"0": a[0](inputs), "2": a[:3](inputs)}
        feats_b = {"2": b[:3](inputs), "4": b(inputs)}
    assert sim.dims == ("layer_a", "layer_b")
    assert sim.attrs["estimator"] == estimator and sim.attrs["n_examples"] == 60
    for la, fa in feats_a.items():
        for lb, fb in feats_b.items():
            expected = hand(fa.double().numpy(), fb.double().numpy())
            assert sim.sel(layer_a=la, layer_b=lb).item() == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("estimator", ["biased", "debiased"])
def test_a_model_against_itself_is_one_on_the_diagonal(inputs, estimator):
    model = _mlp()
    sim = cka(model, model, inputs, layers_a="all", layers_b="all", estimator=estimator, device="cpu")
    assert list(sim.layer_a.values) == list(sim.layer_b.values)
    np.testing.assert_allclose(np.diag(sim.values), 1.0, rtol=1e-9)
    np.testing.assert_allclose(sim.values, sim.values.T, rtol=1e-9)
    assert (sim.values < 1 + 1e-9).all()


@pytest.mark.parametrize("estimator", ["biased", "debiased", "minibatch"])
def test_invariant_to_orthogonal_transforms_and_isotropic_scaling(estimator):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 10))
    y = np.tanh(x @ rng.normal(size=(10, 6))) + 0.3 * rng.normal(size=(80, 6))
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    base, _ = cka_matrix([x], [y], estimator=estimator, minibatch_size=30)
    moved, _ = cka_matrix([3.7 * x @ q], [0.2 * y], estimator=estimator, minibatch_size=30)
    assert 0.05 < base[0, 0] < 0.999
    assert moved[0, 0] == pytest.approx(base[0, 0], rel=1e-9)


def test_an_orthogonally_rotated_output_layer_has_cka_one_with_the_original(inputs):
    a = _mlp()
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(3)))
    head = nn.Linear(32, 8)
    with torch.no_grad():
        head.weight.copy_(2.5 * q @ a[2].weight)
        head.bias.copy_(2.5 * q @ a[2].bias)
    b = nn.Sequential(a[0], a[1], head)
    sim = cka(a, b, inputs, layers_a=["2"], layers_b=["2"], device="cpu")
    assert sim.item() == pytest.approx(1.0, abs=1e-9)


def test_the_debiased_estimator_removes_the_small_sample_bias_of_the_biased_one():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(30, 400)), rng.normal(size=(30, 400))  # independent: the true CKA is 0
    biased, _ = cka_matrix([x], [y], estimator="biased")
    debiased, _ = cka_matrix([x], [y], estimator="debiased")
    assert biased[0, 0] > 0.5
    assert abs(debiased[0, 0]) < 0.1


def test_minibatch_estimator_averages_unbiased_hsic_over_seeded_minibatches():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(100, 5))
    y = x @ rng.normal(size=(5, 4)) + rng.normal(size=(100, 4))
    values, count = cka_matrix([x], [y], estimator="minibatch", minibatch_size=30, seed=4)
    order = torch.randperm(100, generator=torch.Generator().manual_seed(4))
    groups = [g.numpy() for g in torch.tensor_split(order, 4)]
    assert count == 4
    sums = np.zeros(3)
    for g in groups:
        k, l = x[g] @ x[g].T, y[g] @ y[g].T
        sums += [_hand_unbiased_hsic(k, l), _hand_unbiased_hsic(k, k), _hand_unbiased_hsic(l, l)]
    assert values[0, 0] == pytest.approx(sums[0] / np.sqrt(sums[1] * sums[2]), rel=1e-9)
    whole, one = cka_matrix([x], [y], estimator="minibatch", minibatch_size=100)
    assert one == 1 and whole[0, 0] == pytest.approx(_hand_debiased(x, y), rel=1e-9)


def test_auto_says_which_estimator_it_used(inputs):
    model = _mlp()
    small = cka(model, model, inputs, layers_a=["0"], layers_b=["2"], device="cpu")
    large = cka(model, model, inputs, layers_a=["0"], layers_b=["2"], minibatch_size=25, device="cpu")
    assert small.attrs["estimator"] == "debiased" and small.attrs["minibatches"] == 1
    assert large.attrs["estimator"] == "minibatch" and large.attrs["minibatches"] == 3
    assert large.attrs["minibatch_size"] == 25


def test_the_models_are_left_as_they_were(inputs):
    a, b = _mlp(0), _mlp(1)
    a.train()
    b[2].train(False)
    before = {k: v.clone() for k, v in a.state_dict().items()}
    flags = [m.training for m in b.modules()]
    cka(a, b, inputs, device="cpu")
    assert a.training and all(m.training for m in a.modules())
    assert [m.training for m in b.modules()] == flags
    assert all(torch.equal(before[k], v) for k, v in a.state_dict().items())


def test_data_forms_splits_objects_and_a_second_view_of_the_same_examples():
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3))
    small = torch.randn(40, 1, 8, 8)
    large = nn.functional.interpolate(small, size=16)
    labels = torch.arange(40) % 3
    loader = DataLoader(TensorDataset(small, labels), batch_size=7)
    sim = cka(conv, conv, {"train": (small, labels), "valid": loader}, data_b=(large, labels), device="cpu")
    assert sim.sizes["layer_a"] == sim.sizes["layer_b"] > 1
    assert set(sim.reduction_a.values) <= {"pool", "flatten"}
    assert sim.sel(layer_a="input", layer_b="input").item() == pytest.approx(1.0, abs=1e-9)  # pooling undoes the upsampling


def test_splits_of_different_sizes_are_refused(inputs):
    with pytest.raises(ValueError, match=r"data has 60 examples but data_b has 50; .*same examples") as info:
        cka(_mlp(0), _mlp(1), inputs, data_b=inputs[:50], device="cpu")
    assert "\n" not in str(info.value)


def test_unknown_layer_names_are_refused_with_the_closest_ones(inputs):
    with pytest.raises(ValueError, match=r"^layers_b: unknown layer '22' .*closest: '2'") as info:
        cka(_mlp(0), _mlp(1), inputs, layers_b=["22"], device="cpu")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match=r"^layers_a: unknown layer"):
        cka(_mlp(0), _mlp(0), inputs, layers_a=["nope"], device="cpu")


def test_shuffled_loaders_other_examples_and_bad_arguments_are_refused(inputs):
    labels = torch.arange(60) % 3
    shuffled = DataLoader(TensorDataset(inputs, labels), batch_size=8, shuffle=True)
    with pytest.raises(ValueError, match="shuffles; .*shuffle=False"):
        cka(_mlp(0), _mlp(1), shuffled, device="cpu")
    with pytest.raises(ValueError, match="different labels at 60 of 60 positions"):
        cka(_mlp(0), _mlp(1), (inputs, labels), data_b=(inputs, labels.roll(1)), device="cpu")
    with pytest.raises(ValueError, match="estimator must be one of"):
        cka(_mlp(0), _mlp(1), inputs, estimator="rbf", device="cpu")
    with pytest.raises(ValueError, match="needs at least 4 examples"):
        cka(_mlp(0), _mlp(1), inputs[:3], device="cpu")
    with pytest.raises(ValueError, match="has no 'test' split"):
        cka(_mlp(0), _mlp(1), {"train": (inputs, labels)}, split="test", device="cpu")


@pytest.mark.filterwarnings("error")
def test_the_result_round_trips_through_zarr(inputs, tmp_path):
    sim = cka(_mlp(0), _mlp(1), inputs, device="cpu")
    sim.to_dataset().to_zarr(tmp_path / "cka.zarr", zarr_format=2)
    back = xr.open_zarr(tmp_path / "cka.zarr")["cka"].load()
    xr.testing.assert_identical(back, sim)


def test_cka_is_on_the_package():
    assert pk.cka is cka
    assert "cka" in dir(pk)
