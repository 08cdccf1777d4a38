"""torchvision's ResNet-50 and Inception v3 with the paper's probe points, and their weights.

:func:`resnet50` and :func:`inception_v3` build the models with random,
downloaded or local weights; :func:`default_layers` lists their probe points in
forward order. Local weight files are read by the package's one loader,
:mod:`probekit.engine.checkpoints` (``weights_only=True``). Each model carries
``probe_layers``, ``input_shape`` (the input it expects: :data:`RESNET50_INPUT`,
:data:`INCEPTION_V3_INPUT`) and ``pretrained``. This module never imports the data.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from probekit.engine.checkpoints import load_state, read_state_dict
from probekit.params import Interval, check_params, choices

__all__ = [
    "INCEPTION_V3_EXTRAS",
    "INCEPTION_V3_INPUT",
    "INCEPTION_V3_LAYERS",
    "RESNET50_EXTRAS",
    "RESNET50_INPUT",
    "RESNET50_LAYERS",
    "WeightsUnavailableError",
    "default_layers",
    "inception_v3",
    "resnet50",
]

#: The input (C, H, W) each model expects: torchvision's ImageNet resolution.
RESNET50_INPUT = (3, 224, 224)
INCEPTION_V3_INPUT = (3, 299, 299)

#: What the builders' arguments may be (see :func:`probekit.params.check_params`).
_CONSTRAINTS = {
    "num_classes": [Interval(int, 1, None), None],
    "aux_logits": [bool],
    "transform_input": [bool, None],
}

#: ResNet-50's probe points in the paper (figure 3): the input and the 16 residual-block outputs.
RESNET50_LAYERS = ("input",) + tuple(
    f"layer{stage}.{block}" for stage, blocks in enumerate((3, 4, 6, 3), start=1) for block in range(blocks)
)
#: Optional extra ResNet-50 points: after the stem (``maxpool``), the pooled features, the logits.
RESNET50_EXTRAS = ("maxpool", "avgpool", "fc")

#: Inception v3's 17 probe points in the paper (figure 4), in forward order. The paper
#: gives their count (17), that 13 exceed 100,000 features and that the largest has
#: 426,320 (= 80 x 73 x 73, ``Conv2d_3b_1x1``); this list is the one that matches:
#: the two stem pools and the conv between them, the 11 ``Mixed_*`` blocks, the
#: auxiliary head (``AuxLogits``, which runs only in train mode), the pooled features
#: and the logits.
INCEPTION_V3_LAYERS = (
    "maxpool1", "Conv2d_3b_1x1", "maxpool2",
    "Mixed_5b", "Mixed_5c", "Mixed_5d",
    "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "AuxLogits",
    "Mixed_7a", "Mixed_7b", "Mixed_7c",
    "avgpool", "fc",
)
#: Optional extra Inception v3 points: the input and the stem convolutions.
INCEPTION_V3_EXTRAS = ("input", "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "Conv2d_4a_3x3")

_FORWARD_ORDER = {
    "resnet50": ("input", "maxpool", *RESNET50_LAYERS[1:], "avgpool", "fc"),
    "inception_v3": (
        "input", "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
        *INCEPTION_V3_LAYERS[2:],
    ),
}
_DEFAULTS = {"resnet50": (RESNET50_LAYERS, RESNET50_EXTRAS), "inception_v3": (INCEPTION_V3_LAYERS, INCEPTION_V3_EXTRAS)}


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded (for example, offline)."""


def default_layers(model: str, *, extras: bool = False, aux_logits: bool = True) -> list[str]:
    """The default probe points of a torchvision model in the zoo, in forward order.

    Args:
        model: ``"resnet50"`` or ``"inception_v3"``.
        extras: add the optional points (:data:`RESNET50_EXTRAS`, :data:`INCEPTION_V3_EXTRAS`).
        aux_logits: keep Inception's ``AuxLogits`` (a model built without its auxiliary head has none).

    Example:
        >>> from probekit import zoo
        >>> zoo.default_layers("resnet50", extras=True)[:3]
        ['input', 'maxpool', 'layer1.0']
    """
    if model not in _DEFAULTS:
        raise ValueError(f"default_layers knows {choices(_DEFAULTS)}; got {model!r}")
    base, optional = _DEFAULTS[model]
    wanted = set(base) | (set(optional) if extras else set())
    if not aux_logits:
        wanted.discard("AuxLogits")
    return [name for name in _FORWARD_ORDER[model] if name in wanted]


