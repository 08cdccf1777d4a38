"""Data forms of the feature cache: tensor, tuple and mapping batches, (mapping, label) datasets, rows with a
label key, IterableDataset loaders, the attention mask reaching the extractor, and the label errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset

import probekit as pk
from probekit.engine.features import batches, collate, extract, label_summary, labels_of

VOCAB, LENGTH = 48, 10


def sequences(n: int, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Class 1 draws its tokens from the upper half of the vocabulary; right padding (id 0) of random length."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    low, high = torch.randint(1, VOCAB // 2, (n, LENGTH), generator=g), torch.randint(VOCAB // 2, VOCAB, (n, LENGTH), generator=g)
    ids = torch.where(y[:, None].bool(), high, low)
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=g)
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}, y


class Bag(nn.Module):
    """Mean of token embeddings over real tokens, then a linear layer: takes keyword inputs."""

    def __init__(self, dim: int = 16):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, input_ids, attention_mask):
        e = self.embed(input_ids) * attention_mask[..., None]
        return self.fc(e.sum(1) / attention_mask.sum(1, keepdim=True))


class Rows(Dataset):
    """Rows as a Hugging Face ``datasets`` row: python lists and ints, the label under a key."""

    def __init__(self, inputs: dict, y: torch.Tensor, key: str = "label", extra: dict | None = None, tensors: bool = False):
        self.inputs, self.y, self.key, self.extra, self.tensors = inputs, y, key, extra or {}, tensors

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        if self.tensors:  # as set_format("torch") gives them
            return {**{k: v[i] for k, v in self.inputs.items()}, self.key: self.y[i], **self.extra}
        row = {k: v[i].tolist() for k, v in self.inputs.items()}
        return {**row, self.key: int(self.y[i]), **self.extra}


class HubLike:
    """Not a torch Dataset: only ``__len__`` and ``__getitem__`` (as ``datasets.Dataset``)."""

    def __init__(self, rows: Rows):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


class Pairs(Dataset):
    """Items ``(mapping, label)``."""

    def __init__(self, inputs: dict, y: torch.Tensor):
        self.inputs, self.y = inputs, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return {k: v[i] for k, v in self.inputs.items()}, self.y[i]


class Stream(IterableDataset):
    """An IterableDataset with no ``len()``: the same examples on every pass."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __iter__(self):
        yield from zip(self.x, self.y)


@pytest.fixture(scope="module")
def seq_splits():
    return {"train": sequences(240, seed=0), "valid": sequences(120, seed=1)}


def _valid_error(ds, layer="fc"):
    return float(ds.probe.sel(layer=layer, metric="valid_error").item())


# ----------------------------------------------------------------------------- batch forms
def test_mapping_pairs_datasets_of_mapping_label_and_rows_give_the_same_run(seq_splits):
    as_pairs = pk.probe(Bag(), seq_splits, layers=["fc"], quiet=True)
    assert _valid_error(as_pairs) < 0.2  # the task is learnt: chance is 0.5
    (tx, ty), (vx, vy) = seq_splits["train"], seq_splits["valid"]
    forms = {
        "(mapping, label) items": {"train": Pairs(tx, ty), "valid": Pairs(vx, vy)},
        "rows with label_key": {"train": Rows(tx, ty), "valid": Rows(vx, vy)},
        "non-torch rows": {"train": HubLike(Rows(tx, ty)), "valid": HubLike(Rows(vx, vy))},
        "loader of rows": {"train": DataLoader(Rows(tx, ty, "labels", tensors=True), batch_size=50),
                           "valid": Rows(vx, vy, "labels")},
    }
    for form, data in forms.items():
        key = "labels" if form == "loader of rows" else "label"
        ds = pk.probe(Bag(), data, layers=["fc"], quiet=True, label_key=key)
        np.testing.assert_allclose(ds.probe.values, as_pairs.probe.values, atol=1e-5, err_msg=form)
        assert ds.attrs["label_key"] == key and ds.attrs["n_train"] == 240 and ds.attrs["examples"] == "examples"


def test_rows_are_collated_key_by_key():
    (x, y) = sequences(4)
    batch = collate([Rows(x, y, extra={"text": "a b"})[i] for i in range(3)])
    assert torch.equal(batch["input_ids"], x["input_ids"][:3]) and batch["label"].tolist() == y[:3].tolist()
    assert batch["text"] == ["a b"] * 3
    with pytest.raises(ValueError, match=r"rows of 'input_ids' differ in length \(3 and 5\); pad them"):
        collate([{"input_ids": [1, 2, 3], "label": 0}, {"input_ids": [1, 2, 3, 4, 5], "label": 1}])
    # torch's default collate splits list-valued rows by position: refused, saying how to get tensors.
    with pytest.raises(ValueError, match=r"hold 'input_ids' as a list of 10 tensors .*set_format\('torch'\)"):
        pk.probe(Bag(), {"train": DataLoader(Rows(x, y), batch_size=2)}, layers=["fc"], quiet=True, label_key="label")


