"""The core without transports: datatype table, converters (INT64 and friends), validation,
and weighted routing with an injected random source."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from kloop.artifact import Manifest, Registry, TensorSpec
from kloop.pb import inference_pb2 as pb
from serving.app import ServerConfig
from serving.core.errors import InvalidInput
from serving.core.repository import ModelRepository
from serving.core.types import InferenceRequest, InferInput, numpy_dtype, oip_datatype
from serving.core.validation import validate
from serving.grpc import converters
from serving.http import codec
from tests.support.serving import MODEL

INT_MANIFEST = Manifest(
    name="ids", version=1, created=0.0, framework="pytorch", torch_version="x",
    format="torch.export", model_file="model.pt2",
    inputs=(TensorSpec("ids", "INT64", (-1, 4)),), outputs=(TensorSpec("score", "FP32", (-1,)),),
    metrics={}, params={}, data_fingerprint="t", run_id="t", files={},
)


@pytest.mark.parametrize(
    "datatype", ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
                 "FP16", "FP32", "FP64"],
)
def test_datatype_table_round_trips(datatype: str) -> None:
    dtype = numpy_dtype(datatype)
    assert oip_datatype(dtype) == datatype
    assert oip_datatype(dtype.newbyteorder(">")) == datatype


def test_unknown_datatype_is_refused_clearly() -> None:
    with pytest.raises(InvalidInput, match="unknown datatype 'STRING'"):
        numpy_dtype("STRING")


def test_int64_typed_and_raw_inputs_convert_and_validate() -> None:
    ids = np.arange(8, dtype=np.int64).reshape(2, 4) * (2**40)
    for raw in (True, False):
        msg = converters.infer_request_to_proto("ids", {"ids": ids}, raw=raw)
        assert bool(msg.raw_input_contents) is raw
        req = converters.infer_request_from_proto(pb.ModelInferRequest.FromString(msg.SerializeToString()))
        validate(req, INT_MANIFEST)
        (tensor,) = req.inputs
        assert tensor.datatype == "INT64" and tensor.shape == (2, 4)
        np.testing.assert_array_equal(tensor.data.reshape(2, 4), ids)
    body = codec.infer_request_to_json({"ids": ids})
    req = codec.infer_request_from_json(codec.loads_object(codec.dumps(body)), "ids", None)
    validate(req, INT_MANIFEST)
    np.testing.assert_array_equal(req.inputs[0].data.reshape(2, 4), ids)


def test_int64_input_with_wrong_datatype_or_size() -> None:
    def request(datatype: str, data: np.ndarray, shape: tuple[int, ...], raw: int | None = None) -> InferenceRequest:
        return InferenceRequest("ids", (InferInput("ids", datatype, shape, data, raw),))

    with pytest.raises(InvalidInput, match="'ids' has datatype INT32, the model expects INT64"):
        validate(request("INT32", np.zeros(4, np.int32), (1, 4)), INT_MANIFEST)
    with pytest.raises(InvalidInput, match="raw contents hold 28 bytes.*needs 32"):
        validate(request("INT64", np.zeros(3, np.int64), (1, 4), raw=28), INT_MANIFEST)
    with pytest.raises(InvalidInput, match=r"shape \[1, 5\], the model expects \[-1, 4\]"):
        validate(request("INT64", np.zeros(5, np.int64), (1, 5)), INT_MANIFEST)
    with pytest.raises(InvalidInput, match=r"missing input\(s\) \['ids'\]"):
        validate(InferenceRequest("ids", ()), INT_MANIFEST)


def test_typed_contents_out_of_range_is_invalid_input() -> None:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype="UINT8", shape=[1]).contents.uint_contents.append(300)
    with pytest.raises(InvalidInput, match="'x'"):
        converters.infer_request_from_proto(msg)


def test_typed_response_falls_back_to_raw_for_fp16() -> None:
    from serving.core.types import InferenceResponse, InferOutput

    half = np.array([1.5, -2.0], np.float16)
    resp = InferenceResponse("m", "1", (InferOutput("h", "FP16", (2,), half),))
    msg = converters.infer_response_to_proto(resp, raw=False)
    assert len(msg.raw_output_contents) == 1
    np.testing.assert_array_equal(converters.outputs_from_proto(msg)["h"], half)


def test_weighted_routing_follows_the_weights(template_registry: Path) -> None:
    repo = ModelRepository(Registry(template_registry), rng=random.Random(7))
    repo.load(MODEL, 1)
    repo.load(MODEL, 2)
    assert repo.weights(MODEL) == {1: 100, 2: 0}  # the first loaded takes all the traffic
    repo.set_weights(MODEL, {"1": 90, "2": 10})
    counts = Counter(repo.route(MODEL, None).version for _ in range(2000))
    assert 1700 < counts[1] < 1900 and counts[1] + counts[2] == 2000
    assert {repo.route(MODEL, "2").version for _ in range(50)} == {2}
    repo.set_weights(MODEL, {2: 100})  # unnamed versions get 0
    assert repo.weights(MODEL) == {1: 0, 2: 100}


@pytest.mark.parametrize(
    "kwargs",
    [{"http_port": 70000}, {"http_port": 9000, "grpc_port": 9000}, {"infer_workers": 0},
     {"admin_token": " "}, {"grace_seconds": -1}],
)
def test_server_config_rejects_bad_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ServerConfig(registry=Path("/nonexistent"), **kwargs)  # type: ignore[arg-type]
