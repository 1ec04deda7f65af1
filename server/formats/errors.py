"""Request-level errors shared by the server and the learner (no transport imports).

Messages name the offending field and, where a set of values is allowed, list it. The server
maps these to gRPC status codes in ``tiller.server.errors``.
"""

from __future__ import annotations


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


class Overloaded(LimitExceeded):
    """Too much in flight for this caller now (a concurrency cap); retrying later may succeed."""


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
