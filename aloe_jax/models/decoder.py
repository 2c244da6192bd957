"""The one Flax NNX decoder for Llama 3, Mistral, Qwen2, OLMo and SmolLM2 — families differ only by config flags.

Layers are an unrolled list by default; `RuntimeOptions(scan_layers=True)` stores them stacked (`[layers, ...]`
weights, logical axis "layers") and runs one `lax.scan` over them, as MaxText does for large models on TPU: one
compiled layer, so compile time and program size do not grow with depth. `stack_layers` / `unstack_layers` convert
a parameter state between the two layouts (loaders, checkpoints and the sampler use the unrolled one).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from aloe_jax.models import lora, rope
from aloe_jax.models.attention import TreeMask, blockwise_attention, dense_attention, dense_tree_mask
from aloe_jax.models.config import ModelConfig

_INIT = jax.nn.initializers.normal(stddev=0.02)


RematPolicy = Literal["none", "full", "dots", "dots_no_batch"]
AttentionKind = Literal["auto", "dense", "blockwise"]


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    """How to run the model (not what it is). None of these change a number beyond float rounding.

    remat: what a block keeps for the backward pass — "none" (everything), "full" (only its input; recompute the
      rest), "dots" (matmul outputs), "dots_no_batch" (matmul outputs without batch dimensions: weights-side
      products); `True`/`False` mean "full"/"none".
    scan_layers: run the layers as one `lax.scan` over stacked weights (one compiled layer: compile time and program
      size independent of depth) instead of an unrolled Python loop.
    attention: for sequences without a KV cache (training, scoring): "dense" materialises `[T, S]` logits per (row,
      head); "blockwise" never does (online softmax over key blocks, the mask built per block); "auto" picks
      blockwise when the sequence spans more than one block.
    attention_block: query/key block length of the blockwise attention.
    logits_chunk: sequence positions per chunk when computing label log-probs (`[rows, chunk, vocab]` logits at a
      time, recomputed in the backward pass); 0 computes the whole `[rows, T, vocab]` at once.
    """

    remat: RematPolicy | bool = "none"
    scan_layers: bool = False
    attention: AttentionKind = "auto"
    attention_block: int = 512
    logits_chunk: int = 0

    def __post_init__(self):
        if isinstance(self.remat, bool):
            object.__setattr__(self, "remat", "full" if self.remat else "none")


class KVCache(NamedTuple):
    """Static-size key/value cache, per layer `[batch, kv_heads, cache_len, head_dim]`. Which slots hold real tokens
    is the caller's business: it says so in the attention mask (see masks.cached_mask).

    Heads-major so that attention reads each (row, kv head) as one contiguous `[cache_len, head_dim]` matrix: with
    the slots-major layout, XLA on CPU transposed the whole cache of every layer at every decode step."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]


def init_cache(cfg: ModelConfig, batch: int, cache_len: int, dtype: str | None = None) -> KVCache:
    """An empty cache for `batch` rows of up to `cache_len` tokens, in `dtype` (default: the compute dtype; attention
    reads a narrower cache back in the compute dtype)."""
    shape = (batch, cfg.num_kv_heads, cache_len, cfg.head_dim)
    dtype = dtype or cfg.dtype
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
                   tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)))


def _param(rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str, ...], dtype: str, init=_INIT) -> nnx.Param:
    # `logical_axes` is our own metadata: sharding.py maps it to mesh axes through configurable rules.
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(dtype)), logical_axes=axes)


