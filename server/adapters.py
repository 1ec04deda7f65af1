"""The server's table of loaded adapter versions and request routing to them.

Versions are immutable: a new version gets a new LoRA id; the table never mutates a loaded one.
Thread-safety: used from the event loop only.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .config import AdapterSource
from .engine import Engine
from .formats.errors import FailedPrecondition, InvalidArgument
from .formats.heads import HeadsManifest, attach_heads
from .formats.manifest import (
    Conditioning,
    Manifest,
    load_manifest,
    validate_name,
)
from .values import AdapterPick, ServedBy

log = logging.getLogger("tiller.adapters")


@dataclass(frozen=True)
class LoadedAdapter:
    """One adapter version as the server serves it. ``lora_id`` is None for the base model and for
    conditioning-only profiles."""

    name: str
    version: int
    path: Path | None
    lora_id: int | None
    manifest: Manifest | None
    heads: HeadsManifest | None = None  # attribute steering heads shipped in ``path``
    # The name the engine knows ``lora_id`` by (vLLM tells LoRA requests apart by name), which is
    # the first loader's when versions share weights.
    lora_name: str | None = None

    @property
    def conditioning(self) -> Conditioning | None:
        return self.manifest.conditioning if self.manifest else None

    @property
    def attributes(self) -> tuple[str, ...]:
        if self.heads is not None:
            return self.heads.names
        return self.manifest.attributes if self.manifest else ()


class AdapterTable:
    """Name -> versions; one active version per name; a default route for unnamed requests."""

    def __init__(self, engine: Engine, base_model: str, keep_versions: int = 2) -> None:
        self._engine = engine
        self._keep = max(1, keep_versions)  # active + previous stay loaded (rollback, pins)
        self._history: dict[str, list[int]] = {}
        self._inflight: Counter[tuple[str, int]] = Counter()
        self._base = LoadedAdapter(name="", version=0, path=None, lora_id=None, manifest=None)
        self._base_model = base_model
        self._versions: dict[str, dict[int, LoadedAdapter]] = {}
        self._active: dict[str, int] = {}
        self._default: str | None = None
        self._ids = itertools.count(1)
        # Engine LoRAs by weight content (sha256 of the LoRA files): a version whose weights are
        # already loaded (a gate's candidate, published unchanged) reuses that LoRA id, so
        # promoting it only switches the route. ``_lora_users`` counts table entries per id.
        self._lora_by_weights: dict[tuple[str, ...], int] = {}
        self._lora_names: dict[int, str] = {}  # the engine's name of each id
        self._lora_users: Counter[int] = Counter()

    @property
    def base_model(self) -> str:
        return self._base_model

    async def load(
        self,
        source: AdapterSource,
        *,
        activate: bool | None = None,
    ) -> LoadedAdapter:
        """Verify (sha256 of every file) and load a version directory under a new LoRA id.

        ``activate=None`` activates it if it is the newest version of its name. Loading a
        version that is already loaded only (re)activates it: versions are immutable.
        Where the directory may come from is the caller's decision (``registry.admin_source``).
        """
        name = validate_name(source.name)
        t0 = time.perf_counter()
        manifest = load_manifest(source.path)
        verified = time.perf_counter()
        if manifest.name != name:
            raise InvalidArgument(
                f"{source.path} holds adapter {manifest.name!r}, not {name!r}", field="name"
            )
        loaded = self._versions.get(name, {}).get(manifest.version)
        if loaded is None:
            heads = attach_heads(source.path, manifest.attributes, self._engine.steering_dims)
            lora_id = lora_name = None
            if manifest.has_lora:
                lora_id, lora_name, how = await self._engine_lora(name, manifest, source.path)
                log.info(
                    "loaded %s v%d: verify %.3f s, %s %.3f s",
                    name, manifest.version, verified - t0, how, time.perf_counter() - verified,
                )  # fmt: skip
            loaded = LoadedAdapter(
                name,
                manifest.version,
                source.path,
                lora_id,
                manifest,
                heads,
                lora_name=lora_name,
            )
            self._versions.setdefault(name, {})[manifest.version] = loaded
        if activate is None:
            activate = manifest.version >= self._active.get(name, 0)
        if activate:
            await self.activate(name, manifest.version)
        return loaded

    async def _engine_lora(self, name: str, manifest: Manifest, path: Path) -> tuple[int, str, str]:
        """(id, engine name, how) of the engine LoRA serving ``manifest``'s weights: one already
        loaded with the same files, else a new one (``add_lora``: vLLM loads it between steps)."""
        key = lora_weights_key(manifest)
        lora_id = self._lora_by_weights.get(key)
        how = "same weights already in the engine: reused LoRA id"
        if lora_id is None:
            lora_id = next(self._ids)
            self._lora_names[lora_id] = f"{name}@v{manifest.version}"
            await self._engine.add_lora(self._lora_names[lora_id], lora_id, str(path))
            self._lora_by_weights[key] = lora_id
            how = "engine add_lora"
        self._lora_users[lora_id] += 1
        return lora_id, self._lora_names[lora_id], how

    async def _drop_lora(self, lora_id: int) -> None:
        """One table entry fewer uses ``lora_id``; the engine forgets it with the last one."""
        self._lora_users[lora_id] -= 1
        if self._lora_users[lora_id] > 0:
            return
        del self._lora_users[lora_id], self._lora_names[lora_id]
        key = next(k for k, v in self._lora_by_weights.items() if v == lora_id)
        del self._lora_by_weights[key]
        await self._engine.remove_lora(lora_id)

    def active_version(self, name: str) -> int | None:
        return self._active.get(name)

    async def activate(self, name: str, version: int) -> LoadedAdapter:
        """Route new requests for ``name`` to ``version``; older versions beyond the kept
        ones are removed from the engine once their in-flight requests have finished."""
        loaded = self.resolve(AdapterPick(name, version))
        if self._active.get(name) != version:
            self._active[name] = version
            self._history.setdefault(name, []).append(version)
        await self._retire(name)
        return loaded

    async def rollback(self, name: str) -> LoadedAdapter:
        """Re-activate the version that was active before the current one."""
        stack = self._history.get(name, [])
        if len(stack) < 2:
            raise FailedPrecondition(f"adapter {name!r} has no earlier version to roll back to")
        stack.pop()
        previous = stack[-1]
        if previous not in self._versions.get(name, {}):
            raise FailedPrecondition(f"adapter {name!r} v{previous} is no longer loaded")
        self._active[name] = previous
        return self._versions[name][previous]

    def acquire(self, name: str, version: int) -> None:
        """Count a request on a version: it is not removed while requests use it."""
        self._inflight[(name, version)] += 1

    async def release(self, name: str, version: int) -> None:
        key = (name, version)
        self._inflight[key] -= 1
        if self._inflight[key] <= 0:
            del self._inflight[key]
            if name:
                await self._retire(name)

    async def _retire(self, name: str) -> None:
        """Remove drained versions older than the active one beyond the kept ones. Versions
        loaded without activation that are newer than the active one (or of a name never
        activated) are staged on purpose (pinned use, a gate's candidate): they stay."""
        active = self._active.get(name)
        keep = set(self._history.get(name, [])[-self._keep :]) | {active}
        for version in sorted(self._versions.get(name, {})):
            if version in keep or self._inflight.get((name, version)):
                continue
            if active is None or version > active:
                continue
            gone = self._versions[name].pop(version)
            if gone.lora_id is not None:
                await self._drop_lora(gone.lora_id)

    def set_default(self, name: str | None) -> None:
        if name is not None and name not in self._active:
            raise InvalidArgument(
                f"default adapter {name!r} is not loaded; loaded: {self._names()}",
                field="default_adapter",
            )
        self._default = name

    def _names(self) -> str:
        return ", ".join(sorted(self._active)) or "(none)"

    def resolve(self, pick: AdapterPick) -> LoadedAdapter:
        """The version serving ``pick``; the default route (or the base model) when unnamed."""
        name = pick.name or self._default
        if name is None or name == "base":
            if pick.version is not None:
                raise InvalidArgument("adapter.version needs adapter.name", field="adapter.version")
            return self._base
        versions = self._versions.get(name)
        if versions is None:
            raise InvalidArgument(
                f"unknown adapter {name!r}; loaded: base, {self._names()}", field="adapter.name"
            )
        version = pick.version if pick.version is not None else self._active.get(name)
        if version is not None and version in versions:
            return versions[version]
        have = ", ".join(str(v) for v in sorted(versions))  # for the error only: not per request
        if version is None:  # loaded (staged) but never activated
            raise FailedPrecondition(
                f"adapter {name!r} has no active version; loaded versions: {have} "
                "(activate one, or pin it with adapter.version)"
            )
        raise InvalidArgument(
            f"adapter {name!r} has no loaded version {version}; loaded versions: {have}",
            field="adapter.version",
        )

    def served_by(self, adapter: LoadedAdapter) -> ServedBy:
        return ServedBy(adapter.name, adapter.version, self._base_model)

    def snapshot(self) -> list[tuple[str, int, list[LoadedAdapter], bool]]:
        """(name, active version, versions, is_default) for every loaded name, base first."""
        rows = [("base", 0, [self._base], self._default is None)]
        for name in sorted(self._versions):
            versions = [self._versions[name][v] for v in sorted(self._versions[name])]
            # 0: loaded but never activated (LoadAdapter without activation; pinned use only)
            rows.append((name, self._active.get(name, 0), versions, self._default == name))
        return rows


def lora_weights_key(manifest: Manifest) -> tuple[str, ...]:
    """What identifies a version's LoRA weights: the sha256 of its peft files."""
    return tuple(
        f"{rel}:{digest}"
        for rel, digest in sorted(manifest.files.items())
        if rel in ("adapter_config.json", "adapter_model.safetensors")
    )
