"""Session caches: rows of KV cache that survive between calls, so a conversation's next turn prefills only what is
new and never re-reads the conversation.

A `SessionPool` holds `rows` rows of one `[rows, kv_heads, capacity, head_dim]` cache per layer. Row r holds the KV of
the token ids `pool.tokens(r)` in slots 0..len-1 — compact, no padding, so a slot is also the token's position. A
call gives a row its whole prompt; the row keeps the longest common prefix of what it holds and the prompt (dropping
the rest costs nothing: only the row's length moves), prefills the remainder at its own offset and decodes. So a
session turn *is* a re-prefill of the full prompt, computed in fewer steps: if the template re-tokenizes the previous
reply differently, the row simply keeps less.

Rows advance together through one compiled prefill and one decode loop, each at its own length (the decoder writes
per-row slots). Capacity grows by buckets (one copy into a larger cache when some row's next turn does not fit); a row
can be dropped, forked into another row (a tree branch or an RL group shares its prefix: a device copy of one row) and
spilled to host memory and back. Serving builds its continuous batching on the same pool (rows = request slots) with
`prefill` and `decode` as separate steps; the evaluation and tree generation use `generate` (both at once).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aloe_jax.core.errors import ConfigError
from aloe_jax.models.decoder import Decoder, KVCache, init_cache
from aloe_jax.models.sharding import BATCH_AXES
from aloe_jax.sampling.sampler import (PROMPT_STEP, Generation, SamplingParams, _filter_logits, _logprobs, _Mode,
                                       _PREFILL_CHUNK, _PREFILL_CHUNK_ALT, _TokenLogprobs, bucket, check_prompts,
                                       row_budgets)


class RowSampling(NamedTuple):
    """Per-row sampling settings `[rows]`: a row's draws depend only on its own (seed, choice) and generated index,
    never on the rows beside it — row r of `Sampler.generate` uses key fold_in(key(seed), r), so choice = r matches."""

    temperature: jax.Array  # float32; 0 = greedy
    top_p: jax.Array  # float32; 1 = no cut
    seed: jax.Array  # uint32
    choice: jax.Array  # int32


def _row_keys(sampling: RowSampling) -> jax.Array:
    return jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(sampling.seed, sampling.choice)


def _pick(logits: jax.Array, sampling: RowSampling, gen_index: jax.Array, mode: _Mode) -> jax.Array:
    """`[rows]` next tokens from `[rows, vocab]` logits; row r draws with key fold_in(row key, gen_index[r])."""
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if mode.greedy:
        return greedy
    hot = sampling.temperature > 0
    scaled = logits / jnp.where(hot, sampling.temperature, 1.0)[:, None]
    if mode.top_k or mode.nucleus:
        filtered = _filter_logits(scaled, sampling.top_p[:, None], mode)
        # Rows without a nucleus cut keep every token exactly (a top_p of 1 inside the nucleus path could drop the
        # far tail to float rounding).
        scaled = filtered if mode.top_k else jnp.where((sampling.top_p < 1)[:, None], filtered, scaled)
    keys = jax.vmap(jax.random.fold_in)(_row_keys(sampling), gen_index)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    return jnp.where(hot, drawn, greedy)


class Picked(NamedTuple):
    token: jax.Array  # [rows]
    logprobs: _TokenLogprobs | None  # of `token`, with mode.logprobs alternatives


def _pick_with_logprobs(logits, sampling, gen_index, mode: _Mode) -> Picked:
    token = _pick(logits, sampling, gen_index, mode)
    return Picked(token, _logprobs(logits, token, mode.logprobs) if mode.logprobs >= 0 else None)


def _prefill_chunk(length: int) -> int:
    return next((c for c in (_PREFILL_CHUNK, *_PREFILL_CHUNK_ALT) if length % c == 0), length)


def _window(cache: KVCache, row_ids, window: int) -> KVCache:
    """Rows `row_ids` (None: all) of the cache, first `window` slots: attention then reads only the slots in use."""
    rows = cache if row_ids is None else jax.tree.map(lambda c: c[row_ids], cache)
    return rows if window >= cache.length else jax.tree.map(lambda c: c[:, :, :window], rows)


def _put_window(cache: KVCache, row_ids, rows: KVCache) -> KVCache:
    if row_ids is None:
        if rows.length == cache.length:
            return rows
        return jax.tree.map(lambda c, r: jax.lax.dynamic_update_slice(c, r, (0, 0, 0, 0)), cache, rows)
    return jax.tree.map(lambda c, r: c.at[row_ids, :, :r.shape[2]].set(r), cache, rows)


def _prefill(graphdef, mode: _Mode, window: int, state, cache: KVCache, row_ids, new_tokens, new_lengths, offsets,
             sampling: RowSampling, gen_index) -> tuple[KVCache, Picked]:
    """Write right-padded `new_tokens` `[n, T]` (row i: its first new_lengths[i]) into cache rows `row_ids` at slots
    offsets[i]..; return the cache and the token picked after each row's last new token. `row_ids` None: all rows.
    Only the first `window` slots of each row are read or written."""
    model = nnx.merge(graphdef, state)
    rows = _window(cache, row_ids, window)
    n, length = new_tokens.shape
    capacity = rows.length
    chunk = _prefill_chunk(length)

    def one_chunk(start, carry):
        rows, last_hidden = carry
        piece = jax.lax.dynamic_slice_in_dim(new_tokens, start, chunk, axis=1)
        query_slots = offsets[:, None] + start + jnp.arange(chunk)[None, :]  # [n, chunk]
        # Rows are compact from slot 0, so causality by slot is the whole mask: what lies past a row's new tokens
        # (padding now, garbage from earlier turns) is never at or before a real query's slot.
        mask = jnp.arange(capacity)[None, None, :] <= query_slots[:, :, None]
        hidden, rows = model.hidden_states(piece, query_slots, mask, rows, offsets + start)
        at = new_lengths - 1 - start  # each row's last real token, when it lies in this chunk
        here = (at >= 0) & (at < chunk)
        picked = jnp.take_along_axis(hidden, jnp.clip(at, 0, chunk - 1)[:, None, None], axis=1)[:, 0]
        return rows, jnp.where(here[:, None], picked, last_hidden)

    last_hidden = jnp.zeros((n, model.cfg.hidden_size), model.cfg.dtype)
    rows, last_hidden = jax.lax.fori_loop(0, length // chunk, lambda i, c: one_chunk(i * chunk, c),
                                          (rows, last_hidden))
    picked = _pick_with_logprobs(model.logits(last_hidden[:, None])[:, 0], sampling, gen_index, mode)
    return _put_window(cache, row_ids, rows), picked


class DecodeState(NamedTuple):
    """Per-row decode state `[rows]` between calls."""

    token: jax.Array  # int32: the latest picked token, not yet in the cache
    slot: jax.Array  # int32: where `token` goes = tokens the row holds
    gen_index: jax.Array  # int32: generated index of `token` (its key's step)
    budget: jax.Array  # int32: tokens the row may still pick after `token`
    live: jax.Array  # bool: still decoding
    token_logprobs: _TokenLogprobs | None = None


class DecodeOut(NamedTuple):
    tokens: jax.Array  # [rows, steps]: row r's new tokens are its first count[r]
    count: jax.Array  # [rows]
    stopped: jax.Array  # [rows] bool: ended on a stop token during this call
    logprobs: _TokenLogprobs | None  # [rows, steps(, n)]


def _decode(graphdef, mode: _Mode, steps: int, window: int, state, full_cache: KVCache, row_ids,
            decode: DecodeState, stop_ids, sampling: RowSampling) -> tuple[KVCache, DecodeState, DecodeOut]:
    """Up to `steps` decode steps of every live row (fewer when all rows finish): feed each row's token at its slot,
    pick the next. Finished rows keep writing at their own slot, which lies past what they hold. Only the first
    `window` slots of each row are read or written. `row_ids` `[n]`: decode only those rows of the cache (`decode`
    and `sampling` are theirs); None: every row."""
    model = nnx.merge(graphdef, state)
    cache = _window(full_cache, row_ids, window)
    rows, capacity = decode.token.shape[0], cache.length
    out = jnp.zeros((rows, steps), jnp.int32)
    out_lp = None
    if mode.logprobs >= 0:
        k = mode.logprobs
        out_lp = _TokenLogprobs(jnp.zeros((rows, steps), jnp.float32), jnp.zeros((rows, steps, k), jnp.int32),
                                jnp.zeros((rows, steps, k), jnp.float32))

    def body(carry):
        step, cache, d, out, out_lp, count, stopped = carry
        mask = jnp.arange(capacity)[None, None, :] <= d.slot[:, None, None]
        hidden, cache = model.hidden_states(d.token[:, None], d.slot[:, None], mask, cache, d.slot)
        picked = _pick_with_logprobs(model.logits(hidden)[:, 0], sampling, d.gen_index + 1, mode)
        live = d.live
        out = out.at[:, step].set(picked.token)
        if out_lp is not None:
            out_lp = _TokenLogprobs(*(buf.at[:, step].set(x) for buf, x in zip(out_lp, picked.logprobs)))
        is_stop = jnp.any(picked.token[:, None] == stop_ids[None, :], axis=-1)
        advance = live.astype(jnp.int32)
        token = jnp.where(live, picked.token, d.token)
        d = DecodeState(token=token, slot=d.slot + advance, gen_index=d.gen_index + advance,
                        budget=d.budget - advance, live=live & ~is_stop & (d.budget - advance > 0),
                        token_logprobs=None)
        return step + 1, cache, d, out, out_lp, count + advance, stopped | (live & is_stop)

    def running(carry):
        step, _, d = carry[:3]
        return (step < steps) & jnp.any(d.live)

    zeros = jnp.zeros((rows,), jnp.int32)
    first = (jnp.int32(0), cache, decode._replace(token_logprobs=None), out, out_lp, zeros, zeros.astype(bool))
    _, cache, decode, out, out_lp, count, stopped = jax.lax.while_loop(running, body, first)
    return _put_window(full_cache, row_ids, cache), decode, DecodeOut(out, count, stopped, out_lp)


@functools.lru_cache(maxsize=None)
def _prefill_program(graphdef, mode: _Mode, all_rows: bool, window: int):
    fn = functools.partial(_prefill, graphdef, mode, window)
    if all_rows:
        return jax.jit(lambda state, cache, *rest: fn(state, cache, None, *rest), donate_argnums=(1,))
    return jax.jit(fn, donate_argnums=(1,))


@functools.lru_cache(maxsize=None)
def _decode_program(graphdef, mode: _Mode, steps: int, window: int, all_rows: bool):
    fn = functools.partial(_decode, graphdef, mode, steps, window)
    if all_rows:
        return jax.jit(lambda state, cache, *rest: fn(state, cache, None, *rest), donate_argnums=(1,))
    return jax.jit(fn, donate_argnums=(1,))


def _window_size(slots: int, capacity: int) -> int:
    """The bucket of slots a program reads: few compiled sizes, and never the whole of a mostly empty cache."""
    return min(bucket(slots, 16, PROMPT_STEP), capacity)


@functools.lru_cache(maxsize=None)
def _resize_program(rows: int, capacity: int):
    def resize(cache: KVCache) -> KVCache:
        def one(c):
            grown = jnp.zeros((rows, c.shape[1], capacity, c.shape[3]), c.dtype)
            return jax.lax.dynamic_update_slice(grown, c[:rows, :, :capacity], (0, 0, 0, 0))
        return jax.tree.map(one, cache)
    return jax.jit(resize)  # a new shape: the old buffer cannot be donated


@functools.partial(jax.jit, donate_argnums=(0,))
def _copy_row(cache: KVCache, src, dst) -> KVCache:
    return jax.tree.map(lambda c: c.at[dst].set(c[src]), cache)


@dataclasses.dataclass(frozen=True)
class SpilledRow:
    """A row moved to host memory: its token ids and, per layer, keys and values `[kv_heads, len, head_dim]`."""

    tokens: tuple[int, ...]
    keys: tuple[np.ndarray, ...]
    values: tuple[np.ndarray, ...]


@dataclasses.dataclass(frozen=True)
class SessionGeneration(Generation):
    """A Generation and how many of its prompt tokens were already in the row (not prefilled again)."""

    cached_tokens: int = 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if differ.size else n


def sampling_mode(params: Sequence[SamplingParams], vocab_size: int) -> _Mode:
    """One compiled mode that serves every row's params: greedy only when all are; nucleus when any cuts; the most
    log-probability alternatives any asks for."""
    modes = [_Mode.of(p, vocab_size) for p in params]
    if len({m.top_k for m in modes if not m.greedy}) > 1:
        raise ConfigError("rows decoded together must share top_k")
    top_k = next((m.top_k for m in modes if not m.greedy), 0)
    return _Mode(all(m.greedy for m in modes), top_k, any(m.nucleus for m in modes), max(m.logprobs for m in modes))


class SessionPool:
    """`rows` KV-cache rows kept across calls (see the module docstring). Not thread-safe: one caller at a time."""

    def __init__(self, model: Decoder, rows: int, stop_ids: Sequence[int] = (), kv_dtype: str | None = None,
                 mesh: Mesh | None = None):
        if rows < 1:
            raise ConfigError(f"a session pool needs at least one row, got {rows}")
        self.model, self.rows, self.mesh = model, rows, mesh
        self.stop_ids = np.asarray(sorted({int(s) for s in stop_ids}) or [-1], np.int32)
        self.kv_dtype = kv_dtype or model.cfg.dtype
        self._graphdef = nnx.graphdef(model)
        self._tokens: list[list[int]] = [[] for _ in range(rows)]
        self.cache: KVCache | None = None
        self.capacity = 0
        self.prefilled_tokens = 0  # tokens run through prefill, over the pool's life
        self.reused_tokens = 0  # prompt tokens found in a row instead

    # --- rows -------------------------------------------------------------------------------------------------------
    def tokens(self, row: int) -> list[int]:
        """The token ids whose KV row `row` holds."""
        return list(self._tokens[row])

    def drop(self, row: int) -> None:
        self._tokens[row] = []

    def truncate(self, row: int, length: int) -> None:
        """Keep only the first `length` tokens of a row (free: only its length moves)."""
        del self._tokens[row][length:]

    def fork(self, src: int, dst: int) -> None:
        """Row `dst` becomes a copy of row `src` (its own cache from now on)."""
        if src != dst and self.cache is not None:
            self.cache = _copy_row(self.cache, np.int32(src), np.int32(dst))
        self._tokens[dst] = list(self._tokens[src])

    def spill(self, row: int) -> SpilledRow:
        """Move a row to host memory; the row is empty afterwards."""
        n = len(self._tokens[row])
        get = lambda layers: tuple(np.asarray(jax.device_get(c[row, :, :n])) for c in layers)  # noqa: E731
        spilled = SpilledRow(tuple(self._tokens[row]), *((get(self.cache.keys), get(self.cache.values))
                                                         if self.cache is not None else ((), ())))
        self.drop(row)
        return spilled

    def restore(self, row: int, spilled: SpilledRow) -> None:
        """Put a spilled row back (into any row)."""
        n = len(spilled.tokens)
        self._ensure(n + 1)
        put = lambda layers, saved: tuple(  # noqa: E731
            c.at[row, :, :n].set(jnp.asarray(s, c.dtype)) for c, s in zip(layers, saved))
        self.cache = KVCache(put(self.cache.keys, spilled.keys), put(self.cache.values, spilled.values))
        self._tokens[row] = list(spilled.tokens)

    def grow_rows(self, rows: int) -> None:
        """At least `rows` rows (new rows empty)."""
        if rows > self.rows:
            self._tokens += [[] for _ in range(rows - self.rows)]
            self.rows = rows
            if self.cache is not None:
                self.cache = _resize_program(rows, self.capacity)(self.cache)

    def _ensure(self, capacity: int) -> None:
        """Allocate the cache, or grow it to the bucket holding `capacity` slots per row."""
        shards = 1 if self.mesh is None else int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
        if self.rows % shards:
            raise ConfigError(f"a session pool on this mesh needs rows in multiples of {shards}, got {self.rows}")
        if self.cache is None:
            self.capacity = bucket(capacity, 16, PROMPT_STEP)
            self.cache = init_cache(self.model.cfg, self.rows, self.capacity, self.kv_dtype)
            if self.mesh is not None:
                spec = NamedSharding(self.mesh, PartitionSpec(BATCH_AXES, None, None, None))
                self.cache = jax.device_put(self.cache, spec)
        elif capacity > self.capacity:
            self.capacity = bucket(capacity, 16, PROMPT_STEP)
            self.cache = _resize_program(self.rows, self.capacity)(self.cache)

    # --- decoding ---------------------------------------------------------------------------------------------------
    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], sampling: Sequence[SamplingParams],
                choices: Sequence[int], reserve: Sequence[int], mode: _Mode | None = None,
                pad_rows: bool = False) -> tuple[list[int], Picked]:
        """Make each row hold its prompt (reusing the common prefix) and pick the first token. `reserve[i]`: slots
        row i must have free after its prompt (its token budget). Returns (cached tokens per row, picked: one entry
        per prompt). `mode`: the compiled sampling mode (default: the one the params need). `pad_rows`: round the
        number of rows up to a power of two with other rows that get no new tokens (their padded writes land past
        what they hold), so that a caller prefilling a varying number of rows compiles few programs."""
        check_prompts(prompts, self.model.cfg.vocab_size)
        offsets, length, slots = self._plan(rows, prompts, reserve)
        fresh = [list(prompt[keep:]) for prompt, keep in zip(prompts, offsets)]
        self._ensure(slots)
        rows, offsets_all, sampling, choices = list(rows), list(offsets), list(sampling), list(choices)
        target = 1 << (len(rows) - 1).bit_length() if pad_rows else len(rows)
        # A one-row gather/scatter is lowered to slices that XLA does not update in place: the whole cache would be
        # copied (benchmarks/README.md, "Session memory"). Two rows keep it in place.
        target = min(max(target, 2), self.rows)
        if target > len(rows):
            others = sorted((r for r in range(self.rows) if r not in set(rows)
                             and len(self._tokens[r]) + length <= self.capacity), key=lambda r: len(self._tokens[r]))
            for r in others[:target - len(rows)]:
                rows.append(r)
                offsets_all.append(len(self._tokens[r]))
                sampling.append(sampling[0])
                choices.append(0)
        new_tokens = np.zeros((len(rows), length), np.int32)
        for i, ids in enumerate(fresh):
            new_tokens[i, :len(ids)] = ids
        new_lengths = np.zeros(len(rows), np.int32)
        new_lengths[:len(fresh)] = [len(f) for f in fresh]
        mode = mode or sampling_mode(sampling, self.model.cfg.vocab_size)
        all_rows = rows == list(range(self.rows))
        window = _window_size(max(keep + length for keep in offsets_all), self.capacity)
        program = _prefill_program(self._graphdef, mode, all_rows, window)
        row_args = () if all_rows else (np.asarray(rows, np.int32),)
        self.cache, picked = program(nnx.state(self.model), self.cache, *row_args, new_tokens, new_lengths,
                                     np.asarray(offsets_all, np.int32), self._row_sampling(sampling, choices),
                                     np.zeros(len(rows), np.int32))
        n = len(prompts)
        picked = Picked(picked.token[:n], None if picked.logprobs is None else
                        _TokenLogprobs(*(x[:n] for x in picked.logprobs)))
        rows = rows[:n]
        for row, prompt in zip(rows, prompts):
            self._tokens[row] = list(prompt)
        self.prefilled_tokens += sum(map(len, fresh))
        self.reused_tokens += sum(offsets)
        return offsets, picked

    def _plan(self, rows, prompts, reserve) -> tuple[list[int], int, int]:
        """(tokens each row keeps, padded prefill length, cache slots per row) of prefilling `prompts` into `rows`."""
        # Prefill ≥ 1 token per row: its logits pick the first new token.
        offsets = [min(common_prefix(self._tokens[row], p), len(p) - 1) for row, p in zip(rows, prompts)]
        length = bucket(max(len(p) - keep for p, keep in zip(prompts, offsets)), 16, PROMPT_STEP)
        # The padded prefill writes up to slot keep + length - 1, and rows outside the call write at their length.
        slots = max(max(keep + length for keep in offsets), max(len(t) for t in self._tokens) + 1,
                    max(len(p) + r for p, r in zip(prompts, reserve)))
        return offsets, length, slots

    def slots_needed(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], reserve: Sequence[int]) -> int:
        """Cache slots per row that prefilling `prompts` into `rows` (each with `reserve` slots after it) needs."""
        return self._plan(rows, prompts, reserve)[2]

    def _row_sampling(self, sampling: Sequence[SamplingParams], choices: Sequence[int]) -> RowSampling:
        return RowSampling(np.asarray([p.temperature for p in sampling], np.float32),
                           np.asarray([p.top_p for p in sampling], np.float32),
                           np.asarray([p.seed for p in sampling], np.uint32), np.asarray(choices, np.int32))

    def decode(self, state: DecodeState, sampling: RowSampling, mode: _Mode, steps: int,
               rows: Sequence[int] | None = None) -> tuple[DecodeState, DecodeOut]:
        """Up to `steps` decode steps for all rows, or for `rows` only (`state` and `sampling` are then theirs, in that
        order; at least two distinct rows, see prefill); the caller records which tokens each row now holds
        (`note_decoded`)."""
        slot, live = np.asarray(state.slot), np.asarray(state.live)
        window = _window_size(int(np.max(np.where(live, slot + steps, slot + 1))), self.capacity)
        all_rows = rows is None or list(rows) == list(range(self.rows))
        program = _decode_program(self._graphdef, mode, steps, window, all_rows)
        row_args = () if all_rows else (np.asarray(rows, np.int32),)
        self.cache, state, out = program(nnx.state(self.model), self.cache, *row_args, state, self.stop_ids, sampling)
        return state, out

    def note_decoded(self, row: int, fed: Sequence[int]) -> None:
        """Record that row `row` now also holds `fed` (tokens fed to the cache by decode)."""
        self._tokens[row].extend(int(t) for t in fed)

    def generate(self, rows: Sequence[int], prompts: Sequence[Sequence[int]],
                 params: SamplingParams = SamplingParams(), max_new_tokens: Sequence[int] | None = None,
                 choices: Sequence[int] | None = None) -> list[SessionGeneration]:
        """One generation per (row, prompt), all rows decoded together; afterwards each row holds its prompt and the
        reply's tokens (all but the last, which was never fed). `choices` default: the prompt's index, so the draws
        equal `Sampler.generate(prompts, params)`."""
        if len(set(rows)) != len(rows) or len(rows) != len(prompts):
            raise ConfigError("generate needs one distinct row per prompt")
        budgets = row_budgets(len(prompts), params, max_new_tokens)
        choices = list(range(len(prompts))) if choices is None else list(choices)
        mode = _Mode.of(params, self.model.cfg.vocab_size)
        # A call on a few of the pool's rows (the repeat guard's resamples, a tree branch) runs its prefill and
        # decode on those rows only, padded to a power of two with the pool's shortest other rows (few compiled
        # shapes): decoding every row of the pool would cost a whole-pool decode over its longest row each time.
        decoded = self._rows_to_run(rows)
        cached, first = self.prefill(rows, prompts, [params] * len(rows), choices, budgets,
                                     pad_rows=decoded is not None)
        order = list(range(self.rows)) if decoded is None else decoded
        at = np.asarray([order.index(r) for r in rows])  # each prompt's position in the decoded rows
        # Rows decoded but not in this call are finished from the start.
        token, slot, budget = (np.zeros(len(order), np.int32) for _ in range(3))
        live = np.zeros(len(order), bool)
        first_token = np.asarray(first.token)
        token[at] = first_token
        slot[:] = [len(self._tokens[r]) for r in order]
        budget[at] = np.maximum(np.asarray(budgets) - 1, 0)
        is_stop = np.isin(first_token, self.stop_ids)
        live[at] = (np.asarray(budgets) > 0) & ~is_stop & (np.asarray(budgets) > 1)
        choice = np.zeros(len(order), np.int32)
        choice[at] = choices
        sampling = self._row_sampling([params] * len(order), choice)
        state = DecodeState(token, slot, np.zeros(len(order), np.int32), budget, live)
        steps = bucket(max(max(budgets) - 1, 1), 16)
        _, out = self.decode(state, sampling, mode, steps, rows=decoded)
        out_tokens, counts, stopped = jax.device_get((out.tokens, out.count, out.stopped))
        out_lp = None if out.logprobs is None else jax.device_get(out.logprobs)
        first_lp = None if first.logprobs is None else jax.device_get(first.logprobs)
        results = []
        for i, (row, prompt, budget_i) in enumerate(zip(rows, prompts, budgets)):
            j = int(at[i])
            n = int(counts[j])
            generated = ([int(first_token[i])] if budget_i > 0 else []) + out_tokens[j, :n].tolist()
            ended = bool(is_stop[i]) if n == 0 else bool(stopped[j])
            self.note_decoded(row, generated[:-1])
            logprobs = None
            if first_lp is not None:
                logprobs = _TokenLogprobs(*(np.concatenate([f[i:i + 1], o[j, :n]]) if budget_i > 0 else o[j, :0]
                                            for f, o in zip(first_lp, out_lp)))
            results.append(self._result(generated, ended and budget_i > 0, len(prompt), cached[i], logprobs))
        return results

    def _rows_to_run(self, rows: Sequence[int]) -> list[int] | None:
        """The rows a call on `rows` decodes: `rows`, then the shortest other rows up to a power of two (at least two
        rows, see prefill); None (every row, no gather) when that would be the whole pool."""
        target = max(1 << (len(rows) - 1).bit_length(), 2)
        if target >= self.rows:
            return None
        taken = set(rows)
        others = sorted((r for r in range(self.rows) if r not in taken), key=lambda r: len(self._tokens[r]))
        return list(rows) + others[:target - len(rows)]

    @staticmethod
    def _result(generated: list[int], stopped: bool, prompt_tokens: int, cached: int,
                logprobs: _TokenLogprobs | None) -> SessionGeneration:
        kept = len(generated) - stopped
        extra = {}
        if logprobs is not None:
            extra = dict(logprobs=logprobs.chosen[:kept].tolist(),
                         top_logprobs=[list(zip(ids.tolist(), lps.tolist()))
                                       for ids, lps in zip(logprobs.top_ids[:kept], logprobs.top[:kept])])
        return SessionGeneration(tokens=generated[:kept], finish_reason="stop" if stopped else "length",
                                 prompt_tokens=prompt_tokens, completion_tokens=len(generated),
                                 stop_token=generated[-1] if stopped else None, cached_tokens=cached, **extra)


def cache_bytes_per_token(model: Decoder, kv_dtype: str | None = None) -> int:
    """Bytes of KV cache one token takes (keys and values of every layer)."""
    cfg = model.cfg
    return 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(kv_dtype or cfg.dtype).itemsize


class SessionCache:
    """Sessions without bookkeeping by the caller: each call's prompts are matched to the rows that hold their longest
    prefixes, so a caller that sends whole conversations turn after turn (the conversation engine's roles) prefills
    only what is new.

    A call runs on one pool: the one whose rows hold the most of its prompts (each role's batch of conversations ends
    up with a pool of its own), or a fresh one sized to the call. Pools are dropped least recently used first when
    their caches together would pass `max_bytes`.
    """

    def __init__(self, model: Decoder, stop_ids: Sequence[int] = (), kv_dtype: str | None = None,
                 max_bytes: int = 8 * 2**30, mesh: Mesh | None = None):
        self.model, self.stop_ids, self.kv_dtype, self.max_bytes, self.mesh = model, stop_ids, kv_dtype, max_bytes, mesh
        self.pools: list[SessionPool] = []  # least recently used first
        self._dropped: list[tuple[int, int]] = []  # (prefilled, reused) of pools dropped

    @property
    def prefilled_tokens(self) -> int:
        """Prompt tokens run through prefill so far."""
        return sum(p.prefilled_tokens for p in self.pools) + sum(d[0] for d in self._dropped)

    @property
    def reused_tokens(self) -> int:
        """Prompt tokens found in a row instead of prefilled."""
        return sum(p.reused_tokens for p in self.pools) + sum(d[1] for d in self._dropped)

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams = SamplingParams(),
                 max_new_tokens: Sequence[int] | None = None) -> list[SessionGeneration]:
        """Like `Sampler.generate(prompts, params, max_new_tokens)`: same tokens, same draws."""
        if not prompts:
            return []
        pool, reuse = self._best_pool(prompts)
        if pool is None:
            shards = 1 if self.mesh is None else int(np.prod([self.mesh.shape[a] for a in BATCH_AXES]))
            rows = -(-bucket(len(prompts), 1, 8) // shards) * shards
            pool = SessionPool(self.model, rows, self.stop_ids, self.kv_dtype, self.mesh)
            reuse = [(0, None)] * len(prompts)
        else:
            self.pools.remove(pool)
        self.pools.append(pool)
        rows = self._assign(pool, prompts, reuse)
        budgets = row_budgets(len(prompts), params, max_new_tokens)
        self._make_room(pool, pool.slots_needed(rows, prompts, budgets))
        return pool.generate(rows, prompts, params, budgets, choices=list(range(len(prompts))))

    def _best_pool(self, prompts) -> tuple[SessionPool | None, list[tuple[int, int | None]]]:
        """The pool holding most of the prompts' tokens, with each prompt's (reusable tokens, row)."""
        best, best_total, best_reuse = None, 0, []
        for pool in self.pools:
            if pool.rows < len(prompts):
                continue
            by_first: dict[int, list[int]] = {}
            for row in range(pool.rows):
                held = pool._tokens[row]
                if held:
                    by_first.setdefault(held[0], []).append(row)
            reuse, total = [], 0
            for prompt in prompts:
                scored = [(common_prefix(pool._tokens[r], prompt), r) for r in by_first.get(prompt[0], [])]
                n, row = max(scored, default=(0, None))
                reuse.append((n, row))
                # Only a prompt that continues its row (or mostly lies in it) makes the pool this call's: a match on
                # the template's first tokens alone ("<|im_start|>system\nYou are") would hand another role's rows
                # to this call, and the two roles would overwrite each other's sessions every turn.
                if row is not None and 2 * n >= min(len(pool._tokens[row]), len(prompt)):
                    total += n
            if total > best_total:
                best, best_total, best_reuse = pool, total, reuse
        return best, best_reuse

    @staticmethod
    def _assign(pool: SessionPool, prompts, reuse) -> list[int]:
        """A distinct row per prompt: its best row when free, else a copy of it (fork) in a row nobody reuses."""
        claimed: dict[int, int] = {}
        order = sorted(range(len(prompts)), key=lambda i: -reuse[i][0])
        wanted = {row for _, row in reuse if row is not None}
        spare = [r for r in range(pool.rows) if r not in wanted]
        rows = [0] * len(prompts)
        for i in order:
            n, row = reuse[i]
            if row is not None and row not in claimed:
                claimed[row] = i
                rows[i] = row
                continue
            # Taken by a prompt with a longer match (a branch of the same conversation), or no match at all. There is
            # always a spare row: prompts without their own best row ≤ rows - distinct best rows.
            target = spare.pop()
            if row is not None and n > 0:
                pool.fork(row, target)
            claimed[target] = i
            rows[i] = target
        return rows

    def _make_room(self, pool: SessionPool, capacity: int) -> None:
        """Drop least recently used pools until `pool` at `capacity` slots fits in max_bytes with the rest."""
        per_token = cache_bytes_per_token(self.model, self.kv_dtype)
        need = lambda p, cap: p.rows * bucket(cap, 16, PROMPT_STEP) * per_token  # noqa: E731
        while len(self.pools) > 1 and need(pool, max(capacity, pool.capacity)) + sum(
                need(p, p.capacity) for p in self.pools if p is not pool) > self.max_bytes:
            dropped = self.pools.pop(0)
            self._dropped.append((dropped.prefilled_tokens, dropped.reused_tokens))
