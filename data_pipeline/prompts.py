"""Prompts of every data-generation role, written for aloe-jax, and a hash of them all for protocol cards.

The roles follow ALOE's protocol (what each role is for), not its wording. Builders return chat messages; parsers
turn raw model text into fields and never raise: a reply that does not parse becomes an empty or None field that the
caller records as such.
"""

from __future__ import annotations

import re

# The extractor role is shared with the evaluation, so it lives in the conversation layer; its names stay here too.
from aloe_jax.conversation.extraction import (EXTRACTOR_SYSTEM, extractor_messages,  # noqa: F401
                                              parse_inferred_persona)
from aloe_jax.conversation.messages import Exchange, prompt_hash as hash_texts, simulator_messages, transcript

PERSONA_FORMAT = {
    "profile": ("a profile: eight to ten plain facts about one person (age, job, where they live, family, "
                "hobbies, habits), about fifty words in one paragraph written in the second person (\"You are ...\")"),
    "personality": ("a personality: eight to ten character traits and the way they show in conversation (tone, "
                    "patience, humour, curiosity, directness), about sixty words in one paragraph written in the "
                    "second person (\"You are ...\")"),
}

PERSONA_GENERATOR_SYSTEM = (
    "You invent realistic, varied people for a dataset. Each person you write must be clearly different from the "
    "examples and from each other: vary age, country, work, family, interests and temperament."
)

USER_SIMULATOR_SYSTEM = (
    "Act as the person described below, chatting with an AI assistant. Never say you are an AI or that you are "
    "playing a role.\n\nWho you are:\n{profile}\n\nHow you behave:\n{personality}\n\n"
    "Write only your next message to the assistant: short (one to three sentences), casual and natural, the way a "
    "real person types. Let details about yourself come out gradually: at most one or two per message, and only when "
    "they fit what you are talking about. Never say again what you already said in this chat, in the same or in "
    "other words. Keep the chat going forward: answer what the assistant just wrote, then ask something new, add a "
    "new detail or turn to a related need this person would really want help with."
)

USER_SIMULATOR_OPENER = "(The chat has just started. Write your first message to the assistant.)"

HINTED_RESPONDER_SYSTEM = (
    "You are a helpful assistant. What you have learned about this user so far (it may be incomplete):\n"
    "Profile: {profile}\nPersonality: {personality}\n"
    "Use it to fit the content and the style of your reply to this person, without telling them you have notes."
)

JUDGE_SYSTEM = (
    "You compare two assistant replies for one specific user whose true description you are given. The better reply "
    "is the one that suits this user: content that fits their life and needs, a tone and style that fit their "
    "personality, and a natural, engaging, concise way of talking. Ignore which reply comes first."
)

JUDGE_USER = (
    "The user's profile:\n{profile}\n\nThe user's personality:\n{personality}\n\n"
    "Conversation so far:\n{transcript}\n\nReply A:\n{reply_a}\n\nReply B:\n{reply_b}\n\n"
    "Which reply suits this user better? Answer with the single letter A or B."
)

JUDGE_RETRY = "Answer with exactly one letter: A or B."

JUDGE_OPTIONS = ("A", "B")


def persona_generator_messages(kind: str, examples: list[str], n_new: int) -> list[dict]:
    """The chat asking for `n_new` personas of `kind`, with `examples` from the pool shown as the format to follow."""
    shown = "\n".join(f"- {e}" for e in examples)
    request = (f"Each entry below is {PERSONA_FORMAT[kind]}.\n\nExamples:\n{shown}\n\n"
               f"Write {n_new} new entries of the same kind, one per line, each line starting with \"- \". "
               "Write nothing else.")
    return [{"role": "system", "content": PERSONA_GENERATOR_SYSTEM}, {"role": "user", "content": request}]


_LIST_MARKER = re.compile(r"^\s*(?:[-*•]|\d+[.)]|\(\d+\))\s*")


def parse_persona_list(text: str, min_words: int) -> list[str]:
    """The entries of a generated list: one per line, list markers and quotes stripped, lines under `min_words`
    words (headings, stray fragments) dropped."""
    entries = []
    for line in text.splitlines():
        entry = _LIST_MARKER.sub("", line).strip().strip('"').strip()
        if len(entry.split()) >= min_words:
            entries.append(entry)
    return entries


def user_simulator_messages(profile: str, personality: str, exchanges: list[Exchange]) -> list[dict]:
    """The simulator's chat: it plays the persona, seeing the conversation so far from the user's side."""
    return simulator_messages(USER_SIMULATOR_SYSTEM.format(profile=profile, personality=personality),
                              USER_SIMULATOR_OPENER, exchanges)


def hinted_responder_messages(inferred_profile: str, inferred_personality: str, spine: list[dict]) -> list[dict]:
    """The hinted responder's chat: the inferred persona as a system message, then the conversation."""
    hint = HINTED_RESPONDER_SYSTEM.format(profile=inferred_profile or "unknown",
                                          personality=inferred_personality or "unknown")
    return [{"role": "system", "content": hint}, *spine]


def plain_responder_messages(spine: list[dict]) -> list[dict]:
    """The plain responder's chat: the conversation alone."""
    return list(spine)


def judge_messages(profile: str, personality: str, spine: list[dict], reply_a: str, reply_b: str) -> list[dict]:
    """The pairwise judge's chat: true persona, conversation so far (ending in the user's message), replies A and B."""
    body = JUDGE_USER.format(profile=profile, personality=personality, transcript=transcript(spine),
                             reply_a=reply_a, reply_b=reply_b)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": body}]


_JUDGE_ANSWER = re.compile(r"^\W*(?:reply\s+)?([AB])\b", re.IGNORECASE)


def parse_judge_choice(text: str) -> str | None:
    """"A" or "B" when the judge's answer starts with exactly one of them (optionally "Reply A", "(B)", ...); None
    otherwise — a strict pattern, so a rambling answer is retried rather than misread."""
    m = _JUDGE_ANSWER.match(text)
    return m.group(1).upper() if m else None


def prompt_hash() -> str:
    """The hash of the prompt templates above, for protocol cards."""
    # JUDGE_RETRY is not hashed: it was not when the hash was introduced, and hashing it now would refuse every
    # existing state folder although no prompt changed.
    return hash_texts(PERSONA_GENERATOR_SYSTEM, *PERSONA_FORMAT.values(), USER_SIMULATOR_SYSTEM, USER_SIMULATOR_OPENER,
                      EXTRACTOR_SYSTEM, HINTED_RESPONDER_SYSTEM, JUDGE_SYSTEM, JUDGE_USER, *JUDGE_OPTIONS)
