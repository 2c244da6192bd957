"""The ALOE judge: strict parsing with retries on text, option log-probabilities on a local model, never a crash."""

import math

import numpy as np
import pytest

from aloe_jax.eval import prompts
from aloe_jax.eval.judge import Judge, parse_score, verdict_from_logprobs
from aloe_jax.llm.base import ChatResult
from aloe_jax.llm.cache import CallCache
from aloe_jax.llm.jax_backend import JaxBackend
from aloe_jax.llm.roles import Role


@pytest.mark.parametrize("answer, score", [
    ("4", 4), ("Score: 4", 4), ("**4**", 4), ("4.", 4), (" 5\n", 5), ("rating = 2", 2), ("3/5", 3), ("*Score:* 1", 1),
    ("garbage", None), ("", None), ("6", None), ("0", None), ("45", None), ("I'd say 4", None), ("3 or 4", None),
    ("4. It fits well", None),
])
def test_parse_score(answer, score):
    assert parse_score(answer) == score


class ScriptedJudge:
    """A chat backend answering each judge chat from a script keyed by the chat's rated reply, one answer per call."""

    name = "scripted"

    def __init__(self, scripts: dict[str, list[str]]):
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.seen = []

    def chat(self, conversations, params):
        assert params.temperature == 0.0
        results = []
        for conv in conversations:
            self.seen.append(conv)
            key = next(k for k in self.scripts if k in conv[1]["content"])
            results.append(ChatResult(self.scripts[key].pop(0), "stop", 10, 1))
        return results

    def score_options(self, conversations, options):
        return None  # an endpoint without log-probabilities: the judge must read text


def _chats(replies):
    from aloe_jax.eval.cases import EvalCase

    case = EvalCase("c", 0, 0, "A nurse in Oslo.", "Blunt and funny.")
    return [prompts.judge_messages(case, [], "hi", reply, history_turns=2) for reply in replies]


def test_text_judge_parses_retries_and_records_missing(tmp_path):
    backend = ScriptedJudge({
        "reply-garbage": ["I cannot decide.", "Hmm, maybe good?", "well..."],
        "reply-label": ["Score: 4"],
        "reply-bold": ["**4**"],
        "reply-period": ["4."],
        "reply-second-try": ["It is a five", "5"],
    })
    judge = Judge(Role("judge", backend, CallCache(str(tmp_path / "calls.sqlite"))), method="logprobs",
                  max_retries=2)
    verdicts = judge.score(_chats(["reply-garbage", "reply-label", "reply-bold", "reply-period", "reply-second-try"]))
    assert [v.score for v in verdicts] == [None, 4, 4, 4, 5]
    assert all(v.method == "text" for v in verdicts)
    # Raw output of every attempt is kept; garbage got the first try plus two retries, then was recorded missing.
    assert verdicts[0].raw == ["I cannot decide.", "Hmm, maybe good?", "well..."]
    assert verdicts[4].raw == ["It is a five", "5"]
    assert verdicts[1].raw == ["Score: 4"]
    # A retry shows the judge its unreadable answer and asks again (a new chat, so the cache cannot replay it).
    retry = [c for c in backend.seen if "reply-second-try" in c[1]["content"]][1]
    assert retry[-2] == {"role": "assistant", "content": "It is a five"}
    assert retry[-1] == {"role": "user", "content": prompts.JUDGE_RETRY}
    assert len(backend.seen) == 5 + 2 + 1  # first round, two retries of garbage, one of second-try


def test_verdict_from_option_logprobs():
    # Probabilities .05 .1 .2 .1 .05 (mass .5 on the digits) → renormalised .1 .2 .4 .2 .1: argmax 3, expectation 3.
    v = verdict_from_logprobs(np.log([0.05, 0.1, 0.2, 0.1, 0.05]))
    assert v.score == 3 and v.expected_score == pytest.approx(3.0) and v.option_mass == pytest.approx(0.5)
    # Options an endpoint did not return (-inf) get no weight: halves on 3 and 4 → expectation 3.5.
    v = verdict_from_logprobs([-math.inf, -math.inf, math.log(0.3), math.log(0.3), -math.inf])
    assert v.score == 3 and v.expected_score == pytest.approx(3.5) and v.option_logprobs[0] is None
    assert verdict_from_logprobs([-math.inf] * 5) is None
    assert verdict_from_logprobs([0.0, math.nan, 0.0, 0.0, 0.0]) is None


def test_logprob_judge_on_local_model(tiny_chat_engine):
    backend = JaxBackend(engine=tiny_chat_engine, name="jax:tiny")
    chats = _chats(["Sure, here is a plan.", "No."])
    verdicts = Judge(Role("judge", backend), method="logprobs").score(chats)
    expected = tiny_chat_engine.score_options(chats, prompts.SCORE_OPTIONS)
    for v, row in zip(verdicts, expected):
        assert v.method == "logprobs" and v.raw == []
        np.testing.assert_allclose(v.option_logprobs, row, rtol=1e-5)
        assert v.score == int(np.argmax(row)) + 1
        probs = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        assert v.expected_score == pytest.approx(float(probs @ np.arange(1, 6)), rel=1e-5)
        assert 0 < v.option_mass <= 1


def test_logprob_judge_falls_back_to_text_when_options_are_unscorable():
    class NoDigitsOnTop(ScriptedJudge):
        def score_options(self, conversations, options):
            return np.full((len(conversations), len(options)), -np.inf)  # none of "1".."5" among top logprobs

    verdicts = Judge(Role("judge", NoDigitsOnTop({"r": ["2"]})), method="logprobs").score(_chats(["r"]))
    assert verdicts[0].score == 2 and verdicts[0].method == "text" and verdicts[0].raw == ["2"]
