"""Malformed requests: the decoders raise nothing but ``InvalidInput`` (property-based, over
gRPC ``ModelInferRequest`` messages, HTTP JSON bodies and HTTP binary bodies with wrong lengths),
and a real server answers every malformed request with 4xx / INVALID_ARGUMENT and keeps
serving afterwards."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import grpc
import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kloop.artifact import Registry
from kloop.pb import inference_pb2 as pb
from kloop.pb import inference_pb2_grpc as pb_grpc
from serving.app import Server, ServerConfig
from serving.core.errors import InvalidInput
from serving.core.validation import validate
from serving.grpc import converters
from serving.http import codec
from tests.support.dtype_models import publish_all

DATATYPES = ["BOOL", "UINT8", "INT8", "INT32", "INT64", "UINT64", "FP16", "FP32", "FP64", "BF16",
             "BYTES", "STRING", ""]
names = st.sampled_from(["x", "y", "", "\u00e9"])
shapes = st.lists(st.integers(-3, 2**40), max_size=4)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    return publish_all(tmp_path_factory.mktemp("fuzz-reg"), tmp_path_factory.mktemp("fuzz-exp"),
                       datatypes=("FP32", "BYTES", "BF16"))


def _only_invalid_input(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except InvalidInput:
        return None


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="id-fp32")
    raw = draw(st.booleans())
    for _ in range(draw(st.integers(0, 3))):
        t = msg.inputs.add(name=draw(names), datatype=draw(st.sampled_from(DATATYPES)),
                           shape=draw(shapes))
        if raw:
            msg.raw_input_contents.append(draw(st.binary(max_size=64)))
        else:
            field = draw(st.sampled_from(["fp32_contents", "int_contents", "bytes_contents",
                                          "bool_contents", "uint64_contents"]))
            if field == "fp32_contents":
                values: list[Any] = draw(st.lists(st.floats(width=32), max_size=8))
            elif field == "bytes_contents":
                values = draw(st.lists(st.binary(max_size=8), max_size=8))
            elif field == "bool_contents":
                values = draw(st.lists(st.booleans(), max_size=8))
            elif field == "uint64_contents":
                values = draw(st.lists(st.integers(0, 2**64 - 1), max_size=8))
            else:
                values = draw(st.lists(st.integers(-2**31, 2**31 - 1), max_size=8))
            getattr(t.contents, field).extend(values)
    if draw(st.booleans()):  # a raw list whose length does not match the inputs
        msg.raw_input_contents.append(draw(st.binary(max_size=8)))
    return msg


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(msg=infer_requests())
def test_grpc_decoder_raises_only_invalid_input(registry: Registry, msg: pb.ModelInferRequest) -> None:
    wire = pb.ModelInferRequest.FromString(msg.SerializeToString())
    request = _only_invalid_input(converters.infer_request_from_proto, wire)
    if request is not None:
        for model in ("id-fp32", "id-bytes", "id-bf16"):
            _only_invalid_input(validate, request, registry.manifest(model, 1))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats(allow_nan=False)
    | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4),
    max_leaves=20,
)


@st.composite
def json_bodies(draw: st.DrawFn) -> Any:
    if draw(st.booleans()):
        return draw(json_values)
    tensor = {"name": draw(names | st.integers(-9, 9)), "datatype": draw(st.sampled_from(DATATYPES)),
              "shape": draw(shapes | json_values), "data": draw(json_values)}
    if draw(st.booleans()):
        tensor["parameters"] = draw(st.dictionaries(st.sampled_from(
            ["binary_data_size", "x"]), json_values, max_size=2))
    body: dict[str, Any] = {"inputs": draw(st.sampled_from([[tensor], [], tensor, None]))}
    if draw(st.booleans()):
        body["outputs"] = draw(json_values)
    if draw(st.booleans()):
        body["parameters"] = draw(json_values)
    return body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=json_bodies(), trailer=st.binary(max_size=16), header=st.one_of(
    st.none(), st.integers(-5, 400).map(str), st.text(max_size=4)))
def test_http_decoder_raises_only_invalid_input(
    registry: Registry, body: Any, trailer: bytes, header: str | None
) -> None:
    raw = orjson.dumps(body)
    if header is not None:
        raw += trailer

    def decode() -> Any:
        n = codec.parse_header_length(header, len(raw))
        return codec.decode_infer_request(raw, n, "id-fp32", None)[0]

    request = _only_invalid_input(decode)
    if request is not None:
        for model in ("id-fp32", "id-bytes", "id-bf16"):
            _only_invalid_input(validate, request, registry.manifest(model, 1))


def _outcome(raw: bytes, header: int | None, simdjson_from: int) -> Any:
    """What decode_infer_request makes of a body with large bodies parsed from the given size:
    the error's message, or each input as comparable values."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codec, "SIMDJSON_FROM_BYTES", simdjson_from)
        try:
            request, fmt = codec.decode_infer_request(raw, header, "id-fp32", None)
        except InvalidInput as e:
            return ("error", e.message)
    return [(i.name, i.datatype, i.shape, i.data.dtype.str, i.parameters,
             i.data.tolist() if i.data.dtype == object else i.data.tobytes())  # NaN == NaN here
            for i in request.inputs], request.outputs, request.parameters, request.id, fmt


