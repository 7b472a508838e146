"""Intervals over training seeds and volumes: what a difference between two configurations is worth
when each was trained several times.

A study with replicates evaluates every configuration ``c`` under training seeds ``s = 1..S`` on the
same held-out volumes ``v = 1..V``, so a per-volume metric is a table ``m[c, s, v]``. Differences
between two configurations are paired by seed (the same data order and masks) and by volume:
``d[s, v] = m[a, s, v] - m[b, s, v]``. Their mean ``d̄`` varies with the training seeds (what another
run of the same recipe would give) and with the volumes (what other volumes of the same kind would
give). With the model ``d[s, v] = μ + α_s + β_v + ε_sv``,

    Var(d̄) = σ_α²/S + σ_β²/V + σ_ε²/(SV),

estimated (conservatively: the interaction term counts twice) by

    SE² = a + b,   a = var_s(mean_v d[s, ·]) / S,   b = var_v(mean_s d[·, v]) / V,

with Welch–Satterthwaite's degrees of freedom ``(a + b)² / (a²/(S-1) + b²/(V-1))`` (a term with one
level, S = 1 or V = 1, is left out). The interval is ``d̄ ± t_{0.975, df} · SE``. With one seed this
is the paired standard error over volumes the reports have always given, now with its t quantile;
with one volume it is the plain Student-t interval over seeds.

Pure NumPy and :mod:`math`; the t quantile is computed here (no SciPy at run time) and tested
against SciPy's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95


def t_cdf(t: float, df: float) -> float:
    """Student-t distribution function at ``t`` with ``df > 0`` (real) degrees of freedom, through the
    regularised incomplete beta function ``I_x(df/2, 1/2)`` with ``x = df / (df + t²)``."""
    if df <= 0 or not math.isfinite(df):
        raise ValueError(f"degrees of freedom must be positive and finite, got {df}")
    x = df / (df + t * t)
    tail = 0.5 * _betainc(df / 2.0, 0.5, x)
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (0 < p < 1) of Student's t with ``df`` degrees of freedom, by bisection
    of :func:`t_cdf` to 1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2.0
    while hi - lo > 1e-12 * max(1.0, hi):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return 0.5 * (lo + hi)


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)`` by its continued fraction (Numerical Recipes' betacf,
    modified Lentz), using the symmetry ``I_x(a, b) = 1 - I_{1-x}(b, a)`` where it converges faster."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x > (a + 1.0) / (a + b + 2.0):
        return 1.0 - front * _betacf(b, a, 1.0 - x) / b
    return front * _betacf(a, b, x) / a


def _betacf(a: float, b: float, x: float) -> float:
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided ``LEVEL`` interval ``mean ± half``: ``se`` its standard error, ``df``
    the degrees of freedom of the t quantile, ``seeds`` and ``volumes`` the levels it is over."""

    mean: float
    se: float
    df: float
    half: float
    seeds: int
    volumes: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    def excludes_zero(self) -> bool:
        return math.isfinite(self.half) and (self.low > 0 or self.high < 0)

    def text(self, spec: str) -> str:
        """``"+0.0123 ± 0.0045"`` (the half-width of the interval), or just the mean without one."""
        value = format(self.mean, spec)
        return f"{value} ± {format(self.half, spec.lstrip('+'))}" if math.isfinite(self.half) else value


def interval(values: np.ndarray, level: float = LEVEL) -> Interval:
    """The mean of ``values`` ``(S, V)`` (seeds × volumes; NaN-free) with the interval of the module
    docstring. A paired difference is passed as the difference of two such tables."""
    d = np.asarray(values, dtype=np.float64)
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"expected a non-empty (seeds, volumes) table, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("the table holds a missing or non-finite value")
    s, v = d.shape
    a = float(d.mean(axis=1).var(ddof=1)) / s if s > 1 else 0.0
    b = float(d.mean(axis=0).var(ddof=1)) / v if v > 1 else 0.0
    parts = [(x, n - 1) for x, n in ((a, s), (b, v)) if n > 1]
    se = math.sqrt(a + b)
    if not parts:
        return Interval(float(d.mean()), math.nan, math.nan, math.nan, s, v)
    denominator = sum(x * x / dof for x, dof in parts)
    df = (a + b) ** 2 / denominator if denominator > 0 else float(sum(dof for _, dof in parts))
    half = t_quantile(0.5 + level / 2.0, df) * se if se > 0 else 0.0
    return Interval(float(d.mean()), se, df, half, s, v)


def ratio_interval(a: np.ndarray, b: np.ndarray, level: float = LEVEL) -> Interval:
    """The ratio of means ``R = mean(a) / mean(b)`` of two paired ``(S, V)`` tables (two configurations
    under the same seeds on the same volumes; ``mean(b) > 0``) with its interval by the ratio
    estimator's linearisation: :func:`interval` of ``a - R b``, divided by ``mean(b)``. A relative
    change is ``R - 1`` with the same half-width. Unlike ``interval(a - b) / mean(b)``, this counts the
    denominator's own variation over seeds and volumes."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"the tables are not paired: shapes {a.shape} and {b.shape}")
    scale = float(b.mean()) if b.size else math.nan
    if not scale > 0:
        raise ValueError(f"the denominator's mean must be positive, got {scale}")
    r = float(a.mean()) / scale
    spread = interval(a - r * b, level)
    return Interval(r, spread.se / scale, spread.df, spread.half / scale, spread.seeds, spread.volumes)


__all__ = ["LEVEL", "Interval", "interval", "ratio_interval", "t_cdf", "t_quantile"]
