"""kill -9 the server under load: every generation acknowledged as logged is in the log, the
database passes ``PRAGMA integrity_check``, and a restarted server carries on with the file."""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
from pathlib import Path

from tests.conftest import ServerProc, start_server, stop_server
from tiller.client import Client, TillerClientError
from tiller.client.client import RetryPolicy

WORKERS = 8
ACKED_BEFORE_KILL = 60


def _load(target: str, i: int, acked: list[str], enough: threading.Event) -> None:
    """Unary and streaming requests until the server is gone; collects acknowledged ids."""
    with Client(target, timeout=120, retry=RetryPolicy(attempts=0)) as c:
        k = 0
        while True:
            k += 1
            kw = dict(max_tokens=8 + (k % 24), temperature=1.0, n=1 + (k % 2))
            try:
                if i % 2:
                    g = c.generate(f"crash load {i}.{k}", **kw)  # type: ignore[arg-type]
                    ids = [x.generation_id for x in g.completions] if g.logged else []
                else:
                    seen: set[str] = set()
                    logged = False
                    for ch in c.stream(f"crash stream {i}.{k}", **kw):  # type: ignore[arg-type]
                        if ch.generation_id:
                            seen.add(ch.generation_id)
                        logged = logged or ch.logged
                    ids = sorted(seen) if logged else []
            except TillerClientError:
                return  # the server was killed
            acked.extend(ids)
            if len(acked) >= ACKED_BEFORE_KILL:
                enough.set()


def test_kill_9_under_load_loses_no_acknowledged_generation(
    tiny_model: Path, tmp_path: Path, server: ServerProc
) -> None:
    # `server` (the session one) is requested so that two servers never start at once.
    db = tmp_path / "crash.sqlite"
    srv = start_server(tiny_model, tmp_path / "srv", "--log-db", str(db))
    acked: list[str] = []
    enough = threading.Event()
    threads = [
        threading.Thread(target=_load, args=(srv.target, i, acked, enough), daemon=True)
        for i in range(WORKERS)
    ]
    try:
        for t in threads:
            t.start()
        assert enough.wait(timeout=300), f"only {len(acked)} acknowledged generations"
        os.killpg(srv.proc.pid, signal.SIGKILL)  # the server and its engine core, mid-load
        assert srv.proc.wait(timeout=60) == -signal.SIGKILL
        for t in threads:
            t.join(timeout=120)
            assert not t.is_alive()
    finally:
        if srv.proc.poll() is None:
            os.killpg(srv.proc.pid, signal.SIGKILL)

    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        logged = {r[0] for r in conn.execute("SELECT id FROM generations")}
    finally:
        conn.close()
    missing = set(acked) - logged
    assert not missing, f"{len(missing)} of {len(acked)} acknowledged generations are missing"

    # A restarted server opens the same file (WAL recovery) and keeps logging to it.
    again = start_server(tiny_model, tmp_path / "srv2", "--log-db", str(db))
    try:
        with Client(again.target, timeout=120) as c:
            g = c.generate("after the crash", max_tokens=4)
        assert g.logged
    finally:
        stop_server(again)
    assert again.proc.returncode == 0, again.logs()[-3000:]
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = {r[0] for r in conn.execute("SELECT id FROM generations")}
    finally:
        conn.close()
    assert g.generation_id in ids and set(acked) <= ids
