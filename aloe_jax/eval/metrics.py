"""ALOE metrics on a `[cases, turns]` score matrix (NaN = a turn the judge could not score).

AL(k) is the mean judge score at turn k over the cases that have one. From the curve: AVG (mean of AL over turns),
the least-squares line AL(k) ≈ intercept + slope·k (the slope is the improvement rate) and its R², and the min-max
normalised curve N-AL(k) whose slope is N-IR. Confidence intervals resample *cases* (the unit that was sampled), so a
turn's score and the same case's later scores stay together.

Degenerate cases, chosen so that every number stays defined where it has a meaning:
- a constant AL(k) has no range to normalise by: N-AL(k) is 0 at every turn and N-IR is 0 (no improvement); R² is NaN
  (a flat line explains a flat curve perfectly, but there is no variance to explain, so the ratio is undefined);
- a turn with no scored case has AL(k) = NaN and is left out of AVG and of both fits;
- fewer than two defined turns: slope, intercept, R² and N-IR are NaN.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
import scipy.stats

CONFIDENCE = 0.95


def al_curve(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AL(k) `[turns]`, number of scored cases per turn `[turns]`) from `scores` `[cases, turns]` with NaN missing."""
    scores = np.asarray(scores, dtype=np.float64)
    counts = np.sum(~np.isnan(scores), axis=0)
    sums = np.nansum(scores, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        al = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return al, counts


@dataclasses.dataclass(frozen=True)
class LineFit:
    """Least-squares line y ≈ intercept + slope·k over the turns k = 1..K where y is defined."""

    slope: float
    intercept: float
    r2: float


def fit_line(curve: np.ndarray) -> LineFit:
    """The least-squares fit of `curve` `[turns]` against k = 1..K (NaN turns left out)."""
    curve = np.asarray(curve, dtype=np.float64)
    k = np.arange(1, len(curve) + 1, dtype=np.float64)
    defined = ~np.isnan(curve)
    if defined.sum() < 2:
        return LineFit(np.nan, np.nan, np.nan)
    k, y = k[defined], curve[defined]
    slope, intercept = np.polyfit(k, y, 1)
    total = np.sum((y - y.mean()) ** 2)
    residual = np.sum((y - (intercept + slope * k)) ** 2)
    r2 = 1.0 - residual / total if total > 0 else np.nan
    return LineFit(float(slope), float(intercept), float(r2))


def normalise(curve: np.ndarray) -> np.ndarray:
    """N-AL: `curve` min-max scaled to [0, 1] over its defined turns; all zeros when the curve is constant."""
    curve = np.asarray(curve, dtype=np.float64)
    if np.all(np.isnan(curve)):
        return curve.copy()
    low, high = np.nanmin(curve), np.nanmax(curve)
    if high == low:
        return np.where(np.isnan(curve), np.nan, 0.0)
    return (curve - low) / (high - low)


def _avg(curve: np.ndarray) -> float:
    return float(np.nanmean(curve)) if not np.all(np.isnan(curve)) else np.nan


def point_metrics(scores: np.ndarray) -> dict[str, float]:
    """AVG, slope, intercept, R² and N-IR of one score matrix `[cases, turns]`."""
    al, _ = al_curve(scores)
    fit = fit_line(al)
    return dict(avg=_avg(al), slope=fit.slope, intercept=fit.intercept, r2=fit.r2,
                n_ir=fit_line(normalise(al)).slope)


def _bootstrap(statistic, n_cases: int, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Percentile CIs of `statistic(case_indices)` (a vector) when cases are resampled with replacement."""
    probe = np.atleast_1d(statistic(np.arange(n_cases)))
    if n_cases < 2 or n_resamples < 1:
        nan = np.full(probe.shape, np.nan)
        return nan, nan.copy()
    with warnings.catch_warnings():
        # A resample that drops every scored case of a turn gives an all-NaN column: that turn is skipped, by design.
        warnings.simplefilter("ignore", RuntimeWarning)
        result = scipy.stats.bootstrap(
            (np.arange(n_cases),), lambda idx: np.atleast_1d(statistic(idx.astype(int))), vectorized=False,
            n_resamples=n_resamples, confidence_level=CONFIDENCE, method="percentile", rng=seed,
        )
    return np.atleast_1d(result.confidence_interval.low), np.atleast_1d(result.confidence_interval.high)


@dataclasses.dataclass(frozen=True)
class RunSummary:
    """Every ALOE number of one run; `*_ci` are 95% bootstrap intervals over cases as (low, high)."""

    al: np.ndarray  # [turns] AL(k)
    al_ci: tuple[np.ndarray, np.ndarray]  # [turns] each
    counts: np.ndarray  # [turns] scored cases per turn
    n_al: np.ndarray  # [turns] N-AL(k)
    avg: float
    avg_ci: tuple[float, float]
    slope: float
    slope_ci: tuple[float, float]
    intercept: float
    r2: float
    n_ir: float
    n_cases: int
    n_missing: int


def summarise(scores: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> RunSummary:
    """The RunSummary of a score matrix `[cases, turns]` (NaN = missing)."""
    scores = np.asarray(scores, dtype=np.float64)
    n_cases, n_turns = scores.shape
    al, counts = al_curve(scores)
    point = point_metrics(scores)

    def statistic(idx):
        sample = scores[idx]
        metrics = point_metrics(sample)
        return np.concatenate([[metrics["avg"], metrics["slope"]], al_curve(sample)[0]])

    low, high = _bootstrap(statistic, n_cases, n_resamples, seed)
    return RunSummary(
        al=al, al_ci=(low[2:], high[2:]), counts=counts, n_al=normalise(al),
        avg=point["avg"], avg_ci=(float(low[0]), float(high[0])),
        slope=point["slope"], slope_ci=(float(low[1]), float(high[1])),
        intercept=point["intercept"], r2=point["r2"], n_ir=point["n_ir"],
        n_cases=n_cases, n_missing=int(np.isnan(scores).sum()),
    )


@dataclasses.dataclass(frozen=True)
class TurnMeans:
    """A per-turn mean over cases (e.g. how much of the persona is known after turn k) with its 95% bootstrap
    interval over cases."""

    mean: np.ndarray  # [turns]
    ci: tuple[np.ndarray, np.ndarray]  # [turns] each
    counts: np.ndarray  # [turns] cases with a value


def turn_means(values: np.ndarray, n_resamples: int = 2000, seed: int = 0) -> TurnMeans:
    """The TurnMeans of `values` `[cases, turns]` (NaN = none), resampling cases as `summarise` does."""
    values = np.asarray(values, dtype=np.float64)
    mean, counts = al_curve(values)
    low, high = _bootstrap(lambda idx: al_curve(values[idx])[0], len(values), n_resamples, seed)
    return TurnMeans(mean, (low, high), counts)


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """Run B minus run A on the cases both ran: point differences with 95% paired-bootstrap intervals."""

    n_cases: int
    avg_diff: float
    avg_diff_ci: tuple[float, float]
    slope_diff: float
    slope_diff_ci: tuple[float, float]


def paired_difference(scores_a: np.ndarray, scores_b: np.ndarray, n_resamples: int = 2000,
                      seed: int = 0) -> PairedDifference:
    """B − A for AVG and slope; rows of the two `[cases, turns]` matrices must be the same cases in the same order."""
    scores_a, scores_b = np.asarray(scores_a, np.float64), np.asarray(scores_b, np.float64)
    if scores_a.shape != scores_b.shape:
        raise ValueError(f"paired runs need the same cases and turns, got shapes {scores_a.shape} and "
                         f"{scores_b.shape}")

    def statistic(idx):
        a, b = point_metrics(scores_a[idx]), point_metrics(scores_b[idx])
        return np.array([b["avg"] - a["avg"], b["slope"] - a["slope"]])

    point = statistic(np.arange(len(scores_a)))
    low, high = _bootstrap(statistic, len(scores_a), n_resamples, seed)
    return PairedDifference(len(scores_a), float(point[0]), (float(low[0]), float(high[0])),
                            float(point[1]), (float(low[1]), float(high[1])))
