"""Admin ``LoadAdapter`` by registry reference (resolved in the server's ``--registry``, every
file checked against the manifest), path loads only inside ``--adapter-root``, and the learner
gate serving its candidate on every replica or pinned to one server."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.conftest import ServerProc, make_lora_version, start_server, stop_server
from tiller.client import AsyncClient, TillerClientError
from tiller.learner.learn.config import DataConfig, LearnConfig, TrainConfig
from tiller.learner.learn.gate import GateConfig
from tiller.learner.learn.gate_runs import GateRuns
from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc
from tiller.server.config import AdapterSource
from tiller.server.formats.errors import PermissionDenied
from tiller.server.registry import admin_source

C = grpc.StatusCode


@dataclass
class RefServer:
    srv: ServerProc
    registry: Path
    root: Path  # its only --adapter-root


@pytest.fixture(scope="module")
def ref_server(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RefServer]:
    """A server following a registry that holds detox v1 (intact) and v2 (one byte flipped in
    its weights); nothing is promoted, so only admin loads bring versions in."""
    work = tmp_path_factory.mktemp("by-ref")
    registry, root = work / "registry", work / "candidates"
    root.mkdir()
    for v in (1, 2):
        make_lora_version(
            tiny_model, registry / "detox" / f"v{v:04d}", name="detox", version=v, seed=v
        )
    weights = registry / "detox" / "v0002" / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    srv = start_server(
        tiny_model,
        work / "srv",
        *("--registry", str(registry), "--enable-admin", "--adapter-root", str(root)),
        "--no-log",
        http=False,
    )
    yield RefServer(srv, registry, root)
    stop_server(srv)


def _load(target: str, req: pb.LoadAdapterRequest) -> grpc.RpcError:
    with grpc.insecure_channel(target) as ch, pytest.raises(grpc.RpcError) as info:
        pb_grpc.TillerAdminStub(ch).LoadAdapter(req, timeout=60)
    return info.value


async def test_a_registry_reference_loads_that_version(ref_server: RefServer) -> None:
    async with AsyncClient(ref_server.srv.target, timeout=120) as c:
        listing = await c.load_adapter("detox", registry_version=1)
        detox = next(a for a in listing if a.name == "detox")
        assert 1 in detox.versions
        g = await c.generate("The movie was", adapter="detox", adapter_version=1, max_tokens=4)
        assert (g.adapter, g.adapter_version) == ("detox", 1)


async def test_the_reference_must_name_a_complete_version(ref_server: RefServer) -> None:
    async with AsyncClient(ref_server.srv.target, timeout=60) as c:
        with pytest.raises(TillerClientError) as info:
            await c.load_adapter("detox", registry_version=7)
        assert info.value.code == C.NOT_FOUND
        assert "no version 7" in info.value.message and "1, 2" in info.value.message
        with pytest.raises(TillerClientError) as info:
            await c.load_adapter("nothing", registry_version=1)
        assert info.value.code == C.NOT_FOUND and "'nothing'" in info.value.message
        # The served name must be the one the version's manifest carries.
        with pytest.raises(TillerClientError) as info:
            await c.load_adapter("other", registry_version=1, registry_name="detox")
        assert info.value.code == C.INVALID_ARGUMENT and "'other'" in info.value.message
    e = _load(ref_server.srv.target, pb.LoadAdapterRequest(name="detox", registry=pb.RegistryRef()))
    assert e.code() == C.INVALID_ARGUMENT and "registry.version" in (e.details() or "")


def test_a_tampered_version_is_refused_naming_the_file(ref_server: RefServer) -> None:
    req = pb.LoadAdapterRequest(name="detox", registry=pb.RegistryRef(name="detox", version=2))
    e = _load(ref_server.srv.target, req)
    assert e.code() == C.INVALID_ARGUMENT
    assert "sha256 of 'adapter_model.safetensors'" in (e.details() or "")


def test_a_server_without_a_registry_cannot_resolve_references(target: str) -> None:
    e = _load(target, pb.LoadAdapterRequest(name="detox", registry=pb.RegistryRef(version=1)))
    assert e.code() == C.FAILED_PRECONDITION and "--registry" in (e.details() or "")


def test_path_loads_only_inside_the_adapter_roots(ref_server: RefServer) -> None:
    # The registry is not a root: its versions load by reference only.
    inside_registry = str(ref_server.registry / "detox" / "v0001")
    for path in (inside_registry, "/etc", str(ref_server.root / ".." / "registry")):
        e = _load(ref_server.srv.target, pb.LoadAdapterRequest(name="detox", path=path))
        assert e.code() == C.PERMISSION_DENIED, e.details()
        assert "outside the adapter roots" in (e.details() or "")


def test_admin_source_without_roots_refuses_every_path(tmp_path: Path) -> None:
    with pytest.raises(PermissionDenied) as info:
        admin_source(AdapterSource("detox", tmp_path), tmp_path, ())
    assert "--adapter-root" in info.value.message


async def test_load_adapter_needs_exactly_one_source(ref_server: RefServer) -> None:
    async with AsyncClient(ref_server.srv.target, timeout=10) as c:
        with pytest.raises(ValueError, match="exactly one"):
            await c.load_adapter("detox")
        with pytest.raises(ValueError, match="exactly one"):
            await c.load_adapter("detox", "/x", registry_version=1)
        with pytest.raises(ValueError, match="registry_name needs"):
            await c.load_adapter("detox", "/x", registry_name="detox")


def _gate_config(
    tiny_model: Path, work: Path, server: str, replicas: tuple[str, ...]
) -> LearnConfig:
    return LearnConfig(
        db=work / "log.sqlite",
        registry=work / "registry",
        workdir=work,
        adapter="gated",
        model=tiny_model,
        base_model=tiny_model.name,
        server=server,
        train=TrainConfig(objective="dpo"),
        data=DataConfig(kind="pairs", source="score", provider="len"),
        gate=GateConfig(prompts=("p",), scorer="length", replicas=replicas),
    )


async def _candidate_versions(target: str) -> tuple[int, ...]:
    async with AsyncClient(target, timeout=60) as c:
        return next((a.versions for a in await c.adapters() if a.name == "gated-candidate"), ())


async def test_the_gate_loads_its_candidate_on_every_replica_or_pins_one(
    ref_server: RefServer, server: ServerProc, tiny_model: Path
) -> None:
    # Both servers may load from ref_server.root (the session server's root holds it).
    replicas = (ref_server.srv.target, server.target)
    cand = make_lora_version(
        tiny_model, ref_server.root / "it1", name="gated-candidate", version=1, seed=21
    )
    cfg = _gate_config(tiny_model, ref_server.root, server.target, replicas)
    assert cfg.gate is not None
    runs = GateRuns(cfg, cfg.gate, lambda: pytest.fail("no perplexity in this gate"))
    assert runs.placement.startswith("gate: candidate loaded on 2 replicas")
    async with AsyncClient(server.target, timeout=120) as admin:
        await runs.serve_candidate(admin, "gated-candidate", 1, cand)
    for target in replicas:
        assert 1 in await _candidate_versions(target)

    # Pinned: the load goes through the one admin address only.
    cand2 = make_lora_version(
        tiny_model, ref_server.root / "it2", name="gated-candidate", version=2, seed=22
    )
    cfg = _gate_config(tiny_model, ref_server.root, ref_server.srv.target, ())
    assert cfg.gate is not None
    runs = GateRuns(cfg, cfg.gate, lambda: pytest.fail("no perplexity in this gate"))
    assert runs.placement == f"gate: pinned to {ref_server.srv.target}"
    async with AsyncClient(ref_server.srv.target, timeout=120) as admin:
        await runs.serve_candidate(admin, "gated-candidate", 2, cand2)
    assert 2 in await _candidate_versions(ref_server.srv.target)
    assert 2 not in await _candidate_versions(server.target)


def test_gate_replicas_are_checked_at_config_time() -> None:
    with pytest.raises(ValueError, match=r"gate\.replicas"):
        GateConfig(prompts=("p",), scorer="length", replicas=("a:1", "a:1"))
    with pytest.raises(ValueError, match=r"gate\.replicas"):
        GateConfig(prompts=("p",), scorer="length", replicas=("nohost",))
