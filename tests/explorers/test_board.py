"""The board: a run picker over one run's explorer, and the comparison of every run."""

from __future__ import annotations

import shutil

import pytest
from conftest import layer_names, make_run
from vega_specs import layers_drawn, rows, spec

from probekit.explorers.board import board
from probekit.run.schema import layout_of, rows_of
from probekit.run.store import RunWriter


@pytest.fixture
def runs():
    return {"deep": make_run(n_layers=9, n_epochs=4, model="deep"), "shallow": make_run(n_layers=5, n_epochs=2,
                                                                                        model="shallow")}


def test_the_picker_swaps_the_explorer_and_the_comparison_shows_every_run(runs):
    b = board(runs)
    assert list(b.picker.options) == ["deep", "shallow"] and b.picker.value == "deep"
    first = b.explorer
    assert layers_drawn(spec(first, "curves")) == layer_names(9)
    assert b.comparison.epochs_shown == {"deep": 3, "shallow": 1}
    assert {row["run"] for row in rows(spec(b.comparison, "comparison"), "line")} == {"deep", "shallow"}
    b.picker.value = "shallow"  # as a user picks it
    assert b.explorer is not first and b.explorer.dataset.attrs["model"] == "shallow"
    assert layers_drawn(spec(b.explorer, "curves")) == layer_names(5)
    assert b._slot.children == (b.explorer.widget,)
    assert first.widget.comm is None  # the explorer no longer shown is closed
    assert b.pick("deep").explorer.epoch == 3 and b.picker.value == "deep"
    assert "exploring deep" in repr(b)


def test_board_refuses_what_it_cannot_show(runs):
    with pytest.raises(ValueError, match=r"board shows several runs, but got 1; for one run use pk.explore\(run\)"):
        board({"deep": runs["deep"]})
    with pytest.raises(TypeError, match="board takes a dict from run name to run"):
        board(list(runs.values()))
    with pytest.raises(ValueError, match="run 'wide' is not on this board; choose from: deep, shallow"):
        board(runs).pick("wide")


def test_a_store_that_broke_since_the_board_opened_keeps_the_explorer_shown(tmp_path, runs):
    paths = {}
    for name, ds in runs.items():
        paths[name] = tmp_path / f"{name}.zarr"
        with RunWriter(paths[name], layout_of(ds)) as writer:
            for row in rows_of(ds):
                writer.append(row)
    b = board(paths)
    shown = b.explorer
    shutil.rmtree(paths["shallow"])
    (paths["shallow"]).mkdir()
    b.picker.value = "shallow"
    assert b.explorer is shown and b.picker.value == "deep"
    assert "cannot open run &#x27;shallow&#x27;" in b._status.value and "empty folder" in b._status.value
    with pytest.raises(ValueError, match="is not a probekit run store: it is an empty folder"):
        b.pick("shallow")
    b.close()
    assert b.widget.comm is None and not b.live
