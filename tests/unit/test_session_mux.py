"""The GenerateSession multiplexer on its own: batching, per-generation ends, teardown.

The real path (edge, servicer, engine over a socket) is tests/integration/test_session.py;
here each generation is a small async generator, so the batching is deterministic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
import pytest

from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.server.formats.errors import InvalidArgument
from tiller.server.session import Session


class _Context:
    def invocation_metadata(self) -> tuple[()]:
        return ()

    def peer(self) -> str:
        return "test"


def _open(steps: int, step: asyncio.Event | None = None, log: list[str] | None = None):
    """Each generation yields ``steps`` chunks, one per ``step`` wake-up (all at once if None)."""

    async def open_stream(request: pb.GenerateRequest, context: Any) -> AsyncGenerator[Any, None]:
        try:
            if request.prompt == "bad":
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "prompt is bad")
            for i in range(steps):
                if step is not None:
                    await step.wait()
                final = i == steps - 1
                chunk = pb.GenerateChunk(text_delta=f"{request.prompt}{i}")
                if final:
                    chunk.usage.completion_tokens = steps
                yield chunk
                await asyncio.sleep(0)
        finally:
            if log is not None:
                log.append(f"closed {request.prompt}")

    return open_stream


def _gen(tag: int, prompt: str, timeout: float | None = None) -> bytes:
    r = pb.SessionRequest(tag=tag, generate=pb.GenerateRequest(prompt=prompt))
    if timeout is not None:
        r.timeout_s = timeout
    return r.SerializeToString()


async def _feed(
    messages: list[bytes | float], hold: asyncio.Event | None = None
) -> AsyncIterator[bytes]:
    """The client's requests; a float is a pause of that many seconds."""
    for m in messages:
        if isinstance(m, float):
            await asyncio.sleep(m)
        else:
            yield m
    if hold is not None:
        await hold.wait()


async def _run(session: Session, requests: AsyncIterator[bytes]) -> list[pb.SessionBatch]:
    return [b async for b in session.run(requests)]


async def test_chunks_ready_together_share_a_message() -> None:
    session = Session(_open(5), _Context())  # type: ignore[arg-type]
    batches = await _run(session, _feed([_gen(t, f"p{t}") for t in range(1, 9)]))
    items = [i for b in batches for i in b.items]
    assert len(items) == 8 * 5
    assert len(batches) <= 6  # 8 generations step together: ~one message per step
    for tag in range(1, 9):
        mine = [i.chunk.text_delta for i in items if i.tag == tag]
        assert mine == [f"p{tag}{k}" for k in range(5)]  # each generation's order is kept


async def test_one_failing_generation_leaves_the_others() -> None:
    session = Session(_open(3), _Context())  # type: ignore[arg-type]
    batches = await _run(session, _feed([_gen(1, "a"), _gen(2, "bad"), _gen(3, "c")]))
    items = [i for b in batches for i in b.items]
    (err,) = [i for i in items if i.HasField("error")]
    assert err.tag == 2 and err.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert err.error.message == "prompt is bad"
    for tag in (1, 3):
        assert [i for i in items if i.tag == tag][-1].chunk.usage.completion_tokens == 3


async def test_cancel_and_timeout_end_their_generation_with_a_status() -> None:
    step = asyncio.Event()  # never set: generations wait for a step that does not come
    log: list[str] = []
    session = Session(_open(3, step, log), _Context())  # type: ignore[arg-type]
    hold = asyncio.Event()

    def cancel(tag: int) -> bytes:
        return pb.SessionRequest(tag=tag, cancel=True).SerializeToString()

    requests = [_gen(1, "a"), _gen(2, "b", timeout=0.05), 0.1, cancel(1), _gen(3, "c"), cancel(3)]
    task = asyncio.create_task(_run(session, _feed(requests, hold)))
    await asyncio.sleep(0.3)
    hold.set()
    items = [i for b in await task for i in b.items]
    codes = {i.tag: i.error.code for i in items if i.HasField("error")}
    assert codes == {
        1: grpc.StatusCode.CANCELLED.value[0],  # cancelled while waiting for a step
        2: grpc.StatusCode.DEADLINE_EXCEEDED.value[0],
        3: grpc.StatusCode.CANCELLED.value[0],  # cancelled before its task ever ran
    }
    assert sorted(log) == ["closed a", "closed b"]  # "c" was never opened


async def test_protocol_errors_end_the_session_and_close_open_generations() -> None:
    step = asyncio.Event()
    log: list[str] = []
    session = Session(_open(3, step, log), _Context())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match="tag 1 is already open"):
        await _run(session, _feed([_gen(1, "a"), _gen(1, "again")], asyncio.Event()))
    assert log == ["closed a"]
    session = Session(_open(1), _Context())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument) as info:
        await _run(session, _feed([b"\xff\xff\xff"]))
    assert info.value.field == "request"
