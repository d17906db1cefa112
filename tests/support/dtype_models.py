"""One tiny exported model per OIP datatype, and the test data each is fed.

Each model ``id-<datatype>`` (``id-fp32``, ``id-bytes``, ...) takes ``x`` and answers ``y``, a
copy made by torch inside the exported program, so a value survives only if the server decoded,
handed to torch, read back and encoded it exactly. Numeric and BOOL models take ``[-1, 3]``;
BYTES takes ``[-1]`` (the model sees ``uint8 [batch, width]``, see ``serving.core.tensors``).

Test data is in the core's carrier form (``serving.core.types``): BF16 as ``uint16`` bit
patterns, BYTES as an object array of ``bytes``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from kloop.artifact import Registry, TensorSpec
from serving.core.types import as_bytes_array, float32_to_bf16

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BF16", "BYTES")
_TORCH = {
    "BOOL": torch.bool, "UINT8": torch.uint8, "UINT16": torch.uint16, "UINT32": torch.uint32,
    "UINT64": torch.uint64, "INT8": torch.int8, "INT16": torch.int16, "INT32": torch.int32,
    "INT64": torch.int64, "FP16": torch.float16, "FP32": torch.float32, "FP64": torch.float64,
    "BF16": torch.bfloat16, "BYTES": torch.uint8,
}


def model_name(datatype: str) -> str:
    return f"id-{datatype.lower()}"


class Copy(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


def publish_all(root: Path, work: Path, datatypes: tuple[str, ...] = DATATYPES) -> Registry:
    registry = Registry(root)
    for datatype in datatypes:
        batch = torch.export.Dim("batch", min=1, max=4096)
        if datatype == "BYTES":
            example = torch.zeros(2, 5, dtype=torch.uint8)
            dims = {"x": {0: batch, 1: torch.export.Dim("width", min=1, max=1 << 20)}}
            shape: tuple[int, ...] = (-1,)
        else:
            example = torch.zeros(2, 3, dtype=_TORCH[datatype])
            dims = {"x": {0: batch}}
            shape = (-1, 3)
        program = torch.export.export(Copy(), (example,), dynamic_shapes=dims)
        src = work / datatype
        src.mkdir()
        torch.export.save(program, str(src / "model.pt2"))
        registry.publish(
            model_name(datatype), src, model_file="model.pt2", format="torch.export",
            torch_version=torch.__version__, inputs=(TensorSpec("x", datatype, shape),),
            outputs=(TensorSpec("y", datatype, shape),), metrics={}, params={},
            data_fingerprint="t", run_id="t",
        )
    return registry


def sample(datatype: str) -> np.ndarray[Any, Any]:
    """Data for ``x`` in carrier form, including each integer type's extremes."""
    if datatype == "BYTES":  # non-UTF-8, an empty element; none ends in NUL (see tensors)
        return as_bytes_array([b"hello", b"", b"\x00\xff\xfebin"])
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype == "BF16":
        return float32_to_bf16(np.array([[1.5, -2.0, 0.25], [3.0e38, -1.0e-3, 0.0]], np.float32))
    dtype = np.dtype(datatype.lower().replace("fp", "float"))
    if dtype.kind == "f":
        return np.array([[1.5, -2.25, 0.0], [65504.0, -0.125, 3.0]], dtype=dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, info.max, 0], [1, info.max - 1, 7]], dtype=dtype)


def sample_text() -> np.ndarray[Any, Any]:
    """BYTES data that JSON can carry (UTF-8)."""
    return as_bytes_array([b"hello", b"", "h\u00e9llo w\u00f6rld".encode()])
