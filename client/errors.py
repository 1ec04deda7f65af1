"""The client's one error type, and the gRPC status it comes from."""

from __future__ import annotations

import grpc

# gRPC status codes by number: how a session reports a generation's end on the wire.
CODES = {c.value[0]: c for c in grpc.StatusCode}


class TillerClientError(Exception):
    """A failed call: ``code`` is the ``grpc.StatusCode``, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


def wrap(e: grpc.RpcError) -> TillerClientError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    return TillerClientError(code, details or "")
