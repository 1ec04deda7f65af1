"""Adapter manifests: parsing, hashing, and refusal of anything that does not match."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tiller.server.formats.manifest import (
    MANIFEST_FILE,
    Conditioning,
    Manifest,
    ManifestError,
    load_manifest,
    write_manifest,
)


def _version(tmp_path: Path, *, lora: bool = True) -> Path:
    d = tmp_path / "v0001"
    d.mkdir()
    if lora:
        (d / "adapter_model.safetensors").write_bytes(b"weights")
        (d / "adapter_config.json").write_text("{}")
    write_manifest(
        d,
        Manifest(
            name="detox",
            version=1,
            base_model="tiny",
            has_lora=lora,
            conditioning=Conditioning(tags=("A", "B"), default_tag="A"),
        ),
    )
    return d


def test_round_trip(tmp_path: Path) -> None:
    d = _version(tmp_path)
    m = load_manifest(d)
    assert m.name == "detox" and m.version == 1 and m.has_lora
    assert m.conditioning == Conditioning(tags=("A", "B"), default_tag="A")
    assert set(m.files) == {"adapter_model.safetensors", "adapter_config.json"}


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    d = _version(tmp_path)
    (d / "adapter_model.safetensors").write_bytes(b"evil")
    with pytest.raises(ManifestError, match=r"sha256 of 'adapter_model\.safetensors'"):
        load_manifest(d)


def test_missing_file_is_refused(tmp_path: Path) -> None:
    d = _version(tmp_path)
    (d / "adapter_config.json").unlink()
    with pytest.raises(ManifestError, match="missing"):
        load_manifest(d)


def test_path_traversal_is_refused(tmp_path: Path) -> None:
    d = _version(tmp_path, lora=False)
    (tmp_path / "secret").write_text("x")
    data = json.loads((d / MANIFEST_FILE).read_text())
    data["files"] = {"../secret": "0" * 64}
    (d / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="escapes"):
        load_manifest(d)


def test_lora_without_safetensors_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "v1"
    d.mkdir()
    (d / "adapter_model.bin").write_bytes(b"pickle")
    write_manifest(d, Manifest(name="x", version=1, base_model="m", has_lora=True))
    with pytest.raises(ManifestError, match="safetensors"):
        load_manifest(d)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"version": 1}, "'name'"),
        ({"name": "x"}, "'version'"),
        ({"name": "x", "version": 0}, "version must be >= 1"),
        ({"name": "x", "version": "seven"}, "malformed"),
    ],
)
def test_malformed_manifests(tmp_path: Path, data: dict[str, object], match: str) -> None:
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=match):
        load_manifest(tmp_path)


def test_not_json(tmp_path: Path) -> None:
    (tmp_path / MANIFEST_FILE).write_text("{nope")
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(tmp_path)
    with pytest.raises(ManifestError, match=r"no tiller-manifest\.json"):
        load_manifest(tmp_path / "absent")
