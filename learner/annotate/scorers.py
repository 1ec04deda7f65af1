"""Offline numeric scorers: text in, one float out, no network and no model download.

Each scorer is constructed once per provider (the constructor imports its library and loads its
lexicon) and then called per generation. ``score`` is pure and deterministic; an instance may
be used from one thread at a time.

===============  ==============================================  ===================
name             value                                           library
===============  ==============================================  ===================
``sentiment``    VADER compound score, -1 (negative) .. +1       vaderSentiment
``profanity``    fraction of words censored, 0 .. 1              better-profanity
``readability``  Flesch reading ease (higher = easier; can be    textstat
                 negative for long run-on text; 0 for no words)
``length``       number of whitespace-separated words            —
===============  ==============================================  ===================
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol


class Scorer(Protocol):
    name: str

    def score(self, text: str) -> float:
        """A finite number for ``text`` (any string, empty included)."""
        ...


class SentimentScorer:
    name = "sentiment"

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer: Any = SentimentIntensityAnalyzer()

    def score(self, text: str) -> float:
        return float(self._analyzer.polarity_scores(text)["compound"])


# better-profanity replaces a censored span by four censor characters; a character that cannot
# occur in the input (stripped first) lets us count the spans exactly.
_MARK = "\x00"


class ProfanityScorer:
    """Censored spans over words: "what the hell" -> 1/3. A swear word spelled across two words
    ("f uck") is one span; the result is capped at 1. Any profanity at all <=> score > 0."""

    name = "profanity"

    def __init__(self) -> None:
        from better_profanity import Profanity

        self._profanity: Any = Profanity()

    def score(self, text: str) -> float:
        text = text.replace(_MARK, "")
        words = len(text.split())
        if words == 0:
            return 0.0
        censored = str(self._profanity.censor(text, _MARK)).count(_MARK * 4)
        return min(1.0, censored / words)


class ReadabilityScorer:
    name = "readability"

    def __init__(self) -> None:
        import textstat

        self._textstat: Any = textstat

    def score(self, text: str) -> float:
        return float(self._textstat.flesch_reading_ease(text))


class LengthScorer:
    name = "length"

    def score(self, text: str) -> float:
        return float(len(text.split()))


SCORERS: dict[str, Callable[[], Scorer]] = {
    "sentiment": SentimentScorer,
    "profanity": ProfanityScorer,
    "readability": ReadabilityScorer,
    "length": LengthScorer,
}


@functools.cache
def make_scorer(name: str) -> Scorer:
    """The scorer called ``name``, built once per process (scorers are pure; building one loads
    its word lists); ``ValueError`` naming the valid ones otherwise. ``ImportError`` if its
    library is missing (``pip install 'tiller[annotate]'``)."""
    try:
        factory = SCORERS[name]
    except KeyError:
        raise ValueError(f"unknown scorer {name!r}; valid: {', '.join(sorted(SCORERS))}") from None
    return factory()
