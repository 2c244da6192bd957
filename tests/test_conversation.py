"""The conversation engine on a tiny fake script: kill-and-resume equals an uninterrupted run, the log keeps only the
next turn in sequence, batches do not depend on interruptions, a foreign folder is refused in one line; the shared
judge (log-probs first, else text with retries); seeds, message builders and the prompt hash."""

import json

import numpy as np
import pytest

from aloe_jax.conversation.engine import (RECORDS_FILE, TIMINGS_FILE, ConversationRun, Fingerprint, derive_seed,
                                          seeded)
from aloe_jax.conversation.judging import OptionJudge
from aloe_jax.conversation.messages import chat_messages, prompt_hash, simulator_messages, transcript
from aloe_jax.core import jsonl_log
from aloe_jax.core.errors import ConfigError
from aloe_jax.llm.base import ChatResult, GenerationParams
from aloe_jax.llm.cache import CallCache
from aloe_jax.llm.roles import Role


class Echo:
    """A ChatBackend replying with a function of the chat and the seed; records each batch and seed it was sent, and
    raises on its `crash_at`-th call as a kill in the middle of a turn would."""

    def __init__(self, name, crash_at=None):
        self.name, self.crash_at, self.calls, self.seeds = f"echo:{name}", crash_at, [], []

    def chat(self, conversations, params):
        self.calls.append([c[0]["content"] for c in conversations])
        self.seeds.append(params.seed)
        if len(self.calls) == self.crash_at:
            raise RuntimeError("simulated crash")
        return [ChatResult(f"{self.name}({len(c)}, {params.seed % 97})", "stop", 1, 1) for c in conversations]

    def score_options(self, conversations, options):
        return None


class TalkScript:
    """Two roles per turn: a user speaks, an assistant answers; records are {"who", "k", "user", "reply"}."""

    first_turn = 1

    def __init__(self, user, assistant, seed=0):
        self.user, self.assistant, self.seed = Role("user", user), Role("assistant", assistant), seed

    def conversation_id(self, name):
        return name

    def position(self, record):
        return record.get("who"), record.get("k")

    def turn(self, names, histories, turn, stopwatch):
        exchanges = [[(r["user"], r["reply"]) for r in h] for h in histories]
        with stopwatch("user"):
            users = self.user.chat([simulator_messages(n, "start", e) for n, e in zip(names, exchanges)],
                                   seeded(GenerationParams(), self.seed, "user", turn))
        with stopwatch("assistant"):
            replies = self.assistant.chat([chat_messages(e, u.text, system=n) for n, e, u in
                                           zip(names, exchanges, users)],
                                          seeded(GenerationParams(), self.seed, "assistant", turn))
        return [{"who": n, "k": turn, "user": u.text, "reply": r.text} for n, u, r in zip(names, users, replies)]


NAMES = ["ana", "bo", "cy"]


def _run(folder, script, turns=3, batch_size=2, card=None):
    return ConversationRun(script, str(folder), Fingerprint("card.json", card or {"seed": 0, "turns": turns},
                                                            "--folder", may_change=("turns",)),
                           turns, batch_size)


def _lines(folder):
    return (folder / RECORDS_FILE).read_text()


def test_resume_after_a_kill_mid_run_equals_an_uninterrupted_run(tmp_path):
    _run(tmp_path / "whole", TalkScript(Echo("user"), Echo("assistant"))).run(NAMES, show_progress=False)
    whole = _lines(tmp_path / "whole")
    assert len(whole.splitlines()) == 9 and len(set(whole.splitlines())) == 9

    killed = tmp_path / "killed"
    assistant = Echo("assistant", crash_at=3)  # batch [ana, bo]: turns 1 and 2 commit, turn 3 dies in the assistant
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(killed, TalkScript(Echo("user"), assistant)).run(NAMES, show_progress=False)
    assert len(_lines(killed).splitlines()) == 4
    with open(killed / RECORDS_FILE, "a") as f:
        f.write('{"who": "ana", "k": 3, "us')  # a kill during the append tears its last line
    user = Echo("user")
    stats = _run(killed, TalkScript(user, Echo("assistant"))).run(NAMES, show_progress=False)
    assert (stats.turns_at_start, stats.turns_done) == (4, 5)
    assert _lines(killed) == whole
    # Only the turns that were missing were asked for: turn 3 of the first batch, then the second batch.
    assert user.calls == [["ana", "bo"], ["cy"], ["cy"], ["cy"]]
    timed = [json.loads(line) for line in (killed / TIMINGS_FILE).read_text().splitlines()]
    assert [(t["turn"], t["cases"]) for t in timed] == [(1, 2), (2, 2), (3, 2), (1, 1), (2, 1), (3, 1)]
    assert all(set(t["seconds"]) == {"user", "assistant"} for t in timed)
    assert set(stats.role_seconds) == {1, 2, 3}
    # Finished: a rerun calls nobody.
    idle = Echo("user")
    assert _run(killed, TalkScript(idle, Echo("assistant"))).run(NAMES, show_progress=False).turns_done == 0
    assert idle.calls == []


