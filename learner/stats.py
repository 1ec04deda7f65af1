"""The Student-t interval shared by the eval gate and the held-out evaluation, and the blocks
that samples of one prompt form."""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Sequence


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


def block_means(values: Sequence[float], keys: Sequence[Hashable]) -> list[float]:
    """The mean of ``values`` per key, in first-seen order: samples of one held-out prompt are
    not independent, so tests treat each prompt as one block. No keys: one block per value."""
    if not keys:
        return list(values)
    if len(keys) != len(values):
        raise ValueError(f"{len(keys)} block keys for {len(values)} values")
    by_key: dict[Hashable, list[float]] = {}
    for key, v in zip(keys, values, strict=True):
        by_key.setdefault(key, []).append(v)
    return [statistics.fmean(vs) for vs in by_key.values()]


def paired_test(
    x: Sequence[float], y: Sequence[float], keys: Sequence[Hashable] = ()
) -> dict[str, float]:
    """``x − y`` paired by position, averaged per key block first (``block_means``): the mean
    difference, its 95% half-width, the two-sided one-sample t-test on the block differences
    (``t``, ``p``; nan with fewer than two blocks) and the number of blocks."""
    from scipy import stats

    d = block_means([a - b for a, b in zip(x, y, strict=True)], keys)
    m, h = mean_halfwidth(d, 0.975)
    t = p = math.nan
    if len(d) > 1:
        r = stats.ttest_1samp(d, 0.0)
        t, p = float(r.statistic), float(r.pvalue)
    return {"mean": m, "ci95": h, "t": t, "p": p, "blocks": len(d)}
