"""Session fixtures: the tiny model, a tagged LoRA adapter for it, and one real server process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.ports import PORT_ATTEMPTS, free_port, lost_port_race

TAGS = (
    "Lowest Toxicity",
    "Low-Moderate Toxicity",
    "Moderate Toxicity",
    "High-Moderate Toxicity",
    "Maximum Toxicity",
)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tiller.server.tools.tiny_model import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")


def make_lora_version(
    model_dir: Path,
    out: Path,
    *,
    name: str,
    version: int,
    seed: int,
    tags: tuple[str, ...] = TAGS,
    layers: tuple[int, ...] | None = None,
) -> Path:
    """A random peft LoRA (``build_random_lora``) plus a Tiller manifest with tags."""
    from tiller.server.formats.manifest import Conditioning, Manifest, write_manifest
    from tiller.server.tools.tiny_model import build_random_lora

    build_random_lora(model_dir, out, seed=seed, layers=layers)
    write_manifest(
        out,
        Manifest(
            name=name,
            version=version,
            base_model=model_dir.name,
            has_lora=True,
            conditioning=Conditioning(tags=tags),
        ),
    )
    return out


@pytest.fixture(scope="session")
def lora_versions(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("registry") / "detox"
    return [
        make_lora_version(tiny_model, root / f"v{v:04d}", name="detox", version=v, seed=v)
        for v in (1, 2)
    ]


@dataclass
class ServerProc:
    proc: subprocess.Popen[bytes]
    target: str
    log: Path
    http_port: int | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI-compatible API's base URL (``http``, no TLS)."""
        assert self.http_port is not None, "started with http=False"
        return f"http://127.0.0.1:{self.http_port}/v1"

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def start_server(
    model: Path,
    workdir: Path,
    *extra: str,
    credentials: grpc.ChannelCredentials | None = None,
    channel_options: tuple[tuple[str, str], ...] = (),
    http: bool = True,
) -> ServerProc:
    """Run ``tiller serve`` as a real process on a free port; wait until health says SERVING.
    ``credentials``: check health over TLS with these (a server started with --tls-cert).
    ``http``: also serve the OpenAI-compatible API on a free port (``ServerProc.http_port``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port_file = workdir / "port"
    http_file = workdir / "http_port"
    log = workdir / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "tiller.client.cli",
        "serve",
        "--model",
        str(model),
        "--port",
        "0",
        "--port-file",
        str(port_file),
        "--gpu-memory-utilization",
        "0.1",
        "--max-model-len",
        "2048",
        "--max-tokens-cap",
        "2000",
        "--max-n",
        "4",
        "--dtype",
        "float32",  # exactness tests compare with float32 torch references
        *(("--http-port", "0", "--http-port-file", str(http_file)) if http else ()),
        *extra,
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"server did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.2)
    target = f"127.0.0.1:{port_file.read_text().strip()}"
    ch = (
        grpc.insecure_channel(target)
        if credentials is None
        else grpc.secure_channel(target, credentials, options=channel_options)
    )
    with ch:
        stub = health_pb2_grpc.HealthStub(ch)
        status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=30).status
        assert status == health_pb2.HealthCheckResponse.SERVING
    http_port = int(http_file.read_text()) if http else None
    return ServerProc(proc, target, log, http_port)


def stop_server(server: ServerProc) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()


@pytest.fixture(scope="session")
def log_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("log") / "generations.sqlite"


@pytest.fixture(scope="session")
def server(
    tiny_model: Path,
    lora_versions: list[Path],
    log_db: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[ServerProc]:
    srv = start_server(
        tiny_model,
        tmp_path_factory.mktemp("server"),
        "--log-db",
        str(log_db),
        "--adapter",
        f"detox={lora_versions[0]}",
        "--adapter",
        f"detox={lora_versions[1]}",
        "--enable-admin",
        "--adapter-root",  # the tests' admin loads come from their temporary directories
        str(tmp_path_factory.getbasetemp()),
    )
    yield srv
    stop_server(srv)
    assert srv.proc.returncode == 0, srv.logs()[-4000:]


@pytest.fixture(scope="session")
def target(server: ServerProc) -> str:
    return server.target


@dataclass
class JudgeServer:
    proc: subprocess.Popen[bytes]
    base_url: str
    log: Path


@pytest.fixture(scope="session")
def judge_server(
    tiny_model: Path, server: ServerProc, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JudgeServer]:
    """vLLM's own OpenAI-compatible HTTP server on the tiny model: a real judge endpoint.

    Requests the Tiller server fixture first so that both engines never load at once. vLLM
    needs its port up front: when another process takes it first, start again on a new one."""
    log = tmp_path_factory.mktemp("judge") / "judge.log"
    for _ in range(PORT_ATTEMPTS):
        port = free_port()
        proc = _start_judge(tiny_model, port, log)
        base = f"http://127.0.0.1:{port}"
        if _wait_judge(proc, base, log):
            break
    else:
        raise RuntimeError(f"judge server lost the port race {PORT_ATTEMPTS} times")
    yield JudgeServer(proc, f"{base}/v1", log)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _start_judge(model: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        "judge",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--gpu-memory-utilization",
        "0.1",
        "--enforce-eager",
        "--max-model-len",
        "1024",
        "--dtype",
        "float32",
    ]
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with log.open("wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _wait_judge(proc: subprocess.Popen[bytes], base: str, log: Path) -> bool:
    """Wait until the judge answers /health: True; False if it lost its port to another
    process (it has exited; start it again); raise if it failed otherwise."""
    import urllib.request

    deadline = time.monotonic() + 240
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200 and proc.poll() is None:
                    return True
        except OSError:
            pass
        if lost_port_race(proc, log.read_text(errors="replace")):
            return False
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"judge server did not start:\n{log.read_text()[-4000:]}")
        time.sleep(0.5)
