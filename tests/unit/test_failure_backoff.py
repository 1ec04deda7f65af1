"""Failed learner iterations retry after a wait that doubles, up to a minute."""

from __future__ import annotations

from tiller.learner.learn.loop import MAX_FAILURE_BACKOFF_S, failure_backoff


def test_retries_back_off_exponentially_up_to_the_cap() -> None:
    assert [failure_backoff(1.0, k) for k in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert failure_backoff(1.0, 50) == MAX_FAILURE_BACKOFF_S == 60.0
    assert failure_backoff(0.2, 1) == 0.2  # the first retry waits the trigger's poll
    assert failure_backoff(120.0, 1) == 60.0  # never longer than the cap
