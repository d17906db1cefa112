"""kloop's generated stubs on whatever protobuf and grpcio the running python has.

Run as a script by tests/slow/packaging/test_stub_runtimes.py (in the floor venv, and in the dev
venv), with ``kloop`` importable and nothing else of kloop needed (no torch). Checks, with every
warning an error: the stubs import; a ModelInferRequest round-trips through the wire format;
one real gRPC server on 127.0.0.1, with a servicer registered through kloop's generated
``add_GRPCInferenceServiceServicer_to_server``, answers kloop's generated stub and a call by the
standard method path. Prints one JSON line: the versions it ran on. Exits non-zero on failure.
"""

from __future__ import annotations

import warnings

warnings.simplefilter("error")  # before any import: a runtime warning about the gencode fails

import json  # noqa: E402
import struct  # noqa: E402
from concurrent import futures  # noqa: E402

import grpc  # noqa: E402
from google.protobuf import __version__ as protobuf_version  # noqa: E402
from google.protobuf.internal import api_implementation  # noqa: E402

from kloop.pb import inference_pb2 as pb  # noqa: E402
from kloop.pb import inference_pb2_grpc as pb_grpc  # noqa: E402


class Echo(pb_grpc.GRPCInferenceServiceServicer):
    """Answers ModelInfer with its inputs renamed ``y``; ServerLive with live."""

    def ServerLive(self, request: pb.ServerLiveRequest, context: object) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    def ModelInfer(self, request: pb.ModelInferRequest, context: object) -> pb.ModelInferResponse:
        return pb.ModelInferResponse(
            model_name=request.model_name, id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(name="y", datatype=t.datatype,
                                                             shape=t.shape)
                     for t in request.inputs],
            raw_output_contents=list(request.raw_input_contents),
        )


def request() -> pb.ModelInferRequest:
    tensor = pb.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=[1, 3])
    tensor.parameters["note"].string_param = "t"
    msg = pb.ModelInferRequest(model_name="echo", id="r1", inputs=[tensor],
                               raw_input_contents=[struct.pack("<3f", 1.5, -2.0, 0.25)])
    msg.parameters["priority"].int64_param = 7
    return msg


def main() -> None:
    sent = request()
    back = pb.ModelInferRequest.FromString(sent.SerializeToString())
    assert back == sent, back
    assert back.parameters["priority"].int64_param == 7
    assert back.inputs[0].parameters["note"].string_param == "t"
    assert list(back.inputs[0].shape) == [1, 3]

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=30).live
            reply = stub.ModelInfer(sent, timeout=30)
            assert (reply.model_name, reply.id) == ("echo", "r1"), reply
            assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [
                ("y", "FP32", [1, 3])]
            assert struct.unpack("<3f", reply.raw_output_contents[0]) == (1.5, -2.0, 0.25)
            # what Triton's and KServe's clients call: the standard path, not kloop.inference.*
            by_path = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            assert by_path(sent, timeout=30) == reply
    finally:
        server.stop(None)
    print(json.dumps({"protobuf": protobuf_version, "grpcio": grpc.__version__,
                      "protobuf_implementation": api_implementation.Type()}))


if __name__ == "__main__":
    main()
