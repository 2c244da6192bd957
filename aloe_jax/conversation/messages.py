"""Chat messages built one way for every role: a conversation's history as the responder sees it, the same history
mirrored for the user simulator, as a plain-text transcript for judges — and the hash that pins a stage's prompt texts
in its protocol card."""

from __future__ import annotations

import hashlib
from typing import Sequence

from aloe_jax.llm.base import Conversation

Exchange = tuple[str, str]  # (the user's message, the assistant's reply) of one finished turn


def chat_messages(exchanges: Sequence[Exchange], user: str | None = None, system: str | None = None) -> Conversation:
    """The conversation an assistant continues: `system` (if any), every exchange, then the new `user` message (if
    any)."""
    messages = [{"role": "system", "content": system}] if system else []
    for past_user, past_reply in exchanges:
        messages += [{"role": "user", "content": past_user}, {"role": "assistant", "content": past_reply}]
    return messages + ([{"role": "user", "content": user}] if user is not None else [])


def simulator_messages(system: str, opener: str, exchanges: Sequence[Exchange]) -> Conversation:
    """The user simulator's chat for its next message: its persona prompt `system`, the `opener` that asks for the
    first message, then the conversation mirrored — the simulator speaks as the assistant of its own chat, and the
    replies it is answering arrive as the user's messages."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": opener}]
    for past_user, past_reply in exchanges:
        messages += [{"role": "assistant", "content": past_user}, {"role": "user", "content": past_reply}]
    return messages


def transcript(messages: Conversation) -> str:
    """The user and assistant messages as plain text lines `User: ...` / `Assistant: ...` (system prompts left out)."""
    names = {"user": "User", "assistant": "Assistant"}
    return "\n".join(f"{names[m['role']]}: {m['content']}" for m in messages if m["role"] in names)


def prompt_hash(*texts: str) -> str:
    """16 hex digits of sha256 over `texts`: two runs used the same prompts exactly when their hashes are equal."""
    return hashlib.sha256("\x1e".join(texts).encode("utf-8")).hexdigest()[:16]
