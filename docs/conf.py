"""Sphinx configuration of the tokencomp documentation (built offline, warnings are errors in CI)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "_ext"))

import tokencomp  # noqa: E402

project = "tokencomp"
author = "the tokencomp developers"
copyright = "2026, the tokencomp developers"
release = version = tokencomp.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "tokencomp_docs",  # docs/_ext: the strategy pages and table, generated from the registry
]

# numpy-style docstrings everywhere
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "none"  # the numpy docstrings state the types
autodoc_default_options = {"members": True, "show-inheritance": False}

exclude_patterns = ["_build", "performance_figures.rst"]
templates_path: list[str] = []
html_theme = "furo"
html_title = f"tokencomp {release}"
html_static_path = ["_static"]
