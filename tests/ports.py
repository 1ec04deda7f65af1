"""Ports for servers under test, without the race of "bind port 0, close it, start a server on it".

``tiller serve`` binds port 0 itself and announces what it bound ("tiller: serving ... on
HOST:PORT", "tiller: admin on HOST:PORT", "tiller: metrics on http://HOST:PORT/metrics");
``announced_port`` reads those lines. A third-party server that must be told its port up front
(vLLM's OpenAI server, the judge) gets ``free_port()`` and is started again on a fresh one when
``lost_port_race`` says that another process took the port before the server bound it.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Literal

ADDRESS_IN_USE = "Address already in use"
PORT_ATTEMPTS = 5  # starts of a fixed-port server before a lost race is a failure

Announced = Literal["serving", "admin", "metrics"]
_ANNOUNCEMENTS: dict[Announced, re.Pattern[str]] = {
    "serving": re.compile(r"^tiller: serving .+ on \S+:(\d+)$", re.MULTILINE),
    "admin": re.compile(r"^tiller: admin on \S+:(\d+)$", re.MULTILINE),
    "metrics": re.compile(r"^tiller: metrics on http://\S+:(\d+)/metrics$", re.MULTILINE),
}


def free_port() -> int:
    """A port free right now; another process may take it before the caller binds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def announced_port(log: str, what: Announced) -> int | None:
    """The port ``tiller serve`` announced for ``what`` in its output, or None (not yet)."""
    m = _ANNOUNCEMENTS[what].search(log)
    return int(m.group(1)) if m else None


def wait_announced(
    proc: subprocess.Popen[bytes], log: Callable[[], str], what: Announced, timeout: float
) -> int:
    """Wait until ``tiller serve`` (``proc``, writing ``log()``) announces its ``what`` port."""
    deadline = time.monotonic() + timeout
    while (port := announced_port(log(), what)) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"no {what} port announced:\n{log()[-4000:]}")
        time.sleep(0.2)
    return port


def lost_port_race(proc: subprocess.Popen[bytes], log: str) -> bool:
    """True when ``proc`` has exited because its port was taken between choice and bind."""
    return proc.poll() is not None and ADDRESS_IN_USE in log
