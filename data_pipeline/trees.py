"""Preference-tree generation (`aloe-jax trees`): for each planned (profile, personality) pair, `turns` rounds of

  user simulator (plays the true persona) → extractor (infers the persona from the chat so far) →
  hinted responder (sees the inferred persona) and plain responder (does not) → pairwise judge (sees the true persona)

with every conversation of a batch advancing turn k together, one batched call per role.

Crash safety: each finished turn of a conversation is one fsync'd line in `<state_dir>/turns.jsonl` (a torn last line
is dropped on resume), and every LLM call goes through the SQLite call cache in `<state_dir>/calls.sqlite`. A rerun
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

from tqdm import tqdm

from aloe_jax.core import storage
from aloe_jax.conversation.records import JudgeRecord, TreeRecord, Turn
from aloe_jax.core.errors import ConfigError, DataError
from aloe_jax.llm.base import ChatBackend, GenerationParams
from aloe_jax.llm.cache import CallCache
from aloe_jax.llm.roles import Role, make_backend
from aloe_jax.llm.usage import UsageMeter
from aloe_jax.core import jsonl_log
from data_pipeline import prompts
from aloe_jax.conversation.aloe_pools import load_pool
from data_pipeline.config import DatagenConfig
from data_pipeline.personas import read_pool_file

TREE_ROLES = ("user", "extractor", "hinted", "plain", "judge")
PROTOCOL = "aloe-jax trees v1"


def derive_seed(*parts: object) -> int:
    """A 31-bit seed determined by `parts` (stable across runs and machines, unlike Python's hash)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


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


def _spine(turns: list[Turn]) -> list[dict]:
    messages = []
    for t in turns:
        messages += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.reply(t.continued)}]
    return messages


@dataclasses.dataclass
class _Verdict:
    winner: str | None  # "hinted" | "plain" | None when the judge gave no usable answer
    record: JudgeRecord


