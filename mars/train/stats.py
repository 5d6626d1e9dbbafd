"""Statistics of ``mars train --compare``: paired differences over seeds with 95% intervals.

Two methods run on the same seeds (same warm start, same prompts); per seed s a metric gives
``a[s]`` (the method with anchors) and ``b[s]`` (its baseline), and the question is the mean
of ``d = a - b``. :func:`paired_difference` reports it with two 95% confidence intervals:

* Student t: ``mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)`` (``scipy.stats.t``);
* paired bootstrap percentile: resample the seeds (pairs kept together) ``n_boot`` times
  with a fixed numpy generator, take the 2.5 / 97.5 percentiles of the resampled means.

With fewer than two seeds, or a constant ``d``, the t interval is the point (``sd = 0``) or
undefined (``None``, n = 1). An interval that excludes 0 is what "MARS helps" (or hurts)
means here; one that contains 0 says the seeds cannot tell the methods apart.

Also: :func:`steps_to_reach` (the first evaluated step at which a curve reaches a level,
``None`` if never) and :func:`curve_area` (mean of a piecewise-linear curve over its step
range: the normalised area under the held-out accuracy curve).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = ["paired_difference", "steps_to_reach", "curve_area", "mean_band"]


def _finite(name: str, xs: Sequence[float]) -> np.ndarray:
    a = np.asarray(list(xs), dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected a flat sequence of numbers, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"{name}: values must be finite, got {a.tolist()}")
    return a


def paired_difference(a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95, n_boot: int = 10000,
                      seed: int = 0) -> dict:
    """Mean of ``a[i] - b[i]`` over the pairs, with a t and a paired-bootstrap interval.

    a, b: one value per seed, in the same seed order (equal lengths, finite, at least one).
    Returns {"n", "mean", "sd", "ci_t": [lo, hi] or None, "ci_boot": [lo, hi],
    "wins", "losses", "ties"} (wins: pairs with a > b), all plain Python numbers."""
    x, y = _finite("a", a), _finite("b", b)
    if len(x) != len(y):
        raise ValueError(f"paired values need equal lengths, got {len(x)} and {len(y)}")
    if len(x) == 0:
        raise ValueError("paired_difference needs at least one pair")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    d = x - y
    n = len(d)
    mean = float(d.mean())
    sd = float(d.std(ddof=1)) if n > 1 else 0.0
    alpha = 1.0 - confidence
    ci_t = None
    if n > 1:
        from scipy.stats import t as student_t

        half = float(student_t.ppf(1 - alpha / 2, n - 1)) * sd / math.sqrt(n)
        ci_t = [mean - half, mean + half]
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, n, size=(n_boot, n))].mean(axis=1)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return {"n": n, "mean": mean, "sd": sd, "ci_t": ci_t, "ci_boot": [float(lo), float(hi)],
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "ties": int((d == 0).sum())}


def steps_to_reach(steps: Sequence[int], values: Sequence[float], level: float):
    """The first of ``steps`` whose value is >= ``level`` (None if no value reaches it)."""
    if len(steps) != len(values):
        raise ValueError(f"{len(steps)} steps but {len(values)} values")
    for s, v in zip(steps, values):
        if v is not None and v >= level:
            return s
    return None


def curve_area(steps: Sequence[float], values: Sequence[float]) -> float:
    """Mean of the piecewise-linear curve through (steps, values) over [steps[0], steps[-1]]
    (trapezoids divided by the step range); a single point is its value. Steps must increase."""
    s, v = _finite("steps", steps), _finite("values", values)
    if len(s) != len(v) or len(s) == 0:
        raise ValueError(f"curve_area needs as many values as steps (at least one), got {len(s)} and {len(v)}")
    if len(s) == 1:
        return float(v[0])
    if (np.diff(s) <= 0).any():
        raise ValueError(f"curve_area: steps must increase, got {s.tolist()}")
    return float(((v[1:] + v[:-1]) / 2 * np.diff(s)).sum() / (s[-1] - s[0]))


def mean_band(curves: Sequence[Sequence[float]], confidence: float = 0.95):
    """Pointwise mean and t interval of the mean over curves (truncated to the shortest).
    Returns (mean, lo, hi) as numpy arrays; with one curve lo = hi = mean."""
    n_pts = min(len(c) for c in curves)
    m = np.asarray([list(c)[:n_pts] for c in curves], dtype=np.float64)
    mean = m.mean(axis=0)
    if len(m) < 2:
        return mean, mean.copy(), mean.copy()
    from scipy.stats import t as student_t

    half = student_t.ppf(1 - (1 - confidence) / 2, len(m) - 1) * m.std(axis=0, ddof=1) / math.sqrt(len(m))
    return mean, mean - half, mean + half
