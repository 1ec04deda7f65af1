"""The adapter registry on disk: layout, listing, ``state.json`` (read and written), promotion.

Layout::

    <registry>/<adapter>/v0001/            a version: peft files + tiller-manifest.json
    <registry>/<adapter>/v0002/
    <registry>/<adapter>/state.json        {"active": 2, "history": [{action, version, at}, ...]}
    <registry>/<adapter>/.state.lock       flock for state.json updates
    <registry>/<adapter>/.staging-*/       a publish in progress (or a crashed one)
    <registry>/<adapter>/.claim-v0003      a version number taken by a publisher

``formats.publish.publish`` copies the files into a dot-named staging directory (never
holding a manifest, so ``load_manifest`` fails on it and listings skip it), fsyncs them, takes
the next number by creating its claim file with ``O_EXCL`` (two publishers never get the same
number), renames the staging directory to ``vNNNN`` (a name nobody else may use), and only
then writes the
manifest with ``manifest.write_manifest`` and fsyncs it. A version is complete, and
loadable, once its manifest is whole: a crash (kill -9 included) at any step leaves either a
staging directory, a claim, or a ``vNNNN`` without manifest, none of which ``load_manifest``
accepts or ``list_versions`` returns; the next publish takes a number above every claim and
directory. ``cleanup_partials`` removes such leftovers.

``state.json`` is rewritten atomically (temporary file, fsync, rename) under an ``flock``, so
concurrent ``promote`` / ``rollback`` calls serialise. Its history is a log of promotions and
rollbacks; replaying it as a stack (promote pushes, rollback pops) gives the version a
rollback returns to. POSIX only (``flock``, directory fsync).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from .manifest import (
    MANIFEST_FILE,
    ManifestError,
    load_manifest,
    parse_manifest,
    validate_name,
)

STATE_FILE = "state.json"
STAGING_PREFIX = ".staging-"
CLAIM_PREFIX = ".claim-"
VERSION_DIR_RE = re.compile(r"^v(\d{4,})$")
CLAIM_RE = re.compile(r"^\.claim-v(\d{4,})$")


class PublishError(Exception):
    """The adapter cannot be published or the registry cannot do what was asked."""


@dataclass(frozen=True)
class Event:
    action: Literal["promote", "rollback"]
    version: int
    at: str


@dataclass(frozen=True)
class State:
    """An adapter's serving state: the active version and how it got there."""

    active: int | None = None
    history: tuple[Event, ...] = ()

    def stack(self) -> list[int]:
        """The promotions still in force, oldest first (promote pushes, rollback pops)."""
        out: list[int] = []
        for e in self.history:
            if e.action == "promote":
                out.append(e.version)
            elif out:
                out.pop()
        return out


# ------------------------------------------------------------------------------ small helpers


def version_dir_name(version: int) -> str:
    return f"v{version:04d}"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def adapter_root(registry: Path, name: str) -> Path:
    """``registry/name``; ``InvalidArgument`` for a name the server would refuse."""
    return registry / validate_name(name)


# ------------------------------------------------------------------------------ reading


def list_versions(registry: Path, name: str) -> list[int]:
    """Complete versions of ``name``, ascending: ``vNNNN`` directories whose manifest parses
    and names that version. Files are not re-hashed here; ``load_manifest`` does that."""
    root = adapter_root(registry, name)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = VERSION_DIR_RE.match(p.name)
        if not m or not p.is_dir():
            continue
        try:
            manifest = parse_manifest(json.loads((p / MANIFEST_FILE).read_text()))
        except (OSError, ValueError, ManifestError):
            continue  # incomplete (crashed publish) or damaged: not a version
        if manifest.version == int(m.group(1)):
            out.append(manifest.version)
    return sorted(out)


def version_path(registry: Path, name: str, version: int) -> Path:
    return adapter_root(registry, name) / version_dir_name(version)


def read_state(registry: Path, name: str) -> State:
    """The adapter's ``state.json`` (an empty ``State`` if there is none yet)."""
    path = adapter_root(registry, name) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return State()
    except json.JSONDecodeError as e:
        raise PublishError(f"{path} is not valid JSON: {e}") from e
    try:
        history = tuple(
            Event(action=h["action"], version=int(h["version"]), at=str(h["at"]))
            for h in data["history"]
        )
        active = data["active"]
        return State(active=None if active is None else int(active), history=history)
    except (KeyError, TypeError, ValueError) as e:
        raise PublishError(f"{path} is malformed: {e!r}") from e


# ------------------------------------------------------------------------------ promotion


@contextlib.contextmanager
def _state_lock(root: Path) -> Iterator[None]:
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".state.lock").open("a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _write_state(root: Path, state: State) -> None:
    data = {
        "active": state.active,
        "history": [{"action": e.action, "version": e.version, "at": e.at} for e in state.history],
    }
    fd, tmp = tempfile.mkstemp(dir=root, prefix=f".{STATE_FILE}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / STATE_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(root)


def promote(registry: Path, name: str, version: int) -> State:
    """Make ``version`` the active one, after verifying it loads (``ManifestError`` if not).
    Promoting the already active version changes nothing. Returns the new state."""
    root = adapter_root(registry, name)
    load_manifest(root / version_dir_name(version))
    with _state_lock(root):
        state = read_state(registry, name)
        if state.active == version:
            return state
        new = State(version, (*state.history, Event("promote", version, now_iso())))
        _write_state(root, new)
        return new


def rollback(registry: Path, name: str) -> State:
    """Return to the version promoted before the active one (repeatable down the promotion
    stack), after verifying it still loads. ``PublishError`` if there is nothing to go back to.
    """
    root = adapter_root(registry, name)
    with _state_lock(root):
        state = read_state(registry, name)
        stack = state.stack()
        if len(stack) < 2:
            raise PublishError(f"adapter {name!r} has no earlier promoted version to roll back to")
        target = stack[-2]
        load_manifest(root / version_dir_name(target))
        new = State(target, (*state.history, Event("rollback", target, now_iso())))
        _write_state(root, new)
        return new


def cleanup_partials(registry: Path, name: str, *, min_age_s: float = 3600.0) -> list[Path]:
    """Remove crashed publishes' leftovers older than ``min_age_s`` (by mtime): staging
    directories, claim files, ``vNNNN`` directories without a manifest, and temporary state
    files. Returns what was removed. Keep ``min_age_s`` above the longest publish, or call it
    while no publisher runs: a younger leftover may belong to a publish in progress."""
    root = adapter_root(registry, name)
    if not root.is_dir():
        return []
    cutoff = time.time() - min_age_s
    removed = []
    for p in sorted(root.iterdir()):
        partial = (
            p.name.startswith(STAGING_PREFIX)
            or CLAIM_RE.match(p.name) is not None
            or p.name.startswith(f".{STATE_FILE}.")
            or (
                VERSION_DIR_RE.match(p.name) is not None
                and p.is_dir()
                and not (p / MANIFEST_FILE).exists()
            )
        )
        if not partial or p.lstat().st_mtime > cutoff:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p)
    if removed:
        fsync_dir(root)
    return removed
