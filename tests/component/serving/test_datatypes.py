"""Every datatype the server carries, end to end through a real server (one exported model per
datatype, ``tests/support/dtype_models.py``), over each representation the protocol has: gRPC
typed contents, gRPC raw contents, HTTP JSON and HTTP binary (Triton's extension). Requests
are built by hand here, so the test pins the wire format itself, not kloop's own client.

Where the protocol has no representation (FP16 and BF16 typed contents, BF16 JSON inputs) the
server must say so with INVALID_ARGUMENT / 400, naming the way that works.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import orjson
import pytest

from kloop.pb import inference_pb2 as pb
from kloop.pb import inference_pb2_grpc as pb_grpc
from serving.app import Server, ServerConfig
from serving.core.types import as_bytes_array, bf16_to_float32, decode_raw, encode_raw
from serving.grpc.converters import CONTENTS_FIELD
from tests.support.dtype_models import DATATYPES, model_name, publish_all, sample, sample_text
from tests.support.serving import split_binary

NO_TYPED_FIELD = {"FP16", "BF16"}


@pytest.fixture(scope="module")
def dtype_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dtype-registry")
    publish_all(root, tmp_path_factory.mktemp("dtype-export"))
    return root


@pytest.fixture
async def server(dtype_registry: Path) -> AsyncIterator[Server]:
    srv = Server(ServerConfig(registry=dtype_registry, http_port=0, grpc_port=0))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
async def stub(server: Server) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


@pytest.fixture
async def http(server: Server) -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as session:
        yield session


def _grpc_request(datatype: str, data: np.ndarray[Any, Any], raw: bool) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name=model_name(datatype), id="r1")
    tensor = msg.inputs.add(name="x", datatype=datatype, shape=data.shape)
    if raw:
        msg.raw_input_contents.append(encode_raw(datatype, data))
    elif datatype in CONTENTS_FIELD:
        values = list(data.ravel()) if datatype == "BYTES" else data.ravel().tolist()
        getattr(tensor.contents, CONTENTS_FIELD[datatype]).extend(values)
    return msg


def _grpc_output(resp: pb.ModelInferResponse) -> np.ndarray[Any, Any]:
    (out,) = resp.outputs
    assert out.name == "y"
    if resp.raw_output_contents:
        data = decode_raw(out.datatype, resp.raw_output_contents[0])
    elif out.datatype == "BYTES":
        data = as_bytes_array(list(out.contents.bytes_contents))
    else:
        data = np.asarray(getattr(out.contents, CONTENTS_FIELD[out.datatype]))
    return data.reshape(tuple(out.shape))


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
@pytest.mark.parametrize("datatype", DATATYPES)
async def test_grpc(stub: pb_grpc.GRPCInferenceServiceStub, datatype: str, raw: bool) -> None:
    data = sample(datatype)
    request = _grpc_request(datatype, data, raw)
    if not raw and datatype in NO_TYPED_FIELD:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(request)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "raw_input_contents" in (e.value.details() or "")
        return
    resp = await stub.ModelInfer(request)
    assert resp.id == "r1" and resp.outputs[0].datatype == datatype
    # One representation per response: raw for a raw request, typed for a typed one.
    assert bool(resp.raw_output_contents) == raw
    out = _grpc_output(resp)
    assert out.shape == data.shape
    np.testing.assert_array_equal(out.astype(data.dtype), data)


def _json_data(datatype: str, data: np.ndarray[Any, Any]) -> Any:
    if datatype == "BYTES":
        return [x.decode() for x in data.ravel()]
    return data.tolist()


@pytest.mark.parametrize("datatype", DATATYPES)
async def test_http_json(http: aiohttp.ClientSession, datatype: str) -> None:
    data = sample_text() if datatype == "BYTES" else sample(datatype)
    body = {"id": "j1", "inputs": [{"name": "x", "datatype": datatype, "shape": list(data.shape),
                                    "data": _json_data(datatype, data)}]}
    if datatype == "BF16":
        body["inputs"][0]["data"] = bf16_to_float32(data).tolist()
    async with http.post(f"/v2/models/{model_name(datatype)}/infer", json=body) as r:
        answer = await r.json()
        if datatype == "BF16":
            assert r.status == 400 and "binary" in answer["error"]
            return
        assert r.status == 200, answer
        assert r.headers["Content-Type"].startswith("application/json")
    (out,) = answer["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("y", datatype, list(data.shape))
    assert answer["id"] == "j1"
    if datatype == "BYTES":
        assert out["data"] == _json_data(datatype, data)
    else:
        np.testing.assert_array_equal(np.asarray(out["data"], dtype=data.dtype).reshape(data.shape),
                                      data)


async def _binary_infer(
    http: aiohttp.ClientSession, model: str, header: dict[str, Any], blobs: list[bytes]
) -> tuple[int, dict[str, str], bytes]:
    head = orjson.dumps(header)
    async with http.post(f"/v2/models/{model}/infer", data=head + b"".join(blobs),
                         headers={"Inference-Header-Content-Length": str(len(head))}) as r:
        return r.status, dict(r.headers), await r.read()


@pytest.mark.parametrize("datatype", DATATYPES)
async def test_http_binary(http: aiohttp.ClientSession, datatype: str) -> None:
    data = sample(datatype)
    blob = encode_raw(datatype, data)
    header = {"inputs": [{"name": "x", "datatype": datatype, "shape": list(data.shape),
                          "parameters": {"binary_data_size": len(blob)}}],
              "outputs": [{"name": "y", "parameters": {"binary_data": True}}]}
    status, headers, body = await _binary_infer(http, model_name(datatype), header, [blob])
    assert status == 200, body
    assert headers["Content-Type"] == "application/octet-stream"
    answer, blobs = split_binary(headers, body)
    (out,) = answer["outputs"]
    assert "data" not in out and out["datatype"] == datatype
    got = decode_raw(datatype, blobs["y"]).reshape(out["shape"])
    np.testing.assert_array_equal(got, data)


async def test_bf16_json_output_is_exact_floats(http: aiohttp.ClientSession) -> None:
    """A BF16 input must be binary, but its output may come back as JSON: exact float values."""
    data = sample("BF16")
    blob = encode_raw("BF16", data)
    header = {"inputs": [{"name": "x", "datatype": "BF16", "shape": [2, 3],
                          "parameters": {"binary_data_size": len(blob)}}]}
    status, headers, body = await _binary_infer(http, "id-bf16", header, [blob])
    assert status == 200 and "Inference-Header-Content-Length" not in headers
    out = orjson.loads(body)["outputs"][0]
    np.testing.assert_array_equal(np.asarray(out["data"], np.float32).reshape(2, 3),
                                  bf16_to_float32(data))


async def test_bytes_json_output_that_is_not_utf8_names_binary(http: aiohttp.ClientSession) -> None:
    blob = encode_raw("BYTES", sample("BYTES"))
    header = {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [3],
                          "parameters": {"binary_data_size": len(blob)}}]}
    status, _, body = await _binary_infer(http, "id-bytes", header, [blob])
    assert status == 400 and b"binary_data" in body


async def test_metadata_lists_datatypes_and_extensions(http: aiohttp.ClientSession) -> None:
    async with http.get("/v2") as r:
        meta = await r.json()
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    async with http.get("/v2/models/id-bf16") as r:
        meta = await r.json()
    assert meta["platform"] == "pytorch_torch_export" and meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "x", "datatype": "BF16", "shape": [-1, 3]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "BF16", "shape": [-1, 3]}]


@pytest.mark.parametrize(("datatype", "values", "says"), [
    ("INT64", [1.5, 2.0], "integers"),
    ("INT32", [1, 2.5], "integers"),
    ("UINT8", [1, 300], "out of range"),
    ("INT8", [-129, 0], "out of range"),
    ("BOOL", [1, 0], "true/false"),
    ("FP16", [1.0, 70000.0], "out of range"),  # past FP16's 65504: not a silent inf
    ("FP32", [1.0, 1e300], "out of range"),
])
async def test_http_json_refuses_values_that_do_not_fit_the_datatype(
        http: aiohttp.ClientSession, datatype: str, values: list[Any], says: str) -> None:
    """A JSON number is not silently cast: 1.5 sent as INT64 is an error, not 1, and 1e300 sent
    as FP32 is an error, not inf."""
    shape = list(sample(datatype).shape)
    count = int(np.prod(shape))
    data = (values * count)[:count]
    body = {"inputs": [{"name": "x", "datatype": datatype, "shape": shape, "data": data}]}
    async with http.post(f"/v2/models/{model_name(datatype)}/infer", json=body) as r:
        answer = await r.json()
        assert r.status == 400 and says in answer["error"] and datatype in answer["error"], answer
    good = {"inputs": [{"name": "x", "datatype": datatype, "shape": shape,
                        "data": sample(datatype).tolist()}]}
    async with http.post(f"/v2/models/{model_name(datatype)}/infer", json=good) as r:
        assert r.status == 200  # and the server serves on
