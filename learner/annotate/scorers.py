"""Offline numeric scorers: text in, one float out, no network and no model download.

Each scorer is constructed once per provider (the constructor imports its library and loads its
lexicon) and then called per generation. ``score`` is pure and deterministic; an instance may
be used from one thread at a time.

=================  ==============================================  ===================
name               value                                           library
=================  ==============================================  ===================
``sentiment``      VADER compound score, -1 (negative) .. +1       vaderSentiment
``profanity``      fraction of words censored, 0 .. 1              better-profanity
``readability``    Flesch reading ease (higher = easier; can be    textstat
                   negative for long run-on text; 0 for no words)
``simple_words``   share of words that are plain: on the Dale-     textstat
                   Chall easy-word list or of one syllable
                   (0 .. 1; 0 for no words)
``length``         number of whitespace-separated words            —
``rm:<dir>``       a local reward model's logit for the text       transformers, torch
                   (``reward_model`` module: settings, device)
=================  ==============================================  ===================

A scorer may also have ``score_batch(texts) -> list[float]`` (the reward model: one forward
pass per batch); ``quantile.score_all`` uses it when present.
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


class SimpleWordsScorer:
    """Word-level simplicity: the share of word occurrences that textstat does not count as
    difficult (on the Dale-Chall easy-word list, or under two syllables). No sentence-length
    term, so a short or truncated snippet is scored on its words alone, unlike Flesch."""

    name = "simple_words"

    def __init__(self) -> None:
        import textstat

        self._textstat: Any = textstat

    def score(self, text: str) -> float:
        words = str(self._textstat.remove_punctuation(text)).lower().split()
        if not words:
            return 0.0
        plain = sum(not self._textstat.is_difficult_word(w) for w in words)
        return plain / len(words)


class LengthScorer:
    name = "length"

    def score(self, text: str) -> float:
        return float(len(text.split()))


SCORERS: dict[str, Callable[[], Scorer]] = {
    "sentiment": SentimentScorer,
    "profanity": ProfanityScorer,
    "readability": ReadabilityScorer,
    "simple_words": SimpleWordsScorer,
    "length": LengthScorer,
}


RM_PREFIX = "rm:"  # "rm:<model dir>": a reward model (reward_model module)


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown scorer {name!r}; valid: {', '.join(sorted(SCORERS))}, or {RM_PREFIX}<model dir>"
    )


def check_scorer(name: str) -> None:
    """``ValueError`` unless ``name`` names a scorer: a built-in one, or ``rm:<dir>`` whose
    directory holds a sequence-classification model (checked without loading it or torch)."""
    if name.startswith(RM_PREFIX):
        from .reward_model import parse_spec

        parse_spec(name)
    elif name not in SCORERS:
        raise _unknown(name)


@functools.cache
def make_scorer(name: str) -> Scorer:
    """The scorer called ``name``, built once per process (scorers are pure; building one loads
    its word lists or its model); ``ValueError`` naming the valid ones otherwise. ``ImportError``
    if its library is missing (``pip install 'tiller[annotate]'``; ``rm:`` needs torch)."""
    if name.startswith(RM_PREFIX):
        from .reward_model import load

        return load(name)
    try:
        factory = SCORERS[name]
    except KeyError:
        raise _unknown(name) from None
    return factory()
