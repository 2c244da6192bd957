"""The user simulator's repeat guard (aloe_jax/conversation/repeat_guard.py) in the ALOE evaluation and in tree
generation: scripted simulators that copy their earlier message are resampled with new seeds, only the offending rows;
the resamples and the repeats left are counted in the records, summary.json, report.md and the tree run's summary."""

import json
import zlib

import numpy as np
import pytest

from aloe_jax.conversation.repeat_guard import RESAMPLE_NUDGE, RepeatGuard, normalise
from aloe_jax.core.errors import ConfigError
from aloe_jax.eval import prompts, report
from aloe_jax.eval.cases import load_cases
from aloe_jax.eval.config import EvalConfig
from aloe_jax.eval.judge import Judge
from aloe_jax.eval.runner import RECORDS_FILE, EvalRunner, protocol_card
from aloe_jax.llm.base import ChatResult, GenerationParams
from aloe_jax.llm.cache import CallCache
from aloe_jax.llm.roles import Role
from tests.conftest import SHARED
from tests.test_trees import _cfg as tree_cfg, scripted_backends

ALOE_DATA = str(SHARED / "aloe_data")


class RepeatingSimulator:
    """A ChatBackend playing the user: its first message names its persona; at later turns it copies that message
    (in other case and spacing) for the first `copies` calls of that turn, then writes a new one. `copies` None:
    it always copies. Rows whose persona contains `steady` never copy. Records each call's seed and row count."""

    name = "scripted:simulator"

    def __init__(self, copies: int | None, steady: str | None = None):
        self.copies, self.steady, self.calls, self.tries, self.temperatures = copies, steady, [], {}, []
        self.top_ps, self.nudged = [], []

    def chat(self, conversations, params):
        self.calls.append((params.seed, len(conversations)))
        self.temperatures.append(params.temperature)
        self.top_ps.append(params.top_p)
        self.nudged.append([c[-1]["content"].endswith(RESAMPLE_NUDGE) for c in conversations])
        out = []
        for chat in conversations:
            persona, turn = chat[0]["content"], sum(m["role"] == "assistant" for m in chat)
            first = f"Hi, I am {zlib.crc32(persona.encode()) % 1000} and I like birds."
            tries = self.tries[persona, turn] = self.tries.get((persona, turn), 0) + 1
            repeat = turn > 0 and (self.steady is None or self.steady not in chat[0]["content"]) and (
                self.copies is None or tries <= self.copies)
            out.append(ChatResult(f"  {first.upper()} " if repeat else
                                  (first if turn == 0 else f"turn {turn}, try {tries}: tell me more"), "stop", 5, 5))
        return out

    def score_options(self, conversations, options):
        return None


class Fixed:
    """The model under test and the judge: a fixed reply and fixed option log-probabilities."""

    name = "scripted:fixed"

    def chat(self, conversations, params):
        return [ChatResult("ok.", "stop", 5, 2) for _ in conversations]

    def score_options(self, conversations, options):
        return np.log(np.full((len(conversations), len(options)), 1.0 / len(options)))


def _eval(tmp_path, simulator, max_resamples=3, threshold=None, turns=3, cases=2):
    cfg = EvalConfig.model_validate({
        "cases": cases, "turns": turns, "bootstrap_resamples": 20,
        "simulator": {"max_resamples": max_resamples, "repeat_threshold": threshold}})
    fixed = Fixed()
    sim_role = Role("simulator", simulator, CallCache(str(tmp_path / "calls.sqlite")))
    runner = EvalRunner(cfg, load_cases(ALOE_DATA, cases), object(), sim_role, Judge(Role("judge", fixed), "logprobs"),
                        str(tmp_path), protocol_card(cfg, "fixed", simulator.name, fixed.name))
    runner.model = Role("model", fixed)
    runner.run(show_progress=False)
    report.write_report(str(tmp_path), n_resamples=20)
    records = [json.loads(line) for line in (tmp_path / RECORDS_FILE).read_text().splitlines()]
    summary = json.loads((tmp_path / report.SUMMARY_FILE).read_text())
    return records, summary, (tmp_path / report.REPORT_FILE).read_text()


