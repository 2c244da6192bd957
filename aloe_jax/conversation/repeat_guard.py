"""The user simulator's repeat guard (docs/DESIGN.md §5), one for every script on the engine (tree generation, the
ALOE evaluation, later RL rollouts): a small simulator tends to copy its previous message word for word, and a
conversation stuck in such a loop re-scores the same exchange turn after turn.

A new user message *repeats* when it equals an earlier user message of the same conversation after whitespace and
case are normalised, or — with an embedder — when its cosine similarity to one of them exceeds `threshold`. Only the
rows that repeat are sampled again, together in one batch, with a seed derived from the turn's seed and the attempt
and at `resample_temperature` at least (a 135M simulator at 0.7 keeps copying itself whatever the seed), up to
`max_resamples` times; a row still repeating after that keeps its last message and is counted as a repeat.
Resampling goes through the role's call cache like any call, so a resumed turn replays it. A greedy simulator
(temperature 0) gives the same message for every seed: the guard then only counts.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np
import pydantic

from aloe_jax.conversation.engine import derive_seed
from aloe_jax.core.config import StrictModel
from aloe_jax.llm.base import ChatResult, Conversation, GenerationParams
from aloe_jax.llm.roles import Role

# texts → [len(texts), dim] unit-norm embeddings (dot product = cosine similarity), e.g. SentenceEncoder.encode.
Embedder = Callable[[Sequence[str]], np.ndarray]


class RepeatGuardConfig(StrictModel):
    """How hard the guard tries: `max_resamples` new samples at most per message (0: only count repeats), and the
    MiniLM cosine similarity above which a message counts as a repeat (None: exact repeats only, no encoder)."""

    max_resamples: int = pydantic.Field(3, ge=0)
    repeat_threshold: float | None = pydantic.Field(0.9, ge=-1.0, le=1.0)
    resample_temperature: float | None = pydantic.Field(1.0, ge=0.0)  # None: the turn's own temperature


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

    @classmethod
    def from_config(cls, cfg: RepeatGuardConfig, embed: Embedder | None = None) -> "RepeatGuard":
        return cls(cfg.max_resamples, cfg.repeat_threshold, embed if cfg.repeat_threshold is not None else None,
                   cfg.resample_temperature)

    def repeats(self, messages: Sequence[str], earlier: Sequence[Sequence[str]]) -> list[bool]:
        """Per row: does `messages[i]` repeat one of `earlier[i]` (exactly, or by similarity above the threshold)?"""
        flags = [normalise(m) in {normalise(e) for e in past} for m, past in zip(messages, earlier)]
        check = [i for i, flag in enumerate(flags) if not flag and earlier[i]]
        if self.embed is None or self.threshold is None or not check:
            return flags
        texts = [messages[i] for i in check] + [e for i in check for e in earlier[i]]
        vectors = np.asarray(self.embed(texts))
        offset = len(check)
        for j, i in enumerate(check):
            past = vectors[offset:offset + len(earlier[i])]
            offset += len(earlier[i])
            flags[i] = bool(np.max(past @ vectors[j]) > self.threshold)
        return flags

    def chat(self, role: Role, chats: Sequence[Conversation], params: GenerationParams,
             earlier: Sequence[Sequence[str]]) -> Guarded:
        """`role`'s messages for `chats`, each row resampled while it repeats one of `earlier[row]` (the user
        messages of that conversation so far)."""
        results = list(role.chat(chats, params))
        repeated = self.repeats([r.text for r in results], earlier)
        resamples = [0] * len(results)
        tries = self.max_resamples if params.temperature > 0 else 0  # greedy: every seed gives the same message
        for attempt in range(1, tries + 1):
            rows = [i for i, flag in enumerate(repeated) if flag]
            if not rows:
                break
            retry = params.model_copy(update={"seed": derive_seed(params.seed, "resample", attempt),
                                              "temperature": max(params.temperature, self.resample_temperature or 0.0)})
            fresh = role.chat([chats[i] for i in rows], retry)
            again = self.repeats([r.text for r in fresh], [earlier[i] for i in rows])
            for i, result, flag in zip(rows, fresh, again):
                results[i], repeated[i] = result, flag
                resamples[i] += 1
        return Guarded(results, resamples, repeated)
