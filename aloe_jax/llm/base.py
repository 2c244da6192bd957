"""The ChatBackend protocol every LLM role calls, and the values that cross it."""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np
import pydantic

from aloe_jax.core.config import StrictModel

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": "..."}
Conversation = list[Message]


class GenerationParams(StrictModel):
    """Sampling settings for one batch of chat calls (part of the cache key)."""

    temperature: float = pydantic.Field(0.0, ge=0.0)
    top_p: float = pydantic.Field(1.0, gt=0.0, le=1.0)
    top_k: int = pydantic.Field(0, ge=0)
    max_tokens: int = pydantic.Field(256, gt=0)
    stop: tuple[str, ...] = ()
    seed: int = 0


@dataclasses.dataclass
class ChatResult:
    """One reply: its text, why it ended, and the tokens it cost."""

    text: str
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int
    cached: bool = False  # from the call cache (nothing was computed)
    cached_tokens: int = 0  # of prompt_tokens: found in the backend's session cache instead of prefilled


class ChatBackend(Protocol):
    """Anything that turns conversations into replies: the in-process JAX engine or an OpenAI-compatible endpoint."""

    name: str  # identifies backend + model in cache keys and protocol cards, e.g. "jax:smollm2-135m"

    def chat(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[ChatResult]:
        """One reply per conversation, in order."""
        ...

    def score_options(self, conversations: Sequence[Conversation], options: Sequence[str]) -> np.ndarray | None:
        """`[n_conversations, n_options]` log-probabilities of each option as the assistant's reply, or None when the
        backend cannot score (then judges fall back to parsing free text)."""
        ...
