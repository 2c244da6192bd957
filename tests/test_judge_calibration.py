"""Judge calibration, measured: tree generation's pairwise judge also shown the swapped order for a seeded share of
turns, the evaluation's score judge shown its scale backwards for a seeded share of case-turns; agreement and
first-shown rates (worked out by hand) in the summaries, and a judge no better than position flagged."""

import json

import pytest

from aloe_jax.core.errors import ConfigError
from aloe_jax.eval import report
from aloe_jax.eval.judge import Judge
from aloe_jax.eval.knowing import JudgeProbe
from aloe_jax.llm.roles import Role
from data_pipeline.trees import generate_trees
from tests.test_knowing import Backend, case_of, config, judge_backend, make_runner, records
from tests.test_trees import _cfg, _records, _reply_a, scripted_backends

FLAG = "Judge flagged: no better than position"


def _hinted_first(c):
    return _reply_a(c).startswith("HINTED")


def _tree_calibration(tmp_path, judge_reply, **trees):
    backends = scripted_backends(judge_reply=judge_reply)
    summary, _ = generate_trees(_cfg(tmp_path, **trees), backends, show_progress=False)
    return summary["judge_calibration"], backends, _records(tmp_path / "trees.jsonl")


def test_trees_judge_biased_to_the_first_reply_is_flagged(tmp_path):
    calibration, backends, trees = _tree_calibration(tmp_path, lambda c: "A", judge_swap_fraction=1.0)
    # 2 conversations × 3 turns, each pair shown both ways: "A" wins all 12 judgments, no pair agrees.
    assert (calibration["pairs"], calibration["agreement"], calibration["first_shown_rate"]) == (6, 0.0, 1.0)
    assert calibration["flagged"] and FLAG in calibration["line"]
    assert len(backends["judge"].seen) == 12
    # The data keep the verdict of the first order shown: reply A won.
    for turn in (t for r in trees for t in r.turns):
        assert turn.preferred.startswith("HINTED" if turn.judge.order == "AB" else "plain")
        assert turn.judge.swap_raw == "A" and turn.judge.order_winners[turn.judge.order] == (
            "hinted" if turn.judge.order == "AB" else "plain")


def test_trees_consistent_judge_is_not_flagged_and_a_partly_biased_one_gives_its_rates(tmp_path):
    calibration, _, _ = _tree_calibration(tmp_path / "fair", lambda c: "A" if _hinted_first(c) else "B",
                                          judge_swap_fraction=1.0)
    # Always the hinted reply: every pair agrees, and reply A wins exactly when hinted is shown first (6 of 12).
    assert (calibration["pairs"], calibration["agreement"], calibration["first_shown_rate"]) == (6, 1.0, 0.5)
    assert not calibration["flagged"] and FLAG not in calibration["line"]

    def partly(c):  # "A" at the first turn (one user message in the transcript), the hinted reply later
        return "A" if c[-1]["content"].count("User:") == 1 or _hinted_first(c) else "B"

    calibration, _, _ = _tree_calibration(tmp_path / "partly", partly, judge_swap_fraction=1.0)
    # Turn 0 (2 pairs): A both times, disagree, 4 first-shown wins; turns 1-2 (4 pairs): agree, 1 of 2 first-shown.
    assert calibration["pairs"] == 6
    assert calibration["agreement"] == pytest.approx(4 / 6) and calibration["first_shown_rate"] == pytest.approx(8 / 12)
    assert not calibration["flagged"]
    calibration, _, _ = _tree_calibration(tmp_path / "strict", partly, judge_swap_fraction=1.0,
                                          judge_flag_first_shown=0.6)
    assert calibration["flagged"]  # 8/12 >= 0.6


def test_trees_swap_a_seeded_share_of_turns(tmp_path):
    calibration, backends, trees = _tree_calibration(tmp_path / "a", lambda c: "A", conversations=6, turns=4,
                                                     judge_swap_fraction=0.5)
    swapped = [t for r in trees for t in r.turns if getattr(t.judge, "order_winners", None)]
    assert 0 < len(swapped) < 24 and calibration["pairs"] == len(swapped)
    assert len(backends["judge"].seen) == 24 + len(swapped)
    again, _, _ = _tree_calibration(tmp_path / "b", lambda c: "A", conversations=6, turns=4, judge_swap_fraction=0.5)
    assert again == calibration
    off, backends, trees = _tree_calibration(tmp_path / "off", lambda c: "A", judge_swap_fraction=0.0)
    assert off["pairs"] == 0 and not off["flagged"] and len(backends["judge"].seen) == 6
    assert "judge_swap_fraction" not in trees[0].meta


