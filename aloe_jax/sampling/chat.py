"""Conversations in, replies out: the family's chat template, the batched sampler, and decoding of the generated ids.

A reply is the decoded *generated token ids* — never text split on a template marker, which breaks as soon as the
template changes (the original ALOE split on a Llama-3-only header).

With sessions on, replies are decoded through a `SessionCache` (`sampling/sessions.py`): each conversation is matched
to the cache row holding its longest prefix, so a caller sending whole conversations turn after turn prefills only
what is new. The replies are the same as without (a session turn is a re-prefill computed in fewer steps); scoring
does not use the sessions.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from jax.sharding import Mesh

from aloe_jax.models.decoder import Decoder
from aloe_jax.sampling.sampler import Sampler, SamplingParams
from aloe_jax.sampling.scoring import score_options
from aloe_jax.sampling.sessions import SessionCache
from aloe_jax.models.tokenizer import encode_chat, stop_token_ids


@dataclasses.dataclass(frozen=True)
class ChatReply:
    """One assistant reply and what it cost."""

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    token_ids: tuple[int, ...]
    # With SamplingParams.top_logprobs set (see sampler.Generation): per token of token_ids.
    logprobs: tuple[float, ...] | None = None
    top_logprobs: tuple[tuple[tuple[int, float], ...], ...] | None = None
    cached_tokens: int = 0  # prompt tokens found in a session cache row instead of prefilled (0 without sessions)


class ChatEngine:
    """Replies to, and scores options for, batches of HF-format conversations with one in-process model.

    `sessions`: True decodes replies through a `SessionCache` of `session_cache_bytes` at most, its KV in `kv_dtype`
    (None: the model's compute dtype); a SessionCache may also be given (then the other two are its own). Callers that
    share the engine (several roles on one model) each end up with a pool of their own rows.
    """

    def __init__(self, model: Decoder, tokenizer, mesh: Mesh | None = None, sessions: bool | SessionCache = False,
                 kv_dtype: str | None = None, session_cache_bytes: int = 8 * 2**30):
        self.model, self.tokenizer = model, tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad if pad is not None else 0)
        stop_ids = stop_token_ids(tokenizer)
        self.sampler = Sampler(model, pad_id=self.pad_id, stop_ids=stop_ids, mesh=mesh)
        if sessions is True:
            sessions = SessionCache(model, stop_ids, kv_dtype, int(session_cache_bytes), mesh)
        self.sessions: SessionCache | None = sessions or None

    def prompt_ids(self, conversation: Sequence[dict]) -> list[int]:
        """Token ids of a conversation followed by the assistant's generation prompt."""
        return encode_chat(self.tokenizer, list(conversation), add_generation_prompt=True)[0]

    def reply(self, conversations: Sequence[Sequence[dict]], params: SamplingParams = SamplingParams(),
              max_new_tokens: list[int] | None = None) -> list[ChatReply]:
        """One reply per conversation, all decoded as one batch."""
        prompts = [self.prompt_ids(c) for c in conversations]
        if self.sessions is not None:
            generations = self.sessions.generate(prompts, params, max_new_tokens)
        else:
            generations = self.sampler.generate(prompts, params, max_new_tokens)
        return [
            ChatReply(
                text=self.tokenizer.decode(g.tokens, skip_special_tokens=True).strip(),
                finish_reason=g.finish_reason,
                prompt_tokens=g.prompt_tokens,
                completion_tokens=g.completion_tokens,
                token_ids=tuple(g.tokens),
                logprobs=None if g.logprobs is None else tuple(g.logprobs),
                top_logprobs=None if g.top_logprobs is None else tuple(tuple(t) for t in g.top_logprobs),
                cached_tokens=getattr(g, "cached_tokens", 0),
            )
            for g in generations
        ]

    def option_ids(self, option: str) -> list[int]:
        """Token ids of an option as the start of an assistant reply."""
        return self.tokenizer.encode(option, add_special_tokens=False)

    def score_options(self, conversations: Sequence[Sequence[dict]], options: Sequence[str]) -> np.ndarray:
        """`[n_conversations, n_options]` log-probability of each option as the beginning of the assistant reply."""
        prompts = [self.prompt_ids(c) for c in conversations]
        return score_options(self.model, prompts, [self.option_ids(o) for o in options], pad_id=self.pad_id)
