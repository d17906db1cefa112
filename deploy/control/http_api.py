"""The control plane over HTTP/JSON: ``/api/v1``, the service's ``/metrics`` and the web UI.

Every resource is the JSON form of its message in ``proto/control.proto`` (``views``); the
OpenAPI document (``/api/v1/openapi.json``, ``openapi``) describes the routes. Writes need the
service's bearer token (``Authorization: Bearer TOKEN``); reads need it too when the service
runs with ``--private-reads``. Errors are ``{"error": MESSAGE}`` with 400 (bad input: a wrong
JSON type is refused, never coerced), 401 (no or a wrong token), 404 (no such resource) or 409
(the resource's state refuses it, or it moved since the caller's ``resource_version``).

Watches are Server-Sent Events: ``event: run`` (the run, whenever its record changed),
``event: log`` (a line of the pipeline's log), ``event: progress`` (the training's live fields),
and ``event: end`` once the run ended and everything before it was sent; rollouts send
``event: rollout``. They read the store and the run's files, which outlive the processes, so a
watch works for runs of any age and across restarts of the service.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from aiohttp import web

from deploy.control import views
from deploy.control.logs import LOG_SOURCES, MAX_LOG_BYTES, new_lines, read_log
from deploy.control.metrics import metrics_text
from deploy.control.openapi import openapi
from deploy.control.progress import progress_path, read_progress
from deploy.control.service import ControlPlane, FailedPrecondition, InvalidArgument, Missing
from trainer.progress import read_events

API = "/api/v1"
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
WATCH_POLL_S = 0.5

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def make_app(plane: ControlPlane, token: str, *, private_reads: bool = False,
             ui: bool = True, allowed_hosts: frozenset[str] | None = LOOPBACK_NAMES
             ) -> web.Application:
    """``allowed_hosts``: the host names a request's ``Host`` may carry (None: any). On
    loopback that is the loopback names, so a web page that rebinds its own domain to
    127.0.0.1 (DNS rebinding) cannot read the open API through the user's browser."""
    api = _Api(plane, token, private_reads)
    app = web.Application(middlewares=[_same_host(allowed_hosts), api.errors],
                          client_max_size=1 << 20)
    r = app.router
    r.add_get(f"{API}/runs", api.read(api.list_runs))
    r.add_post(f"{API}/runs", api.write(api.create_run))
    r.add_get(f"{API}/runs/{{id}}", api.read(api.get_run))
    r.add_get(f"{API}/runs/{{id}}/logs", api.read(api.run_logs))
    r.add_get(f"{API}/runs/{{id}}/watch", api.read(api.watch_run))
    r.add_post(f"{API}/runs/{{id}}/cancel", api.write(api.cancel_run))
    r.add_post(f"{API}/runs/{{id}}/retry", api.write(api.retry_run))
    r.add_get(f"{API}/rollouts", api.read(api.list_rollouts))
    r.add_post(f"{API}/rollouts", api.write(api.create_rollout))
    r.add_get(f"{API}/rollouts/{{id}}", api.read(api.get_rollout))
    r.add_get(f"{API}/rollouts/{{id}}/watch", api.read(api.watch_rollout))
    r.add_get(f"{API}/rollouts/{{id}}/series", api.read(api.rollout_series))
    for op in ("promote", "abort", "pause", "resume"):
        r.add_post(f"{API}/rollouts/{{id}}/{op}", api.write(api.rollout_op(op)))
    r.add_get(f"{API}/models", api.read(api.list_models))
    r.add_get(f"{API}/models/{{name}}", api.read(api.get_model))
    r.add_post(f"{API}/models/{{name}}/undo", api.write(api.undo))
    r.add_get(f"{API}/compare", api.read(api.compare))
    r.add_get(f"{API}/openapi.json", api.read(api.openapi))
    r.add_get("/metrics", api.read(api.metrics))
    r.add_get("/healthz", api.healthz)
    if ui:
        from deploy.control.ui import add_ui

        add_ui(app, plane, api.read)
    return app


