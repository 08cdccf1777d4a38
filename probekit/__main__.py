"""``python -m probekit``: the ``probekit`` command (:func:`probekit.cli.main`), also under ``torchrun -m probekit``.

This module only starts the command line; it imports nothing but :mod:`probekit.cli`.
"""

import sys

from probekit.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
