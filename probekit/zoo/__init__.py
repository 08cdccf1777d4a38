"""Models from the paper and from torchvision, each carrying its default probe points.

Every model built here has the attributes the rest of the kit reads:

- ``probe_layers`` (list of str): the probe points used when ``layers=`` is not
  given. Names are those :class:`probekit.engine.points.LayerGraph` understands:
  ``"input"`` for the model's input, otherwise module paths (``"conv1"``,
  ``"layers.63"``, ``"layer3.2"``, ``"Mixed_6a"``).
- ``input_shape`` (C, H, W), where the model expects a fixed image size, and
  ``pretrained`` (bool): the model declares its input, so that
  :func:`probekit.data.load` and :func:`probekit.data.transforms_for` can fit a
  dataset to it without knowing any model by name.

- :mod:`~probekit.zoo.paper`: :func:`paper_convnet` (its MNIST convnet), :func:`bypass_mlp`
  (128 dense layers with one long skip connection: the "dead segment" example) and
  :func:`residual_mlp` (a healthy control with a skip in every block);
- :mod:`~probekit.zoo.vision`: torchvision's :func:`resnet50` and :func:`inception_v3`,
  with random, downloaded or local weights (read by :mod:`probekit.engine.checkpoints`),
  and :func:`default_layers`;
- :mod:`~probekit.zoo.thirdparty`: :func:`timm_model` and :func:`torchvision_model`, any model
  of timm or torchvision by name, random weights unless asked for; these carry no
  ``probe_layers`` (the engine's defaults apply: every block of a repeated-block container);
- :mod:`~probekit.zoo.registry`: :func:`build` makes any of them from a spec (a zoo name,
  ``"timm:NAME"``, ``"torchvision:NAME"``); :func:`load_callable` imports a user's own model
  factory from a ``"package.module:callable"`` spec; :func:`parse_model_args` reads ``key=value``
  strings (the CLI's ``--model-arg``).

The zoo never imports :mod:`probekit.data`.
"""

from probekit.zoo.paper import ACTIVATIONS, BypassMLP, ResidualMLP, bypass_mlp, paper_convnet, residual_mlp
from probekit.zoo.registry import available, build, is_library_spec, load_callable, parse_model_args, parse_value, resolve
from probekit.zoo.thirdparty import timm_model, torchvision_model
from probekit.zoo.vision import (
    INCEPTION_V3_EXTRAS,
    INCEPTION_V3_INPUT,
    INCEPTION_V3_LAYERS,
    RESNET50_EXTRAS,
    RESNET50_INPUT,
    RESNET50_LAYERS,
    WeightsUnavailableError,
    default_layers,
    inception_v3,
    resnet50,
)

__all__ = [
    "ACTIVATIONS",
    "INCEPTION_V3_EXTRAS",
    "INCEPTION_V3_INPUT",
    "INCEPTION_V3_LAYERS",
    "RESNET50_EXTRAS",
    "RESNET50_INPUT",
    "RESNET50_LAYERS",
    "BypassMLP",
    "ResidualMLP",
    "WeightsUnavailableError",
    "available",
    "build",
    "bypass_mlp",
    "default_layers",
    "inception_v3",
    "is_library_spec",
    "load_callable",
    "paper_convnet",
    "parse_model_args",
    "parse_value",
    "residual_mlp",
    "resnet50",
    "resolve",
    "timm_model",
    "torchvision_model",
]
