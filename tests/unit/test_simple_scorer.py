"""The ``simple_words`` scorer (real textstat word lists) and its use as a rated attribute."""

from __future__ import annotations

import pytest

from tiller.learner.annotate.ratings import RatedAttribute, RatingConfig
from tiller.learner.annotate.scorers import make_scorer


def test_simple_words_is_the_share_of_plain_words() -> None:
    s = make_scorer("simple_words")
    assert s.name == "simple_words"
    # "cinematography" and "pretentious" are long and off the Dale-Chall list: 2 of 6 words
    assert s.score("The cinematography was pretentious, I think.") == pytest.approx(4 / 6)
    assert s.score("I liked it a lot.") == 1.0
    assert s.score("Magnificent, extraordinary cinematography!") == 0.0
    assert s.score("") == 0.0
    assert s.score("... !!") == 0.0


def test_simple_words_ignores_sentence_length_unlike_flesch() -> None:
    easy, flesch = make_scorer("simple_words"), make_scorer("readability")
    short = "The film was good. I liked it. The cast was fun."
    run_on = "the film was good and I liked it and the cast was fun"  # same words, no stops
    assert easy.score(short) == easy.score(run_on) == 1.0
    assert flesch.score(short) > flesch.score(run_on)


def test_simple_words_is_case_insensitive() -> None:
    s = make_scorer("simple_words")
    assert s.score("MAGNIFICENT movie") == s.score("magnificent movie") == 0.5


def test_simple_words_rates_as_an_attribute() -> None:
    cfg = RatingConfig(
        provider_name="ratings",
        attributes=(RatedAttribute(name="simple", scorer="simple_words", cuts=(0.8, 0.9)),),
    )
    (simple,) = cfg.attributes
    s = make_scorer("simple_words")
    assert simple.rating(s.score("The cinematography was pretentious, I think.")) == 1
    assert simple.rating(s.score("I liked it a lot.")) == 3