def test_eval_resamples_only_the_repeating_rows_with_new_seeds_and_reports_the_count(tmp_path):
    cases = load_cases(ALOE_DATA, 2)
    simulator = RepeatingSimulator(copies=2, steady=cases[1].personality[:40])  # same profile as case 0
    records, summary, text = _eval(tmp_path, simulator)
    # Per turn: one call for both cases, then two resamples of case 0 alone (case 1 never copies).
    assert [n for _, n in simulator.calls] == [2, 2, 1, 1, 2, 1, 1]
    seeds = [s for s, _ in simulator.calls]
    assert len(set(seeds[1:4])) == 3 and len(set(seeds[4:7])) == 3  # each resample of a turn has its own seed
    assert simulator.temperatures == [0.7, 0.7, 1.0, 1.0, 0.7, 1.0, 1.0]  # resamples draw hotter
    assert simulator.top_ps == [0.9, 0.9, 1.0, 1.0, 0.9, 1.0, 1.0]  # and from the whole distribution
    # Resamples, and only they, end with the note asking for something new.
    assert simulator.nudged == [[False] * 2, [False] * 2, [True], [True], [False] * 2, [True], [True]]
    by_key = {(r["case_id"], r["turn"]): r for r in records}
    first = by_key[cases[0].case_id, 1]["user"]
    for turn in (2, 3):
        row = by_key[cases[0].case_id, turn]
        assert row["user_resamples"] == 2 and not row["user_repeats"] and normalise(row["user"]) != normalise(first)
        assert by_key[cases[1].case_id, turn]["user_resamples"] == 0
    assert summary["simulator_repeat_guard"] == {"resampled_per_turn": [0, 1, 1], "resamples_per_turn": [0, 2, 2],
                                                 "repeating_per_turn": [0, 0, 0]}
    assert summary["looping"] == [0, 0, 0]
    assert "| resampled | repeating |" in text and "| 1 (2) | 0 |" in text


def test_eval_simulator_that_keeps_repeating_past_n_keeps_the_repeat_and_counts_it(tmp_path):
    simulator = RepeatingSimulator(copies=None)
    records, summary, text = _eval(tmp_path, simulator, max_resamples=2)
    assert [n for _, n in simulator.calls] == [2, 2, 2, 2, 2, 2, 2]  # both rows, 1 + 2 calls at turns 2 and 3
    later = [r for r in records if r["turn"] > 1]
    assert all(r["user_resamples"] == 2 and r["user_repeats"] for r in later)
    assert all(normalise(r["user"]) == normalise(records[0 if r["case_id"] == records[0]["case_id"] else 1]["user"])
               for r in later)
    assert summary["simulator_repeat_guard"] == {"resampled_per_turn": [0, 2, 2], "resamples_per_turn": [0, 4, 4],
                                                 "repeating_per_turn": [0, 2, 2]}
    assert summary["looping"] == [0, 0, 2]  # turn 3 copies turn 2 word for word (and the fixed reply): a loop
    assert "| 2 (4) | 2 |" in text


def _topic_embedder(texts):
    """A fake MiniLM: one axis per topic word, so paraphrases on one topic have cosine 1 and others 0."""
    topics = ("bird", "tax", "garden")
    vectors = np.asarray([[float(t in text.lower()) for t in topics] + [1e-3] for text in texts])
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_similarity_repeat_is_caught_with_an_embedder_and_resampled():
    guard = RepeatGuard(max_resamples=3, threshold=0.9, embed=_topic_embedder)
    earlier = [["I really love birds."], ["I love birds."], []]
    flags = guard.repeats(["Birds are what I love most", "Any tips on my tax return?", "Birds!"], earlier)
    assert flags == [True, False, False]  # a paraphrase; another topic; nothing earlier to repeat
    assert RepeatGuard(threshold=0.9).repeats(["Birds are what I love most"], [earlier[0]]) == [False]  # exact only
    assert RepeatGuard(threshold=0.9).repeats(["  i REALLY love   birds. "], [earlier[0]]) == [True]

    class Paraphrasing:
        name, seeds = "scripted:paraphrase", []

        def chat(self, conversations, params):
            self.seeds.append(params.seed)
            return [ChatResult("Birds, birds, birds." if len(self.seeds) < 3 else "My garden is a mess.", "stop", 1, 1)
                    for _ in conversations]

    backend = Paraphrasing()
    out = guard.chat(Role("user", backend), [[{"role": "user", "content": "hi"}]],
                     GenerationParams(temperature=0.7, seed=11), [["I really love birds."]])
    assert out.resamples == [2] and out.repeated == [False] and out.results[0].text == "My garden is a mess."
    assert len(set(backend.seeds)) == 3 and backend.seeds[0] == 11


