"""Tests for probekit.zoo: paper models, torchvision models, weights, default probe points, registry."""

from __future__ import annotations

import pathlib
import urllib.error

import pytest
import torch

from probekit import data, zoo
from probekit.engine.points import LayerGraph


def _resolved(model: torch.nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Each of the model's probe_layers resolved by LayerGraph, with its per-example shape."""
    graph = LayerGraph(model, example)
    return {name: graph.point(name).shape for name in model.probe_layers}


# ---------------------------------------------------------------------------------- paper convnet


@pytest.mark.parametrize(("size", "side"), [(8, 2), (28, 7)])
def test_paper_convnet_shapes_and_probe_points(size, side):
    model = zoo.paper_convnet(input_size=size)
    assert model(torch.randn(3, 1, size, size)).shape == (3, 10)
    assert model.probe_layers == ["input", "conv1", "relu1", "pool1", "conv2", "relu2", "pool2", "fc1", "relu3", "fc2"]
    shapes = _resolved(model, torch.randn(2, 1, size, size))
    assert shapes["conv1"] == (32, size, size) and shapes["pool1"] == (32, size // 2, size // 2)
    assert shapes["pool2"] == (64, side, side)
    assert shapes["fc1"] == (200,) and shapes["fc2"] == (10,)
    assert model.input_shape == (1, size, size) and model.pretrained is False


def test_paper_convnet_options_and_errors():
    model = zoo.paper_convnet(in_channels=3, num_classes=4, input_size=32, width=(8, 16), hidden=20, kernel_size=3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    assert model.fc1.in_features == 16 * 8 * 8
    with pytest.raises(ValueError, match="kernel_size must be a positive odd integer .* got 4"):
        zoo.paper_convnet(kernel_size=4)
    with pytest.raises(ValueError, match="input_size must be an integer >= 4; got 3"):
        zoo.paper_convnet(input_size=3)
    with pytest.raises(ValueError, match=r"width must be two channel counts \(conv1, conv2\); got \(32,\)"):
        zoo.paper_convnet(width=(32,))


# ---------------------------------------------------------------------------------- bypass MLP


def test_bypass_mlp_shapes_and_probe_points():
    model = zoo.bypass_mlp(depth=10, width=16, skip=(0, 5))
    assert model(torch.randn(4, 1, 8, 8)).shape == (4, 10)
    assert model(torch.randn(4, 64)).shape == (4, 10)
    assert model.probe_layers == ["input", *(f"layers.{i}" for i in range(10)), "output"]
    assert model.bypassed_layers == ["layers.1", "layers.2", "layers.3", "layers.4"]
    assert model.skip_span == (0, 5)
    shapes = _resolved(model, torch.randn(2, 1, 8, 8))
    assert shapes["input"] == (1, 8, 8) and shapes["layers.7"] == (16,) and shapes["output"] == (10,)
    graph = LayerGraph(model, torch.randn(2, 1, 8, 8))
    assert graph.point("skip.add").depth == graph.point("layers.4").depth + 1
    assert all(torch.count_nonzero(layer.linear.bias) == 0 for layer in model.layers)


def test_paper_default_is_128_layers_skipping_0_to_64():
    model = zoo.bypass_mlp()
    assert len(model.layers) == 128 and model.layers[5].linear.out_features == 128
    assert model.bypassed_layers[0] == "layers.1" and model.bypassed_layers[-1] == "layers.63"
    assert len(model.probe_layers) == 130
    assert isinstance(model.layers[0].act, torch.nn.Tanh)


def _zero_layers(model: zoo.BypassMLP, indices) -> None:
    with torch.no_grad():
        for i in indices:
            model.layers[i].linear.weight.zero_()
            model.layers[i].linear.bias.zero_()


def test_skip_really_bypasses_the_segment():
    torch.manual_seed(0)
    model = zoo.bypass_mlp(depth=8, width=16, skip=(0, 4))
    _zero_layers(model, range(1, 4))
    x = torch.randn(5, 64)
    with torch.no_grad():
        out = model(x)
        h = model.layers[0](x)
        for i in range(4, 8):
            h = model.layers[i](h)
        expected = model.output(h)
    assert torch.allclose(out, expected, atol=1e-6)
    assert out.std(dim=0).min() > 1e-4  # still a function of the input

    control = zoo.bypass_mlp(depth=8, width=16, skip=None)
    _zero_layers(control, [2])
    with torch.no_grad():
        flat = control(x)
    assert torch.allclose(flat, flat[:1].expand_as(flat))  # without the skip, the input is lost


def test_skip_into_the_output_layer_and_other_activations():
    model = zoo.bypass_mlp(depth=6, width=8, skip=(1, 6), activation="sigmoid")
    assert model.bypassed_layers == ["layers.2", "layers.3", "layers.4", "layers.5"]
    with torch.no_grad():
        x = torch.randn(3, 64)
        h1 = model.layers[1](model.layers[0](x))
        h5 = x
        for layer in model.layers[:6]:
            h5 = layer(h5)
        assert torch.allclose(model(x), model.output(h5 + h1), atol=1e-6)
    assert isinstance(zoo.bypass_mlp(depth=3, skip=None, activation="relu").layers[0].act, torch.nn.ReLU)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"skip": (0, 1)}, r"needs 0 <= a, a \+ 2 <= b <= depth \(=128\) to bypass at least one layer; got \(0, 1\)"),
        ({"depth": 8, "skip": (2, 9)}, r"got \(2, 9\)"),
        ({"skip": (-1, 4)}, r"got \(-1, 4\)"),
        ({"skip": "0-64"}, "skip must be a pair .* got '0-64'"),
        ({"activation": "gelu"}, "activation must be one of 'relu', 'tanh', 'sigmoid'; got 'gelu'"),
        ({"depth": 0}, "depth must be an integer >= 1; got 0"),
    ],
)
def test_bypass_mlp_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        zoo.bypass_mlp(**kwargs)


