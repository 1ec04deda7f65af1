"""GenerateSession: many streams over one RPC, on the real server (tiny model, real gRPC), from
``AsyncClient`` and from the blocking ``Client`` (threads); a session that breaks, on a server
made to."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from tiller.client import AsyncClient, Client, StreamChunk, TillerClientError
from tiller.client.session import Received
from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc

CODE = grpc.StatusCode
PROMPTS = [f"def step_{i}(x):" for i in range(8)]


async def _collect(chunks: AsyncIterator[StreamChunk]) -> list[StreamChunk]:
    return [c async for c in chunks]


async def test_session_streams_equal_separate_streams_and_share_messages(target: str) -> None:
    kw = dict(max_tokens=24, temperature=1.0, ignore_eos=True)
    async with AsyncClient(target, timeout=120) as plain:
        alone = await asyncio.gather(
            *(_collect(plain.stream(p, seed=i, **kw)) for i, p in enumerate(PROMPTS))
        )
    async with AsyncClient(target, timeout=120, multiplex=True) as mux:
        shared = await asyncio.gather(
            *(_collect(mux.stream(p, seed=i, **kw)) for i, p in enumerate(PROMPTS))
        )
        session = mux.session
        assert session is not None
    _same_generations(alone, shared, 24)
    _shared_messages(session.received, shared)


def _same_generations(
    alone: list[list[StreamChunk]], shared: list[list[StreamChunk]], tokens: int
) -> None:
    for a, b in zip(alone, shared, strict=True):
        # how tokens split into chunks depends on timing; the tokens do not
        assert [t for c in a for t in c.token_ids] == [t for c in b for t in c.token_ids]
        assert "".join(c.text for c in a) == "".join(c.text for c in b)
        assert b[-1].final and b[-1].completion_tokens == tokens and b[-1].logged
        assert b[0].generation_id.startswith("gen-")


def _shared_messages(received: Received, shared: list[list[StreamChunk]]) -> None:
    """The streams ran at once over one RPC: one engine step's chunks shared a message."""
    assert received.items == sum(len(b) for b in shared)
    assert received.messages < received.items / 2, (received.messages, received.items)


async def test_errors_end_one_generation_only(target: str) -> None:
    async with AsyncClient(target, timeout=120, multiplex=True) as mux:
        good = asyncio.create_task(
            _collect(mux.stream("class Kept:", max_tokens=40, temperature=0.0, ignore_eos=True))
        )
        # each ends with the status and message GenerateStream returns for it
        async with AsyncClient(target, timeout=120) as plain:
            for kw, named in (
                (dict(max_tokens=5000), "sampling.max_tokens"),
                (dict(max_tokens=-1), "sampling.max_tokens"),
                (dict(top_p=2.0), "top_p"),
                (dict(adapter="nope"), "nope"),
                (dict(feedback_mix={"a": 1.0}), "feedback_mix"),
            ):
                with pytest.raises(TillerClientError) as alone:
                    await _collect(plain.stream("bad", **kw))
                with pytest.raises(TillerClientError) as shared:
                    await _collect(mux.stream("bad", **kw))
                assert shared.value.code == alone.value.code != CODE.OK
                assert shared.value.message == alone.value.message
                assert named in shared.value.message, shared.value
        chunks = await good
        assert chunks[-1].final and chunks[-1].completion_tokens == 40
        after = await _collect(mux.stream("still open", max_tokens=3, temperature=0.0))
        assert after[-1].final


def _rows(db: Path, sql: str, args: tuple[object, ...]) -> list[sqlite3.Row]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return con.execute(sql, args).fetchall()
    finally:
        con.close()


