"""RL rollouts and rewards: the persona tag, the judge chat's reply, reward totals by hand, selection, a rollout of a
tiny policy on the conversation engine (packed as a rollout tree) and its resume."""

import json

import numpy as np
import pytest

from aloe_jax.conversation.records import parse_tree
from aloe_jax.conversation.repeat_guard import RepeatGuard
from aloe_jax.eval import prompts
from aloe_jax.eval.cases import EvalCase
from aloe_jax.eval.judge import Judge
from aloe_jax.eval.knowing import reversed_scale
from aloe_jax.llm.base import ChatResult
from aloe_jax.llm.jax_backend import JaxBackend
from aloe_jax.llm.roles import BackendConfig, Role, make_backend
from aloe_jax.rl.config import RewardConfig, RLConfig
from aloe_jax.rl.rewards import KeywordJudge, Rewards, rl_backend, strip_persona_tag
from aloe_jax.core.errors import ConfigError
from aloe_jax.rl.rollouts import (TREES_FILE, RolloutCase, RolloutScript, draw_cases, rollout_trees, run_rollouts,
                                  select)

CASE = EvalCase("c0", 0, 0, "You are a nurse in Lisbon.", "You are blunt and impatient.")


class Scripted:
    """A ChatBackend: replies and option log-probs are functions of the chat; records every call."""

    def __init__(self, name, reply=lambda c: "?", scores=None):
        self.name, self.reply, self.scores = f"scripted:{name}", reply, scores
        self.chats, self.score_calls = [], []

    def chat(self, conversations, params):
        self.chats.append(list(conversations))
        return [ChatResult(self.reply(c), "stop", 5, 3) for c in conversations]

    def score_options(self, conversations, options):
        self.score_calls.append(list(conversations))
        if self.scores is None:
            return None
        return np.asarray([self.scores(c) for c in conversations], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------------- tag


def test_strip_persona_tag():
    assert strip_persona_tag("Hello there.", "persona") == ("Hello there.", None)
    assert strip_persona_tag("Hi! <persona> a nurse, blunt </persona> How are you?", "persona") == \
        ("Hi! How are you?", "a nurse, blunt")
    # every block goes, the first one is the inference; case-insensitive tags; blank lines left behind are tidied
    assert strip_persona_tag("<PERSONA>first</Persona>\n\n\nOk.\n<persona>second</persona>\n\nBye", "persona") == \
        ("Ok.\n\nBye", "first")
    # a block left open (out of tokens) runs to the end; a stray closing tag is dropped
    assert strip_persona_tag("Sure thing. <persona>a nurse who", "persona") == ("Sure thing.", "a nurse who")
    assert strip_persona_tag("Fine </persona> then", "persona") == ("Fine then", None)
    assert strip_persona_tag("<persona></persona>Yes", "persona") == ("Yes", "")
    # another tag name; regex characters in it are literal
    assert strip_persona_tag("a <u.ser>x</u.ser> b <user>y</user>", "u.ser") == ("a b <user>y</user>", "x")


# -------------------------------------------------------------------------------------------------- judge chat reply


def test_reply_in_judge_chat_round_trip():
    marker = "\n\nThe assistant's reply to rate:\n"
    replies = ["Short.", "Line one\n\nRate the reply later\n\nline three", "  spaced  ", "5"]
    for reply in replies:
        chat = prompts.judge_messages(CASE, [("hello", "earlier reply"), ("more", marker + "sneaky")],
                                      "a user who quotes" + marker + "the template", reply, 2)
        assert prompts.reply_in_judge_chat(chat) == reply
        assert prompts.reply_in_judge_chat(reversed_scale(chat)) == reply  # the judge probe's variant
        retried = [*chat, {"role": "assistant", "content": "dunno"}, {"role": "user", "content": prompts.JUDGE_RETRY}]
        assert prompts.reply_in_judge_chat(retried) == reply  # a text judge's retry
    with pytest.raises(ValueError, match="not a judge chat"):
        prompts.reply_in_judge_chat([{"role": "user", "content": "hello"}])


def test_keyword_judge_scores_the_reply_only():
    backend = KeywordJudge("tea")
    chats = [prompts.judge_messages(CASE, [], "do you like TEA?", reply, 2)
             for reply in ("I love Tea.", "Coffee for me.")]
    for method in ("logprobs", "text"):
        verdicts = Judge(Role("judge", backend), method).score(chats)
        assert [v.score for v in verdicts] == [5, 1]  # "tea" in the user's message does not count
        if method == "logprobs":
            assert verdicts[0].expected_score == pytest.approx(5, abs=1e-4)
            assert verdicts[1].expected_score == pytest.approx(1, abs=1e-4)
    built = rl_backend(BackendConfig(kind="keyword", model="tea"))
    assert isinstance(built, KeywordJudge) and built.word == "tea"
    with pytest.raises(ConfigError, match="aloe-jax rl"):  # the llm layer cannot build it (it reads RL prompts)
        make_backend(BackendConfig(kind="keyword", model="tea"))


# ------------------------------------------------------------------------------------------------------------ rewards

NURSE, BLUNT, OTHER = [1.0, 0.0], [0.0, 1.0], [0.6, 0.8]


def _embed(texts):
    """'nurse' → e1, 'blunt' → e2, anything else → (0.6, 0.8): cosines 1, 0, 0.6, 0.8 by hand."""
    return np.asarray([NURSE if "nurse" in t else BLUNT if "blunt" in t else OTHER for t in texts])


def _logprobs(probs):
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(probs, dtype=np.float64))


