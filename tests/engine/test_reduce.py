"""Reductions: specs, the auto policy, refusals and determinism."""

from __future__ import annotations

import pytest
import torch

from probekit.engine.reduce import auto_spec, make_reducer, parse_spec


@pytest.mark.parametrize(("shape", "expected"), [
    ((64,), "flatten"), ((2048, 7, 7), "pool"), ((256, 56, 56), "pool4"), ((64, 147, 147), "pool8"),
    ((8192,), "subset4096"), ((768, 17, 17), "pool2"), ((5000, 3, 3), "subset4096"),
])
def test_auto_policy_keeps_probes_under_budget(shape, expected):
    spec = auto_spec(shape)
    assert spec == expected
    assert make_reducer(spec, shape, layer="x").out_features <= 4096


def test_specs_parse_and_bad_specs_name_the_valid_forms():
    assert parse_spec("pool4") == ("pool", 4) and parse_spec("subset:1000") == ("subset", 1000)
    with pytest.raises(ValueError, match="unknown reduction 'avg'.*'poolK'"):
        parse_spec("avg")
    with pytest.raises(ValueError, match="needs a feature count"):
        parse_spec("subset")


def test_flatten_refused_above_max_with_a_suggestion():
    with pytest.raises(ValueError, match=r"layer 'conv1' has 1,382,976 features \(64x147x147\).*'pool8'"):
        make_reducer("flatten", (64, 147, 147), layer="conv1")


def test_subset_is_seeded_and_reads_the_same_features_in_any_memory_format():
    x = torch.randn(4, 6, 5, 5)
    a = make_reducer("subset20", (6, 5, 5), layer="x", seed=3)
    b = make_reducer("subset20", (6, 5, 5), layer="x", seed=3)
    c = make_reducer("subset20", (6, 5, 5), layer="x", seed=4)
    assert torch.equal(a(x), b(x)) and not torch.equal(a(x), c(x))
    assert torch.equal(a(x), a(x.contiguous(memory_format=torch.channels_last)))
    assert a.describe() == "subset20(seed=3)"
    picked = a(x)
    flat = x.reshape(4, -1)
    assert all(any(torch.equal(picked[:, j], flat[:, k]) for k in range(flat.shape[1])) for j in range(20))


def test_pool_and_projection_shapes_and_refusals():
    x = torch.randn(2, 8, 6, 6, generator=torch.Generator().manual_seed(0))
    assert make_reducer("pool", (8, 6, 6), layer="x")(x).shape == (2, 8)
    pooled = make_reducer("pool2", (8, 6, 6), layer="x")(x)
    assert pooled.shape == (2, 32)
    # Pooled through a channels-last copy: the same means, summed in another order.
    torch.testing.assert_close(pooled.reshape(2, 8, 2, 2)[:, :, 0, 0], x[:, :, :3, :3].mean((2, 3)))
    assert make_reducer("project16", (8, 6, 6), layer="x")(x).shape == (2, 16)
    with pytest.raises(ValueError, match="layer 'fc': pooling needs a feature map"):
        make_reducer("pool", (100,), layer="fc")
    with pytest.raises(ValueError, match="would need a 1,382,976 x 1000 matrix"):
        make_reducer("project1000", (64, 147, 147), layer="x")


@pytest.mark.parametrize("shape, size", [((3, 32, 28, 28), 11), ((3, 64, 14, 14), 8), ((2, 64, 40, 40), 4)])
def test_pool_matches_adaptive_average_pooling_whatever_the_memory_format(shape, size):
    """Small maps are pooled through a channels-last copy; every path gives the same features."""
    from probekit.engine.reduce import Pool

    x = torch.randn(shape)
    expected = torch.nn.functional.adaptive_avg_pool2d(x, size).reshape(shape[0], -1)
    pool = Pool(shape[1:], size)
    torch.testing.assert_close(pool(x), expected)
    torch.testing.assert_close(pool(x.contiguous(memory_format=torch.channels_last)), expected)
    assert pool(x).shape == (shape[0], pool.out_features)


def test_auto_offers_a_map_candidates_no_wider_than_the_training_split_supports():
    from probekit.engine.reduce import CANDIDATES_PER_EXAMPLE, make_reducer

    shape = (64, 8, 8)
    assert make_reducer("auto", shape, layer="m").describe() == "auto(pool|pool2|pool4|flatten)"
    few = make_reducer("auto", shape, layer="m", examples=256)  # at most 4 x 256 = 1,024 features
    assert few.describe() == "auto(pool|pool2|pool4)"
    assert max(c.stop - c.start for c in few.candidates.values()) <= CANDIDATES_PER_EXAMPLE * 256
    assert make_reducer("auto", shape, layer="m", examples=5).describe() == "pool"  # never below global pooling
    assert make_reducer("flatten", shape, layer="m", examples=5).describe() == "flatten"  # explicit: as given
