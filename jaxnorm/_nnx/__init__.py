"""Flax NNX layers of jaxnorm, one concept per file; :mod:`jaxnorm.nnx` re-exports them."""
