"""What the server writes into the generation log, as ops for ``LogWriter.submit``."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass

import sqlite_utils

from .formats import logstore
from .formats.errors import InvalidArgument, NotFound
from .formats.logstore import FeedbackRow, GenerationRow
from .values import GenerateRequest, ResolvedSampling

MAX_TEXT = 64 * 1024
MAX_TAG = 256


@dataclass(frozen=True)
class GenerationRecord:
    id: str
    request_id: str
    group_id: str
    sample_index: int
    request: GenerateRequest
    rendered_prompt: str
    adapter: str
    adapter_version: int
    base_model: str
    sampling: ResolvedSampling
    output_text: str
    output_token_ids: tuple[int, ...]
    finish_reason: str
    prompt_tokens: int
    latency_s: float
    ttft_s: float

    def row(self) -> GenerationRow:
        r = self.request
        return GenerationRow(
            id=self.id,
            created_at=time.time(),
            request_id=self.request_id,
            group_id=self.group_id,
            sample_index=self.sample_index,
            prompt=r.prompt or "",
            chat_json=json.dumps([asdict(t) for t in r.chat]) if r.chat else "",
            rendered_prompt=self.rendered_prompt,
            feedback=r.feedback,
            feedback_mix_json=json.dumps(dict(r.feedback_mix)) if r.feedback_mix else "",
            attributes_json=json.dumps(dict(r.attributes)) if r.attributes else "",
            adapter=self.adapter,
            adapter_version=self.adapter_version,
            base_model=self.base_model,
            sampling_json=json.dumps(vars(self.sampling), default=dict),  # flat: no asdict
            seed=self.sampling.seed,
            output_text=self.output_text,
            output_token_ids=json.dumps(list(self.output_token_ids)),
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=len(self.output_token_ids),
            latency_s=self.latency_s,
            ttft_s=self.ttft_s,
        )


def insert_generations(records: list[GenerationRecord]) -> Callable[[sqlite_utils.Database], bool]:
    """An op writing ``records``; it returns True once they are in the batch."""
    rows = [rec.row() for rec in records]

    def op(db: sqlite_utils.Database) -> bool:
        logstore.insert_generations(db, rows)
        return True

    return op


@dataclass(frozen=True)
class FeedbackInput:
    generation_id: str = ""
    score: float | None = None
    tag: str = ""
    critique: str = ""
    refinement: str = ""
    chosen_id: str = ""
    rejected_id: str = ""
    idempotency_key: str = ""
    source: str = ""


def check_feedback_input(fb: FeedbackInput) -> None:
    """Shape checks that need no database."""
    if fb.chosen_id or fb.rejected_id:
        if not (fb.chosen_id and fb.rejected_id):
            raise InvalidArgument(
                "preference needs both chosen and rejected generation ids", field="preference"
            )
        if fb.chosen_id == fb.rejected_id:
            raise InvalidArgument(
                "preference compares a generation with itself", field="preference"
            )
    elif not fb.generation_id:
        raise InvalidArgument("generation_id is required", field="generation_id")
    if fb.score is None and not (fb.tag or fb.critique or fb.refinement or fb.chosen_id):
        raise InvalidArgument(
            "feedback is empty: give score, tag, critique, refinement or preference",
            field="score",
        )
    if fb.score is not None and not math.isfinite(fb.score):
        raise InvalidArgument(f"score must be finite, got {fb.score}", field="score")
    if len(fb.tag) > MAX_TAG:
        raise InvalidArgument(f"tag is longer than {MAX_TAG} characters", field="tag")
    for name in ("critique", "refinement"):
        if len(getattr(fb, name)) > MAX_TEXT:
            raise InvalidArgument(f"{name} is longer than {MAX_TEXT} characters", field=name)


def record_feedback(
    fb: FeedbackInput,
) -> Callable[[sqlite_utils.Database], tuple[str, bool]]:
    """An op returning ``(feedback_id, duplicate)``; NOT_FOUND for unknown generation ids."""

    def op(db: sqlite_utils.Database) -> tuple[str, bool]:
        if fb.idempotency_key:
            known = logstore.feedback_id_by_key(db, fb.idempotency_key)
            if known is not None:
                return known, True
        for field_name, gid in (
            ("generation_id", fb.generation_id),
            ("preference.chosen_generation_id", fb.chosen_id),
            ("preference.rejected_generation_id", fb.rejected_id),
        ):
            if gid and not logstore.generation_exists(db, gid):
                raise NotFound(f"unknown generation id {gid!r}", field=field_name)
        feedback_id = f"fb-{uuid.uuid4().hex}"
        row = FeedbackRow(
            id=feedback_id,
            created_at=time.time(),
            generation_id=fb.generation_id or fb.chosen_id,
            score=fb.score,
            tag=fb.tag,
            critique=fb.critique,
            refinement=fb.refinement,
            chosen_id=fb.chosen_id,
            rejected_id=fb.rejected_id,
            idempotency_key=fb.idempotency_key or None,
            source=fb.source,
        )
        logstore.insert_feedback(db, row)
        return feedback_id, False

    return op
