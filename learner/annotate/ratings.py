"""Likert ratings from offline scorers: one rating per steering attribute (CMPO's parameterized
feedback, written as a ``likert`` annotation ``{attribute: rating}``).

Each attribute names a scorer and absolute ``cuts`` (ascending): the rating is
``1 + #{c in cuts : c <= s}`` (1 .. len(cuts) + 1), or that many counted from the top when
``higher_is_better`` is false, so a higher rating always means "more of the attribute".
Example: ``critical`` from the sentiment scorer, lower is better, cuts -0.5/-0.05/0.05/0.5:
a compound of -0.7 rates 5, one of +0.7 rates 1. A scorer error on any attribute is the
annotation's error (a partial rating would read as a preference on the others only).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .base import Annotation, GenerationView
from .quantile import score_all
from .scorers import Scorer, check_scorer, make_scorer


@dataclass(frozen=True, kw_only=True)
class RatedAttribute:
    name: str
    scorer: str
    cuts: tuple[float, ...]
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "cuts", tuple(float(c) for c in self.cuts))

    def rating(self, score: float) -> int:
        up = bisect.bisect_right(self.cuts, score)
        return 1 + (up if self.higher_is_better else len(self.cuts) - up)


@dataclass(frozen=True, kw_only=True)
class RatingConfig:
    provider_name: str
    attributes: tuple[RatedAttribute, ...]

    def __post_init__(self) -> None:
        where = f"provider {self.provider_name!r}"
        names = [a.name for a in self.attributes]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{where}: attributes must be distinct names, at least one")
        for a in self.attributes:
            try:
                check_scorer(a.scorer)
            except ValueError as e:
                raise ValueError(f"{where}: attribute {a.name!r}: {e}") from None
            ok = all(math.isfinite(c) for c in a.cuts) and all(
                x < y for x, y in itertools.pairwise(a.cuts)
            )
            if not a.cuts or not ok:
                raise ValueError(
                    f"{where}: attribute {a.name!r}: cuts must be finite, strictly ascending "
                    f"and at least one; got {a.cuts}"
                )

    @classmethod
    def parse(cls, raw: Mapping[str, Any], where: str) -> RatingConfig:
        """From a provider table: ``name`` and ``[[attributes]]`` tables (name, scorer, cuts,
        higher_is_better); unknown keys are a ``ValueError`` naming ``where``."""
        from .config import build_section

        d = dict(raw)
        attrs = d.get("attributes")
        if not isinstance(attrs, list):
            raise ValueError(f"{where}: attributes must be a list of tables")
        built = []
        for i, a in enumerate(attrs):
            at = f"{where}: attributes[{i}]"
            missing = [k for k in ("name", "scorer") if k not in a]
            if missing:
                raise ValueError(f"{at} needs {missing[0]}")
            built.append(build_section(RatedAttribute, a, at))
        d |= {"provider_name": d.pop("name", ""), "attributes": tuple(built)}
        return build_section(cls, d, where)


def _rate_all(
    attrs: Sequence[RatedAttribute], scorers: Sequence[Scorer], texts: Sequence[str]
) -> list[dict[str, int] | str]:
    """Per text: its ratings, or the first failing attribute's error (``quantile.score_all``
    scores each attribute with the per-item error handling every score provider uses)."""
    columns = [score_all(scorer, texts) for scorer in scorers]
    out: list[dict[str, int] | str] = []
    for row in zip(*columns, strict=True):
        failed = [f"{a.name}: {s}" for a, s in zip(attrs, row, strict=True) if isinstance(s, str)]
        out.append(
            failed[0] if failed else {a.name: a.rating(s) for a, s in zip(attrs, row, strict=True)}
        )
    return out


class RatingProvider:
    """A ``Provider`` writing one ``likert`` annotation ``{attribute: rating}`` per generation."""

    def __init__(self, config: RatingConfig) -> None:
        self.config = config
        self.name = config.provider_name
        self._scorers = [make_scorer(a.scorer) for a in config.attributes]

    async def annotate(self, batch: Sequence[GenerationView]) -> list[Annotation]:
        texts = [g.output_text for g in batch]
        # Scorers are CPU-bound: keep the event loop (judge providers' HTTP calls) responsive.
        rated = await asyncio.to_thread(_rate_all, self.config.attributes, self._scorers, texts)
        out = []
        for g, r in zip(batch, rated, strict=True):
            if isinstance(r, str):
                out.append(Annotation(g.id, self.name, "likert", None, error=r))
            else:
                out.append(Annotation(g.id, self.name, "likert", r))
        return out