def _judge_backend():
    """Rates the visible reply: 'Hi there' → half on 3, half on 5 (expected 4, score 3); 'plain' → 2; anything else
    cannot be scored, and its text answer cannot be read either (no usable score)."""
    def scores(chat):
        reply = prompts.reply_in_judge_chat(chat)
        if reply == "Hi there":
            return _logprobs([0, 0, 0.5, 0, 0.5])
        if reply.startswith("plain"):
            return _logprobs([0, 1, 0, 0, 0])
        return _logprobs([0, 0, 0, 0, 0])

    return Scripted("judge", reply=lambda c: "no idea", scores=scores)


def _replies(*spec):
    return [ChatResult(text, "length" if tokens == 10 else "stop", 7, tokens) for text, tokens in spec]


def test_rewards_by_hand():
    backend = _judge_backend()
    cfg = RewardConfig(judge=1.0, persona=0.5, length=0.25, persona_source="tag")
    rewards = Rewards(cfg, Judge(Role("judge", backend), "logprobs", max_retries=1), history_turns=1, max_tokens=10,
                      embed=_embed)
    groups = [_replies(("Hi <persona>a nurse</persona> there", 4), ("plain", 10),
                       ("<persona>a teacher</persona>bad", 2)),
              _replies(("plain too", 5), ("Hi there", 1), ("<persona>blunt</persona> plain", 3))]
    history = [("old question", "Old answer")]
    scored = rewards.score([CASE, CASE], [history, []], ["u0", "u1"], groups, seed=3)
    assert len(backend.score_calls) == 1 and len(backend.score_calls[0]) == 6  # one batched judge call
    first = backend.score_calls[0][0][1]["content"]
    assert "Old answer" in first and "u0" in first and "<persona>" not in first  # the judge sees the visible text

    a, b, c = scored[0]
    assert (a.text, a.visible, a.tokens, a.finish) == ("Hi <persona>a nurse</persona> there", "Hi there", 4, "stop")
    # s = 4 (expected score), p = cos(nurse, nurse-persona) = 1, l = 4/10
    assert a.rewards == pytest.approx({"judge": 4.0, "persona": 1.0, "length": 0.4})
    assert a.reward == pytest.approx(4.0 + 0.5 * 1.0 - 0.25 * 0.4)
    assert a.judge["method"] == "logprobs" and a.judge["score"] == 3
    # no tag: p = 0; s = 2; l = 1
    assert b.visible is None and b.finish == "length"
    assert b.rewards == pytest.approx({"judge": 2.0, "persona": 0.0, "length": 1.0})
    assert b.reward == pytest.approx(2.0 - 0.25)
    # no usable judge score: reward None, the other components still logged; the text judge was asked (and retried)
    assert c.visible == "bad" and c.reward is None
    assert c.rewards["judge"] is None and c.rewards["persona"] == pytest.approx(0.6)
    assert c.judge["method"] == "text" and c.judge["raw"] == ["no idea", "no idea"]
    d, e, f = scored[1]
    assert d.reward == pytest.approx(2.0 - 0.25 * 0.5)
    assert e.reward == pytest.approx(4.0 - 0.25 * 0.1)
    # cos(blunt, nurse persona) = cos(e2, e1) = 0 → the "profile personality" text is embedded as one
    assert f.visible == "plain" and f.rewards["persona"] == pytest.approx(0.0)

    # components with weight 0 are left out; the judge's score always stays
    plain = Rewards(RewardConfig(judge=2.0), Judge(Role("judge", _judge_backend()), "logprobs", max_retries=0), 1, 10)
    again = plain.score([CASE], [[]], ["u"], [groups[0][:2]], seed=0)[0]
    assert [x.rewards for x in again] == [{"judge": pytest.approx(4.0)}, {"judge": pytest.approx(2.0)}]
    assert [x.reward for x in again] == pytest.approx([8.0, 4.0])


