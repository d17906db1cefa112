"""The control plane over gRPC: ``kloop.control.v1.Control`` (``proto/control.proto``).

Each response is the same view the HTTP API returns (``deploy.control.views``), parsed into its
message, so the two protocols answer alike. Writes need the token in the call's metadata
(``authorization: Bearer TOKEN``); errors map as HTTP's do: INVALID_ARGUMENT (400),
UNAUTHENTICATED (401), NOT_FOUND (404), FAILED_PRECONDITION (409).

``google.protobuf.Struct`` carries numbers as doubles: in a spec or policy a whole number
(``8.0``) is read as the integer it spells, so ``epochs: 8`` works from any client; a fraction
where an integer belongs is still refused by the spec's own checks.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import Struct

from deploy.control import views
from deploy.control.logs import LOG_SOURCES, MAX_LOG_BYTES, new_lines, read_log
from deploy.control.progress import progress_path, read_progress
from deploy.control.service import ControlPlane, FailedPrecondition, InvalidArgument, Missing
from kloop.pb import control_pb2 as pb
from kloop.pb import control_pb2_grpc as pb_grpc
from trainer.progress import read_events

WATCH_POLL_S = 0.5
M = TypeVar("M", bound=Message)


def to_message(view: Mapping[str, Any], cls: type[M]) -> M:
    return json_format.ParseDict(_drop_none(view), cls(), ignore_unknown_fields=False)


def _drop_none(v: Any) -> Any:
    """Nulls dropped (proto3 has no null scalar), at every level: inside a Struct too, so a
    null-valued key of ``params`` or ``metrics`` is absent over gRPC (present over HTTP)."""
    if isinstance(v, dict):
        return {k: _drop_none(x) for k, x in v.items() if x is not None}
    if isinstance(v, list):
        return [_drop_none(x) for x in v]
    return v


def struct_dict(s: Struct) -> dict[str, Any]:
    """A Struct as plain JSON, whole-number doubles read as the integers they spell."""
    return _ints(json_format.MessageToDict(s))  # type: ignore[no-any-return]


def _ints(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, dict):
        return {k: _ints(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_ints(x) for x in v]
    return v


class ControlServicer(pb_grpc.ControlServicer):
    def __init__(self, plane: ControlPlane, token: str, *, private_reads: bool = False):
        if not token:
            raise ValueError("the control plane needs a token for its write endpoints")
        self.plane = plane
        self.token = token
        self.private_reads = private_reads

    # ---- plumbing -------------------------------------------------------------------------

    async def _call(self, context: grpc.aio.ServicerContext[Any, Any], write: bool,
                    fn: Callable[[], Any]) -> Any:
        await self._authorize(context, write)
        try:
            return await asyncio.to_thread(fn)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except Missing as e:
            await context.abort(grpc.StatusCode.NOT_FOUND, str(e.args[0]) if e.args else "not found")
        except FailedPrecondition as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))

    async def _authorize(self, context: grpc.aio.ServicerContext[Any, Any], write: bool) -> None:
        if not write and not self.private_reads:
            return
        given = ""
        for key, value in context.invocation_metadata() or ():
            if key.lower() == "authorization":
                text = value.decode() if isinstance(value, bytes) else value
                scheme, _, given = text.partition(" ")
                if scheme.lower() != "bearer":
                    given = ""
        if not given or not hmac.compare_digest(given.strip().encode(), self.token.encode()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "this call needs the control plane's token (metadata "
                                "authorization: Bearer TOKEN; the token is in "
                                "<home>/control.token)")

    # ---- runs -----------------------------------------------------------------------------

    async def CreateRun(self, request: pb.CreateRunRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> pb.Run:
        spec = struct_dict(request.spec)
        policy = struct_dict(request.policy) if request.HasField("policy") else None
        run = await self._call(context, True, lambda: self.plane.create_run(
            spec, policy=policy, label=request.label, inject_fault=request.inject_fault,
            pythonpath=list(request.pythonpath)))
        return to_message(views.run_view(run), pb.Run)

    async def GetRun(self, request: pb.GetRunRequest,
                     context: grpc.aio.ServicerContext[Any, Any]) -> pb.Run:
        def get() -> dict[str, Any]:
            run = self.plane.get_run(request.id)
            return views.run_view(run, read_progress(run.run_dir))
        return to_message(await self._call(context, False, get), pb.Run)

    async def ListRuns(self, request: pb.ListRunsRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListRunsResponse:
        order = (request.order_by or "created desc").strip().lower()

        def page() -> dict[str, Any]:
            if order not in ("created desc", "created asc"):
                raise InvalidArgument(f"order_by {request.order_by!r}: 'created desc' or "
                                      "'created asc'")
            p = self.plane.list_runs(
                model=request.model or None, status=request.status or None,
                since=request.created_after or None, until=request.created_before or None,
                newest_first=order == "created desc", limit=request.page_size or 50,
                after=_token(request.page_token))
            return {"runs": [views.run_view(r, full=False) for r in p.runs],
                    "next_page_token": views.page_token(p.next)}
        return to_message(await self._call(context, False, page), pb.ListRunsResponse)

    async def WatchRun(self, request: pb.WatchRunRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[pb.RunEvent]:
        run = await self._call(context, False, lambda: self.plane.get_run(request.id))
        log_file = Path(run.run_dir) / "pipeline.log"
        prog_file = progress_path(run.run_dir)
        log_offset, prog_offset = request.log_offset, request.progress_offset
        last = ""
        while True:
            run = await asyncio.to_thread(self.plane.get_run, run.id)
            lines, log_offset = await asyncio.to_thread(new_lines, log_file, log_offset)
            for line, at in lines:
                yield pb.RunEvent(log=pb.LogLine(source="pipeline", line=line, offset=at))
            events, new = await asyncio.to_thread(read_events, prog_file, prog_offset)
            if events:
                prog_offset = new
                p = await asyncio.to_thread(read_progress, run.run_dir)
                if p is not None:
                    yield pb.RunEvent(progress=to_message(views.progress_view(p), pb.Progress))
            doc = json.dumps(views.run_view(run), sort_keys=True)
            key = views.change_key(doc)
            if key != last:
                last = key
                yield pb.RunEvent(run=to_message(json.loads(doc), pb.Run))
            if run.status != "running" or self.plane.closing:
                return
            await asyncio.sleep(WATCH_POLL_S)

    async def GetRunLogs(self, request: pb.GetRunLogsRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> pb.RunLogs:
        def logs() -> pb.RunLogs:
            source = request.source or "pipeline"
            if source not in LOG_SOURCES:
                raise InvalidArgument(f"source {source!r}: one of {', '.join(LOG_SOURCES)}")
            limit = request.limit_bytes or MAX_LOG_BYTES
            if request.offset < 0 or not 1 <= limit <= MAX_LOG_BYTES:
                raise InvalidArgument(f"offset must be >= 0 and limit_bytes in 1..{MAX_LOG_BYTES}")
            run = self.plane.get_run(request.id)
            text, end, size = read_log(Path(run.run_dir) / LOG_SOURCES[source], request.offset,
                                        limit)
            return pb.RunLogs(source=source, text=text, offset=end, size=size)
        result: pb.RunLogs = await self._call(context, False, logs)
        return result

    async def CancelRun(self, request: pb.RunRequest,
                        context: grpc.aio.ServicerContext[Any, Any]) -> pb.Run:
        run = await self._call(context, True, lambda: self.plane.cancel_run(request.id))
        return to_message(views.run_view(run), pb.Run)

    async def RetryRun(self, request: pb.RunRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> pb.Run:
        run = await self._call(context, True, lambda: self.plane.retry_run(request.id))
        return to_message(views.run_view(run), pb.Run)

    # ---- rollouts -------------------------------------------------------------------------

    async def CreateRollout(self, request: pb.CreateRolloutRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> pb.Rollout:
        policy = struct_dict(request.policy) if request.HasField("policy") else None
        r = await self._call(context, True, lambda: self.plane.create_rollout(
            request.model, request.candidate, policy))
        return to_message(views.rollout_view(r), pb.Rollout)

    async def ListRollouts(self, request: pb.ListRolloutsRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListRolloutsResponse:
        def page() -> dict[str, Any]:
            try:
                rollouts, nxt = self.plane.rollouts.page(
                    model=request.model or None, active_only=request.active_only,
                    limit=request.page_size or 50, after=_token(request.page_token))
            except ValueError as e:
                raise InvalidArgument(str(e)) from None
            return {"rollouts": [views.rollout_view(r, full=False) for r in rollouts],
                    "next_page_token": views.page_token(nxt)}
        return to_message(await self._call(context, False, page), pb.ListRolloutsResponse)

    async def GetRollout(self, request: pb.GetRolloutRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> pb.Rollout:
        r = await self._call(context, False, lambda: self.plane.get_rollout(request.id))
        return to_message(views.rollout_view(r), pb.Rollout)

    async def WatchRollout(self, request: pb.GetRolloutRequest,
                           context: grpc.aio.ServicerContext[Any, Any]
                           ) -> AsyncIterator[pb.RolloutEvent]:
        r = await self._call(context, False, lambda: self.plane.get_rollout(request.id))
        last = ""
        while True:
            r = await asyncio.to_thread(self.plane.get_rollout, r.id)
            doc = json.dumps(views.rollout_view(r), sort_keys=True)
            if doc != last:
                last = doc
                yield pb.RolloutEvent(rollout=to_message(json.loads(doc), pb.Rollout))
            if r.phase.terminal or self.plane.closing:
                return
            await asyncio.sleep(WATCH_POLL_S)

    async def GetRolloutSeries(self, request: pb.GetRolloutRequest,
                               context: grpc.aio.ServicerContext[Any, Any]) -> pb.RolloutSeries:
        points = await self._call(context, False, lambda: self.plane.rollout_series(request.id))
        return to_message({"points": points}, pb.RolloutSeries)

    async def _op(self, op: str, request: pb.RolloutActionRequest,
                  context: grpc.aio.ServicerContext[Any, Any]) -> pb.Rollout:
        r = await self._call(context, True, lambda: self.plane.rollout_op(
            request.id, op, reason=request.reason, resource_version=request.resource_version))
        return to_message(views.rollout_view(r), pb.Rollout)

    async def PromoteRollout(self, request: pb.RolloutActionRequest,
                             context: grpc.aio.ServicerContext[Any, Any]) -> pb.Rollout:
        return await self._op("promote", request, context)

    async def AbortRollout(self, request: pb.RolloutActionRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> pb.Rollout:
        return await self._op("abort", request, context)

    async def PauseRollout(self, request: pb.RolloutActionRequest,
                           context: grpc.aio.ServicerContext[Any, Any]) -> pb.Rollout:
        return await self._op("pause", request, context)

    async def ResumeRollout(self, request: pb.RolloutActionRequest,
                            context: grpc.aio.ServicerContext[Any, Any]) -> pb.Rollout:
        return await self._op("resume", request, context)

    async def UndoRollout(self, request: pb.UndoRolloutRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.Rollout:
        policy = struct_dict(request.policy) if request.HasField("policy") else None
        r = await self._call(context, True, lambda: self.plane.undo(request.model,
                                                                     request.to_version, policy))
        return to_message(views.rollout_view(r), pb.Rollout)

    # ---- models and experiments -----------------------------------------------------------

    async def ListModels(self, request: pb.ListModelsRequest,
                         context: grpc.aio.ServicerContext[Any, Any]) -> pb.ListModelsResponse:
        def models() -> dict[str, Any]:
            reg = self.plane.registry
            return {"models": [views.model_view(reg, m, self.plane.rollouts.list(model=m))
                               for m in reg.models()]}
        return to_message(await self._call(context, False, models), pb.ListModelsResponse)

    async def GetModel(self, request: pb.GetModelRequest,
                       context: grpc.aio.ServicerContext[Any, Any]) -> pb.Model:
        def model() -> dict[str, Any]:
            if request.name not in self.plane.registry.models():
                raise Missing(f"no model {request.name!r}")
            return views.model_view(self.plane.registry, request.name,
                                    self.plane.rollouts.list(model=request.name))
        return to_message(await self._call(context, False, model), pb.Model)

    async def CompareRuns(self, request: pb.CompareRunsRequest,
                          context: grpc.aio.ServicerContext[Any, Any]) -> pb.Comparison:
        def compare() -> dict[str, Any]:
            if len(request.ids) < 2:
                raise InvalidArgument("compare needs two or more run ids")
            return views.comparison([self.plane.get_run(i) for i in request.ids])
        return to_message(await self._call(context, False, compare), pb.Comparison)


def _token(text: str) -> tuple[float, str] | None:
    try:
        return views.parse_page_token(text)
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def add_to_server(server: grpc.aio.Server, plane: ControlPlane, token: str, *,
                  private_reads: bool = False) -> None:
    pb_grpc.add_ControlServicer_to_server(
        ControlServicer(plane, token, private_reads=private_reads), server)
