"""The HTTP adapter: OIP v2 REST routes and ``/metrics`` on aiohttp.

Handlers parse the path and body (``serving.http.codec``: JSON, or Triton's binary tensor
format when ``Inference-Header-Content-Length`` is set), call the dataplane and answer in the
format the client asked for;
one middleware maps every ``ServingError`` (and aiohttp's own 4xx/5xx) to the status from
``serving.errormap`` with the body ``{"error": "<message>"}``. Health endpoints answer 200 for
true and 503 for false: the spec asks for "not 200" and 503 is what balancers expect.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from aiohttp import web

from serving.core.dataplane import DataPlane, deadline_from_ms
from serving.core.errors import InvalidInput, ServingError
from serving.core.types import WireProtocol
from serving.errormap import http_status
from serving.http import codec
from serving.metrics import CONTENT_TYPE, ServerMetrics

log = logging.getLogger(__name__)
PROTOCOL: Final[WireProtocol] = "http"
DATAPLANE_KEY = web.AppKey("dataplane", DataPlane)
METRICS_KEY = web.AppKey("metrics", ServerMetrics)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.Response(body=codec.dumps(body), status=status, content_type="application/json")


def error_response(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status=status)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ServingError as e:
        return error_response(http_status(e), e.message)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        return error_response(e.status, e.reason)
    except Exception:  # a bug: log it, keep the JSON contract, do not leak internals
        log.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal server error")


def _dp(request: web.Request) -> DataPlane:
    return request.app[DATAPLANE_KEY]


def _version(request: web.Request) -> str | None:
    return request.match_info.get("version")


async def live(request: web.Request) -> web.Response:
    ok = _dp(request).live()
    return json_response({"live": ok}, status=200 if ok else 503)


async def ready(request: web.Request) -> web.Response:
    ok = _dp(request).ready()
    return json_response({"ready": ok}, status=200 if ok else 503)


async def server_metadata(request: web.Request) -> web.Response:
    return json_response(codec.server_metadata_to_json(_dp(request).server_metadata()))


async def model_metadata(request: web.Request) -> web.Response:
    meta = _dp(request).model_metadata(request.match_info["model"], _version(request))
    return json_response(codec.model_metadata_to_json(meta))


async def model_ready(request: web.Request) -> web.Response:
    model = request.match_info["model"]
    ok = _dp(request).model_ready(model, _version(request))
    return json_response({"name": model, "ready": ok}, status=200 if ok else 503)


async def infer(request: web.Request) -> web.Response:
    body = await request.read()
    header_length = codec.parse_header_length(
        request.headers.get(codec.HEADER_LENGTH), len(body)
    )
    core_request, fmt = codec.decode_infer_request(
        body, header_length, request.match_info["model"], _version(request)
    )
    deadline = deadline_from_ms(request.headers.get("X-Request-Timeout-Ms"))
    response = await _dp(request).infer(core_request, PROTOCOL, deadline=deadline)
    payload, json_length = codec.encode_infer_response(response, fmt)
    if json_length is None:
        return web.Response(body=payload, content_type="application/json")
    return web.Response(
        body=payload,
        content_type=codec.BINARY_CONTENT_TYPE,
        headers={codec.HEADER_LENGTH: str(json_length)},
    )


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS_KEY].exposition()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


def parse_version(text: str) -> int:
    """A version path segment as an int; ``InvalidInput`` when it is not a number."""
    if not (text.isascii() and text.isdigit()):
        raise InvalidInput(f"version {text!r} is not a number")
    return int(text)


def add_routes(app: web.Application) -> None:
    m, v = "/v2/models/{model}", "/v2/models/{model}/versions/{version}"
    app.router.add_get("/v2/health/live", live)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2", server_metadata)
    app.router.add_get(m, model_metadata)
    app.router.add_get(v, model_metadata)
    app.router.add_get(f"{m}/ready", model_ready)
    app.router.add_get(f"{v}/ready", model_ready)
    app.router.add_post(f"{m}/infer", infer)
    app.router.add_post(f"{v}/infer", infer)
    app.router.add_get("/metrics", metrics)
