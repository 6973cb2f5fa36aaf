"""Flax linen layers of jaxnorm, one concept per file; :mod:`jaxnorm.linen` re-exports them."""
