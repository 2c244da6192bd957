"""Knowing vs doing, and how far to trust the judge — two measurements beside AL(k), stored in the turn records so
a resumed run and `aloe-jax eval-report` rebuild them.

*Knowing*: after each turn the extractor role (the one tree generation runs, `aloe_jax.conversation.extraction`)
reads the conversation so far and writes what it infers about the user; each inferred field is scored against the
true one by cosine similarity of MiniLM embeddings (`knowing_profile`, `knowing_personality`, and `knowing`, their
mean). An inferred field left empty scores 0 (nothing recovered). A model that adapts should both know more and do
better; a simulator that reveals everything at turn 1 shows up as a flat, saturated curve.

*Judge probe*: a seeded share of (case, turn) is scored again with the 1–5 scale listed backwards (5 first) and
another seed. Its agreement with the first score and the share of judgments that chose the first-listed score
(1 forwards, 5 backwards) are the judge's calibration (`aloe_jax.conversation.calibration`).
"""

from __future__ import annotations

import random
import re
from typing import Callable, Sequence

import numpy as np

from aloe_jax.conversation.calibration import Calibration, calibrate
from aloe_jax.conversation.engine import derive_seed, seeded
from aloe_jax.conversation.extraction import EXTRACTOR_SYSTEM, extractor_messages, parse_inferred_persona
from aloe_jax.conversation.messages import Exchange, chat_messages, prompt_hash
from aloe_jax.eval import prompts
from aloe_jax.eval.cases import EvalCase
from aloe_jax.eval.judge import Judge, Verdict
from aloe_jax.llm.base import Conversation, GenerationParams
from aloe_jax.llm.roles import Role

Embed = Callable[[Sequence[str]], np.ndarray]  # texts → [n, dim] embeddings (e.g. SentenceEncoder().encode)
ENCODER_NAME = "all-MiniLM-L6-v2"
KNOWING_FIELDS = ("knowing_profile", "knowing_personality", "knowing")

# The judge's scale line, and the same options listed backwards for the probe (read from the prompt, not copied).
_SCALE = re.search(r"Scale: (.+?)\.\n", prompts.JUDGE_USER)
SCALE_FORWARD = _SCALE.group(0)
_ITEMS = _SCALE.group(1).split(", ")
assert [item.split(" = ")[0] for item in _ITEMS] == list(prompts.SCORE_OPTIONS), _ITEMS
SCALE_REVERSED = "Scale: " + ", ".join(reversed(_ITEMS)) + ".\n"


def extraction_hash() -> str:
    """The hash of the extractor's prompt, for the protocol card."""
    return prompt_hash(EXTRACTOR_SYSTEM)


def probe_hash() -> str:
    """The hash of the probe's reversed scale, for the protocol card."""
    return prompt_hash(SCALE_REVERSED)


def similarities(embed: Embed, inferred: Sequence[str], true: Sequence[str]) -> list[float]:
    """Cosine similarity of each inferred text with its true text; 0 where the inferred text is empty."""
    vectors = np.asarray(embed([*inferred, *true]), dtype=np.float64)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    n = len(inferred)
    cos = np.sum(vectors[:n] * vectors[n:], axis=1)
    return [float(c) if text.strip() else 0.0 for c, text in zip(cos, inferred)]


class Knowing:
    """The extractor on a Role, its answers scored by `embed`."""

    def __init__(self, role: Role, generation: GenerationParams, embed: Embed, seed: int,
                 encoder_name: str = ENCODER_NAME):
        self.role, self.generation, self.embed, self.seed = role, generation, embed, seed
        self.encoder_name = encoder_name

    def card(self) -> dict:
        """What decides the knowing fields, for the protocol card."""
        return {"extractor": self.role.backend.name, "prompt_hash": extraction_hash(), "encoder": self.encoder_name,
                "generation": self.generation.model_dump(mode="json", exclude={"seed"})}

    def measure(self, cases: Sequence[EvalCase], conversations: Sequence[Sequence[Exchange]], turn: int) -> list[dict]:
        """The record fields of each case after turn `turn`; `conversations` hold every exchange so far."""
        answers = self.role.chat([extractor_messages(chat_messages(c)) for c in conversations],
                                 seeded(self.generation, self.seed, "extractor", turn))
        inferred = [parse_inferred_persona(a.text) for a in answers]
        profile = similarities(self.embed, [p for p, _ in inferred], [c.profile for c in cases])
        personality = similarities(self.embed, [q for _, q in inferred], [c.personality for c in cases])
        return [{"inferred_profile": p, "inferred_personality": q, "knowing_profile": sp,
                 "knowing_personality": sq, "knowing": (sp + sq) / 2}
                for (p, q), sp, sq in zip(inferred, profile, personality)]


def reversed_scale(chat: Conversation) -> Conversation:
    """The judge's chat with its scale listed backwards."""
    return [{**m, "content": m["content"].replace(SCALE_FORWARD, SCALE_REVERSED)} for m in chat]


class JudgeProbe:
    """Scores a seeded share of (case, turn) again, with the scale listed backwards and another seed."""

    def __init__(self, judge: Judge, fraction: float, seed: int, flag_first_shown: float = 0.8):
        self.judge, self.fraction, self.seed, self.flag_first_shown = judge, fraction, seed, flag_first_shown

    def card(self) -> dict:
        """What decides the probe's records (and the flag's threshold, which the report reads), for the card."""
        return {"fraction": self.fraction, "variant": "scale listed 5 to 1, another seed",
                "prompt_hash": probe_hash(), "flag_first_shown": self.flag_first_shown}

    def selected(self, case_id: str, turn: int) -> bool:
        return self.fraction > 0 and random.Random(derive_seed(self.seed, case_id, turn, "judge_probe")).random() \
            < self.fraction

    def score(self, case_ids: Sequence[str], chats: Sequence[Conversation], turn: int) -> list[Verdict | None]:
        """The probe's Verdict of each selected chat, None for the others."""
        picked = [i for i, case_id in enumerate(case_ids) if self.selected(case_id, turn)]
        verdicts: list[Verdict | None] = [None] * len(chats)
        scored = self.judge.score([reversed_scale(chats[i]) for i in picked],
                                  seed=derive_seed(self.seed, "judge_probe", turn)) if picked else []
        for i, verdict in zip(picked, scored):
            verdicts[i] = verdict
        return verdicts


def probe_calibration(records: Sequence[dict], max_first_shown_rate: float) -> Calibration:
    """The judge's calibration over the probed records: (score, chose 1) forwards vs (score, chose 5) backwards."""
    first, last = prompts.SCORE_OPTIONS[0], prompts.SCORE_OPTIONS[-1]
    pairs = [(r.get("score"), str(r.get("score")) == first, r["judge_probe"].get("score"),
              str(r["judge_probe"].get("score")) == last)
             for r in records if isinstance(r.get("judge_probe"), dict)]
    return calibrate(pairs, len(prompts.SCORE_OPTIONS), max_first_shown_rate)


def score_distribution(scores: np.ndarray, ran: np.ndarray) -> list[dict]:
    """Per turn: how many cases got each score 1–5, and how many ran without one (`scores` [cases, turns], NaN
    missing or not run; `ran` [cases, turns] bool)."""
    scores = np.asarray(scores, np.float64)
    return [{**{option: int(np.sum(scores[:, k] == int(option))) for option in prompts.SCORE_OPTIONS},
             "missing": int(np.sum(ran[:, k] & np.isnan(scores[:, k])))} for k in range(scores.shape[1])]