class _Api:
    def __init__(self, plane: ControlPlane, token: str, private_reads: bool):
        if not token:
            raise ValueError("the control plane needs a token for its write endpoints")
        self.plane = plane
        self.token = token
        self.private_reads = private_reads

    # ---- middleware and guards ----------------------------------------------------------

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except InvalidArgument as e:
            return _error(400, str(e))
        except Missing as e:
            return _error(404, str(e.args[0]) if e.args else "not found")
        except FailedPrecondition as e:
            return _error(409, str(e))
        except _Gone as e:  # a watch whose client left: the stream simply ends
            return e.resp

    def _authorized(self, request: web.Request) -> bool:
        # A header only, never a cookie: a page elsewhere cannot make the browser send it
        # (the web UI keeps the token in the page's storage and sends the header itself).
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return bool(given) and hmac.compare_digest(given.strip().encode(), self.token.encode())

    def write(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if not self._authorized(request):
                return _unauthorized("this endpoint changes state: it needs the control "
                                     "plane's token (Authorization: Bearer TOKEN; the token is "
                                     "in <home>/control.token)")
            return await handler(request)
        return guarded

    def read(self, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            if self.private_reads and not self._authorized(request):
                return _unauthorized("this control plane keeps its reads private: send its "
                                     "token (Authorization: Bearer TOKEN)")
            return await handler(request)
        return guarded

    # ---- runs -----------------------------------------------------------------------------

    async def list_runs(self, request: web.Request) -> web.Response:
        q = request.query
        _only(q, {"model", "status", "created_after", "created_before", "order_by", "page_size",
                  "page_token"})
        order = q.get("order_by", "created desc").strip().lower()
        if order not in ("created desc", "created asc", "-created", "created"):
            raise InvalidArgument(f"order_by {q['order_by']!r}: 'created desc' or 'created asc'")
        page = await asyncio.to_thread(
            self.plane.list_runs, model=q.get("model") or None, status=q.get("status") or None,
            since=_float_param(q, "created_after"), until=_float_param(q, "created_before"),
            newest_first=order in ("created desc", "-created"),
            limit=_int_param(q, "page_size", 50), after=_page_token(q))
        return _json({"runs": [views.run_view(r, full=False) for r in page.runs],
                      "next_page_token": views.page_token(page.next)})

    async def create_run(self, request: web.Request) -> web.Response:
        body = await _body(request, {"spec": (dict,), "policy": (dict, type(None)),
                                     "label": (str,), "inject_fault": (int, float),
                                     "pythonpath": (list,)}, required={"spec"})
        run = await asyncio.to_thread(
            self.plane.create_run, body["spec"], policy=body.get("policy"),
            label=body.get("label", ""), inject_fault=body.get("inject_fault", 0.0),
            pythonpath=body.get("pythonpath", []))
        return _json(views.run_view(run), status=201)

    async def get_run(self, request: web.Request) -> web.Response:
        run = await asyncio.to_thread(self.plane.get_run, request.match_info["id"])
        return _json(views.run_view(run, await asyncio.to_thread(read_progress, run.run_dir)))

    async def run_logs(self, request: web.Request) -> web.Response:
        q = request.query
        _only(q, {"source", "offset", "limit_bytes"})
        run = await asyncio.to_thread(self.plane.get_run, request.match_info["id"])
        source = q.get("source", "pipeline")
        if source not in LOG_SOURCES:
            raise InvalidArgument(f"source {source!r}: one of {', '.join(LOG_SOURCES)}")
        offset = _int_param(q, "offset", 0)
        limit = _int_param(q, "limit_bytes", MAX_LOG_BYTES)
        if offset < 0 or not 1 <= limit <= MAX_LOG_BYTES:
            raise InvalidArgument(f"offset must be >= 0 and limit_bytes in 1..{MAX_LOG_BYTES}")
        text, end, size = await asyncio.to_thread(
            read_log, Path(run.run_dir) / LOG_SOURCES[source], offset, limit)
        return _json({"source": source, "text": text, "offset": end, "size": size})

    async def cancel_run(self, request: web.Request) -> web.Response:
        run = await asyncio.to_thread(self.plane.cancel_run, request.match_info["id"])
        return _json(views.run_view(run), status=202)

    async def retry_run(self, request: web.Request) -> web.Response:
        run = await asyncio.to_thread(self.plane.retry_run, request.match_info["id"])
        return _json(views.run_view(run), status=202)

    async def watch_run(self, request: web.Request) -> web.StreamResponse:
        q = request.query
        _only(q, {"log_offset", "progress_offset"})
        run = await asyncio.to_thread(self.plane.get_run, request.match_info["id"])
        log_offset = _int_param(q, "log_offset", 0)
        progress_offset = _int_param(q, "progress_offset", 0)
        resp = await _sse(request)
        log_file = Path(run.run_dir) / LOG_SOURCES["pipeline"]
        prog_file = progress_path(run.run_dir)
        last_doc = ""
        while True:
            run = await asyncio.to_thread(self.plane.get_run, run.id)
            doc = json.dumps(views.run_view(run), sort_keys=True)
            key = views.change_key(doc)
            lines, log_offset = await asyncio.to_thread(new_lines, log_file, log_offset)
            for line, at in lines:
                await _event(resp, "log", {"source": "pipeline", "line": line, "offset": at})
            events, new_offset = await asyncio.to_thread(read_events, prog_file, progress_offset)
            if events:
                progress_offset = new_offset
                p = await asyncio.to_thread(read_progress, run.run_dir)
                if p is not None:
                    await _event(resp, "progress", {**views.progress_view(p),
                                                    "offset": progress_offset,
                                                    "events": views.json_safe(events[-20:])})
            if key != last_doc:
                last_doc = key
                await _event(resp, "run", json.loads(doc))
            if run.status != "running":
                await _event(resp, "end", {"status": run.status, "outcome": run.outcome})
                return resp
            if self.plane.closing:
                return resp
            await _heartbeat(resp)
            await asyncio.sleep(WATCH_POLL_S)

    # ---- rollouts -------------------------------------------------------------------------

    async def list_rollouts(self, request: web.Request) -> web.Response:
        q = request.query
        _only(q, {"model", "active_only", "page_size", "page_token"})
        active = q.get("active_only", "false").lower()
        if active not in ("true", "false", "1", "0"):
            raise InvalidArgument(f"active_only {q['active_only']!r}: true or false")

        def page() -> tuple[list[Any], Any]:
            try:
                return self.plane.rollouts.page(
                    model=q.get("model") or None, active_only=active in ("true", "1"),
                    limit=_int_param(q, "page_size", 50),
                    after=views.parse_page_token(q.get("page_token", "")))
            except ValueError as e:
                raise InvalidArgument(str(e)) from None

        rollouts, nxt = await asyncio.to_thread(page)
        return _json({"rollouts": [views.rollout_view(r, full=False) for r in rollouts],
                      "next_page_token": views.page_token(nxt)})

    async def create_rollout(self, request: web.Request) -> web.Response:
        body = await _body(request, {"model": (str,), "candidate": (str, int),
                                     "policy": (dict, type(None))}, required={"model", "candidate"})
        candidate = body["candidate"]
        r = await asyncio.to_thread(self.plane.create_rollout, body["model"], str(candidate),
                                    body.get("policy"))
        return _json(views.rollout_view(r), status=201)

    async def get_rollout(self, request: web.Request) -> web.Response:
        r = await asyncio.to_thread(self.plane.get_rollout, request.match_info["id"])
        return _json(views.rollout_view(r))

    def rollout_op(self, op: str) -> Handler:
        async def handler(request: web.Request) -> web.Response:
            body = await _body(request, {"resource_version": (str,), "reason": (str,)},
                               required=set(), empty_ok=True)
            r = await asyncio.to_thread(self.plane.rollout_op, request.match_info["id"], op,
                                        reason=body.get("reason", ""),
                                        resource_version=body.get("resource_version", ""))
            return _json(views.rollout_view(r))
        return handler

    async def rollout_series(self, request: web.Request) -> web.Response:
        points = await asyncio.to_thread(self.plane.rollout_series, request.match_info["id"])
        return _json({"points": points})

    async def watch_rollout(self, request: web.Request) -> web.StreamResponse:
        r = await asyncio.to_thread(self.plane.get_rollout, request.match_info["id"])
        resp = await _sse(request)
        last = ""
        while True:
            r = await asyncio.to_thread(self.plane.get_rollout, r.id)
            doc = json.dumps(views.rollout_view(r), sort_keys=True)
            if doc != last:
                last = doc
                await _event(resp, "rollout", json.loads(doc))
            if r.phase.terminal:
                await _event(resp, "end", {"phase": r.phase.value, "reason": r.reason})
                return resp
            if self.plane.closing:
                return resp
            await _heartbeat(resp)
            await asyncio.sleep(WATCH_POLL_S)

    async def undo(self, request: web.Request) -> web.Response:
        body = await _body(request, {"to_version": (int,), "policy": (dict, type(None))},
                           required={"to_version"})
        r = await asyncio.to_thread(self.plane.undo, request.match_info["name"],
                                    body["to_version"], body.get("policy"))
        return _json(views.rollout_view(r), status=201)

    # ---- models, experiments, the rest ----------------------------------------------------

    async def list_models(self, request: web.Request) -> web.Response:
        def models() -> list[dict[str, Any]]:
            return [views.model_view(self.plane.registry, m, self.plane.rollouts.list(model=m))
                    for m in self.plane.registry.models()]
        return _json({"models": await asyncio.to_thread(models)})

    async def get_model(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]

        def model() -> dict[str, Any]:
            if name not in self.plane.registry.models():
                raise Missing(f"no model {name!r}")
            return views.model_view(self.plane.registry, name, self.plane.rollouts.list(model=name))
        return _json(await asyncio.to_thread(model))

    async def compare(self, request: web.Request) -> web.Response:
        _only(request.query, {"ids"})
        ids = [i for i in request.query.get("ids", "").split(",") if i]
        if len(ids) < 2:
            raise InvalidArgument("compare needs two or more run ids: ?ids=A,B")
        runs = [await asyncio.to_thread(self.plane.get_run, i) for i in ids]
        return _json(await asyncio.to_thread(views.comparison, runs))

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi())

    async def metrics(self, request: web.Request) -> web.Response:
        text = await asyncio.to_thread(metrics_text, self.plane)
        return web.Response(body=text, headers={
            "Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def healthz(self, request: web.Request) -> web.Response:
        return _json({"ok": True, "model_server": self.plane.server_seen,
                      "live_runs": self.plane.live_runs()})


# ---- helpers ---------------------------------------------------------------------------------


def _same_host(allowed: frozenset[str] | None) -> Any:
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if allowed is not None and _host_name(request.host or "") not in allowed:
            return _error(421, f"this control plane answers to {', '.join(sorted(allowed))}, "
                               f"not {request.host!r}")
        return await handler(request)
    return check


def _host_name(host: str) -> str:
    """The name in a Host header, without its port (``[::1]:8700`` -> ``[::1]``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.partition(":")[0] if host.count(":") == 1 else host


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(doc, allow_nan=False), status=status,
                        content_type="application/json")


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message, "code": status}, status=status)


def _unauthorized(message: str) -> web.Response:
    resp = _error(401, message)
    resp.headers["WWW-Authenticate"] = 'Bearer realm="kloop"'
    return resp


async def _body(request: web.Request, fields: Mapping[str, tuple[type, ...]], *,
                required: set[str], empty_ok: bool = False) -> dict[str, Any]:
    """The JSON object body, each field of one of its allowed types (bool is no number)."""
    raw = await request.read()
    if not raw.strip():
        if empty_ok:
            return {}
        raise InvalidArgument("the body must be a JSON object")
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidArgument(f"the body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise InvalidArgument(f"the body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise InvalidArgument(f"unknown fields {unknown}; this endpoint takes {sorted(fields)}")
    missing = sorted(required - set(body))
    if missing:
        raise InvalidArgument(f"missing required fields {missing}")
    for name, value in body.items():
        allowed = fields[name]
        ok = isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        if not ok:
            want = " or ".join(_type_name(t) for t in allowed)
            raise InvalidArgument(f"{name} must be {want}, got {_type_name(type(value))} "
                                  f"{json.dumps(value)[:80]}")
    return body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _type_name(t: type) -> str:
    return {dict: "an object", list: "a list", str: "a string", int: "an integer",
            float: "a number", bool: "a boolean", type(None): "null"}.get(t, t.__name__)


def _only(q: Mapping[str, str], allowed: set[str]) -> None:
    unknown = sorted(set(q) - allowed)
    if unknown:
        raise InvalidArgument(f"unknown query parameters {unknown}; allowed: {sorted(allowed)}")


def _page_token(q: Mapping[str, str]) -> tuple[float, str] | None:
    try:
        return views.parse_page_token(q.get("page_token", ""))
    except ValueError as e:
        raise InvalidArgument(str(e)) from None


def _int_param(q: Mapping[str, str], name: str, default: int) -> int:
    text = q.get(name)
    if text is None or text == "":
        return default
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument(f"{name} must be an integer, got {text!r}") from None


def _float_param(q: Mapping[str, str], name: str) -> float | None:
    text = q.get(name)
    if text is None or text == "":
        return None
    try:
        value = float(text)
    except ValueError:
        raise InvalidArgument(f"{name} must be a number (unix seconds), got {text!r}") from None
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {text!r}")
    return value


async def _sse(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    return resp


HEARTBEAT_S = 15.0
_LAST_WRITE = web.ResponseKey("kloop_last_write", float)


async def _heartbeat(resp: web.StreamResponse) -> None:
    """A comment line when nothing was sent for ``HEARTBEAT_S``: a client that left is noticed
    (the write fails) even while nothing changes."""
    loop = asyncio.get_running_loop()
    if loop.time() - resp.get(_LAST_WRITE, 0.0) >= HEARTBEAT_S:
        try:
            await resp.write(b": keep-alive\n\n")
        except ConnectionResetError:
            raise _Gone(resp) from None
        resp[_LAST_WRITE] = loop.time()


async def _event(resp: web.StreamResponse, kind: str, data: Any) -> None:
    """One event; a client that left ends the watch quietly (``_Gone``, caught by the
    middleware)."""
    try:
        await resp.write(f"event: {kind}\ndata: {json.dumps(data, allow_nan=False)}\n\n".encode())
    except ConnectionResetError:
        raise _Gone(resp) from None
    resp[_LAST_WRITE] = asyncio.get_running_loop().time()


class _Gone(Exception):
    """The watching client disconnected."""

    def __init__(self, resp: web.StreamResponse):
        super().__init__("the client left")
        self.resp = resp
