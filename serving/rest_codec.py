"""JSON bodies of the OIP v2 REST API <-> the core's types (the HTTP twin of ``converters``).

Tensor ``data`` may be flat or nested row-major lists; numpy converts a whole list at once.
Output arrays are written by orjson straight from numpy (``OPT_SERIALIZE_NUMPY``), without a
Python list in between.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson

from serving.core.errors import InvalidInput
from serving.core.types import (
    InferenceRequest,
    InferenceResponse,
    InferInput,
    ModelMetadata,
    ServerMetadata,
    numpy_dtype,
    oip_datatype,
)

_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def dumps(body: Any) -> bytes:
    return orjson.dumps(body, option=_DUMPS_OPTIONS)


def loads_object(raw: bytes) -> dict[str, Any]:
    """Parse a request body that must be a JSON object; ``InvalidInput`` otherwise."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise InvalidInput(f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise InvalidInput(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise InvalidInput(f"{where}: field {key!r} must be a {kind.__name__}")
    return value


def _decode_input(obj: Any, index: int) -> InferInput:
    if not isinstance(obj, dict):
        raise InvalidInput(f"inputs[{index}] must be an object")
    name = _field(obj, "name", str, f"inputs[{index}]")
    where = f"input {name!r}"
    datatype = _field(obj, "datatype", str, where)
    shape = _field(obj, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"{where}: shape must be a list of integers, got {shape}")
    if "data" not in obj:
        raise InvalidInput(f"{where}: missing field 'data'")
    try:
        dtype = numpy_dtype(datatype)
    except InvalidInput as e:
        raise InvalidInput(f"{where}: {e.message}") from None
    try:
        data = np.asarray(obj["data"], dtype=dtype).reshape(-1)
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidInput(f"{where}: data is not a (nested) list of {datatype} values: {e}") from e
    return InferInput(name, datatype, tuple(shape), data)


def infer_request_from_json(
    body: Mapping[str, Any], model: str, version: str | None
) -> InferenceRequest:
    inputs = body.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("request body needs a non-empty 'inputs' list")
    outputs = body.get("outputs", [])
    if not isinstance(outputs, list) or not all(
        isinstance(o, dict) and isinstance(o.get("name"), str) for o in outputs
    ):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    parameters = body.get("parameters", {})
    if not isinstance(parameters, dict):
        raise InvalidInput("'parameters' must be an object")
    request_id = body.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    return InferenceRequest(
        model=model,
        version=version,
        id=request_id,
        inputs=tuple(_decode_input(obj, i) for i, obj in enumerate(inputs)),
        outputs=tuple(o["name"] for o in outputs),
        parameters=parameters,
    )


def infer_response_to_json(resp: InferenceResponse) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model_name": resp.model,
        "model_version": resp.model_version,
        "outputs": [
            {
                "name": o.name,
                "datatype": o.datatype,
                "shape": list(o.shape),
                "data": np.ascontiguousarray(o.data).reshape(-1),
            }
            for o in resp.outputs
        ],
    }
    if resp.id:
        body["id"] = resp.id
    if resp.parameters:
        body["parameters"] = dict(resp.parameters)
    return body


def server_metadata_to_json(meta: ServerMetadata) -> dict[str, Any]:
    return {"name": meta.name, "version": meta.version, "extensions": list(meta.extensions)}


def model_metadata_to_json(meta: ModelMetadata) -> dict[str, Any]:
    def tensors(ts: Any) -> list[dict[str, Any]]:
        return [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in ts]

    return {
        "name": meta.name,
        "versions": list(meta.versions),
        "platform": meta.platform,
        "inputs": tensors(meta.inputs),
        "outputs": tensors(meta.outputs),
    }


# ---- client side ---------------------------------------------------------------------------


def infer_request_to_json(
    inputs: Mapping[str, np.ndarray[Any, Any]], outputs: tuple[str, ...] = (), request_id: str = ""
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "inputs": [
            {
                "name": name,
                "datatype": oip_datatype(np.asarray(a).dtype),
                "shape": list(np.shape(a)),
                "data": np.ascontiguousarray(a).reshape(-1),
            }
            for name, a in inputs.items()
        ]
    }
    if outputs:
        body["outputs"] = [{"name": n} for n in outputs]
    if request_id:
        body["id"] = request_id
    return body


def outputs_from_json(body: Mapping[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    return {
        o["name"]: np.asarray(o["data"], dtype=numpy_dtype(o["datatype"])).reshape(o["shape"])
        for o in body.get("outputs", [])
    }
