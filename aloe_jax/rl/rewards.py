"""The rewards of an RL rollout's candidate replies (RewardConfig): reward = judge·s + persona·p − length·l, each
component kept with the candidate.

- s: the per-turn judge's 1–5 score of the reply the user saw (the expected score over the option probabilities when
  the judge gives them, the stated digit otherwise); a candidate the judge gives no usable score gets reward None.
- p: how much of the true persona the policy has worked out, as the MiniLM cosine similarity of an inferred persona
  with the true "profile personality" text: the inferred persona is either a `<persona>…</persona>` block the policy
  writes in its reply (stripped from what the user and the judge see; no block scores 0), or the extractor role's
  answer on the conversation so far with the candidate, scored field by field as `aloe_jax.eval.knowing` does.
- l: the candidate's completion tokens over the rollout's max_tokens.

A whole batch of candidates is scored in one judge call (and one extractor call, one embedding call).

`KeywordJudge` is a rule-based judge backend for tests and toy runs: it rates a reply high when it contains a word.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from aloe_jax.conversation.engine import derive_seed
from aloe_jax.conversation.extraction import extractor_messages, parse_inferred_persona
from aloe_jax.conversation.messages import chat_messages
from aloe_jax.conversation.records import Candidate
from aloe_jax.eval import prompts
from aloe_jax.eval.judge import Judge, Verdict
from aloe_jax.eval.knowing import Embed, similarities
from aloe_jax.llm.base import ChatBackend, ChatResult, Conversation, GenerationParams
from aloe_jax.llm.roles import BackendConfig, Role, make_backend
from aloe_jax.rl.config import RewardConfig

_BLANK_LINES = re.compile(r"\n[ \t]*\n(?:[ \t]*\n)+")
_SPACES = re.compile(r"[ \t]{2,}")
_SPACE_AT_EOL = re.compile(r"[ \t]+\n|\n[ \t]+")


def strip_persona_tag(text: str, tag: str) -> tuple[str, str | None]:
    """(`text` with every `<tag>…</tag>` block removed and the whitespace left around them tidied, the content of the
    first block or None when there is none). Tags match case-insensitively; a block left open (the reply ran out of
    tokens inside it) runs to the end of the text, and a stray closing tag is removed too."""
    name = re.escape(tag)
    block = re.compile(rf"<\s*{name}\s*>(.*?)(?:<\s*/\s*{name}\s*>|\Z)", re.IGNORECASE | re.DOTALL)
    first = block.search(text)
    if first is None and not re.search(rf"<\s*/\s*{name}\s*>", text, re.IGNORECASE):
        return text, None
    visible = block.sub(" ", text)
    visible = re.sub(rf"<\s*/\s*{name}\s*>", " ", visible, flags=re.IGNORECASE)
    visible = _SPACE_AT_EOL.sub("\n", visible)
    visible = _SPACES.sub(" ", _BLANK_LINES.sub("\n\n", visible)).strip()
    return visible, None if first is None else first.group(1).strip()


def judge_value(verdict: Verdict | None) -> float | None:
    """The judge's score of a verdict as a reward: the expected score when there is one, else the stated score."""
    if verdict is None:
        return None
    value = verdict.expected_score if verdict.expected_score is not None else verdict.score
    return None if value is None or not math.isfinite(value) else float(value)