def test_rewards_persona_from_the_extractor():
    extractor = Scripted("extractor", reply=lambda c: "Profile: a nurse\nPersonality: calm")
    cfg = RewardConfig(judge=1.0, persona=1.0, persona_source="extractor")
    rewards = Rewards(cfg, Judge(Role("judge", _judge_backend()), "logprobs", max_retries=0), 1, 10, embed=_embed,
                      extractor=Role("extractor", extractor))
    scored = rewards.score([CASE], [[("q", "a")]], ["u"], [_replies(("Hi <persona>x</persona> there", 3),
                                                                    ("plain", 3))], seed=0)[0]
    assert len(extractor.chats) == 1 and len(extractor.chats[0]) == 2  # one call for every candidate
    seen = extractor.chats[0][0][1]["content"]
    assert "User: q\nAssistant: a\nUser: u\nAssistant: Hi there" in seen  # the conversation with the visible reply
    # profile cos(nurse, nurse) = 1, personality cos(other, blunt) = 0.8: p = 0.9
    assert [c.rewards["persona"] for c in scored] == pytest.approx([0.9, 0.9])
    assert scored[0].reward == pytest.approx(4.9) and scored[1].reward == pytest.approx(2.9)


# ---------------------------------------------------------------------------------------------------------- selection


def test_selection_modes():
    assert select([1.0, 3.0, 3.0, None], "best", 0) == 1  # ties: the first
    assert select([None, -2.0, None], "best", 0) == 1  # None ranks lowest
    assert select([None, None], "best", 0) == 0
    draws = [select([1.0, 2.0, 3.0], "random", seed) for seed in range(60)]
    assert draws == [select([1.0, 2.0, 3.0], "random", seed) for seed in range(60)] and set(draws) == {0, 1, 2}
    assert {select([0.0, None, 5.0], "sampled", seed) for seed in range(30)} == {2}
    assert {select([None, None], "sampled", seed) for seed in range(30)} == {0, 1}  # none scored: uniform
    assert {select([None, -1.0, 0.0], "sampled", seed) for seed in range(30)} == {1, 2}  # no positive weight
    share = np.mean([select([1.0, 3.0], "sampled", seed) for seed in range(2000)])
    assert share == pytest.approx(0.75, abs=0.04)  # ∝ reward
    with pytest.raises(ValueError, match="unknown selection"):
        select([1.0], "worst", 0)


def test_draw_cases():
    profiles, personalities = [f"profile {i}" for i in range(5)], [f"personality {j}" for j in range(3)]
    cases = draw_cases(profiles, personalities, 6, seed=1, iteration=2)
    assert cases == draw_cases(profiles, personalities, 6, seed=1, iteration=2)
    assert len({(c.profile, c.personality) for c in cases}) == 6 and len({c.id for c in cases}) == 6
    pairs = lambda cs: [(c.profile, c.personality) for c in cs]  # noqa: E731
    assert pairs(cases) != pairs(draw_cases(profiles, personalities, 6, seed=1, iteration=3))
    assert pairs(cases) != pairs(draw_cases(profiles, personalities, 6, seed=2, iteration=2))
    i, j = int(cases[0].id.split("-p")[1][:4]), int(cases[0].id.split("-q")[1])
    assert cases[0].id.startswith("it00002-") and (cases[0].profile, cases[0].personality) == \
        (profiles[i], personalities[j])
    assert len(draw_cases(profiles, personalities, 15, seed=1, iteration=0)) == 15
    from aloe_jax.core.errors import ConfigError

    with pytest.raises(ConfigError, match="exceeds"):
        draw_cases(profiles, personalities, 16, seed=1, iteration=0)


