"""mars.train.stats: the paired intervals, steps-to-level and curve areas of --compare."""

import math

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")

from mars.train.stats import curve_area, mean_band, paired_difference, steps_to_reach  # noqa: E402


@pytest.mark.parametrize("n", [2, 3, 10, 31])
def test_t_interval_matches_scipy_paired_test(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(0.8, 0.1, n), rng.normal(0.75, 0.1, n)
    out = paired_difference(a, b)
    d = a - b
    assert out["n"] == n and out["mean"] == pytest.approx(d.mean(), abs=1e-15)
    # the interval is the set of means the paired t test (scipy) does not reject at 5%
    lo, hi = out["ci_t"]
    for mu, inside in ((lo + 1e-9, True), (hi - 1e-9, True), (lo - 1e-6, False), (hi + 1e-6, False)):
        p = scipy_stats.ttest_1samp(d, mu).pvalue
        assert (p >= 0.05) == inside, (mu, p)
    ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
    assert out["ci_t"] == pytest.approx([ci.low, ci.high], rel=1e-12)
    assert out["wins"] + out["losses"] + out["ties"] == n and out["wins"] == int((d > 0).sum())


def test_bootstrap_interval_resamples_pairs():
    a = [0.9, 1.0, 0.95, 1.0, 0.8]
    b = [0.8, 0.8, 0.95, 0.9, 0.8]
    out = paired_difference(a, b, n_boot=20000, seed=3)
    d = np.subtract(a, b)
    lo, hi = out["ci_boot"]
    assert d.min() <= lo <= d.mean() <= hi <= d.max()
    assert out == paired_difference(a, b, n_boot=20000, seed=3)  # seeded: reproducible
    # pairs kept together: a shift common to both methods changes nothing
    assert paired_difference([x + 0.3 for x in a], [y + 0.3 for y in b], n_boot=20000, seed=3)["ci_boot"] \
        == pytest.approx(out["ci_boot"], abs=1e-12)
    # the bootstrap and t intervals agree roughly for a symmetric sample
    rng = np.random.default_rng(0)
    x, y = rng.normal(0.1, 1.0, 40), np.zeros(40)
    o = paired_difference(x, y)
    assert o["ci_boot"] == pytest.approx(o["ci_t"], abs=0.1)


def test_bootstrap_coverage_is_near_nominal():
    rng = np.random.default_rng(1)
    hits_t = hits_b = 0
    for _ in range(300):
        d = rng.normal(0.05, 0.1, 15)
        o = paired_difference(d, np.zeros(15), n_boot=2000, seed=int(rng.integers(1 << 30)))
        hits_t += o["ci_t"][0] <= 0.05 <= o["ci_t"][1]
        hits_b += o["ci_boot"][0] <= 0.05 <= o["ci_boot"][1]
    assert 0.90 <= hits_t / 300 <= 0.99 and 0.86 <= hits_b / 300 <= 0.99


def test_degenerate_inputs():
    one = paired_difference([1.0], [0.5])
    assert one["ci_t"] is None and one["ci_boot"] == [0.5, 0.5] and one["sd"] == 0.0
    same = paired_difference([0.2, 0.4, 0.6], [0.1, 0.3, 0.5])
    assert same["ci_t"] == pytest.approx([0.1, 0.1]) and same["ci_boot"] == pytest.approx([0.1, 0.1])
    assert paired_difference([1, 1], [1, 1])["ties"] == 2
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1, 2], [1])
    with pytest.raises(ValueError, match="at least one"):
        paired_difference([], [])
    with pytest.raises(ValueError, match="finite"):
        paired_difference([1.0, math.nan], [1.0, 1.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_difference([1.0], [1.0], confidence=1.5)


def test_steps_to_reach_and_curve_area():
    steps, acc = [0, 25, 50, 75], [0.8, 0.9, 0.96, 0.94]
    assert steps_to_reach(steps, acc, 0.95) == 50
    assert steps_to_reach(steps, acc, 0.8) == 0
    assert steps_to_reach(steps, acc, 0.99) is None
    assert curve_area(steps, acc) == pytest.approx(((0.8 + 0.9) / 2 + (0.9 + 0.96) / 2 + (0.96 + 0.94) / 2) / 3)
    assert curve_area([0, 10], [1.0, 1.0]) == 1.0 and curve_area([5], [0.7]) == 0.7
    assert curve_area([0, 10, 30], [0.0, 1.0, 1.0]) == pytest.approx((5 + 20) / 30)
    with pytest.raises(ValueError, match="increase"):
        curve_area([0, 0], [1, 1])
    with pytest.raises(ValueError):
        steps_to_reach([0, 1], [1.0], 0.5)


def test_mean_band():
    mean, lo, hi = mean_band([[1.0, 2.0, 3.0], [3.0, 4.0]])
    assert mean.tolist() == [2.0, 3.0]
    half = scipy_stats.t.ppf(0.975, 1) * np.std([1.0, 3.0], ddof=1) / math.sqrt(2)
    assert lo.tolist() == pytest.approx([2.0 - half, 3.0 - half]) and hi.tolist() == pytest.approx([2 + half, 3 + half])
    m, lo1, hi1 = mean_band([[0.5, 0.6]])
    assert lo1.tolist() == m.tolist() == hi1.tolist() == [0.5, 0.6]
