"""Run the HTTP API on uvicorn inside the server's own event loop.

The server process owns SIGTERM/SIGINT (it drains first), so uvicorn's signal capture is off;
``stop`` is called after the drain, when nothing is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass

import uvicorn

from ..config import TlsConfig
from .routes import Api, build_app


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the application handles signals and drains before stopping us


@dataclass
class HttpServer:
    server: _Server
    task: asyncio.Task[None]
    port: int

    async def stop(self) -> None:
        self.server.should_exit = True
        await self.task


def _socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"could not bind {host}:{port} for HTTP: {e}") from e
    sock.set_inheritable(True)
    return sock


async def start_http(api: Api, host: str, port: int, tls: TlsConfig | None) -> HttpServer:
    """Serve ``api`` on ``host:port`` (0: any free port), with TLS (and client certificates when
    ``tls.client_ca`` is set) as the gRPC port has it. Returns once the port accepts."""
    sock = _socket(host, port)
    tls_kw: dict[str, object] = {}
    if tls is not None:
        tls_kw = {"ssl_certfile": str(tls.cert), "ssl_keyfile": str(tls.key)}
        if tls.client_ca is not None:
            tls_kw.update(ssl_ca_certs=str(tls.client_ca), ssl_cert_reqs=ssl.CERT_REQUIRED)
    config = uvicorn.Config(
        build_app(api),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=5,
        **tls_kw,  # type: ignore[arg-type]
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()  # raises what stopped it
            raise OSError(f"the HTTP server on {host}:{port} stopped during start-up")
        await asyncio.sleep(0.01)
    return HttpServer(server, task, int(sock.getsockname()[1]))
