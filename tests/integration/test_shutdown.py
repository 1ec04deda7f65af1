"""SIGTERM: health goes NOT_SERVING, new requests get UNAVAILABLE, in-flight ones finish, exit 0."""

from __future__ import annotations

import signal
import sqlite3
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import start_server, stop_server
from tiller.client import Client, TillerClientError
from tiller.client.client import RetryPolicy


def test_sigterm_drains_in_flight_requests(
    tiny_model: Path, tmp_path: Path, server: object
) -> None:
    # `server` (the session one) is requested so both never start concurrently on 2 cores.
    log_db = tmp_path / "drain.sqlite"
    srv = start_server(
        tiny_model, tmp_path / "drain", "--drain-grace", "60", "--log-db", str(log_db)
    )
    try:
        target = srv.target
        results: list[object] = []
        done_at: list[float] = []

        def long_request(i: int) -> None:
            with Client(target, timeout=120) as c:
                try:
                    results.append(
                        c.generate(f"def drain{i}():", max_tokens=1500, temperature=1.0, seed=i)
                    )
                except TillerClientError as e:
                    results.append(e)
                done_at.append(time.monotonic())

        http_done: list[httpx.Response] = []

        def long_http_request() -> None:
            body = {"model": "tiny-llama", "prompt": "def drain_http():", "max_tokens": 1500,
                    "temperature": 1.0, "seed": 9}  # fmt: skip
            http_done.append(httpx.post(f"{srv.base_url}/completions", json=body, timeout=120))

        threads = [threading.Thread(target=long_http_request)]
        threads[0].start()  # first, so that it is surely in flight at SIGTERM
        with Client(target, timeout=30) as c:
            deadline = time.monotonic() + 30
            while c.status().in_flight < 1 and not http_done and time.monotonic() < deadline:
                time.sleep(0.01)
        threads += [threading.Thread(target=long_request, args=(i,)) for i in range(4)]
        for t in threads[1:]:
            t.start()
        with Client(target, timeout=30) as c:
            # Stop waiting as soon as all five run or one has ended (a random model may sample
            # EOS early; waiting for all four then would let every request finish first).
            deadline = time.monotonic() + 30
            busy = 5  # four gRPC requests and one HTTP request
            while (
                c.status().engine_unfinished < busy
                and not (done_at or http_done)
                and time.monotonic() < deadline
            ):
                time.sleep(0.01)
            assert c.status().engine_unfinished >= 1
        srv.proc.send_signal(signal.SIGTERM)
        sigterm_at = time.monotonic()

        with grpc.insecure_channel(target) as ch:
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 10
            status = None
            while time.monotonic() < deadline:
                status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                if status == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                time.sleep(0.01)
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with (
            Client(target, timeout=10, retry=RetryPolicy(attempts=0)) as c,
            pytest.raises(TillerClientError) as info,
        ):
            c.generate("too late", max_tokens=2)
        assert info.value.code == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in info.value.message
        # The HTTP API drains with the same service: not ready, new requests 503.
        assert httpx.get(f"{srv.base_url.removesuffix('/v1')}/ready", timeout=10).status_code == 503
        late = httpx.post(f"{srv.base_url}/completions", json={"model": "tiny-llama",
                          "prompt": "too late", "max_tokens": 2}, timeout=10)  # fmt: skip
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]

        for t in threads:
            t.join(timeout=120)
        assert len(results) == 4
        assert max(done_at) > sigterm_at, "some request should have been in flight at SIGTERM"
        assert len(http_done) == 1 and http_done[0].status_code == 200, http_done
        for r in results:
            assert not isinstance(r, Exception), r
            assert r.completion_tokens > 0  # type: ignore[attr-defined]
        assert srv.proc.wait(timeout=60) == 0, srv.logs()[-3000:]
        # Every id handed out before the shutdown is in the log, and the file is sound.
        conn = sqlite3.connect(log_db)
        ids = {r[0] for r in conn.execute("SELECT id FROM generations")}
        assert {r.generation_id for r in results} <= ids  # type: ignore[attr-defined]
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        conn.close()
    finally:
        stop_server(srv)
