"""Imports a script of ``examples/`` as a module, for the quick-mode example tests."""

import importlib
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str):
    """``examples/<name>.py`` as a module; its sibling helpers (``_common``, ...) import too.

    The folder stays on ``sys.path`` because the examples import their helpers
    lazily as well as at the top; importing through ``sys.modules`` also gives
    flax's dataclasses the module they look up.
    """
    if str(EXAMPLES) not in sys.path:
        sys.path.insert(0, str(EXAMPLES))
    return importlib.import_module(name)
