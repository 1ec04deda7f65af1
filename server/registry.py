"""Follow an adapter registry on disk and hot-swap promoted versions into the server.

The layout and ``state.json`` are owned by ``formats.registry`` (the learner writes them
through the same module); ``active`` names the promoted version. The watcher polls the state
files; a change loads the version (sha256 verified) under a new LoRA id and routes new requests
to it; in-flight requests finish on the old version, which is then removed. A version that
fails verification is reported and skipped; the current one keeps serving.

``admin_source`` decides where an admin ``LoadAdapter`` may load from: a registry reference
resolves inside the server's own registry; a path only inside the ``--adapter-root``
directories (none configured: no path is accepted).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path

from .adapters import AdapterTable
from .config import AdapterSource
from .formats.errors import FailedPrecondition, NotFound, PermissionDenied, TillerError
from .formats.manifest import check_inside
from .formats.registry import PublishError, list_versions, read_state, version_path

log = logging.getLogger("tiller.registry")


@dataclass(frozen=True)
class RegistryRef:
    """Version ``version`` of adapter ``name`` in the server's registry, served as ``served``."""

    served: str
    name: str
    version: int


def resolve(registry: Path | None, ref: RegistryRef) -> AdapterSource:
    """The version directory ``ref`` names. ``FailedPrecondition`` when the server follows no
    registry; ``NotFound`` for a name or version the registry does not hold (complete versions
    only). The files are verified against the manifest when the version is loaded."""
    if registry is None:
        raise FailedPrecondition(
            "this server has no registry (tiller serve --registry DIR): it cannot load "
            f"{ref.name} v{ref.version} by reference",
            field="registry",
        )
    versions = list_versions(registry, ref.name)
    if ref.version not in versions:
        held = ", ".join(str(v) for v in versions) or "none"
        raise NotFound(
            f"adapter {ref.name!r} has no version {ref.version} in the registry "
            f"(complete versions: {held})",
            field="registry.version",
        )
    return AdapterSource(ref.served, version_path(registry, ref.name, ref.version))


def admin_source(
    source: AdapterSource | RegistryRef, registry: Path | None, roots: tuple[Path, ...]
) -> AdapterSource:
    """Where an admin ``LoadAdapter`` loads from: a reference resolved in ``registry``, or a
    path (symlinks resolved) inside one of ``roots``; ``PermissionDenied`` for a path outside
    them or when there are none."""
    if isinstance(source, RegistryRef):
        return resolve(registry, source)
    if not roots:
        raise PermissionDenied(
            "LoadAdapter by path is refused: this server has no --adapter-root; load by "
            "registry reference, or start the server with --adapter-root DIR",
            field="path",
        )
    return AdapterSource(source.name, check_inside(source.path, roots))


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
            log.info(
                "hot-swapped %s to v%d", name, active, extra={"adapter": name, "version": active}
            )
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
