"""Offline scorers (real libraries) and quantile banding against hand-computed bands."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiller.learner.annotate.base import GenerationView
from tiller.learner.annotate.config import build_providers, parse_config
from tiller.learner.annotate.quantile import (
    QuantileConfig,
    QuantileTagProvider,
    ScoreConfig,
    ScoreProvider,
    band,
)
from tiller.learner.annotate.scorers import SCORERS, make_scorer

FIVE = ("Lowest", "Low", "Moderate", "High", "Highest")


def gen(i: int, group: str, text: str) -> GenerationView:
    return GenerationView(
        seq=i,
        id=f"g{i}",
        group_id=group,
        sample_index=0,
        prompt="p",
        chat_json="",
        rendered_prompt="p",
        feedback="",
        adapter="",
        adapter_version=0,
        output_text=text,
        finish_reason="stop",
        created_at=0.0,
    )


def words(n: int) -> str:
    """A text the ``length`` scorer scores as ``n``."""
    return " ".join(["w"] * n)


def batch(groups: list[tuple[str, list[int]]], start: int = 1) -> list[GenerationView]:
    out, i = [], start
    for group, lengths in groups:
        for n in lengths:
            out.append(gen(i, group, words(n)))
            i += 1
    return out


def quantile(mode: str, tags: tuple[str, ...] = FIVE, window: int = 1000) -> QuantileTagProvider:
    return QuantileTagProvider(
        QuantileConfig(scorer="length", tags=tags, mode=mode, window=window, provider_name="q")  # type: ignore[arg-type]
    )


# ------------------------------------------------------------------------------------- scorers


def test_sentiment_orders_positive_above_negative() -> None:
    s = make_scorer("sentiment")
    pos, neu, neg = (
        s.score("I love this, wonderful!"),
        s.score("The box is on the table."),
        s.score("I hate this, awful."),
    )
    assert pos > neu > neg
    assert 0.5 < pos <= 1.0 and -1.0 <= neg < -0.5 and neu == 0.0


def test_profanity_is_the_fraction_of_censored_words() -> None:
    s = make_scorer("profanity")
    assert s.score("what a lovely day") == 0.0
    assert s.score("") == 0.0
    assert s.score("what the hell") == pytest.approx(1 / 3)
    assert s.score("shit shit") == 1.0
    assert s.score("sh1t happens") == 0.5  # leetspeak is still caught


def test_readability_prefers_plain_words() -> None:
    s = make_scorer("readability")
    easy = s.score("The cat sat on the mat. It was a good cat.")
    hard = s.score(
        "Notwithstanding considerable epistemological ambiguities, institutional "
        "frameworks systematically perpetuate organizational inefficiencies."
    )
    assert easy > 80 > 0 > hard


def test_length_counts_words() -> None:
    s = make_scorer("length")
    assert s.score("  one two\nthree ") == 3.0
    assert s.score("") == 0.0


def test_every_registered_scorer_builds_and_is_named_after_its_key() -> None:
    for name in SCORERS:
        scorer = make_scorer(name)
        assert scorer.name == name
        assert isinstance(scorer.score("Hello there, friend."), float)


def test_unknown_scorer_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"'toxicity'.*length, profanity, readability, sentiment"):
        make_scorer("toxicity")


# ---------------------------------------------------------------------------------------- band


@pytest.mark.parametrize(
    ("score", "ref", "k", "expected"),
    [
        (1.0, [1.0, 2.0, 3.0, 4.0, 5.0], 5, 0),  # p = 0.1
        (5.0, [1.0, 2.0, 3.0, 4.0, 5.0], 5, 4),  # p = 0.9
        (2.0, [1.0, 2.0, 2.0, 3.0], 3, 1),  # ties: p = (1 + 2/2) / 4 = 0.5
        (7.0, [7.0, 7.0, 7.0], 5, 2),  # all tied: the middle band
        (2.0, [1.0, 2.0, 3.0], 3, 1),  # p = 0.5
        (3.0, [1.0, 3.0, 3.0], 3, 2),  # p = 2/3 exactly: the edge belongs to the upper band
        (0.0, [1.0, 2.0], 4, 0),  # below everything: p = 0
        (9.0, [1.0, 2.0], 4, 3),  # above everything: p = 1, capped at k - 1
    ],
)
def test_band_by_mid_rank(score: float, ref: list[float], k: int, expected: int) -> None:
    assert band(score, ref, k) == expected


# ------------------------------------------------------------------------------- per_prompt


async def test_per_prompt_bands_within_each_group() -> None:
    q = quantile("per_prompt")
    b = batch(
        [
            ("a", [3, 1, 5, 2, 4]),  # 5 distinct: one per band
            ("b", [10, 30, 20]),  # 3 of 5: p = 1/6, 1/2, 5/6 -> bands 0, 2, 4
            ("c", [2, 2]),  # tie: both p = 1/2 -> "Moderate"
            ("d", [1, 2]),  # p = 1/4, 3/4 -> bands 1, 3
        ]
    )
    notes = await q.annotate(b)
    assert [n.value for n in notes] == [
        "Moderate", "Lowest", "Highest", "Low", "High",
        "Lowest", "Highest", "Moderate",
        "Moderate", "Moderate",
        "Low", "High",
    ]  # fmt: skip
    assert all(n.kind == "tag" and n.provider == "q" and not n.error for n in notes)
    assert [n.generation_id for n in notes] == [g.id for g in b]
    assert [float(n.raw) for n in notes] == [3, 1, 5, 2, 4, 10, 30, 20, 2, 2, 1, 2]


async def test_per_prompt_ties_with_three_tags() -> None:
    q = quantile("per_prompt", tags=("low", "mid", "high"))
    notes = await q.annotate(batch([("a", [1, 2, 2, 3])]))
    # p = 1/8, 1/2, 1/2, 7/8 -> bands 0, 1, 1, 2
    assert [n.value for n in notes] == ["low", "mid", "mid", "high"]


async def test_per_prompt_singleton_group_falls_back_to_the_global_window() -> None:
    q = quantile("per_prompt")
    first = await q.annotate(batch([("a", [1, 2, 3, 4]), ("solo", [5])]))
    # The window now holds 1..5: the singleton 5 has p = 4.5 / 5 = 0.9 -> "Highest",
    # while in group "a" (1..4) scores 1..4 get p = 1/8, 3/8, 5/8, 7/8 -> bands 0, 1, 3, 4.
    assert [n.value for n in first] == ["Lowest", "Low", "High", "Highest", "Highest"]
    second = await q.annotate(batch([("solo2", [3])], start=10))
    # Window 1, 2, 3, 4, 5, 3: below = 2, equal = 2, p = 3 / 6 = 0.5 -> "Moderate".
    assert [n.value for n in second] == ["Moderate"]
    assert q.window == (1, 2, 3, 4, 5, 3)


# ----------------------------------------------------------------------------------- global


async def test_global_mode_seeds_from_the_batch_then_rolls() -> None:
    q = quantile("global", tags=("low", "high"), window=4)
    first = await q.annotate(batch([("a", [1, 2]), ("b", [3, 4])]))
    # Groups are ignored: window 1..4, p = 1/8, 3/8, 5/8, 7/8 -> low, low, high, high.
    assert [n.value for n in first] == ["low", "low", "high", "high"]
    second = await q.annotate(batch([("c", [2])], start=5))
    # Window rolls to 2, 3, 4, 2: the 2s are tied lowest, p = (0 + 2/2) / 4 = 1/4 -> low.
    assert q.window == (2, 3, 4, 2)
    assert [n.value for n in second] == ["low"]
    third = await q.annotate(batch([("d", [9, 9, 9, 9])], start=6))
    # The window now holds only the four 9s: all tied, p = 1/2 -> band 1 of 2, "high".
    assert q.window == (9, 9, 9, 9)
    assert [n.value for n in third] == ["high"] * 4


async def test_global_ranks_against_history_not_just_the_batch() -> None:
    q = quantile("global")
    await q.annotate(batch([("a", [10, 20, 30, 40, 50, 60, 70, 80, 90])]))
    notes = await q.annotate(batch([("b", [1])], start=20))
    # Window 10..90 and 1: 1 is below all ten -> p = 0.05 -> "Lowest" (alone it would be middle).
    assert [n.value for n in notes] == ["Lowest"]


def test_fixed_bands_are_absolute_thresholds_whatever_the_batch() -> None:
    cfg = QuantileConfig(
        scorer="sentiment",
        tags=("Very negative", "Negative", "Positive", "Very positive"),
        mode="fixed",
        cuts=(-0.5, 0.0, 0.5),
        provider_name="s",
    )
    q = QuantileTagProvider(cfg)
    # A batch skewed positive: quantile bands would call 0.3 "Negative"; fixed cuts do not.
    scores = [0.3, 0.6, 0.9, 0.95, -0.7, 0.0, -0.5, 0.5]
    b = batch([("a", list(range(1, len(scores) + 1)))])
    tags = [n.value for n in q.tag(b, list(scores))]
    assert tags == [
        "Positive",
        "Very positive",
        "Very positive",
        "Very positive",
        "Very negative",
        "Positive",  # a score on a cut belongs to the upper band
        "Negative",
        "Very positive",
    ]


def test_failed_scores_become_error_annotations_and_are_not_ranked() -> None:
    q = quantile("per_prompt", tags=("low", "high"))
    b = batch([("a", [1, 2, 3])])
    notes = q.tag(b, [1.0, "ValueError: bad text", 3.0])
    assert [(n.value, n.error) for n in notes] == [
        ("low", ""),
        (None, "ValueError: bad text"),
        ("high", ""),
    ]
    assert q.window == (1.0, 3.0)


# ------------------------------------------------------------------------------ score + config


async def test_score_provider_writes_the_raw_score() -> None:
    p = ScoreProvider(ScoreConfig(scorer="sentiment", provider_name="sent"))
    b = [gen(1, "a", "I love this, wonderful!"), gen(2, "a", "I hate this, awful.")]
    notes = await p.annotate(b)
    assert [(n.kind, n.provider, n.generation_id) for n in notes] == [
        ("score", "sent", "g1"),
        ("score", "sent", "g2"),
    ]
    assert notes[0].value > 0.5 > -0.5 > notes[1].value


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"scorer": "toxicity"}, r"unknown scorer 'toxicity'; valid: length, profanity"),
        ({"tags": ("only",)}, r"at least 2 distinct"),
        ({"tags": ("a", "a")}, r"at least 2 distinct"),
        ({"mode": "local"}, r"unknown mode 'local'; valid: per_prompt, global"),
        ({"window": 0}, r"window must be >= 1"),
        ({"mode": "fixed"}, r"needs cuts, one fewer than the 2 tags; got 0"),
        ({"mode": "fixed", "cuts": (1.0, 2.0)}, r"one fewer than the 2 tags; got 2"),
        ({"mode": "fixed", "tags": ("a", "b", "c"), "cuts": (2.0, 1.0)}, r"strictly ascending"),
        ({"cuts": (0.0,)}, r"cuts apply to mode 'fixed' only"),
    ],
)
def test_config_errors_name_the_field(kw: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "scorer": "length",
        "tags": ("a", "b"),
        "mode": "global",
        "provider_name": "q",
    }
    with pytest.raises(ValueError, match=message):
        QuantileConfig(**{**args, **kw})  # type: ignore[arg-type]


def test_annotator_toml_builds_these_providers(tmp_path: Path) -> None:
    config = parse_config(
        {
            "db": str(tmp_path / "log.sqlite"),
            "providers": [
                {
                    "name": "sentiment-tags",
                    "type": "quantile",
                    "scorer": "sentiment",
                    "mode": "per_prompt",
                    "tags": ["Most Negative", "Neutral", "Most Positive"],
                },
                {"name": "length", "type": "score", "scorer": "length"},
            ],
        },
        {},
    )
    tags, score = build_providers(config)
    assert isinstance(tags, QuantileTagProvider) and isinstance(score, ScoreProvider)
    assert tags.name == "sentiment-tags" and score.name == "length"
    assert tags.config.tags == ("Most Negative", "Neutral", "Most Positive")
