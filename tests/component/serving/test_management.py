"""Management API against a real server: auth, load/unload with hash checks, traffic weights
and pinning, fault injection, and the metrics a rollout controller reads.

``AdminClient`` is synchronous (urllib); on the test's loop it runs in a thread so the server,
which shares that loop, can answer."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kloop.faults import Fault
from serving.app import Server, ServerConfig
from serving.client import AdminClient, AdminError, GrpcClient, HttpClient, InferenceError
from tests.support.serving import MODEL, TOKEN

T = TypeVar("T")
X = {"image": np.zeros((1, 1, 8, 8), np.float32)}


async def call(fn: Callable[..., T], *args: Any, **kw: Any) -> T:
    return await asyncio.to_thread(fn, *args, **kw)


def put(http_url: str, path: str, body: object) -> tuple[int, dict[str, Any]]:
    """A management call as raw JSON (what another client might send): status and answer."""
    req = urllib.request.Request(http_url + path, data=json.dumps(body).encode(), method="PUT",
                                 headers={"Authorization": f"Bearer {TOKEN}",
                                          "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


async def test_auth(http_url: str, admin: AdminClient) -> None:
    for token in ("", "wrong"):
        with pytest.raises(AdminError) as e:
            await call(AdminClient(http_url, token).models)
        assert e.value.status == 401
    assert await call(admin.models) == {MODEL: {"versions": ["2"], "weights": {"2": 100}}}


async def test_management_disabled_without_a_token(registry_root: Path) -> None:
    srv = Server(ServerConfig(registry=registry_root, http_port=0, grpc_port=0))
    await srv.start()
    try:
        with pytest.raises(AdminError) as e:
            await call(AdminClient(f"http://127.0.0.1:{srv.http_port}", "x").models)
        assert e.value.status == 403 and "management disabled" in e.value.message
    finally:
        await srv.stop()


async def test_weights_route_unpinned_traffic_and_pins_win(
    admin: AdminClient, grpc_client: GrpcClient, http_client: HttpClient
) -> None:
    await call(admin.load, MODEL, 1)
    assert await call(admin.traffic, MODEL) == {1: 0, 2: 100}
    for client in (grpc_client, http_client):
        assert {(await client.infer(MODEL, X)).model_version for _ in range(10)} == {"2"}
    assert await call(admin.set_traffic, MODEL, {1: 100, 2: 0}) == {1: 100, 2: 0}
    for client in (grpc_client, http_client):
        assert {(await client.infer(MODEL, X)).model_version for _ in range(10)} == {"1"}
        assert (await client.infer(MODEL, X, version="2")).model_version == "2"
    assert await call(admin.models) == {
        MODEL: {"versions": ["1", "2"], "weights": {"1": 100, "2": 0}}
    }


@pytest.mark.parametrize(
    ("weights", "needle"),
    [
        ({"1": 50, "2": 40}, "sum to 100, got 90"),
        ({"1": 100, "3": 0}, "version '3'"),
        ({"1": 110, "2": -10}, "non-negative integer"),
        ({"1": 50.5, "2": 49.5}, "non-negative integer"),
    ],
)
async def test_set_weights_validation(
    admin: AdminClient, http_url: str, weights: dict[str, object], needle: str
) -> None:
    await call(admin.load, MODEL, 1)
    status, answer = await call(put, http_url, f"/admin/models/{MODEL}/traffic",
                                {"weights": weights})
    assert status == 400 and needle in answer["error"]
    assert await call(admin.traffic, MODEL) == {1: 0, 2: 100}


async def test_unload_refuses_a_version_with_traffic(
    admin: AdminClient, grpc_client: GrpcClient
) -> None:
    await call(admin.load, MODEL, 1)
    with pytest.raises(AdminError) as e:
        await call(admin.unload, MODEL, 2)
    assert e.value.status == 409 and "carries 100%" in e.value.message
    await call(admin.unload, MODEL, 1)
    assert await call(admin.traffic, MODEL) == {2: 100}
    with pytest.raises(InferenceError) as ie:
        await grpc_client.infer(MODEL, X, version="1")
    assert ie.value.code == "NOT_FOUND"


async def test_load_verifies_hashes(
    registry_root: Path, admin: AdminClient, http_client: HttpClient
) -> None:
    model_file = registry_root / MODEL / "1" / "model.pt2"
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(AdminError) as e:
        await call(admin.load, MODEL, 1)
    assert e.value.status == 422 and "sha256 of model.pt2" in e.value.message
    with pytest.raises(AdminError) as e:
        await call(admin.load, MODEL, 9)
    assert e.value.status == 404
    assert (await http_client.infer(MODEL, X)).model_version == "2"
    assert await call(admin.models) == {MODEL: {"versions": ["2"], "weights": {"2": 100}}}


async def test_fault_injection_fails_the_faulty_version_and_is_counted(
    admin: AdminClient, grpc_client: GrpcClient, http_client: HttpClient, http_url: str
) -> None:
    await call(admin.load, MODEL, 1)
    await call(admin.set_traffic, MODEL, {1: 100, 2: 0})
    await call(admin.set_fault, MODEL, 1, Fault(error_rate=1.0))
    for client, code in ((grpc_client, "INTERNAL"), (http_client, "500")):
        for _ in range(5):
            with pytest.raises(InferenceError) as e:
                await client.infer(MODEL, X)
            assert (e.value.code, e.value.message) == (code, "injected fault")
        assert (await client.infer(MODEL, X, version="2")).model_version == "2"
    errors = samples(await call(admin.metrics_text), "kloop_inference_errors_total")
    assert errors == {
        (("code", "500"), ("model", MODEL), ("protocol", p), ("version", "1")): 5.0
        for p in ("grpc", "http")
    }
    await call(admin.clear_fault, MODEL, 1)
    assert (await grpc_client.infer(MODEL, X)).model_version == "1"
    path = f"/admin/models/{MODEL}/versions/1/faults"
    for bad, says in (({"error_rate": 1.5}, "error_rate must be in [0, 1]"),
                      ({"error_rate": "0.5"}, "error_rate must be a number"),
                      ({"error_rate": True}, "error_rate must be a number"),
                      ({"extra_latency_ms": 1e9}, "extra_latency_ms must be in"),
                      ({"error_rate": 0.1, "eror": 1}, "unknown fault field(s) ['eror']")):
        status, answer = await call(put, http_url, path, bad)
        assert (status, says in answer["error"]) == (400, True), answer
    assert (await grpc_client.infer(MODEL, X)).model_version == "1"  # nothing was set


async def test_metrics_count_requests_errors_and_gauges(
    admin: AdminClient, grpc_client: GrpcClient, http_client: HttpClient
) -> None:
    for _ in range(3):
        await grpc_client.infer(MODEL, X)
    for _ in range(2):
        await http_client.infer(MODEL, X)
    with pytest.raises(InferenceError):
        await http_client.infer(MODEL, {"image": np.zeros((1, 1, 8, 7), np.float32)})
    with pytest.raises(InferenceError):
        await http_client.infer("nope", X)  # never routed: not counted
    text = await call(admin.metrics_text)
    requests = samples(text, "kloop_inference_requests_total")
    assert requests == {
        (("model", MODEL), ("protocol", "grpc"), ("version", "2")): 3.0,
        (("model", MODEL), ("protocol", "http"), ("version", "2")): 3.0,
    }
    assert samples(text, "kloop_inference_errors_total") == {
        (("code", "400"), ("model", MODEL), ("protocol", "http"), ("version", "2")): 1.0,
    }
    counts = samples(text, "kloop_inference_request_duration_seconds_count")
    assert counts[(("model", MODEL), ("protocol", "grpc"), ("version", "2"))] == 3.0
    buckets = {
        dict(k)["le"] for k in samples(text, "kloop_inference_request_duration_seconds_bucket")
    }
    assert "0.0005" in buckets and "10.0" in buckets and len(buckets) == 21  # 20 + +Inf
    assert samples(text, "kloop_model_traffic_weight") == {
        (("model", MODEL), ("version", "2")): 100.0
    }
    assert samples(text, "kloop_model_loaded") == {(("model", MODEL), ("version", "2")): 1.0}
