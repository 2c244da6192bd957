"""Batched generation over a static-size KV cache: a left-padded prefill, then a `lax.while_loop` that decodes one
token per row per step until every row has produced a stop token or used its token budget.

The whole generation (prefill + loop) is one compiled program, so the loop never returns to Python and the cache
lives in place inside XLA. Batch size, prompt length and token budget are rounded up to buckets and each bucket's
program is compiled once per Sampler: a long run with varied prompts compiles a handful of programs, not one per call.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Literal, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from aloe_jax.core.errors import ConfigError, DataError
from aloe_jax.models import masks
from aloe_jax.models.decoder import Decoder, KVCache, init_cache
from aloe_jax.models.sharding import BATCH_AXES, batch_sharding


MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How each next token is picked: temperature 0 is greedy; otherwise the logits are divided by `temperature`,
    then cut to the `top_k` most likely tokens (0: no cut), then to the nucleus of mass `top_p` (1: no cut)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 128
    seed: int = 0
    # None: no log-probabilities. n ≥ 0: each generated token's log-probability under the model (before temperature
    # and cuts, as OpenAI-compatible servers report it) and the n most likely alternatives at that step.
    top_logprobs: int | None = None

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"sampling temperature must be finite and ≥ 0 (0 = greedy), got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"sampling top_k must be an integer ≥ 0 (0 = off), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"sampling top_p must be in (0, 1] (1 = off), got {self.top_p}")
        _check_budget(self.max_new_tokens, "sampling max_new_tokens")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"sampling seed must be an integer in [0, 2**32), got {self.seed!r}")
        if self.top_logprobs is not None and (not isinstance(self.top_logprobs, int) or
                                              not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            raise ConfigError(f"top_logprobs must be None or an integer in 0..{MAX_TOP_LOGPROBS}, "
                              f"got {self.top_logprobs!r}")


@dataclasses.dataclass(frozen=True)
class Generation:
    """One row's result. `tokens` excludes the stop token (it is `stop_token`); `completion_tokens` counts every
    generated token including the stop token, so it never exceeds the row's max_new_tokens (as in HF generate)."""

    tokens: list[int]
    finish_reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int
    stop_token: int | None = None
    # With SamplingParams.top_logprobs set: per token of `tokens`, its log-probability and the top alternatives as
    # (token id, log-probability) pairs, most likely first.
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


class _Mode(NamedTuple):
    """The static part of SamplingParams: what changes the compiled program (temperature and top_p values do not)."""

    greedy: bool
    top_k: int
    nucleus: bool
    logprobs: int  # -1: off; n ≥ 0: record log-probabilities with n alternatives

    @classmethod
    def of(cls, params: SamplingParams, vocab_size: int) -> "_Mode":
        logprobs = -1 if params.top_logprobs is None else min(params.top_logprobs, vocab_size)
        if params.temperature == 0:
            return cls(True, 0, False, logprobs)
        top_k = params.top_k if params.top_k < vocab_size else 0  # keeping the whole vocabulary is no cut
        return cls(False, top_k, params.top_p < 1, logprobs)


def _check_budget(value, name: str) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{name} must be an integer ≥ 0, got {value!r}")


