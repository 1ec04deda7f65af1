"""The adapter registry on disk: immutable version directories, published atomically.

Layout::

    <registry>/<adapter>/v0001/            a version: peft files + tiller-manifest.json
    <registry>/<adapter>/v0002/
    <registry>/<adapter>/state.json        {"active": 2, "history": [{action, version, at}, ...]}
    <registry>/<adapter>/.state.lock       flock for state.json updates
    <registry>/<adapter>/.staging-*/       a publish in progress (or a crashed one)
    <registry>/<adapter>/.claim-v0003      a version number taken by a publisher

``publish`` copies the files into a dot-named staging directory (never holding a manifest, so
``load_manifest`` fails on it and listings skip it), fsyncs them, takes the next number by
creating its claim file with ``O_EXCL`` (two publishers never get the same number), renames
the staging directory to ``vNNNN`` (a name nobody else may use), and only then writes the
manifest with ``server.manifest.write_manifest`` and fsyncs it. A version is complete, and
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
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from tiller.server.adapters import validate_name
from tiller.server.manifest import (
    MANIFEST_FILE,
    Conditioning,
    Manifest,
    ManifestError,
    load_manifest,
    parse_manifest,
    write_manifest,
)
from tiller.server.steering.heads import HEADS_MANIFEST

STATE_FILE = "state.json"
STAGING_PREFIX = ".staging-"
CLAIM_PREFIX = ".claim-"
_VERSION = re.compile(r"^v(\d{4,})$")
_CLAIM = re.compile(r"^\.claim-v(\d{4,})$")
ALLOWED_SUFFIXES = (".safetensors", ".json", ".md", ".txt", ".jinja", ".model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
REQUIRED_LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
_MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB


class PublishError(Exception):
    """The adapter cannot be published or the registry cannot do what was asked."""


@dataclass(frozen=True, kw_only=True)
class Release:
    """What a new version's manifest records besides its files.

    ``base_model_dir``, when given, is fingerprinted (``base_model_fingerprint``) so a loader
    can refuse a LoRA trained on a different base. The mappings must be JSON-serialisable.
    """

    base_model: str
    base_model_dir: Path | None = None
    conditioning: Conditioning | None = None
    attributes: tuple[str, ...] = ()
    objective: str = ""
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    data_window: Mapping[str, Any] = field(default_factory=dict)
    metrics: Mapping[str, Any] = field(default_factory=dict)


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


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def _copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new file ``dst`` and fsync it."""
    with src.open("rb") as i, dst.open("xb") as o:
        shutil.copyfileobj(i, o, 1 << 20)
        o.flush()
        os.fsync(o.fileno())


def _adapter_root(registry: Path, name: str) -> Path:
    """``registry/name``; ``InvalidArgument`` for a name the server would refuse."""
    return registry / validate_name(name)


def base_model_fingerprint(model_dir: Path) -> str:
    """sha256 over ``config.json``'s bytes and the sorted names and sizes of the weight files
    (``*.safetensors``, ``*.bin``, ``*.pt``, ``*.gguf``, ``*.index.json``): cheap, and it
    changes when the architecture or the checkpoint files change. Weights are not read."""
    config = model_dir / "config.json"
    if not config.is_file():
        raise PublishError(f"base model directory {model_dir} has no config.json")
    h = hashlib.sha256(config.read_bytes())
    for p in sorted(model_dir.iterdir()):
        if p.is_file() and (
            p.suffix in (".safetensors", ".bin", ".pt", ".gguf") or p.name.endswith(".index.json")
        ):
            h.update(f"\0{p.name}\0{p.stat().st_size}".encode())
    return h.hexdigest()


