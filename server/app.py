"""Wire the server together and run it until SIGTERM/SIGINT, then drain and exit cleanly."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc

from .adapters import AdapterTable
from .auth import Authenticator
from .config import SecurityConfig, ServerConfig
from .edge import Edge
from .engine import Engine, VllmEngine
from .logwriter import LogWriter
from .metrics import Metrics, serve_http
from .openai_api.routes import Api
from .openai_api.server import HttpServer, start_http
from .registry import sync_once, watch
from .service import GenerationService
from .servicer import TillerAdminServicer, TillerServicer

log = logging.getLogger("tiller.server")
# grpcio-health-checking exposes its asyncio servicer as `health.aio` (set at import time).
AsyncHealthServicer: Any = health.aio.HealthServicer  # type: ignore[attr-defined]
SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Tiller"].full_name,
    pb.DESCRIPTOR.services_by_name["TillerAdmin"].full_name,
)


@dataclass
class Running:
    server: grpc.aio.Server
    port: int
    health: Any  # AsyncHealthServicer
    service: GenerationService
    engine: Engine
    log: LogWriter | None
    stop_watch: asyncio.Event
    watcher: asyncio.Task[None] | None
    admin_server: grpc.aio.Server | None = None
    admin_port: int | None = None
    metrics_port: int | None = None
    http: HttpServer | None = None


async def start(config: ServerConfig, engine: Engine | None = None) -> Running:
    """Start the engine (unless given), load adapters and open the port. Health is SERVING after."""
    engine = engine or VllmEngine.start(config.engine)
    adapters = AdapterTable(engine, base_model=config.engine.model.name)
    for source in config.adapters:
        loaded = await adapters.load(source)
        log.info("loaded adapter %s@v%d from %s", loaded.name, loaded.version, source.path)
    if config.registry is not None:
        await sync_once(adapters, config.registry, set())
    adapters.set_default(config.default_adapter)
    writer = None
    if config.log is not None:
        writer = LogWriter(config.log)
        await writer.start()
    service = GenerationService(engine, adapters, config.limits, writer)

    sec = config.security
    metrics = Metrics(engine.model_id) if config.observability.metrics_port is not None else None
    auth = Authenticator(sec.tokens) if sec.tokens is not None else None
    edge = Edge(auth, config.limits.max_request_s, metrics)
    server = _grpc_server(config, edge)
    servicer = TillerServicer(service, adapters)
    edge.serve_sessions(servicer.GenerateStream)
    pb_grpc.add_TillerServicer_to_server(servicer, server)
    names = [SERVICE_NAMES[0]]
    admin = TillerAdminServicer(adapters, sec.adapter_roots, config.registry)
    admin_server = None
    if sec.admin_port is not None:  # admin only there (typically loopback), never on the main port
        admin_server = _grpc_server(config, edge)
        pb_grpc.add_TillerAdminServicer_to_server(admin, admin_server)
    elif config.enable_admin:
        pb_grpc.add_TillerAdminServicer_to_server(admin, server)
        names.append(SERVICE_NAMES[1])
    health_servicer = AsyncHealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names.append(health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    reflection.enable_server_reflection([*names, reflection.SERVICE_NAME], server)
    port = _bind(server, config.host, config.port, sec)
    admin_port = None
    if admin_server is not None:
        assert sec.admin_port is not None
        admin_port = _bind(admin_server, sec.admin_host, sec.admin_port, sec)
        await admin_server.start()
    await server.start()
    metrics_port = None
    obs = config.observability
    if metrics is not None and obs.metrics_port is not None:
        metrics.bind(
            service.status,
            lambda: [(name, v) for name, v, _, _ in adapters.snapshot() if name != "base"],
            config.log.path if config.log is not None else None,
        )
        metrics_port = serve_http(metrics, obs.metrics_host, obs.metrics_port)
    # As `vllm serve` does: move start-up objects out of the collector's generations, so that
    # full collections on the hot path do not walk the model and engine graphs.
    gc.collect()
    gc.freeze()
    http = None
    if config.http is not None:
        api = Api(service, adapters, config.limits, engine.model_id, auth, metrics)
        http = await start_http(api, config.http.host, config.http.port, sec.tls)
        if config.http.port_file is not None:
            _announce(config.http.port_file, http.port)
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    stop_watch = asyncio.Event()
    watcher = None
    if config.registry is not None:
        watcher = asyncio.create_task(
            watch(adapters, config.registry, config.registry_poll_s, stop_watch)
        )
    return Running(
        server,
        port,
        health_servicer,
        service,
        engine,
        writer,
        stop_watch,
        watcher,
        admin_server,
        admin_port,
        metrics_port,
        http,
    )


def _grpc_server(config: ServerConfig, edge: Edge) -> grpc.aio.Server:
    size = config.limits.max_message_bytes
    return grpc.aio.server(
        interceptors=[edge],
        options=[
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", max(size, 64 * 1024 * 1024)),
            ("grpc.so_reuseport", 0),
        ],
    )


def _bind(server: grpc.aio.Server, host: str, port: int, sec: SecurityConfig) -> int:
    """Open ``host:port`` (TLS when configured); returns the bound port."""
    address = f"{host}:{port}"
    if sec.tls is None:
        bound = server.add_insecure_port(address)
    else:
        t = sec.tls
        creds = grpc.ssl_server_credentials(
            [(t.key.read_bytes(), t.cert.read_bytes())],
            root_certificates=t.client_ca.read_bytes() if t.client_ca else None,
            require_client_auth=t.client_ca is not None,
        )
        bound = server.add_secure_port(address, creds)
    if bound == 0:
        raise OSError(f"could not bind {address}")
    return bound


async def drain_and_stop(running: Running, grace_s: float) -> bool:
    """NOT_SERVING, refuse new work, let in-flight work finish (bounded), stop. True if clean."""
    await running.health.enter_graceful_shutdown()
    running.stop_watch.set()
    if running.watcher is not None:
        await running.watcher
    running.service.start_draining()
    clean = await running.service.wait_idle(grace_s)
    if not clean:
        log.warning("drain grace of %.1fs ran out; cancelling the rest", grace_s)
    if running.http is not None:
        await running.http.stop()
    await running.server.stop(grace=1.0)
    if running.admin_server is not None:
        await running.admin_server.stop(grace=1.0)
    if running.log is not None:
        await running.log.close()  # every queued generation is written before exit
    running.engine.shutdown()
    return clean


def _announce(path: Path, port: int) -> None:
    """Write ``port`` to ``path`` atomically (readers never see a partial file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(str(port))
    tmp.replace(path)


async def serve(config: ServerConfig, port_file: Path | None = None) -> None:
    """Run until SIGTERM or SIGINT."""
    running = await start(config)
    address = f"{config.host}:{running.port}"
    if port_file is not None:
        _announce(port_file, running.port)
    print(f"tiller: serving {config.engine.model.name} on {address}", flush=True)
    if running.http is not None and config.http is not None:
        scheme = "https" if config.security.tls else "http"
        url = f"{scheme}://{config.http.host}:{running.http.port}/v1"
        print(f"tiller: OpenAI-compatible API on {url}", flush=True)
    if running.admin_port is not None:
        print(f"tiller: admin on {config.security.admin_host}:{running.admin_port}", flush=True)
    if running.metrics_port is not None:
        host = config.observability.metrics_host
        print(f"tiller: metrics on http://{host}:{running.metrics_port}/metrics", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    watch = asyncio.create_task(watch_engine(running.engine, stop))
    await stop.wait()
    watch.cancel()
    died = None if watch.cancelled() or not watch.done() else watch.result()
    print("tiller: draining", flush=True)
    await drain_and_stop(running, config.drain_grace_s)
    print("tiller: stopped", flush=True)
    if died:
        # a server without an engine answers nothing: exit so a supervisor restarts it
        raise SystemExit(f"tiller: the inference engine died ({died}); exiting with status 1")


async def watch_engine(engine: Engine, stop: asyncio.Event, period_s: float = 2.0) -> str | None:
    """Check ``engine``'s health every ``period_s`` until ``stop``; when it fails, set ``stop``
    and return why (``None``: stopped for another reason)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), period_s)
            return None
        try:
            await engine.check_health()
        except Exception as e:
            log.error("engine health check failed: %s: %s", type(e).__name__, e)
            stop.set()
            return f"{type(e).__name__}: {e}"
    return None
