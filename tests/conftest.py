"""Shared test set-up: 8 host CPU devices (set before jax is imported) and fixtures."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(params=["eager", "jit"])
def transform(request):
    """Runs a function as is or under jax.jit (static keyword options closed over)."""
    if request.param == "eager":
        return lambda f: f
    return jax.jit


@pytest.fixture
def x64():
    """Enables float64 in JAX for the duration of one test."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    yield
    jax.config.update("jax_enable_x64", previous)