def test_batches_are_cut_from_all_conversations_not_from_the_unfinished_ones(tmp_path):
    folder = tmp_path / "run"
    _run(folder, TalkScript(Echo("user"), Echo("assistant"))).run(NAMES, show_progress=False)
    lines = _lines(folder).splitlines(keepends=True)
    # bo's last turn was the torn line of the kill: ana is finished, bo and cy are not.
    (folder / RECORDS_FILE).write_text("".join(lines[:5]) + lines[5][:10])
    user = Echo("user")
    _run(folder, TalkScript(user, Echo("assistant"))).run(NAMES, show_progress=False)
    assert user.calls == [["bo"], ["cy"], ["cy"], ["cy"]]  # bo finishes in its own batch, never beside cy
    assert _lines(folder) == "".join(lines)


def test_the_log_keeps_only_the_next_turn_in_sequence(tmp_path):
    run = _run(tmp_path, TalkScript(Echo("user"), Echo("assistant")))
    jsonl_log.append(str(tmp_path / RECORDS_FILE), [
        {"who": "ana", "k": 1, "user": "first"},
        {"who": "ana", "k": 1, "user": "duplicate"},   # a turn committed twice: the first one counts
        {"who": "bo", "k": 2, "user": "early"},        # turn 2 before turn 1: out of sequence
        {"who": "ana", "k": 2, "user": "second"},
        {"who": "zed", "k": 1, "user": "stranger"},    # not one of this run's conversations
        {"who": "bo", "k": 1, "user": "bo first"},
        {"who": "ana", "k": 4, "user": "gap"},         # turn 3 missing: 4 does not count
    ])
    with open(tmp_path / RECORDS_FILE, "a") as f:
        f.write('{"who": "bo", "k": 2')
    done = run.committed(NAMES)
    assert [r["user"] for r in done["ana"]] == ["first", "second"]
    assert [r["user"] for r in done["bo"]] == ["bo first"]
    assert done["cy"] == [] and "zed" not in done
    assert (tmp_path / RECORDS_FILE).read_text().endswith('"gap"}\n')  # the torn line was cut


def test_a_folder_of_another_run_is_refused_in_one_line(tmp_path):
    script = TalkScript(Echo("user"), Echo("assistant"))
    _run(tmp_path, script, turns=1, card={"seed": 0, "turns": 1, "model": "m"}).run(NAMES, show_progress=False)
    with pytest.raises(ConfigError) as refused:
        _run(tmp_path, script, turns=1, card={"seed": 1, "turns": 1, "model": "n"}).run(NAMES, show_progress=False)
    message = str(refused.value)
    assert message == (f"{str(tmp_path)!r} belongs to another run (model, seed differ): use a new --folder, or "
                       "delete that folder to start over")
    # A key that may change between reruns (more turns) is no reason to refuse; the card then records the new value.
    _run(tmp_path, script, turns=2, card={"seed": 0, "turns": 2, "model": "m"}).run(NAMES, show_progress=False)
    assert json.loads((tmp_path / "card.json").read_text())["turns"] == 2
    assert len(_lines(tmp_path).splitlines()) == 6


class Judging:
    """A judge backend: `scores` per chat (None: cannot score), text answers from `answers` in turn."""

    name = "judging"

    def __init__(self, answers, scores=None):
        self.answers, self.scores, self.seen, self.seeds = list(answers), scores, [], []

    def chat(self, conversations, params):
        self.seen += conversations
        self.seeds += [params.seed] * len(conversations)
        return [ChatResult(self.answers.pop(0), "stop", 1, 1) for _ in conversations]

    def score_options(self, conversations, options):
        return None if self.scores is None else np.asarray([self.scores(c) for c in conversations], np.float64)


