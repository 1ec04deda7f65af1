"""The Student-t interval shared by the eval gate and the held-out evaluation."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def mean_halfwidth(values: Sequence[float], quantile: float) -> tuple[float, float]:
    """Mean of ``values`` and ``t(quantile, n-1) × sem``: the half-width of a two-sided
    interval for ``quantile=0.975`` (95%), the one-sided margin for ``quantile=level``;
    ``inf`` with fewer than two values."""
    from scipy import stats

    m = statistics.fmean(values)
    if len(values) < 2:
        return m, math.inf
    sem = statistics.stdev(values) / math.sqrt(len(values))
    return m, float(stats.t.ppf(quantile, len(values) - 1) * sem)
