"""The paper's experiments, reproduced end to end on embedded data.

:func:`reproduce` runs one of :data:`REPRODUCTIONS` through the library's public
API and returns a :class:`Reproduction` (its runs, figures and findings). The
command line for them lives in :mod:`probekit.cli`.
"""

from probekit.experiments.reproductions import REPRODUCTIONS, Reproduction, reproduce

__all__ = ["REPRODUCTIONS", "Reproduction", "reproduce"]
