"""When an iteration may train: enough new labels of the data's provider (or time passed), and,
in active mode, every generation the iteration sampled labelled first."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import sqlite_utils

from tiller.server.formats.logstore import (
    count_labels_after,
    count_unlabelled,
    last_generation_seq,
)
from tiller.server.formats.logstore.runs import label_times

from ..shards import Cursor
from .config import LearnConfig


@dataclass(frozen=True)
class Sampled:
    """Per shard, the generation seqs ``after < seq <= upto`` an iteration's active sampling
    logged (behind a balancer its requests land on several replicas' shards)."""

    after: Cursor
    upto: Cursor


@dataclass(frozen=True)
class Labels:
    """Usable labels after a cursor: how many, and per shard the highest seq (the cursor's
    own where there is none)."""

    count: int
    upto: Cursor


def label_provider(cfg: LearnConfig) -> str | None:
    """Whose labels the data is built from: the annotation provider, or None for app feedback
    rows (``source='feedback'``, their seq in the feedback table)."""
    feedback = cfg.data.kind == "pairs" and cfg.data.source == "feedback"
    return None if feedback else cfg.data.provider


def new_labels(
    shards: Mapping[str, sqlite_utils.Database], cfg: LearnConfig, after: Cursor
) -> Labels:
    """Labels after ``after``: error-free annotations of the data's provider, or app feedback
    rows for ``source='feedback'`` (their seq in the feedback table), summed over shards."""
    count, upto = 0, dict(after)
    for name, db in shards.items():
        n, hi = count_labels_after(db, label_provider(cfg), after.get(name, 0))
        count, upto[name] = count + n, hi
    return Labels(count, upto)


def window_label_times(
    shards: Mapping[str, sqlite_utils.Database], cfg: LearnConfig, after: Cursor, upto: Cursor
) -> list[float]:
    """When each label of an iteration's window (``after``, ``upto``] landed in the log, over
    all shards (the labels ``new_labels`` counted for it)."""
    return [
        t
        for name, db in shards.items()
        for t in label_times(db, label_provider(cfg), after.get(name, 0), upto.get(name, 0))
    ]


def unlabelled(shards: Mapping[str, sqlite_utils.Database], provider: str, sampled: Sampled) -> int:
    return sum(
        count_unlabelled(db, provider, sampled.after.get(name, 0), sampled.upto[name])
        for name, db in shards.items()
        if name in sampled.upto
    )


def generation_seqs(shards: Mapping[str, sqlite_utils.Database]) -> Cursor:
    """Each shard's last generation seq."""
    return {name: last_generation_seq(db) for name, db in shards.items()}


async def wait_for_trigger(
    shards: Callable[[], Mapping[str, sqlite_utils.Database]],
    cfg: LearnConfig,
    cursor: Cursor,
    since: float,
    stop: asyncio.Event,
    sampled: Sampled | None,
) -> Cursor:
    """The label cursor to train up to, once ``cfg.trigger`` fired: ``min_annotations`` new
    labels over all shards (``shards()`` is asked at every poll: new replicas join) and
    ``sampled``, this iteration's own generations, all labelled (a dataset built from half of
    them would be small and, after on-policy filtering, often empty), or ``max_interval_s``
    since ``since`` with at least one. Returns ``cursor`` once ``stop``."""
    t = cfg.trigger
    while not stop.is_set():
        now = shards()
        labels = new_labels(now, cfg, cursor)
        ready = labels.count >= t.min_annotations and (
            sampled is None or unlabelled(now, cfg.data.provider, sampled) == 0
        )
        if ready or (labels.count > 0 and time.time() - since >= t.max_interval_s):
            return labels.upto
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), t.poll_s)
    return cursor
