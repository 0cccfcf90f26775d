"""Sphinx configuration of the adrpo_jax documentation.

Build: ``bash scripts/check_docs.sh`` (builds with warnings as errors, runs the doctests, serves the site and
checks it in headless Chromium), or only the HTML::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

Pages are Markdown (MyST) with ``$...$`` / ``$$...$$`` math; the API reference is generated from the
docstrings (autodoc + autosummary, Google-style sections through napoleon); the configuration reference from
the config modules (``docs/_ext/config_reference.py``). Nothing here imports jax at configuration time.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent
sys.path.insert(0, str(REPO))  # the checkout's adrpo_jax (also without an editable install)
sys.path.insert(0, str(DOCS / "_ext"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # autodoc imports the package: never probe for accelerators

import adrpo_jax  # noqa: E402  (imports no jax: only the version)

project = "adrpo_jax"
author = "the adrpo_jax authors"
copyright = "the adrpo_jax authors"
release = adrpo_jax.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.doctest",
    "sphinx_copybutton",
    "config_reference",
    "docstring_baseline",
]
templates_path = ["_templates"]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]
nitpicky = False

# -- MyST ------------------------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence", "deflist", "attrs_inline"]
myst_heading_anchors = 3
myst_dmath_double_inline = True

# -- autodoc / autosummary / napoleon ----------------------------------------------------------------------------
autosummary_generate = True
autosummary_imported_members = False
autodoc_default_options = {"members": True, "show-inheritance": True, "member-order": "bysource"}
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = False  # True trips on some keyword-only signatures
autodoc_mock_imports: list[str] = []
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True

# -- doctest (``python -m sphinx -b doctest``): the pages' examples run against the installed package ------------
doctest_global_setup = """
import os
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import numpy as np
"""
doctest_default_flags = (
    __import__("doctest").ELLIPSIS
    | __import__("doctest").NORMALIZE_WHITESPACE
    | __import__("doctest").DONT_ACCEPT_TRUE_FOR_1
)
doctest_test_doctest_blocks = ""  # only explicit ``{doctest}`` / ``{testcode}`` blocks run; docstrings: pytest

# -- math: MathJax 3 served from the site itself when the docs extra is installed (offline sites render math) ----


def _local_mathjax() -> Path | None:
    """The es5 build of MathJax 3 shipped by the ``django-static-mathjax`` wheel (static files only)."""
    spec = importlib.util.find_spec("mathjax")
    for location in (spec.submodule_search_locations or []) if spec else []:
        es5 = Path(location) / "static" / "mathjax" / "es5"
        if (es5 / "tex-chtml.js").is_file():
            return es5
    return None


_MATHJAX_STAGE = DOCS / "_build" / "_mathjax_static"
_es5 = _local_mathjax()
if _es5 is not None:
    target = _MATHJAX_STAGE / "mathjax"
    if not (target / "tex-chtml.js").is_file():
        (target / "output" / "chtml").mkdir(parents=True, exist_ok=True)
        shutil.copy2(_es5 / "tex-chtml.js", target / "tex-chtml.js")
        shutil.copytree(_es5 / "output" / "chtml" / "fonts", target / "output" / "chtml" / "fonts", dirs_exist_ok=True)
    mathjax_path = "mathjax/tex-chtml.js"
# else: Sphinx's default (MathJax 3 from a CDN)

# -- HTML ------------------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"adrpo_jax {release}"
html_static_path = ["_static"] + ([str(_MATHJAX_STAGE)] if _es5 is not None else [])
html_show_sourcelink = False
html_css_files = ["custom.css"]
html_theme_options = {"navigation_with_keys": True}
copybutton_prompt_text = r">>> |\.\.\. |\$ "
copybutton_prompt_is_regexp = True

# -- configuration reference (docs/_ext/config_reference.py) ---------------------------------------------------
config_reference_strict = False  # True: a key without a documented meaning is a build warning (-W: an error)


# -- pages written by others that may not exist yet: listed in index.md's toctree once they do -------------------
OPTIONAL_PAGES = ("architecture",)


def _drop_missing_optional_pages(app, docname, source):
    if docname == "index":
        for page in OPTIONAL_PAGES:
            if not (DOCS / f"{page}.md").exists():
                source[0] = source[0].replace(f"\n{page}\n", "\n")


def setup(app):
    app.connect("source-read", _drop_missing_optional_pages)
