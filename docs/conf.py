"""Sphinx configuration for torchnmf's documentation (``sphinx-build -W -b html docs docs/_build/html``)."""
import os
import sys

sys.path.insert(0, os.path.abspath(".."))

import torchnmf  # noqa: E402

project = "torchnmf"
author = "torchnmf developers"
copyright = "torchnmf developers, MIT license"
release = torchnmf.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",
]

# numpy-style docstrings everywhere
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
napoleon_use_ivar = True

autodoc_default_options = {
    "members": True,
    "undoc-members": False,
    "show-inheritance": True,
    "member-order": "bysource",
}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_inherit_docstrings = False

nitpicky = False

templates_path = []
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = []
html_theme_options = {"description": "Non-negative and Poisson matrix factorization for PyTorch"}


def _skip_sklearn_generated(app, what, name, obj, skip, options):
    # scikit-learn generates set_{fit,transform,...}_request methods whose docstrings
    # refer to its own glossary; they are documented in scikit-learn.
    if name.startswith("set_") and name.endswith("_request"):
        return True
    return None


def setup(app):
    app.connect("autodoc-skip-member", _skip_sklearn_generated)
