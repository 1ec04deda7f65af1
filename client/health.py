"""``tiller health``: one ``grpc.health.v1.Health/Check`` call, exit 0 when SERVING, else 1.

The container HEALTHCHECK and compose healthchecks run it. The base install (grpcio, protobuf,
click) has no ``grpc_health`` stubs, so the two one-field messages are encoded here by hand:
``HealthCheckRequest{string service = 1}`` and ``HealthCheckResponse{ServingStatus status = 1}``
(UNKNOWN 0, SERVING 1, NOT_SERVING 2, SERVICE_UNKNOWN 3), as in grpc/health/v1/health.proto.
"""

from __future__ import annotations

from pathlib import Path

import click
import grpc

from .client import DEFAULT_TARGET

CHECK = "/grpc.health.v1.Health/Check"
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
SERVING = 1


def encode_request(service: str) -> bytes:
    """Wire bytes of ``HealthCheckRequest(service=service)`` (an empty name encodes as b"")."""
    data = service.encode()
    return b"\x0a" + _varint(len(data)) + data if data else b""


def decode_status(data: bytes) -> int:
    """The ``status`` field of a ``HealthCheckResponse`` (0 when absent); other fields are
    skipped as protobuf requires. Raises ``ValueError`` on malformed bytes."""
    status, i = 0, 0
    while i < len(data):
        key, i = _read_varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _read_varint(data, i)
            if field == 1:
                status = value
        elif wire == 2:
            n, i = _read_varint(data, i)
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if i > len(data):
            raise ValueError("truncated HealthCheckResponse")
    return status


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _read_varint(data: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("malformed varint in HealthCheckResponse")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def check(target: str, service: str = "", timeout: float = 5.0, ca: Path | None = None) -> int:
    """Call Check once; return the serving status (``SERVING`` is 1).

    ``ca``: verify a TLS server against this PEM CA (plaintext when None). Raises
    ``grpc.RpcError`` when the call fails (unreachable, deadline, SERVICE_UNKNOWN as NOT_FOUND).
    """
    if ca is None:
        channel = grpc.insecure_channel(target)
    else:
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca.read_bytes()))
    with channel:
        call = channel.unary_unary(
            CHECK, request_serializer=encode_request, response_deserializer=decode_status
        )
        return int(call(service, timeout=timeout))


@click.command()
@click.option(
    "--target",
    default=DEFAULT_TARGET,
    show_default=True,
    envvar="TILLER_TARGET",
    help="host:port of the server.",
)
@click.option("--service", default="", help="Service name to check ('' = the whole server).")
@click.option("--timeout", type=float, default=5.0, show_default=True)
@click.option(
    "--tls-ca",
    type=click.Path(path_type=Path, exists=True, dir_okay=False),
    default=None,
    help="PEM CA to verify a TLS server with (plaintext when unset).",
)
@click.option("--quiet", "-q", is_flag=True, help="Print nothing; the exit status tells.")
def health(target: str, service: str, timeout: float, tls_ca: Path | None, quiet: bool) -> None:
    """Exit 0 if the server's gRPC health service says SERVING, else 1."""
    try:
        status = check(target, service, timeout, tls_ca)
    except grpc.RpcError as e:
        if not quiet:
            click.echo(f"{target}: {e.code().name} {e.details() or ''}".rstrip(), err=True)
        raise SystemExit(1) from None
    if not quiet:
        click.echo(f"{target}: {STATUS_NAMES.get(status, str(status))}")
    raise SystemExit(0 if status == SERVING else 1)
