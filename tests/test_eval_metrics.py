"""ALOE metrics against values worked out by hand (in the comments), including a flat curve and missing turns."""

import math

import numpy as np
import pytest

from aloe_jax.eval import metrics

nan = np.nan


def test_rising_curve():
    # AL = [2, 3, 4]: a perfect line of slope 1 through (0, 1); N-AL = [0, .5, 1] has slope .5.
    scores = np.array([[1, 2, 3], [3, 4, 5]], float)
    al, counts = metrics.al_curve(scores)
    np.testing.assert_allclose(al, [2, 3, 4])
    np.testing.assert_array_equal(counts, [2, 2, 2])
    m = metrics.point_metrics(scores)
    assert m["avg"] == pytest.approx(3.0)
    assert m["slope"] == pytest.approx(1.0)
    assert m["intercept"] == pytest.approx(1.0)
    assert m["r2"] == pytest.approx(1.0)
    assert m["n_ir"] == pytest.approx(0.5)
    np.testing.assert_allclose(metrics.normalise(al), [0, 0.5, 1])


def test_constant_curve_has_zero_n_ir_and_undefined_r2():
    scores = np.full((3, 4), 3.0)
    s = metrics.summarise(scores, n_resamples=200)
    np.testing.assert_allclose(s.al, [3, 3, 3, 3])
    np.testing.assert_array_equal(s.n_al, [0, 0, 0, 0])
    assert s.avg == 3.0 and s.slope == pytest.approx(0.0) and s.intercept == pytest.approx(3.0)
    assert s.n_ir == 0.0
    assert math.isnan(s.r2)
    assert s.avg_ci == pytest.approx((3.0, 3.0)) and s.slope_ci == pytest.approx((0.0, 0.0))


def test_missing_turns_are_excluded_not_zero():
    # Turn 1: (5+3+1)/3 = 3; turn 2: only 4; turn 3: only 2 → AL = [3, 4, 2], counts [3, 1, 1].
    # Fit on k = 1..3: slope = Σ(k−2)(y−3)/Σ(k−2)² = (0 + 0 − 1)/2 = −.5, intercept = 3 + .5·2 = 4,
    # predictions [3.5, 3, 2.5], SSres = .25 + 1 + .25 = 1.5, SStot = 0 + 1 + 1 = 2 → R² = .25.
    # N-AL = (AL − 2)/2 = [.5, 1, 0] → N-IR = slope/2 = −.25.
    scores = np.array([[5, nan, 2], [3, 4, nan], [1, nan, nan]])
    s = metrics.summarise(scores, n_resamples=200)
    np.testing.assert_allclose(s.al, [3, 4, 2])
    np.testing.assert_array_equal(s.counts, [3, 1, 1])
    assert s.avg == pytest.approx(3.0)
    assert s.slope == pytest.approx(-0.5) and s.intercept == pytest.approx(4.0) and s.r2 == pytest.approx(0.25)
    np.testing.assert_allclose(s.n_al, [0.5, 1, 0])
    assert s.n_ir == pytest.approx(-0.25)
    assert s.n_missing == 4


def test_turn_with_no_scores_is_left_out_of_the_fit():
    # AL = [3, NaN, 4]: AVG over the two defined turns = 3.5; line through (1, 3) and (3, 4): slope .5, intercept 2.5.
    scores = np.array([[4, nan, 5], [2, nan, 3]])
    s = metrics.summarise(scores, n_resamples=200)
    assert math.isnan(s.al[1]) and s.counts[1] == 0
    assert s.avg == pytest.approx(3.5)
    assert s.slope == pytest.approx(0.5) and s.intercept == pytest.approx(2.5) and s.r2 == pytest.approx(1.0)
    np.testing.assert_allclose(s.n_al, [0, nan, 1])
    assert s.n_ir == pytest.approx(0.5)


def test_single_turn_or_single_case_leaves_undefined_numbers_nan():
    one_turn = metrics.summarise(np.array([[4.0], [2.0]]), n_resamples=100)
    assert one_turn.avg == pytest.approx(3.0) and math.isnan(one_turn.slope) and math.isnan(one_turn.n_ir)
    one_case = metrics.summarise(np.array([[1.0, 2.0, 4.0]]), n_resamples=100)
    assert one_case.slope == pytest.approx(1.5)
    assert all(math.isnan(v) for v in one_case.avg_ci)  # no spread to resample from one case


def test_bootstrap_ci_matches_normal_approximation():
    # 400 cases with i.i.d. per-case means: the 95% CI of AVG should be close to mean ± 1.96·sd/√n.
    rng = np.random.default_rng(1)
    case_level = rng.integers(1, 6, size=400).astype(float)
    scores = np.repeat(case_level[:, None], 3, axis=1)
    s = metrics.summarise(scores, n_resamples=2000, seed=3)
    half = 1.96 * case_level.std(ddof=1) / math.sqrt(len(case_level))
    assert s.avg_ci[0] == pytest.approx(case_level.mean() - half, abs=0.25 * half)
    assert s.avg_ci[1] == pytest.approx(case_level.mean() + half, abs=0.25 * half)
    assert s.al_ci[0][0] < s.al[0] < s.al_ci[1][0]
    assert s.slope_ci == pytest.approx((0.0, 0.0))  # every case is flat, so every resample is flat


def test_paired_difference_of_shifted_and_tilted_runs():
    rng = np.random.default_rng(0)
    a = rng.integers(1, 6, size=(30, 5)).astype(float)
    a[3, 2] = nan
    shifted = a + 0.5  # B − A = +.5 on every scored turn, on every resample
    d = metrics.paired_difference(a, shifted, n_resamples=300)
    assert d.avg_diff == pytest.approx(0.5) and d.avg_diff_ci == pytest.approx((0.5, 0.5))
    assert d.slope_diff == pytest.approx(0.0, abs=1e-12)
    tilted = a + 0.1 * np.arange(1, 6)  # adds 0.1 per turn to AL(k): Δslope = .1 exactly
    d = metrics.paired_difference(a, tilted, n_resamples=300)
    assert d.slope_diff == pytest.approx(0.1) and d.slope_diff_ci == pytest.approx((0.1, 0.1))
    assert d.avg_diff == pytest.approx(0.3)
    noisy = a + rng.normal(0, 1, size=a.shape)
    d = metrics.paired_difference(a, noisy, n_resamples=300)
    assert d.avg_diff_ci[0] < d.avg_diff < d.avg_diff_ci[1]
    with pytest.raises(ValueError):
        metrics.paired_difference(a, a[:10])