# Float tensors as clients send them (flat lists of numbers), and the near misses: nested and
# ragged lists, booleans, strings and nulls among the numbers, integers past 64 bits.
float_elements = (st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**70, 2**70)
                  | st.floats(width=16, allow_nan=False, allow_infinity=False))
odd_elements = st.none() | st.booleans() | st.text(max_size=2) | st.lists(float_elements, max_size=3)


@st.composite
def float_bodies(draw: st.DrawFn) -> Any:
    data: list[Any] = draw(st.lists(float_elements, max_size=40))
    if data and draw(st.booleans()):
        data[draw(st.integers(0, len(data) - 1))] = draw(odd_elements)
    tensor = {"name": "x", "datatype": draw(st.sampled_from(["FP16", "FP32", "FP64", "INT32"])),
              "shape": [1, len(data)], "data": data}
    return {"inputs": [tensor], "id": draw(st.text(max_size=3))}


@settings(max_examples=300, deadline=None)
@given(body=json_bodies() | float_bodies())
def test_simdjson_and_orjson_decode_every_body_alike(body: Any) -> None:
    """Large bodies take simdjson's float fast path; every body decodes to the same request, or
    fails with the same message, whichever parser reads it."""
    raw = json.dumps(body, ensure_ascii=False).encode()  # orjson cannot write integers > 64 bits
    assert _outcome(raw, None, 0) == _outcome(raw, None, 1 << 60)


@settings(max_examples=100, deadline=None)
@given(text=st.text(max_size=6), bad=st.sampled_from([b"", b"\xff", b"\\ud800", b"1e400", b"NaN"]))
def test_simdjson_refusals_get_orjsons_answer(text: str, bad: bytes) -> None:
    """Bodies simdjson refuses (invalid UTF-8, lone surrogates, infinities, NaN) get orjson's
    verdict and wording."""
    raw = (b'{"inputs":[{"name":' + orjson.dumps(text) + b',"datatype":"FP32","shape":[1,1],'
           b'"data":[' + (bad or b"1") + b"]}]}")
    assert _outcome(raw, None, 0) == _outcome(raw, None, 1 << 60)


@pytest.mark.parametrize("raw", [
    b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]}],'
    b'"inputs":[{"name":"x","datatype":"FP32","shape":[1,3],"data":[1,2,3]}]}',
    b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2],"data":[3,4]}]}',
    b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[[1],2]}]}',
    b'{"inputs":[{"name":"[x","datatype":"FP64","shape":[1,2],"data":[1,2]}]}',
    b'{"id":"a","inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]}],"id":"b"}',
    b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2],"datatype":"BYTES"}]}',
])
def test_repeated_keys_and_nesting_decode_as_orjson_does(raw: bytes) -> None:
    """orjson keeps a repeated key's last value, where simdjson's lookup finds the first; ragged
    lists must be refused as numpy refuses them."""
    assert _outcome(raw, None, 0) == _outcome(raw, None, 1 << 60)


