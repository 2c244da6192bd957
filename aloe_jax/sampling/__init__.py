"""Batched KV-cache generation (greedy, temperature, top-k, top-p) and scoring of candidate continuations."""

from aloe_jax.sampling.sampler import Generation, Sampler, SamplingParams
from aloe_jax.sampling.scoring import score_options

__all__ = ["Generation", "Sampler", "SamplingParams", "score_options"]
