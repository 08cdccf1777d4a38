"""The model sweep: timm's CNNs and ViTs and five transformers architectures, built from configs with random
weights, each listed, probed end to end with its default points on a tiny synthetic task, and left exactly as found.

The cases (models, tasks, the blocks each must expose) live in ``benchmarks/sweep.py``, which also prints
the table of default points, seconds and state per model.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from benchmarks.sweep import CASES, CLASSES, Case, changed, run_case, state_of

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # "cannot be traced with torch.fx": the hook path is the point

TIMM = [c for c in CASES if c.name.startswith("timm:")]
TRANSFORMERS = [c for c in CASES if c.name.startswith("transformers:")]


def test_the_sweep_covers_enough_models():
    assert len(TIMM) >= 8 and len(TRANSFORMERS) >= 4
    assert {"map", "tokens"} <= {c.layout for c in TIMM}  # CNNs and ViTs
    assert {"transformers:BertModel", "transformers:GPT2Model", "transformers:ViTModel"} <= {c.name for c in TRANSFORMERS}


@pytest.fixture(scope="module", params=CASES, ids=lambda c: c.name)
def result(request):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return request.param, run_case(request.param)


def test_lists_every_block(result):
    case, found = result
    listed = found.listed
    layout = dict(zip(listed.name, listed.layout))  # a block may be the alias of the point it ends at
    for name, aliases, kind in zip(listed.name, listed.aliases, listed.layout):
        layout.update({a.strip(): kind for a in aliases.split(",") if a.strip()})
    missing = [b for b in found.blocks if b not in layout]
    assert found.blocks and not missing, f"{case.name}: blocks missing from list_layers: {missing}"
    assert {layout[b] for b in found.blocks} == {case.layout}


def test_every_block_is_a_default_point_with_its_layout(result):
    case, found = result
    run = found.run
    layers = [str(name) for name in run.layer.values]
    missing = [b for b in found.blocks if b not in layers]
    assert not missing, f"{case.name}: blocks that are not default points: {missing} (defaults: {layers})"
    blocks = run.sel(layer=found.blocks)
    assert set(map(str, blocks.layout.values)) == {case.layout}
    if case.layout == "tokens":
        # a sequence is reduced over its tokens, never across the hidden dimension: one feature per hidden unit
        hidden = [int(str(shape).split("x")[-1]) for shape in blocks.shape.values]
        assert list(blocks.feature_dim.values) == hidden and set(map(str, blocks.reduction.values)) == {"mean"}
    assert len(layers) == len(set(layers))


def test_probes_end_to_end(result):
    case, found = result
    run = found.run
    assert run.sizes["epoch"] == 1 and run.attrs["model"] == case.name and run.attrs["num_classes"] == CLASSES
    valid = run.probe.sel(metric="valid_error").isel(epoch=0).values
    assert np.isfinite(valid).all() and not run.nonfinite.values.any()
    assert bool(run.converged.values.all())
    # the labels are computed from the inputs: the best block reads them far better than chance (2/3);
    # the input itself is left out (its pooled channels give the label away)
    layers = list(map(str, run.layer.values))
    read = [layers.index(b) for b in found.blocks if b in layers] or [i for i, n in enumerate(layers) if n != "input"]
    assert valid[read].min() < 0.4


def test_model_is_left_exactly_as_found(result):
    case, found = result
    assert found.changes == [], f"{case.name}: list_layers + probe changed {found.changes[:10]}"


def test_state_comparison_sees_every_kind_of_change():
    """The state check itself: a changed counter buffer, a flag, a parameter's memory format are all seen."""
    import torch

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    before = state_of(model)
    assert changed(before, state_of(model)) == []
    model(torch.randn(2, 3, 5, 5))  # train mode: the running statistics and num_batches_tracked move
    assert changed(before, state_of(model)) == ["buffer 1.num_batches_tracked", "buffer 1.running_mean", "buffer 1.running_var"]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    before = state_of(model)
    model.eval()
    model[0].weight.requires_grad_(False)
    assert changed(before, state_of(model)) == ["param 0.weight", "training (model)", "training 0"]
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    before = state_of(model)
    model.to(memory_format=torch.channels_last)
    assert changed(before, state_of(model)) == ["param 0.weight"]


def test_cases_build_fresh_models():
    case: Case = CASES[0]
    assert case.build() is not case.build()
