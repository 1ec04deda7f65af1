"""The one table that maps Tiller's errors to HTTP statuses, and OpenAI-style error bodies.

Field names are the HTTP API's: the service names ``sampling.max_tokens``, the body has
``max_tokens``; both the message and ``param`` say ``max_tokens``.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import ValidationError

from ..formats.errors import (
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

HTTP_STATUS: dict[type[TillerError], int] = {
    InvalidArgument: 400,
    Unauthenticated: 401,
    PermissionDenied: 403,
    NotFound: 404,
    Aborted: 409,
    FailedPrecondition: 409,
    LimitExceeded: 413,  # over a size or count limit
    Overloaded: 429,  # over a concurrency cap: retry later
    EngineFailure: 500,
    Unimplemented: 501,
    Unavailable: 503,  # draining, or the engine is down
    DeadlineExceeded: 504,
}
_TYPE = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
    504: "timeout_error",
}
# Service field paths -> the body's names (longest first where one is a prefix of another).
_FIELDS = (
    ("chat.messages", "messages"),
    ("adapter.version", "adapter_version"),
    ("adapter.name", "model"),
    ("sampling.", ""),
    ("chat", "messages"),
)
_SERVICE_FIELD = re.compile(r"\b(chat\.messages|adapter\.version|adapter\.name|sampling\.|chat\b)")


def http_status(error: TillerError) -> int:
    """The status for ``error`` (most specific class in the table wins)."""
    for cls in type(error).__mro__:
        if cls in HTTP_STATUS:
            return HTTP_STATUS[cls]
    return 500


def _http_field(text: str) -> str:
    return _SERVICE_FIELD.sub(lambda m: dict(_FIELDS)[m.group(1)], text)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": _TYPE.get(status, "server_error"),
            "param": param,
            "code": status,
        }
    }


def tiller_error_body(error: TillerError) -> tuple[int, dict[str, Any]]:
    status = http_status(error)
    param = _http_field(error.field) if error.field else None
    return status, error_body(status, _http_field(error.message), param)


def validation_error(e: ValidationError) -> InvalidArgument:
    """The first problem pydantic found, naming the field as the body spells it."""
    first = e.errors(include_url=False)[0]
    loc = ".".join(str(x) for x in first["loc"] if not _is_type_tag(x))
    if first["type"] == "extra_forbidden":
        return InvalidArgument(f"unknown field {loc!r}: this server does not take it", field=loc)
    if first["type"] == "missing":
        return InvalidArgument(f"{loc} is required", field=loc)
    got = first.get("input")
    shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
    return InvalidArgument(f"{loc}: {first['msg']}{shown}", field=loc)


def _is_type_tag(x: object) -> bool:
    # pydantic names the union member it tried ("str", "list[...]", "function-after[...]").
    return isinstance(x, str) and (x in ("str", "int", "float", "bool") or "[" in x)
