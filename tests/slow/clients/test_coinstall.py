"""kloop installable with its neighbours: ONE venv into which one pip resolver call put kloop
(from this checkout), kserve 0.21.0 and tritonclient[all] 2.73.0 (torch's CPU build first).

In that venv: ``pip check`` passes; a real ``python -m serving`` runs; kloop's stubs, the kserve
SDK (gRPC and REST) and tritonclient (HTTP, and gRPC) call it from processes of that venv and
check the answers (coinstall_client.py: kserve and tritonclient.grpc cannot share a process
with each other, whatever kloop does, so tritonclient.grpc runs in a second one). The first
run builds the venv (minutes); later runs reuse it (conftest.coinstall_python).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from deploy.local.server_process import ServerHandle
from tests.support.clients import COINSTALL_NEIGHBOURS, run_script

# the first run builds the venv inside the first test's fixture set-up (about 3 minutes here)
pytestmark = pytest.mark.timeout(1800)


def test_the_resolved_environment_is_consistent(
        coinstall_python: Path, record_property: pytest.RecordProperty,
        capsys: pytest.CaptureFixture[str]) -> None:
    check = subprocess.run([str(coinstall_python), "-m", "pip", "check"], check=False,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, f"pip check in the co-install venv:\n{check.stdout}{check.stderr}"
    listed = subprocess.run([str(coinstall_python), "-m", "pip", "list", "--format", "json"],
                            check=True, capture_output=True, text=True, timeout=300)
    versions = {p["name"].lower(): p["version"] for p in json.loads(listed.stdout)}
    wanted = ("kloop", "protobuf", "grpcio", "grpcio-tools", "kserve", "tritonclient", "torch",
              "numpy")
    resolved = {name: versions.get(name, "-") for name in wanted}
    for pin in COINSTALL_NEIGHBOURS:
        name, version = pin.split("==")
        assert resolved[name.split("[")[0]] == version
    record_property("coinstall_versions", json.dumps(resolved))
    with capsys.disabled():
        print("\n[co-install venv] " + ", ".join(f"{k} {v}" for k, v in resolved.items()))


@pytest.mark.parametrize("mode", ["kserve", "triton-grpc"])
def test_clients_beside_kloop_in_one_venv(coinstall_python: Path, coinstall_server: ServerHandle,
                                          mode: str) -> None:
    http = coinstall_server.http_url.removeprefix("http://")
    results, others = run_script(coinstall_python, "coinstall_client.py", mode,
                                 coinstall_server.grpc_target, http, coinstall_server.token,
                                 isolated=True, timeout=600)
    (info,) = others
    checks = {r["check"] for r in results}
    assert "kloop stubs infer" in checks
    if mode == "kserve":
        assert {"kloop.pb.inference_pb2", "kserve", "tritonclient.http"} <= set(info["modules"])
        assert {"kserve grpc: infer BYTES", "kserve rest: infer INT64 json",
                "triton http: infer BF16 binary", "triton http: repository extension",
                "kserve and tritonclient.grpc still clash"} <= checks
    else:
        assert {"kloop.pb.inference_pb2", "tritonclient.grpc"} <= set(info["modules"])
        assert {"triton grpc: infer BYTES binary", "triton grpc: infer BF16 binary"} <= checks


def test_no_neighbour_installs_kloops_top_level_names(coinstall_python: Path) -> None:
    """kloop installs the generic names ``serving``, ``trainer`` and ``deploy`` (docs/architecture.md,
    "Packaging"): in the environment a KServe user has, no other distribution provides them."""
    code = ("import importlib.metadata as m, json; d = m.packages_distributions(); "
            "print(json.dumps({n: sorted(set(d.get(n, []))) for n in "
            "('kloop', 'serving', 'trainer', 'deploy')}))")
    done = subprocess.run([str(coinstall_python), "-I", "-c", code], check=True,
                          capture_output=True, text=True, timeout=120)
    assert json.loads(done.stdout) == {n: ["kloop"] for n in ("kloop", "serving", "trainer", "deploy")}
