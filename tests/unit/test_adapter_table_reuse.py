"""AdapterTable: a version whose LoRA weights are already in the engine reuses that LoRA id, and
the engine forgets an id only when no loaded version uses it any more."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import cast

from tests.conftest import make_lora_version
from tiller.server.adapters import AdapterTable
from tiller.server.config import AdapterSource
from tiller.server.engine import Engine
from tiller.server.formats.manifest import load_manifest, write_manifest


class RecordingEngine:
    """The two engine calls the table makes, recorded (the real engine is tested in
    tests/integration/test_hotswap.py)."""

    steering_dims = None

    def __init__(self) -> None:
        self.loaded: dict[int, str] = {}
        self.adds = 0

    async def add_lora(self, name: str, lora_id: int, path: str) -> None:
        assert lora_id not in self.loaded, "one id added twice"
        self.loaded[lora_id] = name
        self.adds += 1

    async def remove_lora(self, lora_id: int) -> None:
        del self.loaded[lora_id]


def _copy_as(src: Path, out: Path, name: str, version: int) -> Path:
    """The same weights under another name and version (a candidate published unchanged)."""
    shutil.copytree(src, out)
    m = load_manifest(out)
    write_manifest(out, type(m)(**{**m.__dict__, "name": name, "version": version}))
    return out


async def test_published_candidate_reuses_the_lora_and_is_removed_last(
    tiny_model: Path, tmp_path: Path
) -> None:
    engine = RecordingEngine()
    table = AdapterTable(cast(Engine, engine), "tiny-llama", keep_versions=1)
    cands = [
        make_lora_version(
            tiny_model, tmp_path / f"cand{i}", name="detox-candidate", version=i, seed=50 + i
        )
        for i in (1, 2, 3)
    ]
    cand1 = await table.load(AdapterSource("detox-candidate", cands[0]), activate=True)
    published = _copy_as(cands[0], tmp_path / "v1", "detox", 1)
    v1 = await table.load(AdapterSource("detox", published), activate=True)
    assert engine.adds == 1 and v1.lora_id == cand1.lora_id
    assert v1.lora_name == cand1.lora_name == "detox-candidate@v1"  # one engine name per id

    # The candidate name moves on twice (keep 1): candidate v1 is retired from the table, but
    # its LoRA stays in the engine while detox v1 serves it.
    await table.load(AdapterSource("detox-candidate", cands[1]), activate=True)
    await table.load(AdapterSource("detox-candidate", cands[2]), activate=True)
    assert v1.lora_id in engine.loaded
    assert len(engine.loaded) == 2  # candidate v3 and the shared one

    # detox moves on to candidate v3's weights (reused again), then v1 is retired: gone.
    v2 = await table.load(
        AdapterSource("detox", _copy_as(cands[2], tmp_path / "v2", "detox", 2)), activate=True
    )
    assert engine.adds == 3
    assert v1.lora_id not in engine.loaded and v2.lora_id in engine.loaded


async def test_different_weights_get_their_own_lora(tiny_model: Path, tmp_path: Path) -> None:
    engine = RecordingEngine()
    table = AdapterTable(cast(Engine, engine), "tiny-llama")
    a = make_lora_version(tiny_model, tmp_path / "a", name="detox", version=1, seed=1)
    b = make_lora_version(tiny_model, tmp_path / "b", name="detox", version=2, seed=2)
    la = await table.load(AdapterSource("detox", a))
    lb = await table.load(AdapterSource("detox", b))
    assert la.lora_id != lb.lora_id and engine.adds == 2
