"""Batches: a tensor, a positional tuple or a keyword mapping mean the same at every stage."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import probekit as pk
from probekit.engine.batch import attention_mask, batch_size, call_model, first_tensor, take, to_device


class TwoInputs(nn.Module):
    """forward(x, mask=None, scale=1.0): positional and keyword arguments tell apart."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, mask=None, scale=1.0):
        out = self.fc(x) * scale
        if mask is not None:
            out = out * mask[:, :1]
        return out


def test_call_model_passes_tuples_positionally_and_mappings_by_keyword():
    model, x = TwoInputs(), torch.randn(5, 4)
    mask = torch.zeros(5, 2)
    torch.testing.assert_close(call_model(model, x), model(x))
    torch.testing.assert_close(call_model(model, (x, mask)), model(x, mask))
    torch.testing.assert_close(call_model(model, [x, mask]), model(x, mask))
    # By keyword: 'scale' is the third parameter, so it can only arrive by name.
    torch.testing.assert_close(call_model(model, {"x": x, "scale": 2.0}), model(x) * 2.0)


def test_batch_size_reads_the_first_tensor_of_any_form():
    ids = torch.zeros(4, 7, dtype=torch.long)
    assert batch_size(ids) == 4
    assert batch_size((ids, torch.ones(4, 7))) == 4
    assert batch_size({"input_ids": ids, "attention_mask": torch.ones(4, 7)}) == 4
    assert batch_size({"use_cache": False, "input_ids": ids}) == 4  # the first *tensor* value
    with pytest.raises(TypeError, match="batched tensor"):
        batch_size([1, 2, 3])
    with pytest.raises(TypeError, match="0-d tensor"):
        batch_size(torch.tensor(3.0))
    assert first_tensor({"flag": True}) is None


def test_take_slices_tensors_and_keeps_the_form():
    x, mask = torch.arange(12).reshape(6, 2), torch.ones(6, 3)
    assert take(x, 2).tolist() == [[0, 1], [2, 3]]
    pair = take((x, mask, "keep"), 3)
    assert isinstance(pair, tuple) and pair[0].shape == (3, 2) and pair[1].shape == (3, 3) and pair[2] == "keep"
    as_list = take([x, mask], 1)
    assert isinstance(as_list, list) and as_list[0].shape == (1, 2)
    mapping = take({"input_ids": x, "attention_mask": mask, "use_cache": False}, 4)
    assert mapping["input_ids"].shape == (4, 2) and mapping["attention_mask"].shape == (4, 3) and mapping["use_cache"] is False


def test_to_device_moves_every_tensor_and_sets_channels_last_on_the_first():
    images, extra = torch.randn(2, 3, 5, 5), torch.randn(2, 3, 5, 5)
    moved = to_device((images, extra, 7), "cpu", channels_last=True)
    assert moved[0].is_contiguous(memory_format=torch.channels_last)
    assert moved[1].is_contiguous() and moved[2] == 7
    mapping = to_device({"pixel_values": images}, "cpu", channels_last=True)
    assert mapping["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    assert to_device(torch.ones(3, 2), "cpu", channels_last=True).is_contiguous()  # not 4-D: untouched


def test_attention_mask_of_a_mapping_batch():
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0]])}
    mask = attention_mask(batch)
    assert mask.dtype == torch.bool and mask.tolist() == [[True, True, False], [True, False, False]]
    assert attention_mask({"input_ids": batch["input_ids"], "pad": batch["attention_mask"]}, mask_key="pad").sum() == 3
    assert attention_mask(batch["input_ids"]) is None
    assert attention_mask((batch["input_ids"], batch["attention_mask"])) is None
    assert attention_mask({"input_ids": batch["input_ids"]}) is None
    with pytest.raises(ValueError, match="mask_key"):
        attention_mask({"attention_mask": torch.ones(2, 1, 3, 3)})


def test_list_layers_and_extraction_take_a_keyword_batch():
    model = TwoInputs()
    x = torch.randn(4, 4)
    batch = {"x": x, "scale": 3.0}
    table = pk.list_layers(model, batch)
    assert "fc" in table.name.tolist()
    plan = pk.plan(model, batch, layers=["fc"], reduce="flatten")
    from probekit.engine.extract import build_extractor

    out = build_extractor(plan.graph, plan.reducers)(batch)
    torch.testing.assert_close(out["fc"], model.fc(x))  # the scale is applied after fc


def test_gpt2_gets_its_attention_mask_by_keyword():
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16)
    model = transformers.GPT2Model(config).eval()
    ids = torch.randint(0, 50, (3, 6))
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[0, :2] = 0  # left padding: the real tokens of row 0 must not attend to it
    batch = {"input_ids": ids, "attention_mask": mask}
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state
        got = call_model(model, batch).last_hidden_state
        unmasked = model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, expected)
    assert not torch.allclose(got[0, 2:], unmasked[0, 2:])  # the mask reached the model
