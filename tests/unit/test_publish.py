"""The adapter registry: atomic numbered versions, crash safety, promotion and rollback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from tiller.server.errors import InvalidArgument
from tiller.server.formats.manifest import MANIFEST_FILE, Conditioning, ManifestError, load_manifest
from tiller.server.formats.publish import Release, base_model_fingerprint, publish
from tiller.server.formats.registry import (
    PublishError,
    cleanup_partials,
    list_versions,
    promote,
    read_state,
    rollback,
)

COND = Conditioning(tags=("Good", "Bad"), default_tag="Good")


def make_adapter(path: Path, seed: int = 0) -> Path:
    """A peft-shaped adapter directory: config, safetensors weights, README."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    save_file(
        {"base_model.model.layers.0.q_proj.lora_A.weight": rng.standard_normal((4, 8), "float32")},
        str(path / "adapter_model.safetensors"),
    )
    (path / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    (path / "README.md").write_text("trained by a test\n")
    return path


def make_base(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text('{"model_type": "llama"}')
    (path / "model.safetensors").write_bytes(b"x" * 100)
    return path


def release(tmp_path: Path, **kw: object) -> Release:
    args: dict[str, object] = {
        "base_model": "tiny-llama",
        "base_model_dir": tmp_path / "base",
        "conditioning": COND,
        "objective": "alt",
        "hyperparameters": {"lr": 1e-4, "beta": 0.1},
        "data_window": {"first_seq": 1, "last_seq": 40, "examples": 32},
        "metrics": {"loss": 1.25},
    }
    args.update(kw)
    return Release(**args)  # type: ignore[arg-type]


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    make_base(tmp_path / "base")
    return tmp_path / "registry", make_adapter(tmp_path / "adapter")


def entries(registry: Path, name: str = "detox") -> list[str]:
    return sorted(p.name for p in (registry / name).iterdir())


def test_two_publishes_make_two_valid_versions(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    registry, adapter = setup
    v1 = publish(registry, "detox", adapter, release(tmp_path))
    v2 = publish(registry, "detox", adapter, release(tmp_path, objective="dpo"))
    assert (v1, v2) == (registry / "detox" / "v0001", registry / "detox" / "v0002")
    assert list_versions(registry, "detox") == [1, 2]
    assert entries(registry) == ["v0001", "v0002"]  # no claims, no staging left
    m1, m2 = load_manifest(v1), load_manifest(v2)
    assert (m1.name, m1.version, m1.base_model, m1.has_lora) == ("detox", 1, "tiny-llama", True)
    assert m2.version == 2 and m2.extra["objective"] == "dpo"
    assert m1.conditioning == COND
    assert set(m1.files) == {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    assert m1.extra == {
        "base_model_fingerprint": base_model_fingerprint(tmp_path / "base"),
        "objective": "alt",
        "hyperparameters": {"lr": 1e-4, "beta": 0.1},
        "data_window": {"first_seq": 1, "last_seq": 40, "examples": 32},
        "metrics": {"loss": 1.25},
    }
    assert m1.created_at.endswith("+00:00")
    assert (v1 / "adapter_model.safetensors").read_bytes() == (
        adapter / "adapter_model.safetensors"
    ).read_bytes()


def test_base_fingerprint_tracks_config_and_weight_files(tmp_path: Path) -> None:
    base = make_base(tmp_path / "base")
    before = base_model_fingerprint(base)
    (base / "model.safetensors").write_bytes(b"x" * 101)
    assert base_model_fingerprint(base) != before
    (base / "model.safetensors").write_bytes(b"y" * 100)  # same size: names and sizes only
    assert base_model_fingerprint(base) == before
    (base / "config.json").write_text('{"model_type": "mistral"}')
    assert base_model_fingerprint(base) != before


def test_tampered_file_fails_to_load_and_to_promote(
    tmp_path: Path, setup: tuple[Path, Path]
) -> None:
    registry, adapter = setup
    v1 = publish(registry, "detox", adapter, release(tmp_path))
    (v1 / "adapter_config.json").write_text('{"r": 64}')
    with pytest.raises(ManifestError, match=r"sha256 of 'adapter_config\.json'"):
        load_manifest(v1)
    with pytest.raises(ManifestError):
        promote(registry, "detox", 1)
    assert read_state(registry, "detox").active is None


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("training_args.bin", b"\x80\x04pickle", "pickle checkpoint"),
        ("adapter_model.pt", b"PK\x03\x04", "pickle checkpoint"),
        ("notes.py", b"print()", "not a publishable adapter file"),
    ],
)
def test_pickles_and_strangers_are_refused(
    tmp_path: Path, setup: tuple[Path, Path], name: str, content: bytes, message: str
) -> None:
    registry, adapter = setup
    (adapter / name).write_bytes(content)
    with pytest.raises(PublishError, match=message):
        publish(registry, "detox", adapter, release(tmp_path))
    assert not (registry / "detox").exists()


def test_renamed_pickle_and_missing_files_are_refused(
    tmp_path: Path, setup: tuple[Path, Path]
) -> None:
    registry, adapter = setup
    (adapter / "adapter_model.safetensors").write_bytes(b"\x80\x04\x95" + b"\0" * 64)
    with pytest.raises(PublishError, match="not a safetensors file"):
        publish(registry, "detox", adapter, release(tmp_path))
    (adapter / "adapter_model.safetensors").unlink()
    with pytest.raises(PublishError, match=r"lacks adapter_model\.safetensors"):
        publish(registry, "detox", adapter, release(tmp_path))
    with pytest.raises(InvalidArgument, match="adapter name"):
        publish(registry, "../escape", adapter, release(tmp_path))
    with pytest.raises(PublishError, match="JSON-serialisable"):
        publish(registry, "detox", None, release(tmp_path, metrics={"loss": float("nan")}))


def test_conditioning_only_profile(tmp_path: Path) -> None:
    make_base(tmp_path / "base")
    registry = tmp_path / "registry"
    path = publish(registry, "tags", None, release(tmp_path))
    m = load_manifest(path)
    assert (m.version, m.has_lora, m.files, m.conditioning) == (1, False, {}, COND)
    with pytest.raises(PublishError, match=r"needs release\.conditioning"):
        publish(registry, "tags", None, release(tmp_path, conditioning=None))


# ------------------------------------------------------------------------------ crashes

CHILD = """
import sys, time
from pathlib import Path
import tiller.server.formats.publish as P
from tiller.server.formats.manifest import Conditioning

stage = sys.argv[1]
registry, adapter, base = (Path(a) for a in sys.argv[2:5])
if stage == "copy":  # die between copying the files and taking a number
    real_copy = P._copy_file
    def slow_copy(src, dst):
        real_copy(src, dst)
        print("copied", flush=True)
        time.sleep(120)
    P._copy_file = slow_copy
elif stage == "manifest":  # die after the rename, before the manifest is written
    def slow_manifest(version_dir, manifest):
        print("renamed", flush=True)
        time.sleep(120)
    P.write_manifest = slow_manifest
path = P.publish(
    registry, "detox", adapter,
    P.Release(base_model="tiny", base_model_dir=base, conditioning=Conditioning(tags=("Good",))),
)
print(path, flush=True)
"""


def run_child(stage: str, registry: Path, adapter: Path, base: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), stage, *map(str, (registry, adapter, base))],
        stdout=subprocess.PIPE,
        text=True,
    )


