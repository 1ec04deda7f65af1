"""The co-located learner's thread count (``tiller align`` on one CPU host)."""

from __future__ import annotations

import os

import pytest

from tiller.learner.align.run import learner_threads


@pytest.mark.parametrize(("cpus", "threads"), [(1, "1"), (2, "1"), (3, "1"), (16, "8")])
def test_learner_takes_half_the_cpus_and_at_least_one(cpus: int, threads: str) -> None:
    assert learner_threads(cpus) == threads


def test_learner_threads_default_to_this_process_cpu_set() -> None:
    assert learner_threads() == str(max(1, len(os.sched_getaffinity(0)) // 2))
