"""OIP v2 inference over gRPC (``ModelInfer`` with ``raw_input_contents``, as tritonclient
sends it), against ``--grpc-target``.

locust runs users as gevent greenlets; grpc's own threads would block the event loop, so
``init_gevent()`` runs on import, after locust's monkey patching and before any channel exists,
and only the synchronous API is used.
"""

from __future__ import annotations

import time

import grpc
import grpc.experimental.gevent
import numpy as np
from locust import User, task

from kloop.pb import inference_pb2 as pb
from kloop.pb import inference_pb2_grpc as pb_grpc
from loadtests.common import INPUT_NAME, SERVED, check_outputs, paced_wait, sample_batch

grpc.experimental.gevent.init_gevent()

REQUEST_TYPE = "grpc"
METHOD = "ModelInfer"


class RpcFailure(Exception):
    """A failed ModelInfer, as locust records it."""


class GrpcInferUser(User):
    wait_time = paced_wait

    def on_start(self) -> None:
        opts = self.environment.parsed_options
        self.model = opts.model
        self.batch = opts.batch
        self.timeout = opts.request_timeout
        self.rng = np.random.default_rng()
        self.channel = grpc.insecure_channel(opts.grpc_target)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def _request(self) -> pb.ModelInferRequest:
        images = sample_batch(self.rng, self.batch)
        req = pb.ModelInferRequest(model_name=self.model)
        req.inputs.add(name=INPUT_NAME, datatype="FP32", shape=images.shape)
        req.raw_input_contents.append(images.astype("<f4").tobytes())
        return req

    @task
    def infer(self) -> None:
        req = self._request()
        start = time.perf_counter()
        length = 0
        exception: Exception | None = None
        try:
            resp = self.stub.ModelInfer(req, timeout=self.timeout)
            length = resp.ByteSize()
            outputs = {o.name: (o.datatype, list(o.shape)) for o in resp.outputs}
            problem = check_outputs(outputs, self.batch)
            if problem:
                exception = RpcFailure(problem)
            else:
                SERVED.add("grpc", resp.model_version)
        except grpc.RpcError as e:
            # The status only: the full error text carries a timestamp, which would make every
            # failure a row of its own in locust's failure table.
            code = e.code() if isinstance(e, grpc.Call) else None
            details = e.details() if isinstance(e, grpc.Call) else str(e)
            exception = RpcFailure(f"{code.name if code else 'UNKNOWN'}: {details}")
        self.environment.events.request.fire(
            request_type=REQUEST_TYPE, name=METHOD,
            response_time=(time.perf_counter() - start) * 1000.0, response_length=length,
            exception=exception, context={},
        )
