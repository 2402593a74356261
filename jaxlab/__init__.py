"""jaxlab: LIMIT, DeepConf and Writing-Zero on accelerators, in JAX and Flax NNX."""

__version__ = "0.1.0"