def kill_when(child: subprocess.Popen[str], marker: str) -> None:
    assert child.stdout is not None
    line = child.stdout.readline()
    assert line.strip() == marker, line
    os.kill(child.pid, signal.SIGKILL)
    assert child.wait(timeout=30) == -signal.SIGKILL


def test_kill_9_while_copying_leaves_nothing_loadable(
    tmp_path: Path, setup: tuple[Path, Path]
) -> None:
    registry, adapter = setup
    publish(registry, "detox", adapter, release(tmp_path))
    kill_when(run_child("copy", registry, adapter, tmp_path / "base"), "copied")
    staging = [p for p in (registry / "detox").iterdir() if p.name.startswith(".staging-")]
    assert len(staging) == 1 and any(staging[0].iterdir())
    with pytest.raises(ManifestError, match=r"no tiller-manifest\.json"):
        load_manifest(staging[0])
    assert list_versions(registry, "detox") == [1]
    assert publish(registry, "detox", adapter, release(tmp_path)).name == "v0002"
    assert cleanup_partials(registry, "detox") == []  # young leftovers may be in progress
    assert cleanup_partials(registry, "detox", min_age_s=0) == staging
    assert entries(registry) == ["v0001", "v0002"]


def test_kill_9_after_rename_leaves_an_unloadable_version_and_a_burned_number(
    tmp_path: Path, setup: tuple[Path, Path]
) -> None:
    registry, adapter = setup
    publish(registry, "detox", adapter, release(tmp_path))
    kill_when(run_child("manifest", registry, adapter, tmp_path / "base"), "renamed")
    half = registry / "detox" / "v0002"
    assert half.is_dir() and (half / "adapter_model.safetensors").is_file()
    assert not (half / MANIFEST_FILE).exists()
    with pytest.raises(ManifestError):
        load_manifest(half)
    with pytest.raises(ManifestError):
        promote(registry, "detox", 2)
    assert list_versions(registry, "detox") == [1]
    v3 = publish(registry, "detox", adapter, release(tmp_path))
    assert v3.name == "v0003" and load_manifest(v3).version == 3
    removed = cleanup_partials(registry, "detox", min_age_s=0)
    assert sorted(p.name for p in removed) == [".claim-v0002", "v0002"]
    assert entries(registry) == ["v0001", "v0003"]
    assert list_versions(registry, "detox") == [1, 3]


