"""The user simulator's repeat guard (docs/DESIGN.md §5), one for every script on the engine (tree generation, the
ALOE evaluation, later RL rollouts): a small simulator tends to copy its previous message word for word, and a
conversation stuck in such a loop re-scores the same exchange turn after turn.

A new user message *repeats* when it equals an earlier user message of the same conversation after whitespace and
case are normalised, or — with an embedder — when its cosine similarity to one of them exceeds `threshold`. Only the
rows that repeat are sampled again, together in one batch, with a seed derived from the turn's seed and the attempt,
at `resample_temperature` at least and at `resample_top_p` (where a simulator copying itself gives a copy's next
token more than 0.9 of its mass, a 0.9 nucleus holds nothing else to draw), up to `max_resamples` times. With
`nudge` on, a resample's chat also ends with RESAMPLE_NUDGE, a note asking for something new (the protocol card
carries its hash). Of all the candidates a row drew, it keeps the one least similar to its earlier messages; a row
whose best candidate still repeats is counted as a repeat. Resampling goes through the role's call cache like any
call, so a resumed turn replays it. A greedy simulator (temperature 0) gives the same message for every seed: the
guard then only counts. `python -m benchmarks.loop_guard` replays one turn of a committed evaluation under each
setting.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import numpy as np
import pydantic

from aloe_jax.conversation.engine import derive_seed
from aloe_jax.conversation.messages import prompt_hash
from aloe_jax.core.config import StrictModel
from aloe_jax.llm.base import ChatResult, Conversation, GenerationParams
from aloe_jax.llm.roles import Role

# texts → [len(texts), dim] unit-norm embeddings (dot product = cosine similarity), e.g. SentenceEncoder.encode.
Embedder = Callable[[Sequence[str]], np.ndarray]


class RepeatGuardConfig(StrictModel):
    """How hard the guard tries: `max_resamples` new samples at most per message (0: only count repeats), and the
    MiniLM cosine similarity above which a message counts as a repeat (None: exact repeats only, no encoder)."""

    max_resamples: int = pydantic.Field(6, ge=0)
    repeat_threshold: float | None = pydantic.Field(0.9, ge=-1.0, le=1.0)
    resample_temperature: float | None = pydantic.Field(1.0, ge=0.0)  # None: the turn's own temperature
    resample_top_p: float | None = pydantic.Field(1.0, gt=0.0, le=1.0)  # None: the turn's own top_p
    nudge: bool = True  # resamples see RESAMPLE_NUDGE at the end of their chat


# Appended to the last message of a resample's chat (the reply the simulated user answers): written for aloe-jax.
RESAMPLE_NUDGE = ("\n\n(Your draft answer repeated a message you already sent in this chat. Write a different one: "
                  "react to what was just said, or bring up one thing about yourself you have not mentioned yet.)")


def normalise(text: str) -> str:
    """`text` lower-cased with its whitespace collapsed: what an exact repeat is compared on."""
    return " ".join(text.lower().split())


@dataclasses.dataclass
class Guarded:
    """The guarded messages of one call, row by row: the results, how many times each was resampled, and whether
    it still repeats."""

    results: list[ChatResult]
    resamples: list[int]
    repeated: list[bool]


@dataclasses.dataclass
class RepeatGuard:
    """Rejects and resamples simulator messages that repeat an earlier one of their conversation."""

    max_resamples: int = 3
    threshold: float | None = 0.9
    embed: Embedder | None = None  # None: exact repeats only
    resample_temperature: float | None = None  # resamples draw at max(the turn's temperature, this)
    resample_top_p: float | None = None  # resamples draw with this top_p (None: the turn's own)
    nudge: bool = False  # resamples see RESAMPLE_NUDGE at the end of their chat

    @classmethod
    def from_config(cls, cfg: RepeatGuardConfig, embed: Embedder | None = None) -> "RepeatGuard":
        return cls(cfg.max_resamples, cfg.repeat_threshold, embed if cfg.repeat_threshold is not None else None,
                   cfg.resample_temperature, cfg.resample_top_p, cfg.nudge)

    def card(self) -> dict:
        """What the guard does, for a protocol card: a changed guard is a changed protocol."""
        return {"max_resamples": self.max_resamples, "repeat_threshold": self.threshold,
                "resample_temperature": self.resample_temperature, "resample_top_p": self.resample_top_p,
                "nudge": prompt_hash(RESAMPLE_NUDGE) if self.nudge else None}

    def closeness(self, messages: Sequence[str], earlier: Sequence[Sequence[str]]) -> list[float]:
        """Per row: how close `messages[i]` comes to one of `earlier[i]`: inf for an exact repeat, else the highest
        cosine similarity (with an embedder), else -inf (nothing earlier, or no embedder)."""
        closest = [math.inf if normalise(m) in {normalise(e) for e in past} else -math.inf
                   for m, past in zip(messages, earlier)]
        check = [i for i, c in enumerate(closest) if c < math.inf and earlier[i]]
        if self.embed is None or self.threshold is None or not check:
            return closest
        texts = [messages[i] for i in check] + [e for i in check for e in earlier[i]]
        vectors = np.asarray(self.embed(texts))
        offset = len(check)
        for j, i in enumerate(check):
            past = vectors[offset:offset + len(earlier[i])]
            offset += len(earlier[i])
            closest[i] = float(np.max(past @ vectors[j]))
        return closest

    def is_repeat(self, closeness: float) -> bool:
        return closeness == math.inf or (self.threshold is not None and closeness > self.threshold)

    def repeats(self, messages: Sequence[str], earlier: Sequence[Sequence[str]]) -> list[bool]:
        """Per row: does `messages[i]` repeat one of `earlier[i]` (exactly, or by similarity above the threshold)?"""
        return [self.is_repeat(c) for c in self.closeness(messages, earlier)]

    def chat(self, role: Role, chats: Sequence[Conversation], params: GenerationParams,
             earlier: Sequence[Sequence[str]]) -> Guarded:
        """`role`'s messages for `chats`, each row resampled while it repeats one of `earlier[row]` (the user
        messages of that conversation so far)."""
        results = list(role.chat(chats, params))
        closest = self.closeness([r.text for r in results], earlier)
        resamples = [0] * len(results)
        tries = self.max_resamples if params.temperature > 0 else 0  # greedy: every seed gives the same message
        retry_update = {"temperature": max(params.temperature, self.resample_temperature or 0.0)}
        if self.resample_top_p is not None:
            retry_update["top_p"] = self.resample_top_p
        for attempt in range(1, tries + 1):
            rows = [i for i, c in enumerate(closest) if self.is_repeat(c)]
            if not rows:
                break
            retry = params.model_copy(update={**retry_update, "seed": derive_seed(params.seed, "resample", attempt)})
            fresh = role.chat([self._nudged(chats[i]) for i in rows], retry)
            again = self.closeness([r.text for r in fresh], [earlier[i] for i in rows])
            for i, result, c in zip(rows, fresh, again):
                resamples[i] += 1
                if c <= closest[i]:  # the least similar candidate so far (ties: the newer one)
                    results[i], closest[i] = result, c
        return Guarded(results, resamples, [self.is_repeat(c) for c in closest])

    def _nudged(self, chat: Conversation) -> Conversation:
        if not self.nudge or not chat:
            return chat
        *head, last = chat
        return [*head, {**last, "content": last["content"] + RESAMPLE_NUDGE}]
