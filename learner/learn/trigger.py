"""When an iteration may train: enough new labels of the data's provider (or time passed), and,
in active mode, every generation the iteration sampled labelled first."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import sqlite_utils

from tiller.server.formats.logstore import count_labels_after, count_unlabelled

from .config import LearnConfig


@dataclass(frozen=True)
class Sampled:
    """The generation seqs ``after < seq <= upto`` an iteration's active sampling logged."""

    after: int
    upto: int


@dataclass(frozen=True)
class Labels:
    """Usable labels after a cursor: how many, and the highest seq (the cursor when none)."""

    count: int
    upto: int


def new_labels(db: sqlite_utils.Database, cfg: LearnConfig, after: int) -> Labels:
    """Labels after ``after``: error-free annotations of the data's provider, or app feedback
    rows for ``source='feedback'`` (their seq in the feedback table)."""
    feedback = cfg.data.kind == "pairs" and cfg.data.source == "feedback"
    n, hi = count_labels_after(db, None if feedback else cfg.data.provider, after)
    return Labels(n, hi)


async def wait_for_trigger(
    db: sqlite_utils.Database,
    cfg: LearnConfig,
    cursor: int,
    since: float,
    stop: asyncio.Event,
    sampled: Sampled | None,
) -> int:
    """The label seq to train up to, once ``cfg.trigger`` fired: ``min_annotations`` new labels
    (and ``sampled``, this iteration's own generations, all labelled: a dataset built from
    half of them would be small and, after on-policy filtering, often empty), or
    ``max_interval_s`` since ``since`` with at least one. Returns ``cursor`` once ``stop``."""
    t = cfg.trigger
    while not stop.is_set():
        labels = new_labels(db, cfg, cursor)
        ready = labels.count >= t.min_annotations and (
            sampled is None
            or count_unlabelled(db, cfg.data.provider, sampled.after, sampled.upto) == 0
        )
        if ready or (labels.count > 0 and time.time() - since >= t.max_interval_s):
            return labels.upto
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), t.poll_s)
    return cursor
