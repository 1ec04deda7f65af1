"""Preference pairs from the generation log: judge verdicts, score gaps, and app preferences.

Three builders, one per kind of evidence; each returns ``PreferencePair`` values in log order:

- ``judge_pairs``: pairwise judge annotations (``kind='preference'``, generation ``a`` =
  ``generation_id``, ``b`` = ``generation_id_b``). Ties are dropped. With ``p_a`` in the value,
  ``label_confidence`` is the winner's probability, floored at 0.5 (a verdict is never weaker
  than a coin flip; the two-order judge can disagree slightly with its own mean probability).
- ``score_pairs``: samples of one request (``group_id``) whose scores from one provider differ by
  at least ``min_margin``; every such pair (``pairing='all'``) or only best vs worst.
- ``feedback_pairs``: app feedback rows carrying ``chosen_id`` / ``rejected_id``. Exact repeats
  count once; a pair also given the other way round is contradictory and dropped.

Every pair's ``prompt`` is the generations' ``rendered_prompt`` (what the policy saw). A pair
is skipped, and the reason counted in ``skipped`` when the caller passes a ``Counter``, when a
generation is missing, the two rendered prompts differ, the completions are identical, a
generation is truncated and ``allow_truncated`` is off, or a value is malformed. Annotation
rows with an ``error`` are never used.

Every pair carries the ids of its two generations (``chosen_id`` / ``rejected_id``); ``source``
is a human-readable provenance string, never read back. The log is read through the store API
(``tiller.server.formats.logstore``); all functions only read, safe on a log being written (WAL).
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations
from typing import Any, Literal

import sqlite_utils

from tiller.server.formats.logstore import (
    GenerationView,
    annotation_values,
    feedback_preferences,
    generations_by_id,
)

from .examples import PreferencePair

Pairing = Literal["all", "best_worst"]


def is_truncated(g: GenerationView) -> bool:
    """Stopped by the token limit (``finish_reason='length'``) rather than by the model."""
    return g.finish_reason == "length"


def count_skip(skipped: Counter[str] | None, reason: str, n: int = 1) -> None:
    """Add ``n`` to ``skipped[reason]`` when the caller asked for skip counts."""
    if skipped is not None and n:
        skipped[reason] += n


def keep(out: list[PreferencePair], p: PreferencePair | str, skipped: Counter[str] | None) -> None:
    """Append a pair, or count the reason (a ``make_pair`` slug) it could not be one."""
    if isinstance(p, str):
        count_skip(skipped, p)
    else:
        out.append(p)


def make_pair(
    chosen: GenerationView,
    rejected: GenerationView,
    *,
    source: str,
    label_confidence: float = 1.0,
    attribute_weights: tuple[tuple[str, float], ...] = (),
    allow_truncated: bool = True,
) -> PreferencePair | str:
    """A pair of two logged generations, or the reason it cannot be one (a short slug)."""
    if chosen.rendered_prompt != rejected.rendered_prompt:
        return "prompt_mismatch"
    if chosen.output_text == rejected.output_text:
        return "identical"
    if not allow_truncated and (is_truncated(chosen) or is_truncated(rejected)):
        return "truncated"
    return PreferencePair(
        prompt=chosen.rendered_prompt,
        chosen=chosen.output_text,
        rejected=rejected.output_text,
        attribute_weights=attribute_weights,
        label_confidence=label_confidence,
        source=source,
        chosen_id=chosen.id,
        rejected_id=rejected.id,
    )


# ------------------------------------------------------------------------------ judge verdicts


def verdict(value: Any, tie_margin: float | None = None) -> tuple[bool, float] | str:
    """``(a_wins, label_confidence)`` from a preference value, or a skip reason.

    ``tie_margin``: a tie (the two orders disagreed) with a ``p_a`` at least this far from 0.5
    is decided by ``p_a``, the order-averaged probability that A is better. A judge whose every
    answer follows the position (a small model) makes every verdict a tie; its order-averaged
    probabilities still carry the preference, with the position bias cancelled."""
    if not isinstance(value, dict) or value.get("winner") not in ("a", "b", "tie"):
        return "malformed"
    p_a = value.get("p_a")
    if p_a is not None and (
        isinstance(p_a, bool) or not isinstance(p_a, int | float) or not 0.0 <= p_a <= 1.0
    ):
        return "malformed"
    if value["winner"] == "tie":
        if p_a is None or tie_margin is None or abs(float(p_a) - 0.5) < tie_margin:
            return "tie"
        return float(p_a) > 0.5, max(float(p_a), 1.0 - float(p_a))
    a_wins = value["winner"] == "a"
    if p_a is None:
        return a_wins, 1.0
    p_winner = float(p_a) if a_wins else 1.0 - float(p_a)
    return a_wins, max(0.5, p_winner)


def judge_rows(
    db: sqlite_utils.Database, provider: str
) -> list[tuple[GenerationView | None, GenerationView | None, Any]]:
    """``(a, b, value)`` for each of ``provider``'s pairwise verdicts, in log order; a generation
    the log does not hold is None."""
    rows = [r for r in annotation_values(db, provider, "preference") if r[1]]
    gens = generations_by_id(db, (i for r in rows for i in r[:2]))
    return [(gens.get(a), gens.get(b), value) for a, b, value in rows]


def pair_from_verdict(
    a: GenerationView | None,
    b: GenerationView | None,
    value: Any,
    *,
    source_prefix: str,
    allow_truncated: bool = True,
    tie_margin: float | None = None,
) -> PreferencePair | str:
    """The pair one verdict row yields (``source = "<prefix>:<chosen>><rejected>"``), or a skip
    reason: ``missing_generation``, ``malformed``, ``tie``, or one of ``make_pair``'s."""
    if a is None or b is None:
        return "missing_generation"
    v = verdict(value, tie_margin)
    if isinstance(v, str):
        return v
    a_wins, confidence = v
    chosen, rejected = (a, b) if a_wins else (b, a)
    return make_pair(
        chosen,
        rejected,
        source=f"{source_prefix}:{chosen.id}>{rejected.id}",
        label_confidence=confidence,
        allow_truncated=allow_truncated,
    )


