"""Chat through session caches: the same replies as re-prefilling every turn, with the prompt tokens a row already
held reported (and not prefilled); the evaluation on sessions writes the records it writes without them, each role
on a pool of its own; the config keys reach the engine."""

import json

import pytest

from aloe_jax.eval.cases import load_cases
from aloe_jax.eval.config import EvalConfig
from aloe_jax.eval.judge import Judge
from aloe_jax.eval.runner import RECORDS_FILE, EvalRunner, protocol_card
from aloe_jax.llm.jax_backend import JaxBackend
from aloe_jax.llm.roles import BackendConfig, Role
from aloe_jax.llm.usage import UsageMeter
from aloe_jax.sampling.chat import ChatEngine
from aloe_jax.sampling.sampler import SamplingParams
from tests.conftest import SHARED

ALOE_DATA = str(SHARED / "aloe_data")
USERS = [["Hi, can you help me plan a trip?", "I like trains more than planes.", "What should I pack?"],
         ["My cat will not eat.", "She is eleven years old.", "Should I call the vet today?"]]


def _chat(engine: ChatEngine, params: SamplingParams) -> list[list]:
    """Three turns of two conversations; each turn sends the whole conversation so far."""
    conversations = [[] for _ in USERS]
    turns = []
    for k in range(3):
        for conv, users in zip(conversations, USERS):
            conv.append({"role": "user", "content": users[k]})
        replies = engine.reply(conversations, params)
        for conv, reply in zip(conversations, replies):
            conv.append({"role": "assistant", "content": reply.text})
        turns.append(replies)
    return turns


def test_session_replies_equal_replies_without(tiny_chat_engine, smollm2_tokenizer):
    # Greedy here; the evaluation test below samples its simulator through the sessions.
    params = SamplingParams(max_new_tokens=8)
    sessions = ChatEngine(tiny_chat_engine.model, smollm2_tokenizer, sessions=True)
    plain, kept = _chat(tiny_chat_engine, params), _chat(sessions, params)
    for turn, (expected, got) in enumerate(zip(plain, kept)):
        for e, g in zip(expected, got):
            assert (g.text, g.token_ids, g.finish_reason, g.prompt_tokens, g.completion_tokens) == (
                e.text, e.token_ids, e.finish_reason, e.prompt_tokens, e.completion_tokens)
            assert e.cached_tokens == 0
            # Turn 1 holds nothing; later turns find at least the previous turn's prompt in their row.
            assert g.cached_tokens == 0 if turn == 0 else g.cached_tokens >= kept[turn - 1][0].prompt_tokens // 2
    assert len({r.text for turn in plain for r in turn}) > 1  # real, differing text: equality is not vacuous
    prompt_total = sum(r.prompt_tokens for turn in kept for r in turn)
    cached_total = sum(r.cached_tokens for turn in kept for r in turn)
    assert sessions.sessions.prefilled_tokens == prompt_total - cached_total < prompt_total * 0.7


def _eval_run(engine: ChatEngine, out, meter: UsageMeter) -> list[dict]:
    cfg = EvalConfig.model_validate({
        "cases": 2, "turns": 2, "model": {"generation": {"max_tokens": 8}},
        "simulator": {"generation": {"temperature": 0.8, "max_tokens": 8}},
        "judge": {"history_turns": 1}, "bootstrap_resamples": 50})
    backend = JaxBackend(engine=engine, name="jax:tiny")
    simulator = Role("simulator", backend, None, meter)
    judge = Judge(Role("judge", backend, None, meter), cfg.judge.resolved_method())
    card = protocol_card(cfg, "tiny", backend.name, backend.name)
    EvalRunner(cfg, load_cases(ALOE_DATA, 2), engine, simulator, judge, str(out), card, meter).run(
        show_progress=False)
    with open(out / RECORDS_FILE) as f:
        return [json.loads(line) for line in f]


