"""HTTP bodies of the OIP v2 REST API <-> the core's types (the HTTP twin of
``serving.grpc.converters``).

Two request formats, told apart by one header:

* JSON: tensor ``data`` as flat or nested row-major lists (numpy converts a whole list at
  once); BYTES elements as strings; BF16 has no JSON input (send it binary). Large bodies are
  parsed with simdjson, whose flat float arrays go straight into a numpy buffer: a 3x64x64
  image as JSON text (91 KB) decodes in 0.19 ms instead of 0.75 ms with orjson and a list of
  12 288 Python floats. Small bodies, and anything simdjson turns down, go through orjson, so
  both parsers give the same answers and the same errors.
* Triton's binary tensor data extension (what tritonclient sends by default): the body is a
  JSON header of ``Inference-Header-Content-Length`` bytes followed by the binary tensors of
  every input whose ``parameters.binary_data_size`` is set, in input order, raw as gRPC's
  ``raw_input_contents`` (``serving.core.types``). The binary part is decoded with
  ``np.frombuffer`` on slices of the body: no copy, no Python loop over elements.

Responses are JSON unless binary outputs were asked for (``parameters.binary_data: true`` on an
output, or ``parameters.binary_data_output: true`` on the request for every output not named
otherwise); then the same layout as a binary request comes back, with the header's length in
``Inference-Header-Content-Length``. JSON is written by orjson straight from numpy
(``OPT_SERIALIZE_NUMPY``); BF16 outputs appear in JSON as their exact float values.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
import simdjson

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

HEADER_LENGTH = "Inference-Header-Content-Length"
BINARY_CONTENT_TYPE = "application/octet-stream"
_DUMPS_OPTIONS = orjson.OPT_SERIALIZE_NUMPY


def dumps(body: Any) -> bytes:
    return orjson.dumps(body, option=_DUMPS_OPTIONS)


def loads_object(raw: bytes | memoryview) -> dict[str, Any]:
    """Parse a request body that must be a JSON object; ``InvalidInput`` otherwise."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise InvalidInput(f"request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise InvalidInput(f"request body must be a JSON object, got {type(body).__name__}")
    return body


# Bodies at least this long are parsed with simdjson (below it orjson is faster per call: the
# whole tiny-MLP request is 0.5 KB).
SIMDJSON_FROM_BYTES = 8 << 10
_FLOAT_DATATYPES = frozenset({"FP16", "FP32", "FP64"})
_parsers = threading.local()  # a simdjson Parser holds one document at a time: one per thread


def loads_request(raw: bytes | memoryview) -> dict[str, Any]:
    """``loads_object`` for infer request headers: the same dict, except that the ``data`` of
    an FP16/FP32/FP64 input given as a flat list of numbers may come back as a float64 array
    (decoded by simdjson without a Python float per element) when the body has at least
    ``SIMDJSON_FROM_BYTES`` bytes."""
    if len(raw) >= SIMDJSON_FROM_BYTES:
        body = _loads_numeric(raw)
        if body is not None:
            return body
    return loads_object(raw)  # small, or simdjson refused it: orjson decides and words errors


def _loads_numeric(raw: bytes | memoryview) -> dict[str, Any] | None:
    """simdjson's parse with float arrays as numpy; None when it cannot (orjson then decides)."""
    parser = getattr(_parsers, "parser", None)
    if parser is None:
        parser = _parsers.parser = simdjson.Parser()
    text = bytes(raw)
    try:
        doc = parser.parse(text)
        if not isinstance(doc, simdjson.Object):
            return None
        body: dict[str, Any] = {}
        for key in _unique_keys(doc):
            value = doc[key]
            if key == "inputs" and isinstance(value, simdjson.Array):
                body[key] = [_input_object(obj) for obj in value]
            else:
                body[key] = _plain(value)
    except (ValueError, TypeError, LookupError, RuntimeError):
        # invalid JSON, integers past 64 bits, bad UTF-8 (a ValueError), a repeated key, a key
        # with a NUL that simdjson lists but cannot look up: orjson's verdict stands
        return None
    # as_buffer flattens nested lists, ragged ones too, which numpy (the orjson path) refuses:
    # every '[' in the body must be a list seen here or the start of a flat float array. A '['
    # inside a string only sends the body the slow way.
    if text.count(b"[") != _arrays_in(body):
        return None
    return body


def _unique_keys(obj: Any) -> list[str]:
    """An object's keys (keys() then [key]: items() would convert every value). A repeated key
    is refused: [key] finds the first, where orjson (and as_dict) keep the last."""
    keys = list(obj.keys())
    if len(set(keys)) != len(keys):
        raise ValueError("repeated key")
    return keys