def resnet50(*, weights: str | os.PathLike | None = None, num_classes: int | None = None) -> nn.Module:
    """torchvision's ResNet-50, with random, downloaded or local weights.

    ``probe_layers`` is the paper's: the input and the 16 residual-block outputs
    (:data:`RESNET50_LAYERS`); :data:`RESNET50_EXTRAS` adds ``maxpool``, ``avgpool``
    and ``fc`` (see :func:`default_layers`). The model expects 224 x 224 RGB
    (``input_shape``); ``pretrained`` is True when weights were loaded, so data
    loaders normalise with ImageNet statistics.

    Args:
        weights: None for random initialisation; ``"DEFAULT"``, ``"IMAGENET1K_V1"``
            or ``"IMAGENET1K_V2"`` (or a ``ResNet50_Weights`` member) for
            torchvision's ImageNet weights, downloaded on first use; or the path of
            a local state dict (``torch.save(model.state_dict(), path)``), read with
            ``weights_only=True`` so a file carrying pickled code is refused.
        num_classes: outputs of ``fc``; default 1000, or the number in a local file.

    Raises:
        WeightsUnavailableError: named weights could not be downloaded (offline).

    Example:
        >>> from probekit import zoo
        >>> model = zoo.resnet50(weights="checkpoints/resnet50.pth")
        >>> model.probe_layers[:3]
        ['input', 'layer1.0', 'layer1.1']
    """
    from torchvision import models

    state, classes = _fetch_weights(_weights_source(weights, models.ResNet50_Weights, "resnet50"), "resnet50", num_classes)
    model = models.resnet50(weights=None, num_classes=classes)
    if state is not None:
        _load_state(model, state, weights, "resnet50", classes)
    model.probe_layers = list(RESNET50_LAYERS)
    model.input_shape = RESNET50_INPUT
    model.pretrained = state is not None
    return model


def inception_v3(
    *,
    weights: str | os.PathLike | None = None,
    num_classes: int | None = None,
    aux_logits: bool = True,
    transform_input: bool | None = None,
) -> nn.Module:
    """torchvision's Inception v3, with random, downloaded or local weights.

    ``probe_layers`` are the paper's 17 points (:data:`INCEPTION_V3_LAYERS`):
    ``maxpool1``, ``Conv2d_3b_1x1``, ``maxpool2``, every ``Mixed_*`` block, the
    auxiliary head ``AuxLogits`` (only with ``aux_logits=True``; it runs in train
    mode only, which the engine handles), ``avgpool`` and ``fc``.
    :data:`INCEPTION_V3_EXTRAS` adds the input and the stem convolutions. The model
    expects 299 x 299 RGB; it runs from 75 px, but the auxiliary head needs about 299.

    Args:
        weights: None for random initialisation; ``"DEFAULT"`` or ``"IMAGENET1K_V1"``
            (or an ``Inception_V3_Weights`` member), downloaded on first use; or the
            path of a local state dict, read with ``weights_only=True``.
        num_classes: outputs of ``fc``; default 1000, or the number in a local file.
        aux_logits: keep the auxiliary classifier ``AuxLogits``.
        transform_input: re-normalise ImageNet-normalised inputs the way Google's
            original weights expect; default True with weights (as torchvision
            does), False for random initialisation.

    Raises:
        WeightsUnavailableError: named weights could not be downloaded (offline).

    Example:
        >>> from probekit import zoo
        >>> model = zoo.inception_v3(aux_logits=False)
        >>> model.probe_layers[:3]
        ['maxpool1', 'Conv2d_3b_1x1', 'maxpool2']
    """
    from torchvision import models

    check_params(_CONSTRAINTS, aux_logits=aux_logits, transform_input=transform_input)
    source = _weights_source(weights, models.Inception_V3_Weights, "inception_v3")
    state, classes = _fetch_weights(source, "inception_v3", num_classes)
    if transform_input is None:
        transform_input = state is not None
    if state is None:
        model = models.Inception3(num_classes=classes, aux_logits=aux_logits, transform_input=transform_input, init_weights=True)
    else:
        has_aux = any(key.startswith("AuxLogits.") for key in state)
        if aux_logits and not has_aux:
            raise ValueError(
                f"the weights in {_describe(weights)} have no auxiliary head (no AuxLogits.* entries); pass aux_logits=False"
            )
        model = models.Inception3(num_classes=classes, aux_logits=has_aux, transform_input=transform_input, init_weights=False)
        _load_state(model, state, weights, "inception_v3", classes)
        if not aux_logits and has_aux:
            model.aux_logits = False
            model.AuxLogits = None
    model.probe_layers = default_layers("inception_v3", aux_logits=aux_logits)
    model.input_shape = INCEPTION_V3_INPUT
    model.pretrained = state is not None
    return model


