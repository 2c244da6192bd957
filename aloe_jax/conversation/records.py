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


class Turn(pydantic.BaseModel):
    """One turn: the user's message, the two candidate replies, and which one the conversation continued with."""

    model_config = pydantic.ConfigDict(extra="forbid")
    user: str
    preferred: str
    rejected: str
    continued: Literal["preferred", "rejected"] = "preferred"
    inferred_profile: str | None = None
    inferred_personality: str | None = None
    judge: JudgeRecord | None = None
    judged: bool = True  # False when the judge never gave a usable verdict (the pair is then not trained on)

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
    """A flat, Arrow-friendly row of a tree: `judge` of each turn and `meta` as JSON strings (a judge's raw output is
    a string or a list, which one Arrow column cannot hold)."""
    turns = [{**t.model_dump(exclude={"judge"}),
              "judge": None if t.judge is None else t.judge.model_dump_json()} for t in record.turns]
    return {"id": record.id, "profile": record.profile, "personality": record.personality, "system": record.system,
            "turns": turns, "meta": json.dumps(record.meta, ensure_ascii=False)}


def row_json(row: dict, where: str = "") -> str:
    """The TreeRecord JSON of a `tree_to_row` row (validated later, by `parse_tree`)."""
    try:
        turns = [{**t, "judge": None if t.get("judge") is None else json.loads(t["judge"])} for t in row["turns"]]
        meta = json.loads(row["meta"]) if row.get("meta") else {}
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"malformed tree row{' at ' + where if where else ''}: {type(err).__name__}: {err}") from None
    return json.dumps({**row, "turns": turns, "meta": meta}, ensure_ascii=False)


def row_to_tree(row: dict, where: str = "") -> TreeRecord:
    """The tree a `tree_to_row` row holds; a malformed row is a DataError naming where it came from."""
    return parse_tree(row_json(row, where), where)
