"""RL rollouts, a script on the conversation engine (`aloe_jax.conversation.engine`): one iteration's conversations
advance turn by turn together — the simulator writes each user's message (behind the repeat guard), the policy samples
G candidate replies per conversation in one batch, every candidate is rewarded (`aloe_jax.rl.rewards`), and one of
them continues the conversation (`rollout.selection`) — into a resumable folder per iteration.

What each role sees: the policy conditions on the full texts it wrote for its own earlier replies (a `<persona>`
block included: that is what it is trained on); the simulator and the judge see the visible texts (blocks stripped).

A turn's record (one JSON line of `<folder>/turns.jsonl`, turns counted from 0):
    {"id": conversation id, "turn": k, "user": the user's message, "user_resamples": n, "user_repeats": bool,
     "candidates": [Candidate.model_dump(), ... G], "continued": index of the candidate that continued}
`rollout_trees` turns the records into TreeRecords (`records.rollout_turn`), written to `<folder>/trees.jsonl`.

Seeds: the iteration's run seed is derive_seed(seed, "rollout", iteration); simulator, policy and judge draw from it
per role and turn, the selection from (seed, iteration, conversation id, turn) — so a resumed run writes the records
an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from typing import Sequence

from aloe_jax.conversation.engine import ConversationRun, Fingerprint, Stopwatch, derive_seed, seeded
from aloe_jax.conversation.messages import chat_messages
from aloe_jax.conversation.records import Candidate, TreeRecord, rollout_turn
from aloe_jax.conversation.repeat_guard import RepeatGuard
from aloe_jax.core import storage
from aloe_jax.core.errors import ConfigError, DataError
from aloe_jax.eval import prompts
from aloe_jax.llm.roles import Role
from aloe_jax.rl.config import RLConfig
from aloe_jax.rl.rewards import Rewards

FINGERPRINT_FILE = "rollout.json"
TREES_FILE = "trees.jsonl"
# rollout.json keys that may differ on a rerun of a folder: the run may go on for more turns.
_MAY_CHANGE = ("turns",)


@dataclasses.dataclass(frozen=True)
class RolloutCase:
    """One simulated user of an iteration's rollouts (`profile`, `personality`: what the simulator plays)."""

    id: str
    profile: str
    personality: str


def draw_cases(profiles: list[str], personalities: list[str], n: int, seed: int, iteration: int) -> list[RolloutCase]:
    """`n` distinct (profile, personality) pairs drawn at random, fixed by (`seed`, `iteration`)."""
    total = len(profiles) * len(personalities)
    if total == 0:
        raise DataError("rollouts need at least one profile and one personality")
    if n > total:
        raise ConfigError(f"rollout.cases={n} exceeds the {len(profiles)} × {len(personalities)} = {total} distinct "
                          f"(profile, personality) pairs: lower it or grow the pools")
    picks = random.Random(f"rollout-cases:{seed}:{iteration}").sample(range(total), n)
    cases = []
    for pick in picks:
        i, j = divmod(pick, len(personalities))
        cases.append(RolloutCase(f"it{iteration:05d}-p{i:04d}-q{j:03d}", profiles[i], personalities[j]))
    return cases


def select(rewards: Sequence[float | None], mode: str, seed: int) -> int:
    """The index of the candidate that continues the conversation.

    - best: the highest reward (ties: the first; None ranks below every score; none scored: 0);
    - random: uniform, seeded;
    - sampled: seeded, with probability proportional to the reward (a reward below 0 counts as 0; uniform over the
      scored candidates when no weight is positive, over all of them when none is scored)."""
    if not rewards:
        raise ValueError("no candidates to select from")
    if mode == "best":
        scored = [(r, -i) for i, r in enumerate(rewards) if r is not None]
        return -max(scored)[1] if scored else 0
    rng = random.Random(seed)
    if mode == "random":
        return rng.randrange(len(rewards))
    if mode == "sampled":
        weights = [max(r, 0.0) if r is not None else 0.0 for r in rewards]
        if sum(weights) <= 0:
            weights = [1.0 if r is not None else 0.0 for r in rewards]
            if sum(weights) <= 0:
                weights = [1.0] * len(rewards)
        return rng.choices(range(len(rewards)), weights=weights)[0]
    raise ValueError(f"unknown selection {mode!r}: best, random or sampled")


def _continued(record: dict) -> dict:
    return record["candidates"][record["continued"]]


def full_exchanges(history: list[dict]) -> list[tuple[str, str]]:
    """(user message, the full text of the continued reply) of each committed record: what the policy sees."""
    return [(r["user"], _continued(r)["text"]) for r in history]


def visible_exchanges(history: list[dict]) -> list[tuple[str, str]]:
    """(user message, the visible text of the continued reply) of each committed record: what the simulator and the
    judge see."""
    return [(r["user"], _continued(r)["visible"] if _continued(r).get("visible") is not None
             else _continued(r)["text"]) for r in history]


