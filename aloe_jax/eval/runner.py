"""The ALOE evaluation loop, a script on the conversation engine (`aloe_jax.conversation.engine`): every case advances
turn k together — the simulator writes each user's message, the model under test replies to all of them in one batch,
the judge scores every reply — and the turn's records (`turn` counted from 1) are committed to `<out>/turns.jsonl`
before turn k+1 starts.

Resume is the engine's: a rerun continues each case from its first missing turn; finished turns are never redone.
Simulator and judge calls also go through the SQLite call cache, so even a turn interrupted half-way replays its
finished calls for free. Sampling seeds are derived from the run seed, the role and the turn, so a resumed run writes
the records an uninterrupted run would.

`<out>/protocol.json` pins what makes records comparable (model, roles, prompts, seeds, generation settings); a rerun
with different settings in the same folder is refused rather than mixed in. Cases and turns may grow between reruns.
"""

from __future__ import annotations

import gzip
import json
import os
from typing import Sequence

import numpy as np

from aloe_jax.conversation.engine import (RECORDS_FILE, TIMINGS_FILE, ConversationRun, Fingerprint, RunStats,
                                          Stopwatch, seeded)
from aloe_jax.conversation.messages import chat_messages
from aloe_jax.conversation.repeat_guard import RepeatGuard
from aloe_jax.core import jsonl_log, storage
from aloe_jax.core.errors import ConfigError, DataError
from aloe_jax.eval import prompts
from aloe_jax.eval.cases import EvalCase
from aloe_jax.eval.config import EvalConfig
from aloe_jax.eval.judge import Judge
from aloe_jax.eval.knowing import JudgeProbe, Knowing
from aloe_jax.llm.jax_backend import JaxBackend
from aloe_jax.llm.roles import Role
from aloe_jax.llm.usage import UsageMeter
from aloe_jax.sampling.chat import ChatEngine

PROTOCOL_FILE = "protocol.json"
CALLS_FILE = "calls.sqlite"
# protocol.json keys that may change between reruns of one folder: the run covers more or fewer cases/turns, or moves
# to other hardware (greedy results may then differ in the last bits, but the protocol is the same).
_MAY_CHANGE = ("cases", "turns", "devices")


def protocol_card(cfg: EvalConfig, model_name: str, simulator_name: str, judge_name: str) -> dict:
    """Everything that decides the records: who plays each role, with which prompts, seeds and settings."""
    from aloe_jax.conversation.aloe_pools import ALOE_REVISION

    return {
        "benchmark": f"ALOE eval pools @ {ALOE_REVISION[:12]}",
        "model": model_name, "model_dtype": cfg.model.dtype, "model_system_prompt": cfg.model.system_prompt,
        "model_generation": cfg.model.generation.model_dump(mode="json"),
        "simulator": simulator_name, "simulator_generation": cfg.simulator.generation.model_dump(mode="json"),
        "simulator_repeat_guard": RepeatGuard.from_config(cfg.simulator).card(),
        "judge": judge_name, "judge_method": cfg.judge.resolved_method(), "judge_max_retries": cfg.judge.max_retries,
        "judge_history_turns": cfg.judge.history_turns,
        "prompt_hash": prompts.prompt_hash(), "seed": cfg.seed, "cases": cfg.cases, "turns": cfg.turns,
        # Sessions give the records of a full re-prefill, so they are not on the card; a KV cache kept in another
        # dtype than the computation's is (only when set: folders written before the key existed stay valid).
        **({"model_kv_dtype": cfg.model.kv_dtype}
           if cfg.model.sessions and cfg.model.kv_dtype not in (None, cfg.model.dtype) else {}),
    }