# ----------------------------------------------------------------------------------------------------------- rollouts

CASES = [RolloutCase("it00000-p0000-q000", "You are a nurse in Lisbon.", "You are blunt."),
         RolloutCase("it00000-p0001-q001", "You are a student in Seoul.", "You are warm and chatty.")]


def _rl_config(turns=2, selection="best"):
    return RLConfig.model_validate({
        "seed": 5, "rollout": {"cases": 2, "group_size": 3, "turns": turns, "selection": selection,
                               "system_prompt": "Be helpful.",
                               "generation": {"temperature": 1.0, "max_tokens": 6}},
        "simulator": {"repeat_threshold": None}, "judge": {"history_turns": 1}})


def _user(chat):
    """The scripted simulator's message: its turn and who it plays (never a repeat)."""
    facts = chat[0]["content"].split("Facts about you:\n")[1].split("\n")[0]
    return f"user message {sum(m['role'] == 'assistant' for m in chat)} from {facts}"


class TaggingPolicy(Scripted):
    """A policy that writes a <persona> block before its reply; each row of a call replies differently."""

    def chat(self, conversations, params):
        self.chats.append(list(conversations))
        return [ChatResult(f"<persona>guess {i}</persona> ok {i}{' e' * (i % 2)} to {len(c)}", "stop", 5, 4 + i)
                for i, c in enumerate(conversations)]


def _script(cfg, policy_backend):
    simulator = Scripted("user", reply=_user)
    judge = Judge(Role("judge", KeywordJudge("e")), "logprobs")
    rewards = Rewards(cfg.reward, judge, cfg.judge.history_turns, cfg.rollout.generation.max_tokens)
    policy = Role("policy", policy_backend)
    return RolloutScript(cfg, 0, policy, Role("simulator", simulator), rewards,
                         RepeatGuard.from_config(cfg.simulator)), simulator


def _trees(folder):
    return [parse_tree(line) for line in (folder / TREES_FILE).read_text().splitlines()]


def test_rollout_records_trees_and_packing(tmp_path, tiny_chat_engine, smollm2_tokenizer):
    from aloe_jax.train.inputs.packing import pack_rollout

    cfg = _rl_config()
    script, simulator = _script(cfg, JaxBackend(engine=tiny_chat_engine, name="jax:tiny"))
    trees = run_rollouts(cfg, 0, str(tmp_path), CASES, script, show_progress=False)
    records = [json.loads(line) for line in (tmp_path / "turns.jsonl").read_text().splitlines()]
    assert [(r["id"], r["turn"]) for r in records] == [(c.id, k) for k in (0, 1) for c in CASES]
    for r in records:
        assert set(r) == {"id", "turn", "user", "user_resamples", "user_repeats", "candidates", "continued"}
        assert len(r["candidates"]) == 3 and 0 <= r["continued"] < 3
        rewards = [c["reward"] for c in r["candidates"]]
        assert all(x == pytest.approx(5, abs=1e-4) or x == pytest.approx(1, abs=1e-4) for x in rewards)
        assert r["continued"] == select(rewards, "best", 0)
        assert all(c["tokens"] and c["finish"] in ("stop", "length") for c in r["candidates"])
    # the G samples of a conversation differ (each row its own key), so the group is not one reply thrice
    assert all(len({c["text"] for c in r["candidates"]}) > 1 for r in records)
    # the simulator saw the continued reply of turn 0 before writing turn 1
    turn1 = simulator.chats[1][0]
    assert turn1[-1]["content"] == records[0]["candidates"][records[0]["continued"]]["text"]

    assert [t.model_dump() for t in trees] == [t.model_dump() for t in _trees(tmp_path)]
    by_id = {c.id: [r for r in records if r["id"] == c.id][::-1] for c in CASES}  # any order: sorted by turn
    assert rollout_trees(by_id, CASES, "Be helpful.", 0) == trees
    assert [t.id for t in trees] == [c.id for c in CASES]
    for tree, case in zip(trees, CASES):
        assert (tree.profile, tree.personality, tree.system) == (case.profile, case.personality, "Be helpful.")
        assert tree.meta == {"iteration": 0, "rollout": True} and len(tree.turns) == 2
        packed = pack_rollout(smollm2_tokenizer, tree, 4096)
        assert packed.turns_cut == 0
        assert sorted(packed.replies) == [(k, i) for k in range(2) for i in range(3)]  # every candidate, once


