"""The OIP v2 gRPC service on kloop's native front end (``serving.native``).

gRPC's C++ async server (``serving/native/grpc_front.cpp``) receives each call and writes its
answer; this module is the Python half: it drains arrived calls on the event loop (one eventfd
wake-up for many calls), parses each request, runs the very same ``grpc_api.InferenceServicer``
methods the grpc.aio server runs, and hands back the serialized answer or a status. So both
servers give the same answers and the same errors; what changes is that HTTP/2 framing, flow
control and trailers no longer take the GIL (docs/serving.md has the measurements).

Differences from grpc.aio a client can see: a request that does not parse is
``INVALID_ARGUMENT`` (grpc.aio says ``INTERNAL``); everything else is identical.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

import grpc
from google.protobuf.message import DecodeError, Message

from kloop.pb import inference_pb2 as pb
from serving import native
from serving.core.dataplane import DataPlane
from serving.grpc_api import InferenceServicer

log = logging.getLogger(__name__)
SERVICE = "inference.GRPCInferenceService"
_EMPTY = b""


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Context:
    """What the servicer uses of ``grpc.aio.ServicerContext``: the deadline and ``abort``."""

    __slots__ = ("_deadline", "code", "details")

    def __init__(self, seconds_left: float | None) -> None:
        self._deadline = None if seconds_left is None else time.monotonic() + seconds_left
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise _Abort(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details


Handler = Callable[[Any, Any], Awaitable[Message]]


class NativeGrpcServer:
    """The OIP v2 service on the native front end, driven by the running event loop."""

    def __init__(self, dataplane: DataPlane, address: str, *, reuse_port: bool = False) -> None:
        servicer = InferenceServicer(dataplane)
        self._methods: dict[str, tuple[Handler, type[Message]]] = {}
        for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            request_type = getattr(pb, method.input_type.name)
            self._methods[f"/{SERVICE}/{method.name}"] = (getattr(servicer, method.name),
                                                          request_type)
        if native.grpc_front is None:
            raise RuntimeError(native.UNAVAILABLE)
        try:
            self._front = native.grpc_front.Front(address, reuse_port=reuse_port)
        except RuntimeError as e:
            raise OSError(str(e)) from e
        self.port: int = self._front.port
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop.add_reader(self._front.fd, self._arrived)

    def _arrived(self) -> None:
        for handle, method, body, seconds_left in self._front.poll():
            entry = self._methods.get(method)
            if entry is None:
                self._front.respond(handle, grpc.StatusCode.UNIMPLEMENTED.value[0],
                                    f"Method not found: {method}", _EMPTY)
                continue
            task = self._loop.create_task(self._run(handle, entry, body, seconds_left))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, handle: int, entry: tuple[Handler, type[Message]], body: bytes,
                   seconds_left: float | None) -> None:
        fn, request_type = entry
        code, details, payload = grpc.StatusCode.OK, "", _EMPTY
        try:
            request = request_type.FromString(body)
        except DecodeError:
            code = grpc.StatusCode.INVALID_ARGUMENT
            details = f"could not parse the request as {request_type.__name__}"
        else:
            context = _Context(seconds_left)
            try:
                payload = (await fn(request, context)).SerializeToString()
            except _Abort as e:
                code, details = e.code, e.details
            except NotImplementedError:  # the generated base servicer's answer
                code = context.code or grpc.StatusCode.UNIMPLEMENTED
                details = context.details
            except Exception:  # a bug must not leak internals, nor leave the call unanswered
                log.exception("unexpected error in %s", fn.__name__)
                code, details = grpc.StatusCode.INTERNAL, "internal error"
        self._front.respond(handle, code.value[0], details, payload)

    async def stop(self, grace: float) -> None:
        """Answers being computed get ``grace`` seconds; then every call still unanswered gets
        UNAVAILABLE and the listener closes."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        self._loop.remove_reader(self._front.fd)
        await asyncio.to_thread(self._front.stop, min(grace, 1.0))
        for task in list(self._tasks):
            task.cancel()
