"""Probe points: discovery, names, resolution, tracer_kwargs, the one-pass extractor and the hook fallback."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn

import probekit as pk
from probekit.engine.extract import build_extractor
from probekit.engine.points import LayerGraph
from probekit.engine.reduce import make_reducer
from tests.conftest import tiny_convnet


def test_resnet_lists_modules_functional_nodes_and_blocks():
    model = torchvision.models.resnet18()
    table = pk.list_layers(model, torch.randn(2, 3, 64, 64))
    assert table.name.iloc[0] == "input" and table.depth.tolist() == list(range(len(table)))
    assert table.relative_depth.iloc[0] == 0 and table.relative_depth.iloc[-1] == 1
    assert "layer1.0.add" in set(table.name)  # residual add: a functional node
    assert table.loc[table.name == "layer1.0.add", "op"].item() == "add"
    block = table[table.aliases.str.contains("layer3.1")]
    assert block.name.tolist() == ["layer3.1.relu_1"] and block["shape"].tolist() == ["256x4x4"]


def test_container_names_resolve_to_their_last_node_and_blocks_are_default():
    model = torchvision.models.resnet18()
    graph = LayerGraph(model, torch.randn(2, 3, 64, 64))
    assert graph.point("layer3.1").name == "layer3.1.relu_1"
    assert graph.resolve(None)[:6] == ["input", "conv1", "bn1", "relu", "maxpool", "layer1.0"]
    assert graph.resolve(["layer2.0", "input"]) == ["input", "layer2.0"]  # forward order


def test_unknown_layer_lists_closest_names():
    graph = LayerGraph(torchvision.models.resnet18(), torch.randn(2, 3, 64, 64))
    with pytest.raises(ValueError, match=r"unknown layer 'layer5'.*closest: .*'layer4'.*pk.list_layers"):
        graph.resolve(["layer5"])
    with pytest.raises(ValueError, match="more than once"):
        graph.resolve(["conv1", "conv1"])


def test_tracing_leaves_model_modes_untouched():
    model = tiny_convnet(batchnorm=True, dropout=True)
    model.train()
    model.fc1.eval()  # a mixed state must survive exactly
    before = {name: m.training for name, m in model.named_modules()}
    LayerGraph(model, torch.randn(2, 1, 8, 8))
    assert {name: m.training for name, m in model.named_modules()} == before


def test_inception_aux_head_is_probed_in_eval_mode():
    model = torchvision.models.inception_v3(init_weights=False, aux_logits=True)
    graph = LayerGraph(model, torch.randn(2, 3, 299, 299))
    aux = graph.point("AuxLogits")
    assert aux.train_only and aux.shape == (1000,)
    names = ["input", "Mixed_5b", "AuxLogits", "Mixed_7c"]
    reducers = {n: make_reducer("pool" if n != "AuxLogits" else "flatten", graph.point(n).shape, layer=n) for n in graph.resolve(names)}
    run = build_extractor(graph, reducers)
    model.eval()
    with torch.no_grad():
        out = run(torch.randn(3, 3, 299, 299))
    assert list(out) == names and out["AuxLogits"].shape == (3, 1000) and out["Mixed_7c"].shape == (3, 2048)
    assert not any(m.training for m in model.modules())


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.body(x)
        return {"logits": self.head(h), "hidden": h}


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        if h.sum() > 0:  # data-dependent control flow: fx cannot trace this
            h = h * 2
        return self.b(h)


def test_aux_head_dropped_with_a_warning_when_the_input_is_too_small_for_it():
    model = torchvision.models.inception_v3(init_weights=False, aux_logits=True)
    with pytest.warns(UserWarning, match="train-only layers.*not offered"):
        graph = LayerGraph(model, torch.randn(2, 3, 75, 75))
    assert graph.traced and "Mixed_7c" in graph.resolve("blocks") and "AuxLogits" not in graph.resolve("blocks")


def test_wrong_input_shape_is_one_line_naming_the_shape():
    with pytest.raises(ValueError, match=r"Sequential raised RuntimeError: .*channels.*cannot run on an input of per-example shape 3x8x8: check the input"):
        LayerGraph(tiny_convnet(), torch.randn(2, 3, 8, 8))


def test_dict_output_model_is_probed():
    graph = LayerGraph(DictOut(), torch.randn(2, 4))
    assert graph.resolve("all") == ["input", "body", "head"]


def test_untraceable_model_falls_back_to_hooks_with_a_warning():
    model = Untraceable()
    with pytest.warns(UserWarning, match="cannot be traced.*forward hooks"):
        graph = LayerGraph(model, torch.randn(2, 4))
    assert not graph.traced and graph.names == ["input", "a", "b"]
    reducers = {n: make_reducer("flatten", graph.point(n).shape, layer=n) for n in graph.names}
    x = torch.randn(3, 4)
    out = build_extractor(graph, reducers)(x)
    assert torch.equal(out["input"], x) and torch.allclose(out["b"], model(x))
    assert not model._forward_hooks and not model.a._forward_hooks  # hooks removed


def test_extractor_reads_values_before_inplace_ops():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True))
    graph = LayerGraph(model, torch.randn(2, 4))
    reducers = {n: make_reducer("flatten", graph.point(n).shape, layer=n) for n in ["0", "1"]}
    x = torch.randn(64, 4)
    with torch.no_grad():
        out = build_extractor(graph, reducers)(x)
        assert torch.allclose(out["0"], model[0](x))
        assert (out["0"] < 0).any() and (out["1"] >= 0).all()


def test_list_layers_needs_a_batched_tensor():
    with pytest.raises(TypeError, match="batched tensor"):
        pk.list_layers(tiny_convnet(), "not a tensor")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pk.list_layers(tiny_convnet(), torch.randn(1, 1, 8, 8))


class Block(nn.Module):
    """A conv and its activation: traced into, unless kept whole as a leaf."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.conv(x))


