"""Building models by name: the zoo's registry, and a user's own factory from a ``"package.module:callable"`` spec.

:func:`available` lists the names :func:`build` accepts; :func:`load_callable`
imports a callable by path without evaluating any code from the string. This
module never imports the data or the engine.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable

from torch import nn

from probekit.params import choices
from probekit.zoo.paper import bypass_mlp, paper_convnet, residual_mlp
from probekit.zoo.vision import inception_v3, resnet50

__all__ = ["available", "build", "load_callable"]

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "paper_convnet": paper_convnet,
    "bypass_mlp": bypass_mlp,
    "residual_mlp": residual_mlp,
    "resnet50": resnet50,
    "inception_v3": inception_v3,
}


def available() -> list[str]:
    """Names :func:`build` accepts.

    Example:
        >>> from probekit import zoo
        >>> zoo.available()
        ['paper_convnet', 'bypass_mlp', 'residual_mlp', 'resnet50', 'inception_v3']
    """
    return list(_REGISTRY)


def build(name: str, **kwargs) -> nn.Module:
    """Build a zoo model by name, or a user's model from a ``"package.module:callable"`` spec.

    Args:
        name: one of :func:`available`, or a spec for :func:`load_callable`.
        **kwargs: keyword arguments of the model's factory.

    Example:
        >>> from probekit import zoo
        >>> model = zoo.build("bypass_mlp", depth=32, skip=(0, 16))
        >>> model = zoo.build("mypackage.models:make_net", width=64)
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a model name (see probekit.zoo.available()); got {type(name).__name__}")
    if ":" in name:
        return load_callable(name)(**kwargs)
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown model {name!r}; {hint}available: {choices(_REGISTRY)}, "
            "or 'package.module:callable' for your own factory"
        )
    return _REGISTRY[name](**kwargs)


def load_callable(spec: str) -> Callable:
    """Import a callable from a ``"package.module:attribute"`` spec (no code is evaluated from the string).

    The module is imported with :func:`importlib.import_module` and the attribute
    (which may be dotted, ``"module:Class.method"``) looked up on it.

    Args:
        spec: ``"package.module:callable"``.

    Example:
        >>> from probekit import zoo
        >>> make = zoo.load_callable("torchvision.models:resnet18")
        >>> model = make(num_classes=10)
    """
    if not isinstance(spec, str):
        raise TypeError(f"spec must be a string 'package.module:callable'; got {type(spec).__name__}")
    module_name, colon, attribute = spec.partition(":")
    parts = module_name.split(".") + attribute.split(".")
    if not colon or not all(part.isidentifier() for part in parts):
        raise ValueError(
            f"a callable is named 'package.module:callable' (e.g. 'torchvision.models:resnet18'); got {spec!r}"
        )
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"could not import module {module_name!r} named in {spec!r} ({type(error).__name__}: {error}); "
            "check that it is installed or on sys.path"
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise AttributeError(f"{spec!r}: {type(target).__name__} {getattr(target, '__name__', '')!r} has no attribute {part!r}")
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{spec!r} names a {type(target).__name__}, not a callable; point it at a function or class that builds the model")
    return target