def test_tuple_inputs_are_positional_and_tensor_pairs_slice_every_argument():
    x, y = torch.randn(10, 3), torch.arange(10) % 2
    shift = torch.ones(10, 3)
    got = list(batches(((x, shift), y), 4))
    assert [len(b[1]) for b in got] == [4, 4, 2]
    assert isinstance(got[0][0], tuple) and torch.equal(got[2][0][1], shift[8:])

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, a, b):
            return self.fc(a - b)

    ds = pk.probe(Two(), {"train": ((x, shift), y)}, layers=["fc"], quiet=True)
    assert ds.attrs["n_train"] == 10


def test_the_attention_mask_reaches_the_extractor_under_mask_key():
    (x, y) = sequences(12)
    seen = []

    def spy(inputs, *, mask=None, tokens=None):
        seen.append(mask)
        return {"a": inputs["input_ids"].float()}

    common = dict(name="train", dims={"a": LENGTH}, num_classes=2, batch_size=5, device=torch.device("cpu"))
    extract(spy, (x, y), **common)
    assert torch.equal(torch.cat(seen), x["attention_mask"].bool())
    seen.clear()
    renamed = {"input_ids": x["input_ids"], "pad_mask": x["attention_mask"]}
    extract(spy, (renamed, y), mask_key="pad_mask", **common)
    assert torch.equal(torch.cat(seen), x["attention_mask"].bool())
    seen.clear()
    # A tensor batch carries no mask: a plain callable extractor gets no keyword at all.
    extract(lambda inputs, **kw: seen.append(kw) or {"a": inputs.float()}, (x["input_ids"], y), **common)
    assert seen == [{}, {}, {}]


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_dict_batches_probe_transformers_models(arch, seq_splits):
    from transformers import BertConfig, BertModel, GPT2Config, GPT2Model

    torch.manual_seed(0)
    if arch == "bert":
        model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=16))
        layers = ["embeddings", "encoder.layer.1"]
    else:
        model = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=16,
                                     bos_token_id=0, eos_token_id=0))
        layers = ["wte", "h.1"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="cannot be traced"):
        ds = pk.probe(model, seq_splits, layers=layers, quiet=True)
    errors = ds.probe.sel(metric="valid_error").squeeze("epoch").values
    assert errors.min() < 0.3, errors  # chance is 0.5
    assert ds.attrs["mask_key"] == "attention_mask"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ----------------------------------------------------------------------------- IterableDataset
def test_a_loader_over_an_iterable_dataset_never_takes_len(digits_tensors, capsys):
    from tests.conftest import tiny_convnet

    (x, y), (vx, vy) = digits_tensors["train"], digits_tensors["valid"]
    stream = DataLoader(Stream(x, y), batch_size=100)
    with pytest.raises(TypeError):
        len(stream)  # what a len() anywhere would meet
    assert torch.equal(labels_of(stream, 64), y)  # one pass over the stream
    summary = label_summary(stream, 64)
    assert summary.sequences == len(y) and summary.kind == "examples"
    expected = pk.probe(tiny_convnet(), {"train": (x, y), "valid": (vx, vy)}, layers=["relu1", "fc2"], quiet=True)
    got = pk.probe(tiny_convnet(), {"train": stream, "valid": Stream(vx, vy)}, layers=["relu1", "fc2"], quiet=False)
    np.testing.assert_allclose(got.probe.values, expected.probe.values, atol=1e-5)
    assert got.attrs["n_train"] == len(y) and got.attrs["n_valid"] == len(vy)  # counted on the labels' pass
    err = capsys.readouterr().err
    assert f"train features: {len(y):,} examples" in err  # progress without a total
    on_disk = pk.probe(tiny_convnet(), {"train": stream, "valid": Stream(vx, vy)}, layers=["relu1", "fc2"], quiet=True,
                       cache_bytes=1)  # the row count is unknown in advance: the cache moves to disk on the way
    np.testing.assert_array_equal(on_disk.probe.values, got.probe.values)