class EvalRunner:
    """Runs (or resumes) the ALOE loop for a list of cases into an output folder: the evaluation's script of roles."""

    first_turn = 1

    def __init__(self, cfg: EvalConfig, cases: Sequence[EvalCase], engine: ChatEngine, simulator: Role,
                 judge: Judge, out_dir: str, card: dict, meter: UsageMeter | None = None,
                 guard: RepeatGuard | None = None):
        self.cfg, self.cases, self.out_dir, self.card = cfg, list(cases), out_dir, card
        self.simulator, self.judge = simulator, judge
        self.knowing: Knowing | None = None  # see measuring()
        self.probe: JudgeProbe | None = None
        # Without an embedder given, the guard catches exact repeats only.
        self.guard = guard or RepeatGuard.from_config(cfg.simulator)
        # Not behind the call cache: committed turns are never redone, so a cached reply could only be a stale one.
        self.model = Role("model", JaxBackend(engine=engine, name=card["model"]), None, meter)

    def measuring(self, knowing: Knowing | None = None, probe: JudgeProbe | None = None) -> EvalRunner:
        """This runner, also measuring after each turn how much of the persona the conversation reveals (`knowing`)
        and scoring a share of the replies again (`probe`); each one on the protocol card when on."""
        self.knowing, self.probe = knowing, probe
        if knowing is not None:
            self.card["knowing"] = knowing.card()
        if probe is not None:
            self.card["judge_probe"] = probe.card()
        return self

    def conversation_id(self, case: EvalCase) -> str:
        return case.case_id

    def position(self, record: dict) -> tuple:
        return record.get("case_id"), record.get("turn")

    def run(self, show_progress: bool = True) -> RunStats:
        """Evaluate every case up to cfg.turns, skipping committed turns."""
        fingerprint = Fingerprint(PROTOCOL_FILE, self.card, "--out", _MAY_CHANGE)
        return ConversationRun(self, self.out_dir, fingerprint, self.cfg.turns,
                               progress_label="ALOE eval").run(self.cases, show_progress)

    def turn(self, cases: list[EvalCase], histories: list[list[dict]], turn: int, stopwatch: Stopwatch) -> list[dict]:
        """The records of turn `turn` for `cases`, given their records of the turns before."""
        pairs = [[(r["user"], r["assistant"]) for r in history] for history in histories]
        with stopwatch("simulator"):
            guarded = self.guard.chat(self.simulator, [prompts.simulator_messages(c, p) for c, p in zip(cases, pairs)],
                                      seeded(self.cfg.simulator.generation, self.cfg.seed, "simulator", turn),
                                      [[r["user"] for r in history] for history in histories])
            users = guarded.results
        with stopwatch("model"):
            replies = self.model.chat(
                [chat_messages(p, u.text, self.cfg.model.system_prompt) for p, u in zip(pairs, users)],
                seeded(self.cfg.model.generation, self.cfg.seed, "model", turn))
        with stopwatch("judge"):
            verdicts = self.judge.score([
                prompts.judge_messages(c, p, u.text, r.text, self.cfg.judge.history_turns)
                for c, p, u, r in zip(cases, pairs, users, replies)
            ])
        records = [
            {"case_id": c.case_id, "profile_index": c.profile_index, "personality_index": c.personality_index,
             "turn": turn, "user": u.text, "user_finish": u.finish_reason, "user_resamples": n,
             "user_repeats": repeats, "assistant": r.text,
             "assistant_finish": r.finish_reason, "assistant_tokens": r.completion_tokens, "score": v.score,
             "expected_score": v.expected_score, "judge": v.to_json()}
            for c, u, r, v, n, repeats in zip(cases, users, replies, verdicts, guarded.resamples, guarded.repeated)
        ]
        return self._measure(cases, pairs, users, replies, turn, stopwatch, records)

    def _measure(self, cases, pairs, users, replies, turn: int, stopwatch: Stopwatch, records: list[dict]) -> list[dict]:
        """`records` with the knowing fields and the judge probe's score added (where on)."""
        if self.knowing is not None:
            with stopwatch("extractor"):
                known = self.knowing.measure(
                    cases, [[*p, (u.text, r.text)] for p, u, r in zip(pairs, users, replies)], turn)
            for record, fields in zip(records, known):
                record.update(fields)
        if self.probe is not None:
            with stopwatch("judge probe"):
                probed = self.probe.score([c.case_id for c in cases], [
                    prompts.judge_messages(c, p, u.text, r.text, self.cfg.judge.history_turns)
                    for c, p, u, r in zip(cases, pairs, users, replies)], turn)
            for record, verdict in zip(records, probed):
                if verdict is not None:
                    record["judge_probe"] = {"score": verdict.score, "expected_score": verdict.expected_score,
                                             "judge": verdict.to_json()}
        return records


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
    archived = path + ".gz"  # a finished reference run committed to git keeps its records compressed
    if not os.path.exists(path) and os.path.exists(archived):
        path = archived
        with gzip.open(archived, "rt", encoding="utf-8") as f:
            try:
                records = [json.loads(line) for line in f if line.strip()]
            except (OSError, EOFError, json.JSONDecodeError) as e:
                raise DataError(f"{archived} is not a gzip of whole JSON lines ({e}): recompress the run's "
                                f"{RECORDS_FILE} with `gzip -k`") from None
    elif not os.path.exists(path):
        raise ConfigError(f"{out_dir!r} holds no evaluation ({RECORDS_FILE} is missing): run `aloe-jax eval` first")
    else:
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


