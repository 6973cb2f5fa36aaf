"""Every public function and class of the four public modules shows a runnable example.

tests/test_docstrings.py runs the examples (doctest over every module); this
file checks that each name of `jaxnorm`, `jaxnorm.linen`, `jaxnorm.nnx` and
`jaxnorm.interop.__all__` has one, so an API page never lacks it. State types
(NamedTuples: their fields are the documentation) are exempt.
"""

import importlib

import pytest

MODULES = ("jaxnorm", "jaxnorm.linen", "jaxnorm.nnx", "jaxnorm.interop")


def _is_state_type(obj) -> bool:
    return isinstance(obj, type) and issubclass(obj, tuple) and hasattr(obj, "_fields")


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_has_an_example(module_name):
    module = importlib.import_module(module_name)
    missing = [
        name for name in module.__all__
        if callable(obj := getattr(module, name)) and not _is_state_type(obj) and ">>>" not in (obj.__doc__ or "")
    ]
    assert not missing, f"{module_name}: no `>>>` example in the docstring of {missing}"
