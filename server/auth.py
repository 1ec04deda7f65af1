"""Bearer tokens with roles, and per-token concurrency permits.

Tokens file (TOML, or JSON of the same shape), read once at the CLI edge::

    [[tokens]]
    name = "web-app"                 # shows up in logs and metrics instead of the token
    sha256 = "9f86d08..."            # sha256 hex of the token (preferred), or: token = "..."
    roles = ["generate", "feedback"] # of: generate, feedback, admin
    max_concurrent = 16              # RPCs in flight at once; more are RESOURCE_EXHAUSTED

Which role an RPC needs is ``ROLE_OF``: ``generate`` for Generate / GenerateStream /
GenerateSession (each of a session's generations takes a permit, as a GenerateStream would),
``feedback`` for SubmitFeedback, ``admin`` for TillerAdmin, any valid token for the read-only
listing and status. Health checks and reflection stay open (probes carry no tokens).
Token values are never logged or echoed; only their ``name``.
Thread-safety: ``Authenticator`` is used from the event loop only.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import tomllib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .config import TokenGrant
from .formats.errors import Overloaded, PermissionDenied, Unauthenticated

ROLES = ("generate", "feedback", "admin")
ANY = "any"  # any valid token
_TILLER = "/tiller.v1.Tiller/"
_ADMIN = "/tiller.v1.TillerAdmin/"
ROLE_OF: dict[str, str] = {
    _TILLER + "Generate": "generate",
    _TILLER + "GenerateStream": "generate",
    _TILLER + "GenerateSession": "generate",
    _TILLER + "SubmitFeedback": "feedback",
    _TILLER + "ListAdapters": ANY,
    _TILLER + "GetServerStatus": ANY,
    _ADMIN + "LoadAdapter": "admin",
    _ADMIN + "ActivateAdapter": "admin",
    _ADMIN + "RollbackAdapter": "admin",
    # The OpenAI-compatible HTTP API: the same roles as the RPCs it translates to.
    "/v1/completions": "generate",
    "/v1/chat/completions": "generate",
    "/v1/feedback": "feedback",
    "/v1/models": ANY,
}
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class TokenFileError(ValueError):
    """The tokens file is unreadable or malformed; the message names the entry and field."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _grant(i: int, entry: Any) -> TokenGrant:
    where = f"tokens[{i}]"
    if not isinstance(entry, dict):
        raise TokenFileError(f"{where} must be a table")
    unknown = set(entry) - {"name", "sha256", "token", "roles", "max_concurrent"}
    if unknown:
        raise TokenFileError(f"{where} has unknown keys: {', '.join(sorted(unknown))}")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise TokenFileError(f"{where}.name must be a non-empty string")
    if ("sha256" in entry) == ("token" in entry):
        raise TokenFileError(f"{where} needs exactly one of sha256 or token")
    if "token" in entry:
        if not isinstance(entry["token"], str) or len(entry["token"]) < 16:
            raise TokenFileError(f"{where}.token must be a string of at least 16 characters")
        sha = digest(entry["token"])
    else:
        sha = str(entry["sha256"]).lower()
        if not _HEX64.match(sha):
            raise TokenFileError(f"{where}.sha256 must be 64 hex digits")
    roles = entry.get("roles")
    if not isinstance(roles, list) or not roles or any(r not in ROLES for r in roles):
        raise TokenFileError(f"{where}.roles must be a non-empty list of: {', '.join(ROLES)}")
    limit = entry.get("max_concurrent", 0)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
        raise TokenFileError(f"{where}.max_concurrent must be an integer >= 0 (0: no cap)")
    return TokenGrant(name=name, sha256=sha, roles=frozenset(roles), max_concurrent=limit)


def load_tokens(path: Path) -> tuple[TokenGrant, ...]:
    """Parse a tokens file (``.json``: JSON, otherwise TOML); raises ``TokenFileError``."""
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as e:
        raise TokenFileError(f"tokens file {path}: {e}") from None
    entries = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise TokenFileError(f"tokens file {path} needs a non-empty 'tokens' list")
    grants = tuple(_grant(i, e) for i, e in enumerate(entries))
    for counter, what in (
        (Counter(g.name for g in grants), "name"),
        (Counter(g.sha256 for g in grants), "token"),
    ):
        dup = [k for k, n in counter.items() if n > 1]
        if dup:
            shown = dup[0] if what == "name" else "(a token)"
            raise TokenFileError(f"tokens file {path}: duplicate {what} {shown}")
    return grants


def bearer(metadata: Iterable[Any] | None) -> str | None:
    """The token of an ``authorization: Bearer <token>`` header, or None."""
    for key, value in metadata or ():
        if key.lower() == "authorization":
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            scheme, _, token = text.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


class Authenticator:
    """Maps a presented token to its grant, checks the RPC's role, and counts permits."""

    def __init__(self, grants: Iterable[TokenGrant]) -> None:
        self._by_digest = {g.sha256: g for g in grants}
        self._in_flight: Counter[str] = Counter()

    def authorize(self, method: str, token: str | None) -> TokenGrant:
        """The grant for ``token`` if it may call ``method``; else ``Unauthenticated`` /
        ``PermissionDenied``. The token itself never appears in a message."""
        if token is None:
            raise Unauthenticated("this server needs 'authorization: Bearer <token>' metadata")
        presented = digest(token)
        grant = None
        for sha, g in self._by_digest.items():  # constant-time compare, no early exit
            if hmac.compare_digest(sha, presented):
                grant = g
        if grant is None:
            raise Unauthenticated("unknown bearer token")
        role = ROLE_OF.get(method, "admin")  # an RPC missing from the table needs admin
        if role != ANY and role not in grant.roles:
            raise PermissionDenied(
                f"token '{grant.name}' lacks role '{role}' for {method} "
                f"(it has: {', '.join(sorted(grant.roles))})"
            )
        return grant

    @staticmethod
    def require(grant: TokenGrant, role: str, what: str) -> None:
        """``PermissionDenied`` unless ``grant`` has ``role`` (for ``what``, a request field)."""
        if role not in grant.roles:
            raise PermissionDenied(
                f"token '{grant.name}' lacks role '{role}' for {what} "
                f"(it has: {', '.join(sorted(grant.roles))})",
                field=what.split(" ", 1)[0],
            )

    def acquire(self, grant: TokenGrant) -> None:
        """Take one concurrency permit; ``Overloaded`` when the token is at its cap."""
        if grant.max_concurrent and self._in_flight[grant.name] >= grant.max_concurrent:
            raise Overloaded(
                f"token '{grant.name}' has {grant.max_concurrent} requests in flight, "
                "its limit; retry when one finishes"
            )
        self._in_flight[grant.name] += 1

    def release(self, grant: TokenGrant) -> None:
        self._in_flight[grant.name] -= 1

    def in_flight(self, name: str) -> int:
        return self._in_flight[name]
