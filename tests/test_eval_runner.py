"""The ALOE loop end to end on tiny models: cases, lockstep batching = one case at a time, kill-and-resume, reports,
the CLI on a model stored on gs:// (emulator)."""

import gzip
import json
import shutil

import numpy as np
import pytest

from aloe_jax.cli import main
from aloe_jax.core.errors import ConfigError
from aloe_jax.eval import report
from aloe_jax.eval.cases import build_cases, load_cases
from aloe_jax.eval.config import EvalConfig
from aloe_jax.eval.judge import Judge
from aloe_jax.eval.runner import RECORDS_FILE, TIMINGS_FILE, EvalRunner, protocol_card, total_seconds
from aloe_jax.llm.cache import CallCache
from aloe_jax.llm.jax_backend import JaxBackend
from aloe_jax.llm.roles import Role
from tests.conftest import SHARED

ALOE_DATA = str(SHARED / "aloe_data")


@pytest.fixture(scope="module")
def engine(smollm2_tokenizer):
    """A tiny random Llama with the SmolLM2 vocabulary and *untied* embeddings: with tied ones, greedy decoding just
    repeats the prompt's last token (a newline), and equal transcripts would prove nothing."""
    from flax import nnx

    from aloe_jax.models.config import config_from_hf
    from aloe_jax.models.decoder import Decoder
    from aloe_jax.sampling.chat import ChatEngine

    cfg = config_from_hf(dict(model_type="llama", vocab_size=len(smollm2_tokenizer), hidden_size=32,
                              intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, tie_word_embeddings=False))
    return ChatEngine(Decoder(cfg, nnx.Rngs(0)), smollm2_tokenizer)


def test_cases_are_the_aloe_set():
    cases = load_cases(ALOE_DATA)
    assert len(cases) == 100 and len({c.case_id for c in cases}) == 100
    assert {c.profile_index for c in cases} == set(range(20))
    assert {c.personality_index for c in cases} == set(range(5))  # personalities 5 and 6 of the pool are not used
    from aloe_jax.conversation.aloe_pools import load_pool

    profiles, personalities = load_pool("profile", "eval", ALOE_DATA), load_pool("personality", "eval", ALOE_DATA)
    assert (cases[0].profile, cases[0].personality) == (profiles[0], personalities[0])
    assert (cases[7].profile, cases[7].personality) == (profiles[1], personalities[2])
    assert (cases[99].profile, cases[99].personality) == (profiles[19], personalities[4])
    assert [c.case_id for c in load_cases(ALOE_DATA, 7)] == [c.case_id for c in cases[:7]]
    for bad in (0, 101):
        with pytest.raises(ConfigError, match="between 1 and 100"):
            build_cases(profiles, personalities, bad)


def _config(turns: int = 2, simulator_temperature: float = 0.0, seed: int = 0) -> EvalConfig:
    return EvalConfig.model_validate({
        "cases": 3, "turns": turns, "seed": seed, "model": {"generation": {"max_tokens": 10}},
        "simulator": {"generation": {"temperature": simulator_temperature, "max_tokens": 10}},
        "judge": {"history_turns": 1}, "bootstrap_resamples": 50})


class CountingEngine:
    """The model under test's engine, counting the batches it decodes."""

    def __init__(self, engine):
        self.engine, self.batches = engine, []

    def reply(self, conversations, params):
        self.batches.append(len(conversations))
        return self.engine.reply(conversations, params)


class CrashingBackend:
    """Wraps a backend and raises on the n-th option-scoring call, as a crash in the middle of a turn would."""

    def __init__(self, backend, crash_at: int):
        self.backend, self.name, self.crash_at, self.calls = backend, backend.name, crash_at, 0

    def chat(self, conversations, params):
        return self.backend.chat(conversations, params)

    def score_options(self, conversations, options):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        return self.backend.score_options(conversations, options)


