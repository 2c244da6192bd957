"""Preference-tree generation (`aloe-jax trees`): for each planned (profile, personality) pair, `turns` rounds of

  user simulator (plays the true persona) → extractor (infers the persona from the chat so far) →
  hinted responder (sees the inferred persona) and plain responder (does not) → pairwise judge (sees the true persona)

with every conversation of a batch advancing turn k together, one batched call per role: a script on the conversation
engine (`aloe_jax.conversation.engine`).

Crash safety: each finished turn of a conversation is one fsync'd line `{"id", "turn" (from 0), "data"}` in
`<state_dir>/turns.jsonl`, and every LLM call goes through the SQLite call cache in `<state_dir>/calls.sqlite`. A rerun
therefore skips finished conversations and committed turns entirely and replays the calls of an interrupted turn from
the cache; history is rebuilt from committed turns only, so a retry can never append a turn twice. The tree JSONL is
rewritten atomically from the committed turns, each planned conversation once.

Seeds: the plan (which pairs) comes from the run seed; each conversation gets a seed derived from the run seed and
its id, which fixes the judge's display order and the continued branch of each turn; sampling seeds of a batch are
derived from the run seed, role and turn. All of them are recorded in the record's `meta`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from typing import Sequence

from aloe_jax.conversation.calibration import Calibration, calibrate
from aloe_jax.conversation.engine import (ConversationRun, Fingerprint, Histories, Stopwatch, derive_seed,
                                          seeded)
from aloe_jax.conversation.judging import OptionJudge
from aloe_jax.conversation.messages import chat_messages
from aloe_jax.conversation.records import JudgeRecord, TreeRecord, Turn, spine_exchanges
from aloe_jax.conversation.repeat_guard import Embedder, RepeatGuard
from aloe_jax.core import jsonl_log, storage
from aloe_jax.core.errors import ConfigError, DataError
from aloe_jax.llm.base import ChatBackend, GenerationParams
from aloe_jax.llm.cache import CallCache
from aloe_jax.llm.roles import Role, make_backend
from aloe_jax.llm.usage import UsageMeter
from data_pipeline import prompts
from aloe_jax.conversation.aloe_pools import load_pool
from data_pipeline.config import DatagenConfig
from data_pipeline.personas import read_pool_file

TREE_ROLES = ("user", "extractor", "hinted", "plain", "judge")
PROTOCOL = "aloe-jax trees v1"


@dataclasses.dataclass(frozen=True)
class PlannedConversation:
    """One conversation of the sampling plan."""

    id: str
    profile: str
    personality: str
    seed: int


def make_plan(profiles: Sequence[str], personalities: Sequence[str], n: int, seed: int) -> list[PlannedConversation]:
    """`n` distinct (profile, personality) pairs drawn at random (deterministic in `seed`), each with its own seed."""
    total = len(profiles) * len(personalities)
    if total == 0:
        raise DataError("tree generation needs at least one profile and one personality")
    if n > total:
        raise ConfigError(f"trees.conversations={n} exceeds the {len(profiles)} × {len(personalities)} = {total} "
                          f"distinct (profile, personality) pairs: lower it or grow the pools")
    picks = random.Random(f"plan:{seed}").sample(range(total), n)
    plan = []
    for pick in picks:
        i, j = divmod(pick, len(personalities))
        conv_id = f"s{seed}-p{i:04d}-q{j:03d}"
        plan.append(PlannedConversation(conv_id, profiles[i], personalities[j], derive_seed(seed, conv_id)))
    return plan


def build_roles(cfg: DatagenConfig, cache: CallCache | None, meter: UsageMeter | None,
                backends: dict[str, ChatBackend] | None = None) -> dict[str, Role]:
    """The tree roles, each on its configured backend (or the one given in `backends`), with cache and meter."""
    backends = backends or {}
    return {name: Role(name, backends.get(name) or make_backend(getattr(cfg.roles, name).backend), cache, meter)
            for name in TREE_ROLES}


@dataclasses.dataclass
class _Verdict:
    winner: str | None  # "hinted" | "plain" | None when the judge gave no usable answer
    record: JudgeRecord


class TreeScript:
    """Tree generation as a script on the conversation engine: one turn is user simulator → extractor → hinted and
    plain responders → pairwise judge, each one batched call over the conversations of the batch."""

    first_turn = 0

    def __init__(self, cfg: DatagenConfig, roles: dict[str, Role], embed: Embedder | None = None):
        self.cfg, self.tc, self.roles = cfg, cfg.trees, roles
        self.guard = RepeatGuard.from_config(cfg.trees, embed)  # without `embed`: exact repeats only
        self.judge = OptionJudge(roles["judge"], prompts.JUDGE_OPTIONS, prompts.parse_judge_choice,
                                 prompts.JUDGE_RETRY, self.tc.judge_retries)

    def conversation_id(self, conv: PlannedConversation) -> str:
        return conv.id

    def position(self, record: dict) -> tuple:
        return record.get("id"), record.get("turn")

    def _params(self, role: str, turn: int) -> GenerationParams:
        return seeded(getattr(self.cfg.roles, role).generation, self.cfg.seed, role, turn)

    def _orders(self, convs: list[PlannedConversation], turn: int) -> list[str]:
        if self.tc.judge_order == "both":
            return ["both"] * len(convs)
        return [random.Random(derive_seed(c.seed, turn, "order")).choice(["AB", "BA"]) for c in convs]

    def _swap_on(self) -> bool:
        return self.tc.judge_order == "random" and self.tc.judge_swap_fraction > 0

    def _swapped(self, conv: PlannedConversation, turn: int) -> bool:
        """Whether this turn's pair is also judged in the swapped order (a seeded share of turns), to measure the
        judge; the data keep the verdict of the first order."""
        return self._swap_on() and random.Random(derive_seed(conv.seed, turn, "swap")).random() < \
            self.tc.judge_swap_fraction

    def _judge(self, convs, spines, hinted, plain, turn) -> list[_Verdict]:
        orders = self._orders(convs, turn)
        chats, shown = [], []  # shown[j] = (conversation index, "AB" | "BA") of judge chat j
        for i, c in enumerate(convs):
            swap = {"AB": "BA", "BA": "AB"}.get(orders[i]) if self._swapped(c, turn) else None
            for order in (("AB", "BA") if orders[i] == "both" else (orders[i], swap) if swap else (orders[i],)):
                a, b = (hinted[i], plain[i]) if order == "AB" else (plain[i], hinted[i])
                chats.append(prompts.judge_messages(c.profile, c.personality, spines[i], a, b))
                shown.append((i, order))
        rulings = self.judge.rule(chats, self._params("judge", turn))
        per_conv: list[list[tuple]] = [[] for _ in convs]  # per conversation: (winner, raw, hinted margin, method)
        order_winners: list[dict] = [{} for _ in convs]  # per conversation: order → winner, for the calibration
        for (i, order), ruling in zip(shown, rulings):
            winner = None if ruling.choice is None else (
                "hinted" if (ruling.choice == "A") == (order == "AB") else "plain")
            if ruling.method == "logprobs":
                a, b = ruling.option_logprobs
                margin_a = float(a - b)
                per_conv[i].append((winner, f"A={a:.4f} B={b:.4f}",
                                    margin_a if order == "AB" else -margin_a, "logprob"))
            else:
                raw = ruling.raw[0] if len(ruling.raw) == 1 else ruling.raw
                per_conv[i].append((winner, raw, None, "text"))
            order_winners[i][order] = winner
        verdicts = []
        for i, views in enumerate(per_conv):
            winners = [w for w, _, _, _ in views]
            raws = [r for _, r, _, _ in views]
            scored = all(m == "logprob" for _, _, _, m in views)
            method = "logprob" if scored else "text"
            both = {"order_winners": order_winners[i]} if len(views) == 2 else {}
            if orders[i] != "both":
                # A swapped probe: the winner of each order and the probe's raw answer are kept beside the verdict.
                both |= {"swap_raw": raws[1]} if len(views) == 2 else {}
                record = JudgeRecord(order=orders[i], raw=raws[0], method=method, winner=winners[0], **both)
                verdicts.append(_Verdict(winners[0], record))
                continue
            agreed = None not in winners and winners[0] == winners[1]
            winner = winners[0] if agreed else None
            if scored and not agreed:
                # Scores exist for both orders: the reply with the larger total margin wins; the disagreement stays
                # recorded (agreed=False) as a measure of position bias.
                winner = "hinted" if sum(m for _, _, m, _ in views) >= 0 else "plain"
            flat_raw = [r if isinstance(r, str) else " | ".join(r) for r in raws]
            verdicts.append(_Verdict(winner, JudgeRecord(order="both", raw=flat_raw, agreed=agreed, method=method,
                                                         winner=winner, **both)))
        return verdicts

    def turn(self, convs: list[PlannedConversation], histories: list[list[dict]], turn: int,
             stopwatch: Stopwatch) -> list[dict]:
        """The log records of turn `turn` for `convs`, whose committed records are `histories`."""
        exchanges = [spine_exchanges([Turn.model_validate(r["data"]) for r in h]) for h in histories]
        with stopwatch("user"):
            guarded = self.guard.chat(
                self.roles["user"],
                [prompts.user_simulator_messages(c.profile, c.personality, e) for c, e in zip(convs, exchanges)],
                self._params("user", turn), [[u for u, _ in e] for e in exchanges])
            users = [r.text for r in guarded.results]
        spines = [chat_messages(e, u) for e, u in zip(exchanges, users)]
        with stopwatch("extractor"):
            extracted = self.roles["extractor"].chat([prompts.extractor_messages(s) for s in spines],
                                                     self._params("extractor", turn))
        inferred = [prompts.parse_inferred_persona(r.text) for r in extracted]
        with stopwatch("hinted"):
            hinted = [r.text for r in self.roles["hinted"].chat(
                [prompts.hinted_responder_messages(p, q, s) for (p, q), s in zip(inferred, spines)],
                self._params("hinted", turn))]
        with stopwatch("plain"):
            plain = [r.text for r in self.roles["plain"].chat([prompts.plain_responder_messages(s) for s in spines],
                                                              self._params("plain", turn))]
        with stopwatch("judge"):
            verdicts = self._judge(convs, spines, hinted, plain, turn)
        records = []
        for i, c in enumerate(convs):
            v = verdicts[i]
            hinted_won = v.winner != "plain"  # unjudged pairs keep hinted as "preferred"; judged=False excludes them
            preferred, rejected = (hinted[i], plain[i]) if hinted_won else (plain[i], hinted[i])
            new_turn = Turn(user=users[i], preferred=preferred, rejected=rejected,
                            continued=self._continued(c, turn, hinted_won), inferred_profile=inferred[i][0],
                            inferred_personality=inferred[i][1], judge=v.record, judged=v.winner is not None)
            records.append({"id": c.id, "turn": turn, "data": new_turn.model_dump(mode="json"),
                            "user_resamples": guarded.resamples[i], "user_repeats": guarded.repeated[i]})
        return records

    def _continued(self, conv: PlannedConversation, turn: int, hinted_won: bool) -> str:
        rule = self.tc.continue_with
        if rule == "random":
            return random.Random(derive_seed(conv.seed, turn, "continue")).choice(["preferred", "rejected"])
        if rule == "hinted":
            return "preferred" if hinted_won else "rejected"
        return rule

    # ---- the whole run ------------------------------------------------------------------------------------------

    def meta(self, conv: PlannedConversation) -> dict:
        """The protocol card stored with every record."""
        return {"protocol": PROTOCOL, "roles": {r: self.roles[r].backend.name for r in TREE_ROLES},
                # Sampling seeds are per role and turn (see the module docstring), not the config's placeholder.
                "generation": {r: getattr(self.cfg.roles, r).generation.model_dump(mode="json", exclude={"seed"})
                               for r in TREE_ROLES},
                "seed": self.cfg.seed, "conversation_seed": conv.seed, "prompt_hash": prompts.prompt_hash(),
                **({"judge_swap_fraction": self.tc.judge_swap_fraction} if self._swap_on() else {}),
                "user_repeat_guard": self.guard.card(),
                "judge_order": self.tc.judge_order, "continue_with": self.tc.continue_with}

    def run(self, plan: list[PlannedConversation], show_progress: bool = True) -> dict:
        """Generate (or finish) every planned conversation; returns a summary of this run."""
        fingerprint = {"seed": self.cfg.seed, "turns": self.tc.turns, "prompt_hash": prompts.prompt_hash(),
                       # Only when on, so state folders written before the key existed stay valid with it off.
                       **({"judge_swap_fraction": self.tc.judge_swap_fraction} if self._swap_on() else {}),
                       "user_repeat_guard": self.guard.card(),
                       "plan": hashlib.sha256(json.dumps([(c.id, c.profile, c.personality) for c in plan]).encode())
                       .hexdigest()}
        # A state folder belongs to one plan and protocol: resuming it with another config would mix two datasets.
        run = ConversationRun(self, self.tc.state_dir, Fingerprint("plan.json", fingerprint, "trees.state_dir"),
                              self.tc.turns, self.tc.batch_size, progress_label="tree turns")
        stats = run.run(plan, show_progress, on_batch=lambda done: self._write_output(plan, done))
        done = run.committed(plan)
        self._write_output(plan, done)
        return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "planned": len(plan),
                "finished": sum(len(done[c.id]) >= self.tc.turns for c in plan),
                "judge_calibration": judge_calibration(
                    [Turn.model_validate(r["data"]) for c in plan for r in done[c.id][: self.tc.turns]],
                    self.tc.judge_flag_first_shown).to_json(),
                "committed_turns_at_start": stats.turns_at_start, "turns_generated": stats.turns_done,
                "user_repeat_guard": self._guard_summary(plan, done)}

    def _guard_summary(self, plan: list[PlannedConversation], done: Histories) -> dict:
        """Per turn, over every committed turn of the plan: the simulator's resamples and the messages that still
        repeat an earlier one of their conversation."""
        turns = range(self.tc.turns)
        resamples, repeats = [0 for _ in turns], [0 for _ in turns]
        for c in plan:
            for record in done[c.id][: self.tc.turns]:
                resamples[record["turn"]] += int(record.get("user_resamples", 0))
                repeats[record["turn"]] += bool(record.get("user_repeats", False))
        return {"resamples_per_turn": resamples, "repeats_per_turn": repeats}

    def _write_output(self, plan: list[PlannedConversation], done: Histories) -> None:
        records = [TreeRecord(id=c.id, profile=c.profile, personality=c.personality,
                              turns=[Turn.model_validate(r["data"]) for r in done[c.id][: self.tc.turns]],
                              meta=self.meta(c))
                   for c in plan if len(done[c.id]) >= self.tc.turns]
        if records:
            storage.write_text(self.tc.output, "".join(r.model_dump_json() + "\n" for r in records))


def judge_calibration(turns: Sequence[Turn], max_first_shown_rate: float) -> Calibration:
    """Agreement and position bias of the pairwise judge over the turns judged in both orders (`order_winners`):
    in order AB the first-shown reply is the hinted one, in BA the plain one."""
    pairs = []
    for t in turns:
        winners = (t.judge.model_extra or {}).get("order_winners") if t.judge is not None else None
        if winners:
            pairs.append((winners["AB"], winners["AB"] == "hinted", winners["BA"], winners["BA"] == "plain"))
    return calibrate(pairs, len(prompts.JUDGE_OPTIONS), max_first_shown_rate)


def load_pools(cfg: DatagenConfig) -> tuple[list[str], list[str]]:
    """(profiles, personalities) the plan draws from: the configured JSONL files, or the released ALOE train pools."""
    tc = cfg.trees
    profiles = read_pool_file(tc.profiles) if tc.profiles else load_pool("profile", "train", cfg.aloe_data)
    personalities = (read_pool_file(tc.personalities) if tc.personalities
                     else load_pool("personality", "train", cfg.aloe_data))
    return profiles, personalities


def generate_trees(cfg: DatagenConfig, backends: dict[str, ChatBackend] | None = None,
                   show_progress: bool = True, embed: Embedder | None = None) -> tuple[dict, UsageMeter]:
    """Run tree generation for `cfg` (resuming its state folder); returns (run summary, usage meter). The summary is
    also appended to `<state_dir>/runs.jsonl` with the per-role usage."""
    profiles, personalities = load_pools(cfg)
    plan = make_plan(profiles, personalities, cfg.trees.conversations, cfg.seed)
    os.makedirs(cfg.trees.state_dir, exist_ok=True)
    cache = CallCache(os.path.join(cfg.trees.state_dir, "calls.sqlite"))
    meter = UsageMeter(cfg.prices)
    try:
        if embed is None and cfg.trees.repeat_threshold is not None:
            from aloe_jax.models.sentence_encoder import SentenceEncoder

            embed = SentenceEncoder().encode
        generator = TreeScript(cfg, build_roles(cfg, cache, meter, backends), embed)
        summary = generator.run(plan, show_progress)
    finally:
        cache.close()
    summary["usage"] = {role: dataclasses.asdict(u) for role, u in meter.by_role.items()}
    jsonl_log.append(os.path.join(cfg.trees.state_dir, "runs.jsonl"), [summary])
    return summary, meter