def check_safetensors(path: Path) -> None:
    """Raise ``PublishError`` unless ``path`` starts like a safetensors file (a little-endian
    header length, then a JSON object): a renamed pickle fails here, before anything loads it."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= min(_MAX_HEADER, size - 8):
            raise PublishError(f"{path.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PublishError(f"{path.name} is not a safetensors file (bad header)") from e
    if not isinstance(header, dict):
        raise PublishError(f"{path.name} is not a safetensors file (header is not an object)")


def adapter_files(adapter_dir: Path) -> list[Path]:
    """The files of a trained peft adapter to publish, checked: a flat directory of regular
    files with suffixes in ``ALLOWED_SUFFIXES``, holding ``REQUIRED_LORA_FILES`` (or, for a
    heads-only version, steering heads and no LoRA), whose safetensors files look like
    safetensors. Pickled weights are refused by name."""
    if not adapter_dir.is_dir():
        raise PublishError(f"adapter directory {adapter_dir} does not exist")
    files = []
    for p in sorted(adapter_dir.iterdir()):
        if p.is_symlink() or not p.is_file():
            raise PublishError(f"{p.name} in {adapter_dir}: only regular files can be published")
        if p.suffix in PICKLE_SUFFIXES:
            raise PublishError(
                f"{p.name} is a pickle checkpoint; publish safetensors only "
                "(save_pretrained(..., safe_serialization=True)) and leave pickles out"
            )
        if p.suffix not in ALLOWED_SUFFIXES or p.name == MANIFEST_FILE:
            raise PublishError(
                f"{p.name}: not a publishable adapter file; allowed: {', '.join(ALLOWED_SUFFIXES)}"
            )
        if p.suffix == ".safetensors":
            check_safetensors(p)
        files.append(p)
    missing = [n for n in REQUIRED_LORA_FILES if not (adapter_dir / n).is_file()]
    heads_only = (
        len(missing) == len(REQUIRED_LORA_FILES) and (adapter_dir / HEADS_MANIFEST).is_file()
    )
    if missing and not heads_only:
        raise PublishError(f"adapter directory {adapter_dir} lacks {', '.join(missing)}")
    return files


# ------------------------------------------------------------------------------ publishing


def _taken(root: Path) -> int:
    """The highest version number used by a directory or a claim (0 if none)."""
    top = 0
    for p in root.iterdir():
        m = _VERSION.match(p.name) or _CLAIM.match(p.name)
        if m:
            top = max(top, int(m.group(1)))
    return top


def _claim(root: Path) -> tuple[int, Path]:
    """Take the next free version number by creating its claim file exclusively; on return,
    no ``vNNNN`` directory of that number exists and no other publisher will make one."""
    while True:
        version = _taken(root) + 1
        claim = root / f"{CLAIM_PREFIX}{version_dir_name(version)}"
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            continue  # another publisher took it between our scan and our create
        if (root / version_dir_name(version)).exists():
            # Our scan missed a version finished meanwhile (its claim already gone), or a
            # directory was made by hand: never rename onto it; the next scan counts it.
            os.close(fd)
            claim.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        _fsync_dir(root)
        return version, claim


def publish(registry: Path, name: str, adapter_dir: Path | None, release: Release) -> Path:
    """Publish ``adapter_dir`` (a peft adapter) as the next version of ``name``; return its path.

    ``adapter_dir=None`` publishes a conditioning-only profile (``release.conditioning`` is
    then required). Safe against concurrent publishers and crashes (module docstring); the
    returned directory has passed ``load_manifest`` with hash verification. Raises
    ``PublishError`` for a bad adapter directory or release, ``InvalidArgument`` (from
    ``server.adapters.validate_name``) for a bad name, ``OSError`` for I/O failures; a failed
    publish removes what it made and leaves no loadable version behind.
    """
    root = _adapter_root(registry, name)
    files = adapter_files(adapter_dir) if adapter_dir is not None else []
    if adapter_dir is None and release.conditioning is None:
        raise PublishError("a version without LoRA weights needs release.conditioning")
    extra = {
        "base_model_fingerprint": (
            base_model_fingerprint(release.base_model_dir) if release.base_model_dir else ""
        ),
        "objective": release.objective,
        "hyperparameters": dict(release.hyperparameters),
        "data_window": dict(release.data_window),
        "metrics": dict(release.metrics),
    }
    try:
        json.dumps(extra, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PublishError(f"release fields must be JSON-serialisable: {e}") from e
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=root))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the version from a server run as another user
    claim: Path | None = None
    target: Path | None = None
    try:
        for src in files:
            _copy_file(src, staging / src.name)
        _fsync_dir(staging)
        version, claim = _claim(root)
        target = root / version_dir_name(version)
        os.rename(staging, target)
        _fsync_dir(root)
        manifest = Manifest(
            name=name,
            version=version,
            base_model=release.base_model,
            conditioning=release.conditioning,
            attributes=release.attributes,
            has_lora=adapter_dir is not None and (adapter_dir / "adapter_config.json").is_file(),
            created_at=_now(),
            extra=extra,
        )
        write_manifest(target, manifest)
        _fsync_file(target / MANIFEST_FILE)
        _fsync_dir(target)
        load_manifest(target)  # re-hash what is on disk: the copy is what was trained
    except BaseException:
        for leftover in (staging, target):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
        if claim is not None:
            claim.unlink(missing_ok=True)
        raise
    claim.unlink()
    _fsync_dir(root)
    return target


# ------------------------------------------------------------------------------ reading


def list_versions(registry: Path, name: str) -> list[int]:
    """Complete versions of ``name``, ascending: ``vNNNN`` directories whose manifest parses
    and names that version. Files are not re-hashed here; ``load_manifest`` does that."""
    root = _adapter_root(registry, name)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _VERSION.match(p.name)
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
    return _adapter_root(registry, name) / version_dir_name(version)


def read_state(registry: Path, name: str) -> State:
    """The adapter's ``state.json`` (an empty ``State`` if there is none yet)."""
    path = _adapter_root(registry, name) / STATE_FILE
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
    _fsync_dir(root)


