"""`aloe-jax quickstart`: bad sizes are one clear line; the whole pipeline runs end to end on the embedded SmolLM2."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.test_cli import _assert_one_line_error, run_cli

ALOE_DATA = str(pathlib.Path(__file__).resolve().parents[2] / "shared" / "aloe_data")
STAGES = ["personas (profiles)", "personas (personalities)", "trees", "sft", "dpo", "eval base", "eval sft",
          "eval dpo", "report"]


@pytest.mark.parametrize("flag", ["--cases=0", "--turns=-1", "--conversations=0", "--train-steps=0"])
def test_non_positive_sizes_are_one_line_errors(tmp_path, flag):
    result = run_cli("quickstart", f"--out={tmp_path / 'qs'}", f"--aloe-data={ALOE_DATA}", flag)
    _assert_one_line_error(result, "Input should be greater than 0")
    assert not (tmp_path / "qs" / "personas").exists(), "nothing should run after a bad flag"


@pytest.mark.slow
def test_quickstart_runs_every_stage_and_writes_the_comparison_report(tmp_path):
    """The smallest quickstart (2 trees × 2 turns, 1 step each of SFT and DPO, 1 case × 2 turns per model) on the real
    SmolLM2, in a fresh cache folder, as a newcomer would run it."""
    out = tmp_path / "qs"
    # A newcomer's CPU is one JAX device: the suite's 8 fake devices are not passed on.
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["ALOE_JAX_CACHE"] = str(tmp_path / "cache")
    result = subprocess.run(
        [sys.executable, "-m", "aloe_jax.cli", "quickstart", f"--out={out}", f"--aloe-data={ALOE_DATA}",
         "--conversations=2", "--turns=2", "--cases=1", "--train-steps=1"],
        capture_output=True, text=True, timeout=1500, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    commands = (out / "commands.sh").read_text().splitlines()
    assert [line.split()[1] for line in commands] == ["personas", "personas", "trees", "sft", "dpo", "eval", "eval",
                                                      "eval", "eval-compare"]
    timings = (out / "timings.md").read_text()
    assert all(f"| {stage} |" in timings for stage in STAGES) and "| total |" in timings

    trees = [json.loads(line) for line in (out / "trees" / "trees.jsonl").read_text().splitlines()]
    assert len(trees) == 2
    for run in ("sft", "dpo"):
        assert (out / run / "checkpoints" / "1").is_dir(), f"{run} wrote no checkpoint for step 1"
    for model in ("base", "sft", "dpo"):
        records = [json.loads(line) for line in (out / "eval" / model / "turns.jsonl").read_text().splitlines()]
        assert sorted(r["turn"] for r in records) == [1, 2]
    report = (out / "report" / "compare.md").read_text()
    assert all(name in report for name in ("base", "sft", "dpo"))
    png = (out / "report" / "al_curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
