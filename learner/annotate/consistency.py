"""How far a pairwise judge can be trusted, read from what it stored.

Order consistency: the pairwise judge asks every pair in both orders and stores a tie exactly
when the two orders disagree (``judge.LLMJudge._pair``), so the rate is the share of its
error-free verdicts that are not ties. A judge that always names the first position scores 0,
one that sees through the order 1.

Agreement with an offline scorer: over the judge's decisive verdicts whose two generations both
have a different ``score`` annotation from ``scorer``, the share where the judge's winner has the
higher score (near 0 means the two disagree systematically, e.g. a scorer where lower is better).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import sqlite_utils

from tiller.server.formats.logstore import annotation_counts, annotation_values


@dataclass(frozen=True)
class OrderConsistency:
    provider: str
    verdicts: int  # error-free pairwise judgements
    consistent: int  # of which both orders named the same generation
    errors: int  # error annotations (faults, answers naming no option)

    @property
    def rate(self) -> float | None:
        return self.consistent / self.verdicts if self.verdicts else None


@dataclass(frozen=True)
class ScorerAgreement:
    judge: str
    scorer: str
    compared: int  # decisive verdicts on pairs the scorer separates
    agreeing: int  # of which the judge's winner scored higher

    @property
    def rate(self) -> float | None:
        return self.agreeing / self.compared if self.compared else None


def _winners(db: sqlite_utils.Database, provider: str) -> list[tuple[str, str, str]]:
    """``(generation a, generation b, winner)`` of ``provider``'s error-free verdicts."""
    out = []
    for a, b, value in annotation_values(db, provider, "preference"):
        if isinstance(value, dict) and value.get("winner") in ("a", "b", "tie"):
            out.append((a, b, str(value["winner"])))
    return out


def order_consistency(db: sqlite_utils.Database, provider: str) -> OrderConsistency:
    """The both-order agreement of pairwise judge ``provider`` over everything it stored."""
    verdicts = _winners(db, provider)
    total = annotation_counts(db).get(provider, 0)
    consistent = sum(w != "tie" for _, _, w in verdicts)
    return OrderConsistency(provider, len(verdicts), consistent, total - len(verdicts))


def scorer_agreement(db: sqlite_utils.Database, judge: str, scorer: str) -> ScorerAgreement:
    """How often pairwise ``judge``'s decisive verdicts agree with ``scorer``'s scores."""
    scores = {
        gid: float(v)
        for gid, _, v in annotation_values(db, scorer, "score")
        if isinstance(v, (int, float))
    }
    compared = agreeing = 0
    for a, b, winner in _winners(db, judge):
        if winner == "tie" or a not in scores or b not in scores or scores[a] == scores[b]:
            continue
        compared += 1
        agreeing += (scores[a] > scores[b]) == (winner == "a")
    return ScorerAgreement(judge, scorer, compared, agreeing)


def judge_report(db: sqlite_utils.Database, annotator: Mapping[str, Any]) -> dict[str, Any]:
    """For ``report.json``: per pairwise ``llm_judge`` provider of ``annotator`` (the annotator
    config as a mapping, as ``tiller align`` holds it), its order consistency and its agreement
    with each ``score`` provider of the same config. Empty when there is no pairwise judge."""
    providers = [p for p in annotator.get("providers", []) if isinstance(p, Mapping)]
    judges = [
        str(p["name"])
        for p in providers
        if p.get("type") == "llm_judge" and p.get("mode") == "pairwise" and "name" in p
    ]
    scorers = [str(p["name"]) for p in providers if p.get("type") == "score" and "name" in p]
    out: dict[str, Any] = {}
    for name in judges:
        oc = order_consistency(db, name)
        entry: dict[str, Any] = {
            "verdicts": oc.verdicts,
            "consistent": oc.consistent,
            "order_consistency": oc.rate,
            "errors": oc.errors,
        }
        agreement = {}
        for s in scorers:
            sa = scorer_agreement(db, name, s)
            agreement[s] = {"compared": sa.compared, "agreeing": sa.agreeing, "rate": sa.rate}
        if agreement:
            entry["scorer_agreement"] = agreement
        out[name] = entry
    return out
