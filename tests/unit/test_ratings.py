"""The rating provider: offline scorers turned into per-attribute Likert ratings (CMPO's
parameterized feedback), and its config."""

from __future__ import annotations

from typing import Any

import pytest

from tests.unit.test_scorers_quantile import gen, words
from tiller.learner.annotate.config import build_providers, parse_config
from tiller.learner.annotate.ratings import RatedAttribute, RatingConfig, RatingProvider

LONG = RatedAttribute(name="long", scorer="length", cuts=(3.0, 6.0))
SHORT = RatedAttribute(name="short", scorer="length", cuts=(3.0, 6.0), higher_is_better=False)


@pytest.mark.parametrize(
    ("n", "long", "short"), [(1, 1, 3), (3, 2, 2), (5, 2, 2), (6, 3, 1), (20, 3, 1)]
)
def test_ratings_count_cuts_at_or_below_and_flip_for_lower_is_better(
    n: int, long: int, short: int
) -> None:
    assert (LONG.rating(float(n)), SHORT.rating(float(n))) == (long, short)


async def test_provider_writes_one_likert_annotation_per_generation() -> None:
    p = RatingProvider(RatingConfig(provider_name="r", attributes=(LONG, SHORT)))
    notes = await p.annotate([gen(1, "a", words(2)), gen(2, "a", words(7))])
    assert [(n.generation_id, n.provider, n.kind, n.value) for n in notes] == [
        ("g1", "r", "likert", {"long": 1, "short": 3}),
        ("g2", "r", "likert", {"long": 3, "short": 1}),
    ]


async def test_a_failing_scorer_is_the_annotations_error_not_a_partial_rating() -> None:
    p = RatingProvider(RatingConfig(provider_name="r", attributes=(LONG, SHORT)))

    class Boom:
        def score(self, text: str) -> float:
            if "bad" in text:
                raise RuntimeError("cannot score")
            return 1.0

    p._scorers[1] = Boom()  # type: ignore[assignment]
    notes = await p.annotate([gen(1, "a", "bad text"), gen(2, "a", "fine")])
    assert notes[0].value is None and notes[0].error == "short: RuntimeError: cannot score"
    assert notes[1].value == {"long": 1, "short": 3} and not notes[1].error


def _provider(**kw: Any) -> dict[str, Any]:
    attr = {"name": "critical", "scorer": "sentiment", "cuts": [-0.5, 0.5]} | kw
    return {"name": "ratings", "type": "rating", "attributes": [attr]}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (_provider(scorer="toxicity"), r"attribute 'critical': unknown scorer 'toxicity'"),
        (_provider(cuts=[0.5, -0.5]), r"'critical': cuts must be finite, strictly ascending"),
        (_provider(cuts=[]), r"strictly ascending and at least one"),
        (_provider(weight=2), r"attributes\[0\]: unknown keys \['weight'\]"),
        ({"name": "r", "type": "rating", "attributes": []}, r"distinct names, at least one"),
        ({"name": "r", "type": "rating"}, r"attributes must be a list of tables"),
        (
            {"name": "r", "type": "rating", "attributes": [{"name": "a", "cuts": [1]}]},
            r"attributes\[0\] needs scorer",
        ),
        ({"name": "r", "type": "ratings"}, r"type 'ratings' is not one of llm_judge, quantile"),
    ],
)
def test_rating_config_errors_name_the_field(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_config({"db": "x.sqlite", "providers": [raw]}, {})


def test_annotator_config_builds_a_rating_provider() -> None:
    two = _provider()
    two["attributes"].append({"name": "simple", "scorer": "readability", "cuts": [40, 60]})
    (p,) = build_providers(parse_config({"db": "x.sqlite", "providers": [two]}, {}))
    assert isinstance(p, RatingProvider) and p.name == "ratings"
    assert [(a.name, a.scorer, a.cuts, a.higher_is_better) for a in p.config.attributes] == [
        ("critical", "sentiment", (-0.5, 0.5), True),
        ("simple", "readability", (40.0, 60.0), True),
    ]