def promote(registry: Path, name: str, version: int) -> State:
    """Make ``version`` the active one, after verifying it loads (``ManifestError`` if not).
    Promoting the already active version changes nothing. Returns the new state."""
    root = _adapter_root(registry, name)
    load_manifest(root / version_dir_name(version))
    with _state_lock(root):
        state = read_state(registry, name)
        if state.active == version:
            return state
        new = State(version, (*state.history, Event("promote", version, _now())))
        _write_state(root, new)
        return new


def rollback(registry: Path, name: str) -> State:
    """Return to the version promoted before the active one (repeatable down the promotion
    stack), after verifying it still loads. ``PublishError`` if there is nothing to go back to.
    """
    root = _adapter_root(registry, name)
    with _state_lock(root):
        state = read_state(registry, name)
        stack = state.stack()
        if len(stack) < 2:
            raise PublishError(f"adapter {name!r} has no earlier promoted version to roll back to")
        target = stack[-2]
        load_manifest(root / version_dir_name(target))
        new = State(target, (*state.history, Event("rollback", target, _now())))
        _write_state(root, new)
        return new


def cleanup_partials(registry: Path, name: str, *, min_age_s: float = 3600.0) -> list[Path]:
    """Remove crashed publishes' leftovers older than ``min_age_s`` (by mtime): staging
    directories, claim files, ``vNNNN`` directories without a manifest, and temporary state
    files. Returns what was removed. Keep ``min_age_s`` above the longest publish, or call it
    while no publisher runs: a younger leftover may belong to a publish in progress."""
    root = _adapter_root(registry, name)
    if not root.is_dir():
        return []
    cutoff = time.time() - min_age_s
    removed = []
    for p in sorted(root.iterdir()):
        partial = (
            p.name.startswith(STAGING_PREFIX)
            or _CLAIM.match(p.name) is not None
            or p.name.startswith(f".{STATE_FILE}.")
            or (
                _VERSION.match(p.name) is not None
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
        _fsync_dir(root)
    return removed
