"""kloop's stubs beside the kserve SDK and tritonclient in one process of the co-install venv
(tests/slow/clients/test_coinstall.py), against a kloop server running from that venv.

Usage: coinstall_client.py {kserve|triton-grpc} GRPC_ADDRESS HTTP_ADDRESS TOKEN

kserve and tritonclient.grpc each register ``inference.*`` in protobuf's default pool from
their own file, so those two cannot share any process (``duplicate symbol
'inference.ServerLiveRequest'`` whichever is imported second; kloop is not involved, and the
last check of the ``kserve`` mode pins that down). So two processes of the same venv:

* ``kserve``: kserve and tritonclient.http first, then kloop's stubs: kloop's own gRPC stub,
  kserve's InferenceGRPCClient and InferenceRESTClient, and tritonclient's HTTP client call the
  server from this one process;
* ``triton-grpc``: kloop's stubs first, then tritonclient.grpc (and .http): kloop's stub and
  tritonclient's gRPC client.

kloop's stubs are imported with every warning an error and must come from the venv's
site-packages (the installed kloop, not this checkout). Prints a line with the versions this
process runs on, then one JSON line per check (cases.run); exits 1 if any failed.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent))  # cases, kserve_client, triton_client

DISTRIBUTIONS = ("kloop", "protobuf", "grpcio", "kserve", "tritonclient", "numpy", "torch")


def import_kloop_stubs() -> tuple[ModuleType, ModuleType]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pb = importlib.import_module("kloop.pb.inference_pb2")
        pb_grpc = importlib.import_module("kloop.pb.inference_pb2_grpc")
    assert "site-packages" in Path(pb.__file__ or "").parts, f"kloop is not the installed one: {pb.__file__}"
    return pb, pb_grpc


def kloop_checks(pb: ModuleType, pb_grpc: ModuleType,
                 grpc_address: str) -> list[tuple[str, Callable[[], None]]]:
    import grpc
    import numpy as np

    def infer() -> None:
        data = np.array([[1.5, -2.0, 0.25], [3.0, 0.0, -0.125]], np.float32)
        with grpc.insecure_channel(grpc_address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
            request = pb.ModelInferRequest(
                model_name="id-fp32", id="c1",
                inputs=[pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32",
                                                              shape=[2, 3])],
                raw_input_contents=[data.tobytes()],
            )
            reply = stub.ModelInfer(request, timeout=60)
        assert reply.id == "c1" and [o.name for o in reply.outputs] == ["y"], reply
        got = np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(2, 3)
        np.testing.assert_array_equal(got, data)

    return [("kloop stubs infer", infer)]


def kserve_and_tritonclient_grpc_clash() -> None:
    try:
        import tritonclient.grpc  # noqa: F401
    except TypeError as e:
        assert "duplicate symbol 'inference." in str(e), e
    else:
        raise AssertionError("tritonclient.grpc now imports beside kserve: run all clients from "
                             "one process (merge the two modes of coinstall_client.py)")


def main(mode: str, grpc_address: str, http_address: str, token: str) -> None:
    from cases import run

    checks: list[tuple[str, Callable[[], None]]] = []
    if mode == "kserve":
        import kserve  # noqa: F401
        import kserve_client
        import triton_client
        import tritonclient.http

        pb, pb_grpc = import_kloop_stubs()
        loop = asyncio.new_event_loop()
        checks += kloop_checks(pb, pb_grpc, grpc_address)
        checks += [(f"kserve grpc: {n}", c)
                   for n, c in kserve_client.make_checks("grpc", grpc_address, loop)]
        checks += [(f"kserve rest: {n}", c)
                   for n, c in kserve_client.make_checks("rest", http_address, loop)]
        checks += [(f"triton http: {n}", c)
                   for n, c in triton_client.make_checks("http", http_address, token)]
        checks.append(("kserve and tritonclient.grpc still clash", kserve_and_tritonclient_grpc_clash))
    elif mode == "triton-grpc":
        pb, pb_grpc = import_kloop_stubs()
        import triton_client
        import tritonclient.grpc
        import tritonclient.http  # noqa: F401

        checks += kloop_checks(pb, pb_grpc, grpc_address)
        checks += [(f"triton grpc: {n}", c)
                   for n, c in triton_client.make_checks("grpc", grpc_address, token)]
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    loaded = sorted(m for m in ("kloop.pb.inference_pb2", "kserve", "tritonclient.grpc",
                                "tritonclient.http") if m in sys.modules)
    print(json.dumps({"versions": {d: importlib.metadata.version(d) for d in DISTRIBUTIONS},
                      "modules": loaded}), flush=True)
    run(checks)


if __name__ == "__main__":
    main(*sys.argv[1:5])