def test_policy_sees_full_texts_user_and_judge_the_visible_ones(tmp_path):
    cfg = _rl_config(selection="best")
    policy = TaggingPolicy("policy")
    script, simulator = _script(cfg, policy)
    judge_backend = script.rewards.judge.options_judge.role.backend
    seen = []
    judge_backend.score_options = lambda chats, options, score=judge_backend.score_options: (
        seen.extend(chats), score(chats, options))[1]
    trees = run_rollouts(cfg, 0, str(tmp_path), CASES, script, show_progress=False)
    assert [len(chats) for chats in policy.chats] == [6, 6]  # G = 3 rows per conversation, one call per turn
    rows = policy.chats[0]  # each conversation's chat G times in a row
    assert rows[0] == rows[1] == rows[2] != rows[3] == rows[4] == rows[5]
    first = trees[0].turns[0]
    # rows 1 of each group contain " e": the keyword judge gives 5 there, so "best" continues with candidate 1
    assert first.continued_candidate == 1 and first.candidates[1].visible == "ok 1 e to 2"
    assert [c.reward for c in first.candidates] == pytest.approx([1, 5, 1], abs=1e-4)
    assert (first.preferred, first.rejected) == (first.candidates[1].text, first.candidates[0].text)
    full = first.candidates[1].text
    assert full.startswith("<persona>guess 1</persona>")
    # turn 1: the policy conditions on its full reply, the simulator and the judge see the visible one
    assert policy.chats[1][0][2] == {"role": "assistant", "content": full}
    assert policy.chats[1][0][0] == {"role": "system", "content": "Be helpful."}
    assert simulator.chats[1][0][-1]["content"] == "ok 1 e to 2"
    assert "ok 1 e to 2" in seen[6][1]["content"] and "<persona>" not in seen[6][1]["content"]
    assert trees[0].spine()[2]["content"] == full  # what the trainer packs is the full text


def test_rollout_resume_equals_fresh_run(tmp_path, tiny_chat_engine):
    from aloe_jax.core.errors import ConfigError

    backend = JaxBackend(engine=tiny_chat_engine, name="jax:tiny")
    fresh, _ = _script(_rl_config(2, "sampled"), backend)
    expected = run_rollouts(_rl_config(2, "sampled"), 0, str(tmp_path / "fresh"), CASES, fresh, False)
    short, _ = _script(_rl_config(1, "sampled"), backend)
    assert len(run_rollouts(_rl_config(1, "sampled"), 0, str(tmp_path / "resumed"), CASES, short,
                            False)[0].turns) == 1
    again, simulator = _script(_rl_config(2, "sampled"), backend)
    resumed = run_rollouts(_rl_config(2, "sampled"), 0, str(tmp_path / "resumed"), CASES, again, False)
    assert len(simulator.chats) == 1  # only turn 1 ran
    assert [t.model_dump() for t in resumed] == [t.model_dump() for t in expected]
    assert (tmp_path / "resumed" / TREES_FILE).read_text() == (tmp_path / "fresh" / TREES_FILE).read_text()
    # other settings in the same folder are refused, not mixed in
    other, _ = _script(_rl_config(2, "best"), backend)
    with pytest.raises(ConfigError, match="selection"):
        run_rollouts(_rl_config(2, "best"), 0, str(tmp_path / "resumed"), CASES, other, False)
