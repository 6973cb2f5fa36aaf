"""Sphinx configuration of the jaxnorm documentation.

Why Sphinx + MyST + autodoc/autosummary (and not mkdocs-material + mkdocstrings):
jax, flax and optax, the libraries jaxnorm sits next to, build their docs this
way, so a reader finds the same layout and a contributor the same tools; the
docstrings are Google style with ``>>>`` examples, which napoleon renders and
doctest runs; and Sphinx resolves every internal reference itself, so ``-W``
turns a broken link or a missing page into a failed build. The theme is furo:
one pip package, no JavaScript framework or web fonts fetched at view time, so
the site renders offline.

Offline build: no intersphinx (it would fetch other projects' inventories), no
remote images; ``make docs`` runs ``sphinx-build -W`` (warnings are errors).
The API pages and the gallery are generated at every build by ``_ext/jaxnorm_docs.py``
from each public module's ``__all__`` and the committed results files.
"""

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))  # this checkout's jaxnorm, not an installed one
sys.path.insert(0, str(DOCS / "_ext"))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jaxnorm  # noqa: E402

project = "jaxnorm"
author = "the jaxnorm authors"
copyright = "the jaxnorm authors; Apache-2.0"
release = jaxnorm.__version__
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "jaxnorm_docs",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build", "README.md", "**/README.md", "_generated/*", "Thumbs.db", ".DS_Store"]

myst_enable_extensions = ["colon_fence", "substitution"]
# A guide written on another branch is linked once it exists, so this build never points at a missing page.
_MULTI = DOCS / "guides" / "multi_process.md"
myst_substitutions = {
    "multi_process_link": (
        "see [the multi-process guide](multi_process.md)." if _MULTI.exists()
        else "call `jax.distributed.initialize()` on every host, build the mesh over `jax.devices()` "
        "(all hosts' devices) and run the same program on every host, each feeding its local slice "
        "(`jax.make_array_from_process_local_data`); nothing in jaxnorm changes."
    ),
}
myst_heading_anchors = 3

autosummary_generate = False  # the pages are written by jaxnorm_docs from __all__
autodoc_typehints = "none"  # the Args sections give the types; flax's dataclass signatures are long
autodoc_member_order = "bysource"
autodoc_default_options = {"exclude-members": "__weakref__"}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # Attributes sections as fields, not a second description of NamedTuple fields

html_theme = "furo"
html_title = f"jaxnorm {release}"
html_static_path = []
suppress_warnings = []
