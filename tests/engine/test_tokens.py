"""Token-level probes: integer (N, T) labels with -100 for "no label"; one probe example per labelled token."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import probekit as pk
from probekit.engine.features import IGNORE_INDEX, extract, label_summary

VOCAB, LENGTH, DIM = 20, 8, 32


def tagged(n: int, seed: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Sequences of random token ids, right-padded with id 0; each real token is labelled 1 if its id is even.

    Padding and a random fifth of the real tokens carry no label (-100).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
    lengths = torch.randint(3, LENGTH + 1, (n,), generator=g)
    mask = torch.arange(LENGTH)[None] < lengths[:, None]
    labels = (ids % 2 == 0).long()
    unlabelled = ~mask | (torch.rand(n, LENGTH, generator=g) < 0.2)
    labels[unlabelled] = IGNORE_INDEX
    return {"input_ids": ids * mask, "attention_mask": mask.long()}, labels


class Tagger(nn.Module):
    """Token embeddings and one transformer encoder layer over real tokens."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, DIM)
        self.encoder = nn.TransformerEncoderLayer(DIM, 2, dim_feedforward=64, dropout=0.0, batch_first=True)

    def forward(self, input_ids, attention_mask):
        return self.encoder(self.embed(input_ids), src_key_padding_mask=~attention_mask.bool())


@pytest.fixture(scope="module")
def token_splits():
    return {"train": tagged(200, 0), "valid": tagged(100, 1), "test": tagged(60, 2)}


def _gather(inputs, *, mask=None, tokens=None):
    """An extractor keeping the contract: one row per labelled token, in row-major order."""
    x = torch.nn.functional.one_hot(inputs["input_ids"], VOCAB).float()
    return {"onehot": x[tokens], "seq": x.sum(1).repeat_interleave(tokens.sum(1), 0)}


def test_only_labelled_tokens_are_cached_in_row_major_order_with_their_sequence(token_splits):
    inputs, labels = token_splits["train"]
    common = dict(name="train", dims={"onehot": VOCAB, "seq": VOCAB}, num_classes=2, batch_size=64,
                  device=torch.device("cpu"))
    cached = extract(_gather, (inputs, labels), **common)
    keep = labels != IGNORE_INDEX
    m = int(keep.sum())
    assert cached.kind == "tokens" and cached.sequences == 200
    assert cached.features["onehot"].shape == (m, VOCAB)  # M x d, never N x T x d
    torch.testing.assert_close(cached.labels, labels[keep])
    torch.testing.assert_close(cached.features["onehot"].argmax(1), inputs["input_ids"][keep])
    torch.testing.assert_close(cached.groups, keep.nonzero()[:, 0])  # each row's sequence
    on_disk = extract(_gather, (inputs, labels), cache_bytes=1, **common)
    assert on_disk._tmp is not None
    torch.testing.assert_close(on_disk.features["onehot"], cached.features["onehot"])
    summary = label_summary((inputs, labels), 64)
    assert summary.kind == "tokens" and summary.count == m and summary.sequences == 200


def test_a_token_level_run_probes_every_labelled_token(token_splits):
    ds = pk.probe(Tagger(), token_splits, layers=["embed", "encoder"], quiet=True)
    counts = {split: int((labels != IGNORE_INDEX).sum()) for split, (_, labels) in token_splits.items()}
    assert ds.attrs["examples"] == "tokens"
    assert [ds.attrs[f"n_{s}_tokens"] for s in ("train", "valid", "test")] == [counts["train"], counts["valid"], counts["test"]]
    assert (ds.attrs["n_train"], ds.attrs["n_valid"], ds.attrs["n_test"]) == (200, 100, 60)  # sequences
    valid = ds.probe.sel(metric="valid_error").squeeze("epoch")
    assert float(valid.sel(layer="embed")) < 0.1, valid.values  # token parity is linear in the embedding; chance 0.5
    assert float(valid.sel(layer="encoder")) < 0.25, valid.values
    # Metrics count tokens: every error is a whole number of wrong tokens.
    for split in ("train", "valid", "test"):
        wrong = ds.probe.sel(metric=f"{split}_error").values * counts[split]
        np.testing.assert_allclose(wrong, np.round(wrong), atol=1e-6)
    # Chance uses the token labels: the majority training token label, scored on valid tokens.
    train_tokens = token_splits["train"][1][token_splits["train"][1] != IGNORE_INDEX]
    valid_tokens = token_splits["valid"][1][token_splits["valid"][1] != IGNORE_INDEX]
    majority = int(torch.bincount(train_tokens).argmax())
    assert ds.attrs["chance_error"] == pytest.approx(float((valid_tokens != majority).float().mean()))
    assert ds.attrs["num_classes"] == 2


def test_token_label_errors(token_splits):
    inputs, labels = token_splits["train"]
    padded = labels.clone()
    padded[inputs["attention_mask"] == 0] = 0
    with pytest.raises(ValueError, match=r"labelled tokens of the train split are padding \('attention_mask' 0\); "
                                         r"label padding -100"):
        extract(_gather, (inputs, padded), name="train", dims={"onehot": VOCAB, "seq": VOCAB}, num_classes=2,
                batch_size=64, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"per-token labels have shape \(64, 7\) but its 'attention_mask' has \(64, 8\)"):
        extract(_gather, (inputs, labels[:, :7]), name="train", dims={"onehot": VOCAB, "seq": VOCAB}, num_classes=2,
                batch_size=64, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="per-token labels need mode='snapshot'"):
        pk.ProbeMonitor(Tagger(), token_splits, layers=["embed"], mode="online", quiet=True)
    with pytest.raises(ValueError, match=r"the train split has labels in \[-1, 1\]"):
        wrong = labels.clone()
        wrong[wrong == IGNORE_INDEX] = -1
        pk.probe(Tagger(), {"train": (inputs, wrong)}, layers=["embed"], quiet=True)
    with pytest.raises(ValueError, match="the train split is empty"):
        pk.probe(Tagger(), {"train": (inputs, torch.full_like(labels, IGNORE_INDEX))}, layers=["embed"], quiet=True)
