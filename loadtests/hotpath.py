"""The Python half of one gRPC ``ModelInfer``, measured in process: CPU per request.

What the event loop spends on each call of the native gRPC front end's general path
(``serving.grpc.native.server``; the common request takes the fast lane instead, which leaves Python
only the batches, and is measured under load in docs/serving.md): parse the request, convert,
route, validate, queue, the (inline) batch's forward pass divided over its requests, answer,
serialize, metrics. The front end itself is replaced by a stand-in
that takes the answers, so no socket, no load generator and no C++ thread share the CPU: the
figure moves far less with a noisy box than a load test's req/s does, which makes it the one to
compare two versions of the hot path by (run both, alternately, a few times).

``concurrency`` requests are handed to the loop at once, as one eventfd wake-up hands them over
under load, and the next group starts when all are answered.

    python -m loadtests.hotpath                 # tiny MLP (64-128-10), 32 and 8 at once, 3 s
    python -m loadtests.hotpath --concurrency 1,8,32 --seconds 5

Needs the native front end built (``python -m serving.grpc.native.build``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kloop.artifact import Registry
from kloop.pb import inference_pb2 as pb
from loadtests.benchmark.models import INPUT_NAME, publish_module
from serving.app import Server, ServerConfig
from serving.grpc import native

MODEL = "tiny"
METHOD = "/inference.GRPCInferenceService/ModelInfer"


class _Answers:
    """Stands in for the C++ front end: counts answers, fails on an error status."""

    def __init__(self) -> None:
        self.count = 0

    def respond(self, handle: int, code: int, details: str, payload: bytes) -> bool:
        if code:
            raise RuntimeError(f"call {handle} answered with status {code}: {details}")
        self.count += 1
        return True


def publish_tiny(root: Path) -> None:
    """The benchmark's tiny MLP shape (64 -> 128 -> 10), random weights (seed 0): built here,
    so this needs no peer harness."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10)).eval()
    publish_module(Registry(root), MODEL, model, (64,), params={"seed": 0})


def request_bytes() -> bytes:
    req = pb.ModelInferRequest(model_name=MODEL)
    tensor = req.inputs.add(name=INPUT_NAME, datatype="FP32")
    tensor.shape.extend([1, 64])
    req.raw_input_contents.append(np.zeros(64, np.float32).tobytes())
    return req.SerializeToString()


async def measure(registry: Path, levels: list[int], seconds: float) -> list[tuple[int, float, int]]:
    server = Server(ServerConfig(registry=registry, models=(MODEL,), http_port=0, grpc_port=0,
                                 grpc_server="native"))
    await server.start()
    front = server._native  # the measured object: its per-call coroutine, _run
    assert front is not None
    real, answers = front._front, _Answers()
    front._front = answers  # type: ignore[assignment]
    body, entry = request_bytes(), front._methods[METHOD]
    rows = []
    try:
        async def group(k: int) -> None:
            await asyncio.gather(*(front._run(i, entry, body, None)
                                   for i in range(k)))

        for _ in range(300):  # warm-up: the batcher measures the model and goes inline
            await group(max(levels))
        for k in levels:
            done, start, cpu = 0, time.perf_counter(), time.thread_time()
            while time.perf_counter() - start < seconds:
                await group(k)
                done += k
            rows.append((k, (time.thread_time() - cpu) / done * 1e6, done))
    finally:
        front._front = real
        await server.stop()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtests.hotpath", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="32,8", help="requests handed over at once")
    ap.add_argument("--seconds", type=float, default=3.0, help="per concurrency level")
    a = ap.parse_args(argv)
    if native.grpc_front is None:
        print(f"hotpath: {native.UNAVAILABLE}", file=sys.stderr)
        return 2
    levels = [int(x) for x in a.concurrency.split(",") if x]
    with tempfile.TemporaryDirectory() as tmp:
        publish_tiny(Path(tmp))
        run = asyncio.run
        try:
            import uvloop  # the server's own loop (kloop serve runs on it where installed)

            run = uvloop.run
        except ImportError:
            pass
        rows = run(measure(Path(tmp), levels, a.seconds))
    print("| requests at once | event-loop CPU per request | requests |")
    print("|---:|---:|---:|")
    for k, us, done in rows:
        print(f"| {k} | {us:.1f} µs | {done} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
