"""`aloe-jax eval` (run or resume the ALOE benchmark on a model), `eval-report` (a run's report) and `eval-compare`
(runs side by side)."""

from __future__ import annotations

import argparse
import json
import pathlib

from aloe_jax.core import storage
from aloe_jax.core.cli_args import Alias, add_config_args, load_command_config, printed_config
from aloe_jax.core.errors import ConfigError

DTYPES = ("float32", "bfloat16")


def role_overrides(role: str, spec: str) -> list[str]:
    """key=value overrides that put `role` on the backend a --simulator/--judge SPEC names.

    SPEC is `openai:MODEL` or `openai:MODEL@BASE_URL` for an OpenAI-compatible endpoint, anything else a model for
    the in-process JAX backend (HF folder, checkpoint or preset).
    """
    if not spec:
        raise ConfigError(f"--{role} needs a value: a model path/preset or openai:MODEL[@BASE_URL]")
    if spec.startswith("openai:"):
        model, _, base_url = spec[len("openai:"):].partition("@")
        if not model:
            raise ConfigError(f"--{role} {spec!r}: name the served model, e.g. openai:gpt-4o-mini")
        return [f"{role}.backend.kind=openai", f"{role}.backend.model={json.dumps(model)}",
                f"{role}.backend.base_url={json.dumps(base_url or None)}"]
    return [f"{role}.backend.kind=jax", f"{role}.backend.model={json.dumps(spec)}"]


EVAL_ALIASES = (
    Alias("--model", "model.path", "model under test: trainer run folder, HF folder (local or gs://) or smollm2-135m"),
    Alias("--dtype", "model.dtype", "dtype of the model under test", choices=DTYPES),
    Alias("--out", "output_dir", "local run folder (records, report, plot); rerun to resume"),
    Alias("--simulator", "simulator.backend", "user simulator: model path/preset or openai:MODEL[@URL]",
          expand=lambda spec: role_overrides("simulator", spec)),
    Alias("--judge", "judge.backend", "judge: model path/preset or openai:MODEL[@URL]",
          expand=lambda spec: role_overrides("judge", spec)),
    Alias("--cases", "cases", "first N of the 100 ALOE cases", type=int),
    Alias("--turns", "turns", "turns per conversation", type=int),
    Alias("--seed", "seed", "seed of the simulator, the judge's option order and the bootstrap", type=int),
    Alias("--aloe-data", "aloe_data", "folder (local or gs://) with the ALOE eval pools"),
    Alias("--quiet", "progress_bar", "no progress bar", const=False),
)
_BOOTSTRAP = Alias("--bootstrap", "bootstrap_resamples", "bootstrap resamples of the confidence intervals", type=int)
_SEED = Alias("--seed", "seed", "seed of the bootstrap", type=int)
REPORT_ALIASES = (Alias("run", "output_dir", "run folder written by `aloe-jax eval`"), _BOOTSTRAP, _SEED)
COMPARE_ALIASES = (Alias("runs", "runs", "run folders written by `aloe-jax eval` (the first is the baseline)",
                         nargs="*"),
                   Alias("--out", "output_dir", "folder for compare.md and al_curve.png"), _BOOTSTRAP, _SEED)


def load_eval_config(args: argparse.Namespace):
    """The EvalConfig of an `eval` or `eval-report` command line."""
    from aloe_jax.eval.config import EvalConfig

    return load_command_config(EvalConfig, args)


def _print_summary(summary, folder: str, finished: bool) -> None:
    """The headline numbers; the count of unscored turns only for a finished run (in a partial one, turns not run yet
    are no judge's fault)."""
    from aloe_jax.eval.report import REPORT_FILE

    print(f"AVG {summary.avg:.3f} [{summary.avg_ci[0]:.3f}, {summary.avg_ci[1]:.3f}]  "
          f"slope {summary.slope:+.4f}/turn [{summary.slope_ci[0]:+.4f}, {summary.slope_ci[1]:+.4f}]  "
          f"N-IR {summary.n_ir:+.4f}" + (f"  missing {summary.n_missing}" if finished else ""))
    print(f"report: {pathlib.Path(folder) / REPORT_FILE}")


def _cmd_eval(args: argparse.Namespace) -> None:
    cfg = load_eval_config(args)
    if printed_config(cfg, args):
        return
    storage.require_writable_folder(cfg.output_dir)
    from aloe_jax.eval.report import write_report
    from aloe_jax.eval.runner import build_runner, total_seconds
    from aloe_jax.llm.usage import UsageMeter

    meter = UsageMeter()
    runner = build_runner(cfg, cfg.output_dir, meter)
    stats = runner.run(show_progress=cfg.progress_bar)
    timing = stats.table()
    total, per_role = total_seconds(cfg.output_dir)
    timing += (f"\nall invocations: {total:.0f} s on committed turns ("
               + ", ".join(f"{role} {s:.0f} s" for role, s in per_role.items()) + ")")
    summary = write_report(cfg.output_dir, cfg.bootstrap_resamples, cfg.seed,
                           extra={"Timing (this invocation)": timing, "Usage (this invocation)": meter.table()})
    print(timing)
    _print_summary(summary, cfg.output_dir, finished=True)


def _cmd_report(args: argparse.Namespace) -> None:
    cfg = load_eval_config(args)
    if printed_config(cfg, args):
        return
    from aloe_jax.eval.report import write_report

    summary = write_report(cfg.output_dir, cfg.bootstrap_resamples, cfg.seed)
    _print_summary(summary, cfg.output_dir, finished=False)


def _cmd_compare(args: argparse.Namespace) -> None:
    from aloe_jax.eval.config import CompareConfig

    cfg = load_command_config(CompareConfig, args)
    if printed_config(cfg, args):
        return
    from aloe_jax.eval.report import compare

    if not cfg.runs:
        raise ConfigError("eval-compare needs the run folders to compare: eval-compare RUN [RUN ...] --out DIR")
    print(compare(cfg.runs, cfg.output_dir, cfg.bootstrap_resamples, cfg.seed))


def register(commands) -> None:
    """Add `eval`, `eval-report` and `eval-compare` to the aloe-jax sub-parsers."""
    run = commands.add_parser("eval", help="evaluate a model on ALOE (resumable)",
                              description="Run (or resume) the ALOE benchmark: simulated users chat with the model "
                                          "for several turns; a judge scores every reply.")
    add_config_args(run, "eval", EVAL_ALIASES)
    run.set_defaults(run=_cmd_eval)

    rep = commands.add_parser("eval-report", help="rewrite an ALOE run's report and plot (also while it runs)",
                              description="Write report.md, al_curve.png and summary.json of a run folder from its "
                                          "committed records: look at a long run before it ends, or at a copied one.")
    add_config_args(rep, "eval", REPORT_ALIASES)
    rep.set_defaults(run=_cmd_report)

    cmp = commands.add_parser("eval-compare", help="compare ALOE runs: paired differences and one plot")
    add_config_args(cmp, None, COMPARE_ALIASES)
    cmp.set_defaults(run=_cmd_compare)
