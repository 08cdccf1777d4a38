"""Building models by name: the zoo's registry, timm's and torchvision's models, and a user's own factory.

A model spec is a zoo name (:func:`available`), ``"timm:NAME"``,
``"torchvision:NAME"`` (:mod:`probekit.zoo.thirdparty`, random weights unless
asked) or ``"package.module:callable"``. :func:`resolve` turns a spec into its
factory, :func:`build` calls it, :func:`load_callable` imports a callable by
path without evaluating any code from the string, and :func:`parse_model_args`
reads ``key=value`` strings (the CLI's ``--model-arg``) into keyword
arguments. Errors are one line naming the spec. This module never imports the
data or the engine.
"""

from __future__ import annotations

import difflib
import functools
import importlib
from collections.abc import Callable, Sequence

from torch import nn

from probekit.params import choices
from probekit.zoo.paper import bypass_mlp, paper_convnet, residual_mlp
from probekit.zoo.thirdparty import LIBRARIES, check_name, timm_model, torchvision_model
from probekit.zoo.vision import inception_v3, resnet50

__all__ = ["available", "build", "is_library_spec", "load_callable", "parse_model_args", "parse_value", "resolve"]

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


def is_library_spec(spec: object) -> bool:
    """Whether ``spec`` names a timm or torchvision model (``"timm:NAME"``, ``"torchvision:NAME"``)."""
    return isinstance(spec, str) and spec.partition(":")[0] in LIBRARIES and ":" in spec


def resolve(spec: str, *, source: str | None = None) -> Callable[..., nn.Module]:
    """The factory a model spec names: a zoo builder, a timm or torchvision builder, or a user's callable.

    Library names are checked here (``"timm:resnet19"`` fails before any model is
    built); ``source`` says where the spec came from in errors (default: the
    spec itself, quoted; the CLI passes ``"--model SPEC"``).

    Example:
        >>> from probekit import zoo
        >>> zoo.resolve("timm:resnet18")(num_classes=10)
    """
    if not isinstance(spec, str):
        raise TypeError(f"name must be a model spec: a string (a zoo name, 'timm:NAME', 'torchvision:NAME' or "
                        f"'package.module:callable'); got {type(spec).__name__}")
    if is_library_spec(spec):
        library, _, name = spec.partition(":")
        if not name:
            raise ValueError(f"{source or repr(spec)} names no model; write {library}:NAME with {LIBRARIES[library]}")
        builder = timm_model if library == "timm" else torchvision_model
        check_name(library, name, source or repr(spec))
        return functools.partial(builder, name)
    if ":" in spec:
        return load_callable(spec, source=source)
    if spec not in _REGISTRY:
        close = difflib.get_close_matches(spec, _REGISTRY, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ValueError(
            f"unknown model {spec!r}; {hint}available: {choices(_REGISTRY)}, "
            "'timm:NAME', 'torchvision:NAME', or 'package.module:callable' for your own factory"
        )
    return _REGISTRY[spec]


def build(name: str, **kwargs) -> nn.Module:
    """Build a model from its spec: a zoo name, ``"timm:NAME"``, ``"torchvision:NAME"`` or ``"package.module:callable"``.

    Args:
        name: one of :func:`available`, a library spec, or a spec for :func:`load_callable`.
        **kwargs: keyword arguments of the model's factory.

    Example:
        >>> from probekit import zoo
        >>> model = zoo.build("bypass_mlp", depth=32, skip=(0, 16))
        >>> model = zoo.build("timm:vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8)
        >>> model = zoo.build("mypackage.models:make_net", width=64)
    """
    return resolve(name)(**kwargs)


def parse_value(text: str) -> object:
    """A ``--model-arg`` value: an int, float, bool (true/false), None (none/null) or else the string itself.

    Example:
        >>> [parse_value(v) for v in ("3", "0.5", "True", "none", "gelu")]
        [3, 0.5, True, None, 'gelu']
    """
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_model_args(items: Sequence[str] | None, *, flag: str = "--model-arg") -> dict[str, object]:
    """Keyword arguments from ``key=value`` strings, each value read by :func:`parse_value`.

    Example:
        >>> parse_model_args(["img_size=32", "patch_size=8", "pretrained=false"])
        {'img_size': 32, 'patch_size': 8, 'pretrained': False}
    """
    kwargs: dict[str, object] = {}
    for item in items or ():
        key, equals, value = str(item).partition("=")
        key = key.strip()
        if not equals or not key.isidentifier():
            raise ValueError(f"{flag} takes key=value with a Python identifier for key (e.g. {flag} img_size=32); got {item!r}")
        if key in kwargs:
            raise ValueError(f"{flag} {key} is given twice; give each argument once")
        kwargs[key] = parse_value(value)
    return kwargs


def load_callable(spec: str, *, source: str | None = None) -> Callable:
    """Import a callable from a ``"package.module:attribute"`` spec (no code is evaluated from the string).

    The module is imported with :func:`importlib.import_module` and the attribute
    (which may be dotted, ``"module:Class.method"``) looked up on it.

    Args:
        spec: ``"package.module:callable"``.
        source: where the spec came from, for errors (default: the spec, quoted).

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
    where = source or repr(spec)
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"cannot import module {module_name!r} for {where}: {error}; check the spelling or pip install it "
            "(a module of your own must be on sys.path)"
        ) from error
    for part in attribute.split("."):
        if not hasattr(target, part):
            public = [n for n in dir(target) if not n.startswith("_")]
            close = difflib.get_close_matches(part, public, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else "; check the spelling"
            raise AttributeError(
                f"{type(target).__name__} {getattr(target, '__name__', '')!r} has no attribute {part!r} for {where}{hint}"
            )
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{where} names a {type(target).__name__}, not a callable; point it at a function or class that builds the model")
    return target
