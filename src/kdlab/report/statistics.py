"""Statistics for paired studies: every method is trained with the same seeds as the baseline, so
run k of a method and run k of the baseline share data order and augmentation, and the unit of
analysis is the paired difference ``d_k = a_k(method) − a_k(baseline)``.

All tests come from :mod:`scipy.stats`; this module fixes the conventions (see docs/statistics.md):

* :func:`t_interval` – mean, sample sd and the half-width of the Student-t confidence interval,
  ``t_{(1+conf)/2, n−1} · s / √n`` (``scipy.stats.t.interval``).
* :func:`paired_test` – mean and t-interval of the differences, the paired t-test
  (``scipy.stats.ttest_rel``, two-sided), the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``,
  two-sided, zero differences dropped, scipy's ``method="auto"``) and Cohen's
  ``d_z = mean(d) / sd(d)``.
* :func:`holm` – Holm–Bonferroni step-down adjustment across a family of comparisons:
  with the m finite p-values sorted, ``p_(1) ≤ … ≤ p_(m)``,
  ``p̃_(i) = min(1, max_{j ≤ i} (m − j + 1) · p_(j))``.
* :func:`paired_power` / :func:`seeds_needed` – power of the two-sided paired t-test from the
  noncentral t distribution, and the smallest number of seeds that reaches a target power for a
  given true difference at a given sd of the paired differences.

NaN rules (a NaN means "not defined", never "not significant"):

* ``t_interval``: sd and half-width NaN for n < 2 (mean NaN for n = 0); non-finite values
  are dropped first.
* paired t-test p and ``d_z``: NaN for n < 2 pairs, or when every difference is the same (sd = 0:
  t is 0/0 or ±inf, no evidence about the spread). Differences within ``ZERO_TOL · (1 + max|x|)``
  of each other or of zero count as equal / zero (binary rounding of accuracies).
* Wilcoxon p: NaN for n < 2 pairs or when all differences are zero (nothing to rank).
  With ``n`` nonzero differences its smallest two-sided p is ``2 / 2^n``: with 5 seeds or
  fewer it can never be below 0.05 (:func:`wilcoxon_min_p`).
* Holm: NaN p-values stay NaN and do not count in m.
* ``seeds_needed``: NaN when the sd of the differences is NaN or 0.
"""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

__all__ = ["t_interval", "paired_test", "holm", "cohens_dz", "paired_power", "seeds_needed",
           "wilcoxon_min_p", "PairedResult", "compare_to_baseline", "min_detectable_diff"]


#: differences within ``ZERO_TOL · (1 + max |value|)`` of zero count as zero (float rounding)
ZERO_TOL = 1e-9


def _finite(values) -> np.ndarray:
    v = np.asarray([x for x in values if x is not None], dtype=float).reshape(-1)
    return v[np.isfinite(v)]


def t_interval(values, conf: float = 0.95) -> tuple[float, float, float]:
    """``(mean, sd, half)``: sample mean, sample sd (ddof=1) and the half-width of the Student-t
    interval ``mean ± t_{(1+conf)/2, n−1} · sd / √n`` (from ``scipy.stats.t.interval``).
    Non-finite values are dropped; sd and half are NaN for n < 2, everything NaN for n = 0."""
    from scipy import stats

    if not 0 < conf < 1:
        raise ValueError(f"conf must be in (0, 1), got {conf}")
    v = _finite(values)
    n = v.size
    if n == 0:
        return float("nan"), float("nan"), float("nan")
    m = float(v.mean())
    if n < 2:
        return m, float("nan"), float("nan")
    sd = float(v.std(ddof=1))
    if sd == 0.0:
        return m, 0.0, 0.0
    lo, hi = stats.t.interval(conf, n - 1, loc=m, scale=sd / math.sqrt(n))
    return m, sd, float((hi - lo) / 2)


def cohens_dz(diffs) -> float:
    """Cohen's ``d_z = mean(d) / sd(d)`` (sd with ddof=1) of paired differences; NaN for n < 2
    or sd = 0. ``d_z · √n`` is the paired t statistic."""
    d = _finite(diffs)
    if d.size < 2:
        return float("nan")
    sd = float(d.std(ddof=1))
    return float(d.mean() / sd) if sd > 0 else float("nan")