class Rewards:
    """Scores the G candidate replies of each conversation of a rollout turn (see the module docstring).

    `histories[i]` are conversation i's earlier exchanges as the user and the judge saw them; `embed` (texts →
    embeddings, e.g. SentenceEncoder().encode) is needed only when the persona reward is on, and `extractor` (with
    `extractor_params`, seeded per call) only for persona_source "extractor"."""

    def __init__(self, cfg: RewardConfig, judge: Judge, history_turns: int, max_tokens: int, embed: Embed | None = None,
                 extractor: Role | None = None, extractor_params: GenerationParams | None = None):
        self.cfg, self.judge, self.history_turns, self.max_tokens = cfg, judge, history_turns, max_tokens
        self.embed, self.extractor = embed, extractor
        self.extractor_params = extractor_params or GenerationParams(temperature=0.0, max_tokens=128)
        if cfg.persona:
            if embed is None:
                raise ValueError("the persona reward needs an embedder (embed=SentenceEncoder().encode)")
            if cfg.persona_source == "extractor" and extractor is None:
                raise ValueError("reward.persona_source 'extractor' needs the extractor role")

    def card(self) -> dict:
        """What decides the rewards, for a run's fingerprint."""
        return {**self.cfg.model_dump(mode="json"), "judge_history_turns": self.history_turns,
                "max_tokens": self.max_tokens,
                **({"extractor": self.extractor.backend.name,
                    "extractor_generation": self.extractor_params.model_dump(mode="json", exclude={"seed"})}
                   if self.cfg.persona and self.cfg.persona_source == "extractor" else {})}

    def score(self, cases, histories: list[list[tuple[str, str]]], users: list[str], replies: list[list[ChatResult]],
              seed: int) -> list[list[Candidate]]:
        """The scored Candidates of every conversation: `cases[i]` (with .profile and .personality), its earlier
        exchanges `histories[i]` (visible texts), the user's message `users[i]` and the policy's G replies
        `replies[i]`; `seed` seeds the judge's (and the extractor's) sampling."""
        flat = [(i, r) for i, group in enumerate(replies) for r in group]
        stripped = [strip_persona_tag(r.text, self.cfg.persona_tag) for _, r in flat]
        chats = [prompts.judge_messages(cases[i], histories[i], users[i], visible, self.history_turns)
                 for (i, _), (visible, _) in zip(flat, stripped)]
        verdicts = self.judge.score(chats, seed=seed) if chats else []
        persona = self._persona(cases, histories, users, flat, stripped, seed) if self.cfg.persona else None
        candidates: list[list[Candidate]] = [[] for _ in replies]
        for k, ((i, reply), (visible, _), verdict) in enumerate(zip(flat, stripped, verdicts)):
            s = judge_value(verdict)
            parts: dict[str, float | None] = {"judge": s}
            if self.cfg.persona:
                parts["persona"] = persona[k]
            if self.cfg.length:
                parts["length"] = reply.completion_tokens / self.max_tokens
            total = None
            if s is not None:
                total = (self.cfg.judge * s + self.cfg.persona * parts.get("persona", 0.0)
                         - self.cfg.length * parts.get("length", 0.0))
            candidates[i].append(Candidate(
                text=reply.text, visible=None if visible == reply.text else visible, reward=total, rewards=parts,
                tokens=reply.completion_tokens, finish=reply.finish_reason,
                judge=None if verdict is None else verdict.to_json()))
        return candidates

    def _persona(self, cases, histories, users, flat, stripped, seed: int) -> list[float]:
        """p of every candidate of `flat`, in order."""
        if self.cfg.persona_source == "tag":
            true = [f"{cases[i].profile} {cases[i].personality}" for i, _ in flat]
            return similarities(self.embed, [inferred or "" for _, inferred in stripped], true)
        conversations: list[Conversation] = [
            chat_messages([*histories[i], (users[i], visible)]) for (i, _), (visible, _) in zip(flat, stripped)]
        params = self.extractor_params.model_copy(update={"seed": derive_seed(seed, "extractor")})
        answers = self.extractor.chat([extractor_messages(c) for c in conversations], params)
        inferred = [parse_inferred_persona(a.text) for a in answers]
        profile = similarities(self.embed, [p for p, _ in inferred], [cases[i].profile for i, _ in flat])
        personality = similarities(self.embed, [q for _, q in inferred], [cases[i].personality for i, _ in flat])
        return [(a + b) / 2 for a, b in zip(profile, personality)]


class KeywordJudge:
    """A rule-based judge backend: a judge chat (`aloe_jax.eval.prompts.judge_messages`) whose reply contains `word`
    (case-insensitively, anywhere) scores `hit`, any other `miss` — as (almost) all the option probability on that
    digit, or as the digit in text."""

    _REST = 1e-6  # probability left on each other option

    def __init__(self, word: str, hit: int = 5, miss: int = 1, name: str | None = None):
        if not word:
            raise ValueError("KeywordJudge needs a non-empty word")
        self.word, self.hit, self.miss = word, hit, miss
        self.name = name or f"keyword:{word}:{hit}/{miss}"

    def value(self, conversation: Conversation) -> int:
        """The score of one judge chat."""
        return self.hit if self.word.lower() in prompts.reply_in_judge_chat(conversation).lower() else self.miss

    def chat(self, conversations: Sequence[Conversation], params: GenerationParams) -> list[ChatResult]:
        return [ChatResult(str(self.value(c)), "stop", 0, 1) for c in conversations]

    def score_options(self, conversations: Sequence[Conversation], options: Sequence[str]) -> np.ndarray:
        rows = np.full((len(conversations), len(options)), -np.inf)
        for row, conversation in zip(rows, conversations):
            answer = str(self.value(conversation))
            if answer in options:  # otherwise the row stays impossible and the judge reads chat() instead
                row[:] = math.log(self._REST)
                row[list(options).index(answer)] = math.log1p(-self._REST * (len(options) - 1))
        return rows


def rl_backend(cfg: BackendConfig) -> ChatBackend:
    """The backend a role of `aloe-jax rl` names: the rule-based KeywordJudge for kind `keyword` (its `model` is the
    word), otherwise what `make_backend` builds."""
    return KeywordJudge(cfg.model) if cfg.kind == "keyword" else make_backend(cfg)
