"""The OIP v2 gRPC service on kloop's native front end (``serving.grpc.native``).

gRPC's C++ async server (``serving/grpc/native/grpc_front.cpp``) receives each call and writes
its answer; this module is the Python half: it drains arrived calls on the event loop (one
eventfd wake-up for many calls), parses each request, runs the very same
``serving.grpc.servicer.InferenceServicer`` methods the grpc.aio server runs, and hands back the
serialized answer or a status. So both servers give the same answers and the same errors; what
changes is that HTTP/2 framing, flow control and trailers no longer take the GIL
(docs/serving.md has the measurements).

The fast lane: the front end is told the routes (``FastLane.fast_routes``: model and version
-> the loaded version, its inputs and outputs) and parses the common ``ModelInfer`` itself
(inputs in the manifest's order with their datatypes and shapes in ``raw_input_contents``, no
parameters, no requested outputs). Those calls reach Python grouped per route, one buffer per
input with every member's rows; a group is one batcher request (``FastLane.infer_group``) and
the front end writes each member's response from the batch's outputs. Per call, Python then does
nothing at all: no protobuf parse, no task, no response message. The answers are byte for byte
the general path's (tests/component/serving/test_fast_lane.py). The route table is rebuilt whenever
loads, traffic weights or faults change (``FastLane.routing_generation``, checked at every
wake-up); calls routed by an older table, groups when a member's deadline already passed or
when the server would not admit them all, go down the general path one by one.

``FastLane`` is this front end's own narrow view of the core, defined here and implemented by
``serving.core.dataplane.DataPlane``: the routes, admission, and running a group.

Differences from grpc.aio a client can see: a request that does not parse is
``INVALID_ARGUMENT`` (grpc.aio says ``INTERNAL``); everything else is identical.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, Protocol, cast

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from kloop.pb import inference_pb2 as pb
from serving.core.batching import Arrays
from serving.core.errors import ServingError
from serving.core.repository import LoadedVersion
from serving.core.types import WireProtocol, fixed_itemsize, numpy_dtype
from serving.errormap import grpc_code_name
from serving.grpc import native
from serving.grpc.servicer import PROTOCOL, InferenceServicer

if TYPE_CHECKING:  # the compiled module's API, typed by _grpc_front.pyi
    from serving.grpc.native._grpc_front import Front, Group, Route

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


class FastLane(Protocol):
    """What the fast lane needs of the core, and all it may use of it
    (``serving.core.dataplane.DataPlane`` implements it; see the module docstring)."""

    @property
    def routing_generation(self) -> object:
        """Changes whenever ``fast_routes`` may answer differently (compared, never read)."""
        ...

    def fast_routes(self) -> Mapping[tuple[str, str], LoadedVersion]:
        """(model, version or '' for unversioned) -> the version such a request runs on, for
        every route whose requests may be grouped."""
        ...

    def fast_max_rows(self, loaded: LoadedVersion) -> int:
        """The most rows of one group for this version."""
        ...

    def admits(self, count: int) -> bool:
        """Whether ``count`` more requests would be admitted now."""
        ...

    async def infer_group(
        self, loaded: LoadedVersion, arrays: Arrays, started: Sequence[float],
        protocol: WireProtocol, *, deadline: float | None = None,
    ) -> Arrays:
        """Run a group (``arrays``: the members' rows per input; ``started``: each member's
        arrival, ``time.perf_counter()``) as one request; every output, all the rows."""
        ...

    def infer_group_now(
        self, loaded: LoadedVersion, arrays: Arrays, started: Sequence[float],
        protocol: WireProtocol,
    ) -> Arrays | None:
        """``infer_group`` at once on this thread when the version can run it so, else None
        (nothing happened)."""
        ...


@dataclasses.dataclass(frozen=True)
class _FastRoute:
    loaded: LoadedVersion
    inputs: tuple[tuple[np.dtype[Any], tuple[int, ...]], ...]  # per input: dtype, dims after 0


class NativeGrpcServer:
    """The OIP v2 service on the native front end, driven by the running event loop."""

    def __init__(self, servicer: InferenceServicer, address: str, *,
                 fast_lane: FastLane | None = None, reuse_port: bool = False) -> None:
        """``servicer`` answers every call of the general path; ``fast_lane``: the core behind
        the fast lane, or None to send every call down the general path."""
        self._methods: dict[str, tuple[Handler, type[Message]]] = {}
        for method in pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].methods:
            request_type = getattr(pb, method.input_type.name)
            self._methods[f"/{SERVICE}/{method.name}"] = (getattr(servicer, method.name),
                                                          request_type)
        if native.grpc_front is None:
            raise RuntimeError(native.UNAVAILABLE)
        try:
            self._front: Front = native.grpc_front.Front(address, reuse_port=reuse_port)
        except RuntimeError as e:
            raise OSError(str(e)) from e
        self.port: int = self._front.port
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._infer = self._methods[f"/{SERVICE}/ModelInfer"]
        self._fast = fast_lane
        self._synced: object = None  # the core's routing generation the table reflects
        self._generation = 0  # the table's, as the front end knows it
        self._routes: dict[int, _FastRoute] = {}
        if fast_lane is not None:
            self._sync_routes(fast_lane)
        self._loop.add_reader(self._front.fd, self._arrived)

    def _sync_routes(self, fast: FastLane) -> None:
        """Give the front end the core's current fast-lane routes, if they changed."""
        current = fast.routing_generation
        if current == self._synced:
            return
        self._synced = current
        self._generation += 1
        table: dict[int, _FastRoute] = {}
        routes: list[Route] = []
        for route_id, ((model, version), loaded) in enumerate(fast.fast_routes().items()):
            manifest = loaded.manifest
            inputs = [(s.name, s.datatype, list(s.shape[1:]),
                       math.prod(s.shape[1:]) * (fixed_itemsize(s.datatype) or 0))
                      for s in manifest.inputs]
            outputs = [(s.name, s.datatype) for s in manifest.outputs]
            routes.append((model, version, route_id, fast.fast_max_rows(loaded), inputs,
                           loaded.model, str(loaded.version), outputs))
            table[route_id] = _FastRoute(loaded, tuple(
                (numpy_dtype(s.datatype), tuple(s.shape[1:])) for s in manifest.inputs))
        self._front.set_routes(self._generation, routes)
        self._routes = table

    def _arrived(self) -> None:
        fast = self._fast
        if fast is not None:
            self._sync_routes(fast)  # before poll: calls routed by a stale table are told apart
        for handle, method, body, seconds_left in self._front.poll():
            entry = self._methods.get(method)
            if entry is None:
                self._front.respond(handle, grpc.StatusCode.UNIMPLEMENTED.value[0],
                                    f"Method not found: {method}", _EMPTY)
                continue
            self._track(self._loop.create_task(self._run(handle, entry, body, seconds_left)))
        if fast is not None:
            for group in self._front.poll_groups():
                # A group that cannot run now is looked at again in its task: admission is
                # checked in the same step that admits it, as infer does.
                if not self._run_group_now(group, fast):
                    self._track(self._loop.create_task(self._run_group(group, fast)))

    def _track(self, task: asyncio.Task[None]) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _lane(self, group: Group, fast: FastLane) -> tuple[_FastRoute, Arrays, list[float]] | None:
        """A fast-lane group's route, input arrays and members' arrivals (perf_counter), or
        None when each member must take the general path instead: routed by an older table,
        or some member would not be admitted or has expired. There, each member gets exactly
        the answer the general path gives it."""
        route = self._routes.get(group.route) if group.generation == self._generation else None
        if (route is None or not fast.admits(len(group))
                or any(s is not None and s <= 0 for s in group.seconds_left)):
            return None
        now = time.perf_counter()
        rows = group.rows
        arrays = tuple(np.frombuffer(data, dtype).reshape(rows, *dims)
                       for data, (dtype, dims) in zip(group.inputs, route.inputs, strict=True))
        return route, arrays, [now - age for age in group.ages]

    def _run_group_now(self, group: Group, fast: FastLane) -> bool:
        """Answer a group right away when its version's batcher would run it at once on the
        loop (a fast model, idle: ``FastLane.infer_group_now``); False when nothing happened
        (``_run_group`` then)."""
        lane = self._lane(group, fast)
        if lane is None:
            return False
        route, arrays, started = lane
        try:
            outputs = fast.infer_group_now(route.loaded, arrays, started, PROTOCOL)
            if outputs is None:
                return False
            self._respond_group(group, outputs)
        except Exception as e:  # noqa: BLE001  (_fail_group words it)
            self._fail_group(group, e)
        return True

    async def _run_group(self, group: Group, fast: FastLane) -> None:
        """One fast-lane group: one batcher request, each member answered from its rows."""
        lane = self._lane(group, fast)
        if lane is None:
            await asyncio.gather(*(self._run(handle, self._infer, body, seconds_left)
                                   for handle, body, seconds_left in group.requests()))
            return
        route, arrays, started = lane
        left = group.seconds_left
        deadline = None if None in left else time.monotonic() + max(cast("list[float]", left))
        try:
            outputs = await fast.infer_group(route.loaded, arrays, started, PROTOCOL,
                                             deadline=deadline)
            self._respond_group(group, outputs)
        except Exception as e:  # noqa: BLE001  (_fail_group words it)
            self._fail_group(group, e)

    def _respond_group(self, group: Group, outputs: Arrays) -> None:
        self._front.respond_group(group, [np.ascontiguousarray(o) for o in outputs])

    def _fail_group(self, group: Group, error: Exception) -> None:
        """Every member still held gets the error's status; a bug's details stay inside."""
        if isinstance(error, ServingError):
            self._front.fail_group(group, grpc.StatusCode[grpc_code_name(error)].value[0],
                                   error.message)
            return
        log.error("unexpected error in a fast-lane ModelInfer group", exc_info=error)
        self._front.fail_group(group, grpc.StatusCode.INTERNAL.value[0], "internal error")

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
