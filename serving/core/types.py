"""Typed, protocol-neutral inference requests and responses, and the OIP datatype table.

The gRPC and HTTP adapters convert their wire formats into these and back; the core never sees
a protobuf or a JSON dict, so one dataplane serves both protocols identically.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from serving.core.errors import InvalidInput

# OIP datatype -> numpy dtype (little-endian: raw contents are little-endian on the wire).
_NUMPY: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("bool"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
# Keyed by (kind, itemsize) so any byte order of a dtype maps to its datatype.
_DATATYPE = {(dt.kind, dt.itemsize): name for name, dt in _NUMPY.items()}

SUPPORTED_DATATYPES = frozenset(_NUMPY)


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype for an OIP datatype; ``InvalidInput`` for one this server cannot carry."""
    try:
        return _NUMPY[datatype]
    except KeyError:
        if datatype == "BYTES":
            raise InvalidInput("datatype BYTES is not supported by this server yet") from None
        raise InvalidInput(
            f"unknown datatype {datatype!r}; expected one of {sorted(SUPPORTED_DATATYPES)}"
        ) from None


def oip_datatype(dtype: np.dtype[Any]) -> str:
    """The OIP datatype name for a numpy dtype (any byte order)."""
    dt = np.dtype(dtype)
    try:
        return _DATATYPE[(dt.kind, dt.itemsize)]
    except KeyError:
        raise InvalidInput(f"numpy dtype {dtype} has no Open Inference Protocol datatype") from None


@dataclasses.dataclass(frozen=True)
class InferInput:
    """One input tensor as the client declared it. ``data`` is flat or shaped; validation checks
    its element count against ``shape`` before the dataplane reshapes it."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]
    # Set by the raw-bytes decoders: how many bytes the client sent, so validation can name a
    # byte-size mismatch instead of a confusing element count.
    raw_nbytes: int | None = None


@dataclasses.dataclass(frozen=True)
class InferOutput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray[Any, Any]


@dataclasses.dataclass(frozen=True)
class InferenceRequest:
    model: str
    inputs: tuple[InferInput, ...]
    version: str | None = None  # None: route by the model's traffic weights
    id: str = ""
    outputs: tuple[str, ...] = ()  # requested outputs; empty means all of them
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class InferenceResponse:
    model: str
    model_version: str
    outputs: tuple[InferOutput, ...]
    id: str = ""
    parameters: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorMetadata, ...]
    outputs: tuple[TensorMetadata, ...]


@dataclasses.dataclass(frozen=True)
class ServerMetadata:
    name: str
    version: str
    extensions: tuple[str, ...]
