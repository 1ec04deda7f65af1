"""The one table that maps Tiller's errors to gRPC status codes.

Code inside the server raises the classes of ``formats.errors`` (re-exported here); only the
servicer boundary translates them (``grpc_status``).
"""

from __future__ import annotations

import grpc

from .formats.errors import (
    Aborted,
    DeadlineExceeded,
    EngineFailure,
    FailedPrecondition,
    InvalidArgument,
    LimitExceeded,
    NotFound,
    Overloaded,
    PermissionDenied,
    TillerError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

__all__ = [
    "STATUS_TABLE",
    "Aborted",
    "DeadlineExceeded",
    "EngineFailure",
    "FailedPrecondition",
    "InvalidArgument",
    "LimitExceeded",
    "NotFound",
    "Overloaded",
    "PermissionDenied",
    "TillerError",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "grpc_status",
]

STATUS_TABLE: dict[type[TillerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    LimitExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Overloaded: grpc.StatusCode.RESOURCE_EXHAUSTED,
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
