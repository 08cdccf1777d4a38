"""Layer selection: the explorers' shortcuts as pure functions of a run's layers, splits and epochs."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_run

from probekit.explorers import explore, merge_layers
from probekit.explorers.selection import default_layers, default_split, fits_epoch, resolve_layers

ROOT = Path(__file__).resolve().parents[2]
MODULES = ("selection", "live", "widgets", "explorer", "compare")


def test_merge_points_keep_input_output_indexed_children_and_merges():
    names = ["input", "conv1", "bn1", "maxpool", "layer1.0", "layer1.1", "layer2.0", "avgpool", "fc"]
    assert merge_layers(names) == ["input", "layer1.0", "layer1.1", "layer2.0", "fc"]
    inception = ["maxpool1", "Conv2d_3b_1x1", "maxpool2", "Mixed_5b", "Mixed_6a", "AuxLogits", "avgpool", "fc"]
    ops = ["MaxPool2d", "BasicConv2d", "MaxPool2d", "cat", "cat", "InceptionAux", "AdaptiveAvgPool2d", "Linear"]
    assert merge_layers(inception, ops) == ["maxpool1", "Mixed_5b", "Mixed_6a", "fc"]


def test_merge_points_of_a_run_without_merges_is_every_layer():
    names = ["input", "conv1", "relu1", "pool1", "fc1", "fc2"]
    assert merge_layers(names) == names
    with pytest.raises(ValueError, match="got 6 names but 2 ops"):
        merge_layers(names, ["input", "Conv2d"])


def test_every_kth_keeps_the_last_layer(run):
    ex = explore(run)
    ex.select(every=2)
    assert ex.selected_layers == ["input", "relu2", "conv4", "logits"]
    ex.select(every=5)
    assert ex.selected_layers == ["input", "logits"]
    with pytest.raises(ValueError, match="every must be an integer >= 1 or None; got 0"):
        ex.select(every=0)


def test_a_large_run_starts_on_every_kth_layer():
    big = make_run(n_layers=60, n_epochs=2)
    explorer = explore(big)
    assert len(explorer.selected_layers) <= 25
    assert explorer.selected_layers[0] == "input" and explorer.selected_layers[-1] == "logits"
    assert explorer.selected_layers == default_layers([str(n) for n in big["layer"].values])


def test_resolve_layers_is_forward_order_and_merges_is_the_shortcut(run):
    assert resolve_layers(run, ["logits", "conv1"], None) == ("conv1", "logits")
    assert resolve_layers(run, "merges", None) == tuple(str(n) for n in run["layer"].values)
    with pytest.raises(ValueError, match="neither a layer of this run nor a shortcut; use 'all', 'merges'"):
        resolve_layers(run, "blocks", None)  # "blocks" is the engine's layer selection, not an explorer shortcut


def test_the_split_shown_first_and_epochs_that_fit():
    assert default_split(["train", "valid", "test"]) == "valid"
    assert default_split(["train", "test"]) == "test"
    assert default_split(["train"]) == "train"
    assert fits_epoch([0, 1, 2], -3) and fits_epoch([0, 1, 2], 2)
    assert not fits_epoch([0, 1, 2], -4) and not fits_epoch([0, 1, 2], 5)


@pytest.mark.parametrize("name", MODULES)
def test_explore_modules_do_not_import_torch_and_list_their_names(name):
    code = f"import sys, probekit.explorers.{name}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0
    module = importlib.import_module(f"probekit.explorers.{name}")  # pk.explore is the function, this the module
    assert module.__all__ == sorted(module.__all__)
    assert "never torch" in module.__doc__
