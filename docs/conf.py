"""Sphinx configuration of probekit's docs site: ``make docs`` builds it into ``build/docs/html``.

The site is the Markdown guides of ``docs/`` (MyST), the notebooks of
``notebooks/`` (rendered by myst-nb as stored, never executed: ``docs/notebooks``
links to them) and an API reference generated from the docstrings of
``probekit.__all__`` and of the trainer integrations (``docs/_ext/apiref.py``),
which imports Lightning and transformers. The build needs no network: no
intersphinx, no notebook execution, a theme whose assets ship with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# Document this checkout's probekit, whatever is installed, and load the API reference's directives.
sys.path[:0] = [str(DOCS.parent), str(DOCS / "_ext")]

import probekit  # noqa: E402

project = "probekit"
author = "probekit developers"
copyright = "probekit developers"
release = version = probekit.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "apiref",
]

root_doc = "index"
exclude_patterns = ["_build", "_ext", ".ipynb_checkpoints", "notebooks/.ipynb_checkpoints"]

# MyST: the guides are plain Markdown; headings get anchors so that pages can link to sections.
myst_enable_extensions = ["colon_fence"]
myst_heading_anchors = 3
# Notebooks are stored without outputs and show the code as written: never run at build time.
nb_execution_mode = "off"

# Docstrings are Google style (Args:, Returns:, Example:).
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autosummary_generate = False
python_use_unqualified_type_names = True

html_theme = "pydata_sphinx_theme"
html_title = f"probekit {release}"
html_theme_options = {
    "navigation_with_keys": False,
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
}
html_static_path: list[str] = []
