"""``kloop serve --workers 2``: two real server processes on the same ports, under a supervisor.

Checked: both workers serve (connections spread over them), ``/metrics`` sums their requests,
runtime changes of versions and weights are refused with 409 (each worker holds its own copy),
a lone server refuses a port another already holds, and SIGTERM stops every process cleanly."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import numpy as np
import pytest

from kloop.pb import inference_pb2 as pb
from kloop.pb import inference_pb2_grpc as pb_grpc
from tests.support.paths import REPO
from tests.support.processes import Processes
from tests.support.serving import MODEL, wait_for_file

TOKEN = "workers-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _infer_over_new_connections(grpc_port: int, count: int) -> None:
    req = pb.ModelInferRequest(model_name=MODEL)
    req.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
    req.raw_input_contents.append(np.zeros((1, 1, 8, 8), np.float32).tobytes())
    for _ in range(count):  # a channel per call: a new connection, for the kernel to place
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            resp = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(req, timeout=30)
            assert resp.model_name == MODEL


def _requests_total(http_port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(v) for v in re.findall(
        r'^kloop_inference_requests_total\{[^}]*protocol="grpc"[^}]*\} (\S+)$', text, re.M))


def test_two_workers_share_the_ports_sum_their_metrics_and_stop_together(
        registry_root: Path, tmp_path: Path, processes: Processes) -> None:
    http_port, grpc_port = _free_port(), _free_port()
    ports_file = tmp_path / "ports.json"
    env = {**os.environ, "KLOOP_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(REPO)}
    proc = processes.spawn(
        [sys.executable, "-m", "serving", "--registry", str(registry_root), "--workers", "2",
         "--http-port", str(http_port), "--grpc-port", str(grpc_port),
         "--ports-file", str(ports_file), "--grace-seconds", "5"],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ports = wait_for_file(ports_file, proc, timeout=90)
    assert ports["pid"] == proc.pid and ports["http"] == http_port
    workers = ports["workers"]
    assert len(workers) == 2 and proc.pid not in workers

    _infer_over_new_connections(grpc_port, 40)
    # Each scrape reaches one worker and reports both workers' requests.
    assert _requests_total(http_port) == 40
    assert _requests_total(http_port) == 40

    body = json.dumps({"2": 100}).encode()
    req = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/admin/models/{MODEL}/traffic", data=body,
        method="PUT", headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(req, timeout=10)
    assert refused.value.code == 409
    assert b"worker processes" in refused.value.read()

    lone = subprocess.run(  # a server outside the group may not take the port
        [sys.executable, "-m", "serving", "--registry", str(registry_root),
         "--http-port", "0", "--grpc-port", str(grpc_port)],
        check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert lone.returncode == 1 and "grpc" in lone.stderr.lower()

    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert not ports_file.exists()


def test_workers_need_fixed_ports(registry_root: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "serving", "--registry", str(registry_root), "--workers", "2",
         "--http-port", "0", "--grpc-port", "0"],
        check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2 and "fixed ports" in done.stderr
