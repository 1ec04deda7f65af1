"""Score providers: a numeric score per generation, or a tag naming its quantile band (ALT_RM).

``ScoreProvider`` writes the scorer's value (kind ``score``). ``QuantileTagProvider`` turns the
score into one of k tags (kind ``tag``; ``raw`` holds the score as text): with k tags the
reference scores are cut into k equal-count quantile bands, ``tags[0]`` naming the lowest-score
band. Name tags accordingly: for a toxicity scorer the lowest band is the least toxic one.

Banding. A score s is placed by its mid-rank in a reference set R of n scores::

    p = (#{r in R : r < s} + #{r in R : r == s} / 2) / n      band = min(k - 1, floor(p * k))

so n distinct scores spread evenly over the k bands (n = k gives one per band; n = 2k two per
band), and ties always get the same tag whatever their order: a group whose samples all score
the same lands in the middle band ``tags[k // 2]``. With fewer samples than tags the bands used
are spread out symmetrically (3 samples, 5 tags: bands 0, 2, 4; 2 samples: bands 1, 3).

Reference sets, by ``mode``:

- ``per_prompt`` — the samples of the same request (``group_id``) in the batch, as ALT_RM and
  QUARK compute quantiles per prompt. A group of one sample has nothing to compare with and
  falls back to the global window.
- ``global`` — a rolling window of the last ``window`` scores this provider has seen. Each
  batch's scores are appended to the window (in log order) before any of the batch is banded,
  so the first batch seeds the window and banding inside a batch does not depend on order.

- ``fixed`` — no reference set: ``cuts`` (ascending, one fewer than the tags) are absolute
  score thresholds, ``band = #{c in cuts : c <= s}``. Use it when the tag names carry meaning
  the model already knows (``"Very negative"`` for VADER compound below -0.5): quantile bands
  of a skewed score name mildly positive text "Negative", and ALT training on such a label
  then fights what the words already mean to the model.

The window lives in memory: after a restart it is re-seeded from the next batch, so global tags
are relative to recent traffic, not reproducible from the log alone. ``annotate`` must not be
called concurrently on one instance (the annotator never does).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from .base import Annotation, GenerationView
from .scorers import Scorer, check_scorer, make_scorer

Mode = Literal["per_prompt", "global", "fixed"]
MODES: tuple[Mode, ...] = ("per_prompt", "global", "fixed")


def _check_scorer(provider: str, scorer: str) -> None:
    try:
        check_scorer(scorer)
    except ValueError as e:
        raise ValueError(f"provider {provider!r}: {e}") from None


@dataclass(frozen=True, kw_only=True)
class ScoreConfig:
    scorer: str
    provider_name: str

    def __post_init__(self) -> None:
        _check_scorer(self.provider_name, self.scorer)


@dataclass(frozen=True, kw_only=True)
class QuantileConfig:
    scorer: str
    tags: tuple[str, ...]  # lowest-score band first
    mode: Mode
    window: int = 1000
    cuts: tuple[float, ...] = ()  # mode 'fixed': ascending thresholds, len(tags) - 1 of them
    provider_name: str

    def __post_init__(self) -> None:
        where = f"provider {self.provider_name!r}"
        _check_scorer(self.provider_name, self.scorer)
        if len(self.tags) < 2 or len(set(self.tags)) != len(self.tags):
            raise ValueError(f"{where}: tags must be at least 2 distinct strings, got {self.tags}")
        if self.mode not in MODES:
            raise ValueError(f"{where}: unknown mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.window < 1:
            raise ValueError(f"{where}: window must be >= 1, got {self.window}")
        if self.mode == "fixed":
            cuts = self.cuts
            if len(cuts) != len(self.tags) - 1:
                raise ValueError(
                    f"{where}: mode 'fixed' needs cuts, one fewer than the {len(self.tags)} "
                    f"tags; got {len(cuts)}"
                )
            if not all(math.isfinite(c) for c in cuts) or any(
                a >= b for a, b in itertools.pairwise(cuts)
            ):
                raise ValueError(f"{where}: cuts must be finite and strictly ascending: {cuts}")
        elif self.cuts:
            raise ValueError(f"{where}: cuts apply to mode 'fixed' only (mode {self.mode!r})")


def band(score: float, sorted_ref: Sequence[float], k: int) -> int:
    """The quantile band (0 = lowest) of ``score`` among ``sorted_ref`` (ascending, non-empty)
    by mid-rank, as described in the module docstring."""
    below = bisect.bisect_left(sorted_ref, score)
    equal = bisect.bisect_right(sorted_ref, score) - below
    # floor(p * k) in integers: exact at band edges, where float rounding would pick a side.
    return min(k - 1, (2 * below + equal) * k // (2 * len(sorted_ref)))


def _finite(s: float) -> float | str:
    return s if math.isfinite(s) else f"scorer returned {s}"


def score_all(scorer: Scorer, texts: Sequence[str]) -> list[float | str]:
    """A finite score per text, or the error text for that item. A scorer with ``score_batch``
    scores all texts in one call; if that call fails, each text is scored alone so that only
    the texts that fail get an error."""
    score_batch = getattr(scorer, "score_batch", None)
    if score_batch is not None and texts:
        try:
            scores = [float(s) for s in score_batch(list(texts))]
        except Exception:  # retried one by one below, each failure recorded on its own item
            scores = []
        if len(scores) == len(texts):
            return [_finite(s) for s in scores]
    out: list[float | str] = []
    for text in texts:
        try:
            s = float(scorer.score(text))
        except Exception as e:  # a per-item failure is recorded, not retried
            out.append(f"{type(e).__name__}: {e}")
            continue
        out.append(_finite(s))
    return out


async def _scores(scorer: Scorer, batch: Sequence[GenerationView]) -> list[float | str]:
    # Scorers are CPU/GPU-bound: keep the event loop (judge providers' HTTP calls) responsive.
    return await asyncio.to_thread(score_all, scorer, [g.output_text for g in batch])


class ScoreProvider:
    """A ``Provider`` writing ``scorer(output_text)`` as a ``score`` annotation."""

    def __init__(self, config: ScoreConfig) -> None:
        self.config = config
        self.name = config.provider_name
        self._scorer = make_scorer(config.scorer)

    async def annotate(self, batch: Sequence[GenerationView]) -> list[Annotation]:
        out = []
        for g, s in zip(batch, await _scores(self._scorer, batch), strict=True):
            if isinstance(s, str):
                out.append(Annotation(g.id, self.name, "score", None, error=s))
            else:
                out.append(Annotation(g.id, self.name, "score", s))
        return out


class QuantileTagProvider:
    """A ``Provider`` tagging each generation with its score's quantile band (module docstring)."""

    def __init__(self, config: QuantileConfig) -> None:
        self.config = config
        self.name = config.provider_name
        self._scorer = make_scorer(config.scorer)
        self._window: deque[float] = deque(maxlen=config.window)

    @property
    def window(self) -> tuple[float, ...]:
        """The scores of the global reference window, oldest first."""
        return tuple(self._window)

    async def annotate(self, batch: Sequence[GenerationView]) -> list[Annotation]:
        return self.tag(batch, await _scores(self._scorer, batch))

    def tag(
        self, batch: Sequence[GenerationView], scores: Sequence[float | str]
    ) -> list[Annotation]:
        """Tag ``batch`` given its ``scores`` (floats, or error texts), updating the window."""
        ok = [s for s in scores if not isinstance(s, str)]
        self._window.extend(ok)
        global_ref = sorted(self._window)
        groups: dict[str, list[float]] = {}
        if self.config.mode == "per_prompt":
            for g, s in zip(batch, scores, strict=True):
                if not isinstance(s, str):
                    groups.setdefault(g.group_id, []).append(s)
        refs = {gid: sorted(v) for gid, v in groups.items() if len(v) > 1}
        tags = self.config.tags
        out = []
        for g, s in zip(batch, scores, strict=True):
            if isinstance(s, str):
                out.append(Annotation(g.id, self.name, "tag", None, error=s))
                continue
            if self.config.mode == "fixed":
                k = bisect.bisect_right(self.config.cuts, s)
            else:
                k = band(s, refs.get(g.group_id, global_ref), len(tags))
            out.append(Annotation(g.id, self.name, "tag", tags[k], raw=repr(s)))
        return out
