"""tfd_jax: the course "Transformers for Absolute Dummies", chapter by chapter, in JAX and Flax NNX."""
__version__ = "0.1.0"
