"""Models from timm and torchvision by name: the ``"timm:NAME"`` and ``"torchvision:NAME"`` specs.

:func:`timm_model` builds ``timm.create_model(NAME, pretrained=False, ...)`` and
:func:`torchvision_model` ``torchvision.models.get_model(NAME, weights=None, ...)``:
random weights unless weights are asked for explicitly (``pretrained=True``, a
weights name, or a local state dict read by :mod:`probekit.engine.checkpoints`).
Unknown names are one line with the closest matches. These models carry no
``probe_layers``: the engine's defaults (every block of a repeated-block
container) apply. timm is imported only when a ``timm:`` model is built. This
module never imports the data.
"""

from __future__ import annotations

import difflib
import importlib
import os
from pathlib import Path

from torch import nn

from probekit.engine.checkpoints import load_state, read_state_dict

__all__ = ["LIBRARIES", "check_name", "timm_model", "torchvision_model"]

#: The spec prefixes this module builds, and what each names.
LIBRARIES = {
    "timm": "a timm model name (timm.list_models())",
    "torchvision": "a torchvision model name (torchvision.models.list_models())",
}


def _library(library: str, source: str):
    try:
        return importlib.import_module("timm" if library == "timm" else "torchvision.models")
    except ImportError as error:
        raise ImportError(f"cannot import module {library!r} for {source}: {error}; pip install {library}") from error


def check_name(library: str, name: str, source: str) -> None:
    """One line naming ``source`` when ``library`` ("timm" or "torchvision") is missing or has no model ``name``.

    Example:
        >>> check_name("timm", "resnet19", "--model timm:resnet19")
        Traceback (most recent call last):
        ValueError: unknown timm model 'resnet19' in --model timm:resnet19; did you mean 'resnet18', ...
    """
    module = _library(library, source)
    known = isinstance(name, str) and (module.is_model(name) if library == "timm" else name.lower() in module.list_models())
    if not known:
        close = difflib.get_close_matches(str(name), module.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(repr(c) for c in close)}? " if close else ""
        listing = "timm.list_models()" if library == "timm" else "torchvision.models.list_models()"
        raise ValueError(f"unknown {library} model {name!r} in {source}; {hint}see {listing} for the names")


def _local_weights(weights: object) -> Path | None:
    """The path of a local state dict named by ``weights``, or None when it names none."""
    if isinstance(weights, os.PathLike) or (isinstance(weights, str) and (os.sep in weights or Path(weights).suffix)):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"weights file {str(path)!r} does not exist; pass the path of a state dict saved with torch.save")
        return path
    return None


def _load_local(model: nn.Module, path: Path, target: str) -> nn.Module:
    load_state(model, read_state_dict(path), source=repr(str(path)), target=target)
    return model


def timm_model(name: str, *, num_classes: int | None = None, pretrained: bool = False,
               weights: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)``, random weights by default.

    Args:
        name: a timm model name, with an optional pretrained tag (``"resnet18"``, ``"resnet18.a1_in1k"``).
        num_classes: outputs of the head; None keeps timm's default.
        pretrained: download timm's weights (needs the network; never the default).
        weights: the path of a local state dict for the model as built.
        **kwargs: any argument of the model (``in_chans=1``, ``img_size=32``, ``patch_size=8``).

    Example:
        >>> from probekit import zoo
        >>> model = zoo.timm_model("vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8)
    """
    spec = f"timm:{name}"
    check_name("timm", name, repr(spec))
    timm = _library("timm", repr(spec))
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    path = _local_weights(weights)
    if weights is not None and path is None:
        raise ValueError(f"weights for {spec} is the path of a local state dict; for timm's own weights pass pretrained=True")
    model = _create(lambda: timm.create_model(name, pretrained=bool(pretrained), **kwargs), spec, bool(pretrained))
    return _load_local(model, path, f"{spec} as built") if path else model


def torchvision_model(name: str, *, num_classes: int | None = None, pretrained: bool = False,
                      weights: str | os.PathLike | None = None, **kwargs) -> nn.Module:
    """``torchvision.models.get_model(name, weights=weights, num_classes=num_classes, **kwargs)``, random weights by default.

    Args:
        name: a torchvision model name (``"resnet18"``, ``"vit_b_16"``).
        num_classes: outputs of the head; None keeps torchvision's default.
        pretrained: download the ``"DEFAULT"`` weights (needs the network; never the default).
        weights: a torchvision weights name (``"IMAGENET1K_V1"``, downloaded), or the path of a local state dict.
        **kwargs: any argument of the model's builder.

    Example:
        >>> from probekit import zoo
        >>> model = zoo.torchvision_model("resnet18", num_classes=10)
    """
    spec = f"torchvision:{name}"
    check_name("torchvision", name, repr(spec))
    models = _library("torchvision", repr(spec))
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    path = _local_weights(weights)
    named = "DEFAULT" if pretrained and weights is None else (None if path else weights)
    model = _create(lambda: models.get_model(name, weights=named, **kwargs), spec, named is not None)
    return _load_local(model, path, f"{spec} as built") if path else model


def _create(build, spec: str, downloads: bool) -> nn.Module:
    """Run ``build``; a failed download (offline) becomes one line saying how to do without it."""
    if not downloads:
        return build()
    try:
        return build()
    except (TypeError, ValueError):
        raise
    except Exception as error:  # the hubs' clients raise many types (OSError, HTTP, hub errors) when offline
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise RuntimeError(
            f"could not fetch the pretrained weights of {spec} ({reason}); connect to the network, "
            "or pass weights='path/to/state_dict.pth' saved on a machine that has them"
        ) from error
