"""Every OIP v2 REST route against a real aiohttp server on the test's loop."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import numpy as np
import orjson
import pytest

from tests.support.serving import MODEL, reference


@pytest.fixture
async def http(http_url: str) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(base_url=http_url) as session:
        yield session


def body(images: np.ndarray, **extra: object) -> dict[str, object]:
    return {
        "inputs": [
            {"name": "image", "datatype": "FP32", "shape": list(images.shape),
             "data": images.tolist()}  # nested lists are accepted too
        ],
        **extra,
    }


async def get(http: aiohttp.ClientSession, path: str) -> tuple[int, object]:
    async with http.get(path) as r:
        return r.status, await r.json()


async def test_health_and_metadata_routes(http: aiohttp.ClientSession) -> None:
    assert await get(http, "/v2/health/live") == (200, {"live": True})
    assert await get(http, "/v2/health/ready") == (200, {"ready": True})
    status, meta = await get(http, "/v2")
    assert status == 200 and meta["name"] == "kloop"  # type: ignore[index]
    status, model = await get(http, f"/v2/models/{MODEL}")
    assert status == 200
    assert model == {
        "name": MODEL, "versions": ["2"], "platform": "pytorch_torch_export",
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]},
                    {"name": "label", "datatype": "INT64", "shape": [-1]}],
    }
    assert (await get(http, f"/v2/models/{MODEL}/versions/2"))[0] == 200
    assert await get(http, f"/v2/models/{MODEL}/ready") == (200, {"name": MODEL, "ready": True})
    assert (await get(http, f"/v2/models/{MODEL}/versions/2/ready"))[0] == 200
    assert (await get(http, f"/v2/models/{MODEL}/versions/1/ready"))[0] == 503
    status, err = await get(http, "/v2/models/nope")
    assert status == 404 and "nope" in err["error"]  # type: ignore[index]
    status, err = await get(http, f"/v2/models/{MODEL}/versions/7")
    assert status == 404 and "version '7'" in err["error"]  # type: ignore[index]


@pytest.mark.parametrize("path", [f"/v2/models/{MODEL}/infer", f"/v2/models/{MODEL}/versions/2/infer"])
async def test_infer(http: aiohttp.ClientSession, images: np.ndarray, path: str) -> None:
    async with http.post(path, json=body(images, id="abc")) as r:
        assert r.status == 200
        resp = await r.json()
    assert (resp["model_name"], resp["model_version"], resp["id"]) == (MODEL, "2", "abc")
    logits, label = resp["outputs"]
    assert (logits["name"], logits["datatype"], logits["shape"]) == ("logits", "FP32", [3, 10])
    assert (label["name"], label["datatype"], label["shape"]) == ("label", "INT64", [3])
    want_logits, want_label = reference(2, images)
    np.testing.assert_allclose(np.reshape(logits["data"], (3, 10)), want_logits, rtol=1e-5, atol=1e-6)
    assert label["data"] == want_label.tolist()


async def test_requested_outputs_are_honoured(http: aiohttp.ClientSession, images: np.ndarray) -> None:
    async with http.post(f"/v2/models/{MODEL}/infer",
                         json=body(images, outputs=[{"name": "label"}])) as r:
        resp = await r.json()
    assert [o["name"] for o in resp["outputs"]] == ["label"]


def _flat(images: np.ndarray) -> dict[str, object]:
    return {"name": "image", "datatype": "FP32", "shape": list(images.shape),
            "data": images.ravel().tolist()}


@pytest.mark.parametrize(
    ("path", "payload", "status", "needle"),
    [
        ("/v2/models/nope/infer", None, 404, "'nope'"),
        (f"/v2/models/{MODEL}/versions/5/infer", None, 404, "version '5'"),
        (f"/v2/models/{MODEL}/infer", b"{not json", 400, "not valid JSON"),
        (f"/v2/models/{MODEL}/infer", b"[1, 2]", 400, "must be a JSON object"),
        (f"/v2/models/{MODEL}/infer", {"inputs": []}, 400, "non-empty 'inputs'"),
        (f"/v2/models/{MODEL}/infer", "name=img", 400, "unknown input 'img'"),
        (f"/v2/models/{MODEL}/infer", "datatype=INT64", 400, "datatype INT64"),
        (f"/v2/models/{MODEL}/infer", "shape=[3, 1, 8, 9]", 400, "shape [3, 1, 8, 9]"),
        (f"/v2/models/{MODEL}/infer", "shape=[2, 1, 8, 8]", 400, "192 elements given"),
        (f"/v2/models/{MODEL}/infer", "data=ragged", 400, "data is not a (nested) list"),
        (f"/v2/models/{MODEL}/infer", "outputs=probs", 400, "unknown requested output"),
    ],
)
async def test_bad_requests_get_their_error_and_the_server_keeps_serving(
    http: aiohttp.ClientSession, images: np.ndarray,
    path: str, payload: object, status: int, needle: str,
) -> None:
    tensor = _flat(images)
    data: object = {"inputs": [tensor]}
    if isinstance(payload, (bytes, dict)):
        data = payload
    elif isinstance(payload, str):
        key, _, value = payload.partition("=")
        if key == "outputs":
            data = {"inputs": [tensor], "outputs": [{"name": value}]}
        elif key == "data":
            tensor["data"] = [[1.0, 2.0], [3.0]]
        elif key == "shape":
            tensor["shape"] = orjson.loads(value)
        else:
            tensor[key] = value
    raw = data if isinstance(data, bytes) else orjson.dumps(data)
    async with http.post(path, data=raw, headers={"Content-Type": "application/json"}) as r:
        assert r.status == status
        err = await r.json()
    assert needle in err["error"]
    async with http.post(f"/v2/models/{MODEL}/infer", json=body(images)) as r:
        assert r.status == 200


async def test_unknown_route_is_json_404(http: aiohttp.ClientSession) -> None:
    status, err = await get(http, "/v3/nothing")
    assert status == 404 and "error" in err  # type: ignore[operator]


async def test_http_client_wrapper(http_client: object, images: np.ndarray) -> None:
    from serving.client import HttpClient, InferenceError

    assert isinstance(http_client, HttpClient)
    assert await http_client.live() and await http_client.ready()
    assert await http_client.model_ready(MODEL) and not await http_client.model_ready("nope")
    assert (await http_client.model_metadata(MODEL))["versions"] == ["2"]
    assert (await http_client.server_metadata())["name"] == "kloop"
    result = await http_client.infer(MODEL, {"image": images})
    assert result.model_version == "2"
    np.testing.assert_array_equal(result.outputs["label"], reference(2, images)[1])
    assert result.outputs["logits"].dtype == np.float32
    with pytest.raises(InferenceError) as e:
        await http_client.infer(MODEL, {"image": images[:, :, :4]})
    assert e.value.code == "400" and "shape" in e.value.message