class Norm(nnx.Module):
    """RMSNorm with a weight (Llama family) or LayerNorm without weight and bias (OLMo); statistics in fp32."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.kind = cfg.norm_type
        self.eps = cfg.norm_eps if cfg.norm_type == "rms" else 1e-5
        if self.kind == "rms":
            self.scale = _param(rngs, (cfg.hidden_size,), ("norm",), cfg.param_dtype, jax.nn.initializers.ones)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.kind == "rms":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            return y.astype(x.dtype) * self.scale[...].astype(x.dtype)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        return ((x32 - mean) * jax.lax.rsqrt(var + self.eps)).astype(x.dtype)


def _write_cache(cache: jax.Array, new: jax.Array, cache_index) -> jax.Array:
    """`cache` `[B, K, S, hd]` with `new` `[B, K, T, hd]` written at slots cache_index..cache_index+T-1: one index for
    every row (a scalar) or one per row (`[B]`: rows of different lengths, as in session caches). The caller keeps
    every index ≤ S - T (XLA clamps the start of an update that would run past the end)."""
    if jnp.ndim(cache_index) == 0:
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, cache_index, 0))
    return jax.vmap(lambda c, x, i: jax.lax.dynamic_update_slice(c, x, (0, i, 0)))(cache, new, cache_index)


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional q/k/v bias and OLMo's clip_qkv, reading/writing a KV cache."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, options: RuntimeOptions):
        d, h, kv, hd, pd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
        self.cfg = cfg
        self.kind, self.block = options.attention, options.attention_block
        self.q = _param(rngs, (d, h, hd), ("embed", "q_heads", "head_dim"), pd)
        self.k = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.v = _param(rngs, (d, kv, hd), ("embed", "kv_heads", "head_dim"), pd)
        self.o = _param(rngs, (h, hd, d), ("q_heads", "head_dim", "embed"), pd)
        zeros = jax.nn.initializers.zeros
        if cfg.qkv_bias:
            self.q_bias = _param(rngs, (h, hd), ("q_heads", "head_dim"), pd, zeros)
            self.k_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd, zeros)
            self.v_bias = _param(rngs, (kv, hd), ("kv_heads", "head_dim"), pd, zeros)
        if cfg.o_bias:
            self.o_bias = _param(rngs, (d,), ("norm",), pd, zeros)

    def _project(self, x: jax.Array, name: str, dropout_key: jax.Array | None) -> jax.Array:
        dt = x.dtype
        y = lora.plus_delta(self, name, x, jnp.einsum("btd,dhk->bthk", x, getattr(self, name)[...].astype(dt)),
                            dropout_key)
        if self.cfg.qkv_bias:
            y = y + getattr(self, f"{name}_bias")[...].astype(dt)
        if self.cfg.clip_qkv is not None:
            y = jnp.clip(y, -self.cfg.clip_qkv, self.cfg.clip_qkv)
        return y

    def __call__(self, x, positions, attn_mask, cache_kv=None, cache_index=None, dropout_key=None):
        """x `[B, T, D]` → (`[B, T, D]`, updated (keys, values) or None). attn_mask: `[B, T, S]` bool, or a
        TreeMask for packed rows without a cache (then `options.attention` picks the kernel). dropout_key: LoRA
        dropout (training only)."""
        inv_freq = rope.inverse_frequencies(self.cfg)
        q = rope.apply_rope(self._project(x, "q", dropout_key), positions, inv_freq)
        k = rope.apply_rope(self._project(x, "k", dropout_key), positions, inv_freq)
        v = self._project(x, "v", dropout_key)
        if cache_kv is None:
            k, v = k.swapaxes(1, 2), v.swapaxes(1, 2)
            if isinstance(attn_mask, TreeMask):
                blockwise = self.kind == "blockwise" or (self.kind == "auto" and x.shape[1] > self.block)
                if blockwise:
                    out = blockwise_attention(q, k, v, attn_mask, self.block)
                else:
                    out = dense_attention(q, k, v, dense_tree_mask(attn_mask))
            else:
                out = dense_attention(q, k, v, attn_mask)
        else:
            k_cache, v_cache = cache_kv
            # [B, T, K, hd] → [B, K, T, hd], written in place at slots cache_index..cache_index+T-1.
            k = _write_cache(k_cache, k.swapaxes(1, 2).astype(k_cache.dtype), cache_index)
            v = _write_cache(v_cache, v.swapaxes(1, 2).astype(v_cache.dtype), cache_index)
            cache_kv = (k, v)
            out = dense_attention(q, k.astype(q.dtype), v.astype(q.dtype), attn_mask)
        y = lora.plus_delta(self, "o", out, jnp.einsum("bthk,hkd->btd", out, self.o[...].astype(x.dtype)), dropout_key)
        if self.cfg.o_bias:
            y = y + self.o_bias[...].astype(x.dtype)
        return y, cache_kv


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, pd = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype
        self.use_bias = cfg.mlp_bias
        self.gate = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), pd)
        self.down = _param(rngs, (f, d), ("mlp", "embed"), pd)
        if cfg.mlp_bias:
            zeros = jax.nn.initializers.zeros
            self.gate_bias = _param(rngs, (f,), ("mlp",), pd, zeros)
            self.up_bias = _param(rngs, (f,), ("mlp",), pd, zeros)
            self.down_bias = _param(rngs, (d,), ("norm",), pd, zeros)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        dt = x.dtype
        gate = lora.plus_delta(self, "gate", x, x @ self.gate[...].astype(dt), dropout_key)
        up = lora.plus_delta(self, "up", x, x @ self.up[...].astype(dt), dropout_key)
        if self.use_bias:
            gate, up = gate + self.gate_bias[...].astype(dt), up + self.up_bias[...].astype(dt)
        hidden = jax.nn.silu(gate) * up
        y = lora.plus_delta(self, "down", hidden, hidden @ self.down[...].astype(dt), dropout_key)
        return y + self.down_bias[...].astype(dt) if self.use_bias else y


class Block(nnx.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, options: RuntimeOptions):
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs, options)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, attn_mask, cache_kv=None, cache_index=None, dropout_key=None):
        attn_key, mlp_key = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
        attn_out, cache_kv = self.attn(self.attn_norm(x), positions, attn_mask, cache_kv, cache_index, attn_key)
        x = x + attn_out
        return x + self.mlp(self.mlp_norm(x), mlp_key), cache_kv


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _block_fn(graphdef: nnx.GraphDef, remat: str, in_scan: bool):
    """`f(block_state, x, positions, attn_mask, kv, cache_index, dropout_key) -> (x, kv)`: one block as a pure
    function, under jax.checkpoint with the remat policy. A pure function rather than nnx.remat: nnx's transform
    refuses to run inside a trace it did not start (the DPO reference forward under value_and_grad)."""

    def call(state, x, positions, attn_mask, kv, cache_index, dropout_key):
        return nnx.merge(graphdef, state)(x, positions, attn_mask, kv, cache_index, dropout_key)

    if remat == "none":
        return call
    # Inside lax.scan the loop already keeps XLA from merging recomputation with the forward (prevent_cse not needed).
    return jax.checkpoint(call, policy=_REMAT_POLICIES[remat], prevent_cse=not in_scan)


def _is_unrolled_layer(path: tuple) -> bool:
    return len(path) > 2 and path[0] == "layers" and isinstance(path[1], int)


def stack_layers(state: nnx.State, num_layers: int) -> nnx.State:
    """A Decoder parameter state in the unrolled layout (`layers/<i>/...`) → the stacked one (`layers/...` with a
    leading `[num_layers]` axis, logical axis "layers")."""
    flat = dict(nnx.to_flat_state(state))
    out = [(path, v) for path, v in flat.items() if not _is_unrolled_layer(path)]
    for path, first in flat.items():
        if not _is_unrolled_layer(path) or path[1] != 0:
            continue
        rest = path[2:]
        value = jnp.stack([flat[("layers", i, *rest)][...] for i in range(num_layers)])
        axes = first.get_metadata().get("logical_axes") or (None,) * first[...].ndim
        out.append((("layers", *rest), first.replace(value, logical_axes=("layers", *axes))))
    return nnx.from_flat_state(out)


def unstack_layers(state: nnx.State) -> nnx.State:
    """The inverse of `stack_layers`."""
    out = []
    for path, v in nnx.to_flat_state(state):
        if path[0] != "layers":
            out.append((path, v))
            continue
        axes = (v.get_metadata().get("logical_axes") or (None,))[1:]
        value = v[...]
        out += [(("layers", i, *path[1:]), v.replace(value[i], logical_axes=axes)) for i in range(value.shape[0])]
    return nnx.from_flat_state(out)


class Decoder(nnx.Module):
    """Causal LM: token ids + positions + explicit attention mask (+ optional KV cache) → logits."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, options: RuntimeOptions = RuntimeOptions()):
        self.cfg = cfg
        self.options = options
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), cfg.param_dtype)
        blocks = [Block(cfg, rngs, options) for _ in range(cfg.num_layers)]
        if options.scan_layers:
            graphdef = nnx.graphdef(blocks[0])
            stacked = stack_layers(nnx.State({"layers": {i: nnx.split(b)[1] for i, b in enumerate(blocks)}}),
                                   cfg.num_layers)
            self.layers = nnx.merge(graphdef, stacked["layers"])
        else:
            self.layers = nnx.List(blocks)
        self.final_norm = Norm(cfg, rngs)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), cfg.param_dtype)

    def hidden_states(self, tokens, positions, attn_mask, cache: KVCache | None = None, cache_index=None,
                      dropout_key: jax.Array | None = None):
        """Final normalised hidden states `[B, T, D]` and the updated cache.

        tokens, positions: `[B, T]` int. attn_mask: `[B, T, S]` bool (S = T without a cache, else the cache
        length), or a TreeMask of packed rows (no cache). With a cache, the T new tokens are written at slots
        cache_index..cache_index+T-1: cache_index is a scalar (every row) or `[B]` (one start per row).
        dropout_key: LoRA dropout of a training step.
        """
        x = jnp.take(self.embed[...], tokens, axis=0).astype(self.cfg.dtype)
        if self.options.scan_layers:
            if cache is not None:
                raise ValueError("a scan_layers decoder runs without a KV cache; decode with the unrolled layout "
                                 "(unstack_layers)")
            graphdef, stacked = nnx.split(self.layers)
            block = _block_fn(graphdef, self.options.remat, in_scan=True)
            # Layer i's dropout key is the one the unrolled loop uses, so both layouts drop the same inputs.
            layer_keys = None if dropout_key is None else \
                jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(jnp.arange(self.cfg.num_layers))
            x, _ = jax.lax.scan(lambda h, xs: (block(xs[0], h, positions, attn_mask, None, None, xs[1])[0], None),
                                x, (stacked, layer_keys))
            return self.final_norm(x), None
        new_keys, new_values = [], []
        for i, layer in enumerate(self.layers):
            kv = (cache.keys[i], cache.values[i]) if cache is not None else None
            graphdef, state = nnx.split(layer)
            layer_key = jax.random.fold_in(dropout_key, i) if dropout_key is not None else None
            x, kv = _block_fn(graphdef, self.options.remat, in_scan=False)(state, x, positions, attn_mask, kv,
                                                                              cache_index, layer_key)
            if kv is not None:
                new_keys.append(kv[0])
                new_values.append(kv[1])
        if cache is not None:
            cache = KVCache(tuple(new_keys), tuple(new_values))
        return self.final_norm(x), cache

    def logits(self, hidden: jax.Array) -> jax.Array:
        """`[B, T, vocab]` float32 logits from final hidden states."""
        head = self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]
        return jnp.matmul(hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)

    def label_logprobs(self, hidden: jax.Array, labels: jax.Array) -> jax.Array:
        """`[B, T]` float32 log p(label) from final hidden states `[B, T, D]`. With `options.logits_chunk` the
        `[B, chunk, vocab]` logits exist one chunk at a time and are recomputed in the backward pass (a 128k
        vocabulary at 8k tokens is 4 GB of fp32 logits per row otherwise)."""
        chunk = self.options.logits_chunk
        t = hidden.shape[1]
        if not chunk or chunk >= t:
            return logprobs_of_labels(self.logits(hidden), labels)
        pad = -t % chunk
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels = jnp.pad(labels, ((0, 0), (0, pad)))
        b, n = hidden.shape[0], hidden.shape[1] // chunk
        h_chunks = hidden.reshape(b, n, chunk, -1).swapaxes(0, 1)
        l_chunks = labels.reshape(b, n, chunk).swapaxes(0, 1)
        one_chunk = jax.checkpoint(lambda h, y: logprobs_of_labels(self.logits(h), y))
        _, logps = jax.lax.scan(lambda _, xs: (None, one_chunk(*xs)), None, (h_chunks, l_chunks))
        return logps.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]

    def __call__(self, tokens, positions, attn_mask, cache: KVCache | None = None, cache_index=None):
        """(`[B, T, vocab]` float32 logits, updated cache or None)."""
        hidden, cache = self.hidden_states(tokens, positions, attn_mask, cache, cache_index)
        return self.logits(hidden), cache


def logprobs_of_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """`[batch, seq]` log p(label) from `[batch, seq, vocab]` logits, in float32."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)