def bucket(n: int, minimum: int, step: int | None = None) -> int:
    """The size that `n` is padded to: the smallest of `minimum`·2^k, 1.5·`minimum`·2^k and (with `step`) the
    multiples of `step`, that holds it.

    Two sizes per octave keep the padding waste under 50% while n up to 256·minimum maps to only 17 sizes, hence few
    compiled programs. Where padding costs more than a compilation — a batch of 100 rows rounded to 128, a 1,033-token
    prompt to 1,536, every one of them prefilled — `step` caps the waste at step - 1 for sizes above it.
    """
    size = max(minimum, 1)
    while size < n:
        if size % 2 == 0 and size * 3 // 2 >= n:
            size = size * 3 // 2
            break
        size *= 2
    if step:
        size = min(size, -(-n // step) * step)
    return size


# Batch rows and prompt lengths above these go up in steps of them (see bucket): an evaluation's batch of cases and
# its long prompts then pad to the next step, not the next half-octave, at the cost of one compiled shape per step
# used (the padding it saves: benchmarks/README.md).
BATCH_STEP, PROMPT_STEP = 8, 128


# The nucleus (top-p without top-k) is looked for among this many most likely tokens first, because a full sort of
# the vocabulary at every decode step costs far more than lax.top_k of a few candidates (benchmarks/top_p.py). When a
# row's nucleus reaches past the candidates (a nearly flat distribution), the whole batch takes the full sort instead,
# so the result never changes.
_NUCLEUS_CANDIDATES = 1024


def _nucleus_threshold(candidates: jax.Array, log_total: jax.Array, top_p: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(`[batch]` logit of the least likely token kept, `[batch]` bool: the nucleus lies within `candidates`).

    candidates `[batch, n]` are logits in descending order, with probabilities exp(candidates - log_total): keep the
    most likely tokens up to and including the first that brings the mass to ≥ top_p.
    """
    probs = jnp.exp(candidates - log_total[:, None])
    mass = jnp.cumsum(probs, axis=-1)
    keep = mass - probs < top_p
    last_kept = jnp.sum(keep, axis=-1) - 1  # [batch]
    return jnp.take_along_axis(candidates, last_kept[:, None], axis=-1)[:, 0], mass[:, -1] >= top_p


def _filter_logits(logits: jax.Array, top_p: jax.Array, mode: _Mode) -> jax.Array:
    """`[batch, vocab]` logits with everything outside the top-k / nucleus set to -inf."""
    vocab = logits.shape[-1]
    if mode.top_k:
        candidates = jax.lax.top_k(logits, mode.top_k)[0]  # [batch, k], descending
        threshold = candidates[:, -1]
        if mode.nucleus:
            # Within the top-k candidates the distribution is renormalised over them, as when top-p follows top-k in HF.
            threshold = _nucleus_threshold(candidates, jax.nn.logsumexp(candidates, axis=-1), top_p)[0]
    else:
        log_total = jax.nn.logsumexp(logits, axis=-1)
        n = min(vocab, _NUCLEUS_CANDIDATES)
        threshold, covered = _nucleus_threshold(jax.lax.top_k(logits, n)[0], log_total, top_p)
        if n < vocab:
            threshold = jax.lax.cond(
                jnp.all(covered), lambda: threshold,
                lambda: _nucleus_threshold(-jnp.sort(-logits, axis=-1), log_total, top_p)[0])
    return jnp.where(logits >= threshold[:, None], logits, -jnp.inf)


def _next_tokens(logits, row_keys, step, temperature, top_p, mode: _Mode) -> jax.Array:
    """`[batch]` int32 tokens picked from `[batch, vocab]` logits."""
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / temperature
    if mode.top_k or mode.nucleus:
        logits = _filter_logits(logits, top_p, mode)
    # One key per row and step: a row's draws do not depend on the batch bucket it was padded into.
    keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, step)
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)


class _TokenLogprobs(NamedTuple):
    """Log-probabilities at one step `[batch]` / `[batch, n]`, or over all steps `[batch, steps]` / `[..., n]`."""

    chosen: jax.Array
    top_ids: jax.Array
    top: jax.Array


def _logprobs(logits: jax.Array, token: jax.Array, n: int) -> _TokenLogprobs:
    """The chosen tokens' log-probabilities under the raw `[batch, vocab]` logits, and the n most likely tokens."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    top, top_ids = jax.lax.top_k(logp, n) if n else (logp[:, :0], jnp.zeros((logp.shape[0], 0), jnp.int32))
    return _TokenLogprobs(jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], top_ids.astype(jnp.int32), top)


class _Loop(NamedTuple):
    """State of the decode loop."""

    step: jax.Array  # scalar: index of `token` among the generated tokens
    token: jax.Array  # [batch] the latest generated token (already recorded)
    out: jax.Array  # [batch, steps] generated tokens; row b is valid up to count[b]
    count: jax.Array  # [batch] tokens generated so far, stop token included
    stopped: jax.Array  # [batch] bool: the row ended on a stop token
    done: jax.Array  # [batch] bool: stopped or out of budget
    cache: KVCache
    token_logprobs: _TokenLogprobs | None = None  # of `token`, when asked for
    out_logprobs: _TokenLogprobs | None = None  # per generated token, like `out`


def _record(loop: _Loop, budgets: jax.Array, stop_ids: jax.Array) -> _Loop:
    """`loop` with its `token` written to column `step` and the rows' counts and done flags updated."""
    live = ~loop.done
    # Every live row has generated exactly `step` tokens before this one, so column `step` is the right one; what
    # lands in the columns of finished rows lies past their count and is never read.
    out = jax.lax.dynamic_update_slice(loop.out, loop.token[:, None], (0, loop.step))
    if loop.out_logprobs is not None:
        write = lambda buf, x: jax.lax.dynamic_update_slice(  # noqa: E731
            buf, x[:, None], (0, loop.step) + (0,) * (buf.ndim - 2))
        loop = loop._replace(out_logprobs=_TokenLogprobs(*map(write, loop.out_logprobs, loop.token_logprobs)))
    count = loop.count + live
    is_stop = jnp.any(loop.token[:, None] == stop_ids[None, :], axis=-1)
    stopped = loop.stopped | (live & is_stop)
    done = loop.done | stopped | (count >= budgets)
    return loop._replace(out=out, count=count, stopped=stopped, done=done)


# Long prompts are prefilled in chunks of this many tokens (or the first of _PREFILL_CHUNK_ALT that divides the bucket
# when this does not; every prompt bucket above PROMPT_STEP is a multiple of one of them). On a CPU, one pass over a 1024-token bucket of 4 rows ran at ~190 tokens/s against ~360 for 256-token
# passes: the [rows, heads, T, S] attention logits of a long pass no longer fit the caches. Chunks cost the same
# matmul FLOPs and one compiled loop body, however long the prompt.
_PREFILL_CHUNK, _PREFILL_CHUNK_ALT = 256, (192, PROMPT_STEP)


def _prefill(model, tokens, positions, kv_valid, cache):
    """(`[batch, chunk, D]` hidden states of the last chunk, cache holding the whole prompt) for left-padded
    `tokens` `[batch, prompt_len]` written at cache slots 0..prompt_len-1."""
    prompt_len = tokens.shape[1]
    chunk = next((c for c in (_PREFILL_CHUNK, *_PREFILL_CHUNK_ALT) if prompt_len % c == 0), prompt_len)
    if chunk >= prompt_len:
        return model.hidden_states(tokens, positions, masks.cached_mask(kv_valid, 0, prompt_len), cache, 0)

    def one_chunk(start, cache):
        piece = lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=1)  # noqa: E731
        return model.hidden_states(piece(tokens), piece(positions), masks.cached_mask(kv_valid, start, chunk),
                                   cache, start)

    def body(i, cache):
        return one_chunk(i * chunk, cache)[1]

    cache = jax.lax.fori_loop(0, prompt_len // chunk - 1, body, cache)
    return one_chunk(prompt_len - chunk, cache)


def _generate(graphdef, mode: _Mode, steps: int, cache_sharding, state, tokens, lengths, budgets, stop_ids,
              temperature, top_p, seed):
    """(`[batch, steps]` tokens, `[batch]` counts, `[batch]` stopped) for left-padded prompts `[batch, prompt_len]`."""
    model = nnx.merge(graphdef, state)
    batch, prompt_len = tokens.shape
    prompt_valid = jnp.arange(prompt_len)[None, :] >= (prompt_len - lengths)[:, None]  # [batch, prompt_len]
    # Generated tokens go to slots prompt_len, prompt_len+1, ... for every row; the causal part of cached_mask hides
    # slots not written yet, so they can be marked valid from the start.
    kv_valid = jnp.concatenate([prompt_valid, jnp.ones((batch, steps), bool)], axis=1)  # [batch, cache_len]
    cache = init_cache(model.cfg, batch, prompt_len + steps)
    if cache_sharding is not None:
        cache = jax.lax.with_sharding_constraint(cache, cache_sharding)
    hidden, cache = _prefill(model, tokens, masks.positions_from_valid(prompt_valid), kv_valid, cache)
    logits = model.logits(hidden[:, -1:])[:, 0]  # [batch, vocab]: only the last position is ever needed
    row_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(batch))
    sample = functools.partial(_next_tokens, row_keys=row_keys, temperature=temperature, top_p=top_p, mode=mode)

    def pick(logits, step) -> dict:
        token = sample(logits, step=step)
        if mode.logprobs < 0:
            return dict(token=token)
        return dict(token=token, token_logprobs=_logprobs(logits, token, mode.logprobs))

    out_logprobs = None
    if mode.logprobs >= 0:
        n = mode.logprobs
        out_logprobs = _TokenLogprobs(jnp.zeros((batch, steps), jnp.float32), jnp.zeros((batch, steps, n), jnp.int32),
                                      jnp.zeros((batch, steps, n), jnp.float32))
    first = _Loop(step=jnp.int32(0), out=jnp.zeros((batch, steps), jnp.int32), count=jnp.zeros((batch,), jnp.int32),
                  stopped=jnp.zeros((batch,), bool), done=budgets <= 0, cache=cache, out_logprobs=out_logprobs,
                  **pick(logits, 0))

    def decode_one(loop: _Loop) -> _Loop:
        slot = prompt_len + loop.step
        hidden, cache = model.hidden_states(loop.token[:, None], (lengths + loop.step)[:, None],
                                            masks.cached_mask(kv_valid, slot, 1), loop.cache, slot)
        picked = pick(model.logits(hidden)[:, 0], loop.step + 1)
        return _record(loop._replace(step=loop.step + 1, cache=cache, **picked), budgets, stop_ids)

    def running(loop: _Loop) -> jax.Array:
        return ~jnp.all(loop.done) & (loop.step + 1 < steps)

    last = jax.lax.while_loop(running, decode_one, _record(first, budgets, stop_ids))
    return last.out, last.count, last.stopped, last.out_logprobs


def row_budgets(n: int, params: SamplingParams, max_new_tokens: Sequence[int] | None) -> list[int]:
    """The token budget of each of `n` prompts: `max_new_tokens` (one per prompt) or else params.max_new_tokens."""
    if max_new_tokens is None:
        return [params.max_new_tokens] * n
    if len(max_new_tokens) != n:
        raise ConfigError(f"max_new_tokens has {len(max_new_tokens)} entries for {n} prompts: give one per prompt")
    for value in max_new_tokens:
        _check_budget(value, "max_new_tokens entry")
    return [int(v) for v in max_new_tokens]


def check_prompts(prompts: Sequence[Sequence[int]], vocab: int) -> list[int]:
    """The prompts' lengths; DataError for an empty prompt or an id outside [0, vocab)."""
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise DataError(f"prompt {row} is empty: give at least one token (e.g. BOS)")
        ids = np.asarray(prompt)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= vocab:
            raise DataError(f"prompt {row} must be a list of token ids in [0, {vocab}), got {list(prompt[:8])!r}...")
    return [len(p) for p in prompts]


def padded_shape(num_prompts: int, longest_prompt: int, longest_budget: int,
                 mesh: Mesh | None = None) -> tuple[int, int, int]:
    """(batch rows, prompt length, decode steps) of the program that a call with these sizes runs: rows, prompt
    tokens and token budget rounded up to their buckets, rows also to a multiple of the mesh's batch shards."""
    shards = 1 if mesh is None else math.prod(mesh.shape[a] for a in BATCH_AXES)
    batch = -(-bucket(num_prompts, 1, BATCH_STEP) // shards) * shards
    return batch, bucket(longest_prompt, 16, PROMPT_STEP), bucket(longest_budget, 16)


def generation_program(graphdef: nnx.GraphDef, params: SamplingParams, vocab_size: int, steps: int,
                       mesh: Mesh | None = None) -> Callable:
    """The jit-wrapped generation (prefill + decode loop) for `steps` decode steps in the sampling mode of `params`;
    lower it with the arguments of `Sampler.generate` (state, tokens, lengths, budgets, stop ids, temperature, top_p,
    seed), or with their ShapeDtypeStructs to compile it ahead of time."""
    cache_sharding = None
    if mesh is not None:
        # Rows over the batch axes; KV heads left to the compiler (they follow the tensor-sharded weights).
        cache_sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES, PartitionSpec.UNCONSTRAINED, None, None))
    return jax.jit(functools.partial(_generate, graphdef, _Mode.of(params, vocab_size), steps, cache_sharding))


