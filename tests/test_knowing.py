"""Knowing vs doing: the extractor's inferred persona scored against the true one (a fake embedder, expected numbers
worked out by hand), per turn with its bootstrap CI over cases, in the records, report.md, summary.json and the plot,
on the protocol card, and rebuilt by `eval-report`."""

import json
import math
import types

import numpy as np
import pytest

from aloe_jax.core.errors import ConfigError
from aloe_jax.eval import metrics, report
from aloe_jax.eval.cases import EvalCase
from aloe_jax.eval.config import EvalConfig
from aloe_jax.eval.judge import Judge
from aloe_jax.eval.knowing import Knowing, similarities
from aloe_jax.eval.runner import RECORDS_FILE, EvalRunner, protocol_card
from aloe_jax.llm.base import ChatResult, GenerationParams
from aloe_jax.llm.roles import Role

CASES = [EvalCase("A", 0, 0, "PA", "QA"), EvalCase("B", 1, 1, "PB", "QB")]
# The fake embedder's vectors (not unit length: the similarity must normalise them).
VECTORS = {"PA": (1, 0, 0), "QA": (0, 1, 0), "PB": (0, 0, 1), "QB": (0, 1, 0),
           "nurse": (3, 4, 0), "blunt": (0, 1, 1), "chess": (0, 0, 2), "unknown": (1, 1, 1), "": (5, 5, 5)}
# What the scripted extractor infers, per (case, turn).
EXTRACTED = {("A", 1): "Profile: nurse\nPersonality:", ("A", 2): "Profile: nurse\nPersonality: blunt",
             ("B", 1): "Profile: unknown\nPersonality: unknown", ("B", 2): "Profile: chess\nPersonality: blunt"}
R2, R3 = 1 / math.sqrt(2), 1 / math.sqrt(3)


def fake_embed(texts):
    return np.asarray([VECTORS[t] for t in texts], dtype=np.float32)


class FakeEngine:
    """The model under test: replies name the case and turn of the conversation."""

    def reply(self, conversations, params):
        return [types.SimpleNamespace(text=f"reply to {c[-1]['content']}", finish_reason="stop", prompt_tokens=3,
                                      completion_tokens=2, cached_tokens=0) for c in conversations]


class Backend:
    """A ChatBackend from functions of the chat: `reply` for text, `scores` (optional) for option log-probs."""

    def __init__(self, name, reply, scores=None):
        self.name, self.reply, self.scores, self.seen = f"scripted:{name}", reply, scores, []

    def chat(self, conversations, params):
        self.seen.extend(conversations)
        return [ChatResult(self.reply(c), "stop", 5, 3) for c in conversations]

    def score_options(self, conversations, options):
        if self.scores is None:
            return None
        self.seen.extend(conversations)
        return np.asarray([self.scores(c) for c in conversations], dtype=np.float64)


def case_of(chat) -> str:
    """The case a chat belongs to, from the simulator's messages ("user A 1", ...)."""
    return "A" if "user A " in json.dumps(chat) else "B"


def simulator():
    # A new message every turn (the repeat guard has nothing to resample): "user <case> <turn>".
    return Backend("simulator", lambda c: f"user {'A' if 'PA' in c[0]['content'] else 'B'} {(len(c) + 1) // 2}")


def extractor():
    return Backend("extractor", lambda c: EXTRACTED[case_of(c), c[-1]["content"].count("User:")])


def judge_backend(score=lambda c: 3):
    """A log-prob judge choosing score(c) (1-5)."""
    return Backend("judge", lambda c: "3", lambda c: [0.0 if s == score(c) else -9.0 for s in range(1, 6)])


def config(turns=2, **overrides):
    return EvalConfig.model_validate({"cases": 2, "turns": turns, "bootstrap_resamples": 2000, **overrides})


def make_runner(cfg, out, judge=None, knowing=True, probe=None, extract=None):
    sim = Role("simulator", simulator())
    judge_role = Role("judge", judge or judge_backend())
    runner = EvalRunner(cfg, CASES, FakeEngine(), sim, Judge(judge_role, "logprobs"), str(out),
                        protocol_card(cfg, "fake-model", sim.backend.name, judge_role.backend.name))
    know = Knowing(Role("extractor", extract or extractor()), cfg.knowing.generation, fake_embed, cfg.seed,
                   encoder_name="fake") if knowing else None
    return runner.measuring(know, probe)


def records(out):
    return {(r["case_id"], r["turn"]): r for r in map(json.loads, (out / RECORDS_FILE).read_text().splitlines())}


def test_similarity_is_the_cosine_and_an_empty_field_scores_zero():
    got = similarities(fake_embed, ["nurse", "blunt", "unknown", ""], ["PA", "QA", "PB", "QB"])
    # nurse·PA = 3 / (5 · 1); blunt·QA = 1 / (√2 · 1); unknown·PB = 1 / (√3 · 1); empty: 0 whatever its vector.
    np.testing.assert_allclose(got, [0.6, R2, R3, 0.0], atol=1e-6)


