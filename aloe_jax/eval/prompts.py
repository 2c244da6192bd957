"""Prompts of the two evaluation roles — the user simulator and the per-turn judge — written for aloe-jax, and a hash
of them for the protocol card (two runs are comparable only when their prompts hash alike)."""

from __future__ import annotations

from aloe_jax.conversation import messages
from aloe_jax.conversation.messages import Exchange
from aloe_jax.eval.cases import EvalCase

SIMULATOR_SYSTEM = (
    "You are role-playing a real person who is chatting with an AI assistant. Stay in character the whole time and "
    "never mention that you are an AI, a simulation or playing a part.\n\n"
    "Facts about you:\n{profile}\n\nYour character:\n{personality}\n\n"
    "Write only your next chat message. Keep it short (one to three sentences) and natural, like someone typing on "
    "a phone, in the voice your character would use. Do not introduce yourself all at once: let a fact or a trait "
    "show only when it fits what you are talking about, one or two per message at most. Never repeat or restate "
    "anything you already wrote earlier in this chat, not even in other words. Each message must take the "
    "conversation somewhere new: react to what the assistant just said, then ask a follow-up, raise a new detail "
    "of your problem or move to a related topic this person would really care about."
)

SIMULATOR_OPENER = "(The chat is starting now. Write your first message to the assistant.)"

JUDGE_SYSTEM = (
    "You rate how well an AI assistant's reply suits one particular user. You know who the user really is; the "
    "assistant does not, and has to work it out from the conversation."
)

JUDGE_USER = (
    "Who the user really is.\nFacts: {profile}\nCharacter: {personality}\n\n"
    "{history}"
    "The user's latest message:\n{user}\n\nThe assistant's reply to rate:\n{reply}\n\n"
    "Rate the reply on these three points together:\n"
    "1. its tone and style fit the user's character;\n"
    "2. its content fits the facts of the user's life and what they need;\n"
    "3. it sounds human, engaging and concise rather than generic or long-winded.\n"
    "Scale: 1 = ignores who this user is, 2 = mostly generic, 3 = partly tailored, 4 = well tailored, "
    "5 = could hardly suit this user better.\n"
    "Answer with one digit from 1 to 5 and nothing else."
)

JUDGE_HISTORY = "Earlier in the conversation:\n{turns}\n\n"

JUDGE_RETRY = "That answer could not be read as a score. Reply with a single digit from 1 to 5 and nothing else."

SCORE_OPTIONS = ("1", "2", "3", "4", "5")


def prompt_hash() -> str:
    """The hash of every prompt text above, for the protocol card."""
    return messages.prompt_hash(SIMULATOR_SYSTEM, SIMULATOR_OPENER, JUDGE_SYSTEM, JUDGE_USER, JUDGE_HISTORY,
                                JUDGE_RETRY, *SCORE_OPTIONS)


def simulator_messages(case: EvalCase, history: list[Exchange]) -> list[dict]:
    """The simulator's chat for its next message, playing `case`; `history` holds the exchanges so far."""
    return messages.simulator_messages(SIMULATOR_SYSTEM.format(profile=case.profile, personality=case.personality),
                                       SIMULATOR_OPENER, history)


def judge_messages(case: EvalCase, history: list[Exchange], user: str, reply: str, history_turns: int) -> list[dict]:
    """The judge's chat for rating `reply` to `user`, showing the last `history_turns` earlier exchanges."""
    shown = history[-history_turns:] if history_turns > 0 else []
    earlier = ""
    if shown:
        earlier = JUDGE_HISTORY.format(turns=messages.transcript(messages.chat_messages(shown)))
    content = JUDGE_USER.format(profile=case.profile, personality=case.personality, history=earlier, user=user,
                                reply=reply)
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": content}]


def _reply_markers() -> tuple[str, str]:
    """The template text right before `{reply}` (from the previous field on) and the first line of text after it,
    read from JUDGE_USER so they follow the template."""
    import string

    parts = list(string.Formatter().parse(JUDGE_USER))  # (literal text, field name, spec, conversion)
    at = next(i for i, (_, field, _, _) in enumerate(parts) if field == "reply")
    before = parts[at][0]
    after = parts[at + 1][0] if at + 1 < len(parts) else ""
    assert before and after.strip(), "JUDGE_USER needs fixed text on both sides of {reply}"
    lead = len(after) - len(after.lstrip("\n"))  # the blank lines that end the reply's paragraph
    line_end = after.find("\n", lead)
    return before, after if line_end < 0 else after[:line_end + 1]


_REPLY_BEFORE, _REPLY_AFTER = _reply_markers()


def reply_in_judge_chat(chat: list[dict]) -> str:
    """The reply a judge chat built by `judge_messages` rates (also after a text retry appended messages, or with its
    scale rewritten). The reply is read between the last occurrences of the template's fixed text around `{reply}`,
    so only a reply that itself contains that fixed text is misread. A ValueError when `chat` is no judge chat."""
    for message in chat:
        if message.get("role") != "user":
            continue
        content = message.get("content", "")
        end = content.rfind(_REPLY_AFTER)
        start = content.rfind(_REPLY_BEFORE, 0, end) if end >= 0 else -1
        if start >= 0:
            return content[start + len(_REPLY_BEFORE):end]
    raise ValueError("not a judge chat built by judge_messages: no user message holds the reply to rate")
