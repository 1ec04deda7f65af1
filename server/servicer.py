"""gRPC servicers: translate wire messages, call the service, map errors. No logic lives here."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import grpc

from tiller.protos.tiller.v1 import tiller_pb2 as pb
from tiller.protos.tiller.v1 import tiller_pb2_grpc as pb_grpc

from . import convert
from .adapters import AdapterTable
from .errors import TillerError, grpc_status
from .registry import admin_source
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
    """Adapter version management (served only with --enable-admin or on --admin-port)."""

    def __init__(
        self, adapters: AdapterTable, roots: tuple[Path, ...] = (), registry: Path | None = None
    ) -> None:
        self._adapters = adapters
        self._roots = roots  # LoadAdapter paths must lie inside one of these (empty: none may)
        self._registry = registry  # where LoadAdapter's registry references resolve

    def _info(self, name: str) -> pb.AdapterInfo:
        return convert.adapter_info(self._adapters.snapshot(), name, self._adapters.base_model)

    async def LoadAdapter(
        self, request: pb.LoadAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.LoadAdapterResponse:
        async def call() -> pb.LoadAdapterResponse:
            wanted = convert.adapter_source(request)
            source = admin_source(wanted, self._registry, self._roots)
            await self._adapters.load(source, activate=False)
            return pb.LoadAdapterResponse(adapter=self._info(source.name))

        return await _unary(context, call)

    async def ActivateAdapter(
        self, request: pb.ActivateAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.ActivateAdapterResponse:
        async def call() -> pb.ActivateAdapterResponse:
            await self._adapters.activate(request.name, request.version)
            return pb.ActivateAdapterResponse(adapter=self._info(request.name))

        return await _unary(context, call)

    async def RollbackAdapter(
        self, request: pb.RollbackAdapterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RollbackAdapterResponse:
        async def call() -> pb.RollbackAdapterResponse:
            await self._adapters.rollback(request.name)
            return pb.RollbackAdapterResponse(adapter=self._info(request.name))

        return await _unary(context, call)
