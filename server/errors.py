"""Internal errors and the one table that maps them to gRPC status codes.

Code inside the server raises these; only the servicer boundary translates them (``grpc_status``).
Messages name the offending field and, where a set of values is allowed, list it.
"""

from __future__ import annotations

import grpc


class TillerError(Exception):
    """Base class: a request-level failure with a message meant for the client."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


class InvalidArgument(TillerError):
    """The request is malformed or names something that does not exist in its scope."""


class LimitExceeded(TillerError):
    """The request is well formed but over a configured limit (size, count, concurrency)."""


class NotFound(TillerError):
    """A referenced entity (generation id, adapter version) does not exist."""


class Unavailable(TillerError):
    """The server cannot take the request now (draining, engine down); retrying may succeed."""


class Unimplemented(TillerError):
    """The RPC exists in the API but this server does not provide it."""


class FailedPrecondition(TillerError):
    """The system is not in a state where the request can run (e.g. adapter not loaded)."""


class Aborted(TillerError):
    """The request was aborted by a conflict it cannot recover from (e.g. lockstep lost)."""


class EngineFailure(TillerError):
    """The engine failed while serving an accepted request."""


class Unauthenticated(TillerError):
    """No bearer token, or one the server does not know (the token is never echoed)."""


class PermissionDenied(TillerError):
    """The token is valid but lacks the role this RPC needs."""


class DeadlineExceeded(TillerError):
    """The request ran past the server's cap on request duration."""


STATUS_TABLE: dict[type[TillerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Aborted: grpc.StatusCode.ABORTED,
    EngineFailure: grpc.StatusCode.INTERNAL,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_status(error: TillerError) -> grpc.StatusCode:
    """The status code for ``error`` (most specific class in the table wins)."""
    for cls in type(error).__mro__:
        if cls in STATUS_TABLE:
            return STATUS_TABLE[cls]
    return grpc.StatusCode.INTERNAL