def _arrays_in(value: Any) -> int:
    if isinstance(value, np.ndarray):
        return 1
    if isinstance(value, list):
        return 1 + sum(_arrays_in(v) for v in value if isinstance(v, (list, dict, np.ndarray)))
    if isinstance(value, dict):
        return sum(_arrays_in(v) for v in value.values())
    return 0


def _input_object(obj: Any) -> Any:
    if not isinstance(obj, simdjson.Object):
        return _plain(obj)
    out: dict[str, Any] = {}
    for key in _unique_keys(obj):
        value = obj[key]
        if (key == "data" and isinstance(value, simdjson.Array)
                and obj.get("datatype") in _FLOAT_DATATYPES):
            out[key] = _float_array(value)
        else:
            out[key] = _plain(value)
    return out


def _float_array(array: Any) -> Any:
    """A flat list of JSON numbers as float64; anything else (booleans, strings, nulls among
    them) as Python objects, for ``_json_data`` to judge as it judges orjson's."""
    try:
        return np.frombuffer(array.as_buffer(of_type="d"), dtype=np.float64)
    except (ValueError, TypeError):  # an element that is not a number
        return array.as_list()


def _plain(value: Any) -> Any:
    if isinstance(value, simdjson.Object):
        return value.as_dict()
    if isinstance(value, simdjson.Array):
        return value.as_list()
    return value


def parse_header_length(value: str | None, body_length: int) -> int | None:
    """The JSON header's length from the ``Inference-Header-Content-Length`` header (None when
    absent: the whole body is JSON); ``InvalidInput`` when it is not in 0..len(body)."""
    if value is None:
        return None
    text = value.strip()
    if not (text.isascii() and text.isdigit()):
        raise InvalidInput(f"{HEADER_LENGTH} must be a non-negative integer, got {value!r}")
    n = int(text)
    if n > body_length:
        raise InvalidInput(f"{HEADER_LENGTH} is {n}, but the body has only {body_length} bytes")
    return n


@dataclasses.dataclass(frozen=True)
class OutputFormat:
    """Which outputs go back as binary data (Triton's binary tensor data extension)."""

    binary: Mapping[str, bool] = dataclasses.field(default_factory=dict)  # per named output
    binary_default: bool = False  # ``binary_data_output``: outputs not named above

    def is_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


