"""The train-mode graph is traced only where traced code reads a ``training`` flag, and nothing is lost by it.

Where no traced code reads the flag, the train-mode trace is the eval one, so
it is skipped; wherever code might read it (a method, a helper function, a
closure, a forward set on the instance), both are traced and train-only points
are still offered.
"""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import NodePathTracer

from probekit.engine.points import LayerGraph, _reads_training, tracer_options
from tests.conftest import tiny_convnet


def _tracer() -> NodePathTracer:
    return NodePathTracer(**tracer_options())


def _helper_head(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    return module.aux(x) if module.training else None


class Aux(nn.Module):
    """A train-only head, as Inception's: the point exists only in the train-mode graph."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.body = nn.Linear(4, 6)
        self.aux = nn.Linear(6, 2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.relu(self.body(x))
        if self.how == "method":
            extra = self._aux(h)
        elif self.how == "helper":
            extra = _helper_head(self, h)
        else:
            extra = None  # (the class still reads the flag in _aux: it counts, whichever branch runs)
        out = self.head(h)
        return out if extra is None else out + extra.sum(1, keepdim=True)

    def _aux(self, h):
        return self.aux(h) if self.training else None


class Plain(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.body(x)))


class Wrapper(nn.Module):
    """Reads the flag one module down, in a module that is traced into."""

    def __init__(self):
        super().__init__()
        self.inner = Aux("method")

    def forward(self, x):
        return self.inner(x)


def test_models_that_read_no_training_flag_are_traced_once_and_lose_nothing():
    for model in (tiny_convnet(batchnorm=True, dropout=True), torchvision.models.resnet18(), Plain()):
        assert not _reads_training(model, _tracer())
        graph = LayerGraph(model, torch.randn(2, *((1, 8, 8) if isinstance(model, nn.Sequential) else
                                                    (3, 32, 32) if isinstance(model, torchvision.models.ResNet) else (4,))))
        assert set(graph._graphs) == {"eval"} and not any(p.train_only for p in graph.points)


@pytest.mark.parametrize("how", ["method", "helper"])
def test_a_training_flag_read_in_a_method_or_a_helper_function_keeps_the_train_only_point(how):
    model = Aux(how)
    assert _reads_training(model, _tracer())
    graph = LayerGraph(model, torch.randn(2, 4))
    assert graph.point("aux").train_only and graph.point("aux").shape == (2,)


def test_flags_read_below_the_root_in_closures_or_instance_forwards_count():
    assert _reads_training(Wrapper(), _tracer())
    assert LayerGraph(Wrapper(), torch.randn(2, 4)).point("inner.aux").train_only

    def make_closure():
        def read(module):
            return module.training

        def forward(x):
            return x * 2 if read(model) else x

        return forward

    model = nn.Module()
    model.forward = make_closure()
    assert _reads_training(model, _tracer())


def test_leaf_modules_flags_do_not_count():
    """Dropout and batch norm read their flag inside, but each is one node in either mode."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4))
    assert not _reads_training(model, _tracer())
    # A user's module kept whole by tracer_kwargs is a leaf too.
    kept = NodePathTracer(**tracer_options({"leaf_modules": [Aux]}))
    assert not _reads_training(nn.Sequential(Aux("method")), kept)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_x_400mf", "squeezenet1_0"])
def test_torchvision_models_that_read_no_flag_trace_the_same_in_both_modes(name):
    """The skipped trace would have offered nothing more: the same qualified names in train mode."""
    model = getattr(torchvision.models, name)()
    assert not _reads_training(model, _tracer())
    names = {}
    for mode in ("eval", "train"):
        model.train(mode == "train")
        tracer = _tracer()
        tracer.trace(model)
        names[mode] = list(tracer.node_to_qualname.values())
    assert names["eval"] == names["train"]


def test_inception_is_still_traced_in_both_modes():
    model = torchvision.models.googlenet(init_weights=False, aux_logits=True)
    assert _reads_training(model, _tracer())