def model_sources(cfg: EvalConfig) -> dict:
    """Each role's weights: format and quantisation (`aloe_jax.models.loader.model_source`: the embedded SmolLM2 is a
    Q4_1 GGUF dequantised to float32), or the served model's name for a role on an OpenAI-compatible endpoint."""
    from aloe_jax.models.loader import model_source

    def source(backend) -> dict:
        return model_source(backend.model) if backend.kind == "jax" else {"format": "api", "model": backend.model}

    return {"model": model_source(cfg.model.path), "simulator": source(cfg.simulator.backend),
            "judge": source(cfg.judge.backend)}


def _same_model(a: str, b: str) -> bool:
    from aloe_jax.models.loader import EMBEDDED_NAMES

    return a == b or (a.lower() in EMBEDDED_NAMES and b.lower() in EMBEDDED_NAMES)


def build_runner(cfg: EvalConfig, out_dir: str, meter: UsageMeter | None = None) -> EvalRunner:
    """An EvalRunner for `cfg`: the model under test loaded (on a mesh when there are several devices), the simulator
    and judge on their backends — sharing the model under test when a role names the same in-process model."""
    import jax

    from aloe_jax.eval.cases import load_cases
    from aloe_jax.llm.cache import CallCache
    from aloe_jax.llm.roles import make_backend
    from aloe_jax.models.loader import load_model
    from aloe_jax.models.sharding import MeshConfig, make_mesh

    if storage.is_gcs(out_dir):
        raise ConfigError(f"--out {out_dir!r}: the evaluation appends to its records as it goes, which needs a local "
                          f"folder; copy the finished folder to gs:// afterwards")
    cases = load_cases(cfg.aloe_data, cfg.cases)
    mesh = make_mesh(MeshConfig(data=-1)) if cfg.model.use_mesh and jax.device_count() > 1 else None
    model, tokenizer = load_model(cfg.model.path, param_dtype=cfg.model.dtype, dtype=cfg.model.dtype, mesh=mesh)
    engine = ChatEngine(model, tokenizer, mesh, **cfg.model.session_kwargs())

    def backend_for(backend_cfg):
        if (backend_cfg.kind == "jax" and _same_model(backend_cfg.model, cfg.model.path)
                and backend_cfg.dtype == cfg.model.dtype
                and backend_cfg.session_kwargs() == cfg.model.session_kwargs()):
            return JaxBackend(engine=engine, name=f"jax:{backend_cfg.model}")
        return make_backend(backend_cfg)

    os.makedirs(out_dir, exist_ok=True)
    cache = CallCache(os.path.join(out_dir, CALLS_FILE)) if cfg.cache_calls else None
    simulator = Role("simulator", backend_for(cfg.simulator.backend), cache, meter)
    judge_role = Role("judge", backend_for(cfg.judge.backend), cache, meter)
    judge = Judge(judge_role, cfg.judge.resolved_method(), cfg.judge.max_retries, cfg.judge.max_tokens)
    card = protocol_card(cfg, cfg.model.path, simulator.backend.name, judge_role.backend.name)
    card["devices"] = f"{jax.device_count()} x {jax.devices()[0].platform}" + (" (mesh)" if mesh else "")
    card["model_sources"] = model_sources(cfg)
    knowing = probe = None
    if cfg.knowing.enabled:
        from aloe_jax.models.sentence_encoder import SentenceEncoder

        extractor = Role("extractor", backend_for(cfg.knowing.backend), cache, meter)
        knowing = Knowing(extractor, cfg.knowing.generation, SentenceEncoder().encode, cfg.seed)
    if cfg.judge.probe_fraction > 0:
        probe = JudgeProbe(judge, cfg.judge.probe_fraction, cfg.seed, cfg.judge.flag_first_shown)
    guard = None
    if cfg.simulator.repeat_threshold is not None:
        from aloe_jax.models.sentence_encoder import SentenceEncoder

        guard = RepeatGuard.from_config(cfg.simulator, SentenceEncoder().encode)
    runner = EvalRunner(cfg, cases, engine, simulator, judge, out_dir, card, meter, guard)
    return runner.measuring(knowing, probe)