class TreeGenerator:
    """Runs (and resumes) the tree generation of one config."""

    def __init__(self, cfg: DatagenConfig, roles: dict[str, Role]):
        self.cfg, self.tc, self.roles = cfg, cfg.trees, roles

    # ---- one turn for a batch of conversations -------------------------------------------------------------------

    def _params(self, role: str, turn: int) -> GenerationParams:
        params = getattr(self.cfg.roles, role).generation
        return params.model_copy(update={"seed": derive_seed(self.cfg.seed, role, turn)})

    def _orders(self, convs: list[PlannedConversation], turn: int) -> list[str]:
        if self.tc.judge_order == "both":
            return ["both"] * len(convs)
        return [random.Random(derive_seed(c.seed, turn, "order")).choice(["AB", "BA"]) for c in convs]

    # Both judge paths answer, per judge chat, (letter "A"/"B" or None, raw output, log p(A) − log p(B) or None).

    def _judge_by_scores(self, chats: list[list[dict]]) -> list | None:
        scores = self.roles["judge"].score_options(chats, prompts.JUDGE_OPTIONS)  # [n_chats, 2] or None
        if scores is None:
            return None
        return [("A" if a >= b else "B", f"A={a:.4f} B={b:.4f}", float(a - b)) for a, b in scores]

    def _judge_by_text(self, chats: list[list[dict]], turn: int) -> list:
        params = self._params("judge", turn)
        answers: list[tuple[str | None, list[str]]] = [(None, []) for _ in chats]
        todo = list(range(len(chats)))
        for attempt in range(self.tc.judge_retries + 1):
            if not todo:
                break
            asked = [chats[i] if attempt == 0 else chats[i] + [
                {"role": "assistant", "content": answers[i][1][-1]},
                {"role": "user", "content": "Answer with exactly one letter: A or B."}] for i in todo]
            # A fresh seed per attempt: the same request and seed would be answered from the call cache.
            replies = self.roles["judge"].chat(asked, params.model_copy(update={"seed": params.seed + attempt}))
            for i, reply in zip(todo, replies):
                answers[i] = (prompts.parse_judge_choice(reply.text), answers[i][1] + [reply.text])
            todo = [i for i in todo if answers[i][0] is None]
        return [(choice, raws[0] if len(raws) == 1 else raws, None) for choice, raws in answers]

    def _judge(self, convs, spines, hinted, plain, turn) -> list[_Verdict]:
        orders = self._orders(convs, turn)
        chats, shown = [], []  # shown[j] = (conversation index, "AB" | "BA") of judge chat j
        for i, c in enumerate(convs):
            for order in (("AB", "BA") if orders[i] == "both" else (orders[i],)):
                a, b = (hinted[i], plain[i]) if order == "AB" else (plain[i], hinted[i])
                chats.append(prompts.judge_messages(c.profile, c.personality, spines[i], a, b))
                shown.append((i, order))
        answers = self._judge_by_scores(chats)
        method = "logprob"
        if answers is None:
            answers, method = self._judge_by_text(chats, turn), "text"
        per_conv: list[list[tuple]] = [[] for _ in convs]  # per conversation: (winner, raw, hinted margin)
        for (i, order), (letter, raw, margin_a) in zip(shown, answers):
            winner = None if letter is None else ("hinted" if (letter == "A") == (order == "AB") else "plain")
            hinted_margin = None if margin_a is None else (margin_a if order == "AB" else -margin_a)
            per_conv[i].append((winner, raw, hinted_margin))
        verdicts = []
        for i, views in enumerate(per_conv):
            winners = [w for w, _, _ in views]
            raws = [r for _, r, _ in views]
            if orders[i] != "both":
                record = JudgeRecord(order=orders[i], raw=raws[0], method=method, winner=winners[0])
                verdicts.append(_Verdict(winners[0], record))
                continue
            agreed = None not in winners and winners[0] == winners[1]
            winner = winners[0] if agreed else None
            if method == "logprob" and not agreed:
                # Scores exist for both orders: the reply with the larger total margin wins; the disagreement stays
                # recorded (agreed=False) as a measure of position bias.
                winner = "hinted" if sum(m for _, _, m in views) >= 0 else "plain"
            flat_raw = [r if isinstance(r, str) else " | ".join(r) for r in raws]
            verdicts.append(_Verdict(winner, JudgeRecord(order="both", raw=flat_raw, agreed=agreed, method=method,
                                                         winner=winner)))
        return verdicts

    def run_turn(self, convs: list[PlannedConversation], histories: list[list[Turn]], turn: int) -> list[Turn]:
        """Turn `turn` of every conversation in `convs` (whose committed turns are `histories`), one batch per role."""
        spines = [_spine(h) for h in histories]
        user_chats = [prompts.user_simulator_messages(c.profile, c.personality, s) for c, s in zip(convs, spines)]
        users = [r.text for r in self.roles["user"].chat(user_chats, self._params("user", turn))]
        spines = [s + [{"role": "user", "content": u}] for s, u in zip(spines, users)]
        extracted = self.roles["extractor"].chat([prompts.extractor_messages(s) for s in spines],
                                                 self._params("extractor", turn))
        inferred = [prompts.parse_inferred_persona(r.text) for r in extracted]
        hinted = [r.text for r in self.roles["hinted"].chat(
            [prompts.hinted_responder_messages(p, q, s) for (p, q), s in zip(inferred, spines)],
            self._params("hinted", turn))]
        plain = [r.text for r in self.roles["plain"].chat([prompts.plain_responder_messages(s) for s in spines],
                                                          self._params("plain", turn))]
        verdicts = self._judge(convs, spines, hinted, plain, turn)
        turns = []
        for i, c in enumerate(convs):
            v = verdicts[i]
            hinted_won = v.winner != "plain"  # unjudged pairs keep hinted as "preferred"; judged=False excludes them
            preferred, rejected = (hinted[i], plain[i]) if hinted_won else (plain[i], hinted[i])
            continued = self._continued(c, turn, hinted_won)
            turns.append(Turn(user=users[i], preferred=preferred, rejected=rejected, continued=continued,
                              inferred_profile=inferred[i][0], inferred_personality=inferred[i][1],
                              judge=v.record, judged=v.winner is not None))
        return turns

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
                "judge_order": self.tc.judge_order, "continue_with": self.tc.continue_with}

    def run(self, plan: list[PlannedConversation], show_progress: bool = True) -> dict:
        """Generate (or finish) every planned conversation; returns a summary of this run."""
        state = self.tc.state_dir
        turns_log = os.path.join(state, "turns.jsonl")
        _check_plan(state, plan, self.cfg)
        done: dict[str, list[Turn]] = {c.id: [] for c in plan}
        for entry in jsonl_log.read_complete(turns_log):
            # Only the next turn in sequence counts; anything else would be a duplicate and is ignored.
            if entry.get("id") in done and entry.get("turn") == len(done[entry["id"]]):
                done[entry["id"]].append(Turn.model_validate(entry["data"]))
        committed_at_start = sum(len(t) for t in done.values())
        pending = [c for c in plan if len(done[c.id]) < self.tc.turns]
        total_turns = len(plan) * self.tc.turns
        bar = tqdm(total=total_turns, initial=committed_at_start, desc="tree turns", unit="turn",
                   disable=not show_progress)
        for start in range(0, len(pending), self.tc.batch_size):
            group = pending[start:start + self.tc.batch_size]
            for turn in range(self.tc.turns):
                active = [c for c in group if len(done[c.id]) == turn]
                if not active:
                    continue
                new_turns = self.run_turn(active, [done[c.id] for c in active], turn)
                jsonl_log.append(turns_log, [{"id": c.id, "turn": turn, "data": t.model_dump(mode="json")}
                                             for c, t in zip(active, new_turns)])
                for c, t in zip(active, new_turns):
                    done[c.id].append(t)
                bar.update(len(active))
            self._write_output(plan, done)
        bar.close()
        self._write_output(plan, done)
        finished = sum(len(done[c.id]) >= self.tc.turns for c in plan)
        summary = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "planned": len(plan),
                   "finished": finished, "committed_turns_at_start": committed_at_start,
                   "turns_generated": sum(len(t) for t in done.values()) - committed_at_start}
        return summary

    def _write_output(self, plan: list[PlannedConversation], done: dict[str, list[Turn]]) -> None:
        records = [TreeRecord(id=c.id, profile=c.profile, personality=c.personality,
                              turns=done[c.id][: self.tc.turns], meta=self.meta(c))
                   for c in plan if len(done[c.id]) >= self.tc.turns]
        if records:
            storage.write_text(self.tc.output, "".join(r.model_dump_json() + "\n" for r in records))