# ----------------------------------------------------------------------------- errors
def test_label_errors_say_what_to_pass(digits_tensors):
    from tests.conftest import tiny_convnet

    x, y = digits_tensors["train"]
    model = tiny_convnet()
    with pytest.raises(ValueError, match=r"the train split's labels are one-hot rows of shape \(1000, 10\); pass class indices: y.argmax\(1\)"):
        pk.probe(model, {"train": (x, F.one_hot(y, 10).float())}, quiet=True)
    with pytest.raises(ValueError, match=r"one-hot rows .* pass class indices: y.argmax\(1\)"):
        pk.probe(model, {"train": (x, F.one_hot(y, 10))}, quiet=True)
    with pytest.raises(ValueError, match=r"one-hot rows .* pass class indices"):  # probabilities too
        pk.probe(model, {"train": (x, torch.softmax(torch.randn(len(y), 10), 1))}, quiet=True)
    with pytest.raises(ValueError, match=r"labels have shape \(1000, 2, 5\); labels are \(N,\) class indices, or \(N, T\)"):
        pk.probe(model, {"train": (x, torch.zeros(len(y), 2, 5, dtype=torch.long))}, quiet=True)
    with pytest.raises(TypeError, match=r"labels of shape \(1000, 3\) are per-token labels and must be integer"):
        pk.probe(model, {"train": (x, torch.rand(len(y), 3) * 3)}, quiet=True)
    with pytest.raises(ValueError, match="the train split has per-example .* but the valid split per-token"):
        pk.probe(model, {"train": (x, y), "valid": (x[:10], torch.zeros(10, 4, dtype=torch.long))}, quiet=True)
    # A loader's one-hot labels are caught on its labels' pass, with the same message.
    with pytest.raises(ValueError, match=r"one-hot rows of shape \(64, 10\); pass class indices"):
        pk.probe(model, {"train": DataLoader(Pairs({"x": x}, F.one_hot(y, 10)), batch_size=64)}, quiet=True)


def test_mapping_batches_lacking_or_adding_arguments_name_the_key(seq_splits):
    (x, y) = seq_splits["train"]
    with pytest.raises(TypeError, match=r"forward requires 'attention_mask', which the train split's batches lack "
                                        r"\(keys: input_ids\); add a 'attention_mask' key to each batch"):
        pk.probe(Bag(), {"train": ({"input_ids": x["input_ids"]}, y)}, layers=["fc"], quiet=True)
    with pytest.raises(TypeError, match=r"batches hold 'text', which Bag.forward does not take .*remove that key"):
        pk.probe(Bag(), {"train": Rows(x, y, extra={"text": "abc"})}, layers=["fc"], quiet=True, label_key="label")
    # A forward that takes **kwargs and fails inside: the model's own TypeError, rewritten to name the key.
    inner = Bag()

    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = inner

        def forward(self, **inputs):
            return self.inner(**inputs)

    def run(inputs, **_):
        return {"fc": Wrapper()(**inputs)}

    with pytest.raises(TypeError, match=r"forward requires 'attention_mask', which the valid split's batches lack"):
        extract(run, ({"input_ids": x["input_ids"]}, y), name="valid", dims={"fc": 16}, num_classes=2, batch_size=64,
                device=torch.device("cpu"))


def test_rows_without_a_label_key_ask_for_one(seq_splits):
    (x, y) = seq_splits["train"]
    with pytest.raises(ValueError, match=r"yields rows \(keys: input_ids, attention_mask, label\) .* label_key='label'"):
        pk.probe(Bag(), {"train": Rows(x, y)}, layers=["fc"], quiet=True)
    with pytest.raises(ValueError, match=r"rows have no label key 'target' \(keys: input_ids, attention_mask, label\)"):
        pk.probe(Bag(), {"train": Rows(x, y)}, layers=["fc"], quiet=True, label_key="target")
    with pytest.raises(ValueError, match="label_key must be a str or None; got 3"):
        pk.probe(Bag(), {"train": Rows(x, y)}, layers=["fc"], quiet=True, label_key=3)


def test_the_cache_keeps_features_on_a_gpu_while_half_its_free_memory_holds_them(monkeypatch):
    from probekit.engine.features import DEFAULT_CACHE_BYTES, cache_budget

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * 2**30, 80 * 2**30))
    assert cache_budget(DEFAULT_CACHE_BYTES, torch.device("cuda")) == 20 * 2**30
    assert cache_budget(2**20, torch.device("cuda")) == 2**20  # a value the user chose is kept
    assert cache_budget(DEFAULT_CACHE_BYTES, torch.device("cpu")) == DEFAULT_CACHE_BYTES
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 80 * 2**30))
    assert cache_budget(DEFAULT_CACHE_BYTES, torch.device("cuda")) == DEFAULT_CACHE_BYTES  # never below the default