def wilcoxon_min_p(n: int) -> float:
    """Smallest attainable two-sided exact Wilcoxon signed-rank p with ``n`` nonzero
    differences: all of one sign, ``2 · (1/2)^n`` (capped at 1)."""
    return min(1.0, 2.0 * 0.5 ** int(n)) if n > 0 else float("nan")


class PairedResult(dict):
    """A dict with keys ``n, mean, sd, ci, ci_low, ci_high, t, p_ttest, p_wilcoxon, d_z``
    (differences ``a − b``; ``ci`` is the half-width)."""


def paired_test(a: Mapping | Sequence, b: Mapping | Sequence, conf: float = 0.95) -> PairedResult:
    """Paired comparison of ``a`` against ``b``.

    ``a``, ``b``: dicts ``{seed: value}`` (paired on the seeds both have; non-finite values are
    dropped pairwise) or equal-length sequences. Returns a :class:`PairedResult` with the mean
    difference ``mean(a − b)``, its sd, the t-interval half-width (``ci``) and bounds, the paired
    t statistic and two-sided p (``scipy.stats.ttest_rel``), the two-sided Wilcoxon signed-rank p
    (``scipy.stats.wilcoxon``, ``zero_method="wilcox"``) and Cohen's ``d_z``; NaN where the module
    docstring's rules say a quantity is undefined.
    """
    from scipy import stats

    if isinstance(a, Mapping) != isinstance(b, Mapping):
        raise ValueError("pass both a and b as {seed: value} dicts or both as sequences")
    if isinstance(a, Mapping):
        keys = sorted(set(a) & set(b))
        x = np.asarray([a[k] for k in keys], dtype=float)
        y = np.asarray([b[k] for k in keys], dtype=float)
    else:
        x, y = np.asarray(a, dtype=float).reshape(-1), np.asarray(b, dtype=float).reshape(-1)
        if x.shape != y.shape:
            raise ValueError(f"paired samples need equal lengths, got {x.size} and {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    d = x - y
    n = int(d.size)
    # rounding noise (0.6 − 0.5 ≠ 0.7 − 0.6 in binary) is not a difference: snap it to zero
    tol = ZERO_TOL * (1.0 + float(np.max(np.abs(np.concatenate([x, y])))) if n else 1.0)
    d = np.where(np.abs(d) <= tol, 0.0, d)
    m, sd, half = t_interval(d, conf)
    nan = float("nan")
    out = PairedResult(n=n, mean=m, sd=sd, ci=half, ci_low=m - half, ci_high=m + half,
                       t=nan, p_ttest=nan, p_wilcoxon=nan, d_z=nan)
    if n < 2:
        return out
    if sd > tol:
        res = stats.ttest_rel(x, y)
        out["t"], out["p_ttest"] = float(res.statistic), float(res.pvalue)
        out["d_z"] = cohens_dz(d)
    else:
        out["sd"], out["ci"], out["ci_low"], out["ci_high"] = 0.0, 0.0, m, m
    if np.any(d != 0):
        out["p_wilcoxon"] = float(stats.wilcoxon(d, zero_method="wilcox").pvalue)
    return out


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in the input order.

    With the m finite p-values sorted ascending, ``p̃_(i) = min(1, max_{j ≤ i} (m − j + 1) p_(j))``.
    Reject H_(i) at level α iff ``p̃_(i) ≤ α`` (this controls the family-wise error rate at α for
    any dependence between the tests). NaN inputs stay NaN and are not counted in m.
    """
    p = np.asarray(list(pvalues), dtype=float)
    out = np.full(p.shape, np.nan)
    idx = np.flatnonzero(np.isfinite(p))
    if (p[idx] < 0).any() or (p[idx] > 1).any():
        raise ValueError("p-values must lie in [0, 1]")
    m = idx.size
    order = idx[np.argsort(p[idx], kind="stable")]
    running = 0.0
    for j, i in enumerate(order):  # j = 0..m-1 -> multiplier m - j
        running = max(running, min(1.0, (m - j) * p[i]))
        out[i] = running
    return [float(v) for v in out]


def paired_power(n: int, delta: float, sd: float, alpha: float = 0.05) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs to detect a true mean difference
    ``delta`` when the differences have sd ``sd``:

    ``power = P(T > t_c) + P(T < −t_c)``, ``T ~ noncentral t(df = n − 1, nc = delta/sd · √n)``,
    ``t_c = t_{1 − α/2, n − 1}`` (``scipy.stats.nct`` / ``scipy.stats.t``).
    """
    from scipy import stats

    if n < 2:
        return float("nan")
    if not sd > 0:
        raise ValueError(f"sd must be > 0, got {sd}")
    df = n - 1
    nc = abs(delta) / sd * math.sqrt(n)  # the power is symmetric in the sign of delta
    tc = stats.t.ppf(1 - alpha / 2, df)
    near = float(stats.nct.sf(tc, df, nc))
    if not math.isfinite(near):
        near = 1.0 - float(stats.nct.cdf(tc, df, nc))
    far = float(stats.nct.sf(tc, df, -nc))  # = P(T < −t_c); scipy can return NaN deep in this tail
    return min(1.0, near + (far if math.isfinite(far) else 0.0))


def seeds_needed(sd: float, delta: float = 0.01, alpha: float = 0.05, power: float = 0.8,
                 max_n: int = 100_000) -> float:
    """Smallest n ≥ 2 with :func:`paired_power` ``(n, delta, sd, alpha) ≥ power``: the number of
    seeds (pairs) a paired study needs to detect a true difference ``delta`` (same unit as
    ``sd``; 0.01 = 1 pp on accuracies in [0, 1]) with that power. NaN when ``sd`` is NaN or 0;
    ``inf`` when even ``max_n`` pairs are not enough."""
    if sd is None or not math.isfinite(sd) or sd <= 0:
        return float("nan")
    if not delta != 0:
        raise ValueError("delta must be nonzero")
    if not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError("alpha and power must be in (0, 1)")
    lo, hi = 2, 2
    while paired_power(hi, delta, sd, alpha) < power:  # exponential search, then bisection
        lo, hi = hi + 1, hi * 2
        if hi > max_n:
            return float("inf")
    while lo < hi:
        mid = (lo + hi) // 2
        if paired_power(mid, delta, sd, alpha) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo


def min_detectable_diff(n: int, sd: float, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference ``delta > 0`` that a two-sided paired t-test with ``n``
    pairs detects with probability ``power`` when the differences have sd ``sd``: the root of
    ``paired_power(n, delta, sd, alpha) = power`` (``scipy.optimize.brentq``). NaN for n < 2 or
    sd NaN / 0."""
    from scipy.optimize import brentq

    if n < 2 or sd is None or not math.isfinite(sd) or sd <= 0:
        return float("nan")
    hi = sd
    while paired_power(n, hi, sd, alpha) < power:
        hi *= 2
    return float(brentq(lambda d: paired_power(n, d, sd, alpha) - power, 0.0, hi, xtol=1e-12 * sd))


def compare_to_baseline(values: Mapping[str, Mapping], baseline: str, conf: float = 0.95,
                        delta: Optional[float] = 0.01) -> dict[str, PairedResult]:
    """Per method ``{seed: value}`` in ``values``: :func:`paired_test` against ``baseline`` for
    every other method, ``p_holm`` (Holm over those comparisons' t-test p-values) and, with
    ``delta``, ``seeds_needed`` at the observed sd of the differences."""
    if baseline not in values:
        raise KeyError(f"baseline '{baseline}' has no results; pass one of {sorted(values)}")
    res = {m: paired_test(v, values[baseline], conf) for m, v in values.items() if m != baseline}
    for m, p in zip(res, holm([r["p_ttest"] for r in res.values()])):
        res[m]["p_holm"] = p
        if delta is not None:
            res[m]["seeds_needed"] = seeds_needed(res[m]["sd"], delta)
    return res


def fmt_p(p) -> str:
    """A p-value for a table: 3 decimals (4 within 0.0005 of 0.05, so that a p just above the
    threshold does not print as 0.050), ``<0.001`` below that, ``—`` when undefined."""
    if p is None or not math.isfinite(p):
        return "—"
    if p < 0.001:
        return "<0.001"
    return f"{p:.4f}" if abs(p - 0.05) < 0.0005 else f"{p:.3f}"
