"""aloe-jax: align language models with an individual user through conversation, in JAX."""

__version__ = "0.1.0"
