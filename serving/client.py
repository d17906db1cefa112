"""Clients of the kloop server, for the rollout controller, the traffic generator and tests.

* ``GrpcClient`` and ``HttpClient``: async OIP v2 clients with the same methods, so callers
  can switch protocol without changing code. Failures raise ``InferenceError`` whose ``code``
  is the gRPC status name (``"NOT_FOUND"``) or the HTTP status as a string (``"404"``).
* ``AdminClient``: synchronous (the rollout controller's ``tick`` is plain code) client of the
  token-protected management API; failures raise ``AdminError(status, message)``.

Exceptions::

    ClientError
    ├── InferenceError(code, message)
    └── AdminError(status, message)
"""

from __future__ import annotations

import dataclasses
import json
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

import aiohttp
import grpc
import numpy as np

from kloop.faults import Fault
from kloop.model_version import Version, parse_version
from kloop.pb import inference_pb2 as pb
from kloop.pb import inference_pb2_grpc as pb_grpc
from serving.grpc import converters
from serving.http import codec

# The bearer token must never travel through an http(s)_proxy from the environment.
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ClientError(Exception):
    """Root of the clients' errors."""


class InferenceError(ClientError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AdminError(ClientError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message


@dataclasses.dataclass(frozen=True)
class InferResult:
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray[Any, Any]]
    id: str = ""


# The generated stub is unannotated (kloop.pb): its constructor typed once here.
_stub_for: Callable[[grpc.aio.Channel], pb_grpc.GRPCInferenceServiceStub] = (
    pb_grpc.GRPCInferenceServiceStub)


class GrpcClient:
    """Async OIP v2 client over one ``grpc.aio`` channel (``target``: ``"host:port"``)."""

    def __init__(self, target: str, timeout: float = 30.0) -> None:
        self._channel = grpc.aio.insecure_channel(target)
        self._stub = _stub_for(self._channel)
        self._timeout = timeout

    async def _call(self, method: Any, request: Any) -> Any:
        try:
            return await method(request, timeout=self._timeout)
        except grpc.aio.AioRpcError as e:
            raise InferenceError(e.code().name, e.details() or "") from e

    async def live(self) -> bool:
        return bool((await self._call(self._stub.ServerLive, pb.ServerLiveRequest())).live)

    async def ready(self) -> bool:
        return bool((await self._call(self._stub.ServerReady, pb.ServerReadyRequest())).ready)

    async def model_ready(self, model: str, version: str | None = None) -> bool:
        req = pb.ModelReadyRequest(name=model, version=version or "")
        return bool((await self._call(self._stub.ModelReady, req)).ready)

    async def server_metadata(self) -> dict[str, Any]:
        r = await self._call(self._stub.ServerMetadata, pb.ServerMetadataRequest())
        return {"name": r.name, "version": r.version, "extensions": list(r.extensions)}

    async def model_metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        req = pb.ModelMetadataRequest(name=model, version=version or "")
        r = await self._call(self._stub.ModelMetadata, req)

        def tensors(ts: Any) -> list[dict[str, Any]]:
            return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

        return {"name": r.name, "versions": list(r.versions), "platform": r.platform,
                "inputs": tensors(r.inputs), "outputs": tensors(r.outputs)}

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray[Any, Any]],
        version: str | None = None,
        raw: bool = True,
        outputs: tuple[str, ...] = (),
    ) -> InferResult:
        req = converters.infer_request_to_proto(model, inputs, version, raw=raw, outputs=outputs)
        r = await self._call(self._stub.ModelInfer, req)
        return InferResult(r.model_name, r.model_version, converters.outputs_from_proto(r), r.id)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class HttpClient:
    """Async OIP v2 REST client (JSON bodies). The session opens on first use, on the loop
    that uses it."""

    def __init__(self, base_url: str, timeout: float = 30.0) -> None:
        self._base = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = codec.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if data is not None else {}
        try:
            async with self._http().request(
                method, self._base + path, data=data, headers=headers
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except aiohttp.ClientError as e:
            raise InferenceError("UNAVAILABLE", f"{method} {path}: {e}") from e
        try:
            parsed = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        return status, parsed

    async def _get_ok(self, path: str) -> Any:
        status, body = await self._request("GET", path)
        if status != 200:
            raise InferenceError(str(status), _error_text(body, status))
        return body

    async def _flag(self, path: str) -> bool:
        status, _ = await self._request("GET", path)
        return status == 200

    async def live(self) -> bool:
        return await self._flag("/v2/health/live")

    async def ready(self) -> bool:
        return await self._flag("/v2/health/ready")

    async def model_ready(self, model: str, version: str | None = None) -> bool:
        return await self._flag(_model_path(model, version) + "/ready")

    async def server_metadata(self) -> dict[str, Any]:
        return dict(await self._get_ok("/v2"))

    async def model_metadata(self, model: str, version: str | None = None) -> dict[str, Any]:
        return dict(await self._get_ok(_model_path(model, version)))

    async def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray[Any, Any]],
        version: str | None = None,
        raw: bool = True,  # accepted for symmetry with GrpcClient; REST sends JSON
        outputs: tuple[str, ...] = (),
    ) -> InferResult:
        body = codec.infer_request_to_json(inputs, outputs)
        status, resp = await self._request("POST", _model_path(model, version) + "/infer", body)
        if status != 200:
            raise InferenceError(str(status), _error_text(resp, status))
        return InferResult(
            resp["model_name"], str(resp["model_version"]), codec.outputs_from_json(resp),
            resp.get("id", ""),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class AdminClient:
    """Synchronous client of the management API (``Authorization: Bearer <token>``)."""

    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self._base = base_url.rstrip("/")
        self._token = token
        self._timeout = timeout

    def _request(self, method: str, path: str, body: Any = None, auth: bool = True) -> bytes:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self._base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if auth:
            req.add_header("Authorization", f"Bearer {self._token}")
        try:
            with _NO_PROXY.open(req, timeout=self._timeout) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as e:
            try:
                parsed = json.loads(e.read() or b"null")
            except ValueError:
                parsed = None
            raise AdminError(e.code, _error_text(parsed, e.code)) from e
        except (urllib.error.URLError, OSError) as e:
            raise AdminError(0, f"{method} {path}: {e}") from e

    def _json(self, method: str, path: str, body: Any = None) -> Any:
        return json.loads(self._request(method, path, body))

    def models(self) -> dict[str, Any]:
        return dict(self._json("GET", "/admin/models")["models"])

    def rejected(self) -> dict[str, dict[Version, str]]:
        """Versions the server refused to load (failed verification, a model file that does
        not load) and has not loaded since, with the reason, per model."""
        body = self._json("GET", "/admin/models").get("rejected", {})
        return {m: {parse_version(v): str(why) for v, why in vs.items()}
                for m, vs in body.items()}

    def load(self, model: str, version: Version) -> None:
        self._json("POST", f"/admin/models/{model}/versions/{version}/load")

    def unload(self, model: str, version: Version) -> None:
        self._json("POST", f"/admin/models/{model}/versions/{version}/unload")

    def traffic(self, model: str) -> dict[Version, int]:
        return _weights_in(self._json("GET", f"/admin/models/{model}/traffic")["weights"])

    def set_traffic(self, model: str, weights: Mapping[Version, int]) -> dict[Version, int]:
        body = {"weights": {str(v): w for v, w in weights.items()}}  # the server checks them
        return _weights_in(self._json("PUT", f"/admin/models/{model}/traffic", body)["weights"])

    def set_fault(self, model: str, version: Version, fault: Fault) -> None:
        self._json("PUT", f"/admin/models/{model}/versions/{version}/faults", fault.to_dict())

    def clear_fault(self, model: str, version: Version) -> None:
        self._json("DELETE", f"/admin/models/{model}/versions/{version}/faults")

    def metrics_text(self) -> str:
        return self._request("GET", "/metrics", auth=False).decode()


def _weights_in(weights: Mapping[str, Any]) -> dict[Version, int]:
    """Weights as the wire spells them (versions as text keys) -> by version number."""
    return {parse_version(v): int(w) for v, w in weights.items()}


def _model_path(model: str, version: str | None) -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "")


def _error_text(body: Any, status: int) -> str:
    if isinstance(body, dict) and "error" in body:
        return str(body["error"])
    return f"HTTP {status}"
