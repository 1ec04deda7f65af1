"""The environment ``tiller align`` gives its children."""

from __future__ import annotations

import pytest

from tiller.learner.align.children import child_env


def test_children_wait_passively_in_openmp_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert child_env() == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert child_env(X="1") == {"OMP_WAIT_POLICY": "PASSIVE", "X": "1"}


def test_an_operators_wait_policy_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert child_env()["OMP_WAIT_POLICY"] == "ACTIVE"
