"""INT64 inputs end to end on a real server: typed ``int64_contents`` and ``raw_input_contents``
over gRPC, JSON over HTTP, against a model whose signature takes INT64 (the digits model takes
FP32 only)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from kloop.artifact import Registry, TensorSpec
from kloop.pb import inference_pb2 as pb
from kloop.pb import inference_pb2_grpc as pb_grpc
from serving.app import Server, ServerConfig
from serving.client import HttpClient, InferenceError


class Counter(torch.nn.Module):
    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tokens.sum(1), tokens.float().mean(1)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    program = torch.export.export(Counter(), (torch.zeros(2, 4, dtype=torch.int64),),
                                  dynamic_shapes={"tokens": {0: torch.export.Dim("batch", min=1)}})
    src = tmp_path / "src"
    src.mkdir()
    torch.export.save(program, str(src / "model.pt2"))
    Registry(tmp_path / "reg").publish(
        "counter", src, model_file="model.pt2", format="torch.export", torch_version=torch.__version__,
        inputs=(TensorSpec("tokens", "INT64", (-1, 4)),),
        outputs=(TensorSpec("sum", "INT64", (-1,)), TensorSpec("mean", "FP32", (-1,))),
        metrics={}, params={}, data_fingerprint="t", run_id="t")
    srv = Server(ServerConfig(registry=tmp_path / "reg", http_port=0, grpc_port=0))
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


TOKENS = np.array([[1, 2, 3, 4], [2**40, -5, 0, 7]], dtype=np.int64)


async def test_int64_over_grpc_typed_and_raw(server: Server) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.grpc_port}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        typed = pb.ModelInferRequest(model_name="counter")
        t = typed.inputs.add(name="tokens", datatype="INT64", shape=TOKENS.shape)
        t.contents.int64_contents.extend(TOKENS.ravel().tolist())
        resp = await stub.ModelInfer(typed)
        out = {o.name: o for o in resp.outputs}
        assert list(out["sum"].contents.int64_contents) == [10, 2**40 + 2]
        assert out["sum"].datatype == "INT64"

        raw = pb.ModelInferRequest(model_name="counter")
        raw.inputs.add(name="tokens", datatype="INT64", shape=TOKENS.shape)
        raw.raw_input_contents.append(TOKENS.tobytes())
        resp = await stub.ModelInfer(raw)
        names = [o.name for o in resp.outputs]
        sums = np.frombuffer(resp.raw_output_contents[names.index("sum")], dtype=np.int64)
        assert sums.tolist() == [10, 2**40 + 2]

        wrong = pb.ModelInferRequest(model_name="counter")
        wrong.inputs.add(name="tokens", datatype="FP32", shape=TOKENS.shape)
        wrong.raw_input_contents.append(TOKENS.astype(np.float32).tobytes())
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stub.ModelInfer(wrong)
        assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "INT64" in e.value.details()


async def test_int64_over_http_json(server: Server) -> None:
    client = HttpClient(f"http://127.0.0.1:{server.http_port}")
    try:
        result = await client.infer("counter", {"tokens": TOKENS})
        assert result.outputs["sum"].tolist() == [10, 2**40 + 2]
        assert result.outputs["mean"].dtype == np.float32
        with pytest.raises(InferenceError) as e:
            await client.infer("counter", {"tokens": TOKENS[:, :3]})
        assert e.value.code == "400" and "shape" in e.value.message
    finally:
        await client.close()
