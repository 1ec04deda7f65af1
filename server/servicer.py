"""gRPC servicers: translate wire messages, call the service, map errors. No logic lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc

from . import convert
from .adapters import AdapterTable
from .errors import TillerError, Unimplemented, grpc_status
from .service import GenerationService

T = TypeVar("T")
VERSION = "0.1.0"


async def _unary(context: grpc.aio.ServicerContext, call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except TillerError as e:
        await context.abort(grpc_status(e), e.message)
        raise  # unreachable: abort raises


class TillerServicer(pb_grpc.TillerServicer):
    def __init__(self, service: GenerationService, adapters: AdapterTable) -> None:
        self._service = service
        self._adapters = adapters

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> pb.GenerateResponse:
        async def call() -> pb.GenerateResponse:
            result = await self._service.generate(convert.request_from_pb(request))
            return convert.result_to_pb(result)

        return await _unary(context, call)

    async def GenerateStream(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateChunk]:
        encoder = convert.ChunkEncoder()
        events = self._service.stream(convert.request_from_pb(request))
        try:
            async for event in events:
                chunk = encoder.encode(event)
                if chunk is not None:
                    yield chunk
        except TillerError as e:
            await context.abort(grpc_status(e), e.message)
        finally:
            await events.aclose()  # a cancelled RPC closes the stream: the engine aborts

    async def SubmitFeedback(
        self, request: pb.SubmitFeedbackRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitFeedbackResponse:
        async def call() -> pb.SubmitFeedbackResponse:
            fid, duplicate = await self._service.submit_feedback(convert.feedback_from_pb(request))
            return convert.feedback_to_pb(fid, duplicate)

        return await _unary(context, call)

    async def ListAdapters(
        self, request: pb.ListAdaptersRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAdaptersResponse:
        return convert.adapters_to_pb(self._adapters.snapshot(), self._adapters.base_model)

    async def GetServerStatus(
        self, request: pb.GetServerStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ServerStatus:
        return convert.status_to_pb(self._service.status(), self._adapters.base_model, VERSION)


class TillerAdminServicer(pb_grpc.TillerAdminServicer):
    """Admin RPCs. Version management arrives with the learner; until then they say so."""

    async def _unimplemented(self, context: grpc.aio.ServicerContext, what: str) -> Any:
        async def call() -> Any:
            raise Unimplemented(
                f"{what} is not available yet: adapters load at start-up (--adapter)"
            )

        return await _unary(context, call)

    async def LoadAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented(context, "LoadAdapter")

    async def ActivateAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented(context, "ActivateAdapter")

    async def RollbackAdapter(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return await self._unimplemented(context, "RollbackAdapter")