def _letter(text):
    return text.strip() if text.strip() in ("A", "B") else None


def test_the_shared_judge_falls_back_to_text_retries_and_records_none(tmp_path):
    backend = Judging(["maybe A?", "A or B", "well", "B", "no idea"])
    judge = OptionJudge(Role("judge", backend, CallCache(str(tmp_path / "calls.sqlite"))), ("A", "B"), _letter,
                        "One letter, please.", max_retries=2)
    chats = [[{"role": "user", "content": "first"}], [{"role": "user", "content": "second"}]]
    rulings = judge.rule(chats, GenerationParams(seed=10))
    # Round 1 asks both; "second" is answered on the first retry; "first" never gives a letter and stays undecided.
    assert [(r.choice, r.method) for r in rulings] == [(None, "text"), ("B", "text")]
    assert rulings[0].raw == ["maybe A?", "well", "no idea"] and rulings[1].raw == ["A or B", "B"]
    retry = backend.seen[2]
    assert retry == chats[0] + [{"role": "assistant", "content": "maybe A?"},
                                {"role": "user", "content": "One letter, please."}]
    assert backend.seeds == [10, 10, 11, 11, 12]  # a fresh seed per attempt: the cache never replays an answer


def test_the_shared_judge_scores_options_first_and_reads_text_only_where_it_must():
    rows = {"scorable": [-0.5, -2.0], "impossible": [-np.inf, -np.inf]}
    backend = Judging(["B"], scores=lambda c: rows[c[0]["content"]])
    judge = OptionJudge(Role("judge", backend), ("A", "B"), _letter, "One letter.", max_retries=1)
    rulings = judge.rule([[{"role": "user", "content": k}] for k in rows], GenerationParams())
    assert (rulings[0].choice, rulings[0].method, rulings[0].raw) == ("A", "logprobs", [])
    np.testing.assert_array_equal(rulings[0].option_logprobs, rows["scorable"])
    assert (rulings[1].choice, rulings[1].method, rulings[1].raw) == ("B", "text", ["B"])
    assert [c[0]["content"] for c in backend.seen] == ["impossible"]
    text_only = OptionJudge(Role("judge", Judging(["A"], scores=lambda c: [0.0, -1.0])), ("A", "B"), _letter, "",
                            max_retries=0, use_logprobs=False)
    assert text_only.rule([[{"role": "user", "content": "x"}]], GenerationParams())[0].method == "text"


def test_seeds_are_stable_and_derived_one_way():
    # Values recorded before the engine existed: trees and eval folders resume with the seeds they were made with.
    assert (derive_seed(7, "user", 0), derive_seed(3, "s0-p0001-q001"), derive_seed(1, "judge", 2, "order")) == (
        272870018, 615821806, 516996264)
    params = GenerationParams(temperature=0.5, seed=123)
    assert seeded(params, 7, "user", 0) == params.model_copy(update={"seed": 272870018})


def test_message_builders_and_prompt_hash():
    exchanges = [("hi", "hello"), ("how?", "so")]
    assert chat_messages(exchanges, "next", system="sys") == [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "how?"},
        {"role": "assistant", "content": "so"}, {"role": "user", "content": "next"}]
    assert chat_messages([], None) == []
    # The simulator speaks as the assistant of its own chat.
    assert simulator_messages("persona", "begin", exchanges) == [
        {"role": "system", "content": "persona"}, {"role": "user", "content": "begin"},
        {"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "how?"}, {"role": "user", "content": "so"}]
    assert transcript(chat_messages(exchanges[:1], "next", system="sys")) == "User: hi\nAssistant: hello\nUser: next"
    digest = prompt_hash("ab", "c")
    assert len(digest) == 16 and int(digest, 16) >= 0
    assert digest != prompt_hash("a", "bc") and digest == prompt_hash("ab", "c")


def test_the_progress_bar_says_which_role_a_turn_is_in_and_how_long_the_earlier_ones_took(tmp_path, capsys):
    _run(tmp_path / "run", TalkScript(Echo("user"), Echo("assistant")), turns=2).run(NAMES, show_progress=True)
    shown = capsys.readouterr().err
    assert "turn 1, 2 conversations: user" in shown
    assert "turn 2, 1 conversations: assistant (done: user 0s)" in shown
