"""The typed rows the store exchanges (frozen dataclasses, one per kind of record)."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class GenerationView:
    """One logged generation, as a provider sees it (read from the ``generations`` table)."""

    seq: int
    id: str
    group_id: str
    sample_index: int
    prompt: str
    chat_json: str
    rendered_prompt: str
    feedback: str
    adapter: str
    adapter_version: int
    output_text: str
    finish_reason: str
    created_at: float

    @property
    def user_prompt(self) -> str:
        """The prompt as the user wrote it (last user turn for chats), without conditioning."""
        if self.prompt:
            return self.prompt
        turns = json.loads(self.chat_json or "[]")
        users = [t["content"] for t in turns if t.get("role") == "user"]
        return users[-1] if users else ""


# The ``generations`` columns a ``GenerationView`` is built from, in field order.
VIEW_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(GenerationView))


@dataclass(frozen=True)
class FeedbackPreference:
    """An app feedback row that names a preferred and a rejected generation."""

    feedback_id: str
    chosen_id: str
    rejected_id: str


@dataclass(frozen=True)
class GenerationRow:
    """A generation as the server writes it (every ``generations`` column but ``seq``).

    JSON columns hold JSON text (``""`` when absent); ``output_token_ids`` is a JSON list."""

    id: str
    created_at: float
    request_id: str
    group_id: str
    sample_index: int
    prompt: str
    chat_json: str
    rendered_prompt: str
    feedback: str
    feedback_mix_json: str
    attributes_json: str
    adapter: str
    adapter_version: int
    base_model: str
    sampling_json: str
    seed: int
    output_text: str
    output_token_ids: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float
    ttft_s: float


@dataclass(frozen=True)
class FeedbackRow:
    """One piece of app feedback (a ``feedback`` row; ``seq`` is 0 until it is written).

    A preference names ``chosen_id`` and ``rejected_id`` (``generation_id`` is then the chosen
    one); other feedback names ``generation_id`` and carries a score, tag, critique or
    refinement. ``idempotency_key`` is None when the client gave none (the column is unique)."""

    id: str
    created_at: float
    generation_id: str
    score: float | None = None
    tag: str = ""
    critique: str = ""
    refinement: str = ""
    chosen_id: str = ""
    rejected_id: str = ""
    idempotency_key: str | None = None
    source: str = ""
    seq: int = 0


@dataclass(frozen=True)
class AnnotationRow:
    """One label as the annotator writes it (every ``annotations`` column but ``seq``).

    ``value_json`` is the label as JSON text (``"null"`` for an error row)."""

    created_at: float
    generation_id: str
    generation_id_b: str
    provider: str
    kind: str
    value_json: str
    raw: str
    judge_model: str
    latency_s: float
    error: str


@dataclass(frozen=True)
class LabelRow:
    """An error-free tag or score annotation with the adapter version its generation ran on."""

    provider: str
    kind: str
    value_json: str
    raw: str
    adapter: str
    adapter_version: int


@dataclass(frozen=True)
class LogCounts:
    """How much the log holds: generations, and annotations per provider."""

    generations: int
    annotations: dict[str, int]


@dataclass(frozen=True)
class GenerationSpan:
    """Size and time span of the ``generations`` table (times None when it is empty)."""

    count: int
    groups: int
    first_at: float | None
    last_at: float | None
