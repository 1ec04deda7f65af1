"""The blocking ``Client(multiplex=True)``: streams from many threads over one GenerateSession,
on the real server (tiny model, real gRPC); a session that breaks, on a server made to."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tiller.client import Client, StreamChunk, TillerClientError
from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc

CODE = grpc.StatusCode
PROMPTS = [f"def step_{i}(x):" for i in range(8)]


def _in_threads(calls: list[Callable[[], list[StreamChunk]]]) -> list[list[StreamChunk]]:
    with futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(timeout=300) for f in [pool.submit(c) for c in calls]]


def test_threads_share_one_session_and_get_what_separate_streams_get(target: str) -> None:
    kw: dict[str, Any] = dict(max_tokens=24, temperature=1.0, ignore_eos=True)

    def calls(c: Client) -> list[Callable[[], list[StreamChunk]]]:
        return [lambda i=i, p=p: list(c.stream(p, seed=i, **kw)) for i, p in enumerate(PROMPTS)]

    with Client(target, timeout=120) as plain:
        alone = _in_threads(calls(plain))
    with Client(target, timeout=120, multiplex=True) as mux:
        shared = _in_threads(calls(mux))
        session = mux.session
        assert session is not None
        messages, items = session.messages, session.items
    for a, b in zip(alone, shared, strict=True):
        assert [t for c in a for t in c.token_ids] == [t for c in b for t in c.token_ids]
        assert "".join(c.text for c in a) == "".join(c.text for c in b)
        assert b[-1].final and b[-1].completion_tokens == 24 and b[-1].logged
    # 8 streams of 24 tokens ran at once over one RPC: one engine step's chunks share a message
    assert items == sum(len(b) for b in shared)
    assert messages < items / 2, (messages, items)


def test_errors_end_one_generation_only(target: str) -> None:
    with Client(target, timeout=120, multiplex=True) as mux, Client(target, timeout=120) as plain:
        with futures.ThreadPoolExecutor(1) as pool:
            good = pool.submit(
                lambda: list(
                    mux.stream("class Kept:", max_tokens=40, temperature=0.0, ignore_eos=True)
                )
            )
            for kw, named in (
                (dict(max_tokens=5000), "sampling.max_tokens"),
                (dict(top_p=2.0), "top_p"),
                (dict(adapter="nope"), "nope"),
            ):
                with pytest.raises(TillerClientError) as alone:
                    list(plain.stream("bad", **kw))
                with pytest.raises(TillerClientError) as shared:
                    list(mux.stream("bad", **kw))
                assert shared.value.code == alone.value.code != CODE.OK
                assert shared.value.message == alone.value.message
                assert named in shared.value.message, shared.value
            chunks = good.result(timeout=300)
        assert chunks[-1].final and chunks[-1].completion_tokens == 40
        assert list(mux.stream("still open", max_tokens=3, temperature=0.0))[-1].final


def test_leaving_a_stream_cancels_its_generation_only(target: str, log_db: Path) -> None:
    with Client(target, timeout=120, multiplex=True) as mux:
        with futures.ThreadPoolExecutor(1) as pool:
            other = pool.submit(
                lambda: list(
                    mux.stream("for k in", max_tokens=30, temperature=0.0, ignore_eos=True)
                )
            )
            stream = mux.stream("class Left:", max_tokens=1900, temperature=0.0, ignore_eos=True)
            first = next(stream)
            stream.close()  # sends the cancel
            assert other.result(timeout=300)[-1].completion_tokens == 30
        rows: list[sqlite3.Row] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not rows:
            con = sqlite3.connect(log_db)
            con.row_factory = sqlite3.Row
            sql = "SELECT finish_reason, completion_tokens FROM generations WHERE id = ?"
            rows = con.execute(sql, (first.generation_id,)).fetchall()
            con.close()
            time.sleep(0.05)
        assert rows and rows[0]["finish_reason"] == "abort"
        assert 0 < rows[0]["completion_tokens"] < 1900
        settle = time.monotonic() + 60  # the cancel reached the engine
        while mux.status().engine_unfinished and time.monotonic() < settle:
            time.sleep(0.05)
        assert mux.status().engine_unfinished == 0


def test_timeout_ends_one_generation_and_the_session_goes_on(target: str) -> None:
    with Client(target, timeout=120, multiplex=True) as mux:
        with pytest.raises(TillerClientError) as info:
            list(mux.stream("long", max_tokens=1900, ignore_eos=True, timeout=0.5))
        assert info.value.code == CODE.DEADLINE_EXCEEDED
        after = list(mux.stream("short", max_tokens=3, temperature=0.0))
        assert after[-1].final and after[-1].completion_tokens == 3


class _Breaks(pb_grpc.TillerServicer):
    """Answers each session's first generation with one chunk, then ends the RPC."""

    def __init__(self) -> None:
        self.sessions = 0

    def GenerateSession(
        self, requests: Iterator[pb.SessionRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.SessionBatch]:
        self.sessions += 1
        first = next(requests)
        batch = pb.SessionBatch()
        batch.items.add(tag=first.tag, chunk=pb.GenerateChunk(text_delta="one", token_ids=[1]))
        yield batch
        context.abort(grpc.StatusCode.UNAVAILABLE, "the server is going away")


def test_a_broken_session_fails_its_streams_and_the_next_opens_a_new_one() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    servicer = _Breaks()
    pb_grpc.add_TillerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", timeout=30, multiplex=True) as mux:
            for n in (1, 2):
                stream = mux.stream("x")
                assert next(stream).text == "one"
                with pytest.raises(TillerClientError) as info:
                    next(stream)
                assert info.value.code == CODE.UNAVAILABLE
                assert "going away" in info.value.message
                assert mux.session is not None and mux.session.error is not None
                assert servicer.sessions == n  # the next stream opened a session of its own
            # closing leaves no thread of the session's behind
        assert not [t for t in threading.enumerate() if t.name == "tiller-session"]
    finally:
        server.stop(None)
