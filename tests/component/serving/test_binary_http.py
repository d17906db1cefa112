"""Triton's binary tensor data extension on a real server: mixed JSON and binary inputs, the
choice of binary outputs (per output, ``binary_data_output``, none), and the errors for bodies
whose lengths do not add up."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from serving.app import Server
from tests.support.serving import reference, split_binary

HEADER = "Inference-Header-Content-Length"


async def _post(server: Server, header: dict[str, Any], blob: bytes,
                length: int | None = None) -> tuple[int, dict[str, str], bytes]:
    import aiohttp

    head = orjson.dumps(header)
    n = len(head) if length is None else length
    async with aiohttp.ClientSession() as s, s.post(
        f"http://127.0.0.1:{server.http_port}/v2/models/digits/infer", data=head + blob,
        headers={HEADER: str(n)},
    ) as r:
        return r.status, dict(r.headers), await r.read()


def _image_input(images: np.ndarray) -> dict[str, Any]:
    return {"name": "image", "datatype": "FP32", "shape": list(images.shape),
            "parameters": {"binary_data_size": images.nbytes}}


@pytest.mark.parametrize("outputs,params,binary", [
    ([{"name": "logits", "parameters": {"binary_data": True}}, {"name": "label"}], {}, {"logits"}),
    (None, {"binary_data_output": True}, {"logits", "label"}),
    (None, {}, set()),
    ([{"name": "label", "parameters": {"binary_data": False}}], {"binary_data_output": True}, set()),
])
async def test_binary_outputs_as_asked(server: Server, images: np.ndarray, outputs: Any,
                                       params: dict[str, Any], binary: set[str]) -> None:
    header: dict[str, Any] = {"inputs": [_image_input(images)], "parameters": params}
    if outputs is not None:
        header["outputs"] = outputs
    status, headers, body = await _post(server, header, images.tobytes())
    assert status == 200, body
    if not binary:
        assert HEADER not in headers and headers["Content-Type"].startswith("application/json")
        answer, blobs = orjson.loads(body), {}
    else:
        assert headers["Content-Type"] == "application/octet-stream"
        answer, blobs = split_binary(headers, body)
    assert set(blobs) == binary
    logits, label = reference(int(answer["model_version"]), images)  # the seed is the version
    got = {}
    for out in answer["outputs"]:
        dtype = np.float32 if out["datatype"] == "FP32" else np.int64
        raw = blobs.get(out["name"])
        data = np.frombuffer(raw, dtype) if raw is not None else np.asarray(out["data"], dtype)
        got[out["name"]] = data.reshape(out["shape"])
    np.testing.assert_allclose(got.get("logits", logits), logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got.get("label", label), label)


async def test_json_and_binary_inputs_mix(server: Server, images: np.ndarray) -> None:
    """An input with ``data`` next to one with ``binary_data_size`` (here: the only input is
    JSON inside a binary-format request with an empty binary part)."""
    header = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(images.shape),
                          "data": images.ravel().tolist()}]}
    status, _, body = await _post(server, header, b"")
    assert status == 200, body


@pytest.mark.parametrize("blob_delta,length_delta,fragment", [
    (-4, 0, "runs past the body's end"),
    (+4, 0, "binary bytes that no input"),
    (0, +10_000, HEADER),
    (0, -3, "not valid JSON"),
])
async def test_wrong_lengths_are_400(server: Server, images: np.ndarray, blob_delta: int,
                                     length_delta: int, fragment: str) -> None:
    header = {"inputs": [_image_input(images)]}
    blob = images.tobytes()
    blob = blob[:blob_delta] if blob_delta < 0 else blob + b"\0" * blob_delta
    head_len = len(orjson.dumps(header))
    status, _, body = await _post(server, header, blob, head_len + length_delta)
    assert status == 400 and fragment in orjson.loads(body)["error"], body
