"""`aloe-jax eval` (run or resume the ALOE benchmark on a model) and `aloe-jax eval-compare` (runs side by side)."""

from __future__ import annotations

import argparse
import pathlib

from aloe_jax.core.errors import ConfigError

DEFAULT_CONFIG = pathlib.Path(__file__).resolve().parents[2] / "configs" / "eval.yaml"


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
        return [f"{role}.backend.kind=openai", f"{role}.backend.model={model}",
                f"{role}.backend.base_url={base_url or 'null'}"]
    return [f"{role}.backend.kind=jax", f"{role}.backend.model={spec}"]


def load_eval_config(args: argparse.Namespace):
    """The EvalConfig from --config, the shortcut flags and trailing key=value overrides (those win)."""
    from aloe_jax.core.config import load_config
    from aloe_jax.eval.config import EvalConfig

    overrides = []
    if args.model:
        overrides.append(f"model.model={args.model}")
    for role in ("simulator", "judge"):
        if getattr(args, role):
            overrides += role_overrides(role, getattr(args, role))
    for flag, key in (("cases", "cases"), ("turns", "turns"), ("seed", "seed"), ("aloe_data", "aloe_data")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    config = args.config if args.config else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    return load_config(EvalConfig, config, overrides + list(args.overrides))


def _print_summary(summary, folder: str, finished: bool) -> None:
    """The headline numbers; the count of unscored turns only for a finished run (in a partial one, turns not run yet
    are no judge's fault)."""
    from aloe_jax.eval.report import REPORT_FILE

    print(f"AVG {summary.avg:.3f} [{summary.avg_ci[0]:.3f}, {summary.avg_ci[1]:.3f}]  "
          f"slope {summary.slope:+.4f}/turn [{summary.slope_ci[0]:+.4f}, {summary.slope_ci[1]:+.4f}]  "
          f"N-IR {summary.n_ir:+.4f}" + (f"  missing {summary.n_missing}" if finished else ""))
    print(f"report: {pathlib.Path(folder) / REPORT_FILE}")


def _cmd_eval(args: argparse.Namespace) -> None:
    from aloe_jax.eval.report import write_report
    from aloe_jax.eval.runner import build_runner, total_seconds
    from aloe_jax.llm.usage import UsageMeter

    cfg = load_eval_config(args)
    meter = UsageMeter()
    runner = build_runner(cfg, args.out, meter)
    stats = runner.run(show_progress=not args.quiet)
    timing = stats.table()
    total, per_role = total_seconds(args.out)
    timing += (f"\nall invocations: {total:.0f} s on committed turns ("
               + ", ".join(f"{role} {s:.0f} s" for role, s in per_role.items()) + ")")
    summary = write_report(args.out, cfg.bootstrap_resamples, cfg.seed,
                           extra={"Timing (this invocation)": timing, "Usage (this invocation)": meter.table()})
    print(timing)
    _print_summary(summary, args.out, finished=True)


def _cmd_report(args: argparse.Namespace) -> None:
    from aloe_jax.eval.report import write_report

    _print_summary(write_report(args.folder, args.bootstrap, args.seed), args.folder, finished=False)


def _cmd_compare(args: argparse.Namespace) -> None:
    from aloe_jax.eval.report import compare

    print(compare(args.runs, args.out, args.bootstrap, args.seed))


def register(commands) -> None:
    """Add `eval` and `eval-compare` to the aloe-jax sub-parsers."""
    run = commands.add_parser("eval", help="evaluate a model on ALOE (resumable)",
                              description="Run (or resume) the ALOE benchmark: simulated users chat with the model "
                                          "for several turns; a judge scores every reply.")
    run.add_argument("--model", default=None,
                     help="model under test: trainer checkpoint dir, HF folder (local or gs://) or 'smollm2'")
    run.add_argument("--out", required=True, help="local run folder (records, report, plot); rerun to resume")
    run.add_argument("--config", default=None, help=f"eval YAML (default: {DEFAULT_CONFIG.name} of the repo)")
    run.add_argument("--simulator", default=None, help="user simulator: model path/preset or openai:MODEL[@URL]")
    run.add_argument("--judge", default=None, help="judge: model path/preset or openai:MODEL[@URL]")
    run.add_argument("--cases", type=int, default=None, help="first N of the 100 ALOE cases (default all)")
    run.add_argument("--turns", type=int, default=None, help="turns per conversation (default 10)")
    run.add_argument("--seed", type=int, default=None)
    run.add_argument("--aloe-data", default=None, help="folder with the ALOE eval pools (default: pinned download)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. judge.history_turns=0")
    run.set_defaults(run=_cmd_eval)

    rep = commands.add_parser("eval-report", help="rewrite an ALOE run's report and plot (also while it runs)",
                              description="Write report.md, al_curve.png and summary.json of a run folder from its "
                                          "committed records: look at a long run before it ends, or at a copied one.")
    rep.add_argument("folder", metavar="RUN", help="run folder written by `aloe-jax eval`")
    rep.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    rep.add_argument("--seed", type=int, default=0)
    rep.set_defaults(run=_cmd_report)

    cmp = commands.add_parser("eval-compare", help="compare ALOE runs: paired differences and one plot")
    cmp.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by `aloe-jax eval` (first = baseline)")
    cmp.add_argument("--out", required=True, help="folder for compare.md and al_curve.png")
    cmp.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    cmp.add_argument("--seed", type=int, default=0)
    cmp.set_defaults(run=_cmd_compare)