async def test_leaving_a_stream_cancels_its_generation_only(target: str, log_db: Path) -> None:
    async with AsyncClient(target, timeout=120, multiplex=True) as mux:
        other = asyncio.create_task(
            _collect(mux.stream("for k in", max_tokens=30, temperature=0.0, ignore_eos=True))
        )
        stream = mux.stream("class Left:", max_tokens=1900, temperature=0.0, ignore_eos=True)
        first = await anext(stream)
        await stream.aclose()  # sends the cancel
        rows: list[sqlite3.Row] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not rows:
            sql = "SELECT finish_reason, completion_tokens FROM generations WHERE id = ?"
            rows = _rows(log_db, sql, (first.generation_id,))
            await asyncio.sleep(0.05)
        assert rows and rows[0]["finish_reason"] == "abort"
        assert 0 < rows[0]["completion_tokens"] < 1900
        assert (await other)[-1].completion_tokens == 30
        # the cancel reached the engine: nothing of this test's is left there
        settle = time.monotonic() + 60
        while (await mux.status()).engine_unfinished and time.monotonic() < settle:
            await asyncio.sleep(0.05)
        assert (await mux.status()).engine_unfinished == 0


async def test_timeout_ends_one_generation_and_the_session_goes_on(target: str) -> None:
    async with AsyncClient(target, timeout=120, multiplex=True) as mux:
        with pytest.raises(TillerClientError) as info:
            await _collect(mux.stream("long", max_tokens=1900, ignore_eos=True, timeout=0.5))
        assert info.value.code == CODE.DEADLINE_EXCEEDED
        after = await _collect(mux.stream("short", max_tokens=3, temperature=0.0))
        assert after[-1].final and after[-1].completion_tokens == 3


async def _raw(target: str, requests: list[bytes], wait: float = 0.0) -> list[pb.SessionBatch]:
    """The session RPC with raw request bytes; half-closes after ``wait`` seconds."""

    async def send() -> AsyncIterator[bytes]:
        for r in requests:
            yield r
        await asyncio.sleep(wait)

    async with grpc.aio.insecure_channel(target) as ch:
        call = ch.stream_stream(
            "/tiller.v1.Tiller/GenerateSession",
            request_serializer=None,
            response_deserializer=pb.SessionBatch.FromString,
        )
        return [b async for b in call(send(), timeout=60)]


def _generate(tag: int, prompt: str = "x", **sampling: int) -> pb.SessionRequest:
    req = pb.GenerateRequest(prompt=prompt)
    for k, v in sampling.items():
        setattr(req.sampling, k, v)
    return pb.SessionRequest(tag=tag, generate=req)


