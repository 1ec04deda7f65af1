"""CMPO data: per-attribute Likert ratings -> preference pairs with attribute weight vectors.

Thesis (CMPO, §3.2.2): the dataset holds prompts, k sampled outputs each and *parameterized*
feedback (a rating per steering attribute). It is converted to ``D_{≻;A}``, the output pairs
``(y_c, y_r)`` with ``y_c ≻_a y_r`` for some attribute a, and then to ``D_{≻;A;Λ}``: for a
preference relation ``y ≻ y'`` take ``A_≻ = {a_j : y ≻_{a_j} y'}`` and, for every set S in its
power set, emit ``(x, y, y', Λ)`` with ``λ_j = |S|^-1`` for ``a_j ∈ S`` and 0 otherwise (Eq 3.2).

What this module implements, exactly:

- The k outputs of a prompt are the samples of one request (``group_id``) that carry an
  error-free ``likert`` annotation (value ``{attribute: rating}``) from ``provider``. Every
  unordered pair of them is compared, in ``sample_index`` order.
- ``y ≻_a y'`` iff both are rated on a and ``rating(y)[a] > rating(y')[a]``. Equal ratings, an
  attribute missing from either rating, a non-numeric rating, and attributes outside
  ``attributes`` give no preference on that attribute.
- Both directions of a pair are used: ``A_≻`` for (y over y') and ``A_≺`` for (y' over y). A pair
  with mixed preferences therefore yields pairs both ways, on disjoint attribute sets.
- For each direction, every **non-empty** subset S of its attribute set yields one
  ``PreferencePair`` with ``attribute_weights`` listing *every* steering attribute in the order
  of ``attributes`` (zeros included): ``1/|S|`` inside S, ``0.0`` outside. The empty set of
  the power set is left out: its all-zero vector conditions on nothing and has no preference.
  Subsets come by size, then in ``attributes`` order (``itertools.combinations``).
- ``max_subset_size`` (not in the thesis; None = the full power set) caps |S|, because the
  power set grows as 2^|A_≻| (the thesis used 10 attributes: up to 1023 pairs per direction).
- ``label_confidence`` is 1: CMPO's label smoothing ε belongs to the objective (Eq 3.3).
- Not implemented: the negative-weight (Eq A.1) and rating-ratio (Eq A.2) variants from the
  appendix, and the plural model itself (Eq 3.1, the trainer's business).

Prompts are the generations' ``rendered_prompt``; each pair carries ``chosen_id`` /
``rejected_id``, and ``source`` (provenance, for people) is
``cmpo:<provider>:<chosen id>><rejected id>:<attr+attr>``. Read-only on the log.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any

import sqlite_utils

from tiller.server.formats.logstore import GenerationView, annotation_values, generations_by_id

from .examples import PreferencePair
from .pairs import count_skip, keep, make_pair

Weights = tuple[tuple[str, float], ...]


def preferred_on(
    better: Mapping[str, Any], worse: Mapping[str, Any], attributes: Sequence[str]
) -> tuple[str, ...]:
    """The attributes (in ``attributes`` order) on which ``better`` is rated strictly higher."""
    won = []
    for a in attributes:
        hi, lo = _rating(better.get(a)), _rating(worse.get(a))
        if hi is not None and lo is not None and hi > lo:
            won.append(a)
    return tuple(won)


def _rating(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


def power_set_weights(
    won: Sequence[str], attributes: Sequence[str], max_subset_size: int | None = None
) -> list[Weights]:
    """Eq 3.2: one weight vector per non-empty subset S of ``won`` (|S| <= ``max_subset_size``),
    over all ``attributes`` in order: ``1/|S|`` for attributes in S, ``0.0`` for the others."""
    unknown = [a for a in won if a not in attributes]
    if unknown:
        raise ValueError(f"attributes {unknown} are not steering attributes: {list(attributes)}")
    top = len(won) if max_subset_size is None else min(len(won), max_subset_size)
    out = []
    for size in range(1, top + 1):
        for subset in combinations(won, size):
            out.append(tuple((a, 1.0 / size if a in subset else 0.0) for a in attributes))
    return out


def cmpo_pairs(
    db: sqlite_utils.Database,
    provider: str,
    attributes: Sequence[str],
    *,
    max_subset_size: int | None = None,
    allow_truncated: bool = True,
    skipped: Counter[str] | None = None,
) -> list[PreferencePair]:
    """CMPO pairs from ``provider``'s Likert ratings (module docstring), groups in log order.

    Raises ``ValueError`` for empty or duplicate ``attributes`` or ``max_subset_size < 1``.
    """
    if not attributes or len(set(attributes)) != len(attributes):
        raise ValueError(f"attributes must be distinct and non-empty, got {list(attributes)}")
    if max_subset_size is not None and max_subset_size < 1:
        raise ValueError(f"max_subset_size must be >= 1 or None, got {max_subset_size}")
    ratings: dict[str, Mapping[str, Any]] = {}
    for gid, _, value in annotation_values(db, provider, "likert"):
        if isinstance(value, dict):
            ratings[gid] = value
        else:
            count_skip(skipped, "malformed")
    gens = generations_by_id(db, ratings)
    count_skip(skipped, "missing_generation", len(ratings) - len(gens))
    groups: dict[str, list[GenerationView]] = {}
    for g in sorted(gens.values(), key=lambda g: g.seq):
        groups.setdefault(g.group_id, []).append(g)
    out: list[PreferencePair] = []
    for members in groups.values():
        members.sort(key=lambda g: g.sample_index)
        for x, y in combinations(members, 2):
            for chosen, rejected in ((x, y), (y, x)):
                won = preferred_on(ratings[chosen.id], ratings[rejected.id], attributes)
                for weights in power_set_weights(won, attributes, max_subset_size):
                    subset = "+".join(a for a, w in weights if w > 0)
                    p = make_pair(
                        chosen,
                        rejected,
                        source=f"cmpo:{provider}:{chosen.id}>{rejected.id}:{subset}",
                        attribute_weights=weights,
                        allow_truncated=allow_truncated,
                    )
                    keep(out, p, skipped)
    return out
