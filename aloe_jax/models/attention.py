"""Attention kernels of the decoder: dense (materialised `[T, S]` logits) and blockwise (flash-style: online softmax
over key blocks, the tree mask built per block from per-token segments, never the whole `[T, S]` matrix).

Both take grouped-query inputs — q `[B, T, H, hd]`, keys and values heads-major `[B, K, S, hd]` (H = K·G query heads,
consecutive groups of G per KV head) — and share the numerics of jax.nn.dot_product_attention: fp32 logits and
softmax, masked logits set to a large finite negative so that a query that sees nothing stays finite.

The blockwise kernel is a `jax.custom_vjp`: the forward keeps only the output and the per-query log-sum-exp, the
backward recomputes each block's probabilities (FlashAttention-2's recurrences), so memory is linear in T for both.
Block pairs that the causal order hides entirely (a key block after the query block) are skipped: loops over key
blocks run only up to the diagonal.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

LARGE_NEGATIVE = -0.7 * float(jnp.finfo(jnp.float32).max)


class TreeMask(NamedTuple):
    """The attention mask of packed rows, given per token (`[B, T]` int32 each) rather than as `[B, T, T]`:
    `segment` 0 spine, n the n-th side branch, -1 padding; `visible_prefix` how many spine tokens a branch token
    sees. Query i sees key j when j ≤ i, key j is real, and j is in i's own segment or in the spine before i's
    branch point (see aloe_jax/train/inputs/packing.py for the layout)."""

    segment: jax.Array
    visible_prefix: jax.Array


def tree_mask_block(q_index, q_segment, q_prefix, k_index, k_segment) -> jax.Array:
    """`[B, Tq, Tk]` bool visibility of keys at indices `k_index` `[Tk]` for queries at `q_index` `[Tq]`, from
    the queries' segments/prefixes `[B, Tq]` and the keys' segments `[B, Tk]`."""
    causal = k_index[None, :] <= q_index[:, None]  # [Tq, Tk]
    k_seg = k_segment[:, None, :]
    same_segment = q_segment[:, :, None] == k_seg
    spine_before_branch = (k_seg == 0) & (k_index[None, None, :] < q_prefix[:, :, None])
    return causal[None] & (k_seg >= 0) & (same_segment | spine_before_branch)


def dense_tree_mask(mask: TreeMask) -> jax.Array:
    """The whole `[B, T, T]` bool mask of a TreeMask."""
    index = jnp.arange(mask.segment.shape[-1])
    return tree_mask_block(index, mask.segment, mask.visible_prefix, index, mask.segment)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """q `[B, T, H, hd]`, k and v `[B, K, S, hd]`, mask `[B, T, S]` bool → `[B, T, H, hd]`.

    The H = K·G query heads are grouped per KV head, so each (row, KV head) is one `[G·T, hd] x [hd, S]` product
    and a KV cache is never copied."""
    b, t, h, hd = q.shape
    kv = k.shape[1]
    g = h // kv
    scale = jnp.float32(hd**-0.5)
    if t == 1:  # decode: one query per row; the 5-d einsum (see benchmarks/sampling.py)
        qg = q.reshape(b, t, kv, g, hd)
        logits = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
        logits = jnp.where(mask[:, None, None], logits, LARGE_NEGATIVE)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(b, t, h, hd)
    # Queries as [B, K, G·T, hd] (a small copy) so that both products are plain batched matmuls over (row, KV head);
    # as one 5-d einsum, XLA on CPU copied and transposed the [.., T, S] logits of every layer several times.
    qg = q.reshape(b, t, kv, g, hd).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, hd)
    logits = jnp.einsum("bkqd,bksd->bkqs", qg, k, preferred_element_type=jnp.float32) * scale
    visible = jnp.broadcast_to(mask[:, None], (b, g, t, mask.shape[-1])).reshape(b, 1, g * t, mask.shape[-1])
    logits = jnp.where(visible, logits, LARGE_NEGATIVE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, v)  # [B, K, G·T, hd]
    return out.reshape(b, kv, g, t, hd).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd)


# ---- blockwise ------------------------------------------------------------------------------------------------
# Internally blocks lead: queries [n, B, K, G, bs, hd], keys/values [n, B, K, bs, hd], segments [n, B, bs].


def _to_blocks(q, k, v, mask: TreeMask, block: int):
    b, t, h, hd = q.shape
    kv = k.shape[1]
    n = t // block
    qb = q.reshape(b, n, block, kv, h // kv, hd).transpose(1, 0, 3, 4, 2, 5)
    kb = k.reshape(b, kv, n, block, hd).transpose(2, 0, 1, 3, 4)
    vb = v.reshape(b, kv, n, block, hd).transpose(2, 0, 1, 3, 4)
    seg = mask.segment.reshape(b, n, block).swapaxes(0, 1)
    pre = mask.visible_prefix.reshape(b, n, block).swapaxes(0, 1)
    return qb, kb, vb, seg, pre


def _block_logits(q_i, k_j, i, j, seg, pre, block, scale):
    """Masked fp32 logits `[B, K, G, bs, bs]` of query block i against key block j."""
    index = jnp.arange(block)
    visible = tree_mask_block(i * block + index, seg[i], pre[i], j * block + index, seg[j])
    logits = jnp.einsum("bkgqd,bksd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32) * scale
    return jnp.where(visible[:, None, None], logits, LARGE_NEGATIVE)


def _forward(qb, kb, vb, seg, pre, block):
    """Blocked outputs `[n, B, K, G, bs, hd]` (fp32) and log-sum-exps `[n, B, K, G, bs]`."""
    n = qb.shape[0]
    scale = jnp.float32(qb.shape[-1] ** -0.5)

    def query_block(i):
        q_i = qb[i]

        def key_block(j, carry):
            m, l, acc = carry
            logits = _block_logits(q_i, kb[j], i, j, seg, pre, block, scale)
            m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(logits - m_new[..., None])
            l = l * correction + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(vb.dtype), vb[j], preferred_element_type=jnp.float32)
            return m_new, l, acc * correction[..., None] + pv

        shape = q_i.shape[:-1]
        init = (jnp.full(shape, LARGE_NEGATIVE, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros(q_i.shape, jnp.float32))
        m, l, acc = jax.lax.fori_loop(0, i + 1, key_block, init)  # key blocks after the diagonal see nothing
        return acc / l[..., None], m + jnp.log(l)

    return jax.lax.map(query_block, jnp.arange(n))


def _backward(qb, kb, vb, seg, pre, out, lse, d_out, block):
    """(dq, dk, dv) blocked like their inputs, in fp32."""
    n = qb.shape[0]
    dtype, f32 = qb.dtype, jnp.float32
    scale = jnp.float32(qb.shape[-1] ** -0.5)
    delta = jnp.sum(d_out * out, axis=-1)  # [n, B, K, G, bs]: rowsum(dO ∘ O)

    def key_block(dq, j):
        k_j, v_j = kb[j], vb[j]

        def query_block(i, carry):
            dq, dk_j, dv_j = carry
            logits = _block_logits(qb[i], k_j, i, j, seg, pre, block, scale)
            p = jnp.exp(logits - lse[i][..., None])  # [B, K, G, bs, bs]
            # Products in the compute dtype with fp32 accumulation (bf16 matmuls on TPU), statistics in fp32.
            do_i = d_out[i].astype(dtype)
            dv_j = dv_j + jnp.einsum("bkgqs,bkgqd->bksd", p.astype(dtype), do_i, preferred_element_type=f32)
            dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v_j, preferred_element_type=f32)
            ds = (p * (dp - delta[i][..., None]) * scale).astype(dtype)
            dq = dq.at[i].add(jnp.einsum("bkgqs,bksd->bkgqd", ds, k_j, preferred_element_type=f32))
            dk_j = dk_j + jnp.einsum("bkgqs,bkgqd->bksd", ds, qb[i], preferred_element_type=f32)
            return dq, dk_j, dv_j

        zeros = jnp.zeros(k_j.shape, jnp.float32)
        dq, dk_j, dv_j = jax.lax.fori_loop(j, n, query_block, (dq, zeros, zeros))  # query blocks before j see nothing
        return dq, (dk_j, dv_j)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32), jnp.arange(n))
    return dq, dk, dv


def _from_blocks_q(x, b, t, h, hd):
    return x.transpose(1, 0, 4, 2, 3, 5).reshape(b, t, h, hd)


def _from_blocks_kv(x, b, kv, t, hd):
    return x.transpose(1, 2, 0, 3, 4).reshape(b, kv, t, hd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _blockwise(q, k, v, segment, visible_prefix, block):
    return _blockwise_fwd(q, k, v, segment, visible_prefix, block)[0]


def _blockwise_fwd(q, k, v, segment, visible_prefix, block):
    b, t, h, hd = q.shape
    qb, kb, vb, seg, pre = _to_blocks(q, k, v, TreeMask(segment, visible_prefix), block)
    out, lse = _forward(qb, kb, vb, seg, pre, block)
    return _from_blocks_q(out, b, t, h, hd).astype(q.dtype), (q, k, v, segment, visible_prefix, out, lse)


def _blockwise_bwd(block, residuals, d_out):
    q, k, v, segment, visible_prefix, out, lse = residuals
    b, t, h, hd = q.shape
    kv = k.shape[1]
    qb, kb, vb, seg, pre = _to_blocks(q, k, v, TreeMask(segment, visible_prefix), block)
    n = qb.shape[0]
    d_out_b = d_out.astype(jnp.float32).reshape(b, n, block, kv, h // kv, hd).transpose(1, 0, 3, 4, 2, 5)
    dq, dk, dv = _backward(qb, kb, vb, seg, pre, out, lse, d_out_b, block)
    return (_from_blocks_q(dq, b, t, h, hd).astype(q.dtype), _from_blocks_kv(dk, b, kv, t, hd).astype(k.dtype),
            _from_blocks_kv(dv, b, kv, t, hd).astype(v.dtype), None, None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: TreeMask, block: int) -> jax.Array:
    """Like `dense_attention(q, k, v, dense_tree_mask(mask))` on every query that sees at least one key (padding
    queries, which see none, get a finite average of values either way), without any `[T, T]` array: memory
    O(T · block) per (row, head). T is padded up to a multiple of `block` (padding keys are masked)."""
    t = q.shape[1]
    block = min(block, t)
    pad = -t % block
    if pad:
        q = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
        k, v = (jnp.pad(x, ((0, 0), (0, 0), (0, pad), (0, 0))) for x in (k, v))
        mask = TreeMask(jnp.pad(mask.segment, ((0, 0), (0, pad)), constant_values=-1),
                        jnp.pad(mask.visible_prefix, ((0, 0), (0, pad))))
    out = _blockwise(q, k, v, mask.segment, mask.visible_prefix, block)
    return out[:, :t] if pad else out