# ---------------------------------------------------------------------------------- residual MLP


def test_residual_mlp_probe_points():
    model = zoo.residual_mlp(depth=4, width=16)
    assert model.probe_layers == ["input", "stem", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "output"]
    graph = LayerGraph(model, torch.randn(2, 1, 8, 8))
    assert [graph.point(n).name for n in model.probe_layers[2:4]] == ["blocks.0.add", "blocks.1.add"]


@pytest.mark.slow
def test_residual_mlp_is_healthy_where_the_plain_deep_mlp_is_not():
    torch.manual_seed(0)
    X, y = data.digits().train

    def accuracy_after_training(model: torch.nn.Module) -> float:
        generator = torch.Generator().manual_seed(0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(80):
            index = torch.randint(0, len(X), (64,), generator=generator)
            loss = torch.nn.functional.cross_entropy(model(X[index]), y[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            return (model(X).argmax(1) == y).float().mean().item()

    healthy = zoo.residual_mlp(depth=32, width=32)
    with torch.no_grad():
        block_std = [block.std(dim=0).mean() for block in _block_outputs(healthy, X[:256])]
    assert min(block_std) > 0.1 * block_std[0]  # the signal reaches the last block
    assert accuracy_after_training(healthy) > 0.85
    assert accuracy_after_training(zoo.bypass_mlp(depth=32, width=32, skip=None)) < 0.6


def _block_outputs(model: zoo.ResidualMLP, x: torch.Tensor) -> list[torch.Tensor]:
    h = model.stem(model.flatten(x))
    outputs = []
    for block in model.blocks:
        h = block(h)
        outputs.append(h)
    return outputs


# ---------------------------------------------------------------------------------- torchvision models


def test_resnet50_default_probe_points_resolve():
    model = zoo.resnet50(num_classes=10)
    assert model.probe_layers == list(zoo.RESNET50_LAYERS) and len(model.probe_layers) == 17
    assert model.probe_layers[1:4] == ["layer1.0", "layer1.1", "layer1.2"] and model.probe_layers[-1] == "layer4.2"
    graph = LayerGraph(model, torch.randn(2, 3, 64, 64))
    shapes = {name: graph.point(name).shape for name in zoo.default_layers("resnet50", extras=True)}
    assert shapes["layer1.2"] == (256, 16, 16) and shapes["layer4.2"] == (2048, 2, 2)
    assert shapes["maxpool"] == (64, 16, 16) and shapes["fc"] == (10,)
    assert model.input_shape == (3, 224, 224) and model.pretrained is False
    image = torch.randint(0, 256, (28, 28), dtype=torch.uint8)
    assert data.transforms_for(data.dataset_info("mnist"), model=model)(image).shape == (3, 224, 224)  # declared input


@pytest.mark.slow
def test_inception_v3_default_probe_points_resolve_with_the_aux_head():
    model = zoo.inception_v3()
    assert model.probe_layers == list(zoo.INCEPTION_V3_LAYERS) and len(model.probe_layers) == 17
    graph = LayerGraph(model, torch.randn(2, 3, 299, 299))
    points = {name: graph.point(name) for name in zoo.default_layers("inception_v3", extras=True)}
    assert points["AuxLogits"].train_only and not points["Mixed_6e"].train_only
    features = [points[name].features for name in model.probe_layers]
    assert sum(f > 100_000 for f in features) == 13 and max(features) == 426_320  # as in the paper
    assert model.transform_input is False and model.training


def test_inception_v3_without_aux_head_at_75_px():
    model = zoo.inception_v3(aux_logits=False, num_classes=7)
    assert "AuxLogits" not in model.probe_layers and len(model.probe_layers) == 16
    shapes = _resolved(model, torch.randn(2, 3, 75, 75))
    assert shapes["fc"] == (7,)
    assert zoo.default_layers("inception_v3", aux_logits=False) == model.probe_layers
    image = torch.randint(0, 256, (28, 28), dtype=torch.uint8)
    assert data.transforms_for(data.dataset_info("mnist"), model=model)(image).shape == (3, 299, 299)  # declared input
    fitted = data.load("digits", model=model, limit=2)
    assert fitted.train[0].shape == (2, 3, 299, 299)
    assert fitted.info.mean != data.IMAGENET_MEAN  # random weights: the data's own statistics


def test_default_layers_errors():
    with pytest.raises(ValueError, match="default_layers knows resnet50, inception_v3; got 'vgg16'"):
        zoo.default_layers("vgg16")


# ---------------------------------------------------------------------------------- weights


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resnet50_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(1)
    source = zoo.resnet50(num_classes=10)
    path = tmp_path / "resnet50.pth"
    torch.save(source.state_dict(), path)
    model = zoo.resnet50(weights=path)
    assert model.fc.out_features == 10  # read from the file
    assert _same_tensors(model.state_dict(), source.state_dict())
    assert model.pretrained is True and model.probe_layers == list(zoo.RESNET50_LAYERS)
    assert data.transforms_for(data.dataset_info("mnist"), model=model).transforms[-2].mean == list(data.IMAGENET_MEAN)

    wrapped = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, wrapped)
    assert _same_tensors(zoo.resnet50(weights=str(wrapped)).state_dict(), source.state_dict())

    with pytest.raises(ValueError, match="do not fit torchvision's resnet50 built with num_classes=5 .*pass num_classes="):
        zoo.resnet50(weights=path, num_classes=5)


@pytest.mark.slow
def test_inception_v3_loads_a_local_state_dict(tmp_path):
    torch.manual_seed(2)
    source = zoo.inception_v3(num_classes=6)
    path = tmp_path / "inception.pth"
    torch.save(source.state_dict(), path)
    full = zoo.inception_v3(weights=path)
    assert _same_tensors(full.state_dict(), source.state_dict())
    assert full.transform_input is True and full.pretrained is True

    trimmed = zoo.inception_v3(weights=path, aux_logits=False)
    assert trimmed.AuxLogits is None and "AuxLogits" not in trimmed.probe_layers
    expected = {k: v for k, v in source.state_dict().items() if not k.startswith("AuxLogits.")}
    assert _same_tensors(trimmed.state_dict(), expected)

    no_aux = tmp_path / "no_aux.pth"
    torch.save(expected, no_aux)
    with pytest.raises(ValueError, match=r"have no auxiliary head \(no AuxLogits\.\* entries\); pass aux_logits=False"):
        zoo.inception_v3(weights=no_aux)
    with pytest.raises(ValueError, match="do not fit torchvision's resnet50"):
        zoo.resnet50(weights=no_aux)


class _RunsCode:
    """An object whose unpickling would create a file: stands for any code a pickle can carry."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_a_weights_file_carrying_code_is_refused(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "evil.pth"
    state = zoo.paper_convnet(input_size=8).state_dict()
    state["payload"] = _RunsCode(marker)
    torch.save(state, path)
    with pytest.raises(ValueError, match="refusing to load .*evil.pth.*holds pickled Python objects"):
        zoo.resnet50(weights=path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the file really carries code: an unsafe load runs it
    assert marker.exists()


def test_weights_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown weights 'IMAGENET' for resnet50; use None .*'IMAGENET1K_V2'"):
        zoo.resnet50(weights="IMAGENET")
    with pytest.raises(FileNotFoundError, match="weights file .*nope.pth' does not exist"):
        zoo.resnet50(weights=str(tmp_path / "nope.pth"))
    with pytest.raises(TypeError, match="weights must be None, a weights name, .* got int"):
        zoo.inception_v3(weights=3)
    with pytest.raises(ValueError, match="ImageNet weights have 1000 classes; got num_classes=10"):
        zoo.resnet50(weights="DEFAULT", num_classes=10)
    not_state = tmp_path / "list.pth"
    torch.save([1, 2], not_state)
    with pytest.raises(ValueError, match="does not hold a state dict .* got list"):
        zoo.resnet50(weights=not_state)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not read weights from .*garbage.pth|refusing to load .*garbage.pth"):
        zoo.resnet50(weights=garbage)


@pytest.mark.parametrize(("build", "weights", "filename"), [
    (zoo.resnet50, "DEFAULT", "resnet50-"),
    (zoo.inception_v3, "IMAGENET1K_V1", "inception_v3_google-"),
])
def test_offline_named_weights_raise_one_clear_error(monkeypatch, build, weights, filename):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    import torchvision.models._api

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(zoo.WeightsUnavailableError, match="could not download") as caught:
        build(weights=weights)
    message = str(caught.value)
    assert calls and "\n" not in message
    assert "name resolution" in message and f"weights='path/to/{filename}" in message


# ---------------------------------------------------------------------------------- registry


def test_registry_builds_every_model_by_name():
    assert zoo.available() == ["paper_convnet", "bypass_mlp", "residual_mlp", "resnet50", "inception_v3"]
    assert isinstance(zoo.build("bypass_mlp", depth=4, skip=(0, 2)), zoo.BypassMLP)
    assert zoo.build("paper_convnet", input_size=8).probe_layers[1] == "conv1"
    assert zoo.build("residual_mlp", depth=2).probe_layers[-1] == "output"
    assert zoo.build("resnet50", num_classes=3).fc.out_features == 3
    assert zoo.build("inception_v3", aux_logits=False).AuxLogits is None
    assert zoo.build("probekit.zoo:paper_convnet", input_size=12).input_shape == (1, 12, 12)


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet_50'; did you mean 'resnet50'\\?"):
        zoo.build("resnet_50")
    with pytest.raises(TypeError, match="name must be a model spec"):
        zoo.build(None)


# ---------------------------------------------------------------------------------- timm and torchvision by name


def test_library_specs_build_random_models():
    torch.manual_seed(0)
    model = zoo.build("timm:resnet18", num_classes=3, in_chans=1)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 3) and model.conv1.in_channels == 1
    assert not hasattr(model, "probe_layers")  # the engine's defaults apply
    vit = zoo.build("timm:vit_tiny_patch16_224", num_classes=4, img_size=32, patch_size=8)
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 4) and vit.patch_embed.num_patches == 16
    tv = zoo.build("torchvision:resnet18", num_classes=5)
    assert tv(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert zoo.resolve("torchvision:resnet18").func is zoo.torchvision_model
    assert zoo.is_library_spec("timm:x") and not zoo.is_library_spec("torchvision.models:resnet18")
    assert isinstance(zoo.build("torchvision.models:resnet18", num_classes=2), torch.nn.Module)  # a plain callable path


def test_library_specs_load_a_local_state_dict(tmp_path):
    torch.manual_seed(0)
    source = zoo.build("timm:resnet18", num_classes=3)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    loaded = zoo.timm_model("resnet18", num_classes=3, weights=path)
    assert _same_tensors(loaded.state_dict(), source.state_dict())
    tv = zoo.build("torchvision:resnet18", num_classes=3)
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    assert _same_tensors(zoo.torchvision_model("resnet18", num_classes=3, weights=str(tmp_path / "tv.pth")).state_dict(),
                         tv.state_dict())
    with pytest.raises(ValueError, match="from a model of the same architecture|resnet18"):
        zoo.timm_model("resnet18", num_classes=4, weights=path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.timm_model("resnet18", weights=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="local state dict; for timm's own weights pass pretrained=True"):
        zoo.timm_model("resnet18", weights="DEFAULT")


def test_pretrained_weights_are_fetched_only_when_asked(monkeypatch):
    import timm

    calls = []

    def offline(name, *, pretrained=False, **kwargs):
        calls.append(pretrained)
        if pretrained:
            raise OSError("We couldn't connect to the hub")
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(timm, "create_model", offline)
    zoo.build("timm:resnet18")
    assert calls == [False]  # random weights by default
    with pytest.raises(RuntimeError, match=r"could not fetch the pretrained weights of timm:resnet18 \(OSError: We couldn't "
                                           r"connect to the hub\); connect to the network, or pass weights="):
        zoo.build("timm:resnet18", pretrained=True)


def test_library_spec_errors():
    with pytest.raises(ValueError, match="unknown timm model 'resnet19' in 'timm:resnet19'; did you mean 'resnet18'"):
        zoo.build("timm:resnet19")
    with pytest.raises(ValueError, match="unknown torchvision model 'vit_b16' in --model v; did you mean 'vit_b_16'"):
        zoo.resolve("torchvision:vit_b16", source="--model v")
    with pytest.raises(ValueError, match="'timm:' names no model; write timm:NAME"):
        zoo.build("timm:")


def test_parse_model_args():
    assert zoo.parse_model_args(["a=3", "b=0.5", "c=TRUE", "d=false", "e=None", "f=null", "g=gelu", "h=-2", "i=1e-3", "j="]) == {
        "a": 3, "b": 0.5, "c": True, "d": False, "e": None, "f": None, "g": "gelu", "h": -2, "i": 1e-3, "j": ""}
    assert zoo.parse_model_args(None) == {} and zoo.parse_value("x=y") == "x=y"
    assert zoo.parse_model_args(["act=x=y"]) == {"act": "x=y"}
    for bad, message in ((["depth"], "takes key=value"), (["2x=1"], "takes key=value"), (["a=1", "a=2"], "given twice")):
        with pytest.raises(ValueError, match=message):
            zoo.parse_model_args(bad)


def test_load_callable():
    assert zoo.load_callable("probekit.zoo:bypass_mlp") is zoo.bypass_mlp
    assert zoo.load_callable("probekit.zoo:BypassMLP.forward") is zoo.BypassMLP.forward
    with pytest.raises(ValueError, match="'package.module:callable' .* got 'probekit.zoo.bypass_mlp'"):
        zoo.load_callable("probekit.zoo.bypass_mlp")
    with pytest.raises(ValueError, match="got 'os:system\\(\"ls\"\\)'"):
        zoo.load_callable('os:system("ls")')
    with pytest.raises(ImportError, match="cannot import module 'no_such_module_pk' for 'no_such_module_pk:make': "
                                          "No module named 'no_such_module_pk'; check the spelling or pip install it"):
        zoo.load_callable("no_such_module_pk:make")
    with pytest.raises(AttributeError, match="module 'probekit.zoo' has no attribute 'nothing' for 'probekit.zoo:nothing'"):
        zoo.load_callable("probekit.zoo:nothing")
    with pytest.raises(AttributeError, match="no attribute 'bypass_ml' for --model x; did you mean 'bypass_mlp'"):
        zoo.load_callable("probekit.zoo:bypass_ml", source="--model x")
    with pytest.raises(TypeError, match="names a tuple, not a callable"):
        zoo.load_callable("probekit.zoo:RESNET50_LAYERS")
    with pytest.raises(TypeError, match="spec must be a string"):
        zoo.load_callable(zoo.bypass_mlp)
