"""Every conversion between the generated OIP protobuf messages and the core's types.

One module, both directions, server and client side, so the rules of the wire live in one
place: typed ``contents`` use the repeated field that matches the datatype (FP16 and BF16 have
none and travel raw only; BYTES uses ``bytes_contents``), ``raw_input_contents``/
``raw_output_contents`` are flattened little-endian bytes in tensor order (BYTES elements
length-prefixed, see ``serving.core.types``), and an empty requested-outputs list means "all
of them". One response uses one representation: raw when the client sent raw, or when an
output has no typed field.

Decoding uses numpy on whole buffers (``np.frombuffer``, ``np.asarray`` over a repeated field);
no Python loop touches numeric tensor elements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from kloop.pb import inference_pb2 as pb
from serving.core.errors import InvalidInput
from serving.core.types import (
    RAW_ONLY_DATATYPES,
    InferenceRequest,
    InferenceResponse,
    InferInput,
    ModelMetadata,
    ServerMetadata,
    as_bytes_array,
    bf16_to_float32,
    decode_raw,
    encode_raw,
    numpy_dtype,
    oip_datatype,
    to_bytes,
)

# Datatype -> the InferTensorContents field that carries it.
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


# ---- parameters ----------------------------------------------------------------------------


def parameters_from_proto(params: Mapping[str, pb.InferParameter]) -> dict[str, Any]:
    if not params:  # the usual case; iterating even an empty map costs a Python-level walk
        return {}
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def _set_parameter(target: pb.InferParameter, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    else:
        target.string_param = str(value)


# ---- tensors -------------------------------------------------------------------------------


def _decode_raw(tensor: pb.ModelInferRequest.InferInputTensor, raw: bytes) -> InferInput:
    name, datatype = tensor.name, tensor.datatype
    try:
        data = decode_raw(datatype, raw)
    except InvalidInput as e:
        raise InvalidInput(f"input {name!r}: {e.message}") from None
    return InferInput(name, datatype, tuple(tensor.shape), data, raw_nbytes=len(raw),
                      parameters=parameters_from_proto(tensor.parameters))


def _decode_typed(tensor: pb.ModelInferRequest.InferInputTensor) -> InferInput:
    name, datatype = tensor.name, tensor.datatype
    dtype = _dtype(name, datatype)
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(
            f"input {name!r}: {datatype} has no typed contents; send it in raw_input_contents"
            + (" (BF16 is raw only: 2 bytes per element, the upper half of an FP32)"
               if datatype in RAW_ONLY_DATATYPES else "")
        )
    values = getattr(tensor.contents, field)
    if datatype == "BYTES":
        data = as_bytes_array(list(values))
    else:
        # The repeated field is wider than INT8/16 and UINT8/16: decode in its own type,
        # narrow, and refuse values that did not survive (numpy would wrap them silently).
        wide = np.asarray(values)
        data = wide.astype(dtype)
        if dtype.kind in "iu" and not np.array_equal(data, wide):
            raise InvalidInput(f"input {name!r}: contents hold values out of range for {datatype}")
    return InferInput(name, datatype, tuple(tensor.shape), data,
                      parameters=parameters_from_proto(tensor.parameters))


def _dtype(name: str, datatype: str) -> np.dtype[Any]:
    try:
        return numpy_dtype(datatype)
    except InvalidInput as e:
        raise InvalidInput(f"input {name!r}: {e.message}") from None


def _typed_values(datatype: str, data: np.ndarray[Any, Any]) -> list[Any]:
    if datatype == "BYTES":
        return [to_bytes(x) for x in data.reshape(-1)]
    return data.ravel().tolist()


# ---- server side ---------------------------------------------------------------------------


def infer_request_from_proto(msg: pb.ModelInferRequest) -> InferenceRequest:
    raw = msg.raw_input_contents
    tensors = msg.inputs
    if raw:
        if len(raw) != len(tensors):
            raise InvalidInput(
                f"raw_input_contents has {len(raw)} entries for {len(tensors)} inputs"
            )
        inputs = []
        for tensor, data in zip(tensors, raw, strict=True):
            if tensor.HasField("contents"):
                raise InvalidInput(
                    f"input {tensor.name!r} has contents although raw_input_contents is used"
                )
            inputs.append(_decode_raw(tensor, data))
    else:
        inputs = [_decode_typed(tensor) for tensor in tensors]
    outputs = msg.outputs
    return InferenceRequest(
        model=msg.model_name,
        version=msg.model_version or None,
        id=msg.id,
        inputs=tuple(inputs),
        outputs=tuple(o.name for o in outputs) if outputs else (),
        parameters=parameters_from_proto(msg.parameters),
    )


def infer_response_to_proto(resp: InferenceResponse, raw: bool) -> pb.ModelInferResponse:
    """``raw``: answer in ``raw_output_contents`` (as the client asked in raw). Typed answers
    fall back to raw when an output's datatype has no typed field (FP16, BF16): the spec
    allows only one representation per response."""
    msg = pb.ModelInferResponse(model_name=resp.model, model_version=resp.model_version, id=resp.id)
    for key, value in resp.parameters.items():
        _set_parameter(msg.parameters[key], value)
    raw = raw or any(o.datatype not in CONTENTS_FIELD for o in resp.outputs)
    tensors, raw_contents = msg.outputs, msg.raw_output_contents
    for out in resp.outputs:
        tensor = tensors.add(name=out.name, datatype=out.datatype, shape=out.shape)
        for key, value in out.parameters.items():
            _set_parameter(tensor.parameters[key], value)
        if raw:
            raw_contents.append(encode_raw(out.datatype, out.data))
        else:
            field = getattr(tensor.contents, CONTENTS_FIELD[out.datatype])
            field.extend(_typed_values(out.datatype, out.data))
    return msg


def server_metadata_to_proto(meta: ServerMetadata) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(
        name=meta.name, version=meta.version, extensions=list(meta.extensions)
    )


def model_metadata_to_proto(meta: ModelMetadata) -> pb.ModelMetadataResponse:
    tm = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=meta.name,
        versions=list(meta.versions),
        platform=meta.platform,
        inputs=[tm(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.inputs],
        outputs=[tm(name=t.name, datatype=t.datatype, shape=t.shape) for t in meta.outputs],
    )


# ---- client side ---------------------------------------------------------------------------


def infer_request_to_proto(
    model: str,
    inputs: Mapping[str, np.ndarray[Any, Any]],
    version: str | None = None,
    raw: bool = True,
    outputs: tuple[str, ...] = (),
    request_id: str = "",
) -> pb.ModelInferRequest:
    """Client side. ``raw=False`` uses typed contents unless an input's datatype has no typed
    field (FP16), in which case all inputs go raw: one request carries one representation.
    Object arrays (of bytes or str) are sent as BYTES."""
    msg = pb.ModelInferRequest(model_name=model, model_version=version or "", id=request_id)
    arrays = {name: np.asarray(a) for name, a in inputs.items()}
    datatypes = {name: oip_datatype(a.dtype) for name, a in arrays.items()}
    raw = raw or any(dt not in CONTENTS_FIELD for dt in datatypes.values())
    for name, array in arrays.items():
        tensor = msg.inputs.add(name=name, datatype=datatypes[name], shape=array.shape)
        if raw:
            msg.raw_input_contents.append(encode_raw(datatypes[name], array))
        else:
            field = CONTENTS_FIELD[datatypes[name]]
            getattr(tensor.contents, field).extend(_typed_values(datatypes[name], array))
    for name in outputs:
        msg.outputs.add(name=name)
    return msg


def outputs_from_proto(msg: pb.ModelInferResponse) -> dict[str, np.ndarray[Any, Any]]:
    """The response's tensors by name, shaped, from raw or typed contents. BF16 comes back as
    float32 (exact: a bfloat16 is the upper half of a float32), BYTES as an object array."""
    raw = msg.raw_output_contents
    out: dict[str, np.ndarray[Any, Any]] = {}
    for i, tensor in enumerate(msg.outputs):
        datatype = tensor.datatype
        if raw:
            data = decode_raw(datatype, raw[i])
        elif datatype == "BYTES":
            data = as_bytes_array(list(tensor.contents.bytes_contents))
        else:
            dtype = numpy_dtype(datatype)
            data = np.asarray(getattr(tensor.contents, CONTENTS_FIELD[datatype]), dtype=dtype)
        if datatype == "BF16":
            data = bf16_to_float32(data)
        out[tensor.name] = data.reshape(tuple(tensor.shape))
    return out

