"""The serving fixtures (a plugin of the root conftest) and helpers.

Fixtures: a registry holding two versions of a tiny digits-shaped model, and a real server (gRPC +
HTTP on 127.0.0.1, port 0) running on the test's event loop, with clients for it. The artifacts are
built here, not by the trainer: a module with kloop's digits signature (``image`` FP32 [-1,1,8,8]
-> ``logits`` FP32 [-1,10], ``label`` INT64 [-1]), exported with a dynamic batch dimension and
published through ``kloop.artifact.Registry``. Exporting costs seconds, so it happens once per
session; tests that damage the registry get their own copy.

Helpers: ``wait_for_file`` (a server child's ports file), ``ModelDirServer`` (``python -m serving
--model-dir`` as a child process), ``infer`` (real HTTP requests), ``split_binary`` (a binary
HTTP answer's parts).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from kloop.artifact import Registry, TensorSpec
from serving.app import Server, ServerConfig
from serving.client import AdminClient, GrpcClient, HttpClient
from serving.grpc import native
from tests.support.processes import Processes

MODEL = "digits"
TOKEN = "test-token"
INPUTS = (TensorSpec("image", "FP32", (-1, 1, 8, 8)),)
OUTPUTS = (TensorSpec("logits", "FP32", (-1, 10)), TensorSpec("label", "INT64", (-1,)))


class TinyDigits(torch.nn.Module):
    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc = torch.nn.Linear(64, 10)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(image.flatten(1))
        return logits, logits.argmax(1)


def publish_version(registry: Registry, seed: int, work: Path) -> int:
    module = TinyDigits(seed).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(
        module, (torch.zeros(2, 1, 8, 8),), dynamic_shapes={"image": {0: batch}}
    )
    src = work / f"src-{seed}"
    src.mkdir()
    torch.export.save(program, str(src / "model.pt2"))
    manifest = registry.publish(
        MODEL, src, model_file="model.pt2", format="torch.export",
        torch_version=torch.__version__, inputs=INPUTS, outputs=OUTPUTS,
        metrics={"accuracy": 0.5 + seed / 100}, params={}, data_fingerprint="test", run_id="test",
    )
    return manifest.version


def reference(seed: int, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the model of ``seed`` answers, computed eagerly (the server must agree)."""
    with torch.no_grad():
        logits, label = TinyDigits(seed).eval()(torch.from_numpy(images))
    return logits.numpy(), label.numpy()


@pytest.fixture(scope="session")
def template_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    work = tmp_path_factory.mktemp("export")
    registry = Registry(root)
    assert publish_version(registry, 1, work) == 1
    assert publish_version(registry, 2, work) == 2
    return root


@pytest.fixture
def registry_root(template_registry: Path, tmp_path: Path) -> Path:
    """A private copy: tests may corrupt it or move aliases."""
    root = tmp_path / "registry"
    shutil.copytree(template_registry, root)
    return root


@pytest.fixture
def images() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((3, 1, 8, 8), dtype=np.float32)


def require_native() -> None:
    """Skip a test of the native gRPC front end where it is not built; CI builds it and sets
    KLOOP_REQUIRE_NATIVE, so there a missing build fails instead of skipping."""
    if native.grpc_front is None:
        if os.environ.get("KLOOP_REQUIRE_NATIVE"):
            pytest.fail(native.UNAVAILABLE)
        pytest.skip(native.UNAVAILABLE)


@pytest.fixture
def grpc_server() -> str:
    """Which gRPC server the ``server`` fixture runs; test modules override it to run against
    both (tests/component/serving/test_grpc_api.py)."""
    return "auto"


@pytest.fixture
async def server(registry_root: Path, grpc_server: str) -> AsyncIterator[Server]:
    config = ServerConfig(
        registry=registry_root, http_port=0, grpc_port=0, admin_token=TOKEN, grace_seconds=2.0,
        grpc_server=grpc_server,
    )
    srv = Server(config)
    await srv.start()
    try:
        yield srv
    finally:
        await srv.stop()


@pytest.fixture
def http_url(server: Server) -> str:
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture
def grpc_target(server: Server) -> str:
    return f"127.0.0.1:{server.grpc_port}"


@pytest.fixture
async def grpc_client(grpc_target: str) -> AsyncIterator[GrpcClient]:
    client = GrpcClient(grpc_target)
    yield client
    await client.close()


@pytest.fixture
async def http_client(http_url: str) -> AsyncIterator[HttpClient]:
    client = HttpClient(http_url)
    yield client
    await client.close()


@pytest.fixture
def admin(http_url: str) -> AdminClient:
    return AdminClient(http_url, TOKEN)


def wait_for_file(path: Path, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> dict[str, int]:
    """The ports file a server child writes once it serves (atomically: once it exists it is
    complete); fails at once if the child exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read() if proc.stderr is not None else b""
            raise AssertionError(f"server exited early with {proc.returncode}: {err!r}")
        if path.exists():
            return dict(json.loads(path.read_text()))
        time.sleep(0.05)
    raise AssertionError(f"no ports file at {path} after {timeout}s")


class ModelDirServer:
    """``python -m serving --model-dir`` as a child process on free loopback ports; readiness
    is the ports file appearing (the server writes it once it serves). Started and stopped
    through ``tests.support.processes.Processes``: its own, or the test's ``processes``."""

    def __init__(self, model_dir: Path, work: Path, env: dict[str, str] | None = None,
                 processes: Processes | None = None):
        self.model_dir, self.work = model_dir, work
        self.env = {**os.environ, "KLOOP_ADMIN_TOKEN": TOKEN, **(env or {})}
        self.ports_file = work / "ports.json"
        self.log = work / "server.log"
        self.processes = processes if processes is not None else Processes(grace_s=20.0)
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 60.0) -> str:
        self.work.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "serving", "--model-dir", str(self.model_dir),
               "--http-port", "0", "--grpc-port", "0", "--ports-file", str(self.ports_file)]
        self.proc = self.processes.spawn(cmd, log=self.log, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited {self.proc.returncode}: {self.log.read_text()}")
            try:
                ports = json.loads(self.ports_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.05)
                continue
            self.url = f"http://127.0.0.1:{ports['http']}"
            return self.url
        self.stop()
        raise TimeoutError(f"not serving after {timeout}s: {self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None:
            self.processes.stop(self.proc)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def infer(url: str, model: str, images: np.ndarray, n: int = 1) -> list[str]:
    """``n`` real OIP v2 requests over HTTP (serving.client); the versions that answered."""
    async def go() -> list[str]:
        async with HttpClient(url) as c:
            return [(await c.infer(model, {"image": images})).model_version for _ in range(n)]
    return asyncio.run(go())


def split_binary(headers: Mapping[str, str], body: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """A binary response's JSON header and each binary output's bytes, by name."""
    n = int(headers["Inference-Header-Content-Length"])
    header, offset, blobs = orjson.loads(body[:n]), n, {}
    for out in header["outputs"]:
        size = out.get("parameters", {}).get("binary_data_size")
        if size is not None:
            blobs[out["name"]] = body[offset:offset + size]
            offset += size
    assert offset == len(body)
    return header, blobs
