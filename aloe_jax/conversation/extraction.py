"""The extractor role, shared by tree generation (the hinted responder reads what it infers) and the evaluation
(how much of the true persona a conversation so far reveals): its prompt, the chat it is sent and the parser of its
two-line answer, which never raises."""

from __future__ import annotations

import re

from aloe_jax.conversation.messages import transcript

EXTRACTOR_SYSTEM = (
    "You read a conversation between a user and an assistant and note what can be inferred about the user. Be "
    "careful: write only what the messages support, and say \"unknown\" rather than guess.\n"
    "Answer in exactly two lines:\nProfile: <facts about the user's life, comma separated>\n"
    "Personality: <the user's traits and conversational style, comma separated>"
)


def extractor_messages(spine: list[dict]) -> list[dict]:
    """The chat asking what the conversation so far reveals about the user."""
    return [{"role": "system", "content": EXTRACTOR_SYSTEM},
            {"role": "user", "content": f"Conversation:\n{transcript(spine)}"}]


_PROFILE_LINE = re.compile(r"^\W*profile\W*:\s*(.*)$", re.IGNORECASE)
_PERSONALITY_LINE = re.compile(r"^\W*personalit(?:y|ies)\W*:\s*(.*)$", re.IGNORECASE)


def parse_inferred_persona(text: str) -> tuple[str, str]:
    """(profile, personality) from the extractor's two lines; a reply without the labels counts as profile text."""
    profile = personality = None
    for line in text.splitlines():
        if profile is None and (m := _PROFILE_LINE.match(line)):
            profile = m.group(1).strip()
        elif personality is None and (m := _PERSONALITY_LINE.match(line)):
            personality = m.group(1).strip()
    if profile is None and personality is None:
        return text.strip(), ""
    return profile or "", personality or ""
