"""The explorers over many runs: pk.open_runs' dataset (a ``run`` dimension) in explore and compare."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import layer_names, make_run
from vega_specs import layers_drawn, rows, spec

from probekit.explorers import compare, explore
from probekit.run.many import open_runs
from probekit.run.schema import layout_of, rows_of
from probekit.run.store import RunWriter


def _write(path, ds):
    with RunWriter(path, layout_of(ds)) as writer:
        for row in rows_of(ds):
            writer.append(row)


@pytest.fixture
def many(tmp_path):
    """Three stores of one model, seeds 0-2; seed 2 has 2 epochs, the others 4; each seed shifts every error."""
    for seed, epochs in ((0, 4), (1, 4), (2, 2)):
        ds = make_run(n_epochs=epochs)
        ds.attrs["seed"] = seed
        ds["probe"] = ds["probe"] + 0.01 * seed
        _write(tmp_path / f"seed{seed}.zarr", ds)
    return open_runs(str(tmp_path / "*.zarr"))


def _profile_errors(app) -> dict[str, float]:
    return {row["layer"]: row["value"] for row in rows(spec(app, "profile"), "line") if row["split"] == "valid"}


def test_explore_shows_one_run_and_its_menu_picks_another(many):
    ex = explore(many)
    assert ex.runs == ["seed0", "seed1", "seed2"] and ex.state.run_name == "seed0"
    assert ex.controls.run.options == ("seed0", "seed1", "seed2") and ex.controls.run.layout.display is None
    assert ex.epoch == 3 and "run <b>seed0</b>" in ex._header.value
    before = _profile_errors(ex)
    ex.controls.layers.value = ("conv1", "logits")
    ex.controls.split.value = "test"
    ex.controls.run.value = "seed2"  # as a user picks it
    assert ex.state.run_name == "seed2" and ex.dataset.attrs["seed"] == 2
    assert ex.dataset.sizes["epoch"] == 2 and ex.epoch == 1  # its own epochs, not the padded ones
    assert ex.selected_layers == ["conv1", "logits"] and ex.split == "test"  # the selections carry over
    assert layers_drawn(spec(ex, "curves")) == ["conv1", "logits"]
    ex.select(run="seed1", split="valid", layers="all")
    after = _profile_errors(ex)
    assert set(after) == set(layer_names(6))
    np.testing.assert_allclose([after[k] - before[k] for k in before], 0.01)  # seed 1 is seed 0 plus 0.01
    assert repr(ex).startswith("<Explorer of run 'seed1' of 3:")


def test_explore_starts_on_the_run_asked_for_and_refuses_unknown_ones(many):
    assert explore(many, run="seed1").state.run_name == "seed1"
    with pytest.raises(ValueError, match=r"run='seed9' is not in this dataset; choose from: seed0, seed1, seed2"):
        explore(many, run="seed9")
    ex = explore(many)
    ex.controls.run.value = "seed0"
    with pytest.raises(ValueError, match="run='x' is not in this dataset"):
        ex.select(run="x")
    with pytest.raises(ValueError, match="this is a single run: leave run= out"):
        explore(make_run(), run="seed0")
    with pytest.raises(ValueError, match="this explorer shows a single run"):
        explore(make_run()).select(run="seed0")
    with pytest.raises(ValueError, match="live=True follows a run store on disk"):
        explore(many, live=True)
    single = explore(make_run())
    assert single.runs == [] and single.controls.run.layout.display == "none"


def test_compare_takes_many_runs_and_names_them_by_run(many):
    cmp = compare(many)
    assert list(cmp.datasets) == ["seed0", "seed1", "seed2"]
    drawn = rows(spec(cmp, "comparison"), "line")
    assert {row["run"] for row in drawn} == {"seed0", "seed1", "seed2"}
    assert cmp.epochs_shown == {"seed0": 3, "seed1": 3, "seed2": 1}  # each run at its own last epoch
    assert cmp.datasets["seed2"].attrs["seed"] == 2
    subset = compare(many.sel(run=many.seed != 1))
    assert list(subset.datasets) == ["seed0", "seed2"]
    with pytest.raises(TypeError, match="names= is for a list of runs; the 'run' coordinate"):
        compare(many, names=["a", "b", "c"])