class RolloutScript:
    """One iteration's rollouts as a script on the conversation engine (see the module docstring)."""

    first_turn = 0

    def __init__(self, cfg: RLConfig, iteration: int, policy: Role, simulator: Role, rewards: Rewards,
                 guard: RepeatGuard):
        if policy.cache is not None:
            # The G rows of a conversation are the same chat with the same params: a cache would answer them alike.
            raise ValueError("the policy role must not have a call cache: it samples G replies to the same chat")
        self.cfg, self.iteration = cfg, iteration
        self.policy, self.simulator, self.rewards, self.guard = policy, simulator, rewards, guard
        self.run_seed = derive_seed(cfg.seed, "rollout", iteration)

    def conversation_id(self, case: RolloutCase) -> str:
        return case.id

    def position(self, record: dict) -> tuple:
        return record.get("id"), record.get("turn")

    def turn(self, cases: list[RolloutCase], histories: list[list[dict]], turn: int,
             stopwatch: Stopwatch) -> list[dict]:
        """The records of turn `turn` for `cases`, given their committed records."""
        rollout, group = self.cfg.rollout, self.cfg.rollout.group_size
        visible = [visible_exchanges(h) for h in histories]
        with stopwatch("simulator"):
            guarded = self.guard.chat(self.simulator,
                                      [prompts.simulator_messages(c, v) for c, v in zip(cases, visible)],
                                      seeded(self.cfg.simulator.generation, self.run_seed, "simulator", turn),
                                      [[r["user"] for r in h] for h in histories])
        users = [u.text for u in guarded.results]
        with stopwatch("policy"):
            chats = [chat_messages(full_exchanges(h), u, rollout.system_prompt) for h, u in zip(histories, users)]
            replies = self.policy.chat([chat for chat in chats for _ in range(group)],
                                       seeded(rollout.generation, self.run_seed, "policy", turn))
        grouped = [replies[i * group:(i + 1) * group] for i in range(len(cases))]
        with stopwatch("rewards"):
            scored = self.rewards.score(cases, visible, users, grouped, derive_seed(self.run_seed, "judge", turn))
        records = []
        for case, user, n, repeated, candidates in zip(cases, users, guarded.resamples, guarded.repeated, scored):
            continued = select([c.reward for c in candidates], rollout.selection,
                               derive_seed(self.cfg.seed, self.iteration, case.id, turn))
            records.append({"id": case.id, "turn": turn, "user": user, "user_resamples": n,
                            "user_repeats": repeated, "candidates": [c.model_dump() for c in candidates],
                            "continued": continued})
        return records


def rollout_trees(records_by_id: dict[str, list[dict]], cases: Sequence[RolloutCase], system_prompt: str | None,
                  iteration: int | None = None) -> list[TreeRecord]:
    """One TreeRecord per case with committed records (in `cases` order), its turns in order; `meta` holds the
    iteration and "rollout": True."""
    trees = []
    for case in cases:
        records = sorted(records_by_id.get(case.id, []), key=lambda r: r["turn"])
        if not records:
            continue
        turns = [rollout_turn(r["user"], [Candidate.model_validate(c) for c in r["candidates"]], r["continued"])
                 for r in records]
        trees.append(TreeRecord(id=case.id, profile=case.profile, personality=case.personality, system=system_prompt,
                                turns=turns, meta={"iteration": iteration, "rollout": True}))
    return trees


def rollout_card(cfg: RLConfig, iteration: int, script: RolloutScript) -> dict:
    """What decides an iteration's rollout records, for `<folder>/rollout.json`."""
    rollout = cfg.rollout
    return {
        "iteration": iteration, "seed": cfg.seed, "group_size": rollout.group_size, "turns": rollout.turns,
        "selection": rollout.selection, "generation": rollout.generation.model_dump(mode="json"),
        "system_prompt": rollout.system_prompt, "reward": script.rewards.card(),
        "simulator": script.simulator.backend.name,
        "simulator_generation": cfg.simulator.generation.model_dump(mode="json"),
        "simulator_repeat_guard": script.guard.card(),
        "judge": script.rewards.judge.options_judge.role.backend.name, "prompt_hash": prompts.prompt_hash(),
    }


def run_rollouts(cfg: RLConfig, iteration: int, folder: str, cases: Sequence[RolloutCase], script: RolloutScript,
                 show_progress: bool = True) -> list[TreeRecord]:
    """Run (or resume) iteration `iteration`'s rollouts for `cases` in `folder`, write `<folder>/trees.jsonl` and
    return the trees."""
    fingerprint = Fingerprint(FINGERPRINT_FILE, rollout_card(cfg, iteration, script), "output_dir", _MAY_CHANGE)
    run = ConversationRun(script, folder, fingerprint, cfg.rollout.turns, cfg.rollout.batch_size,
                          progress_label=f"rollouts {iteration}")
    run.run(list(cases), show_progress)
    done = {i: h[:cfg.rollout.turns] for i, h in run.committed(list(cases)).items()}
    trees = rollout_trees(done, cases, cfg.rollout.system_prompt, iteration)
    storage.write_text(os.path.join(folder, TREES_FILE),
                       "".join(json.dumps(t.model_dump(mode="json"), ensure_ascii=False) + "\n" for t in trees))
    return trees
