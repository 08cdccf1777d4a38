"""Sequence models: layouts, mask-aware token reductions, transformer blocks as default points, RNNs, state and errors."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import transformers
from torch import nn

import probekit as pk
from probekit.engine.extract import build_extractor
from probekit.engine.plan import build_plan
from probekit.engine.points import LayerGraph
from probekit.engine.reduce import make_reducer

transformers.logging.set_verbosity_error()


def _quiet_graph(model, example, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the hook fallback's warning
        return LayerGraph(model, example, **kwargs)


# ---------------------------------------------------------------- token reductions by hand
X = torch.tensor([[[1.0, 10.0], [3.0, 30.0], [100.0, -100.0]],   # 2 real tokens, then padding
                  [[2.0, 4.0], [6.0, 8.0], [10.0, 12.0]]])        # 3 real tokens
MASK = torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool)


def _reduce(spec, x=X, mask=MASK):
    reducer = make_reducer(spec, tuple(x.shape[1:]), layer="seq", layout="tokens")
    reducer.batch_mask = mask
    return reducer(x)


def test_mask_aware_mean_never_counts_padding():
    assert _reduce("mean").tolist() == [[2.0, 20.0], [6.0, 8.0]]
    assert _reduce("pool").tolist() == [[2.0, 20.0], [6.0, 8.0]]  # pool of a sequence is the same mean
    assert make_reducer("auto", (3, 2), layer="seq", layout="tokens").describe() == "mean"  # the default


def test_last_is_the_last_real_token_under_right_padding_and_first_the_cls_token():
    assert _reduce("last").tolist() == [[3.0, 30.0], [10.0, 12.0]]
    assert _reduce("first").tolist() == [[1.0, 10.0], [2.0, 4.0]]
    assert _reduce("max").tolist() == [[3.0, 30.0], [10.0, 12.0]]
    left = torch.tensor([[0, 1, 1], [1, 1, 1]], dtype=torch.bool)  # left padding: the first real token moves
    assert _reduce("first", mask=left).tolist() == [[3.0, 30.0], [2.0, 4.0]]
    torch.testing.assert_close(_reduce("mean", mask=None), torch.tensor([[104 / 3, -20.0], [6.0, 8.0]]))  # no mask: all real


def test_token_pool_bins_only_real_tokens_and_matches_adaptive_pooling_without_padding():
    # Two bins over the first example's 2 real tokens: one token each; over the second's 3: tokens 0-1 and 1-2.
    assert _reduce("pool2").tolist() == [[1.0, 10.0, 3.0, 30.0], [4.0, 6.0, 8.0, 10.0]]
    x = torch.randn(4, 7, 5)
    expected = nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), 3).transpose(1, 2).reshape(4, -1)
    torch.testing.assert_close(_reduce("pool3", x=x, mask=None), expected)


def test_no_reduction_of_a_sequence_pools_across_the_hidden_dim():
    reducer = make_reducer("pool4", (65, 192), layer="blocks.0", layout="tokens")
    assert reducer.out_features == 4 * 192  # token bins x hidden, never 65 channels x 4
    with pytest.raises(ValueError, match="reduces a token sequence and this point is a map"):
        make_reducer("mean", (8, 4, 4), layer="conv", layout="map")


# ---------------------------------------------------------------- transformers and timm
def _bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=32)
    torch.manual_seed(0)
    return transformers.BertModel(config).eval()


def _gpt2():
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=50, n_positions=16,
                                     bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2Model(config).eval()


def test_vit_blocks_are_token_sequences_reduced_by_the_mean_over_tokens():
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10)
    plan = pk.plan(vit, torch.randn(2, 3, 32, 32))
    frame = plan.frame().set_index("layer")
    assert [f"blocks.{i}" for i in range(12)] == [n for n in plan.layers if n.startswith("blocks.")]
    assert {"patch_embed", "norm", "head"} <= set(plan.layers)
    blocks = frame.loc[[f"blocks.{i}" for i in range(12)]]
    assert (blocks.layout == "tokens").all() and (blocks.reduction == "mean").all() and (blocks.feature_dim == 192).all()
    assert frame.loc["input", "layout"] == "map" and frame.loc["head", "layout"] == "vector"
    x = torch.randn(3, 3, 32, 32)
    out = build_extractor(plan.graph, plan.reducers)(x)
    with torch.no_grad():
        tokens = vit.blocks[:4](vit._pos_embed(vit.patch_embed(x)))
    torch.testing.assert_close(out["blocks.3"], tokens.mean(1))


def test_bert_defaults_are_its_layers_read_at_the_hidden_state_with_the_mask():
    bert = _bert()
    ids = torch.randint(1, 100, (3, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]])
    batch = {"input_ids": ids, "attention_mask": mask}
    graph = _quiet_graph(bert, batch)
    assert graph.blocks() == ["embeddings", "encoder.layer.0", "encoder.layer.1", "pooler"]
    assert graph.point("encoder.layer.1").layout == "tokens" and graph.point("pooler").layout == "vector"
    table = graph.frame().set_index("name")
    assert table.loc["encoder.layer.1", "layout"] == "tokens"
    plan = build_plan(graph, None, "auto", num_classes=2, seed=0, budget=4096, max_flatten=65536)
    out = build_extractor(graph, plan.reducers)(batch)
    with torch.no_grad():
        hidden = bert(**batch).last_hidden_state
    weights = mask.unsqueeze(-1).float()
    torch.testing.assert_close(out["encoder.layer.1"], (hidden * weights).sum(1) / weights.sum(1))


def test_model_output_fields_are_points_of_their_own():
    bert = _bert()
    graph = _quiet_graph(_Wrap(bert), torch.randint(1, 100, (2, 5)))
    table = graph.frame().set_index("name")
    assert table.loc["bert", "reads"] == "last_hidden_state"
    pooled = graph.point("bert:pooler_output")
    assert pooled.shape == (32,) and pooled.layout == "vector"
    with pytest.raises(ValueError, match="has no tensor field 'logits'.*last_hidden_state"):
        graph.point("bert:logits")


class _Wrap(nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, ids):
        return self.bert(input_ids=ids).last_hidden_state


def test_gpt2_defaults_are_its_blocks_and_the_final_norm():
    graph = _quiet_graph(_gpt2(), {"input_ids": torch.randint(0, 50, (2, 6))})
    assert graph.blocks() == ["wte", "h.0", "h.1", "ln_f"]  # no dropout, no (1, T) position embedding, no token ids
    assert all(graph.point(n).layout == "tokens" for n in graph.blocks())


# ---------------------------------------------------------------- RNNs
class _Tagger(nn.Module):
    def __init__(self):
        super().__init__()
        self.gru = nn.GRU(4, 6, num_layers=2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        out, _ = self.gru(x)
        return self.head(out[:, -1])


def test_a_two_layer_gru_is_a_point_reduced_by_its_last_step():
    torch.manual_seed(0)
    model = _Tagger().eval()
    x = torch.randn(5, 7, 4)
    plan = pk.plan(model, x, layers="all")
    gru = plan.graph.point("gru")
    assert gru.shape == (7, 6) and gru.layout == "tokens" and gru.reads == "output[0]" and gru.recurrent
    assert plan.reducers["gru"].describe() == "last"
    h_n = plan.graph.point("gru:1")  # (num_layers, batch, hidden): the batch is dim 1
    assert h_n.shape == (2, 6) and h_n.batch_dim == 1
    reducers = {**plan.reducers, "gru:1": make_reducer("flatten", h_n.shape, layer="gru:1", layout="tokens")}
    out = build_extractor(plan.graph, reducers)(x)
    with torch.no_grad():
        seq, hidden = model.gru(x)
    torch.testing.assert_close(out["gru"], seq[:, -1])
    torch.testing.assert_close(out["gru:1"], hidden.transpose(0, 1).reshape(5, -1))


def test_a_sequence_first_rnn_is_read_examples_first():
    class SeqFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.gru = nn.GRU(4, 6, num_layers=2)

        def forward(self, x):  # x: (N, T, F), run time-major inside
            out, _ = self.gru(x.transpose(0, 1))
            return out[-1]

    torch.manual_seed(0)
    model = SeqFirst().eval()
    x = torch.randn(5, 7, 4)
    plan = pk.plan(model, x, layers=["gru"], reduce="mean")
    point = plan.graph.point("gru")
    assert point.shape == (7, 6) and point.batch_dim == 1 and point.layout == "tokens"
    out = build_extractor(plan.graph, plan.reducers)(x)
    with torch.no_grad():
        seq, _ = model.gru(x.transpose(0, 1))
    torch.testing.assert_close(out["gru"], seq.mean(0))


# ---------------------------------------------------------------- layouts
class _Unknown(nn.Module):
    def forward(self, x):
        return x.cumsum(1)


def test_a_two_dim_output_of_unknown_origin_asks_for_its_layout():
    model = nn.Sequential(_Unknown(), nn.Flatten())
    x = torch.randn(4, 5, 3)
    graph = LayerGraph(model, x)
    assert graph.point("0").layout is None and graph.frame().set_index("name").loc[graph.point("0").name, "layout"] == "?"
    with pytest.raises(ValueError, match=r"cannot tell whether.*layouts=\{'input': 'tokens'"):
        pk.plan(model, x, layers=["input", "0"])
    plan = pk.plan(model, x, layers=["0"], layouts={"0": "tokens"})
    assert plan.frame().layout.tolist() == ["tokens"] and plan.reducers["0"].describe() == "mean"
    with pytest.raises(ValueError, match="layouts\\['1'\\] = 'tokens' needs two dims per example"):
        pk.plan(model, x, layers=["1"], layouts={"1": "tokens"})


# ---------------------------------------------------------------- state and errors
def test_timm_efficientnet_is_left_bit_identical(digits_tensors):
    torch.manual_seed(0)
    model = timm.create_model("efficientnet_b0", pretrained=False, num_classes=10, in_chans=1)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: m.training for n, m in model.named_modules()}
    x = torch.randn(2, 1, 32, 32)
    pk.list_layers(model, x)
    pk.plan(model, x)
    train = (digits_tensors["train"][0][:64], digits_tensors["train"][1][:64])
    valid = (digits_tensors["valid"][0][:32], digits_tensors["valid"][1][:32])
    pk.probe(model, {"train": train, "valid": valid}, layers=["blocks.1.0", "blocks.3.0"], quiet=True, max_iter=20)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), [k for k in before if not torch.equal(before[k], after[k])][:5]
    assert {n: m.training for n, m in model.named_modules()} == flags


class _Broken(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(x).missing_attribute


def test_a_forward_that_raises_reports_its_own_message_and_no_shape_hint():
    with pytest.raises(ValueError, match=r"^_Broken raised AttributeError: .*missing_attribute") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            LayerGraph(_Broken(), torch.randn(2, 4))
    assert "size and channels" not in str(info.value)


def test_a_list_of_images_for_a_detection_model_says_to_probe_its_backbone():
    import torchvision

    model = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(weights=None, weights_backbone=None)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    with pytest.raises(TypeError, match=r"detection model.*batched tensors.*model.backbone"):
        pk.list_layers(model, images)
    table = pk.list_layers(model.backbone, torch.stack([images[0], images[0]]))
    assert "body" in " ".join(table.name)
