"""probekit.engine.checkpoints: the one loader of saved weights (wrappers, DataParallel prefixes, refusals)."""

from __future__ import annotations

import pytest
import torch

from probekit.engine.checkpoints import WRAPPER_KEYS, load_checkpoint, read_state_dict, safe_load
from tests.conftest import tiny_convnet


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("key", [None, *WRAPPER_KEYS])
@pytest.mark.parametrize("prefix", ["", "module."])
def test_every_wrapper_and_the_data_parallel_prefix_load_the_same_weights(tmp_path, key, prefix):
    source = tiny_convnet(seed=1).state_dict()
    state = {f"{prefix}{k}": v for k, v in source.items()}
    path = tmp_path / "c.pt"
    torch.save(state if key is None else {key: state, "epoch": 3}, path)
    assert _same(read_state_dict(path), source)
    model = tiny_convnet(seed=2)
    load_checkpoint(model, path)
    assert _same(model.state_dict(), source)


def test_a_checkpoint_of_another_model_does_not_fit_in_one_line(tmp_path):
    path = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    with pytest.raises(ValueError, match=r"the weights in '.*other.pt' do not fit Sequential \(.*\); they must come") as caught:
        load_checkpoint(tiny_convnet(), path)
    assert "\n" not in str(caught.value)


def test_unreadable_files_and_non_state_dicts_are_one_line_errors(tmp_path):
    missing = tmp_path / "missing.pt"
    with pytest.raises(ValueError, match="could not read weights from .*missing.pt") as caught:
        safe_load(missing)
    assert "\n" not in str(caught.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="refusing to load .*garbage.pt.*stopped at: Unsupported operand") as caught:
        safe_load(garbage)
    assert "\n" not in str(caught.value)
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    with pytest.raises(ValueError, match="does not hold a state dict .* got dict"):
        read_state_dict(empty)
