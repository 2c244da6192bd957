"""The per-turn judge: a 1–5 score for each reply, never an exception for an answer it cannot read.

Two ways to get a score:
- `logprobs` (local models, or endpoints that return them): the log-probability of each option "1".."5" as the start
  of the judge's answer. The score is the most likely option; the expected score (options weighted by their
  probability renormalised over the five) is kept too, since it moves before the argmax does.
- `text` (any chat endpoint): greedy generation, read with a strict pattern; an unreadable answer is retried by
  telling the judge what went wrong, and after the last retry the turn is recorded as missing (None), never as 0.
Every raw answer (or the option log-probabilities) goes into the record. Both ways are the shared
`aloe_jax.conversation.judging.OptionJudge` over the options "1".."5".
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Sequence

import numpy as np

from aloe_jax.conversation.judging import JudgeMethod, OptionJudge
from aloe_jax.eval.prompts import JUDGE_RETRY, SCORE_OPTIONS
from aloe_jax.llm.base import Conversation, GenerationParams
from aloe_jax.llm.roles import Role

# The whole answer, once markdown emphasis is stripped: an optional "Score:"/"Rating:" label, one digit 1–5, an
# optional "/5" and an optional final period. Anything else ("I'd say 4", "3 or 4", "45") is not a score.
_SCORE_PATTERN = re.compile(r"(?:(?:score|rating)\s*[:=]?\s*)?([1-5])(?:\s*/\s*5)?\s*\.?", re.IGNORECASE)
_EMPHASIS = re.compile(r"[*_`]")


def parse_score(text: str) -> int | None:
    """The 1–5 score a judge's answer states, or None when the answer is not exactly a score."""
    match = _SCORE_PATTERN.fullmatch(_EMPHASIS.sub("", text).strip())
    return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The judge's score for one reply (None: missing) and the raw material it came from."""

    score: int | None
    method: JudgeMethod
    expected_score: float | None = None
    option_logprobs: list[float] | None = None  # [5] for "1".."5", logprobs method only
    option_mass: float | None = None  # total probability the judge put on the five options
    raw: list[str] = dataclasses.field(default_factory=list)  # every text answer, in order, text method only

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def verdict_from_logprobs(option_logprobs: Sequence[float]) -> Verdict | None:
    """A Verdict from the `[5]` log-probabilities of "1".."5"; None when none of them is finite."""
    logps = np.asarray(option_logprobs, dtype=np.float64)
    if not np.any(np.isfinite(logps)) or np.any(np.isnan(logps)):
        return None
    top = np.max(logps)
    weights = np.exp(logps - top)  # -inf options get weight 0
    probs = weights / weights.sum()
    values = np.arange(1, len(logps) + 1)
    return Verdict(score=int(values[np.argmax(logps)]), method="logprobs",
                   expected_score=float(np.dot(probs, values)),
                   option_logprobs=[float(x) if math.isfinite(x) else None for x in logps],
                   option_mass=float(np.exp(top) * weights.sum()))


def _score_option(text: str) -> str | None:
    score = parse_score(text)
    return None if score is None else SCORE_OPTIONS[score - 1]


class Judge:
    """Scores batches of judge chats on a Role."""

    def __init__(self, role: Role, method: JudgeMethod = "logprobs", max_retries: int = 2, max_tokens: int = 8):
        self.options_judge = OptionJudge(role, SCORE_OPTIONS, _score_option, JUDGE_RETRY, max_retries,
                                         use_logprobs=method == "logprobs")
        self.max_tokens = max_tokens

    def score(self, chats: Sequence[Conversation], seed: int = 0) -> list[Verdict]:
        """One Verdict per chat; chats the option scorer cannot handle fall back to reading text (sampling seed
        `seed`)."""
        rulings = self.options_judge.rule(chats, GenerationParams(temperature=0.0, max_tokens=self.max_tokens,
                                                                  seed=seed))
        return [verdict_from_logprobs(r.option_logprobs) if r.method == "logprobs"
                else Verdict(score=None if r.choice is None else int(r.choice), method="text", raw=r.raw)
                for r in rulings]
