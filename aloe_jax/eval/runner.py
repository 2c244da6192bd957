"""The ALOE evaluation loop: every case advances turn k together — the simulator writes each user's message, the model
under test replies to all of them in one batch, the judge scores every reply — and the turn's records are appended to
`<out>/turns.jsonl` before turn k+1 starts.

Resume: a rerun reads the committed records (a torn last line from a kill is dropped), rebuilds each case's history
from them and continues each case from its first missing turn; finished turns are never redone. Simulator and judge
calls also go through the SQLite call cache, so even a turn interrupted half-way replays its finished calls for free.
Sampling seeds are derived from the run seed, the role and the turn, and a batch holds the same cases in the same
order whether or not the run was interrupted, so a resumed run writes the records an uninterrupted run would.

`<out>/protocol.json` pins what makes records comparable (model, roles, prompts, seeds, generation settings); a rerun
with different settings in the same folder is refused rather than mixed in. Cases and turns may grow between reruns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Sequence

import numpy as np
from tqdm import tqdm

from aloe_jax.core import storage
from aloe_jax.core.errors import ConfigError, DataError
from aloe_jax.eval import prompts
from aloe_jax.eval.cases import EvalCase
from aloe_jax.eval.config import EvalConfig
from aloe_jax.eval.judge import Judge
from aloe_jax.llm.base import GenerationParams
from aloe_jax.llm.roles import Role
from aloe_jax.llm.usage import UsageMeter
from aloe_jax.sampling.chat import ChatEngine
from aloe_jax.sampling.sampler import SamplingParams
from aloe_jax.core import jsonl_log

RECORDS_FILE = "turns.jsonl"
# One line per finished (turn, batch): seconds each role took. Kept across reruns so a run that was interrupted and
# resumed still tells how much compute the whole evaluation cost. Written just after the turn's records: a kill between
# the two writes loses that turn's line (never the records), so the total is then a slight undercount.
TIMINGS_FILE = "timings.jsonl"
PROTOCOL_FILE = "protocol.json"
CALLS_FILE = "calls.sqlite"
# protocol.json keys that may change between reruns of one folder: the run covers more or fewer cases/turns, or moves
# to other hardware (greedy results may then differ in the last bits, but the protocol is the same).
_MAY_CHANGE = ("cases", "turns", "devices")


def derive_seed(*parts: object) -> int:
    """A 31-bit seed fixed by `parts` (stable across runs and machines, unlike Python's hash)."""
    return int(hashlib.sha256(":".join(map(str, parts)).encode()).hexdigest()[:8], 16) & 0x7FFFFFFF


def protocol_card(cfg: EvalConfig, model_name: str, simulator_name: str, judge_name: str) -> dict:
    """Everything that decides the records: who plays each role, with which prompts, seeds and settings."""
    from aloe_jax.conversation.aloe_pools import ALOE_REVISION

    return {
        "benchmark": f"ALOE eval pools @ {ALOE_REVISION[:12]}",
        "model": model_name, "model_dtype": cfg.model.dtype, "model_system_prompt": cfg.model.system_prompt,
        "model_generation": cfg.model.generation.model_dump(mode="json"),
        "simulator": simulator_name, "simulator_generation": cfg.simulator.generation.model_dump(mode="json"),
        "judge": judge_name, "judge_method": cfg.judge.resolved_method(), "judge_max_retries": cfg.judge.max_retries,
        "judge_history_turns": cfg.judge.history_turns,
        "prompt_hash": prompts.prompt_hash(), "seed": cfg.seed, "cases": cfg.cases, "turns": cfg.turns,
    }


def _check_protocol(out_dir: str, card: dict) -> None:
    path = os.path.join(out_dir, PROTOCOL_FILE)
    if os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
        changed = sorted(k for k in set(saved) | set(card) if k not in _MAY_CHANGE and saved.get(k) != card.get(k))
        if changed:
            raise ConfigError(f"{out_dir!r} holds an evaluation with other settings ({', '.join(changed)} differ): "
                              f"use another --out, or delete that folder to start over")
    storage.write_text(path, json.dumps(card, indent=1) + "\n")


@dataclasses.dataclass
class RunStats:
    """What one invocation did, with the seconds each role took per turn (compilation included)."""

    turns_at_start: int
    turns_done: int
    wall_s: float
    role_seconds: dict[int, dict[str, float]] = dataclasses.field(default_factory=dict)  # turn → role → s

    def table(self) -> str:
        """Per-turn seconds of each role, as plain text."""
        lines = [f"{self.turns_done} case-turns in {self.wall_s:.1f} s ({self.turns_at_start} already committed)"]
        for turn, seconds in sorted(self.role_seconds.items()):
            lines.append(f"turn {turn:2d}: " + "  ".join(f"{role} {s:7.1f} s" for role, s in seconds.items()))
        return "\n".join(lines)


class EvalRunner:
    """Runs (or resumes) the ALOE loop for a list of cases into an output folder."""

    def __init__(self, cfg: EvalConfig, cases: Sequence[EvalCase], engine: ChatEngine, simulator: Role,
                 judge: Judge, out_dir: str, card: dict, meter: UsageMeter | None = None):
        self.cfg, self.cases, self.engine = cfg, list(cases), engine
        self.simulator, self.judge, self.out_dir, self.card, self.meter = simulator, judge, out_dir, card, meter

    @property
    def records_path(self) -> str:
        return os.path.join(self.out_dir, RECORDS_FILE)

    def committed(self) -> dict[str, list[dict]]:
        """case id → its committed records of turns 1, 2, ... in order (later duplicates ignored)."""
        done: dict[str, list[dict]] = {c.case_id: [] for c in self.cases}
        for record in jsonl_log.read_complete(self.records_path):
            history = done.get(record.get("case_id"))
            if history is not None and record.get("turn") == len(history) + 1:
                history.append(record)
        return done

    def run(self, show_progress: bool = True) -> RunStats:
        """Evaluate every case up to cfg.turns, skipping committed turns."""
        os.makedirs(self.out_dir, exist_ok=True)
        _check_protocol(self.out_dir, self.card)
        start = time.perf_counter()
        done = self.committed()  # also cuts a torn last record left by a kill
        jsonl_log.read_complete(os.path.join(self.out_dir, TIMINGS_FILE))  # the same for the timing log we append to
        turns = self.cfg.turns
        at_start = sum(min(len(h), turns) for h in done.values())
        bar = tqdm(total=len(self.cases) * turns, initial=at_start, desc="ALOE eval", unit="case-turn",
                   disable=not show_progress)
        stats = RunStats(at_start, 0, 0.0)
        for turn in range(1, turns + 1):
            active = [c for c in self.cases if len(done[c.case_id]) == turn - 1]
            if not active:
                continue
            bar.set_postfix_str(f"turn {turn}/{turns}, {len(active)} cases")
            records = self.run_turn(active, [done[c.case_id] for c in active], turn,
                                    stats.role_seconds.setdefault(turn, {}))
            jsonl_log.append(self.records_path, records)
            jsonl_log.append(os.path.join(self.out_dir, TIMINGS_FILE),
                             [{"turn": turn, "cases": len(active), "seconds": stats.role_seconds[turn],
                               "finished_at": time.time()}])
            for case, record in zip(active, records):
                done[case.case_id].append(record)
            bar.update(len(active))
        bar.close()
        stats.turns_done = sum(min(len(h), turns) for h in done.values()) - at_start
        stats.wall_s = time.perf_counter() - start
        return stats

    def _with_seed(self, params: GenerationParams, role: str, turn: int) -> GenerationParams:
        return params.model_copy(update={"seed": derive_seed(self.cfg.seed, role, turn)})

    def run_turn(self, cases: list[EvalCase], histories: list[list[dict]], turn: int,
                 seconds: dict[str, float]) -> list[dict]:
        """The records of turn `turn` for `cases`, given their records of the turns before; `seconds` receives the
        time each role took."""
        clock = time.perf_counter()

        def lap(role: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            seconds[role] = now - clock
            clock = now

        pairs = [[(r["user"], r["assistant"]) for r in history] for history in histories]
        users = self.simulator.chat([prompts.simulator_messages(c, p) for c, p in zip(cases, pairs)],
                                    self._with_seed(self.cfg.simulator.generation, "simulator", turn))
        lap("simulator")
        gen = self._with_seed(self.cfg.model.generation, "model", turn)
        sampling = SamplingParams(temperature=gen.temperature, top_k=gen.top_k, top_p=gen.top_p,
                                  max_new_tokens=gen.max_tokens, seed=gen.seed)
        replies = self.engine.reply([self.model_chat(p, u.text) for p, u in zip(pairs, users)], sampling)
        lap("model")
        if self.meter is not None:
            for r in replies:
                self.meter.record("model", self.card["model"], r.prompt_tokens, r.completion_tokens, False)
        verdicts = self.judge.score([
            prompts.judge_messages(c, p, u.text, r.text, self.cfg.judge.history_turns)
            for c, p, u, r in zip(cases, pairs, users, replies)
        ])
        lap("judge")
        return [
            {"case_id": c.case_id, "profile_index": c.profile_index, "personality_index": c.personality_index,
             "turn": turn, "user": u.text, "user_finish": u.finish_reason, "assistant": r.text,
             "assistant_finish": r.finish_reason, "assistant_tokens": r.completion_tokens, "score": v.score,
             "expected_score": v.expected_score, "judge": v.to_json()}
            for c, u, r, v in zip(cases, users, replies, verdicts)
        ]

    def model_chat(self, pairs: list[tuple[str, str]], user: str) -> list[dict]:
        """The conversation the model under test continues: its history plus the user's new message."""
        messages = [{"role": "system", "content": self.cfg.model.system_prompt}] if self.cfg.model.system_prompt else []
        for past_user, past_reply in pairs:
            messages += [{"role": "user", "content": past_user}, {"role": "assistant", "content": past_reply}]
        return messages + [{"role": "user", "content": user}]


def turn_seconds(out_dir: str) -> dict[int, dict[str, float]]:
    """Seconds per role of each committed turn, over every invocation of a run folder (a turn's time is logged when
    all its cases are committed)."""
    path = os.path.join(out_dir, TIMINGS_FILE)
    per_turn: dict[int, dict[str, float]] = {}
    for i, line in enumerate(jsonl_log.read_complete(path, repair=False), start=1):
        if not (isinstance(line, dict) and _is_turn(line.get("turn")) and isinstance(line.get("seconds"), dict)
                and all(isinstance(s, (int, float)) for s in line["seconds"].values())):
            raise DataError(f"{path} entry {i} needs an integer 'turn' >= 1 and 'seconds' of numbers per role: "
                            "not a timing written by aloe-jax eval")
        roles = per_turn.setdefault(line["turn"], {})
        for role, s in line["seconds"].items():
            roles[role] = roles.get(role, 0.0) + s
    return dict(sorted(per_turn.items()))


def _is_turn(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def total_seconds(out_dir: str) -> tuple[float, dict[str, float]]:
    """Seconds spent on committed turns over every invocation of a run folder: total and per role."""
    per_role: dict[str, float] = {}
    for roles in turn_seconds(out_dir).values():
        for role, seconds in roles.items():
            per_role[role] = per_role.get(role, 0.0) + seconds
    return sum(per_role.values()), per_role


def read_records(out_dir: str) -> list[dict]:
    """Every committed turn record of a run folder."""
    path = os.path.join(out_dir, RECORDS_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"{out_dir!r} holds no evaluation ({RECORDS_FILE} is missing): run `aloe-jax eval` first")
    records = jsonl_log.read_complete(path, repair=False)  # may be read beside the run that appends to it
    for i, record in enumerate(records, start=1):
        if not (isinstance(record, dict) and isinstance(record.get("case_id"), str) and _is_turn(record.get("turn"))):
            raise DataError(f"{path} record {i} needs a string 'case_id' and an integer 'turn' >= 1: not a record "
                            "written by aloe-jax eval")
    return records


def score_matrix(records: list[dict], case_ids: Sequence[str], turns: int,
                 field: str = "score") -> np.ndarray:
    """`[cases, turns]` float64 of `field` per case and turn, NaN where missing or not yet run."""
    row = {case_id: i for i, case_id in enumerate(case_ids)}
    scores = np.full((len(case_ids), turns), np.nan)
    for record in records:
        i, k = row.get(record["case_id"]), record["turn"]
        if i is not None and 1 <= k <= turns and record.get(field) is not None:
            scores[i, k - 1] = record[field]
    return scores


def _same_model(a: str, b: str) -> bool:
    from aloe_jax.models.loader import EMBEDDED_NAMES

    return a == b or (a.lower() in EMBEDDED_NAMES and b.lower() in EMBEDDED_NAMES)


def build_runner(cfg: EvalConfig, out_dir: str, meter: UsageMeter | None = None) -> EvalRunner:
    """An EvalRunner for `cfg`: the model under test loaded (on a mesh when there are several devices), the simulator
    and judge on their backends — sharing the model under test when a role names the same in-process model."""
    import jax

    from aloe_jax.eval.cases import load_cases
    from aloe_jax.llm.cache import CallCache
    from aloe_jax.llm.jax_backend import JaxBackend
    from aloe_jax.llm.roles import make_backend
    from aloe_jax.models.loader import load_model
    from aloe_jax.models.sharding import MeshConfig, make_mesh

    if storage.is_gcs(out_dir):
        raise ConfigError(f"--out {out_dir!r}: the evaluation appends to its records as it goes, which needs a local "
                          f"folder; copy the finished folder to gs:// afterwards")
    cases = load_cases(cfg.aloe_data, cfg.cases)
    mesh = make_mesh(MeshConfig(data=-1)) if cfg.model.use_mesh and jax.device_count() > 1 else None
    model, tokenizer = load_model(cfg.model.model, param_dtype=cfg.model.dtype, dtype=cfg.model.dtype, mesh=mesh)
    engine = ChatEngine(model, tokenizer, mesh)

    def backend_for(backend_cfg):
        if (backend_cfg.kind == "jax" and _same_model(backend_cfg.model, cfg.model.model)
                and backend_cfg.dtype == cfg.model.dtype):
            return JaxBackend(engine=engine, name=f"jax:{backend_cfg.model}")
        return make_backend(backend_cfg)

    os.makedirs(out_dir, exist_ok=True)
    cache = CallCache(os.path.join(out_dir, CALLS_FILE)) if cfg.cache_calls else None
    simulator = Role("simulator", backend_for(cfg.simulator.backend), cache, meter)
    judge_role = Role("judge", backend_for(cfg.judge.backend), cache, meter)
    judge = Judge(judge_role, cfg.judge.resolved_method(), cfg.judge.max_retries, cfg.judge.max_tokens)
    card = protocol_card(cfg, cfg.model.model, simulator.backend.name, judge_role.backend.name)
    card["devices"] = f"{jax.device_count()} x {jax.devices()[0].platform}" + (" (mesh)" if mesh else "")
    return EvalRunner(cfg, cases, engine, simulator, judge, out_dir, card, meter)
