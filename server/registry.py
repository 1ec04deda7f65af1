"""Follow an adapter registry on disk and hot-swap promoted versions into the server.

The layout and ``state.json`` are owned by ``formats.registry`` (the learner writes them
through the same module); ``active`` names the promoted version. The watcher polls the state
files; a change loads the version (sha256 verified) under a new LoRA id and routes new requests
to it; in-flight requests finish on the old version, which is then removed. A version that
fails verification is reported and skipped; the current one keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from .adapters import AdapterTable
from .config import AdapterSource
from .formats.errors import TillerError
from .formats.registry import PublishError, read_state, version_path

log = logging.getLogger("tiller.registry")


def read_active(registry: Path, name: str) -> int | None:
    """The promoted version, or None (no state yet, or a state file that does not parse)."""
    try:
        return read_state(registry, name).active
    except (OSError, PublishError, TillerError):
        return None


async def sync_once(table: AdapterTable, registry: Path, failed: set[tuple[str, int]]) -> int:
    """Bring every adapter's active version in line with the registry; returns swaps made.
    A registry directory that does not exist yet is empty (the learner creates it when it
    publishes; the server follows from then on)."""
    swaps = 0
    if not registry.is_dir():
        return 0
    for adapter_dir in sorted(p for p in registry.iterdir() if p.is_dir()):
        name = adapter_dir.name
        active = read_active(registry, name)
        if active is None or table.active_version(name) == active or (name, active) in failed:
            continue
        try:
            await table.load(
                AdapterSource(name, version_path(registry, name, active)), activate=True
            )
            swaps += 1
            log.info("hot-swapped %s to v%d", name, active)
        except TillerError as e:
            failed.add((name, active))
            log.error(
                "registry: %s v%d not loaded (%s); still serving v%s",
                name,
                active,
                e.message,
                table.active_version(name),
            )
    return swaps


async def watch(
    table: AdapterTable, registry: Path, interval_s: float, stop: asyncio.Event
) -> None:
    """Poll the registry until ``stop`` is set."""
    failed: set[tuple[str, int]] = set()
    while not stop.is_set():
        try:
            await sync_once(table, registry, failed)
        except OSError as e:
            log.error("registry %s unreadable: %s", registry, e)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval_s)
