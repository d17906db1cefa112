"""The kserve SDK's InferenceGRPCClient and InferenceRESTClient against kloop: health,
metadata, infer for every datatype the SDK has (all but BF16)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.local.server_process import ServerHandle
from tests.support.clients import run_client


@pytest.mark.parametrize("protocol", ["grpc", "rest"])
def test_kserve_sdk(clients_python: Path, served: ServerHandle, protocol: str) -> None:
    address = served.grpc_target if protocol == "grpc" else served.http_url.removeprefix("http://")
    results = run_client(clients_python, "kserve_client.py", protocol, address)
    assert any(r["check"] == "infer BYTES" or r["check"] == "infer BYTES binary" for r in results)