def test_large_float_body_takes_the_fast_path() -> None:
    x = np.random.default_rng(0).standard_normal((1, 3, 64, 64)).astype(np.float32)
    raw = orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": list(x.shape),
                                    "data": x.ravel().tolist()}]})
    assert len(raw) >= codec.SIMDJSON_FROM_BYTES
    assert isinstance(codec.loads_request(raw)["inputs"][0]["data"], np.ndarray)
    request, _ = codec.decode_infer_request(raw, None, "m", None)
    assert request.inputs[0].data.dtype == np.float32
    assert np.array_equal(request.inputs[0].data, x.ravel())


@settings(max_examples=200, deadline=None)
@given(size=st.integers(-2, 40), extra=st.binary(max_size=40), delta=st.integers(-30, 30))
def test_binary_body_with_wrong_lengths_is_invalid_input(size: int, extra: bytes, delta: int) -> None:
    head = orjson.dumps({"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1],
                                     "parameters": {"binary_data_size": size}}]})
    body = head + extra
    try:
        n = codec.parse_header_length(str(len(head) + delta), len(body))
        codec.decode_infer_request(body, n, "id-bytes", None)
    except InvalidInput:
        pass


# ---- a real server -------------------------------------------------------------------------


@pytest.fixture
async def server(registry: Registry) -> AsyncIterator[Server]:
    srv = Server(ServerConfig(registry=registry.root, http_port=0, grpc_port=0))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


MALFORMED_HTTP: list[tuple[dict[str, str], bytes]] = [
    ({}, b"{not json"),
    ({}, b"[]"),
    ({}, orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                                   "data": ["a", "b", "c"]}]})),
    ({"Inference-Header-Content-Length": "9999"}, b"{}"),
    ({"Inference-Header-Content-Length": "-1"}, b"{}"),
    ({"Inference-Header-Content-Length": "2"}, b"{}\x00\x01"),
    ({"Inference-Header-Content-Length": "5"}, b"{}"),
    ({}, orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                                   "parameters": {"binary_data_size": 12}}]})),
    ({}, orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2**62, 3],
                                   "data": [1, 2, 3]}]})),
    ({}, orjson.dumps({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3],
                                   "data": [1, 2, 3]}], "outputs": [{"name": "nope"}]})),
]


async def test_real_server_answers_malformed_requests_and_keeps_serving(server: Server) -> None:
    x = np.ones((1, 3), np.float32)
    async with aiohttp.ClientSession(f"http://127.0.0.1:{server.http_port}") as http:
        for headers, body in MALFORMED_HTTP:
            async with http.post("/v2/models/id-fp32/infer", data=body, headers=headers) as r:
                assert 400 <= r.status < 500, (headers, body, r.status)
                assert "error" in await r.json()
        good = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": x.tolist()}]}
        async with http.post("/v2/models/id-fp32/infer", json=good) as r:
            assert r.status == 200
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        bad = [
            pb.ModelInferRequest(model_name="id-fp32", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="x", datatype="BF16", shape=[1, 3])]),
            pb.ModelInferRequest(model_name="id-bytes", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="x", datatype="BYTES", shape=[1])], raw_input_contents=[b"\xff\xff\xff\x7f"]),
            pb.ModelInferRequest(model_name="id-fp32", raw_input_contents=[b"1"]),
            pb.ModelInferRequest(model_name="id-bf16", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="x", datatype="BF16", shape=[1, 3])], raw_input_contents=[b"\x00" * 5]),
        ]
        for msg in bad:
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await stub.ModelInfer(msg)
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT, msg
        # raw bytes that are not a ModelInferRequest at all
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await call(b"\xff\xff\xff")
        assert e.value.code() is not grpc.StatusCode.OK
        ok = pb.ModelInferRequest(model_name="id-fp32", raw_input_contents=[x.tobytes()])
        ok.inputs.add(name="x", datatype="FP32", shape=[1, 3])
        resp = await stub.ModelInfer(ok)
        assert np.frombuffer(resp.raw_output_contents[0], np.float32).tolist() == [1, 1, 1]
