"""Implementation modules of jaxnorm; import the public names from ``jaxnorm``."""