def _runner(engine, cfg, cases, out, judge_backend=None):
    backend = JaxBackend(engine=engine.engine if isinstance(engine, CountingEngine) else engine, name="jax:tiny")
    cache = CallCache(str(out / "calls.sqlite"))
    simulator = Role("simulator", backend, cache)
    judge = Judge(Role("judge", judge_backend or backend, cache), cfg.judge.resolved_method())
    return EvalRunner(cfg, cases, engine, simulator, judge, str(out), protocol_card(cfg, "tiny", backend.name,
                                                                                     backend.name))


def _records(out):
    with open(out / RECORDS_FILE) as f:
        return [json.loads(line) for line in f]


def test_lockstep_batch_equals_each_case_alone(engine, tmp_path):
    cfg = _config()
    cases = load_cases(ALOE_DATA, 3)
    counting = CountingEngine(engine)
    _runner(counting, cfg, cases, tmp_path / "batch").run(show_progress=False)
    assert counting.batches == [3, 3]  # one batch per turn with every case in it
    batched = {(r["case_id"], r["turn"]): r for r in _records(tmp_path / "batch")}
    assert len(batched) == 6
    for i, case in enumerate(cases):
        _runner(engine, cfg, [case], tmp_path / f"alone{i}").run(show_progress=False)
        for alone in _records(tmp_path / f"alone{i}"):
            together = batched[(alone["case_id"], alone["turn"])]
            assert alone["user"] == together["user"] and alone["assistant"] == together["assistant"]
            assert alone["score"] == together["score"]
            assert alone["expected_score"] == pytest.approx(together["expected_score"], abs=1e-4)
    # The transcripts are real text that differs between cases, so equality above is not trivially true.
    assert all(r["user"] and r["assistant"] for r in batched.values())
    assert len({r["user"] for r in batched.values()}) > 1
    assert all(r["judge"]["method"] == "logprobs" and len(r["judge"]["option_logprobs"]) == 5
               for r in batched.values())


