"""Tree generation: the turn protocol (who sees what), the judge (orders, parsing, failures), seeds and the plan,
exactly-once output across crashes, and an end-to-end run on a tiny model (in process and killed as a subprocess)."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from aloe_jax.conversation.records import parse_tree
from aloe_jax.core.errors import ConfigError
from aloe_jax.llm.base import ChatResult
from aloe_jax.core import jsonl_log
from data_pipeline.config import DatagenConfig
from data_pipeline.trees import generate_trees, make_plan

REPO = pathlib.Path(__file__).resolve().parents[1]
PROFILES = ["You are a nurse in Lisbon with two cats.", "You are a retired carpenter in Manitoba.",
            "You are a student in Seoul who plays chess."]
PERSONALITIES = ["You are blunt and impatient.", "You are warm, curious and chatty."]


class Scripted:
    """A ChatBackend whose reply is a function of the conversation; records what it was sent."""

    def __init__(self, name, reply, scores=None):
        self.name, self.reply, self.scores, self.seen = f"scripted:{name}", reply, scores, []

    def chat(self, conversations, params):
        self.seen.extend(conversations)
        return [ChatResult(self.reply(c), "stop", 5, 3) for c in conversations]

    def score_options(self, conversations, options):
        if self.scores is None:
            return None
        import numpy as np

        return np.asarray([self.scores(c) for c in conversations], dtype=np.float64)


def _judge_text(conv):
    return conv[-1]["content"]


def _reply_a(conv):
    return _judge_text(conv).split("Reply A:\n")[1].split("\n\nReply B:")[0]


def scripted_backends(judge_reply=lambda c: "B", judge_scores=None):
    return {
        "user": Scripted("user", lambda c: f"user message {sum(m['role'] == 'user' for m in c)}"),
        "extractor": Scripted("extractor", lambda c: "Profile: drinks tea\nPersonality: terse"),
        "hinted": Scripted("hinted", lambda c: f"HINTED reply {len(c)}"),
        "plain": Scripted("plain", lambda c: f"plain reply {len(c)}"),
        "judge": Scripted("judge", judge_reply, judge_scores),
    }


def _cfg(tmp_path, **trees):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "profiles.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROFILES))
    (tmp_path / "personalities.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PERSONALITIES))
    base = dict(profiles=str(tmp_path / "profiles.jsonl"), personalities=str(tmp_path / "personalities.jsonl"),
                conversations=2, turns=3, batch_size=8, output=str(tmp_path / "trees.jsonl"),
                state_dir=str(tmp_path / "state"), repeat_threshold=None)  # exact repeats only: no MiniLM
    return DatagenConfig.model_validate({"seed": 7, "trees": {**base, **trees}})


def _records(path):
    text = pathlib.Path(path).read_text()
    return [parse_tree(line) for line in text.splitlines()]


def test_plan_is_deterministic_distinct_and_bounded():
    plan = make_plan(PROFILES, PERSONALITIES, 6, seed=1)
    assert plan == make_plan(PROFILES, PERSONALITIES, 6, seed=1)
    assert len({(c.profile, c.personality) for c in plan}) == 6
    assert [c.id for c in make_plan(PROFILES, PERSONALITIES, 6, seed=2)] != [c.id for c in plan]
    assert len({c.seed for c in plan}) == 6
    with pytest.raises(ConfigError, match="exceeds"):
        make_plan(PROFILES, PERSONALITIES, 7, seed=1)


def test_turn_protocol_roles_see_what_they_should(tmp_path):
    backends = scripted_backends()
    summary, meter = generate_trees(_cfg(tmp_path), backends, show_progress=False)
    records = _records(tmp_path / "trees.jsonl")
    assert summary["finished"] == 2 and len(records) == 2
    for rec in records:
        assert len(rec.turns) == 3
        for k, turn in enumerate(rec.turns):
            assert turn.user == f"user message {k + 1}"  # the opener + the assistant reply of each earlier turn
            assert (turn.inferred_profile, turn.inferred_personality) == ("drinks tea", "terse")
            # The judge always answers "B": B is the plain reply when shown AB, the hinted one when shown BA.
            assert turn.judge.order in ("AB", "BA") and turn.judge.raw == "B" and turn.judged
            winner = "plain" if turn.judge.order == "AB" else "hinted"
            assert turn.preferred.startswith("HINTED" if winner == "hinted" else "plain")
            assert turn.rejected.startswith("plain" if winner == "hinted" else "HINTED")
        assert rec.meta["prompt_hash"] and rec.meta["roles"]["judge"] == "scripted:judge"
        assert rec.meta["seed"] == 7 and isinstance(rec.meta["conversation_seed"], int)
    # Hinted responder: the inferred persona as a system message; plain responder: no system message at all.
    assert all(c[0]["role"] == "system" and "drinks tea" in c[0]["content"] for c in backends["hinted"].seen)
    assert all(m["role"] != "system" for c in backends["plain"].seen for m in c)
    # The judge sees the true persona; the simulator plays it.
    assert all(any(p in _judge_text(c) for p in PROFILES) for c in backends["judge"].seen)
    # Each turn's history follows the continued branch of the turns before it (seen from the user's side).
    rec = records[0]
    later = [c for c in backends["user"].seen if rec.profile in c[0]["content"] and len(c) == 4][0]
    assert later[2]["content"] == rec.turns[0].user
    assert later[3]["content"] == rec.turns[0].reply(rec.turns[0].continued)
    # The judge also sees the swapped order of the seeded share of turns that measure its calibration.
    swapped = sum(bool(getattr(t.judge, "order_winners", None)) for r in records for t in r.turns)
    assert meter.by_role["user"].calls == 6 and meter.by_role["judge"].calls == 6 + swapped
    assert summary["judge_calibration"]["pairs"] == swapped


def test_orders_and_continued_branch_are_randomised_and_seeded(tmp_path):
    generate_trees(_cfg(tmp_path / "a", conversations=6, turns=4), scripted_backends(), show_progress=False)
    turns = [t for r in _records(tmp_path / "a" / "trees.jsonl") for t in r.turns]
    assert {t.judge.order for t in turns} == {"AB", "BA"}
    assert {t.continued for t in turns} == {"preferred", "rejected"}
    generate_trees(_cfg(tmp_path / "b", conversations=6, turns=4), scripted_backends(), show_progress=False)
    assert (tmp_path / "a" / "trees.jsonl").read_text() == (tmp_path / "b" / "trees.jsonl").read_text()


def test_continue_with_preferred(tmp_path):
    generate_trees(_cfg(tmp_path, continue_with="preferred"), scripted_backends(), show_progress=False)
    assert {t.continued for r in _records(tmp_path / "trees.jsonl") for t in r.turns} == {"preferred"}


def test_unparseable_judge_is_recorded_not_fatal(tmp_path):
    backends = scripted_backends(judge_reply=lambda c: "Both replies have merits.")
    generate_trees(_cfg(tmp_path, judge_retries=2, judge_swap_fraction=0.0), backends, show_progress=False)
    for turn in (t for r in _records(tmp_path / "trees.jsonl") for t in r.turns):
        assert not turn.judged and turn.judge.raw == ["Both replies have merits."] * 3
    assert len(backends["judge"].seen) == 2 * 3 * 3  # conversations × turns × (1 + 2 retries)
    retry = backends["judge"].seen[-1]
    assert retry[-2] == {"role": "assistant", "content": "Both replies have merits."}


def test_both_orders_record_agreement(tmp_path):
    # A judge that really prefers the hinted reply agrees with itself across orders ...
    fair = scripted_backends(judge_scores=lambda c: [0.0, -2.0] if _reply_a(c).startswith("HINTED") else [-2.0, 0.0])
    generate_trees(_cfg(tmp_path / "fair", judge_order="both"), fair, show_progress=False)
    for t in (t for r in _records(tmp_path / "fair" / "trees.jsonl") for t in r.turns):
        assert t.judge.order == "both" and t.judge.agreed is True and len(t.judge.raw) == 2
        assert t.preferred.startswith("HINTED") and t.judged
    # ... one that always says "A" does not, and that is recorded.
    biased = scripted_backends(judge_scores=lambda c: [0.0, -1.0])
    generate_trees(_cfg(tmp_path / "biased", judge_order="both"), biased, show_progress=False)
    assert all(t.judge.agreed is False for r in _records(tmp_path / "biased" / "trees.jsonl") for t in r.turns)
    # Position-biased but leaning to the hinted reply: the orders disagree, and the summed margin
    # (+1 when hinted is shown as A, −0.1 when it is B) still picks the hinted reply.
    leaning = scripted_backends(judge_scores=lambda c: [0.0, -1.0] if _reply_a(c).startswith("HINTED") else [0.0, -0.1])
    generate_trees(_cfg(tmp_path / "leaning", judge_order="both"), leaning, show_progress=False)
    for t in (t for r in _records(tmp_path / "leaning" / "trees.jsonl") for t in r.turns):
        assert t.judge.agreed is False and t.preferred.startswith("HINTED") and t.judged


def test_resume_after_torn_line_redoes_nothing_committed(tmp_path):
    cfg = _cfg(tmp_path, conversations=3, batch_size=2)
    generate_trees(cfg, scripted_backends(), show_progress=False)
    full = (tmp_path / "trees.jsonl").read_text()
    log = tmp_path / "state" / "turns.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    assert len(lines) == 9
    # Simulate a crash after 4 committed turns, in the middle of writing the 5th, before any output was written.
    log.write_text("".join(lines[:4]) + lines[4][:25])
    (tmp_path / "trees.jsonl").unlink()
    (tmp_path / "state" / "calls.sqlite").unlink()  # no cache: every call now really reaches the backends
    backends = scripted_backends()
    summary, meter = generate_trees(cfg, backends, show_progress=False)
    assert summary["committed_turns_at_start"] == 4 and summary["turns_generated"] == 5
    assert len(backends["user"].seen) == 5 and meter.by_role["user"].calls == 5
    assert (tmp_path / "trees.jsonl").read_text() == full
    entries = jsonl_log.read_complete(str(log))
    assert len(entries) == 9 and len({(e["id"], e["turn"]) for e in entries}) == 9


def test_state_of_another_plan_is_refused(tmp_path):
    generate_trees(_cfg(tmp_path), scripted_backends(), show_progress=False)
    with pytest.raises(ConfigError, match="belongs to another run"):
        generate_trees(_cfg(tmp_path, turns=4), scripted_backends(), show_progress=False)


def test_tiny_model_pool_and_trees_end_to_end(tmp_path, tiny_chat_engine, gcs_emulator, monkeypatch):
    from aloe_jax.llm.jax_backend import JaxBackend
    from aloe_jax.llm.roles import Role
    from data_pipeline import personas
    from data_pipeline.embeddings import SentenceEncoder

    monkeypatch.setenv("ALOE_JAX_CACHE", str(tmp_path / "cache"))
    backend = JaxBackend(engine=tiny_chat_engine, name="jax:tiny")
    small = {"max_tokens": 12}
    cfg = DatagenConfig.model_validate({
        "seed": 1,
        "roles": {r: {"generation": {**small, "temperature": 0.8}} for r in
                  ("persona_generator", "user", "extractor", "hinted", "plain", "judge")},
        "personas": {"output": str(tmp_path / "pool.jsonl"), "target_size": len(PROFILES) + 2, "min_words": 1,
                     "examples_per_prompt": 2, "prompts_per_round": 2},
        "trees": {"personalities": None, "conversations": 2, "turns": 3,
                  "output": f"{gcs_emulator}/e2e/trees.jsonl", "state_dir": str(tmp_path / "state")},
    })
    report = personas.grow_pool(cfg, Role("persona_generator", backend), SentenceEncoder(), seeds=PROFILES,
                                show_progress=False)
    pool = personas.read_pool_file(str(tmp_path / "pool.jsonl"))
    assert report.final_size == len(pool) > len(PROFILES) and pool[:len(PROFILES)] == PROFILES
    (tmp_path / "personalities.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PERSONALITIES))
    cfg.trees.profiles, cfg.trees.personalities = str(tmp_path / "pool.jsonl"), str(tmp_path / "personalities.jsonl")
    summary, meter = generate_trees(cfg, {r: backend for r in ("user", "extractor", "hinted", "plain", "judge")},
                                    show_progress=False)
    from aloe_jax.core import storage

    lines = storage.read_text(f"{gcs_emulator}/e2e/trees.jsonl").splitlines()
    records = [parse_tree(line) for line in lines]
    assert len(records) == 2 and len({r.id for r in records}) == 2
    for rec in records:
        assert rec.profile in pool and rec.personality in PERSONALITIES and len(rec.turns) == 3
        assert all(t.judge.raw.startswith("A=") and t.judged for t in rec.turns)  # scored by option log-probs
        assert rec.meta["roles"]["user"] == "jax:tiny"
    assert meter.by_role["user"].calls == 6 and meter.by_role["hinted"].calls == 6


def _write_kill_config(tmp_path, model_dir):
    (tmp_path / "profiles.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROFILES))
    (tmp_path / "personalities.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PERSONALITIES))
    roles = {r: {"backend": {"kind": "jax", "model": str(model_dir)}, "generation": {"max_tokens": 8}}
             for r in ("user", "extractor", "hinted", "plain", "judge")}
    cfg = {"seed": 5, "roles": roles,
           "trees": {"profiles": str(tmp_path / "profiles.jsonl"),
                     "personalities": str(tmp_path / "personalities.jsonl"),
                     "conversations": 3, "turns": 3, "batch_size": 1, "output": str(tmp_path / "trees.jsonl"),
                     "state_dir": str(tmp_path / "state")}}
    path = tmp_path / "datagen.json"  # JSON is YAML
    path.write_text(json.dumps(cfg))
    return path


def test_killed_run_resumes_exactly_once(tmp_path, tiny_chat_engine):
    from aloe_jax.models.weights import export_hf

    model_dir = tmp_path / "tiny_model"
    export_hf(tiny_chat_engine.model, tiny_chat_engine.tokenizer, str(model_dir))
    config = _write_kill_config(tmp_path, model_dir)
    cmd = [sys.executable, "-m", "aloe_jax.cli", "trees", "--config", str(config)]
    # A persistent compilation cache shared by the two runs: the restart loads the programs the first run compiled
    # instead of compiling them again (compiling dominates a run this small).
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "xla"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    log = tmp_path / "state" / "turns.jsonl"

    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (log.exists() and log.stat().st_size > 0):
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed:\n{proc.stdout.read().decode()[-2000:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    committed = len(jsonl_log.read_complete(str(log)))
    assert 0 < committed < 9, "kill did not land mid-run"

    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = _records(tmp_path / "trees.jsonl")
    plan = make_plan(PROFILES, PERSONALITIES, 3, seed=5)
    assert sorted(r.id for r in records) == sorted(c.id for c in plan)  # each planned conversation exactly once
    assert all(len(r.turns) == 3 for r in records)
    entries = jsonl_log.read_complete(str(log))
    assert len(entries) == 9 and len({(e["id"], e["turn"]) for e in entries}) == 9
    run = jsonl_log.read_complete(str(tmp_path / "state" / "runs.jsonl"))[-1]
    # The restart asked the user simulator only for the turns that were not committed when the first run died.
    assert run["committed_turns_at_start"] == committed
    assert run["usage"]["user"]["calls"] == 9 - committed


def test_gcs_state_dir_is_a_config_error(tmp_path):
    from aloe_jax.core.config import load_config

    with pytest.raises(ConfigError, match="trees.state_dir: .*local folder"):
        load_config(DatagenConfig, REPO / "configs" / "datagen.yaml", ["trees.state_dir=gs://b/state"])


def test_cli_user_mistakes_are_one_line_errors(tmp_path, capsys):
    from aloe_jax.cli import main

    assert main(["trees", "trees.conversations_typo=3"]) == 2
    assert "trees.conversations_typo: unknown key" in capsys.readouterr().err
    assert main(["trees", f"trees.profiles={tmp_path / 'none.jsonl'}"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