def _weights_source(weights: object, enum_class: type, arch: str):
    """What ``weights`` names: None (random init), a torchvision weights member, or a file path."""
    if weights is None or isinstance(weights, enum_class):
        return weights
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(
            f"weights must be None, a weights name, a {enum_class.__name__} member or a file path; got {type(weights).__name__}"
        )
    names = ["DEFAULT", *enum_class.__members__]
    if isinstance(weights, str) and weights in names:
        return enum_class.DEFAULT if weights == "DEFAULT" else enum_class[weights]
    path = Path(weights).expanduser()
    if path.is_file():
        return path
    if isinstance(weights, str) and not path.suffix and os.sep not in weights:
        raise ValueError(
            f"unknown weights {weights!r} for {arch}; use None (random), one of {choices([repr(n) for n in names])}, "
            "or the path of a saved state dict"
        )
    raise FileNotFoundError(f"weights file {str(path)!r} does not exist; pass the path of a state dict saved with torch.save")


def _fetch_weights(source, arch: str, num_classes: int | None) -> tuple[dict[str, torch.Tensor] | None, int]:
    """The state dict from ``source`` (None for random init) and the number of classes to build with."""
    check_params(_CONSTRAINTS, num_classes=num_classes)
    if source is None:
        return None, 1000 if num_classes is None else num_classes
    if isinstance(source, Path):
        state = read_state_dict(source)
        found = state["fc.weight"].shape[0] if "fc.weight" in state else 1000
        return state, found if num_classes is None else num_classes
    found = len(source.meta["categories"])
    if num_classes is not None and num_classes != found:
        raise ValueError(
            f"torchvision's {arch} ImageNet weights have {found} classes; got num_classes={num_classes}. "
            f"Build with num_classes={found} (or None) and replace model.fc to fine-tune"
        )
    return _download(source, arch), found


def _download(weights, arch: str) -> dict[str, torch.Tensor]:
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError) as error:  # URLError is an OSError; a bad hash a RuntimeError
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = f"{type(error).__name__}: {lines[-1][:200]}" if lines else type(error).__name__
        filename = Path(urlparse(weights.url).path).name
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise WeightsUnavailableError(
            f"could not download {arch} weights {weights} ({reason}); on a machine with network access run "
            f"torchvision.models.{arch}(weights='{weights.name}'), which saves {filename} under ~/.cache/torch/hub/checkpoints, "
            f"copy that file here and pass weights='path/to/{filename}' (or put it in {cache})"
        ) from error


def _describe(weights: object) -> str:
    return repr(str(weights)) if isinstance(weights, (str, os.PathLike)) else str(weights)


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], weights: object, arch: str, classes: int) -> None:
    load_state(model, state, source=_describe(weights), target=f"torchvision's {arch} built with num_classes={classes}",
               hint="they must come from the same architecture (pass num_classes= to match the file)")
