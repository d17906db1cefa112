"""NVIDIA tritonclient (gRPC; HTTP with binary tensors and with JSON) against kloop: health,
metadata, infer for every datatype, a refused request, the repository extension over HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.local.server_process import ServerHandle
from tests.support.clients import run_client


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_tritonclient(clients_python: Path, served: ServerHandle, protocol: str) -> None:
    address = served.grpc_target if protocol == "grpc" else served.http_url.removeprefix("http://")
    results = run_client(clients_python, "triton_client.py", protocol, address, served.token)
    checks = {r["check"] for r in results}
    assert "infer BYTES binary" in checks and "infer BF16 binary" in checks
    if protocol == "http":
        assert "infer INT64 json" in checks and "repository extension" in checks
