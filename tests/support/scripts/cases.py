"""Shared by the client scripts, which run in the clients' own venv: no kloop, no torch, only
numpy. The server hosts ``id-<datatype>`` models that copy ``x`` to ``y`` (see
tests/support/dtype_models.py); these are the values each client sends in its own types (BF16
as float32 values exactly representable in bfloat16, as tritonclient takes them)."""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np

DATATYPES = ("BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
             "FP16", "FP32", "FP64", "BF16", "BYTES")


def model_name(datatype: str) -> str:
    return f"id-{datatype.lower()}"


def sample(datatype: str, text: bool = False) -> np.ndarray[Any, Any]:
    if datatype == "BYTES":
        items = [b"hello", b"", "h\u00e9llo".encode()] if text else [b"hello", b"", b"\x00\xffbin"]
        arr = np.empty(3, dtype=object)
        arr[:] = items
        return arr
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    if datatype == "BF16":
        return np.array([[1.5, -2.0, 0.25], [2.0**100, -0.0009765625, 0.0]], np.float32)
    dtype = np.dtype(datatype.lower().replace("fp", "float"))
    if dtype.kind == "f":
        return np.array([[1.5, -2.25, 0.0], [65504.0, -0.125, 3.0]], dtype=dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, info.max, 0], [1, info.max - 1, 7]], dtype=dtype)


def run(checks: list[tuple[str, Callable[[], None]]]) -> None:
    """Run every check, print one JSON line per result, exit 1 if any failed."""
    failed = 0
    for name, check in checks:
        try:
            check()
            print(json.dumps({"check": name, "ok": True}), flush=True)
        except Exception:  # noqa: BLE001 - report every failure, not only the first
            failed += 1
            print(json.dumps({"check": name, "ok": False, "error": traceback.format_exc()}),
                  flush=True)
    sys.exit(1 if failed else 0)


def assert_equal(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    assert got.shape == want.shape, (got.shape, want.shape)
    if want.dtype == object:  # BYTES: a client may hand JSON strings back as str
        got = np.array([x.encode() if isinstance(x, str) else x for x in got.ravel()], object)
        np.testing.assert_array_equal(got, want.ravel())
        return
    np.testing.assert_array_equal(got.astype(want.dtype), want)
