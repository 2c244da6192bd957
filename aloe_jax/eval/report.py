"""What a reviewer reads: `report.md` (AL(k) table, summary metrics with CIs, protocol card), `al_curve.png` (AL(k)
with its 95% band, one line per run) and `summary.json` (the same numbers, machine-readable)."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
from typing import Sequence

import numpy as np

from aloe_jax.core import storage
from aloe_jax.core.errors import ConfigError
from aloe_jax.eval import metrics
from aloe_jax.eval.knowing import KNOWING_FIELDS, probe_calibration, score_distribution
from aloe_jax.eval.runner import PROTOCOL_FILE, read_records, score_matrix, turn_seconds

REPORT_FILE = "report.md"
PLOT_FILE = "al_curve.png"
SUMMARY_FILE = "summary.json"


@dataclasses.dataclass
class LoadedRun:
    """A finished (or partial) run folder: its protocol card, case ids and score matrices."""

    label: str
    folder: str
    card: dict
    case_ids: list[str]
    scores: np.ndarray  # [cases, turns] argmax/parsed judge score, NaN missing
    expected: np.ndarray | None  # [cases, turns] expected score (log-prob judges only)
    ran: np.ndarray  # [cases, turns] bool: the case-turn has a record (scored or not); False: not run yet
    # [cases, turns] bool: the simulated user's message and the reply are those of the case's previous turn, word for
    # word (a conversation stuck in a loop: small simulators copy their last message, and its judge score repeats).
    repeated: np.ndarray
    seconds: dict[int, dict[str, float]]  # turn → role → seconds, from timings.jsonl (every invocation)
    # [cases, turns] the simulator's repeat guard (`aloe_jax.conversation.repeat_guard`): how many times the user
    # message was sampled again, and whether it still repeats an earlier one of its case (0 / False: no record, or a
    # run written before the guard).
    resamples: np.ndarray | None = None
    user_repeats: np.ndarray | None = None

    @property
    def planned(self) -> int:
        """Case-turns the run's protocol asks for (more than `ran` holds while a run is in progress)."""
        return int(self.card.get("cases", self.scores.shape[0])) * self.scores.shape[1]


def load_run(folder: str, label: str | None = None) -> LoadedRun:
    """The records of a run folder as score matrices over the cases and turns its protocol names."""
    path = os.path.join(folder, PROTOCOL_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"{folder!r} is not an evaluation folder ({PROTOCOL_FILE} is missing)")
    with open(path) as f:
        card = json.load(f)
    records = read_records(folder)
    case_ids = list(dict.fromkeys(r["case_id"] for r in records))
    turns = int(card["turns"])
    expected = score_matrix(records, case_ids, turns, "expected_score")
    ran = ~np.isnan(score_matrix(records, case_ids, turns, "turn"))  # every record has its turn
    guarded = any("user_resamples" in r for r in records)
    return LoadedRun(label or os.path.basename(os.path.normpath(folder)), folder, card, case_ids,
                     score_matrix(records, case_ids, turns), None if np.all(np.isnan(expected)) else expected, ran,
                     repeated_exchanges(records, case_ids, turns), turn_seconds(folder),
                     np.nan_to_num(score_matrix(records, case_ids, turns, "user_resamples")).astype(int)
                     if guarded else None,
                     np.nan_to_num(score_matrix(records, case_ids, turns, "user_repeats")).astype(bool)
                     if guarded else None)


def repeated_exchanges(records: list[dict], case_ids: Sequence[str], turns: int) -> np.ndarray:
    """`[cases, turns]` bool: turn k's (user, assistant) texts equal the same case's turn k−1 texts exactly."""
    row = {case_id: i for i, case_id in enumerate(case_ids)}
    exchange: dict[tuple[int, int], tuple] = {}
    for record in records:
        i, k = row.get(record["case_id"]), record["turn"]
        if i is not None and 1 <= k <= turns and "user" in record:
            exchange[i, k] = (record["user"], record.get("assistant"))
    repeated = np.zeros((len(case_ids), turns), bool)
    for (i, k), texts in exchange.items():
        repeated[i, k - 1] = exchange.get((i, k - 1)) == texts
    return repeated