async def test_bad_session_requests_are_named(target: str) -> None:
    bad_timeout = _generate(1, max_tokens=2)
    bad_timeout.timeout_s = -1.0
    batches = await _raw(
        target,
        [
            bad_timeout.SerializeToString(),
            pb.SessionRequest(tag=2).SerializeToString(),  # no action
            _generate(3, max_tokens=2).SerializeToString(),
            pb.SessionRequest(tag=99, cancel=True).SerializeToString(),  # unknown: ignored
        ],
        wait=0.2,
    )
    items = [i for b in batches for i in b.items]
    errors = {i.tag: i.error for i in items if i.HasField("error")}
    assert errors[1].code == CODE.INVALID_ARGUMENT.value[0] and "timeout_s" in errors[1].message
    assert errors[2].code == CODE.INVALID_ARGUMENT.value[0] and "action" in errors[2].message
    ends = [i.chunk for i in items if i.tag == 3 and i.HasField("chunk")]
    assert ends[-1].HasField("usage") and 3 not in errors and 99 not in errors

    # Bytes that are no SessionRequest, and a tag reused while open, end the whole session.
    for raw, named in (
        ([b"\xff\xff\xff"], "not a valid message for GenerateSession"),
        (
            [
                _generate(5, max_tokens=500, ignore_eos=True).SerializeToString(),
                _generate(5, max_tokens=2).SerializeToString(),
            ],
            "tag 5 is already open",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await _raw(target, raw, wait=5)
        assert info.value.code() == CODE.INVALID_ARGUMENT
        assert named in (info.value.details() or "")


# ---------------------------------------------------------------- the blocking Client
# Client(multiplex=True): streams from many threads over one session.


def _in_threads(calls: list[Callable[[], list[StreamChunk]]]) -> list[list[StreamChunk]]:
    with futures.ThreadPoolExecutor(len(calls)) as pool:
        return [f.result(timeout=300) for f in [pool.submit(c) for c in calls]]


def test_blocking_threads_share_one_session_and_get_what_separate_streams_get(target: str) -> None:
    kw: dict[str, Any] = dict(max_tokens=24, temperature=1.0, ignore_eos=True)

    def calls(c: Client) -> list[Callable[[], list[StreamChunk]]]:
        return [lambda i=i, p=p: list(c.stream(p, seed=i, **kw)) for i, p in enumerate(PROMPTS)]

    with Client(target, timeout=120) as plain:
        alone = _in_threads(calls(plain))
    with Client(target, timeout=120, multiplex=True) as mux:
        shared = _in_threads(calls(mux))
        session = mux.session
        assert session is not None
    _same_generations(alone, shared, 24)
    _shared_messages(session.received, shared)


def test_blocking_errors_end_one_generation_only(target: str) -> None:
    with Client(target, timeout=120, multiplex=True) as mux, Client(target, timeout=120) as plain:
        with futures.ThreadPoolExecutor(1) as pool:
            good = pool.submit(
                lambda: list(
                    mux.stream("class Kept:", max_tokens=200, temperature=0.0, ignore_eos=True)
                )
            )
            session = None
            for kw, named in (
                (dict(max_tokens=5000), "sampling.max_tokens"),
                (dict(top_p=2.0), "top_p"),
                (dict(adapter="nope"), "nope"),
            ):
                with pytest.raises(TillerClientError) as alone:
                    list(plain.stream("bad", **kw))
                with pytest.raises(TillerClientError) as shared:
                    list(mux.stream("bad", **kw))
                session = session or mux.session
                assert shared.value.code == alone.value.code != CODE.OK
                assert shared.value.message == alone.value.message
                assert named in shared.value.message, shared.value
            chunks = good.result(timeout=300)
        assert chunks[-1].final and chunks[-1].completion_tokens == 200
        assert list(mux.stream("still open", max_tokens=3, temperature=0.0))[-1].final
        # all of it over the one session, which the errors left open
        assert session is not None and mux.session is session and session.error is None


def test_blocking_leaving_a_stream_cancels_its_generation_only(target: str, log_db: Path) -> None:
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
            sql = "SELECT finish_reason, completion_tokens FROM generations WHERE id = ?"
            rows = _rows(log_db, sql, (first.generation_id,))
            time.sleep(0.05)
        assert rows and rows[0]["finish_reason"] == "abort"
        assert 0 < rows[0]["completion_tokens"] < 1900
        settle = time.monotonic() + 60  # the cancel reached the engine
        while mux.status().engine_unfinished and time.monotonic() < settle:
            time.sleep(0.05)
        assert mux.status().engine_unfinished == 0


def test_blocking_timeout_ends_one_generation_and_the_session_goes_on(target: str) -> None:
    before = set(threading.enumerate())
    with Client(target, timeout=120, multiplex=True) as mux:
        with pytest.raises(TillerClientError) as info:
            list(mux.stream("long", max_tokens=1900, ignore_eos=True, timeout=0.5))
        assert info.value.code == CODE.DEADLINE_EXCEEDED
        session = mux.session
        after = list(mux.stream("short", max_tokens=3, temperature=0.0))
        assert after[-1].final and after[-1].completion_tokens == 3
        assert session is not None and mux.session is session and session.error is None
        # an open session holds its reader and gRPC's thread consuming its requests ...
        opened = set(threading.enumerate()) - before
        assert "tiller-session" in {t.name for t in opened} and len(opened) >= 2, opened
    _all_ended(opened)  # ... until the client closes it


def _all_ended(threads: set[threading.Thread]) -> None:
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t for t in threads if t.is_alive()]


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


def test_blocking_a_broken_session_fails_its_streams_and_the_next_opens_a_new_one() -> None:
    server = grpc.server(futures.ThreadPoolExecutor(4))
    servicer = _Breaks()
    pb_grpc.add_TillerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    before = set(threading.enumerate())
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
        # no thread of the broken sessions' is left waiting (the server's pool aside)
        _all_ended({t for t in set(threading.enumerate()) - before if "ThreadPool" not in t.name})
    finally:
        server.stop(None)
