"""What providers see, what they return, and the one interface they implement."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from tiller.server.formats.logstore import GenerationView

__all__ = ["Annotation", "GenerationView", "Kind", "Provider", "ProviderUnavailable"]

Kind = Literal["tag", "score", "preference", "likert", "critique", "refinement"]


@dataclass(frozen=True)
class Annotation:
    """One label. ``generation_id_b`` is the second generation of a pairwise judgement.

    ``value`` is JSON-serialisable: a tag string, a number, ``{"winner": "a"|"b"|"tie"}``, a
    ``{attribute: rating}`` dict, or text. ``error`` is set (and ``value`` None) when the
    provider ran but could not label (e.g. unparseable judge output): recorded, not retried.
    """

    generation_id: str
    provider: str
    kind: Kind
    value: Any
    generation_id_b: str = ""
    raw: str = ""
    judge_model: str = ""
    latency_s: float = 0.0
    error: str = ""


class ProviderUnavailable(Exception):
    """The provider cannot run now (judge down, timeouts): the batch is retried later, with
    nothing committed — the backlog waits, nothing is dropped."""


class Provider(Protocol):
    """A feedback provider. ``name`` is unique per annotator config and keys its cursor."""

    name: str

    async def annotate(self, batch: Sequence[GenerationView]) -> list[Annotation]:
        """Label ``batch`` (whole request groups, in log order). Raise ``ProviderUnavailable``
        for transient failures; return error annotations for permanent per-item ones."""
        ...
