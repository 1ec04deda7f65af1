"""Per-chunk cost of the RPC edge, isolated from the engine: a real grpc.aio server streams
GenerateChunks from a stub servicer with and without ``Edge`` (metrics and the request time cap
on), alternating rounds in one process. Prints process CPU µs per chunk and per unary RPC
(client and server together; CPU time, so that other load on the machine matters less).

    python bench/edge_micro.py [--chunks 20000] [--unary 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import AsyncIterator

import grpc

from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc
from tiller.server.edge import Edge
from tiller.server.metrics import Metrics


class Stub(pb_grpc.TillerServicer):
    def __init__(self, chunks: int) -> None:
        self.chunks = chunks

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        for i in range(self.chunks):
            yield pb.GenerateChunk(index=0, text_delta="x", token_ids=[i % 1000])

    async def GetServerStatus(
        self, request: pb.GetServerStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerStatus:
        return pb.ServerStatus(model="stub")


async def measure(with_edge: bool, chunks: int, unary: int) -> tuple[float, float]:
    interceptors = [Edge(None, 900.0, Metrics("bench"))] if with_edge else []
    server = grpc.aio.server(interceptors=interceptors)
    pb_grpc.add_TillerServicer_to_server(Stub(chunks), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.TillerStub(ch)
            req = pb.GenerateRequest(prompt="hi")
            t = time.process_time()
            n = 0
            async for _ in stub.GenerateStream(req):
                n += 1
            per_chunk = (time.process_time() - t) / n
            t = time.process_time()
            for _ in range(unary):
                await stub.GetServerStatus(pb.GetServerStatusRequest())
            per_unary = (time.process_time() - t) / unary
    finally:
        await server.stop(None)
    return per_chunk, per_unary


async def main(a: argparse.Namespace) -> None:
    res: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for r in range(a.rounds):
        for edge in (False, True) if r % 2 == 0 else (True, False):
            res[edge].append(await measure(edge, a.chunks, a.unary))
    chunk = {k: statistics.median(x[0] for x in v) * 1e6 for k, v in res.items()}
    unary = {k: statistics.median(x[1] for x in v) * 1e6 for k, v in res.items()}
    print(
        f"edge on/off time per streamed chunk ratio: {chunk[True] / chunk[False]:.3f} "
        f"({chunk[True]:.1f} vs {chunk[False]:.1f} µs: +{chunk[True] - chunk[False]:.1f} µs/chunk)"
    )
    print(
        f"edge on/off time per unary RPC ratio: {unary[True] / unary[False]:.3f} "
        f"({unary[True]:.1f} vs {unary[False]:.1f} µs: +{unary[True] - unary[False]:.1f} µs/RPC)"
    )


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--chunks", type=int, default=20000)
    p.add_argument("--unary", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    try:
        import uvloop

        uvloop.run(main(args))
    except ImportError:
        asyncio.run(main(args))
