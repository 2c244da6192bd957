"""Judges, one way: a judge picks one of a fixed set of options (reply "A" or "B", a score "1".."5") for each chat.

The log-probability of each option as the start of the judge's answer is asked for first (local models, endpoints
that return them); a chat the backend cannot score — or whose options all come back impossible — is answered in text
instead, read by a strict parser. An unreadable answer is retried with a corrective message and a fresh seed (the same
chat and seed would be answered from the call cache), and after the last retry the chat is recorded as undecided
(None), never as a guess.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal, Sequence

import numpy as np

from aloe_jax.llm.base import Conversation, GenerationParams
from aloe_jax.llm.roles import Role

JudgeMethod = Literal["logprobs", "text"]


@dataclasses.dataclass(frozen=True)
class Ruling:
    """What the judge said about one chat: the option it chose (None: no usable answer) and what that came from."""

    choice: str | None
    method: JudgeMethod
    option_logprobs: np.ndarray | None = None  # [n_options], logprobs method only
    raw: list[str] = dataclasses.field(default_factory=list)  # every text answer in order, text method only


def _scorable(row: np.ndarray) -> bool:
    return bool(np.any(np.isfinite(row)) and not np.any(np.isnan(row)))


class OptionJudge:
    """Asks a judge Role to choose among `options` for batches of chats."""

    def __init__(self, role: Role, options: Sequence[str], parse: Callable[[str], str | None], retry_message: str,
                 max_retries: int, use_logprobs: bool = True):
        self.role, self.options, self.parse, self.retry_message = role, tuple(options), parse, retry_message
        self.max_retries, self.use_logprobs = max_retries, use_logprobs

    def rule(self, chats: Sequence[Conversation], params: GenerationParams) -> list[Ruling]:
        """One Ruling per chat; `params` sample the text answers (their seed is the first attempt's)."""
        rulings: list[Ruling | None] = [None] * len(chats)
        if self.use_logprobs and chats:
            rows = self.role.score_options(list(chats), self.options)  # [n_chats, n_options] or None
            if rows is not None:
                rulings = [Ruling(self.options[int(np.argmax(row))], "logprobs", row) if _scorable(row) else None
                           for row in rows]
        todo = [i for i, r in enumerate(rulings) if r is None]
        for i, ruling in zip(todo, self._rule_by_text([chats[i] for i in todo], params)):
            rulings[i] = ruling
        return rulings

    def _rule_by_text(self, chats: Sequence[Conversation], params: GenerationParams) -> list[Ruling]:
        raws: list[list[str]] = [[] for _ in chats]
        choices: list[str | None] = [None] * len(chats)
        pending = list(range(len(chats)))
        for attempt in range(1 + self.max_retries):
            if not pending:
                break
            asked = [list(chats[i]) if attempt == 0 else [*chats[i], {"role": "assistant", "content": raws[i][-1]},
                                                          {"role": "user", "content": self.retry_message}]
                     for i in pending]
            answers = self.role.chat(asked, params.model_copy(update={"seed": params.seed + attempt}))
            for i, answer in zip(pending, answers):
                raws[i].append(answer.text)
                choices[i] = self.parse(answer.text)
            pending = [i for i in pending if choices[i] is None]
        return [Ruling(choices[i], "text", raw=raws[i]) for i in range(len(chats))]
