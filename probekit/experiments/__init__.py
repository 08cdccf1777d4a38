"""The paper's experiments, reproduced end to end on embedded data.

:func:`reproduce` runs one of :data:`REPRODUCTIONS` through the library's public
API and returns a :class:`Reproduction` (its runs, figures and findings); each
experiment is its own module (``mnist_convnet``, ``bypass``, ``resnet_vs_inception``,
``random_init``) on the shared steps of :mod:`~probekit.experiments.reproduction`.
The command line for them lives in :mod:`probekit.cli`: nothing here imports argparse.
"""

from probekit.experiments.reproduction import Reproduction
from probekit.experiments.reproductions import REPRODUCTIONS, reproduce

__all__ = ["REPRODUCTIONS", "Reproduction", "reproduce"]