def test_a_child_that_finishes_publishes_normally(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    registry, adapter = setup
    child = run_child("none", registry, adapter, tmp_path / "base")
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0 and out.strip() == str(registry / "detox" / "v0001")


def test_concurrent_publishers_never_share_a_number(
    tmp_path: Path, setup: tuple[Path, Path]
) -> None:
    registry, adapter = setup
    children = [run_child("none", registry, adapter, tmp_path / "base") for _ in range(4)]
    paths = []
    for child in children:
        out, _ = child.communicate(timeout=120)
        assert child.returncode == 0
        paths.append(out.strip())
    assert sorted(paths) == [str(registry / "detox" / f"v000{i}") for i in range(1, 5)]
    assert list_versions(registry, "detox") == [1, 2, 3, 4]
    for v in range(1, 5):
        assert load_manifest(registry / "detox" / f"v000{v}").version == v


# ------------------------------------------------------------------------------ promotion


def test_promote_and_rollback_history(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    registry, adapter = setup
    for _ in range(3):
        publish(registry, "detox", adapter, release(tmp_path))
    assert read_state(registry, "detox").active is None
    with pytest.raises(PublishError, match="no earlier promoted version"):
        rollback(registry, "detox")
    for v in (1, 2, 3):
        assert promote(registry, "detox", v).active == v
    assert promote(registry, "detox", 3).active == 3  # no-op, no new event
    assert rollback(registry, "detox").active == 2
    assert rollback(registry, "detox").active == 1
    with pytest.raises(PublishError, match="no earlier promoted version"):
        rollback(registry, "detox")
    promote(registry, "detox", 3)
    state = rollback(registry, "detox")
    assert state.active == 1
    assert [(e.action, e.version) for e in state.history] == [
        ("promote", 1),
        ("promote", 2),
        ("promote", 3),
        ("rollback", 2),
        ("rollback", 1),
        ("promote", 3),
        ("rollback", 1),
    ]
    on_disk = json.loads((registry / "detox" / "state.json").read_text())
    assert on_disk["active"] == 1 and len(on_disk["history"]) == 7
    assert read_state(registry, "detox") == state
    with pytest.raises(ManifestError, match=r"no tiller-manifest\.json"):
        promote(registry, "detox", 9)
    assert sorted(p.name for p in (registry / "detox").glob(".state.json.*")) == []


def test_rollback_refuses_a_damaged_target(tmp_path: Path, setup: tuple[Path, Path]) -> None:
    registry, adapter = setup
    for _ in range(2):
        publish(registry, "detox", adapter, release(tmp_path))
    promote(registry, "detox", 1)
    promote(registry, "detox", 2)
    (registry / "detox" / "v0001" / "README.md").write_text("changed")
    with pytest.raises(ManifestError):
        rollback(registry, "detox")
    assert read_state(registry, "detox").active == 2