def test_evaluation_on_sessions_writes_the_same_records(tiny_chat_engine, smollm2_tokenizer, tmp_path):
    plain_meter, session_meter = UsageMeter(), UsageMeter()
    expected = _eval_run(tiny_chat_engine, tmp_path / "plain", plain_meter)
    engine = ChatEngine(tiny_chat_engine.model, smollm2_tokenizer, sessions=True)
    got = _eval_run(engine, tmp_path / "sessions", session_meter)
    assert len(got) == 4 and got == expected
    for role in ("model", "simulator"):
        before, after = plain_meter.by_role[role], session_meter.by_role[role]
        assert after.prompt_tokens == before.prompt_tokens and before.reused_prompt_tokens == 0
        # Each role keeps its own rows (the model and the simulator share one engine): at turn 2 it finds its turn-1
        # prompt there, over a quarter of its prompt tokens of both turns (a template header alone would be ~2%).
        assert after.reused_prompt_tokens > 0.25 * after.prompt_tokens, role
    assert len(engine.sessions.pools) == 2
    assert engine.sessions.prefilled_tokens == sum(
        session_meter.by_role[r].prompt_tokens - session_meter.by_role[r].reused_prompt_tokens
        for r in ("model", "simulator"))
    assert "prefilled" in session_meter.table()


@pytest.fixture
def tiny_loader(monkeypatch, tiny_chat_engine, smollm2_tokenizer):
    """load_model returning the tiny model, whatever it is asked for; the backends it builds are forgotten after."""
    from aloe_jax.llm import roles
    from aloe_jax.models import loader

    monkeypatch.setattr(loader, "load_model", lambda *a, **k: (tiny_chat_engine.model, smollm2_tokenizer))
    roles._backend_from_json.cache_clear()
    yield
    roles._backend_from_json.cache_clear()


def test_config_keys_reach_the_engine(tiny_loader, tmp_path):
    from aloe_jax.eval.runner import build_runner
    from aloe_jax.llm.roles import make_backend

    default = make_backend(BackendConfig(model="tiny-sessions-test"))
    assert default.engine.sessions is not None and default.engine.sessions.kv_dtype is None  # on by default
    assert default.engine.sessions.max_bytes == 8 * 2**30
    tuned = make_backend(BackendConfig(model="tiny-sessions-test", kv_dtype="bfloat16", session_cache_gb=0.5))
    assert tuned.engine.sessions.kv_dtype == "bfloat16" and tuned.engine.sessions.max_bytes == 2**29
    assert make_backend(BackendConfig(model="tiny-sessions-test", sessions=False)).engine.sessions is None

    cfg = EvalConfig.model_validate({"aloe_data": ALOE_DATA, "cases": 2, "cache_calls": False,
                                     "model": {"kv_dtype": "bfloat16", "session_cache_gb": 1.5}})
    runner = build_runner(cfg, str(tmp_path))
    engine = runner.model.backend.engine
    assert engine.sessions.kv_dtype == "bfloat16" and engine.sessions.max_bytes == int(1.5 * 2**30)
    assert runner.card["model_kv_dtype"] == "bfloat16"
    # The simulator and judge name the same model but other session settings: they get a backend of their own.
    assert runner.simulator.backend.engine is not engine and runner.simulator.backend.engine.sessions.kv_dtype is None
    same = EvalConfig.model_validate({"aloe_data": ALOE_DATA, "cases": 2, "cache_calls": False})
    runner = build_runner(same, str(tmp_path))
    assert runner.simulator.backend.engine is runner.model.backend.engine
    assert runner.model.backend.engine.sessions is not None and "model_kv_dtype" not in runner.card
    off = EvalConfig.model_validate({"aloe_data": ALOE_DATA, "cases": 2, "cache_calls": False,
                                     "model": {"sessions": False}, "simulator": {"backend": {"sessions": False}},
                                     "judge": {"backend": {"sessions": False}}})
    runner = build_runner(off, str(tmp_path))
    assert runner.model.backend.engine.sessions is None
    assert runner.simulator.backend.engine is runner.model.backend.engine