def _num(x: float, digits: int = 3, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    x = round(float(x), digits) + 0.0  # a slope of -1e-17 (or -0.0) reads as 0, not "-0.000"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _ci(ci: tuple[float, float], digits: int = 3, signed: bool = False) -> str:
    if any(math.isnan(v) for v in ci):
        return "n/a"
    return f"[{_num(ci[0], digits, signed)}, {_num(ci[1], digits, signed)}]"


def summary_json(summary: metrics.RunSummary) -> dict:
    """A RunSummary as plain JSON values (NaN as null)."""
    def clean(value):
        if isinstance(value, np.ndarray):
            return [clean(v) for v in value.tolist()]
        if isinstance(value, (tuple, list)):
            return [clean(v) for v in value]
        if isinstance(value, (float, np.floating)):
            return None if math.isnan(value) else float(value)
        if isinstance(value, np.integer):
            return int(value)
        return value

    return {field.name: clean(getattr(summary, field.name)) for field in dataclasses.fields(summary)}


def markdown(run: LoadedRun, summary: metrics.RunSummary, expected: metrics.RunSummary | None,
             extra: dict | None = None, sections: Sequence[str] = (), warnings: Sequence[str] = ()) -> str:
    """report.md of one run; `warnings` are lines under the title, `sections` markdown after the metrics."""
    turns = len(summary.al)
    n_ran = int(run.ran.sum())
    unscored = int((run.ran & np.isnan(run.scores)).sum())
    lines = [f"# ALOE evaluation — {run.card.get('model')}", ""] + [x for w in warnings for x in (w, "")]
    if n_ran < run.planned:
        # A long run is read while it is resumed: turns not run yet are not missing judge scores.
        lines += [f"**Run in progress: {n_ran} of {run.planned} case-turns done.** Turns not run yet read n/a and are "
                  f"left out of every number below; rerun `aloe-jax eval` with the same `--out` to continue.", ""]
    lines += [f"{summary.n_cases} cases × {turns} turns; {unscored} of the {n_ran} case-turns run have no judge "
              "score (missing, excluded from AL(k), never counted as 0). AL(k) = mean judge score (1–5) at turn k; "
              "95% CIs from a bootstrap over cases. *Looping*: cases whose user message and reply at turn k are "
              "those of turn k−1, word for word." + (
                  " *Resampled*: user messages the simulator's repeat guard sampled again (the sum of resamples in "
                  "brackets); *repeating*: user messages that still repeat an earlier one of their case after "
                  f"{run.card.get('simulator_repeat_guard', {}).get('max_resamples', '?')} resamples."
                  if run.resamples is not None else ""), ""]
    looping = run.repeated.sum(axis=0)  # [turns]
    last = int(np.flatnonzero(run.ran.any(axis=0))[-1]) if run.ran.any() else 0
    ran_last = int(run.ran[:, last].sum())
    if last > 0 and looping[last] * 2 > ran_last:
        # Scores of a loop repeat the turn before, so a flat AL(k) then says little about adaptation.
        lines += [f"**Most conversations loop by turn {last + 1}** ({looping[last]} of {ran_last}): "
                  "the simulator and the model repeat their previous messages, so later turns re-score the same "
                  "exchanges. AL(k) measures adaptation only with a simulator that keeps the "
                  "conversation moving.", ""]
    guard = run.resamples is not None
    lines += ["| turn k | AL(k) | 95% CI | scored | N-AL(k) |" + (" AL(k), expected score |" if expected else "")
              + " looping |" + (" resampled | repeating |" if guard else ""),
              "|---:|---:|:---:|---:|---:|" + ("---:|" if expected else "") + "---:|" + ("---:|---:|" if guard else "")]
    for k in range(turns):
        row = (f"| {k + 1} | {_num(summary.al[k])} | {_ci((summary.al_ci[0][k], summary.al_ci[1][k]))} | "
               f"{summary.counts[k]} | {_num(summary.n_al[k])} |")
        if expected:
            row += f" {_num(expected.al[k])} |"
        if not run.ran[:, k].any():
            lines.append(row + " n/a |" + (" n/a | n/a |" if guard else ""))
            continue
        row += f" {looping[k]} |"
        if guard:
            row += (f" {int((run.resamples[:, k] > 0).sum())} ({int(run.resamples[:, k].sum())}) |"
                    f" {int(run.user_repeats[:, k].sum())} |")
        lines.append(row)
    lines += ["", "| metric | value | 95% CI |", "|---|---:|:---:|",
              f"| AVG (mean of AL(k)) | {_num(summary.avg)} | {_ci(summary.avg_ci)} |",
              f"| improvement rate (slope of AL(k) per turn) | {_num(summary.slope, 4, True)} | "
              f"{_ci(summary.slope_ci, 4, True)} |",
              f"| intercept of the fit | {_num(summary.intercept)} | |",
              f"| R² of the fit | {_num(summary.r2)} | |",
              f"| N-IR (slope of min-max normalised AL(k)) | {_num(summary.n_ir, 4, True)} | |"]
    if expected:
        lines += [f"| AVG, expected score | {_num(expected.avg)} | {_ci(expected.avg_ci)} |",
                  f"| slope, expected score | {_num(expected.slope, 4, True)} | {_ci(expected.slope_ci, 4, True)} |"]
    for section in sections:
        lines += ["", section]
    lines += ["", "A constant AL(k) has N-AL(k) = 0 at every turn and N-IR = 0; its R² is n/a (nothing to explain).",
              "", f"![AL(k)]({PLOT_FILE})", "", "## Protocol", ""]
    lines += [f"- **{key}**: `{json.dumps(value) if isinstance(value, (dict, list)) else value}`"
              for key, value in run.card.items()]
    if run.seconds:
        # From timings.jsonl, so a report rewritten by `eval-report` keeps them.
        roles = list(dict.fromkeys(role for per_role in run.seconds.values() for role in per_role))
        rows = [(str(k), [per_role.get(role, 0.0) for role in roles]) for k, per_role in run.seconds.items()]
        rows.append(("all", [sum(values[j] for _, values in rows) for j in range(len(roles))]))
        lines += ["", "## Seconds per turn (every invocation)", "",
                  "| turn | " + " | ".join(roles) + " | total |", "|---:|" + "---:|" * (len(roles) + 1)]
        lines += [f"| {k} | " + " | ".join(f"{v:.1f}" for v in values) + f" | {sum(values):.1f} |"
                  for k, values in rows]
    for title, body in (extra or {}).items():
        lines += ["", f"## {title}", "", "```", body, "```"]
    return "\n".join(lines) + "\n"


def plot_curves(runs: Sequence[tuple[str, metrics.RunSummary]], path: str,
                title: str = "ALOE: alignment per turn",
                expected: Sequence[metrics.RunSummary | None] | None = None,
                knowing: metrics.TurnMeans | None = None) -> None:
    """Write a PNG with each run's AL(k) (line and markers), its 95% band and its fit over the turns it has; with
    `expected` (one per run, None where the judge gave no probabilities), also the expected-score AL(k), dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if knowing is None:
        fig, ax = plt.subplots(figsize=(8, 5), dpi=150)
    else:  # knowing vs doing: a second panel
        fig, (ax, ax_knowing) = plt.subplots(1, 2, figsize=(14, 5), dpi=150)
        _knowing_panel(ax_knowing, knowing)
    turns_max = 1
    for i, (label, summary) in enumerate(runs):
        color = plt.get_cmap("tab10")(i % 10)
        k = np.arange(1, len(summary.al) + 1)
        turns_max = max(turns_max, len(k))
        low, high = summary.al_ci
        if not np.all(np.isnan(low)):
            ax.fill_between(k, low, high, color=color, alpha=0.18, linewidth=0)
        legend = (f"{label}  ({summary.n_cases} cases; AVG {_num(summary.avg, 2)}, "
                  f"slope {_num(summary.slope, 3, True)}/turn)")
        ax.plot(k, summary.al, marker="o", color=color, linewidth=2, label=legend)
        if not math.isnan(summary.slope):
            fitted = k[~np.isnan(summary.al)]  # never extrapolated over turns a partial run has not reached
            ax.plot(fitted, summary.intercept + summary.slope * fitted, color=color, linestyle="--", linewidth=1,
                    alpha=0.8)
        if expected is not None and expected[i] is not None:
            ax.plot(k, expected[i].al, marker="o", markerfacecolor="white", color=color, linestyle=":", linewidth=1.5,
                    label=f"{label}, expected score  (AVG {_num(expected[i].avg, 2)}, "
                          f"slope {_num(expected[i].slope, 3, True)}/turn)")
    ax.set_xticks(range(1, turns_max + 1))
    ax.set_xlim(0.7, turns_max + 0.3)
    ax.set_ylim(1, 5)
    ax.set_yticks([1, 2, 3, 4, 5])
    ax.set_xlabel("turn k", fontsize=12)
    ax.set_ylabel("AL(k): mean judge score (1–5)", fontsize=12)
    ax.set_title(title + "\n(shaded: 95% CI over cases; dashed: least-squares fit)", fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize=10, framealpha=0.9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    storage.write_bytes(path, buffer.getvalue())


def write_report(folder: str, n_resamples: int = 2000, seed: int = 0, extra: dict | None = None) -> metrics.RunSummary:
    """Summarise a run folder into report.md, al_curve.png and summary.json; returns the summary."""
    run = load_run(folder)
    summary = metrics.summarise(run.scores, n_resamples, seed)
    expected = metrics.summarise(run.expected, n_resamples, seed) if run.expected is not None else None
    measured = _measurements(run, summary, n_resamples, seed)
    storage.write_text(os.path.join(folder, REPORT_FILE), markdown(run, summary, expected, extra,
                                                                   measured["sections"], measured["warnings"]))
    plot_curves([(str(run.card.get("model")), summary)], os.path.join(folder, PLOT_FILE), expected=[expected],
                knowing=measured["knowing"])
    storage.write_text(os.path.join(folder, SUMMARY_FILE), json.dumps(
        {"score": summary_json(summary), "expected_score": summary_json(expected) if expected else None,
         "looping": run.repeated.sum(axis=0).tolist(),
         # The simulator's repeat guard per turn: messages resampled, resamples in all, messages still repeating.
         "simulator_repeat_guard": None if run.resamples is None else {
             "resampled_per_turn": (run.resamples > 0).sum(axis=0).tolist(),
             "resamples_per_turn": run.resamples.sum(axis=0).tolist(),
             "repeating_per_turn": run.user_repeats.sum(axis=0).tolist()},
         **measured["json"], "protocol": run.card}, indent=1) + "\n")
    return summary


def compare(folders: Sequence[str], out_dir: str, n_resamples: int = 2000, seed: int = 0) -> str:
    """Write compare.md and al_curve.png for several runs (each against the first, paired on shared cases); returns
    the markdown."""
    if len(folders) < 2:
        raise ConfigError("eval-compare needs at least two run folders")
    runs = [load_run(f) for f in folders]
    labels = [r.label for r in runs]
    if len(set(labels)) != len(labels):
        runs = [dataclasses.replace(r, label=r.folder) for r in runs]
    summaries = [metrics.summarise(r.scores, n_resamples, seed) for r in runs]
    os.makedirs(out_dir, exist_ok=True)
    plot_curves([(r.label, s) for r, s in zip(runs, summaries)], os.path.join(out_dir, PLOT_FILE),
                title="ALOE: runs compared")
    lines = ["# ALOE runs compared", "",
             "| run | model | cases | AVG [95% CI] | slope [95% CI] | R² | N-IR | prompts |",
             "|---|---|---:|---|---|---:|---:|---|"]
    for run, s in zip(runs, summaries):
        lines.append(f"| {run.label} | {run.card.get('model')} | {s.n_cases} | {_num(s.avg)} {_ci(s.avg_ci)} | "
                     f"{_num(s.slope, 4, True)} {_ci(s.slope_ci, 4, True)} | {_num(s.r2)} | {_num(s.n_ir, 4, True)} | "
                     f"{run.card.get('prompt_hash')} |")
    base = runs[0]
    lines += ["", f"Paired differences against **{base.label}** (other − {base.label}) on the cases and turns both "
              "runs have; 95% CI from a paired bootstrap over cases.", "",
              "| run | shared cases | turns | ΔAVG [95% CI] | Δslope [95% CI] | note |", "|---|---:|---:|---|---|---|"]
    for run in runs[1:]:
        shared = [c for c in base.case_ids if c in set(run.case_ids)]
        turns = min(base.scores.shape[1], run.scores.shape[1])
        note = "" if run.card.get("prompt_hash") == base.card.get("prompt_hash") else "different prompts!"
        for key in ("simulator", "judge", "judge_method"):
            if run.card.get(key) != base.card.get(key):
                note += f" different {key}"
        if not shared:
            lines.append(f"| {run.label} | 0 | {turns} | n/a | n/a | no shared cases |")
            continue
        rows_a = [base.case_ids.index(c) for c in shared]
        rows_b = [run.case_ids.index(c) for c in shared]
        diff = metrics.paired_difference(base.scores[rows_a, :turns], run.scores[rows_b, :turns], n_resamples, seed)
        lines.append(f"| {run.label} | {diff.n_cases} | {turns} | {_num(diff.avg_diff, 3, True)} "
                     f"{_ci(diff.avg_diff_ci, 3, True)} | {_num(diff.slope_diff, 4, True)} "
                     f"{_ci(diff.slope_diff_ci, 4, True)} | {note.strip()} |")
    lines += ["", f"![AL(k)]({PLOT_FILE})", ""]
    text = "\n".join(lines)
    storage.write_text(os.path.join(out_dir, "compare.md"), text)
    return text


def _knowing_panel(ax, knowing: metrics.TurnMeans) -> None:
    """The plot's second panel: how much of the persona the extractor recovers after each turn, with its band."""
    k = np.arange(1, len(knowing.mean) + 1)
    if not np.all(np.isnan(knowing.ci[0])):
        ax.fill_between(k, knowing.ci[0], knowing.ci[1], color="tab:green", alpha=0.18, linewidth=0)
    ax.plot(k, knowing.mean, marker="o", color="tab:green", linewidth=2)
    ax.set_xticks(k)
    ax.set_xlim(0.7, len(k) + 0.3)
    ax.set_ylim(0, 1)
    ax.set_xlabel("turn k", fontsize=12)
    ax.set_ylabel("knowing: MiniLM cosine, inferred vs true persona", fontsize=11)
    ax.set_title("Knowing: persona recovered from the chat so far\n(shaded: 95% CI over cases)", fontsize=11)
    ax.grid(True, alpha=0.3)


def _measurements(run: LoadedRun, summary: metrics.RunSummary, n_resamples: int, seed: int) -> dict:
    """Knowing vs doing, the judge's calibration and its score distribution per turn, from the records: report
    sections, warning lines, summary.json entries and the plot's second panel."""
    records = read_records(run.folder)
    turns = run.scores.shape[1]
    sections, warnings, out = [], [], {}
    knowing = None
    if any("knowing" in r for r in records):
        curves = {f: metrics.turn_means(score_matrix(records, run.case_ids, turns, f), n_resamples, seed)
                  for f in KNOWING_FIELDS}
        knowing = curves["knowing"]
        out["knowing"] = {f: {"mean": summary_json_values(c.mean), "ci": [summary_json_values(c.ci[0]),
                                                                           summary_json_values(c.ci[1])],
                              "counts": c.counts.tolist()} for f, c in curves.items()}
        out["knowing"]["protocol"] = run.card.get("knowing")
        rows = ["## Knowing vs doing", "",
                "After each turn the extractor reads the conversation so far; *knowing* is the MiniLM cosine "
                "similarity of what it infers with the true profile and personality (their mean; an empty field "
                "scores 0), averaged over cases with a 95% bootstrap CI over cases. A model that adapts should both "
                "know more and do better; a flat, saturated curve means the simulator reveals everything at once.",
                "", "| turn k | knowing | 95% CI | profile | personality | AL(k) |", "|---:|---:|:---:|---:|---:|---:|"]
        for k in range(turns):
            rows.append(f"| {k + 1} | {_num(knowing.mean[k])} | {_ci((knowing.ci[0][k], knowing.ci[1][k]))} | "
                        f"{_num(curves['knowing_profile'].mean[k])} | {_num(curves['knowing_personality'].mean[k])} "
                        f"| {_num(summary.al[k])} |")
        sections.append("\n".join(rows))
    distribution = score_distribution(run.scores, run.ran)
    out["score_distribution"] = distribution
    rows = ["## Judge calibration", ""]
    if isinstance(run.card.get("judge_probe"), dict):
        calibration = probe_calibration(records, float(run.card["judge_probe"]["flag_first_shown"]))
        out["judge_calibration"] = calibration.to_json()
        rows += [calibration.line(), "",
                 f"Repeat-agreement probe: {run.card['judge_probe']['fraction']:g} of the case-turns (seeded) scored "
                 "again with the scale listed backwards (5 first) and another seed; agreement = same score both "
                 "times; first-listed = the judgment chose 1 forwards or 5 backwards.", ""]
        if calibration.flagged:
            warnings.append(calibration.line())
    rows += ["Scores per turn (cases; missing: run but unscored):", "",
             "| turn k | 1 | 2 | 3 | 4 | 5 | missing |", "|---:|---:|---:|---:|---:|---:|---:|"]
    rows += [f"| {k + 1} | " + " | ".join(str(d[s]) for s in ("1", "2", "3", "4", "5", "missing")) + " |"
             for k, d in enumerate(distribution) if run.ran[:, k].any()]  # turns not run yet are not all-zero rows
    sections.append("\n".join(rows))
    return {"sections": sections, "warnings": warnings, "json": out, "knowing": knowing}


def summary_json_values(values: np.ndarray) -> list:
    """A float array as JSON values (NaN as null)."""
    return [None if math.isnan(v) else float(v) for v in np.asarray(values, np.float64).tolist()]
