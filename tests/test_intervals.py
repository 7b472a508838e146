"""Intervals over seeds and volumes (mriadv.intervals) against SciPy and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mriadv.intervals import interval, ratio_interval, t_cdf, t_quantile


@pytest.mark.parametrize("df", [1, 2, 2.7, 3, 5, 11.4, 30, 200])
def test_t_distribution_matches_scipy(df):
    for t in (-7.0, -1.3, -0.2, 0.0, 0.4, 2.1, 9.5):
        assert t_cdf(t, df) == pytest.approx(stats.t.cdf(t, df), abs=1e-11)
    for p in (0.025, 0.5, 0.9, 0.975, 0.995):
        assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-10)
    # closed forms: df = 1 is Cauchy, df = 2 has t = (2p - 1) / sqrt(2 p (1 - p))
    assert t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    assert t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-9)


def test_one_seed_is_the_paired_t_interval_over_volumes():
    d = np.array([[0.3, -0.1, 0.25, 0.05]])
    got = interval(d)
    se = d[0].std(ddof=1) / 2
    assert got.mean == pytest.approx(d.mean()) and got.se == pytest.approx(se) and got.df == pytest.approx(3)
    assert got.half == pytest.approx(stats.t.ppf(0.975, 3) * se)


def test_one_volume_is_the_student_t_interval_over_seeds():
    d = np.array([[1.0], [1.4], [0.7]])
    got = interval(d)
    assert (got.low, got.high) == pytest.approx(stats.t.interval(0.95, 2, loc=d.mean(), scale=stats.sem(d[:, 0])))


def test_seeds_and_volumes_combine_with_welch_satterthwaite_degrees_of_freedom():
    rng = np.random.default_rng(0)
    d = 0.1 + rng.normal(0, 0.05, (3, 1)) + rng.normal(0, 0.02, (1, 6)) + rng.normal(0, 0.01, (3, 6))
    got = interval(d)
    a = d.mean(axis=1).var(ddof=1) / 3
    b = d.mean(axis=0).var(ddof=1) / 6
    df = (a + b) ** 2 / (a**2 / 2 + b**2 / 5)
    assert got.se == pytest.approx(math.sqrt(a + b)) and got.df == pytest.approx(df)
    assert got.half == pytest.approx(stats.t.ppf(0.975, df) * math.sqrt(a + b))
    assert 2 <= got.df <= 7


def test_the_interval_covers_the_true_difference_at_about_its_level():
    """Simulated replicates (seed, volume and interaction effects): the 95 % interval holds the true
    mean in at least 93 % of 2000 draws (it is conservative by construction)."""
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(2000):
        d = 0.5 + rng.normal(0, 0.3, (3, 1)) + rng.normal(0, 0.2, (1, 4)) + rng.normal(0, 0.1, (3, 4))
        got = interval(d)
        hits += got.low <= 0.5 <= got.high
    assert hits / 2000 >= 0.93


def test_a_ratio_of_paired_means_has_the_delta_method_interval():
    """One seed: the ratio estimator's textbook SE, sqrt(var(a - R b) / V) / mean(b), written out from its
    per-volume sums; several seeds: the same linearisation through the seed and volume components."""
    a = np.array([[0.30, 0.22, 0.41, 0.35, 0.28]])
    b = np.array([[0.32, 0.25, 0.40, 0.39, 0.30]])
    got = ratio_interval(a, b)
    r = a.sum() / b.sum()
    n = a.shape[1]
    resid = a[0] - r * b[0]
    se = math.sqrt(sum((x - resid.mean()) ** 2 for x in resid) / (n - 1) / n) / b.mean()
    assert got.mean == pytest.approx(r) and got.se == pytest.approx(se) and got.df == pytest.approx(n - 1)
    assert got.half == pytest.approx(stats.t.ppf(0.975, n - 1) * se)
    # the denominator's variation counts: a = b * 0.9 exactly gives R = 0.9 with zero width, while the
    # difference's interval divided by mean(b) (the older approximation) does not
    exact = ratio_interval(0.9 * b, b)
    assert exact.mean == pytest.approx(0.9) and exact.half == pytest.approx(0.0, abs=1e-12)
    assert interval(0.9 * b - b).half / b.mean() > 0.01
    with pytest.raises(ValueError, match="not paired"):
        ratio_interval(a, b[:, :4])
    with pytest.raises(ValueError, match="positive"):
        ratio_interval(a, -b)


def test_the_ratio_interval_covers_the_true_ratio_at_about_its_level():
    """Simulated paired degradations over 3 seeds x 4 volumes whose true ratio of means is 0.8: the
    interval holds it in at least 92 % of 2000 draws."""
    rng = np.random.default_rng(2)
    hits = 0
    for _ in range(2000):
        b = 1.0 + rng.normal(0, 0.2, (1, 4)) + rng.normal(0, 0.05, (3, 1)) + rng.normal(0, 0.02, (3, 4))
        a = 0.8 * b + rng.normal(0, 0.03, (3, 1)) + rng.normal(0, 0.02, (3, 4))
        got = ratio_interval(a, b)
        hits += got.low <= 0.8 <= got.high
    assert hits / 2000 >= 0.92


def test_bad_tables_are_refused():
    with pytest.raises(ValueError, match="non-finite"):
        interval(np.array([[1.0, math.nan]]))
    with pytest.raises(ValueError, match="seeds, volumes"):
        interval(np.array([1.0, 2.0]))
    single = interval(np.array([[2.0]]))
    assert single.mean == 2.0 and math.isnan(single.half) and single.text(".1f") == "2.0"
