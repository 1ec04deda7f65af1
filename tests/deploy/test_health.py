"""``tiller health`` encodes the grpc.health.v1 messages by hand (the base install has no
grpc_health stubs): check the bytes against the real generated messages."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2

from tiller.client.health import decode_status, encode_request

Response = health_pb2.HealthCheckResponse


@pytest.mark.parametrize("service", ["", "tiller.v1.Tiller", "x" * 300, "é"])
def test_request_bytes_match_protobuf(service: str) -> None:
    expected = health_pb2.HealthCheckRequest(service=service).SerializeToString()
    assert encode_request(service) == expected


@pytest.mark.parametrize("status", [0, 1, 2, 3])
def test_status_decodes(status: int) -> None:
    assert decode_status(Response(status=status).SerializeToString()) == status


def test_unknown_fields_are_skipped() -> None:
    # field 2 (length-delimited), field 3 (varint), field 4 (fixed64), field 5 (fixed32)
    extra = b"\x12\x03abc" + b"\x18\x96\x01" + b"\x21" + bytes(8) + b"\x2d" + bytes(4)
    data = extra + Response(status=Response.SERVING).SerializeToString()
    assert decode_status(data) == Response.SERVING


@pytest.mark.parametrize("data", [b"\x08", b"\x12\x05ab", b"\x08\xff", b"\x0f"])
def test_malformed_bytes_raise(data: bytes) -> None:
    with pytest.raises(ValueError):
        decode_status(data)