def test_kill_and_resume_gives_identical_records(engine, tmp_path):
    # A sampling simulator: only seeds derived from (run seed, role, turn) make the resumed run match.
    cfg = _config(simulator_temperature=0.8)
    cases = load_cases(ALOE_DATA, 3)
    _runner(engine, cfg, cases, tmp_path / "whole").run(show_progress=False)
    expected = _records(tmp_path / "whole")
    assert len(expected) == 6

    out = tmp_path / "killed"
    crashing = CrashingBackend(JaxBackend(engine=engine, name="jax:tiny"), crash_at=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _runner(engine, cfg, cases, out, judge_backend=crashing).run(show_progress=False)
    assert len(_records(out)) == 3  # turn 1 committed, turn 2 died in the judge
    with open(out / RECORDS_FILE, "ab") as f:
        f.write(b'{"case_id": "profile00-personality0", "turn": 2, "us')  # a kill during a write tears a line
    with open(out / TIMINGS_FILE, "ab") as f:
        f.write(b'{"turn": 2, "cases": 3, "sec')  # ... in either log
    # A report beside the run only reads: it must not cut a line that a live writer may still be appending.
    torn = (out / RECORDS_FILE).read_bytes()
    assert report.load_run(str(out)).ran.sum() == 3 and (out / RECORDS_FILE).read_bytes() == torn

    counting = CountingEngine(engine)
    stats = _runner(counting, cfg, cases, out).run(show_progress=False)
    assert stats.turns_at_start == 3 and stats.turns_done == 3
    assert counting.batches == [3]  # turn 2 only: turn 1 was not redone
    assert _records(out) == expected
    # Compute time survives the interruption: one timing line per committed turn, from both invocations.
    timed = [json.loads(line)["turn"] for line in (out / TIMINGS_FILE).read_text().splitlines()]
    total, per_role = total_seconds(str(out))
    assert timed == [1, 2] and set(per_role) == {"simulator", "model", "judge"} and total > 0

    # Finished: a rerun does nothing; the same folder with other settings is refused, not mixed.
    assert _runner(engine, cfg, cases, out).run(show_progress=False).turns_done == 0
    with pytest.raises(ConfigError, match="seed"):
        _runner(engine, _config(simulator_temperature=0.8, seed=1), cases, out).run(show_progress=False)


def _write_run(folder, model, scores, expected=None, users=None):
    """A run folder written by hand: scores[case][turn] (None = missing); users[case][turn]: the simulated user's
    message (the reply is derived from it)."""
    folder.mkdir(parents=True)
    card = {"model": model, "turns": len(scores[0]), "cases": len(scores), "prompt_hash": "abc", "simulator": "s",
            "judge": "j", "judge_method": "text"}
    (folder / "protocol.json").write_text(json.dumps(card))
    lines = []
    for i, row in enumerate(scores):
        for k, score in enumerate(row, start=1):
            record = {"case_id": f"c{i}", "turn": k, "score": score,
                      "expected_score": None if expected is None else expected[i][k - 1]}
            if users is not None:
                record.update(user=users[i][k - 1], assistant=f"reply to {users[i][k - 1]}")
            lines.append(json.dumps(record))
    (folder / RECORDS_FILE).write_text("\n".join(lines) + "\n")


def test_report_and_compare(tmp_path, capsys):
    # AL = [(2+4)/2, 4/1, (4+5)/2] = [3, 4, 4.5] with one missing turn; AVG = 11.5/3; slope (4.5−3)/2 = .75.
    _write_run(tmp_path / "base", "base-model", [[2, 4, 4], [4, None, 5]])
    summary = report.write_report(str(tmp_path / "base"), n_resamples=100)
    np.testing.assert_allclose(summary.al, [3, 4, 4.5])
    text = (tmp_path / "base" / report.REPORT_FILE).read_text()
    assert "| 1 | 3.000 |" in text and "| 2 | 4.000 |" in text and "| 3 | 4.500 |" in text
    assert "| AVG (mean of AL(k)) | 3.833 |" in text and "+0.7500" in text and "1 of the 6 case-turns run" in text
    assert "in progress" not in text and "loop by" not in text
    assert "**model**: `base-model`" in text
    png = (tmp_path / "base" / report.PLOT_FILE).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    saved = json.loads((tmp_path / "base" / report.SUMMARY_FILE).read_text())
    assert saved["score"]["al"] == [3.0, 4.0, 4.5] and saved["expected_score"] is None

    # A reference run committed with its records gzipped rebuilds the same numbers; a corrupt archive is one line.
    archived = tmp_path / "archived"
    shutil.copytree(tmp_path / "base", archived)
    (archived / (RECORDS_FILE + ".gz")).write_bytes(gzip.compress((archived / RECORDS_FILE).read_bytes()))
    (archived / RECORDS_FILE).unlink()
    np.testing.assert_allclose(report.write_report(str(archived), n_resamples=100).al, [3, 4, 4.5])
    (archived / (RECORDS_FILE + ".gz")).write_bytes(gzip.compress(b'{"case_id": "c0", "tu'))
    assert main(["eval-report", str(archived)]) == 2
    assert "is not a gzip of whole JSON lines" in capsys.readouterr().err

    # A run read while it is resumed: turn 3 not run yet is reported as such, not as missing judge scores.
    _write_run(tmp_path / "partial", "base-model", [[2, 4, 4], [4, None, 5]], expected=[[2.5, 3.5, 4], [3.5, 4.5, 5]])
    records = (tmp_path / "partial" / RECORDS_FILE).read_text().splitlines()
    (tmp_path / "partial" / RECORDS_FILE).write_text("\n".join(r for r in records if '"turn": 3' not in r) + "\n")
    partial = report.write_report(str(tmp_path / "partial"), n_resamples=100)
    np.testing.assert_allclose(partial.al, [3, 4, np.nan])
    text = (tmp_path / "partial" / report.REPORT_FILE).read_text()
    assert "Run in progress: 4 of 6 case-turns done" in text and "1 of the 4 case-turns run" in text
    # The score distribution lists the turns run (turn 2: one 4, one missing), not all-zero rows for turn 3.
    assert "| 1 | 0 | 1 | 0 | 1 | 0 | 0 |" in text and "| 2 | 0 | 0 | 0 | 1 | 0 | 1 |" in text
    assert "| 3 | 0 | 0 | 0 | 0 | 0 | 0 |" not in text
    saved = json.loads((tmp_path / "partial" / report.SUMMARY_FILE).read_text())
    assert saved["expected_score"]["al"] == [3.0, 4.0, None]  # plotted dotted beside AL(k)
    (tmp_path / "partial" / report.REPORT_FILE).unlink()
    assert main(["eval-report", str(tmp_path / "partial"), "--bootstrap", "50"]) == 0
    assert "AVG 3.500" in capsys.readouterr().out and (tmp_path / "partial" / report.REPORT_FILE).exists()
    assert main(["eval-report", str(tmp_path / "nowhere")]) == 2
    assert "is not an evaluation folder" in capsys.readouterr().err
    # Hand-edited logs: one clear line naming the file and entry, no traceback.
    (tmp_path / "partial" / TIMINGS_FILE).write_text('{"turn": 1, "seconds": {"model": 1.0}}\n{"cases": 2}\n')
    assert main(["eval-report", str(tmp_path / "partial")]) == 2
    err = capsys.readouterr().err
    assert f"{TIMINGS_FILE} entry 2 needs an integer 'turn'" in err and "Traceback" not in err
    with open(tmp_path / "partial" / RECORDS_FILE, "a") as f:
        f.write('{"turn": "x"}\n')
    assert main(["eval-report", str(tmp_path / "partial")]) == 2
    assert f"{RECORDS_FILE} record 5 needs a string 'case_id'" in capsys.readouterr().err

    # Conversations stuck in a loop are counted per turn; a majority looping at the last turn is called out.
    _write_run(tmp_path / "loops", "base-model", [[3, 3, 3], [3, 3, 3]], users=[["a", "b", "b"], ["x", "x", "x"]])
    (tmp_path / "loops" / TIMINGS_FILE).write_text("".join(
        json.dumps({"turn": k, "cases": 2, "seconds": {"simulator": 2.0 * k, "model": 1.0, "judge": 0.5}}) + "\n"
        for k in (1, 2)))
    report.write_report(str(tmp_path / "loops"), n_resamples=50)
    text = (tmp_path / "loops" / report.REPORT_FILE).read_text()
    assert [line.rsplit("|", 2)[1].strip() for line in text.splitlines() if line.startswith("| ") and
            line[2].isdigit()][:3] == ["0", "1", "2"]
    assert "Most conversations loop by turn 3** (2 of 2)" in text
    assert json.loads((tmp_path / "loops" / report.SUMMARY_FILE).read_text())["looping"] == [0, 1, 2]
    # Per-turn seconds come from timings.jsonl, so `eval-report` keeps them: turn 2 = 4 + 1 + 0.5.
    assert "| 2 | 4.0 | 1.0 | 0.5 | 5.5 |" in text and "| all | 6.0 | 2.0 | 1.0 | 9.0 |" in text
    assert "Seconds per turn" not in (tmp_path / "base" / report.REPORT_FILE).read_text()  # no timings, no table

    # The tuned run scores one point lower on every turn of both shared cases: ΔAVG = −1 on every resample.
    _write_run(tmp_path / "tuned", "tuned-model", [[1, 3, 3], [3, None, 4], [1, 1, 1]])
    text = report.compare([str(tmp_path / "base"), str(tmp_path / "tuned")], str(tmp_path / "cmp"), 100)
    assert "| tuned | 2 | 3 | -1.000 [-1.000, -1.000] |" in text
    assert "| tuned | tuned-model | 3 |" in text
    assert (tmp_path / "cmp" / report.PLOT_FILE).exists()
    with pytest.raises(ConfigError, match="at least two"):
        report.compare([str(tmp_path / "base")], str(tmp_path / "cmp"))


def test_al_curve_plot_draws_turn_k_at_x_k(tmp_path, monkeypatch):
    """The plot's line, markers, 95% band, fit and expected-score line put turn k at x = k (k = 1..K), the x the fit's
    slope and intercept are defined over."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from aloe_jax.eval import metrics

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)  # keep the figure open to read what was drawn
    scores = np.array([[2, 4, 4, 5], [4, np.nan, 5, 5], [3, 3, 4, 4]], float)  # 3 cases × 4 turns
    summary = metrics.summarise(scores, n_resamples=50)
    expected = metrics.summarise(scores - 0.5, n_resamples=50)
    report.plot_curves([("run", summary)], str(tmp_path / report.PLOT_FILE), expected=[expected])
    (figure,) = figures
    (axes,) = figure.axes
    by_style = {line.get_linestyle(): line for line in axes.lines}  # AL(k) solid, fit dashed, expected dotted
    turns = [1, 2, 3, 4]
    al = np.nanmean(scores, axis=0)
    np.testing.assert_array_equal(by_style["-"].get_xdata(), turns)
    np.testing.assert_allclose(by_style["-"].get_ydata(), al)
    np.testing.assert_array_equal(by_style[":"].get_xdata(), turns)
    np.testing.assert_allclose(by_style[":"].get_ydata(), al - 0.5)
    slope, intercept = np.polyfit(turns, al, 1)
    np.testing.assert_array_equal(by_style["--"].get_xdata(), turns)
    np.testing.assert_allclose(by_style["--"].get_ydata(), intercept + slope * np.asarray(turns))
    band_x = np.concatenate([path.vertices[:, 0] for path in axes.collections[0].get_paths()])
    assert (band_x.min(), band_x.max()) == (1, 4)
    assert [int(t) for t in axes.get_xticks()] == turns


def _save_trainer_checkpoint(run_dir, model_cfg, tokenizer):
    """A run folder on gs:// as the trainer leaves it: run files plus an Orbax checkpoint of a fresh model."""
    from flax import nnx

    from aloe_jax.train.inputs.pipeline import DataConfig
    from aloe_jax.models import sharding
    from aloe_jax.models.decoder import Decoder
    from aloe_jax.models.run_folder import write_run_files
    from aloe_jax.train.checkpoint import Checkpointer
    from aloe_jax.train.config import TrainConfig
    from aloe_jax.train.trainer import Trainer

    mesh = sharding.make_mesh(sharding.MeshConfig(data=-1))
    train_cfg = TrainConfig(output_dir=run_dir, data=DataConfig(path="unused.jsonl", seq_len=64, max_pairs=1),
                            batch_size=8)
    trainer = Trainer(train_cfg, sharding.shard_model(Decoder(model_cfg, nnx.Rngs(0)), mesh), mesh, total_steps=1)
    checkpointer = Checkpointer(run_dir)
    write_run_files(run_dir, "sft", "tiny", model_cfg, tokenizer)
    checkpointer.save(trainer.init_state(), None, {"note": "eval test"})
    checkpointer.wait()
    checkpointer.close()


def test_cli_eval_of_trainer_checkpoint_on_gcs_and_errors(engine, gcs_emulator, tmp_path, capsys):
    from aloe_jax.sampling.sampler import SamplingParams

    model = f"{gcs_emulator}/eval/trainer-run"
    # Same config and init seed as the `engine` fixture: the checkpoint holds exactly that model's weights.
    _save_trainer_checkpoint(model, engine.model.cfg, engine.tokenizer)
    out = tmp_path / "run"
    argv = ["eval", "--model", model, "--simulator", model, "--judge", model, "--out", str(out), "--aloe-data",
            ALOE_DATA, "--cases", "2", "--turns", "2", "--quiet", "model.generation.max_tokens=8",
            "simulator.generation.max_tokens=8", "knowing.generation.max_tokens=8", "bootstrap_resamples=50"]
    assert main(argv) == 0
    records = _records(out)
    assert sorted((r["case_id"], r["turn"]) for r in records) == [
        ("profile00-personality0", 1), ("profile00-personality0", 2),
        ("profile00-personality1", 1), ("profile00-personality1", 2)]
    assert all(1 <= r["score"] <= 5 for r in records)
    # The model under test really is the checkpoint: its greedy turn-1 replies are the in-memory model's.
    first = [r for r in records if r["turn"] == 1]
    direct = engine.reply([[{"role": "user", "content": r["user"]}] for r in first],
                          SamplingParams(temperature=0.0, max_new_tokens=8))
    assert [d.text for d in direct] == [r["assistant"] for r in first]
    card = json.loads((out / "protocol.json").read_text())
    assert card["model"] == model and card["judge"] == f"jax:{model}" and card["judge_method"] == "logprobs"
    assert "(mesh)" in card["devices"]  # 8 forced CPU devices: the batch is spread over a mesh
    assert (out / report.REPORT_FILE).exists() and (out / report.PLOT_FILE).exists()
    capsys.readouterr()

    assert main(argv[:-4] + ["--cases", "0"]) == 2
    assert "cases" in capsys.readouterr().err
    assert main(argv[:-4] + ["--seed", "5"]) == 2
    assert "seed" in capsys.readouterr().err.splitlines()[-1]
    missing = str(tmp_path / "nope")
    assert main(["eval", "--model", missing, "--out", str(tmp_path / "x"), "--aloe-data", ALOE_DATA]) == 2
    assert "nope" in capsys.readouterr().err


@pytest.mark.slow
def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_records(engine, tmp_path):
    """A real kill -9 of `aloe-jax eval` between turns (not an exception): the rerun of the same command finishes the
    run, and every record equals the uninterrupted run's (sampling simulator: seeds come from run seed, role, turn)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    model = str(tmp_path / "trainer-run")
    _save_trainer_checkpoint(model, engine.model.cfg, engine.tokenizer)
    # The three processes share one persistent XLA cache, every program in it (the tiny model's compile in under the
    # 1 s that JAX's cache waits for by default): the killed run and the rerun load what the first run compiled.
    env = {**os.environ, "ALOE_JAX_CACHE": str(tmp_path / "xla-cache"), "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu",
           "TOKENIZERS_PARALLELISM": "false", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}

    def command(out):
        return [sys.executable, "-m", "aloe_jax.cli", "eval", "--model", model, "--simulator", model, "--judge", model,
                "--out", str(out), "--aloe-data", ALOE_DATA, "--cases", "2", "--turns", "3", "--quiet",
                "model.generation.max_tokens=8", "simulator.generation.max_tokens=8",
                "knowing.generation.max_tokens=8", "simulator.generation.temperature=0.8", "bootstrap_resamples=20"]

    subprocess.run(command(tmp_path / "whole"), env=env, check=True, capture_output=True, timeout=600)
    expected = _records(tmp_path / "whole")
    assert len(expected) == 6

    out = tmp_path / "killed"
    proc = subprocess.Popen(command(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not ((out / RECORDS_FILE).exists() and (out / RECORDS_FILE).read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended before its first turn committed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    killed_at = len(_records(out))
    assert 2 <= killed_at < 6  # killed after turn 1 committed and before the run finished

    subprocess.run(command(out), env=env, check=True, capture_output=True, timeout=600)
    assert _records(out) == expected
    # Every turn timed at most once across the two invocations, and every turn the rerun did is timed. (A kill that
    # lands between a turn's records and its timing line loses that one timing line: the turn is not redone.)
    timed = [json.loads(line)["turn"] for line in (out / TIMINGS_FILE).read_text().splitlines()]
    assert timed == sorted(set(timed)) and set(range(killed_at // 2 + 1, 4)) <= set(timed) <= set(range(1, 4))
