"""Process logging for ``tiller serve``: human text, or one JSON object per line.

JSON lines carry ``ts`` (ISO 8601, UTC), ``level``, ``logger``, ``msg`` and, when present,
``exc`` (the formatted traceback) and any ``extra={...}`` fields given to the log call.
Nothing here ever sees a bearer token: the edge logs token *names* only.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any

from .config import ObservabilityConfig

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        return json.dumps(out, default=str, ensure_ascii=False)


def vllm_level(level: str) -> str:
    """vLLM's own log level under Tiller's ``level``: DEBUG passes through; otherwise at least
    WARNING (vLLM's INFO lines are engine internals that drown Tiller's)."""
    names = logging.getLevelNamesMapping()
    return level if level == "DEBUG" else max(level, "WARNING", key=names.__getitem__)


def set_vllm_level(level: str) -> str:
    """Set ``VLLM_LOGGING_LEVEL`` (read when vllm is first imported, also by engine processes)
    to ``vllm_level(level)`` unless the user set it; returns the level in force."""
    return os.environ.setdefault("VLLM_LOGGING_LEVEL", vllm_level(level.upper())).upper()


def configure(obs: ObservabilityConfig) -> None:
    """Install one stderr handler on the root logger, vLLM's loggers at ``set_vllm_level``.
    With JSON, vLLM's own loggers are told not to install their text handler
    (``VLLM_CONFIGURE_LOGGING=0``) so they come out as JSON."""
    logging.getLogger("vllm").setLevel(set_vllm_level(obs.log_level))
    handler = logging.StreamHandler(sys.stderr)
    if obs.log_format == "json":
        os.environ["VLLM_CONFIGURE_LOGGING"] = "0"  # read when vllm is first imported
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(obs.log_level.upper())