def _first_listed(chat):
    """Log-probs of a judge that always picks the score listed first on the scale."""
    content = chat[-1]["content"]
    first = 1 if "Scale: 1 =" in content else 5 if "Scale: 5 =" in content else None
    assert first is not None
    return [0.0 if s == first else -9.0 for s in range(1, 6)]


def _probe_runner(cfg, out, judge):
    role_judge = Judge(Role("judge", judge), "logprobs")
    return make_runner(cfg, out, judge=judge, knowing=False,
                       probe=JudgeProbe(role_judge, cfg.judge.probe_fraction, cfg.seed, cfg.judge.flag_first_shown))


def test_eval_judge_biased_to_the_first_listed_score_is_flagged(tmp_path):
    cfg = config(judge={"probe_fraction": 1.0})
    judge = Backend("judge", lambda c: "1", _first_listed)
    _probe_runner(cfg, tmp_path, judge).run(show_progress=False)
    got = records(tmp_path)
    assert all((r["score"], r["judge_probe"]["score"]) == (1, 5) for r in got.values())
    report.write_report(str(tmp_path), n_resamples=10)
    summary = json.loads((tmp_path / report.SUMMARY_FILE).read_text())
    calibration = summary["judge_calibration"]
    # 2 cases × 2 turns probed: 1 forwards, 5 backwards every time: no agreement, first-listed in 8 of 8.
    assert (calibration["pairs"], calibration["agreement"], calibration["first_shown_rate"]) == (4, 0.0, 1.0)
    assert calibration["flagged"]
    text = (tmp_path / report.REPORT_FILE).read_text()
    assert FLAG in text.split("\n\n")[1]  # the line under the title
    assert summary["score_distribution"] == [{"1": 2, "2": 0, "3": 0, "4": 0, "5": 0, "missing": 0}] * 2
    assert "| 1 | 2 | 0 | 0 | 0 | 0 | 0 |" in text


def test_eval_consistent_judge_is_not_flagged(tmp_path):
    cfg = config(judge={"probe_fraction": 1.0})
    judge = judge_backend(lambda c: 1 if case_of(c) == "A" else 3)
    _probe_runner(cfg, tmp_path, judge).run(show_progress=False)
    report.write_report(str(tmp_path), n_resamples=10)
    summary = json.loads((tmp_path / report.SUMMARY_FILE).read_text())
    calibration = summary["judge_calibration"]
    # Same score both ways; only case A's forward judgments (score 1, listed first) chose the first-listed: 2 of 8.
    assert (calibration["pairs"], calibration["agreement"], calibration["first_shown_rate"]) == (4, 1.0, 0.25)
    assert not calibration["flagged"]
    assert FLAG not in (tmp_path / report.REPORT_FILE).read_text()
    assert summary["score_distribution"][0] == {"1": 1, "2": 0, "3": 1, "4": 0, "5": 0, "missing": 0}


def test_eval_probe_is_a_seeded_share_and_on_the_card(tmp_path):
    cfg = config(turns=3, judge={"probe_fraction": 0.5})
    judge = judge_backend()
    runner = _probe_runner(cfg, tmp_path, judge)
    runner.run(show_progress=False)
    got = records(tmp_path)
    probed = {key for key, r in got.items() if "judge_probe" in r}
    assert probed == {(c, k) for c in ("A", "B") for k in (1, 2, 3) if runner.probe.selected(c, k)}
    assert len(judge.seen) == 6 + len(probed)
    assert sum("Scale: 5 =" in c[-1]["content"] for c in judge.seen) == len(probed)
    card = json.loads((tmp_path / "protocol.json").read_text())
    assert card["judge_probe"]["fraction"] == 0.5 and card["judge_probe"]["prompt_hash"]
    with pytest.raises(ConfigError, match="judge_probe"):
        _probe_runner(config(turns=3, judge={"probe_fraction": 0.25}), tmp_path, judge).run(show_progress=False)
