"""Adapter version manifests: what a version directory promises about itself.

A version directory holds ``tiller-manifest.json`` and, for LoRA versions, a peft adapter
(``adapter_config.json`` + ``adapter_model.safetensors``). A version without LoRA weights is a
*conditioning profile*: it only names the feedback vocabulary and how prompts are conditioned.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import InvalidArgument, PermissionDenied

MANIFEST_FILE = "tiller-manifest.json"
DEFAULT_TEMPLATE = "{feedback} input: {prompt}"
DEFAULT_SEPARATOR = "<|separator|>"
# Weights that unpickle (run code) when loaded: a version directory holding one is refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
Placement = Literal["prefix", "system"]
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ManifestError(InvalidArgument):
    """A manifest is missing, malformed, or does not match the files beside it."""


@dataclass(frozen=True)
class Conditioning:
    """How a feedback tag conditions a prompt (ALT: ``"<feedback> input: <prompt>"`` + separator).

    ``placement='prefix'`` renders ``template`` around the prompt (for chat: the last user turn);
    ``placement='system'`` puts ``system_template`` in the system message of a chat.
    """

    tags: tuple[str, ...]
    template: str = DEFAULT_TEMPLATE
    separator: str = DEFAULT_SEPARATOR
    placement: Placement = "prefix"
    system_template: str = "{feedback}"
    default_tag: str | None = None

    def __post_init__(self) -> None:
        if "{feedback}" not in self.template or "{prompt}" not in self.template:
            raise ManifestError("conditioning.template must contain {feedback} and {prompt}")
        if self.placement not in ("prefix", "system"):
            raise ManifestError(
                f"conditioning.placement {self.placement!r} is not one of: prefix, system"
            )
        if len(set(self.tags)) != len(self.tags):
            raise ManifestError("conditioning.tags has duplicates")
        if self.default_tag is not None and self.default_tag not in self.tags:
            raise ManifestError(f"conditioning.default_tag {self.default_tag!r} is not in tags")


@dataclass(frozen=True)
class Manifest:
    name: str
    version: int
    base_model: str
    conditioning: Conditioning | None = None
    attributes: tuple[str, ...] = ()
    has_lora: bool = False
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    created_at: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        cond = None
        if self.conditioning is not None:
            c = self.conditioning
            cond = {
                "tags": list(c.tags),
                "template": c.template,
                "separator": c.separator,
                "placement": c.placement,
                "system_template": c.system_template,
                "default_tag": c.default_tag,
            }
        return {
            "format": 1,
            "name": self.name,
            "version": self.version,
            "base_model": self.base_model,
            "conditioning": cond,
            "attributes": list(self.attributes),
            "has_lora": self.has_lora,
            "files": dict(self.files),
            "created_at": self.created_at,
            "extra": self.extra,
        }


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_manifest(data: dict[str, Any]) -> Manifest:
    """Build a ``Manifest`` from its JSON form; raises ``ManifestError`` naming the bad field."""
    try:
        cond_data = data.get("conditioning")
        cond = None
        if cond_data is not None:
            cond = Conditioning(
                tags=tuple(str(t) for t in cond_data.get("tags", ())),
                template=cond_data.get("template", DEFAULT_TEMPLATE),
                separator=cond_data.get("separator", DEFAULT_SEPARATOR),
                placement=cond_data.get("placement", "prefix"),
                system_template=cond_data.get("system_template", "{feedback}"),
                default_tag=cond_data.get("default_tag"),
            )
        version = int(data["version"])
        if version < 1:
            raise ManifestError("manifest.version must be >= 1")
        return Manifest(
            name=str(data["name"]),
            version=version,
            base_model=str(data.get("base_model", "")),
            conditioning=cond,
            attributes=tuple(str(a) for a in data.get("attributes", ())),
            has_lora=bool(data.get("has_lora", False)),
            files={str(k): str(v) for k, v in data.get("files", {}).items()},
            created_at=str(data.get("created_at", "")),
            extra=dict(data.get("extra", {})),
        )
    except KeyError as e:
        raise ManifestError(f"manifest is missing field {e.args[0]!r}") from e
    except (TypeError, ValueError, AttributeError) as e:
        if isinstance(e, ManifestError):
            raise
        raise ManifestError(f"manifest is malformed: {e}") from e


def load_manifest(version_dir: Path, *, verify: bool = True) -> Manifest:
    """Read and check ``version_dir/tiller-manifest.json``.

    With ``verify``, every file listed in ``files`` must exist with the recorded sha256, and a
    LoRA version must list its safetensors weights (no pickled weights are ever loaded).
    """
    path = version_dir / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ManifestError(f"no {MANIFEST_FILE} in {version_dir}") from e
    except json.JSONDecodeError as e:
        raise ManifestError(f"{path} is not valid JSON: {e}") from e
    manifest = parse_manifest(data)
    if verify:
        root = version_dir.resolve()
        for rel, digest in manifest.files.items():
            target = (version_dir / rel).resolve()
            if root not in target.parents:
                raise ManifestError(f"manifest file path {rel!r} escapes the version directory")
            if not target.is_file():
                raise ManifestError(f"manifest lists {rel!r} but it is missing")
            if sha256_file(target) != digest:
                raise ManifestError(f"sha256 of {rel!r} does not match the manifest")
        if manifest.has_lora and "adapter_model.safetensors" not in manifest.files:
            raise ManifestError("a LoRA version must list adapter_model.safetensors in files")
        pickled = sorted(
            str(p.relative_to(version_dir))
            for p in version_dir.rglob("*")
            if p.suffix.lower() in PICKLE_SUFFIXES
        )
        if pickled:
            raise ManifestError(
                f"{version_dir} holds pickled weights ({', '.join(pickled)}); only safetensors "
                "are loaded"
            )
    return manifest


def check_inside(path: Path, roots: tuple[Path, ...]) -> Path:
    """``path`` resolved (symlinks followed) if it lies inside one of ``roots``; else
    ``PermissionDenied`` naming the roots."""
    resolved = path.resolve()
    for root in roots:
        r = root.resolve()
        if resolved == r or r in resolved.parents:
            return resolved
    raise PermissionDenied(
        f"adapter path {str(path)!r} is outside the adapter roots: "
        + ", ".join(str(r) for r in roots),
        field="path",
    )


def write_manifest(version_dir: Path, manifest: Manifest) -> Manifest:
    """Hash the files in ``version_dir`` into the manifest and write it; return what was written."""
    files = {
        str(p.relative_to(version_dir)): sha256_file(p)
        for p in sorted(version_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST_FILE
    }
    done = Manifest(**{**manifest.__dict__, "files": files})
    (version_dir / MANIFEST_FILE).write_text(json.dumps(done.to_json(), indent=2) + "\n")
    return done


def validate_name(name: str) -> str:
    if not _NAME.match(name):
        raise InvalidArgument(
            f"adapter name {name!r} is invalid: use 1-64 letters, digits, '_', '.', '-'",
            field="adapter.name",
        )
    return name
