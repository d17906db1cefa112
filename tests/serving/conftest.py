"""Fixtures: a registry holding two versions of a tiny digits-shaped model, and a real server
(gRPC + HTTP on 127.0.0.1, port 0) running on the test's event loop.

The trainer is written in parallel, so the artifacts are built here: a module with kloop's
digits signature (``image`` FP32 [-1,1,8,8] -> ``logits`` FP32 [-1,10], ``label`` INT64 [-1]),
exported with a dynamic batch dimension and published through ``kloop.artifact.Registry``.
Exporting costs seconds, so it happens once per session; tests that damage the registry get
their own copy.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import torch

from kloop.artifact import Registry, TensorSpec
from serving.app import Server, ServerConfig
from serving.client import AdminClient, GrpcClient, HttpClient
from serving.grpc import native

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
    both (tests/serving/test_grpc_api.py)."""
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