def test_knowing_per_turn_on_a_fixed_transcript(tmp_path):
    cfg = config()
    extract = extractor()
    make_runner(cfg, tmp_path, extract=extract).run(show_progress=False)
    got = records(tmp_path)
    # By hand: A1 = (0.6 + 0) / 2; A2 = (0.6 + 1/√2) / 2; B1 = (1/√3 + 1/√3) / 2; B2 = (1 + 1/√2) / 2.
    expected = {("A", 1): (0.6, 0.0, 0.3), ("A", 2): (0.6, R2, 0.6535534), ("B", 1): (R3, R3, R3),
                ("B", 2): (1.0, R2, 0.8535534)}
    for key, (profile, personality, knowing) in expected.items():
        r = got[key]
        assert (r["knowing_profile"], r["knowing_personality"], r["knowing"]) == pytest.approx(
            (profile, personality, knowing), abs=1e-6)
    assert (got["A", 2]["inferred_profile"], got["A", 2]["inferred_personality"]) == ("nurse", "blunt")
    # The extractor read the conversation so far, this turn's reply included.
    assert "Assistant: reply to user A 2" in extract.seen[-2][-1]["content"] + extract.seen[-1][-1]["content"]

    summary = report.write_report(str(tmp_path), n_resamples=2000)
    data = json.loads((tmp_path / report.SUMMARY_FILE).read_text())["knowing"]
    # Per turn mean over the two cases: (0.3 + 1/√3) / 2 and (0.6535534 + 0.8535534) / 2.
    np.testing.assert_allclose(data["knowing"]["mean"], [0.4386751, 0.7535534], atol=1e-6)
    np.testing.assert_allclose(data["knowing_profile"]["mean"], [(0.6 + R3) / 2, 0.8], atol=1e-6)
    np.testing.assert_allclose(data["knowing_personality"]["mean"], [R3 / 2, R2], atol=1e-6)
    # Two cases: a resample holds case A twice (p = 1/4), A and B, or B twice, so the 95% interval spans the two.
    np.testing.assert_allclose(data["knowing"]["ci"], [[0.3, 0.6535534], [R3, 0.8535534]], atol=1e-6)
    assert data["protocol"]["encoder"] == "fake" and data["protocol"]["extractor"] == "scripted:extractor"
    text = (tmp_path / report.REPORT_FILE).read_text()
    assert "## Knowing vs doing" in text
    assert f"| 1 | 0.439 | [0.300, 0.577] | 0.589 | 0.289 | {summary.al[0]:.3f} |" in text

    # eval-report rebuilds the same numbers from the records alone.
    (tmp_path / report.SUMMARY_FILE).unlink()
    report.write_report(str(tmp_path), n_resamples=2000)
    assert json.loads((tmp_path / report.SUMMARY_FILE).read_text())["knowing"] == data


def test_knowing_ci_is_a_bootstrap_over_cases():
    values = np.array([[0.0, 1.0, 0.5], [0.0, 0.0, np.nan], [1.0, 0.0, 0.5], [1.0, 0.0, np.nan]])
    curve = metrics.turn_means(values, n_resamples=2000, seed=0)
    np.testing.assert_allclose(curve.mean, [0.5, 0.25, 0.5])
    np.testing.assert_array_equal(curve.counts, [4, 4, 2])
    # Turn 1: the mean of 4 cases drawn from {0, 0, 1, 1} is 0 or 1 with probability 1/16 each (> 2.5%): the
    # interval is [0, 1]. Turn 2, cases {1, 0, 0, 0}: P(mean 0) = (3/4)^4 = 0.32; P(mean >= 3/4) = 4 (1/4)^3 (3/4) +
    # (1/4)^4 = 0.051 > 2.5% > P(mean 1) = 0.004: the interval is [0, 0.75].
    np.testing.assert_allclose(curve.ci[0][:2], [0.0, 0.0])
    np.testing.assert_allclose(curve.ci[1][:2], [1.0, 0.75])
    one = metrics.turn_means(values[:1], n_resamples=2000)
    assert np.all(np.isnan(one.ci[0]))  # one case: no interval


def test_knowing_is_on_the_card_and_a_resume_without_it_is_refused(tmp_path):
    cfg = config(turns=1)
    make_runner(cfg, tmp_path).run(show_progress=False)
    card = json.loads((tmp_path / "protocol.json").read_text())
    assert card["knowing"]["prompt_hash"] and card["knowing"]["encoder"] == "fake"
    with pytest.raises(ConfigError, match="knowing"):
        make_runner(config(turns=2), tmp_path, knowing=False).run(show_progress=False)
    off = tmp_path / "off"
    make_runner(config(turns=1, knowing={"enabled": False}), off, knowing=False).run(show_progress=False)
    assert "knowing" not in records(off)["A", 1] and "knowing" not in json.loads((off / "protocol.json").read_text())
    report.write_report(str(off), n_resamples=10)
    assert "knowing" not in json.loads((off / report.SUMMARY_FILE).read_text())
    assert "Knowing vs doing" not in (off / report.REPORT_FILE).read_text()


def test_the_plot_has_a_knowing_panel(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    make_runner(config(), tmp_path).run(show_progress=False)
    report.write_report(str(tmp_path), n_resamples=50)
    (figure,) = figures
    _, panel = figure.axes
    np.testing.assert_allclose(panel.lines[0].get_ydata(), [0.4386751, 0.7535534], atol=1e-6)
    np.testing.assert_array_equal(panel.lines[0].get_xdata(), [1, 2])


def test_default_eval_config_measures_knowing_with_the_extractor_on_its_own_backend():
    cfg = EvalConfig()
    assert cfg.knowing.enabled and cfg.knowing.backend.kind == "jax" and cfg.knowing.generation.temperature == 0.0
    assert GenerationParams().seed == 0
