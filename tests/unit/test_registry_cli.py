"""`tiller registry list/promote/rollback` on a real registry directory."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner

from tiller.client.cli import main
from tiller.server.formats.manifest import Conditioning
from tiller.server.formats.publish import Release, publish
from tiller.server.formats.registry import read_state


def test_list_promote_rollback(tmp_path: Path) -> None:
    reg = tmp_path / "reg"
    release = Release(base_model="tiny", conditioning=Conditioning(tags=("A", "B")))
    for _ in range(2):
        publish(reg, "detox", None, release)
    run = CliRunner().invoke
    r = run(main, ["registry", "promote", "--registry", str(reg), "detox", "1"])
    assert r.exit_code == 0 and "active v1" in r.output
    r = run(main, ["registry", "promote", "--registry", str(reg), "detox", "2"])
    assert r.exit_code == 0 and read_state(reg, "detox").active == 2
    r = run(main, ["registry", "list", "--registry", str(reg)])
    assert r.output.strip() == "detox: v1 *v2"
    r = run(main, ["registry", "rollback", "--registry", str(reg), "detox"])
    assert r.exit_code == 0 and read_state(reg, "detox").active == 1
    r = run(main, ["registry", "rollback", "--registry", str(reg), "detox"])
    assert r.exit_code != 0 and "Error" in r.output
    r = run(main, ["registry", "promote", "--registry", str(reg), "detox", "7"])
    assert r.exit_code != 0
    assert read_state(reg, "detox").active == 1  # a failed command changes nothing


async def test_a_registry_that_does_not_exist_yet_is_followed_as_empty(tmp_path: Path) -> None:
    from typing import cast

    from tiller.server.adapters import AdapterTable
    from tiller.server.registry import sync_once

    # Nothing to load and nothing touched: the learner creates the directory when it publishes.
    assert await sync_once(cast(AdapterTable, None), tmp_path / "not-yet", set()) == 0
