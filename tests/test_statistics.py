"""kdlab.report.statistics against hand-worked values and published G*Power numbers."""

import math

import pytest

from kdlab.report.statistics import (cohens_dz, compare_to_baseline, holm, paired_power,
                                     paired_test, seeds_needed, t_interval, wilcoxon_min_p)

nan = float("nan")


def test_t_interval_by_hand():
    # values 1, 2, 3.5: mean 13/6, sd = sqrt(((−7/6)² + (−1/6)² + (4/3)²) / 2) = sqrt(19/12),
    # t_{0.975, 2} = 4.302653 (printed t tables), half = 4.302653 · sd / √3
    m, sd, half = t_interval([1.0, 2.0, 3.5])
    assert m == pytest.approx(13 / 6)
    assert sd == pytest.approx(math.sqrt(19 / 12))
    assert half == pytest.approx(4.302653 * math.sqrt(19 / 12) / math.sqrt(3), rel=1e-6)
    # non-finite values dropped; n = 1 -> sd, half NaN; n = 0 -> all NaN
    assert t_interval([2.0, nan, float("inf")])[0] == 2.0
    assert math.isnan(t_interval([2.0])[1]) and math.isnan(t_interval([2.0])[2])
    assert all(math.isnan(v) for v in t_interval([]))
    with pytest.raises(ValueError):
        t_interval([1, 2], conf=1.5)


def test_paired_test_closed_forms():
    # d = (0.1, 0.05, 0): mean 0.05, sd 0.05, t = √3; for df = 2 the t CDF is
    # 1/2 + t / (2 sqrt(t² + 2)), so the two-sided p = 1 − √3/√5.
    # Wilcoxon drops the zero: 2 positive differences, exact two-sided p = 2 · (1/2)² = 0.5.
    r = paired_test({0: 0.5, 1: 0.6, 2: 0.7, 9: 0.1}, {0: 0.4, 1: 0.55, 2: 0.7})
    assert r["n"] == 3
    assert r["mean"] == pytest.approx(0.05) and r["sd"] == pytest.approx(0.05)
    assert r["t"] == pytest.approx(math.sqrt(3))
    assert r["p_ttest"] == pytest.approx(1 - math.sqrt(3) / math.sqrt(5))
    assert r["p_wilcoxon"] == pytest.approx(0.5)
    assert r["d_z"] == pytest.approx(1.0)
    assert r["ci_low"] == pytest.approx(0.05 - r["ci"]) and r["ci_high"] == pytest.approx(0.05 + r["ci"])


def test_wilcoxon_exact_by_hand():
    # d = 1, 2, −3, 4, 5: W− = 3; subsets of {1..5} with rank sum ≤ 3: {}, {1}, {2}, {3}, {1,2}
    # -> P(W ≤ 3) = 5/32, two-sided p = 10/32
    r = paired_test([1, 2, -3, 4, 5], [0, 0, 0, 0, 0])
    assert r["p_wilcoxon"] == pytest.approx(10 / 32)
    # all 6 positive: p = 2 / 2^6, the smallest possible with 6 pairs
    assert paired_test([1, 2, 3, 4, 5, 6], [0] * 6)["p_wilcoxon"] == pytest.approx(wilcoxon_min_p(6))
    assert wilcoxon_min_p(5) == pytest.approx(0.0625) and wilcoxon_min_p(6) == pytest.approx(0.03125)


def test_nan_rules():
    zero = paired_test([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])  # all differences zero
    assert math.isnan(zero["p_ttest"]) and math.isnan(zero["p_wilcoxon"]) and math.isnan(zero["d_z"])
    const = paired_test([0.6, 0.7, 0.8], [0.5, 0.6, 0.7])  # sd 0: t undefined, Wilcoxon defined
    assert math.isnan(const["p_ttest"]) and math.isnan(const["d_z"])
    assert const["p_wilcoxon"] == pytest.approx(0.25)  # 3 positive of 3: 2/8
    one = paired_test({0: 0.6}, {0: 0.5})
    assert one["n"] == 1 and math.isnan(one["p_ttest"]) and math.isnan(one["p_wilcoxon"])
    assert math.isnan(cohens_dz([1.0])) and cohens_dz([1.0, 3.0]) == pytest.approx(2 / math.sqrt(2))
    assert math.isnan(seeds_needed(0.0)) and math.isnan(seeds_needed(nan))
    with pytest.raises(ValueError):
        paired_test([1, 2], [1, 2, 3])
    with pytest.raises(ValueError):
        paired_test({0: 1}, [1])


