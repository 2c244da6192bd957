"""Attention masks and positions. The decoder takes an explicit boolean mask `[batch, query, key]` so that padding,
cached decoding and tree-packed sequences (a side branch seeing the spine up to its branch point) share one path."""

from __future__ import annotations

import jax.numpy as jnp


def positions_from_valid(valid: jnp.ndarray) -> jnp.ndarray:
    """Position ids `[batch, seq]` counting only valid tokens (0 on and before the first one): left or right padding."""
    return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), axis=-1) - 1, 0)


def causal_mask(valid: jnp.ndarray) -> jnp.ndarray:
    """`[batch, seq, seq]`: query i sees key j when j ≤ i and key j is a real token."""
    seq = valid.shape[-1]
    lower = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    return lower[None] & valid[:, None, :].astype(bool)


def cached_mask(kv_valid: jnp.ndarray, start: jnp.ndarray | int, num_queries: int) -> jnp.ndarray:
    """`[batch, num_queries, cache_len]` for queries written at cache slots start..start+num_queries-1: each sees the
    valid slots at or before its own."""
    cache_len = kv_valid.shape[-1]
    query_slots = start + jnp.arange(num_queries)
    visible = jnp.arange(cache_len)[None, :] <= query_slots[:, None]  # [T, S]
    return visible[None] & kv_valid[:, None, :].astype(bool)