def _check_plan(state: str, plan: list[PlannedConversation], cfg: DatagenConfig) -> None:
    # A state folder belongs to one plan and protocol: resuming it with another config would mix two datasets.
    fingerprint = {"seed": cfg.seed, "turns": cfg.trees.turns, "prompt_hash": prompts.prompt_hash(),
                   "plan": hashlib.sha256(json.dumps([(c.id, c.profile, c.personality) for c in plan]).encode())
                   .hexdigest()}
    path = os.path.join(state, "plan.json")
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        if saved != fingerprint:
            changed = sorted(k for k in fingerprint if saved.get(k) != fingerprint[k])
            raise ConfigError(f"state folder {state!r} belongs to another run ({', '.join(changed)} differ): use a "
                              f"new trees.state_dir, or delete that folder to start over")
        return
    storage.write_text(path, json.dumps(fingerprint, indent=1))


def load_pools(cfg: DatagenConfig) -> tuple[list[str], list[str]]:
    """(profiles, personalities) the plan draws from: the configured JSONL files, or the released ALOE train pools."""
    tc = cfg.trees
    profiles = read_pool_file(tc.profiles) if tc.profiles else load_pool("profile", "train", cfg.aloe_source)
    personalities = (read_pool_file(tc.personalities) if tc.personalities
                     else load_pool("personality", "train", cfg.aloe_source))
    return profiles, personalities


def generate_trees(cfg: DatagenConfig, backends: dict[str, ChatBackend] | None = None,
                   show_progress: bool = True) -> tuple[dict, UsageMeter]:
    """Run tree generation for `cfg` (resuming its state folder); returns (run summary, usage meter). The summary is
    also appended to `<state_dir>/runs.jsonl` with the per-role usage."""
    profiles, personalities = load_pools(cfg)
    plan = make_plan(profiles, personalities, cfg.trees.conversations, cfg.seed)
    os.makedirs(cfg.trees.state_dir, exist_ok=True)
    cache = CallCache(os.path.join(cfg.trees.state_dir, "calls.sqlite"))
    meter = UsageMeter(cfg.prices)
    try:
        generator = TreeGenerator(cfg, build_roles(cfg, cache, meter, backends))
        summary = generator.run(plan, show_progress)
    finally:
        cache.close()
    summary["usage"] = {role: dataclasses.asdict(u) for role, u in meter.by_role.items()}
    jsonl_log.append(os.path.join(cfg.trees.state_dir, "runs.jsonl"), [summary])
    return summary, meter