def test_the_least_similar_candidate_is_kept_when_every_resample_repeats():
    class Drifting:  # an exact copy, a paraphrase on the same topic, an exact copy again
        name, texts, chats = "scripted:drift", ["I love birds.", "Birds are what I love most", "i love BIRDS."], []

        def chat(self, conversations, params):
            self.chats.append(conversations[0])
            return [ChatResult(self.texts[len(self.chats) - 1], "stop", 1, 1)]

    backend = Drifting()
    guard = RepeatGuard(max_resamples=2, threshold=0.9, embed=_topic_embedder, nudge=True)
    chat = [{"role": "system", "content": "persona"}, {"role": "user", "content": "How can I help?"}]
    out = guard.chat(Role("user", backend), [chat], GenerationParams(temperature=0.7, seed=3), [["I love birds."]])
    # The paraphrase still repeats (cosine 1 > 0.9) but is further from the earlier message than an exact copy.
    assert out.resamples == [2] and out.repeated == [True] and out.results[0].text == "Birds are what I love most"
    assert backend.chats[0] == chat and backend.chats[1][0] == chat[0]  # the caller's chat is left as it was
    assert backend.chats[1][-1]["content"] == "How can I help?" + RESAMPLE_NUDGE
    off = RepeatGuard(max_resamples=2, threshold=0.9, embed=_topic_embedder, nudge=False)
    assert off.card()["nudge"] is None and guard.card()["nudge"] not in (None, off.card()["nudge"])


def test_trees_use_the_same_guard_and_count_it_in_the_run_summary(tmp_path):
    backends = scripted_backends()
    calls = []

    class CopyingUser:  # turn 0: a message; later turns: that message again on the first try, then a new one
        name = "scripted:user"

        def chat(self, conversations, params):
            calls.append(len(conversations))
            turns = [sum(m["role"] == "assistant" for m in c) for c in conversations]
            fresh = len(calls) % 2 == 1 and len(calls) > 1
            return [ChatResult("About birds." if t == 0 or not fresh else ("", "my tax", "my garden")[t], "stop", 1, 1)
                    for t in turns]

        def score_options(self, conversations, options):
            return None

    backends["user"] = CopyingUser()
    from data_pipeline.trees import TreeScript, generate_trees

    cfg = tree_cfg(tmp_path, conversations=2, turns=3, repeat_threshold=0.9)
    summary, _ = generate_trees(cfg, backends, show_progress=False, embed=_topic_embedder)
    assert calls == [2, 2, 2, 2, 2]  # per later turn: both rows copy, both are resampled once
    assert summary["user_repeat_guard"] == {"resamples_per_turn": [0, 2, 2], "repeats_per_turn": [0, 0, 0]}
    states = [json.loads(line) for line in (tmp_path / "state" / "turns.jsonl").read_text().splitlines()]
    assert {(s["turn"], s["user_resamples"]) for s in states} == {(0, 0), (1, 1), (2, 1)}
    assert isinstance(TreeScript(cfg, {"judge": None}).guard, RepeatGuard)
    # The guard's settings are part of the state's fingerprint.
    with pytest.raises(ConfigError, match="user_repeat_guard"):
        generate_trees(tree_cfg(tmp_path, conversations=2, turns=3, repeat_threshold=0.9, max_resamples=1),
                       backends, show_progress=False, embed=_topic_embedder)


def test_a_changed_simulator_prompt_is_a_changed_hash_and_an_old_folder_refuses(tmp_path, monkeypatch):
    _eval(tmp_path, RepeatingSimulator(copies=0), turns=1)
    before = prompts.prompt_hash()
    monkeypatch.setattr(prompts, "SIMULATOR_SYSTEM", prompts.SIMULATOR_SYSTEM + " Say everything at once.")
    assert prompts.prompt_hash() != before
    with pytest.raises(ConfigError, match="prompt_hash"):
        _eval(tmp_path, RepeatingSimulator(copies=0), turns=2)
