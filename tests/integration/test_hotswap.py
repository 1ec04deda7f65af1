"""Publish -> promote -> hot-swap -> rollback on a live server following a registry."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.conftest import TAGS, ServerProc, start_server, stop_server
from tiller.client import Client, TillerClientError
from tiller.server.formats.manifest import Conditioning
from tiller.server.formats.publish import Release, publish
from tiller.server.formats.registry import promote, rollback
from tiller.server.tools.tiny_model import build_random_lora


def _trained(model: Path, out: Path, seed: int) -> Path:
    """A peft LoRA as a trainer leaves it (no Tiller manifest yet)."""
    return build_random_lora(model, out, seed=seed)


def _wait_version(c: Client, version: int, timeout: float = 30.0) -> float:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        g = c.generate("swap?", adapter="detox", max_tokens=1, temperature=0.0, log=False)
        if g.adapter_version == version:
            return time.monotonic() - t
        time.sleep(0.05)
    raise AssertionError(f"v{version} was not served within {timeout}s")


def test_publish_promote_swap_pin_rollback(
    tiny_model: Path, tmp_path: Path, server: ServerProc
) -> None:
    registry = tmp_path / "registry"
    release = Release(
        base_model=tiny_model.name, conditioning=Conditioning(tags=TAGS), objective="test"
    )
    trained = [_trained(tiny_model, tmp_path / f"trained{i}", 10 + i) for i in range(3)]
    v1 = publish(registry, "detox", trained[0], release)
    promote(registry, "detox", 1)
    srv = start_server(
        tiny_model,
        tmp_path / "srv",
        "--registry",
        str(registry),
        "--registry-poll",
        "0.2",
        "--enable-admin",
        "--no-log",
    )
    try:
        with Client(srv.target, timeout=120) as c:
            g1 = c.generate(
                "The movie was",
                adapter="detox",
                feedback="Lowest Toxicity",
                max_tokens=16,
                temperature=0.0,
            )
            assert (g1.adapter, g1.adapter_version) == ("detox", 1)
            assert v1.name == "v0001"

            # A long request on v1 is in flight while v2 is promoted: it finishes on v1.
            long: list[object] = []

            def run_long() -> None:
                try:
                    long.append(
                        c.generate(
                            "class Cancel:", adapter="detox", max_tokens=400, temperature=0.0
                        )
                    )
                except Exception as e:  # reported by the assertion below
                    long.append(e)

            t = threading.Thread(target=run_long)
            t.start()
            time.sleep(0.3)
            publish(registry, "detox", trained[1], release)
            promote(registry, "detox", 2)
            _wait_version(c, 2)
            g2 = c.generate(
                "The movie was",
                adapter="detox",
                feedback="Lowest Toxicity",
                max_tokens=16,
                temperature=0.0,
            )
            assert g2.adapter_version == 2
            assert g2.completions[0].token_ids != g1.completions[0].token_ids
            pinned = c.generate(
                "The movie was",
                adapter="detox",
                adapter_version=1,
                feedback="Lowest Toxicity",
                max_tokens=16,
                temperature=0.0,
            )
            assert pinned.completions[0].token_ids == g1.completions[0].token_ids
            t.join(timeout=120)
            assert long and not isinstance(long[0], Exception), long
            assert long[0].adapter_version == 1  # type: ignore[attr-defined]
            assert long[0].completion_tokens > 0  # type: ignore[attr-defined]

            # v3: v1 falls out of the kept set (active + previous) once drained.
            publish(registry, "detox", trained[2], release)
            promote(registry, "detox", 3)
            _wait_version(c, 3)
            versions = {a.name: a for a in c.adapters()}["detox"].versions
            assert versions == (2, 3)
            with pytest.raises(TillerClientError) as info:
                c.generate("x", adapter="detox", adapter_version=1, max_tokens=1)
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT

            # Rollback in the registry: the server follows back to v2.
            rollback(registry, "detox")
            _wait_version(c, 2)
            again = c.generate(
                "The movie was",
                adapter="detox",
                feedback="Lowest Toxicity",
                max_tokens=16,
                temperature=0.0,
            )
            assert again.completions[0].token_ids == g2.completions[0].token_ids
    finally:
        stop_server(srv)


def test_tampered_version_is_refused_and_the_old_one_keeps_serving(
    tiny_model: Path, tmp_path: Path, server: ServerProc
) -> None:
    registry = tmp_path / "registry"
    release = Release(base_model=tiny_model.name, conditioning=Conditioning(tags=TAGS))
    a = _trained(tiny_model, tmp_path / "a", 1)
    publish(registry, "detox", a, release)
    promote(registry, "detox", 1)
    srv = start_server(
        tiny_model,
        tmp_path / "srv",
        "--registry",
        str(registry),
        "--registry-poll",
        "0.2",
        "--no-log",
    )
    try:
        bad = publish(registry, "detox", a, release)
        weights = bad / "adapter_model.safetensors"
        weights.chmod(0o644)
        data = bytearray(weights.read_bytes())
        data[-1] ^= 0xFF
        weights.write_bytes(bytes(data))
        # The publisher refuses to promote it; a corrupted registry could still point at it.
        state = registry / "detox" / "state.json"
        state.write_text(state.read_text().replace('"active": 1', '"active": 2'))
        time.sleep(2.0)
        with Client(srv.target) as c:
            g = c.generate("x", adapter="detox", max_tokens=2, temperature=0.0)
            assert g.adapter_version == 1
        assert "sha256" in srv.logs() and "still serving v1" in srv.logs()
    finally:
        stop_server(srv)
