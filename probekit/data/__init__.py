"""Datasets for probing: the embedded digits, torchvision datasets and image folders.

Every loader returns a :class:`Splits`: ``train``, ``valid`` and ``test`` data plus a
:class:`DatasetInfo` that says what one example looks like (channels, size,
classes, class names) and how it was normalised. The probing engine reads
``Splits`` directly.

- :mod:`~probekit.data.splits`: :class:`DatasetInfo`, :class:`Splits`, the stratified order;
- :mod:`~probekit.data.embedded`: :func:`digits`, 1,797 handwritten 8x8 digits embedded in
  scikit-learn, nothing to download: the default for examples, workshops and tests;
- :mod:`~probekit.data.named`: :func:`load` and :func:`dataset_info` for MNIST,
  Fashion-MNIST, CIFAR-10, Imagenette or any folder in ImageNet layout, through torchvision;
- :mod:`~probekit.data.downloads`: failed downloads raise one clear error and leave nothing behind;
- :mod:`~probekit.data.transforms`: :func:`transforms_for`, which fits a dataset to a
  model that declares its ``input_shape`` (resize, replicate a grey channel, normalise).

Validation data never comes from the official test split: it is carved from the
training data with a fixed seed, stratified by class. ``data`` knows no model:
it never imports :mod:`probekit.zoo` or the engine.
"""

from probekit.data.embedded import digits
from probekit.data.downloads import DatasetUnavailableError
from probekit.data.named import DATASETS, dataset_info, load
from probekit.data.splits import DatasetInfo, Splits
from probekit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, transforms_for

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DatasetInfo",
    "DatasetUnavailableError",
    "Splits",
    "dataset_info",
    "digits",
    "load",
    "transforms_for",
]
