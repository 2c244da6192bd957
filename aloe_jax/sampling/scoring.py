"""Log-probabilities of candidate continuations (e.g. multiple-choice answers) after prompts, in batched forwards."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from aloe_jax.core.errors import DataError
from aloe_jax.models import masks
from aloe_jax.models.decoder import Decoder
from aloe_jax.sampling.sampler import PROMPT_STEP, bucket


@functools.partial(jax.jit, static_argnums=0)
def _row_logprobs(graphdef, state, tokens, valid, starts, targets, target_valid):
    """`[rows]` summed log-probs of `targets` `[rows, option_len]` predicted from positions starts, starts+1, ...

    tokens, valid: `[rows, seq]` right-padded prompt + option; starts `[rows]`: index of the last prompt token.
    """
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(tokens, masks.positions_from_valid(valid), masks.causal_mask(valid))
    # Project only the positions that predict option tokens: the full [rows, seq, vocab] logits would dwarf the rest.
    where = jnp.minimum(starts[:, None] + jnp.arange(targets.shape[1]), tokens.shape[1] - 1)  # [rows, option_len]
    logits = model.logits(jnp.take_along_axis(hidden, where[..., None], axis=1))  # [rows, option_len, vocab]
    logps = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(target_valid, logps, 0.0), axis=-1)


@functools.partial(jax.jit, static_argnums=0)
def _next_token_logprobs(graphdef, state, tokens, valid, starts, option_ids):
    """`[rows, n_options]` log-probs of single-token options `[n_options]` as the token after position `starts`."""
    model = nnx.merge(graphdef, state)
    hidden, _ = model.hidden_states(tokens, masks.positions_from_valid(valid), masks.causal_mask(valid))
    logits = model.logits(jnp.take_along_axis(hidden, starts[:, None, None], axis=1))[:, 0]  # [rows, vocab]
    return jax.nn.log_softmax(logits, axis=-1)[:, option_ids]


def _check(sequences: list[list[int]], what: str, vocab: int, allow_empty: bool) -> None:
    for i, seq in enumerate(sequences):
        if not seq:
            if allow_empty:
                continue
            raise DataError(f"{what} {i} is empty: give at least one token")
        ids = np.asarray(seq)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0 or ids.max() >= vocab:
            raise DataError(f"{what} {i} must be a list of token ids in [0, {vocab}), got {seq[:8]!r}...")


def score_options(model: Decoder, prompts: list[list[int]], options: list[list[int]], batch_size: int = 32,
                  pad_id: int = 0) -> np.ndarray:
    """`[n_prompts, n_options]` float32: total log-probability of each option's tokens following each prompt.

    When every option is at most one token (a judge's "1".."5", "A"/"B"), each prompt is one row and one forward
    scores all its options. Otherwise every (prompt, option) pair is one right-padded row. Rows go through the model
    `batch_size` at a time, with rows and lengths rounded up to buckets so that repeated calls reuse a few compiled
    shapes. An empty option scores 0.
    """
    vocab = model.cfg.vocab_size
    _check(prompts, "prompt", vocab, allow_empty=False)
    _check(options, "option", vocab, allow_empty=True)
    if prompts and options and all(len(o) <= 1 for o in options):
        return _score_single_tokens(model, prompts, options, batch_size, pad_id)
    pairs = [(p, o) for p in prompts for o in options]
    if not pairs:
        return np.zeros((len(prompts), len(options)), np.float32)
    graphdef, state = nnx.split(model)
    seq_len = bucket(max(len(p) + len(o) for p, o in pairs), 16, PROMPT_STEP)
    option_len = bucket(max(len(o) for o in options), 1)
    scores = []
    for first in range(0, len(pairs), batch_size):
        chunk = pairs[first:first + batch_size]
        rows = bucket(len(chunk), 1)
        # Padding rows are a lone pad token with nothing to score.
        tokens = np.full((rows, seq_len), pad_id, np.int32)  # [rows, seq]
        valid = np.zeros((rows, seq_len), bool)
        valid[:, 0] = True
        starts = np.zeros(rows, np.int32)
        targets = np.zeros((rows, option_len), np.int32)  # [rows, option_len]
        target_valid = np.zeros((rows, option_len), bool)
        for row, (prompt, option) in enumerate(chunk):
            tokens[row, :len(prompt) + len(option)] = prompt + option
            valid[row, :len(prompt) + len(option)] = True
            starts[row] = len(prompt) - 1
            targets[row, :len(option)] = option
            target_valid[row, :len(option)] = True
        logps = _row_logprobs(graphdef, state, tokens, valid, starts, targets, target_valid)
        scores.append(np.asarray(logps)[:len(chunk)])
    return np.concatenate(scores).reshape(len(prompts), len(options))


def _score_single_tokens(model: Decoder, prompts: list[list[int]], options: list[list[int]], batch_size: int,
                         pad_id: int) -> np.ndarray:
    """score_options when no option is longer than one token: one row per prompt instead of one per pair."""
    graphdef, state = nnx.split(model)
    seq_len = bucket(max(len(p) for p in prompts), 16, PROMPT_STEP)
    option_ids = np.asarray([o[0] if o else 0 for o in options], np.int32)
    scores = []
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first:first + batch_size]
        rows = bucket(len(chunk), 1)
        tokens = np.full((rows, seq_len), pad_id, np.int32)  # [rows, seq], right-padded
        valid = np.zeros((rows, seq_len), bool)
        valid[:, 0] = True
        starts = np.zeros(rows, np.int32)
        for row, prompt in enumerate(chunk):
            tokens[row, :len(prompt)] = prompt
            valid[row, :len(prompt)] = True
            starts[row] = len(prompt) - 1
        logps = _next_token_logprobs(graphdef, state, tokens, valid, starts, option_ids)
        scores.append(np.asarray(logps)[:len(chunk)])
    out = np.concatenate(scores)
    out[:, [i for i, o in enumerate(options) if not o]] = 0.0  # an empty option adds nothing
    return out.astype(np.float32)
