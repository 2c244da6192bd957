"""The preference-tree record: one conversation per JSONL line (docs/DESIGN.md §3), shared by the data pipeline that
writes it and the trainer that reads it."""

from __future__ import annotations

import json
from typing import Literal

import pydantic

from aloe_jax.conversation.messages import Exchange, chat_messages
from aloe_jax.core.errors import DataError


class JudgeRecord(pydantic.BaseModel):
    """What the pairwise judge saw and said: the order the two replies were shown in, and its raw output."""

    model_config = pydantic.ConfigDict(extra="allow")
    order: Literal["AB", "BA", "both"] | None = None
    raw: str | list[str] | None = None
    agreed: bool | None = None


class Candidate(pydantic.BaseModel):
    """One of the G replies sampled for a turn of an RL rollout, with its reward (None: no usable judge score) and
    the reward's components (judge, persona, length, ... as configured)."""

    model_config = pydantic.ConfigDict(extra="forbid")
    text: str  # what the policy wrote (and is trained on)
    visible: str | None = None  # what the user and the judge saw, when it differs (a stripped <persona> block)
    reward: float | None = None
    rewards: dict[str, float | None] = pydantic.Field(default_factory=dict)
    tokens: int | None = None  # completion tokens the policy sampled (the visible text may be shorter)
    finish: str | None = None  # "stop" | "length"
    judge: dict | None = None  # the judge's verdict on it


class Turn(pydantic.BaseModel):
    """One turn: the user's message, the two candidate replies, and which one the conversation continued with.

    An RL rollout turn also holds all G scored `candidates` and the index of the one the conversation continued with
    (`continued_candidate`); its (preferred, rejected) pair is then the continued candidate and the extreme of the
    others (the worst when the continued one scored at least the group's mean, the best otherwise), so a rollout is
    DPO data as it stands and every existing tool reads it."""

    model_config = pydantic.ConfigDict(extra="forbid")
    user: str
    preferred: str
    rejected: str
    continued: Literal["preferred", "rejected"] = "preferred"
    inferred_profile: str | None = None
    inferred_personality: str | None = None
    judge: JudgeRecord | None = None
    judged: bool = True  # False when the judge never gave a usable verdict (the pair is then not trained on)
    candidates: list[Candidate] | None = None  # RL rollouts only: every sampled reply of the turn, scored
    continued_candidate: int | None = None  # RL rollouts only: index into `candidates` of the continued reply

    @pydantic.model_validator(mode="after")
    def _candidates_agree(self) -> "Turn":
        if self.candidates is None:
            return self
        if self.continued_candidate is None or not 0 <= self.continued_candidate < len(self.candidates):
            raise ValueError(f"continued_candidate {self.continued_candidate} is not an index into the "
                             f"{len(self.candidates)} candidates")
        if self.candidates[self.continued_candidate].text != self.reply(self.continued):
            raise ValueError("the continued candidate's text differs from the continued reply")
        return self

    def reply(self, which: Literal["preferred", "rejected"]) -> str:
        return self.preferred if which == "preferred" else self.rejected

    @property
    def side(self) -> Literal["preferred", "rejected"]:
        """The reply that did not continue the conversation."""
        return "rejected" if self.continued == "preferred" else "preferred"


class TreeRecord(pydantic.BaseModel):
    """A whole conversation tree: persona, turns along the spine, and provenance."""

    model_config = pydantic.ConfigDict(extra="forbid")
    id: str
    profile: str = ""
    personality: str = ""
    system: str | None = None  # system prompt the responders saw, if any
    turns: list[Turn] = pydantic.Field(min_length=1)
    meta: dict = pydantic.Field(default_factory=dict)

    def history(self, turn: int) -> list[dict]:
        """The chat messages before turn `turn`'s reply: the spine so far plus that turn's user message."""
        return chat_messages(spine_exchanges(self.turns[:turn]), self.turns[turn].user, self.system)

    def spine(self) -> list[dict]:
        """The whole conversation along the continued replies."""
        last = self.turns[-1]
        return self.history(len(self.turns) - 1) + [{"role": "assistant", "content": last.reply(last.continued)}]


def rollout_turn(user: str, candidates: list[Candidate], continued: int, **fields) -> Turn:
    """The Turn of an RL rollout: all `candidates`, the conversation continued with `candidates[continued]`, and the
    (preferred, rejected) pair of the class docstring (`judged` False when the pair has no strict winner)."""
    others = [c for i, c in enumerate(candidates) if i != continued and c.reward is not None]
    chosen = candidates[continued]
    if chosen.reward is None or not others:
        other = next((c for i, c in enumerate(candidates) if i != continued), chosen)
        return Turn(user=user, preferred=chosen.text, rejected=other.text, judged=False, candidates=candidates,
                    continued_candidate=continued, **fields)
    scored = [c.reward for c in candidates if c.reward is not None]
    if chosen.reward >= sum(scored) / len(scored):
        other = min(others, key=lambda c: c.reward)
        pair = dict(preferred=chosen.text, rejected=other.text, continued="preferred")
    else:
        other = max(others, key=lambda c: c.reward)
        pair = dict(preferred=other.text, rejected=chosen.text, continued="rejected")
    return Turn(user=user, **pair, judged=other.reward != chosen.reward, candidates=candidates,
                continued_candidate=continued, **fields)


def spine_exchanges(turns: list[Turn]) -> list[Exchange]:
    """(user message, continued reply) of each turn: the conversation as it went on."""
    return [(t.user, t.reply(t.continued)) for t in turns]


def parse_tree(line: str, where: str = "") -> TreeRecord:
    """A TreeRecord from one JSON line; a malformed record is a DataError naming where it came from."""
    try:
        return TreeRecord.model_validate_json(line)
    except pydantic.ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise DataError(f"malformed tree record{' at ' + where if where else ''}: {loc}: {first['msg']}") from None


def tree_to_row(record: TreeRecord) -> dict:
    """A flat, Arrow-friendly row of a tree: `judge` and `candidates` of each turn and `meta` as JSON strings (a
    judge's raw output is a string or a list, which one Arrow column cannot hold)."""
    turns = [{**t.model_dump(exclude={"judge", "candidates"}),
              "judge": None if t.judge is None else t.judge.model_dump_json(),
              "candidates": None if t.candidates is None else json.dumps([c.model_dump() for c in t.candidates],
                                                                         ensure_ascii=False)}
             for t in record.turns]
    return {"id": record.id, "profile": record.profile, "personality": record.personality, "system": record.system,
            "turns": turns, "meta": json.dumps(record.meta, ensure_ascii=False)}


def row_json(row: dict, where: str = "") -> str:
    """The TreeRecord JSON of a `tree_to_row` row (validated later, by `parse_tree`)."""
    try:
        turns = [{**t, "judge": None if t.get("judge") is None else json.loads(t["judge"]),
                  "candidates": None if t.get("candidates") is None else json.loads(t["candidates"])}
                 for t in row["turns"]]
        meta = json.loads(row["meta"]) if row.get("meta") else {}
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"malformed tree row{' at ' + where if where else ''}: {type(err).__name__}: {err}") from None
    return json.dumps({**row, "turns": turns, "meta": meta}, ensure_ascii=False)


def row_to_tree(row: dict, where: str = "") -> TreeRecord:
    """The tree a `tree_to_row` row holds; a malformed row is a DataError naming where it came from."""
    return parse_tree(row_json(row, where), where)
