"""Management routes: load and unload versions, set traffic weights, inject faults
(``serving.core.management``); and the OIP/Triton model repository extension
(``/v2/repository/...``).

This is the surface the rollout controller drives, so it is guarded by a bearer token
(compared in constant time). A server started without a token refuses every management call
with 403: an open management port on a shared machine would let anyone reroute traffic.

The repository extension's ``load`` and ``unload`` change what is served, so they take the
same token (``Authorization: Bearer <token>``; tritonclient passes it through ``headers=``).
``POST /v2/repository/index`` only reads and is open, like model metadata. Semantics in
``serving.core.model_index``.

``GET /admin/models`` answers ``{"models": {...}, "rejected": {model: {version: reason}}}``:
what is served, and the versions whose load was refused (``Management.rejected``). A refused
load (404, 422) is also logged as a WARNING, so the server's log says what a caller was told.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from aiohttp import web

from kloop.faults import Fault
from serving.core import model_index
from serving.core.errors import (
    ArtifactRejected,
    Conflict,
    InvalidInput,
    ModelNotFound,
    Unauthorized,
)
from serving.core.management import Management
from serving.http import codec
from serving.http.routes import Handler, error_response, json_response, parse_version

log = logging.getLogger(__name__)
MANAGEMENT_KEY = web.AppKey("management", Management)
TOKEN_KEY = web.AppKey("admin_token", str)
GROUP_SIZE_KEY = web.AppKey("group_size", int)  # worker processes sharing the ports
NO_TOKEN = ""
PREFIX = "/admin/"
# Repository extension routes that change what is served (index is read-only and open).
REPOSITORY_PREFIX = "/v2/repository/models/"
PROTECTED = (PREFIX, REPOSITORY_PREFIX)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(PROTECTED):
        return await handler(request)
    token = request.app[TOKEN_KEY]
    if token == NO_TOKEN:
        return error_response(403, "management disabled: start the server with an admin token")
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("missing or wrong bearer token")
    workers = request.app.get(GROUP_SIZE_KEY, 1)
    if workers > 1 and request.method != "GET":
        raise Conflict(
            f"this server runs {workers} worker processes, each with its own copy of the "
            "loaded versions and weights: a change would reach one of them. Serve with "
            "--workers 1 where versions or weights change at runtime (local rollouts)")
    return await handler(request)


def _model_version(request: web.Request) -> tuple[str, int]:
    return request.match_info["model"], parse_version(request.match_info["version"])


async def _body(request: web.Request) -> dict[str, Any]:
    return codec.loads_object(await request.read())


async def list_models(request: web.Request) -> web.Response:
    management = request.app[MANAGEMENT_KEY]
    rejected = {m: {str(v): why for v, why in vs.items()}
                for m, vs in management.rejected().items()}
    return json_response({"models": management.status(), "rejected": rejected})


async def load(request: web.Request) -> web.Response:
    model, version = _model_version(request)
    try:
        await request.app[MANAGEMENT_KEY].load(model, version)
    except (ArtifactRejected, ModelNotFound) as e:
        _log_refusal(model, version, e)
        raise
    return json_response({"loaded": True, "model": model, "version": str(version)})


def _log_refusal(model: str, version: object, error: Exception) -> None:
    log.warning("refused to load %s version %s: %s", model, version, error)


async def unload(request: web.Request) -> web.Response:
    model, version = _model_version(request)
    request.app[MANAGEMENT_KEY].unload(model, version)
    return json_response({"unloaded": True, "model": model, "version": str(version)})


async def get_traffic(request: web.Request) -> web.Response:
    weights = request.app[MANAGEMENT_KEY].weights(request.match_info["model"])
    return json_response({"weights": {str(v): w for v, w in weights.items()}})


async def set_traffic(request: web.Request) -> web.Response:
    body = await _body(request)
    weights = body.get("weights")
    if not isinstance(weights, dict):
        raise InvalidInput('body must be {"weights": {"<version>": <percent>, ...}}')
    result = request.app[MANAGEMENT_KEY].set_weights(request.match_info["model"], weights)
    return json_response({"weights": {str(v): w for v, w in result.items()}})


async def set_fault(request: web.Request) -> web.Response:
    model, version = _model_version(request)
    body = await _body(request)
    try:
        fault = Fault.from_dict(body)
    except (ValueError, TypeError) as e:  # out of range, not a number, an unknown field
        raise InvalidInput(str(e)) from e
    request.app[MANAGEMENT_KEY].set_fault(model, version, fault)
    return json_response(fault.to_dict())


async def clear_fault(request: web.Request) -> web.Response:
    model, version = _model_version(request)
    request.app[MANAGEMENT_KEY].clear_fault(model, version)
    return json_response({"cleared": True})


# ---- the model repository extension ---------------------------------------------------------


async def _optional_body(request: web.Request) -> dict[str, Any]:
    raw = await request.read()
    return codec.loads_object(raw) if raw.strip() else {}


def _parameters(body: dict[str, Any]) -> dict[str, Any]:
    params = body.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput("'parameters' must be an object")
    return params


async def repository_index(request: web.Request) -> web.Response:
    ready_only = (await _optional_body(request)).get("ready", False)
    if not isinstance(ready_only, bool):
        raise InvalidInput("'ready' must be a boolean")
    entries = model_index.index(request.app[MANAGEMENT_KEY], ready_only=ready_only)
    return json_response([
        {"name": e.name, "version": e.version, "state": e.state}
        | ({"reason": e.reason} if e.reason else {})
        for e in entries
    ])


async def repository_load(request: web.Request) -> web.Response:
    params = _parameters(await _optional_body(request))
    unsupported = sorted(k for k in params if k == "config" or k.startswith("file:"))
    if unsupported:
        raise InvalidInput(
            f"parameter(s) {unsupported} are not supported: kloop loads published, verified "
            "versions from its registry (choose one with parameters.version)"
        )
    model = request.match_info["model"]
    try:
        versions = await model_index.load(request.app[MANAGEMENT_KEY], model,
                                          params.get("version"))
    except (ArtifactRejected, ModelNotFound) as e:
        _log_refusal(model, params.get("version", "(default)"), e)
        raise
    return json_response({"model": model, "versions": [str(v) for v in versions]})


async def repository_unload(request: web.Request) -> web.Response:
    _parameters(await _optional_body(request))  # unload_dependents: kloop models have none
    model = request.match_info["model"]
    versions = model_index.unload(request.app[MANAGEMENT_KEY], model)
    return json_response({"model": model, "unloaded": [str(v) for v in versions]})


def add_routes(app: web.Application) -> None:
    v = "/admin/models/{model}/versions/{version}"
    app.router.add_get("/admin/models", list_models)
    app.router.add_post(f"{v}/load", load)
    app.router.add_post(f"{v}/unload", unload)
    app.router.add_get("/admin/models/{model}/traffic", get_traffic)
    app.router.add_put("/admin/models/{model}/traffic", set_traffic)
    app.router.add_put(f"{v}/faults", set_fault)
    app.router.add_delete(f"{v}/faults", clear_fault)
    app.router.add_post("/v2/repository/index", repository_index)
    app.router.add_post(REPOSITORY_PREFIX + "{model}/load", repository_load)
    app.router.add_post(REPOSITORY_PREFIX + "{model}/unload", repository_unload)