def judge_pairs(
    db: sqlite_utils.Database,
    provider: str,
    *,
    allow_truncated: bool = True,
    skipped: Counter[str] | None = None,
    tie_margin: float | None = None,
) -> list[PreferencePair]:
    """Pairs from ``provider``'s pairwise verdicts (module docstring; ``tie_margin``: see
    ``verdict``). Source: ``judge:<provider>:<chosen id>><rejected id>``."""
    out: list[PreferencePair] = []
    for a, b, value in judge_rows(db, provider):
        p = pair_from_verdict(
            a,
            b,
            value,
            source_prefix=f"judge:{provider}",
            allow_truncated=allow_truncated,
            tie_margin=tie_margin,
        )
        keep(out, p, skipped)
    return out


# ------------------------------------------------------------------------------ score gaps


def score_pairs(
    db: sqlite_utils.Database,
    provider: str,
    *,
    higher_is_better: bool,
    min_margin: float = 0.0,
    pairing: Pairing = "all",
    allow_truncated: bool = True,
    skipped: Counter[str] | None = None,
) -> list[PreferencePair]:
    """Pairs of samples of one request ranked by ``provider``'s ``score`` annotations.

    ``higher_is_better`` says which way the score points (False for toxicity). Two samples
    form a pair when their scores differ by at least ``min_margin`` (and are never equal).
    ``pairing='all'``: every qualifying pair of the group, in sample order; ``'best_worst'``:
    one pair, the best against the worst sample. Groups come in log order. Source:
    ``score:<provider>:<chosen id>><rejected id>``.
    """
    if min_margin < 0 or not math.isfinite(min_margin):
        raise ValueError(f"min_margin must be a finite number >= 0, got {min_margin}")
    if pairing not in ("all", "best_worst"):
        raise ValueError(f"pairing {pairing!r} is not one of: all, best_worst")
    scores: dict[str, float] = {}
    for gid, _, value in annotation_values(db, provider, "score"):
        if isinstance(value, bool) or not isinstance(value, int | float):
            count_skip(skipped, "malformed")
        elif math.isfinite(value):
            scores[gid] = float(value) if higher_is_better else -float(value)
    gens = generations_by_id(db, scores)
    count_skip(skipped, "missing_generation", len(scores) - len(gens))
    groups: dict[str, list[GenerationView]] = {}
    for g in sorted(gens.values(), key=lambda g: g.seq):
        groups.setdefault(g.group_id, []).append(g)
    out: list[PreferencePair] = []
    for members in groups.values():
        members.sort(key=lambda g: g.sample_index)
        if pairing == "best_worst":
            ranked = sorted(members, key=lambda g: scores[g.id])
            candidates = [(ranked[-1], ranked[0])] if len(ranked) > 1 else []
        else:
            candidates = list(combinations(members, 2))
        for x, y in candidates:
            gap = scores[x.id] - scores[y.id]
            if gap == 0 or abs(gap) < min_margin:
                count_skip(skipped, "small_margin")
                continue
            chosen, rejected = (x, y) if gap > 0 else (y, x)
            p = make_pair(
                chosen,
                rejected,
                source=f"score:{provider}:{chosen.id}>{rejected.id}",
                allow_truncated=allow_truncated,
            )
            keep(out, p, skipped)
    return out


# ------------------------------------------------------------------------------ app preferences


def feedback_pairs(
    db: sqlite_utils.Database,
    *,
    allow_truncated: bool = True,
    skipped: Counter[str] | None = None,
) -> list[PreferencePair]:
    """Pairs from app feedback rows with ``chosen_id`` and ``rejected_id``, in log order of the
    first row naming each pair. Source: ``feedback:<first feedback id>``."""
    first: dict[tuple[str, str], str] = {}
    for row in feedback_preferences(db):
        key = (row.chosen_id, row.rejected_id)
        if key in first:
            count_skip(skipped, "duplicate")
        else:
            first[key] = row.feedback_id
    gens = generations_by_id(db, (i for key in first for i in key))
    out: list[PreferencePair] = []
    for (chosen_id, rejected_id), fb_id in first.items():
        if (rejected_id, chosen_id) in first:
            count_skip(skipped, "contradictory")
            continue
        chosen, rejected = gens.get(chosen_id), gens.get(rejected_id)
        if chosen is None or rejected is None:
            count_skip(skipped, "missing_generation")
            continue
        p = make_pair(chosen, rejected, source=f"feedback:{fb_id}", allow_truncated=allow_truncated)
        keep(out, p, skipped)
    return out
