"""The GPU measurement of the serving path, end to end in one call on the device machine.

For each model (the ResNet-18-style CNN on 3x64x64 and, where torchvision is installed,
ResNet-50 on 3x224x224; random weights, fixed seed) it measures, in one script:

1. the in-process limit: the model alone on the GPU in the chosen dtype, inputs already on the
   device, at the largest batch (what the chip can do without any server);
2. the gRPC limit: trivial grpc.aio servers (a fixed reply, no model) receiving the same
   request bytes, with 1 and with ``--workers`` processes sharing the port;
3. kloop: ``python -m serving --device cuda --dtype bf16`` with CUDA graphs at the preferred
   batch sizes and dynamic batching, with 1 and with ``--workers`` processes;

all driven by the same closed-loop gRPC load generator (processes x concurrent calls, one
channel per process, pre-serialised ``ModelInfer`` requests with ``raw_input_contents``), and
prints one table: kloop's req/s against the lower of the two limits (target: >= 50 %).

On the device machine (repo root; the ``../shared`` harness does not travel there, so the CNN
here is torchvision's ResNet-18 with 10 classes, the same architecture family):

    PYTHONPATH=. PYTHONUNBUFFERED=1 python3 loadtests/gpu_bench.py --seconds 8 --workers 4

Its image has torch (CUDA), torchvision, grpcio, aiohttp, prometheus-client, uvloop and numpy;
carry what it lacks as wheels (device README): at least ``orjson``, ``pysimdjson`` and a ``protobuf`` >= the
version kloop's stubs were generated with (``python -m pip download --no-deps --only-binary
=:all: --python-version 3.12 --platform manylinux2014_x86_64 -d .whl orjson pysimdjson protobuf``).
That image has no gRPC C++ library, so the servers there speak gRPC through grpc.aio (``auto``
falls back; the server log says ``grpc (grpc.aio)``): the native front end is measured on CPU
machines only until an image with ``libgrpc++`` is lent.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # torch is imported where it is used: the script starts fast on any machine
    from torch import nn


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- models ---------------------------------------------------------------------------------


def _model(name: str) -> nn.Module:
    """torchvision's ResNet-18 (10 classes) as "cnn" and ResNet-50 as "resnet50", seeded; without
    torchvision (a CPU dry run here) "cnn" is a ResNet-18 written out below."""
    import torch

    torch.manual_seed(0)
    try:
        import torchvision
    except (ImportError, RuntimeError):
        if name != "cnn":
            raise
        return _resnet18().eval()
    model: nn.Module
    if name == "cnn":
        model = torchvision.models.resnet18(num_classes=10)
    else:
        model = torchvision.models.resnet50(num_classes=1000)
    return model.eval()


def _resnet18() -> nn.Module:
    import torch
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> nn.Module:
        class Block(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.body = nn.Sequential(
                    nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
                    nn.BatchNorm2d(cout))
                self.skip = (nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)))

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                out: torch.Tensor = (self.body(x) + self.skip(x)).relu()
                return out

        return Block()

    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [block(cin, cout, stride), block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10)]
    return nn.Sequential(*layers)


def build_models(registry: Path, names: list[str]) -> dict[str, tuple[int, ...]]:
    import torch

    from kloop.artifact import Registry, TensorSpec

    shapes = {"cnn": (3, 64, 64), "resnet50": (3, 224, 224)}
    reg = Registry(registry)
    for name in names:
        model = _model(name)
        example = torch.zeros(2, *shapes[name])
        program = torch.export.export(
            model, (example,), dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        with tempfile.TemporaryDirectory() as tmp:
            torch.export.save(program, Path(tmp) / "model.pt2")
            with torch.no_grad():
                classes = model(example).shape[1]
            reg.publish(name, tmp, model_file="model.pt2", format="torch.export",
                        torch_version=torch.__version__,
                        inputs=(TensorSpec("input-0", "FP32", (-1, *shapes[name])),),
                        outputs=(TensorSpec("output-0", "FP32", (-1, classes)),),
                        metrics={}, params={"seed": 0}, data_fingerprint="random",
                        run_id=f"gpu-bench-{name}")
    return {n: shapes[n] for n in names}


def inprocess_limit(shape: tuple[int, ...], name: str, batch: int, dtype: str,
                    seconds: float, device: str) -> float:
    """Items/s of the model alone on the GPU (inputs resident, the dtype, a CUDA graph); on
    ``--device cpu`` (a dry run of this script) the plain module."""
    import torch

    model = _model(name).to(device)
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    model = model.to(dt)
    x = torch.randn(batch, *shape, device=device, dtype=dt)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        run: Callable[[], Any]
        if device == "cpu":
            run = lambda: model(x)  # noqa: E731
        else:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                model(x)
            run = graph.replay
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            run()
            n += 1
        if device != "cpu":
            torch.cuda.synchronize()
        return n * batch / (time.perf_counter() - t0)


# ---- the trivial server and the load generator ------------------------------------------------


def null_server(port: int) -> None:
    """A fixed ModelInferResponse for every ModelInfer (bytes in, bytes out)."""
    import grpc

    from kloop.pb import inference_pb2 as pb

    resp = pb.ModelInferResponse(model_name="null")
    resp.outputs.add(name="output-0", datatype="FP32", shape=[1, 10])
    resp.raw_output_contents.append(b"\0" * 40)
    body = resp.SerializeToString()

    async def infer(request: bytes, context: object) -> bytes:
        return body

    async def main() -> None:
        server = grpc.aio.server(options=[("grpc.so_reuseport", 1),
                                          ("grpc.max_receive_message_length", 64 << 20)])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService",
            {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()

    asyncio.run(main())


def _load_proc(target: str, model: str, shape: tuple[int, ...], conc: int, seconds: float,
               queue: mp.Queue[dict[str, Any]]) -> None:
    import grpc

    from kloop.pb import inference_pb2 as pb

    req = pb.ModelInferRequest(model_name=model)
    req.inputs.add(name="input-0", datatype="FP32", shape=[1, *shape])
    req.raw_input_contents.append(np.random.default_rng(0).standard_normal(
        (1, *shape)).astype("<f4").tobytes())
    body = req.SerializeToString()

    async def main() -> None:
        opts = [("grpc.max_receive_message_length", 64 << 20),
                ("grpc.max_send_message_length", 64 << 20)]
        async with grpc.aio.insecure_channel(target, options=opts) as ch:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = ch.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer")
            await call(body, timeout=60)
            lat: list[float] = []
            errors = 0
            t_end = time.perf_counter() + seconds

            async def worker() -> None:
                nonlocal errors
                while time.perf_counter() < t_end:
                    t0 = time.perf_counter()
                    try:
                        await call(body, timeout=60)
                        lat.append(time.perf_counter() - t0)
                    except grpc.RpcError:
                        errors += 1

            t0 = time.perf_counter()
            await asyncio.gather(*(worker() for _ in range(conc)))
            queue.put({"n": len(lat), "s": time.perf_counter() - t0, "lat": lat[::10],
                       "errors": errors})

    asyncio.run(main())


def drive(target: str, model: str, shape: tuple[int, ...], procs: int, conc: int,
          seconds: float) -> dict[str, float]:
    """Closed loop: ``procs`` processes x ``conc`` concurrent calls; req/s, p50, p99, errors."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    ps = [ctx.Process(target=_load_proc, args=(target, model, shape, conc, seconds, queue))
          for _ in range(procs)]
    for p in ps:
        p.start()
    results = [queue.get(timeout=seconds + 120) for _ in ps]
    for p in ps:
        p.join()
    lat = np.array([x for r in results for x in r["lat"]] or [float("nan")]) * 1e3
    return {"rps": sum(r["n"] / r["s"] for r in results),
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "errors": sum(r["errors"] for r in results)}


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"port {port} not open after {timeout}s")


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=8.0)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--load-procs", type=int, default=4)
    ap.add_argument("--conc", type=int, default=64, help="concurrent calls per load process")
    ap.add_argument("--models", default="cnn,resnet50")
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of the script itself")
    ap.add_argument("--null-server", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.null_server is not None:
        null_server(a.null_server)
        return
    import torch

    if a.device == "cpu":
        a.dtype = "fp32"
    elif not torch.cuda.is_available():
        sys.exit("gpu_bench: no CUDA device")
    gpu = torch.cuda.get_device_name() if a.device != "cpu" else "none (dry run on CPU)"
    print(f"device: {gpu}, torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    names = [n for n in a.models.split(",") if n]
    work = Path(tempfile.mkdtemp(prefix="kloop-gpu-bench-"))
    shapes = build_models(work / "registry", names)
    batches = {"cnn": (32, 64, 128, 256), "resnet50": (16, 32, 64, 128)}
    rows = []
    for name in names:
        shape = shapes[name]
        limit = inprocess_limit(shape, name, batches[name][-1], a.dtype, a.seconds, a.device)
        print(f"{name}: in-process {limit:.0f} items/s ({a.dtype}, batch {batches[name][-1]})",
              flush=True)
        row = {"model": name, "inprocess": limit}
        for label, procs in (("null_1", 1), (f"null_{a.workers}", a.workers)):
            port = _free_port()
            servers = [subprocess.Popen([sys.executable, __file__, "--null-server", str(port)])
                       for _ in range(procs)]
            try:
                _wait_port(port, servers[0])
                row[label] = drive(f"127.0.0.1:{port}", name, shape, a.load_procs, a.conc,
                                   a.seconds)
            finally:
                _stop(servers)
            print(f"{name}: {label} {row[label]}", flush=True)
        for label, workers in (("kloop_1", 1), (f"kloop_{a.workers}", a.workers)):
            http, grpc_port = _free_port(), _free_port()
            cmd = [sys.executable, "-m", "serving", "--registry", str(work / "registry"),
                   "--model", name, "--device", a.device,
                   *(["--dtype", a.dtype] if a.device != "cpu" else []),
                   "--max-batch-size", str(batches[name][-1]),
                   "--preferred-batch-sizes", ",".join(map(str, batches[name])),
                   "--max-queue-size", "4096", "--max-inflight", "4096",
                   "--http-port", str(http), "--grpc-port", str(grpc_port),
                   "--workers", str(workers)]
            server = subprocess.Popen(cmd)
            try:
                _wait_port(grpc_port, server)
                time.sleep(2)  # every worker of the group binds before the load starts
                drive(f"127.0.0.1:{grpc_port}", name, shape, a.load_procs, a.conc, 2.0)
                row[label] = drive(f"127.0.0.1:{grpc_port}", name, shape, a.load_procs, a.conc,
                                   a.seconds)
            finally:
                _stop([server])
            print(f"{name}: {label} {row[label]}", flush=True)
        rows.append(row)
    print()
    w = a.workers
    print(f"| model | in-process items/s ({a.dtype}) | trivial gRPC 1 / {w} procs req/s "
          f"| kloop 1 / {w} workers req/s | kloop p99 ms | best kloop / lower limit |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        lower = min(r["inprocess"], r[f"null_{w}"]["rps"])
        best = max(r["kloop_1"]["rps"], r[f"kloop_{w}"]["rps"])
        print(f"| {r['model']} | {r['inprocess']:.0f} | {r['null_1']['rps']:.0f} / "
              f"{r[f'null_{w}']['rps']:.0f} | {r['kloop_1']['rps']:.0f} / "
              f"{r[f'kloop_{w}']['rps']:.0f} | {r[f'kloop_{w}']['p99_ms']:.1f} | "
              f"{best / lower:.0%} (target >= 50 %) |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
