"""``kloop serve`` and ``kloop rollout`` as two real processes that find each other through
``$KLOOP_HOME`` (server.json + admin-token), with live gRPC + HTTP traffic from this process:
the candidate is stepped 50 → 100 % on the real server and promoted; SIGTERM stops the server
cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from deploy.local.server_process import discover
from deploy.local.traffic import LiveData, TrafficConfig, TrafficGenerator
from kloop.artifact import Registry
from tests.support.artifacts import publish_exported
from tests.support.processes import Processes


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_serve_then_rollout_promotes_under_traffic(tmp_path: Path, processes: Processes) -> None:
    home = tmp_path / "home"
    reg = Registry(home / "registry")
    publish_exported(reg.root, "digits", seed=1, accuracy=0.90, tmp=tmp_path)
    publish_exported(reg.root, "digits", seed=2, accuracy=0.91, tmp=tmp_path)
    reg.set_alias("digits", "champion", 1)
    kloop = [sys.executable, "-m", "deploy.cli", "--home", str(home)]
    server = processes.spawn([*kloop, "serve", "--http-port", "0", "--grpc-port", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait_for(lambda: discover(home) is not None, 60, "kloop serve did not record server.json")
    handle = discover(home)
    assert handle is not None and handle.pid == server.pid
    assert handle.admin().traffic("digits") == {1: 100}  # the champion, loaded at start
    images = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    cfg = TrafficConfig(model="digits", http_url=handle.http_url, grpc_target=handle.grpc_target,
                        rate_per_s=120)
    with TrafficGenerator(cfg, LiveData.labelled(images, [0] * 32)) as traffic:
        out = subprocess.run(
            [*kloop, "rollout", "digits", "--candidate", "2", "--steps", "50,100",
             "--min-requests", "20", "--min-duration", "1", "--interval", "0.3",
             "--retire-after", "0", "--max-p99-ratio", "3"],
            check=False, capture_output=True, text=True, timeout=180)
        served = traffic.by_version()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Succeeded" in out.stdout
    assert reg.alias("digits", "champion") == 2
    assert handle.admin().traffic("digits") == {2: 100}
    assert served["1"].requests > 0 and served["2"].requests > 0
    assert sum(s.errors for s in served.values()) == 0, traffic.failures()
    server.send_signal(signal.SIGTERM)
    rc = server.wait(30)
    assert rc == 0, server.stdout.read() if server.stdout else ""
    assert not (home / "server.json").exists()


def test_rollout_killed_mid_way_resumes_where_it_was(tmp_path: Path, processes: Processes) -> None:
    """SIGKILL ``kloop rollout`` during the canary, start it again: it finds the active rollout,
    resumes at the same step and finishes; no step is applied twice."""
    from deploy.local.rollout_store import SQLiteRolloutStore
    from deploy.rollout import Phase

    home = tmp_path / "home"
    reg = Registry(home / "registry")
    publish_exported(reg.root, "digits", seed=1, accuracy=0.90, tmp=tmp_path)
    publish_exported(reg.root, "digits", seed=2, accuracy=0.91, tmp=tmp_path)
    reg.set_alias("digits", "champion", 1)
    kloop = [sys.executable, "-m", "deploy.cli", "--home", str(home)]
    server = processes.spawn([*kloop, "serve", "--http-port", "0", "--grpc-port", "0"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rollout_args = [*kloop, "rollout", "digits", "--candidate", "2", "--steps", "10,50,100",
                    "--min-requests", "15", "--min-duration", "1", "--interval", "0.3",
                    "--retire-after", "0", "--max-p99-ratio", "3"]
    _wait_for(lambda: discover(home) is not None, 60, "kloop serve did not start")
    handle = discover(home)
    assert handle is not None
    images = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    cfg = TrafficConfig(model="digits", http_url=handle.http_url, grpc_target=handle.grpc_target,
                        rate_per_s=120)
    store = SQLiteRolloutStore(home / "kloop.db")
    with TrafficGenerator(cfg, LiveData.labelled(images, [0] * 32)):
        first = processes.spawn(rollout_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for(lambda: (r := store.active("digits")) is not None and r.step >= 1, 120,
                  "the rollout did not reach its second step")
        first.kill()
        first.wait(10)
        killed = store.active("digits")
        assert killed is not None and killed.phase is Phase.PROGRESSING
        again = subprocess.run(rollout_args, check=False, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"resuming rollout {killed.id}" in again.stdout
    final = store.get(killed.id)
    assert final.phase is Phase.SUCCEEDED
    steps = [e.weights.get(2) for e in final.history if e.kind_name == "set_weights"]
    assert steps == [10, 50, 100], steps  # each step once, none repeated after the restart
    assert handle.admin().traffic("digits") == {2: 100}
    server.send_signal(signal.SIGTERM)
    assert server.wait(30) == 0