# Compiled generation programs of this process, by (architecture, mesh, prefill chunking, shapes, mode).
_PROGRAMS: dict[tuple, Callable] = {}


class Sampler:
    """Generates continuations of token-id prompts with a decoder, batched, on one device or a mesh."""

    def __init__(self, model: Decoder, pad_id: int, stop_ids: Sequence[int] = (), mesh: Mesh | None = None):
        self.model = model
        self.pad_id = int(pad_id)
        self.stop_ids = tuple(sorted({int(s) for s in stop_ids}))
        self.mesh = mesh
        # The graph is fixed; the parameters are read at every call so that training between calls is seen.
        self._graphdef = nnx.graphdef(model)
        self._program_keys: set[tuple] = set()

    @property
    def num_compiled(self) -> int:
        """How many generation programs (bucket shapes × sampling modes) this sampler has needed."""
        return len(self._program_keys)

    def generate(self, prompts: list[list[int]], params: SamplingParams = SamplingParams(),
                 max_new_tokens: list[int] | None = None) -> list[Generation]:
        """One Generation per prompt; `max_new_tokens` (per row) overrides `params.max_new_tokens`."""
        if not prompts:
            return []
        budgets = row_budgets(len(prompts), params, max_new_tokens)
        lengths = check_prompts(prompts, self.model.cfg.vocab_size)
        batch, prompt_len, steps = padded_shape(len(prompts), max(lengths), max(budgets), self.mesh)
        # Rows past the real prompts are dummies: one pad token and no budget, so they are done from the start.
        tokens = np.full((batch, prompt_len), self.pad_id, np.int32)  # [batch, prompt_len], left-padded
        for row, prompt in enumerate(prompts):
            tokens[row, prompt_len - len(prompt):] = prompt
        row_lengths = np.ones(batch, np.int32)
        row_lengths[:len(prompts)] = lengths
        padded_budgets = np.zeros(batch, np.int32)
        padded_budgets[:len(prompts)] = budgets
        args = (nnx.state(self.model), *self._place(tokens, row_lengths, padded_budgets),
                np.asarray(self.stop_ids, np.int32), np.float32(params.temperature), np.float32(params.top_p),
                np.uint32(params.seed))
        program = self._program(params, steps, args)
        out, counts, stopped, logprobs = jax.device_get(program(*args))
        return [self._result(out[row], int(counts[row]), bool(stopped[row]), lengths[row],
                             None if logprobs is None else _TokenLogprobs(*(x[row] for x in logprobs)))
                for row in range(len(prompts))]


    def _place(self, *arrays: np.ndarray) -> tuple:
        """The per-row arrays, split over the mesh's batch axes when there is a mesh."""
        if self.mesh is None:
            return arrays
        return tuple(jax.device_put(a, batch_sharding(self.mesh, a.ndim)) for a in arrays)

    def _program(self, params: SamplingParams, steps: int, args: tuple) -> Callable:
        """The compiled generation program for these argument shapes and this mode (compiled on first use)."""
        # Programs are shared by every sampler of the same architecture on the same mesh: the parameters are an
        # argument, so the evaluation of a base model, its SFT and its DPO checkpoint (and every role on the same
        # model) trace and compile each shape once per process.
        shapes = tuple((np.shape(a), np.result_type(a)) for a in jax.tree.leaves(args))
        mode = _Mode.of(params, self.model.cfg.vocab_size)
        key = (self._graphdef, self.mesh, _PREFILL_CHUNK, _PREFILL_CHUNK_ALT, steps, mode, shapes)
        self._program_keys.add(key)
        if key not in _PROGRAMS:
            program = generation_program(self._graphdef, params, self.model.cfg.vocab_size, steps, self.mesh)
            _PROGRAMS[key] = program.lower(*args).compile()
        return _PROGRAMS[key]

    def _result(self, out: np.ndarray, count: int, stopped: bool, prompt_tokens: int,
                logprobs: _TokenLogprobs | None) -> Generation:
        kept = count - stopped
        extra = {}
        if logprobs is not None:
            extra = dict(logprobs=logprobs.chosen[:kept].tolist(),
                         top_logprobs=[list(zip(ids.tolist(), lps.tolist()))
                                       for ids, lps in zip(logprobs.top_ids[:kept], logprobs.top[:kept])])
        return Generation(tokens=out[:kept].tolist(), finish_reason="stop" if stopped else "length",
                          prompt_tokens=prompt_tokens, completion_tokens=count,
                          stop_token=int(out[kept]) if stopped else None, **extra)
