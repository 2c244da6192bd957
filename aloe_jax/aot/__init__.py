"""Ahead-of-time compilation of a run's programs for a TPU topology on a machine without TPUs (`aloe-jax compile`)."""
