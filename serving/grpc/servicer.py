"""The gRPC adapter: the OIP v2 ``GRPCInferenceService`` on ``grpc.aio``.

Registered through the generated ``add_GRPCInferenceServiceServicer_to_server``, whose service
name is the standard ``inference.GRPCInferenceService`` (see proto/generate.py), so Triton and
KServe clients reach it unchanged. Each RPC converts (``serving.grpc.converters``), delegates to
the dataplane, and maps a ``ServingError`` to a status code through ``serving.errormap``: nothing
else happens here.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final, TypeVar

import grpc

from kloop.pb import inference_pb2 as pb
from kloop.pb import inference_pb2_grpc as pb_grpc
from serving.core.dataplane import DataPlane, deadline_in
from serving.core.errors import ServingError
from serving.core.types import WireProtocol
from serving.errormap import grpc_code_name
from serving.grpc import converters

PROTOCOL: Final[WireProtocol] = "grpc"
log = logging.getLogger(__name__)
_T = TypeVar("_T")


async def _call(context: grpc.aio.ServicerContext[Any, Any], fn: Callable[[], Awaitable[_T]]) -> _T:
    try:
        return await fn()
    except ServingError as e:
        await context.abort(grpc.StatusCode[grpc_code_name(e)], e.message)
        raise  # unreachable: abort raises
    except Exception:  # a bug must not leak internals to the client
        log.exception("unexpected error in a gRPC handler")
        await context.abort(grpc.StatusCode.INTERNAL, "internal error")
        raise


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane

    async def ServerLive(
        self, request: pb.ServerLiveRequest,
        context: grpc.aio.ServicerContext[pb.ServerLiveRequest, pb.ServerLiveResponse],
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self._dp.live())

    async def ServerReady(
        self, request: pb.ServerReadyRequest,
        context: grpc.aio.ServicerContext[pb.ServerReadyRequest, pb.ServerReadyResponse],
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self._dp.ready())

    async def ModelReady(
        self, request: pb.ModelReadyRequest,
        context: grpc.aio.ServicerContext[pb.ModelReadyRequest, pb.ModelReadyResponse],
    ) -> pb.ModelReadyResponse:
        async def run() -> pb.ModelReadyResponse:
            return pb.ModelReadyResponse(ready=self._dp.model_ready(request.name, request.version or None))

        return await _call(context, run)

    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest,
        context: grpc.aio.ServicerContext[pb.ServerMetadataRequest, pb.ServerMetadataResponse],
    ) -> pb.ServerMetadataResponse:
        return converters.server_metadata_to_proto(self._dp.server_metadata())

    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest,
        context: grpc.aio.ServicerContext[pb.ModelMetadataRequest, pb.ModelMetadataResponse],
    ) -> pb.ModelMetadataResponse:
        async def run() -> pb.ModelMetadataResponse:
            meta = self._dp.model_metadata(request.name, request.version or None)
            return converters.model_metadata_to_proto(meta)

        return await _call(context, run)

    async def ModelInfer(
        self, request: pb.ModelInferRequest,
        context: grpc.aio.ServicerContext[pb.ModelInferRequest, pb.ModelInferResponse],
    ) -> pb.ModelInferResponse:
        # The hot path: no closure, one try (what ``_call`` does, inlined).
        try:
            core_request = converters.infer_request_from_proto(request)
            response = await self._dp.infer(
                core_request, PROTOCOL, deadline=deadline_in(context.time_remaining()))
            return converters.infer_response_to_proto(
                response, raw=bool(request.raw_input_contents))
        except ServingError as e:
            await context.abort(grpc.StatusCode[grpc_code_name(e)], e.message)
            raise  # unreachable: abort raises
        except Exception:  # a bug must not leak internals to the client
            log.exception("unexpected error in ModelInfer")
            await context.abort(grpc.StatusCode.INTERNAL, "internal error")
            raise


# The generated registration is unannotated (kloop.pb): typed once here, where it is called.
_register: Callable[[InferenceServicer, grpc.aio.Server], None] = (
    pb_grpc.add_GRPCInferenceServiceServicer_to_server)


def add_to_server(server: grpc.aio.Server, dataplane: DataPlane) -> None:
    _register(InferenceServicer(dataplane), server)
