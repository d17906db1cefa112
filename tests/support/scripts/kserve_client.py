"""The kserve SDK's clients against a running kloop server (run in the clients venv).

Usage: kserve_client.py {grpc|rest} ADDRESS. ``InferenceGRPCClient`` sends raw contents;
``InferenceRESTClient`` runs each datatype with binary tensors and with JSON. kserve has no
BF16 (its numpy codec lacks it) and refuses FP16 in JSON itself, so those cases are not sent.
The SDK has no metadata calls: metadata goes through kserve's own generated gRPC stubs, and
plain GETs over REST."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable

import numpy as np
from cases import DATATYPES, assert_equal, model_name, run, sample

UNSUPPORTED = {"BF16"}  # kserve.utils.numpy_codec has no bfloat16


async def checks_grpc(address: str) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    import grpc
    from kserve import InferenceGRPCClient, InferInput, InferRequest
    from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
    from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc as pb_grpc

    client = InferenceGRPCClient(address, retries=0)

    async def health() -> None:
        assert await client.is_server_live() and await client.is_server_ready()
        assert await client.is_model_ready("id-fp32")

    async def metadata() -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            server = await stub.ServerMetadata(pb.ServerMetadataRequest())
            assert server.name == "kloop" and "binary_tensor_data" in server.extensions
            meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name="id-uint16"))
            assert meta.inputs[0].datatype == "UINT16" and list(meta.inputs[0].shape) == [-1, 3]

    def infer(datatype: str) -> Callable[[], Awaitable[None]]:
        async def check() -> None:
            data = sample(datatype)
            inp = InferInput("x", list(data.shape), datatype)
            inp.set_data_from_numpy(data)
            response = await client.infer(InferRequest(model_name(datatype), [inp],
                                                       request_id="k1"))
            assert response.id == "k1"
            assert_equal(response.outputs[0].as_numpy(), data)
        return check

    async def invalid() -> None:
        inp = InferInput("x", [3], "FP32")
        inp.set_data_from_numpy(np.zeros(3, np.float32))
        try:
            await client.infer(InferRequest("id-fp32", [inp]))
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
        else:
            raise AssertionError("a wrong shape was accepted")

    return [("health", health), ("metadata", metadata), ("invalid", invalid)] + [
        (f"infer {d}", infer(d)) for d in DATATYPES if d not in UNSUPPORTED
    ]


async def checks_rest(address: str) -> list[tuple[str, Callable[[], Awaitable[None]]]]:
    import httpx
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
    from kserve.protocol.infer_type import RequestedOutput

    base = f"http://{address}"
    client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))

    async def health() -> None:
        assert await client.is_server_live(base) and await client.is_server_ready(base)
        assert await client.is_model_ready(base, "id-fp32")

    async def metadata() -> None:
        async with httpx.AsyncClient(base_url=base) as http:
            server = (await http.get("/v2")).json()
            assert "model_repository" in server["extensions"]
            meta = (await http.get("/v2/models/id-bytes")).json()
            assert meta["inputs"] == [{"name": "x", "datatype": "BYTES", "shape": [-1]}]

    def infer(datatype: str, binary: bool) -> Callable[[], Awaitable[None]]:
        async def check() -> None:
            # The SDK decodes every BYTES output it reads as UTF-8, even binary ones: text only.
            data = sample(datatype, text=True)
            inp = InferInput("x", list(data.shape), datatype)
            inp.set_data_from_numpy(data, binary_data=binary)
            request = InferRequest(
                model_name(datatype), [inp], request_id="k2",
                request_outputs=[RequestedOutput("y", parameters={"binary_data": binary})],
            )
            response = await client.infer(base, request, model_name=model_name(datatype))
            assert_equal(response.outputs[0].as_numpy(), data)
        return check

    checks = [("health", health), ("metadata", metadata)]
    for d in DATATYPES:
        if d in UNSUPPORTED:
            continue
        checks.append((f"infer {d} binary", infer(d, True)))
        if d != "FP16":  # the SDK itself refuses FP16 in JSON
            checks.append((f"infer {d} json", infer(d, False)))
    return checks


def make_checks(protocol: str, address: str,
                loop: asyncio.AbstractEventLoop) -> list[tuple[str, Callable[[], None]]]:
    """The checks of one protocol, each run to completion on ``loop``."""
    make = checks_grpc if protocol == "grpc" else checks_rest
    checks = loop.run_until_complete(make(address))
    return [(name, lambda c=c: loop.run_until_complete(c())) for name, c in checks]


def main(protocol: str, address: str) -> None:
    run(make_checks(protocol, address, asyncio.new_event_loop()))


if __name__ == "__main__":
    main(*sys.argv[1:3])