class Gate(nn.Module):
    def forward(self, x):
        return x * 2 if x.sum() > 0 else x  # data-dependent: fx cannot trace into it


def _gated_net():
    from collections import OrderedDict

    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(block=Block(), gate=Gate(), flatten=nn.Flatten(), fc=nn.Linear(256, 10)))


def test_leaf_modules_in_tracer_kwargs_are_kept_as_one_probe_point_each(digits_tensors):
    x = digits_tensors["train"][0][:2]
    with pytest.warns(UserWarning, match="cannot be traced.*tracer_kwargs=\\{'leaf_modules'"):
        hooked = pk.list_layers(_gated_net(), x)
    assert {"block.conv", "block.act"} <= set(hooked.name)
    leaves = {"leaf_modules": [Block, Gate]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # traced: no fallback warning
        table = pk.list_layers(_gated_net(), x, tracer_kwargs=leaves)
        plan = pk.plan(_gated_net(), x, layers="all", tracer_kwargs=leaves)
    assert table.name.tolist() == ["input", "block", "gate", "flatten", "fc"]
    assert table.op.tolist() == ["input", "Block", "Gate", "Flatten", "Linear"]
    assert plan.layers == table.name.tolist()
    ds = pk.probe(_gated_net(), digits_tensors, layers="all", tracer_kwargs=leaves, quiet=True)
    assert ds.layer.values.tolist() == table.name.tolist()


def test_torchvision_ops_modules_stay_leaves_by_default():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), torchvision.ops.StochasticDepth(0.2, "row"), nn.Flatten())
    table = pk.list_layers(model, torch.randn(2, 1, 8, 8))
    assert table.op.tolist() == ["input", "Conv2d", "StochasticDepth", "Flatten"]


def test_bad_tracer_kwargs_name_what_the_tracer_takes():
    model = tiny_convnet()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match=r"tracer_kwargs has unknown keys \['leaves'\]; it takes leaf_modules, autowrap_functions, autowrap_modules"):
        pk.list_layers(model, x, tracer_kwargs={"leaves": [Block]})
    with pytest.raises(TypeError, match=r"tracer_kwargs\['leaf_modules'\] takes nn.Module classes \(not instances\)"):
        pk.list_layers(model, x, tracer_kwargs={"leaf_modules": [Block()]})
    with pytest.raises(TypeError, match=r"tracer_kwargs\['autowrap_functions'\] must be a list or tuple; got function"):
        pk.list_layers(model, x, tracer_kwargs={"autowrap_functions": lambda v: v})
    with pytest.raises(ValueError, match="tracer_kwargs must be a Mapping or None; got"):
        pk.list_layers(model, x, tracer_kwargs=[Block])
    with pytest.raises(ValueError, match="model must be a Module; got 'resnet'"):
        pk.list_layers("resnet", x)


def test_points_after_a_train_only_head_read_their_own_nodes_in_the_eval_graph():
    """Inception's aux head numbers the train graph's later nodes differently from the eval graph's."""
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(init_weights=False, aux_logits=True).eval()
    graph = LayerGraph(model, torch.randn(2, 3, 299, 299))
    names = ["Mixed_6e", "Mixed_7a.branch3x3_1.relu", "Mixed_7b.branch1x1.relu"]  # no train-only point: the eval graph
    assert not any(graph.point(n).train_only for n in names)
    reducers = {n: make_reducer("pool", graph.point(n).shape, layer=n) for n in names}
    seen = {}
    modules = {"Mixed_6e": "Mixed_6e", "Mixed_7a.branch3x3_1.relu": "Mixed_7a.branch3x3_1",
               "Mixed_7b.branch1x1.relu": "Mixed_7b.branch1x1"}  # each relu is its BasicConv2d's output
    hooks = [model.get_submodule(m).register_forward_hook(lambda mod, a, out, n=n: seen.__setitem__(n, out.mean((2, 3))))
             for n, m in modules.items()]
    x = torch.randn(2, 3, 299, 299)
    with torch.no_grad():
        model(x)
        out = build_extractor(graph, reducers)(x)
    for hook in hooks:
        hook.remove()
    for name in names:
        torch.testing.assert_close(out[name], seen[name])