def test_holm_hand_worked():
    # sorted: 0.005 (x4) = 0.02, 0.01 (x3) = 0.03, 0.03 (x2) = 0.06, 0.04 (x1) = 0.04 -> running
    # max 0.02, 0.03, 0.06, 0.06; back in input order:
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # NaN stays NaN and is not counted: m = 2
    out = holm([0.01, nan, 0.04])
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.04)
    assert holm([0.6, 0.7]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
    with pytest.raises(ValueError):
        holm([1.2])


@pytest.mark.parametrize("dz,n,power", [
    # G*Power 3.1, t tests - Means: difference between two dependent means (matched pairs),
    # a priori, two tails, α = 0.05, power 0.8: total sample size and actual power
    (0.5, 34, 0.8077775), (0.8, 15, 0.8213105), (0.2, 199, 0.8016910),
])
def test_seeds_needed_matches_gpower(dz, n, power):
    # delta / sd = dz: a 1 pp difference with sd 1/dz pp
    assert seeds_needed(0.01 / dz, 0.01) == n
    assert paired_power(n, 0.01, 0.01 / dz) == pytest.approx(power, abs=1e-6)
    assert paired_power(n - 1, 0.01, 0.01 / dz) < 0.8


def test_compare_to_baseline():
    vals = {"base": {0: 0.50, 1: 0.55, 2: 0.60, 3: 0.52},
            "a": {0: 0.60, 1: 0.64, 2: 0.71, 3: 0.61},
            "b": {0: 0.51, 1: 0.54, 2: 0.62, 3: 0.52}}
    res = compare_to_baseline(vals, "base")
    assert set(res) == {"a", "b"}
    pa, pb = res["a"]["p_ttest"], res["b"]["p_ttest"]
    lo, hi = sorted([pa, pb])
    expect = {pa: min(1, 2 * lo) if pa == lo else max(min(1, 2 * lo), hi)}
    assert res["a"]["p_holm"] == pytest.approx(expect[pa])
    assert res["a"]["seeds_needed"] == seeds_needed(res["a"]["sd"], 0.01)
    with pytest.raises(KeyError):
        compare_to_baseline(vals, "nope")


def test_min_detectable_diff():
    from kdlab.report.statistics import min_detectable_diff

    # the inverse of seeds_needed: at n = 34 with sd 1 the 80%-power difference lies just below
    # d_z = 0.5 (G*Power: n = 34 gives power 0.8078 at 0.5) and above 0.5 at n = 33
    d34 = min_detectable_diff(34, 1.0)
    assert 0.48 < d34 < 0.5 and paired_power(34, d34, 1.0) == pytest.approx(0.8, abs=1e-9)
    assert min_detectable_diff(33, 1.0) > 0.5 > d34
    assert min_detectable_diff(34, 2.0) == pytest.approx(2 * d34)  # scales with sd
    assert math.isnan(min_detectable_diff(1, 1.0)) and math.isnan(min_detectable_diff(5, 0.0))


def test_paired_power_stays_finite_deep_in_the_tail():
    # scipy.stats.nct.cdf(-12.7, 1, 11.31) is NaN (scipy 1.17); the power must not be
    import numpy as np

    for n in (2, 3, 5):
        ps = [paired_power(n, k, 1.0) for k in np.geomspace(0.01, 2000, 300)]
        assert all(math.isfinite(p) and 0 <= p <= 1 for p in ps)
        assert all(b >= a - 1e-12 for a, b in zip(ps, ps[1:]))  # increasing in delta
    assert paired_power(2, -0.3, 1.0) == pytest.approx(paired_power(2, 0.3, 1.0))
    from kdlab.report.statistics import min_detectable_diff

    assert math.isfinite(min_detectable_diff(2, 0.0378))
