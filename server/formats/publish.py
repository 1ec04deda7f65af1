"""Publishing a trained adapter as the next immutable registry version (see ``registry``).

Files are copied into a staging directory and fsynced, the version number is claimed with
``O_EXCL``, the directory renamed into place, and only then is the manifest written: a crash at
any step leaves nothing ``load_manifest`` accepts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .heads import HEADS_MANIFEST
from .manifest import (
    MANIFEST_FILE,
    PICKLE_SUFFIXES,
    Conditioning,
    Manifest,
    load_manifest,
    write_manifest,
)
from .registry import (
    CLAIM_PREFIX,
    CLAIM_RE,
    STAGING_PREFIX,
    VERSION_DIR_RE,
    PublishError,
    adapter_root,
    fsync_dir,
    fsync_file,
    now_iso,
    version_dir_name,
)

ALLOWED_SUFFIXES = (".safetensors", ".json", ".md", ".txt", ".jinja", ".model")
REQUIRED_LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
_MAX_HEADER = 100 << 20  # safetensors caps its JSON header at 100 MB


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


def _copy_file(src: Path, dst: Path) -> None:
    """Copy ``src`` to a new file ``dst`` and fsync it."""
    with src.open("rb") as i, dst.open("xb") as o:
        shutil.copyfileobj(i, o, 1 << 20)
        o.flush()
        os.fsync(o.fileno())


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


def _taken(root: Path) -> int:
    """The highest version number used by a directory or a claim (0 if none)."""
    top = 0
    for p in root.iterdir():
        m = VERSION_DIR_RE.match(p.name) or CLAIM_RE.match(p.name)
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
        fsync_dir(root)
        return version, claim


def publish(registry: Path, name: str, adapter_dir: Path | None, release: Release) -> Path:
    """Publish ``adapter_dir`` (a peft adapter) as the next version of ``name``; return its path.

    ``adapter_dir=None`` publishes a conditioning-only profile (``release.conditioning`` is
    then required). Safe against concurrent publishers and crashes (module docstring); the
    returned directory has passed ``load_manifest`` with hash verification. Raises
    ``PublishError`` for a bad adapter directory or release, ``InvalidArgument`` (from
    ``manifest.validate_name``) for a bad name, ``OSError`` for I/O failures; a failed
    publish removes what it made and leaves no loadable version behind.
    """
    root = adapter_root(registry, name)
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
        fsync_dir(staging)
        version, claim = _claim(root)
        target = root / version_dir_name(version)
        os.rename(staging, target)
        fsync_dir(root)
        manifest = Manifest(
            name=name,
            version=version,
            base_model=release.base_model,
            conditioning=release.conditioning,
            attributes=release.attributes,
            has_lora=adapter_dir is not None and (adapter_dir / "adapter_config.json").is_file(),
            created_at=now_iso(),
            extra=extra,
        )
        write_manifest(target, manifest)
        fsync_file(target / MANIFEST_FILE)
        fsync_dir(target)
        load_manifest(target)  # re-hash what is on disk: the copy is what was trained
    except BaseException:
        for leftover in (staging, target):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
        if claim is not None:
            claim.unlink(missing_ok=True)
        raise
    claim.unlink()
    fsync_dir(root)
    return target
