"""The publish stage: an immutable version with its verdict, metrics and data window; promoted
when the gate passed (no gate: always), then awaited until the server serves it; and the
feedback-to-served time of a served version (``feedback_to_served``)."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tiller.client import AsyncClient
from tiller.server.formats.logstore import Status
from tiller.server.formats.manifest import load_manifest
from tiller.server.formats.publish import Release, publish
from tiller.server.formats.registry import list_versions, promote, version_path

from .config import LearnConfig
from .gate import Verdict
from .served import conditioning
from .train import hyperparameters, objective


@dataclass(frozen=True)
class DataWindow:
    """What a version was trained on, as its manifest records it (``data_window``)."""

    iteration: int
    annotation_seq: tuple[int, int]  # (cursor, upto): the labels this iteration consumed
    examples: int
    served_version: int | None
    skipped: Mapping[str, int]
    shard_cursors: Mapping[str, int] | None = None  # per log shard, the labels' upper seq
    sampled_version: int | None = None  # active sampling's version (0: base); None: none

    def to_json(self) -> dict[str, Any]:
        out = {
            "iteration": self.iteration,
            "annotation_seq": list(self.annotation_seq),
            "examples": self.examples,
            "served_version": self.served_version,
            "skipped": dict(self.skipped),
        }
        if self.shard_cursors is not None:
            out["shard_cursors"] = dict(self.shard_cursors)
        if self.sampled_version is not None:
            out["sampled_version"] = self.sampled_version
        return out


@dataclass(frozen=True)
class Published:
    """The published version and what became of it (``promoted`` or ``rejected``; a version
    published without a gate verdict is promoted); ``swap_s``: seconds until served,
    ``served_at``: when (epoch seconds; None when not promoted or no server was asked)."""

    version: int
    path: Path  # the version's directory in the registry
    status: Status
    swap_s: float | None = None
    served_at: float | None = None
    reused: bool = False  # published before a crash, found again rather than published twice


def _find_version(
    registry: Path, adapter: str, match: Callable[[Mapping[str, Any]], bool]
) -> int | None:
    """The newest version whose manifest's ``data_window`` satisfies ``match``."""
    for v in reversed(list_versions(registry, adapter)):
        extra = load_manifest(version_path(registry, adapter, v), verify=False).extra
        if match(extra.get("data_window", {})):
            return v
    return None


def published_by(cfg: LearnConfig, window: DataWindow) -> int | None:
    """The version this iteration already published, if a learner killed between publishing and
    recording it left one: the same iteration number over the same label window. Reusing it
    makes a restarted iteration publish exactly once."""
    want = window.to_json()
    keys = ("iteration", "annotation_seq")
    return _find_version(
        cfg.registry, cfg.adapter, lambda got: all(got.get(k) == want[k] for k in keys)
    )


def bootstrap_version(registry: Path, adapter: str) -> int | None:
    """The adapter's conditioning-only bootstrap version (ALT), if one was published."""
    return _find_version(registry, adapter, lambda got: bool(got.get("bootstrap")))


async def wait_served(
    client: AsyncClient, adapter: str, version: int, timeout_s: float = 120.0
) -> float:
    """Seconds until the server's active version of ``adapter`` is ``version``;
    ``TimeoutError`` after ``timeout_s``."""
    began = time.monotonic()
    while True:
        for a in await client.adapters():
            if a.name == adapter and a.active_version == version:
                return time.monotonic() - began
        if time.monotonic() - began > timeout_s:
            raise TimeoutError(f"the server did not serve {adapter}@v{version}")
        await asyncio.sleep(0.2)


async def publish_iteration(
    cfg: LearnConfig,
    client: AsyncClient | None,
    adapter_dir: Path,
    window: DataWindow,
    metrics: Mapping[str, Any],
    verdict: Verdict | None,
) -> Published:
    """Publish the trained adapter (or find the version a crashed run published), promote it
    unless the gate failed, and with ``client`` wait until the server serves it."""
    reused = published_by(cfg, window)
    if reused is None:
        release = Release(
            base_model=cfg.base_model,
            base_model_dir=cfg.model,
            conditioning=conditioning(cfg),
            attributes=cfg.data.attributes,
            objective=objective(cfg),
            hyperparameters=hyperparameters(cfg),
            data_window=window.to_json(),
            metrics=dict(metrics),
        )
        path = publish(cfg.registry, cfg.adapter, adapter_dir, release)
        version = load_manifest(path, verify=False).version  # publish verified it
    else:
        version = reused
    path = version_path(cfg.registry, cfg.adapter, version)
    if verdict is not None and not verdict.passed:
        return Published(version, path, "rejected", reused=reused is not None)
    promote(cfg.registry, cfg.adapter, version)
    swap_s = await wait_served(client, cfg.adapter, version) if client is not None else None
    served_at = time.time() if swap_s is not None else None
    return Published(version, path, "promoted", swap_s, served_at, reused=reused is not None)


def feedback_to_served(
    label_times: Sequence[float], served_at: float
) -> tuple[float | None, float | None]:
    """Median and max seconds from each label landing in the log (``label_times``) to the
    version trained on them being served; ``(None, None)`` without labels."""
    waits = [served_at - t for t in label_times]
    if not waits:
        return None, None
    return statistics.median(waits), max(waits)


async def publish_bootstrap(cfg: LearnConfig, client: AsyncClient | None) -> int:
    """Publish (or find, after a crashed start) and promote ALT's conditioning-only version:
    the base weights with the tag template, no LoRA; with ``client``, wait until served."""
    version = bootstrap_version(cfg.registry, cfg.adapter)
    if version is None:
        release = Release(
            base_model=cfg.base_model,
            base_model_dir=cfg.model,
            conditioning=conditioning(cfg),
            objective="none",
            data_window={"bootstrap": True},
        )
        path = publish(cfg.registry, cfg.adapter, None, release)
        version = load_manifest(path, verify=False).version  # publish verified it
    promote(cfg.registry, cfg.adapter, version)
    if client is not None:
        await wait_served(client, cfg.adapter, version)
    return version
