"""Every RPC of the OIP v2 service through the generated stub, against a real server: each test
runs against both gRPC servers, the native front end (serving.grpc.native) and grpc.aio."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from kloop.pb import inference_pb2 as pb
from kloop.pb import inference_pb2_grpc as pb_grpc
from tests.support.serving import MODEL, reference, require_native


@pytest.fixture(params=["native", "aio"])
def grpc_server(request: pytest.FixtureRequest) -> str:
    if request.param == "native":
        require_native()
    return str(request.param)


@pytest.fixture
async def stub(grpc_target: str) -> AsyncIterator[pb_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(grpc_target) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def raw_request(images: np.ndarray, **kw: object) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=MODEL, **kw)  # type: ignore[arg-type]
    req.inputs.add(name="image", datatype="FP32", shape=images.shape)
    req.raw_input_contents.append(images.tobytes())
    return req


async def test_health_and_metadata(stub: pb_grpc.GRPCInferenceServiceStub) -> None:
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="2"))).ready
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="1"))).ready
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name="nope"))).ready
    meta = await stub.ServerMetadata(pb.ServerMetadataRequest())
    assert meta.name == "kloop" and meta.version
    model = await stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
    assert list(model.versions) == ["2"]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.inputs] == [
        ("image", "FP32", [-1, 1, 8, 8])
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in model.outputs] == [
        ("logits", "FP32", [-1, 10]), ("label", "INT64", [-1])
    ]


async def test_model_metadata_of_unknown_model_is_not_found(
    stub: pb_grpc.GRPCInferenceServiceStub,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ModelMetadata(pb.ModelMetadataRequest(name="nope"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


async def test_infer_raw_contents_answers_raw(
    stub: pb_grpc.GRPCInferenceServiceStub, images: np.ndarray
) -> None:
    resp = await stub.ModelInfer(raw_request(images, id="req-1"))
    assert (resp.model_name, resp.model_version, resp.id) == (MODEL, "2", "req-1")
    assert [(o.name, o.datatype, list(o.shape)) for o in resp.outputs] == [
        ("logits", "FP32", [3, 10]), ("label", "INT64", [3])
    ]
    assert len(resp.raw_output_contents) == 2
    assert not resp.outputs[0].HasField("contents")
    logits = np.frombuffer(resp.raw_output_contents[0], "<f4").reshape(3, 10)
    label = np.frombuffer(resp.raw_output_contents[1], "<i8")
    want_logits, want_label = reference(2, images)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(label, want_label)


async def test_infer_typed_contents_answers_typed(
    stub: pb_grpc.GRPCInferenceServiceStub, images: np.ndarray
) -> None:
    req = pb.ModelInferRequest(model_name=MODEL, model_version="2")
    tensor = req.inputs.add(name="image", datatype="FP32", shape=images.shape)
    tensor.contents.fp32_contents.extend(images.ravel().tolist())
    req.outputs.add(name="label")
    resp = await stub.ModelInfer(req)
    assert not resp.raw_output_contents
    assert [o.name for o in resp.outputs] == ["label"]
    np.testing.assert_array_equal(
        np.array(resp.outputs[0].contents.int64_contents), reference(2, images)[1]
    )


@pytest.mark.parametrize(
    ("mutate", "code", "needle"),
    [
        (lambda r: setattr(r, "model_name", "nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (lambda r: setattr(r, "model_version", "9"), grpc.StatusCode.NOT_FOUND, "version '9'"),
        (lambda r: setattr(r.inputs[0], "name", "img"), grpc.StatusCode.INVALID_ARGUMENT,
         "unknown input 'img'"),
        (lambda r: setattr(r.inputs[0], "datatype", "FP64"), grpc.StatusCode.INVALID_ARGUMENT,
         "datatype FP64"),
        (lambda r: setattr(r.inputs[0], "datatype", "WEIRD"), grpc.StatusCode.INVALID_ARGUMENT,
         "unknown datatype 'WEIRD'"),
        (lambda r: r.inputs[0].shape.__setitem__(2, 7), grpc.StatusCode.INVALID_ARGUMENT,
         "shape [3, 1, 7, 8]"),
        (lambda r: r.inputs[0].shape.pop(), grpc.StatusCode.INVALID_ARGUMENT, "shape [3, 1, 8]"),
        (lambda r: r.inputs[0].shape.__setitem__(0, 2), grpc.StatusCode.INVALID_ARGUMENT,
         "raw contents hold 768 bytes"),
        (lambda r: r.raw_input_contents.__setitem__(0, r.raw_input_contents[0][:-2]),
         grpc.StatusCode.INVALID_ARGUMENT, "766 bytes"),
        (lambda r: r.outputs.add(name="probs"), grpc.StatusCode.INVALID_ARGUMENT,
         "unknown requested output(s) ['probs']"),
        (lambda r: r.raw_input_contents.append(b"x"), grpc.StatusCode.INVALID_ARGUMENT,
         "2 entries for 1 inputs"),
    ],
    ids=["model", "version", "name", "datatype", "bad-datatype", "dim", "rank", "raw-size-shape",
         "raw-size-bytes", "output", "raw-count"],
)
async def test_bad_requests_get_their_error_and_the_server_keeps_serving(
    stub: pb_grpc.GRPCInferenceServiceStub, images: np.ndarray,
    mutate: object, code: grpc.StatusCode, needle: str,
) -> None:
    req = raw_request(images)
    mutate(req)  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ModelInfer(req)
    assert e.value.code() == code
    assert needle in (e.value.details() or "")
    assert (await stub.ModelInfer(raw_request(images))).model_version == "2"


async def test_typed_element_count_mismatch(
    stub: pb_grpc.GRPCInferenceServiceStub, images: np.ndarray
) -> None:
    req = pb.ModelInferRequest(model_name=MODEL)
    tensor = req.inputs.add(name="image", datatype="FP32", shape=images.shape)
    tensor.contents.fp32_contents.extend(images.ravel()[:-1].tolist())
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.ModelInfer(req)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "191 elements given, shape [3, 1, 8, 8] needs 192" in (e.value.details() or "")


async def test_client_wrapper_maps_errors_to_status_names(grpc_client: object) -> None:
    from serving.client import GrpcClient, InferenceError

    assert isinstance(grpc_client, GrpcClient)
    with pytest.raises(InferenceError) as e:
        await grpc_client.infer("nope", {"image": np.zeros((1, 1, 8, 8), np.float32)})
    assert e.value.code == "NOT_FOUND"
    result = await grpc_client.infer(MODEL, {"image": np.zeros((1, 1, 8, 8), np.float32)}, raw=False)
    assert result.model_version == "2"
    assert result.outputs["logits"].shape == (1, 10) and result.outputs["label"].dtype == np.int64
