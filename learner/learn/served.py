"""What the server serves for the learner's adapter, read from the registry (all stages use it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tiller.server.formats.manifest import DEFAULT_TEMPLATE, Conditioning, Manifest, load_manifest
from tiller.server.formats.registry import read_state, version_path

from .config import LearnConfig


@dataclass(frozen=True)
class Served:
    """The version being served: ``version=None`` before the first promotion (the base)."""

    version: int | None
    path: Path | None
    manifest: Manifest | None

    def label(self, adapter: str) -> str:
        return f"{adapter}@v{self.version}" if self.version is not None else "the base model"


def served(cfg: LearnConfig) -> Served:
    """The registry's active version of ``cfg.adapter`` (what the server swaps to)."""
    active = read_state(cfg.registry, cfg.adapter).active
    if active is None:
        return Served(None, None, None)
    path = version_path(cfg.registry, cfg.adapter, active)
    return Served(active, path, load_manifest(path))


def conditioning(cfg: LearnConfig) -> Conditioning | None:
    """The tag template every version of an ALT adapter carries (None for other data kinds)."""
    if cfg.data.kind != "alt":
        return None
    return Conditioning(
        tags=cfg.data.tags,
        template=cfg.data.template or DEFAULT_TEMPLATE,
        separator=cfg.data.separator,
    )
