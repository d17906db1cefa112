"""``python -m serving`` as a real process: it writes its ports file once serving, answers on
both protocols, and exits 0 on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from kloop.pb import inference_pb2 as pb
from kloop.pb import inference_pb2_grpc as pb_grpc
from serving.client import AdminClient
from tests.support.paths import REPO
from tests.support.processes import Processes
from tests.support.serving import MODEL, wait_for_file


def test_subprocess_serves_and_exits_zero_on_sigterm(registry_root: Path, tmp_path: Path,
                                                      processes: Processes) -> None:
    ports_file = tmp_path / "ports.json"
    env = {**os.environ, "KLOOP_ADMIN_TOKEN": "proc-token", "PYTHONPATH": str(REPO)}
    proc = processes.spawn(
        [sys.executable, "-m", "serving", "--registry", f"file://{registry_root}",
         "--http-port", "0", "--grpc-port", "0", "--ports-file", str(ports_file)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    ports = wait_for_file(ports_file, proc)
    assert ports["pid"] == proc.pid
    with grpc.insecure_channel(f"127.0.0.1:{ports['grpc']}") as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)  # the synchronous stub, for once
        assert stub.ServerReady(pb.ServerReadyRequest(), timeout=10).ready
        req = pb.ModelInferRequest(model_name=MODEL)
        req.inputs.add(name="image", datatype="FP32", shape=[2, 1, 8, 8])
        req.raw_input_contents.append(np.zeros((2, 1, 8, 8), np.float32).tobytes())
        resp = stub.ModelInfer(req, timeout=10)
        assert resp.model_version == "2" and list(resp.outputs[1].shape) == [2]
    admin = AdminClient(f"http://127.0.0.1:{ports['http']}", "proc-token")  # token from env
    assert admin.traffic(MODEL) == {2: 100}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()  # type: ignore[union-attr]
    assert not ports_file.exists()


def test_workers_share_the_cores_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Workers x intra-op threads stays within the cores unless the user says otherwise."""
    import argparse

    from serving import cli

    monkeypatch.setattr(cli, "available_cores", lambda: 16)
    parser = argparse.ArgumentParser()
    cli.add_serve_arguments(parser)

    def threads(*argv: str) -> int:
        args = parser.parse_args(["--registry", str(tmp_path), "--http-port", "9100",
                                  "--grpc-port", "9101", *argv])
        return cli.config_from_args(args).intra_op_threads

    assert threads() == 16
    assert threads("--workers", "4") == 4
    assert threads("--workers", "32") == 1
    assert threads("--workers", "4", "--intra-op-threads", "8") == 8