# ---- server side: requests -----------------------------------------------------------------


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in obj:
        raise InvalidInput(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidInput(f"{where}: field {key!r} must be a {kind.__name__}")
    return value


def _parameters(obj: Mapping[str, Any], where: str) -> dict[str, Any]:
    params = obj.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidInput(f"{where}: 'parameters' must be an object")
    return params


def _json_data(data: Any, datatype: str, where: str) -> np.ndarray[Any, Any]:
    if datatype in RAW_ONLY_DATATYPES:
        raise InvalidInput(f"{where}: {datatype} has no JSON form; send it as binary data "
                           f"(parameters.binary_data_size and {HEADER_LENGTH})")
    if datatype == "BYTES":
        try:
            flat = np.array(data, dtype=object).reshape(-1)
        except ValueError as e:  # ragged nesting
            raise InvalidInput(f"{where}: data is not a (nested) list of strings: {e}") from e
        return as_bytes_array([to_bytes(x) for x in flat])
    dtype = numpy_dtype(datatype)
    try:
        if dtype.kind not in "iub":  # floats: JSON integers are exact floats too
            # A finite number past the datatype's range (1e300 for an FP32) would become inf:
            # refused like any value that does not fit, never a silent cast.
            with np.errstate(over="raise"):
                if isinstance(data, np.ndarray):  # already decoded by loads_request (simdjson)
                    return data.astype(dtype, copy=False)
                return np.asarray(data, dtype=dtype).reshape(-1)
        # Integers and BOOL: decode as JSON gave them, then narrow, so that 1.5 for an INT64 or
        # 2 for a BOOL is refused instead of silently truncated (numpy's dtype= would cast).
        wide = np.asarray(data)
    except FloatingPointError as e:
        raise InvalidInput(f"{where}: a value is out of range for {datatype}") from e
    except (TypeError, ValueError, OverflowError) as e:
        raise InvalidInput(f"{where}: data is not a (nested) list of {datatype} values: {e}") from e
    if dtype.kind in "iu" and wide.dtype.kind not in "iu" and wide.size:
        wide = _exact_integers(data, datatype, where)  # e.g. UINT64 values past int64
    wanted = "b" if dtype.kind == "b" else "iu"
    if wide.size and wide.dtype.kind not in wanted:
        what = "true/false" if dtype.kind == "b" else "integers"
        raise InvalidInput(f"{where}: datatype {datatype} needs {what}, got {wide.dtype} values")
    try:
        narrow = wide.astype(dtype).reshape(-1)
    except OverflowError as e:
        raise InvalidInput(f"{where}: values out of range for datatype {datatype}") from e
    if dtype.kind in "iu" and not np.array_equal(narrow, wide.reshape(-1)):
        raise InvalidInput(f"{where}: values out of range for datatype {datatype}")
    return narrow


def _exact_integers(data: Any, datatype: str, where: str) -> np.ndarray[Any, Any]:
    """JSON integers numpy could not hold as int64 (it fell back to float64, which would round
    them): kept exact as Python ints, for the narrowing check. Anything else is refused."""
    flat = np.asarray(data, dtype=object).reshape(-1)
    if not all(type(v) is int for v in flat):
        raise InvalidInput(f"{where}: datatype {datatype} needs integers")
    try:
        return np.array(flat.tolist(), dtype=numpy_dtype(datatype))
    except OverflowError as e:
        raise InvalidInput(f"{where}: values out of range for datatype {datatype}") from e


class _Binary:
    """The binary part of a request, handed out in input order."""

    def __init__(self, data: memoryview | None) -> None:
        self._data = data
        self._offset = 0

    def take(self, size: Any, where: str) -> memoryview:
        if self._data is None:
            raise InvalidInput(f"{where}: binary_data_size is set, but the request has no "
                               f"binary part ({HEADER_LENGTH} header missing)")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise InvalidInput(f"{where}: binary_data_size must be a non-negative integer")
        end = self._offset + size
        if end > len(self._data):
            raise InvalidInput(f"{where}: binary_data_size {size} runs past the body's end "
                               f"({len(self._data) - self._offset} binary bytes left)")
        chunk = self._data[self._offset:end]
        self._offset = end
        return chunk

    def check_consumed(self) -> None:
        if self._data is not None and self._offset != len(self._data):
            raise InvalidInput(f"the body has {len(self._data) - self._offset} binary bytes "
                               "that no input's binary_data_size accounts for")


def _decode_input(obj: Any, index: int, binary: _Binary) -> InferInput:
    if not isinstance(obj, dict):
        raise InvalidInput(f"inputs[{index}] must be an object")
    name = _field(obj, "name", str, f"inputs[{index}]")
    where = f"input {name!r}"
    datatype = _field(obj, "datatype", str, where)
    shape = _field(obj, "shape", list, where)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise InvalidInput(f"{where}: shape must be a list of integers, got {shape}")
    params = _parameters(obj, where)
    try:
        numpy_dtype(datatype)
    except InvalidInput as e:
        raise InvalidInput(f"{where}: {e.message}") from None
    if "binary_data_size" in params:
        if "data" in obj:
            raise InvalidInput(f"{where}: has both 'data' and parameters.binary_data_size")
        chunk = binary.take(params["binary_data_size"], where)
        try:
            data = decode_raw(datatype, chunk)
        except InvalidInput as e:
            raise InvalidInput(f"{where}: {e.message}") from None
        return InferInput(name, datatype, tuple(shape), data, raw_nbytes=len(chunk),
                          parameters=params)
    if "data" not in obj:
        raise InvalidInput(f"{where}: missing field 'data' (or parameters.binary_data_size)")
    return InferInput(name, datatype, tuple(shape), _json_data(obj["data"], datatype, where),
                      parameters=params)


def _output_format(outputs: list[Any], parameters: Mapping[str, Any]) -> OutputFormat:
    binary: dict[str, bool] = {}
    for i, o in enumerate(outputs):
        if not isinstance(o, dict) or not isinstance(o.get("name"), str):
            raise InvalidInput("'outputs' must be a list of objects with a 'name'")
        flag = _parameters(o, f"outputs[{i}]").get("binary_data")
        if flag is not None:
            if not isinstance(flag, bool):
                raise InvalidInput(f"outputs[{i}]: parameters.binary_data must be a boolean")
            binary[o["name"]] = flag
    default = parameters.get("binary_data_output", False)
    if not isinstance(default, bool):
        raise InvalidInput("parameters.binary_data_output must be a boolean")
    return OutputFormat(binary=binary, binary_default=default)


def decode_infer_request(
    body: bytes, header_length: int | None, model: str, version: str | None
) -> tuple[InferenceRequest, OutputFormat]:
    """An infer request body, JSON or binary (``header_length`` from ``parse_header_length``),
    and how its answer is to be encoded. Raises only ``InvalidInput``."""
    view = memoryview(body)
    if header_length is None:
        header, binary = loads_request(view), _Binary(None)
    else:
        header, binary = loads_request(view[:header_length]), _Binary(view[header_length:])
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidInput("request body needs a non-empty 'inputs' list")
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidInput("'outputs' must be a list of objects with a 'name'")
    parameters = _parameters(header, "request")
    fmt = _output_format(outputs, parameters)
    request_id = header.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInput("'id' must be a string")
    decoded = tuple(_decode_input(obj, i, binary) for i, obj in enumerate(inputs))
    binary.check_consumed()
    request = InferenceRequest(
        model=model, version=version, id=request_id, inputs=decoded,
        outputs=tuple(o["name"] for o in outputs), parameters=parameters,
    )
    return request, fmt


def infer_request_from_json(
    body: Mapping[str, Any], model: str, version: str | None
) -> InferenceRequest:
    """A parsed JSON request (no binary part)."""
    return decode_infer_request(dumps(body), None, model, version)[0]


# ---- server side: responses ----------------------------------------------------------------


def _json_values(datatype: str, data: np.ndarray[Any, Any], name: str) -> Any:
    flat = np.ascontiguousarray(data).reshape(-1)
    if datatype == "BF16":
        return bf16_to_float32(flat)
    if datatype == "BYTES":
        try:
            return [to_bytes(x).decode() for x in flat]
        except UnicodeDecodeError:
            raise InvalidInput(f"output {name!r} holds bytes that are not UTF-8, which JSON "
                               "cannot carry: request it with parameters.binary_data") from None
    return flat


def encode_infer_response(
    resp: InferenceResponse, fmt: OutputFormat = OutputFormat()
) -> tuple[bytes, int | None]:
    """The response body and, when it carries binary outputs, the JSON header's length (the
    ``Inference-Header-Content-Length`` to send); None for a plain JSON body."""
    chunks: list[bytes] = []
    outputs = []
    for o in resp.outputs:
        entry: dict[str, Any] = {"name": o.name, "datatype": o.datatype, "shape": list(o.shape)}
        params = dict(o.parameters)
        if fmt.is_binary(o.name):
            raw = encode_raw(o.datatype, o.data)
            params["binary_data_size"] = len(raw)
            chunks.append(raw)
        else:
            entry["data"] = _json_values(o.datatype, o.data, o.name)
        if params:
            entry["parameters"] = params
        outputs.append(entry)
    body: dict[str, Any] = {
        "model_name": resp.model, "model_version": resp.model_version, "outputs": outputs,
    }
    if resp.id:
        body["id"] = resp.id
    if resp.parameters:
        body["parameters"] = dict(resp.parameters)
    header = dumps(body)
    if not chunks:
        return header, None
    return b"".join([header, *chunks]), len(header)


def infer_response_to_json(resp: InferenceResponse) -> dict[str, Any]:
    body: dict[str, Any] = orjson.loads(encode_infer_response(resp)[0])  # an object: we wrote it
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
    """A JSON request body; object arrays are sent as BYTES (elements as UTF-8 strings)."""
    entries = []
    for name, a in inputs.items():
        array = np.asarray(a)
        datatype = oip_datatype(array.dtype)
        flat = np.ascontiguousarray(array).reshape(-1)
        data: Any = [to_bytes(x).decode() for x in flat] if datatype == "BYTES" else flat
        entries.append({"name": name, "datatype": datatype, "shape": list(array.shape),
                        "data": data})
    body: dict[str, Any] = {"inputs": entries}
    if outputs:
        body["outputs"] = [{"name": n} for n in outputs]
    if request_id:
        body["id"] = request_id
    return body


def outputs_from_json(body: Mapping[str, Any]) -> dict[str, np.ndarray[Any, Any]]:
    out = {}
    for o in body.get("outputs", []):
        datatype = o["datatype"]
        if datatype == "BYTES":
            data = as_bytes_array([to_bytes(x) for x in o["data"]])
        elif datatype == "BF16":
            data = np.asarray(o["data"], dtype=np.float32)
        else:
            data = np.asarray(o["data"], dtype=numpy_dtype(datatype))
        out[o["name"]] = data.reshape(o["shape"])
    return out
