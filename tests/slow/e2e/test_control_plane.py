"""The control plane as the real processes a user runs: ``kloop up`` (a child process), ``kloop
serve`` and real torchrun training, driven through its HTTP API, its gRPC API (the generated
stub) and the CLI.

* SIGKILLed mid-rollout and started again, the service ticks the rollout on at the same step:
  the step's weights were never written twice, and the rollout is then paused, resumed and
  promoted through the API, and undone (back to the former champion, without the gate) from
  the CLI.
* SIGKILLed mid-training (its torchrun dies with it), the service resumes the run when it
  starts again: training continues from the last checkpoint and one version is published.
* A training step killed by the OS (torchrun SIGKILLed) is retried with backoff; the step
  shows its two attempts.
* ``kloop pipeline run`` returns at once with the run's id when the service runs; ``kloop runs
  cancel`` and ``kloop runs retry`` steer it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from deploy.control.client import ControlClient
from deploy.control.process import ControlProcess
from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.runs import RunStore
from deploy.local.server_process import discover
from kloop.artifact import Registry
from kloop.pb import control_pb2 as pb
from kloop.pb import control_pb2_grpc as pb_grpc
from tests.support.artifacts import digits_fingerprint, publish_exported
from tests.support.processes import Processes

HOLD = {"steps": [10, 50, 100], "min_duration_s": 3600.0, "step_timeout_s": 7200.0,
        "retire_after_s": 0.0}


def _wait(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.1)


@pytest.fixture
def control(tmp_path: Path) -> Iterator[Callable[..., ControlProcess]]:
    started: list[ControlProcess] = []

    def start(home: Path, *extra: str) -> ControlProcess:
        proc = ControlProcess(home, extra_args=("--interval", "0.2", *extra))
        proc.start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _kloop(home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "deploy.cli", "--home", str(home), *args],
                          check=False, capture_output=True, text=True, timeout=timeout)


def _torchruns(run_dir: str) -> list[int]:
    """Pids of torchrun (and its workers) training in ``run_dir``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes()
        except OSError:
            continue
        if (b"torch.distributed.run" in text or b"trainer.main" in text) and run_dir.encode() in text:
            found.append(int(cmdline.parent.name))
    return found


def _set_weights(r: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in r["history"] if e["kind"] == "set_weights"]


def test_killed_mid_rollout_it_resumes_at_the_same_step_then_is_steered(
        tmp_path: Path, processes: Processes, control: Callable[..., ControlProcess]) -> None:
    home = tmp_path / "home"
    reg = Registry(home / "registry")
    publish_exported(reg.root, "digits", seed=1, accuracy=0.90, tmp=tmp_path)
    publish_exported(reg.root, "digits", seed=2, accuracy=0.91, tmp=tmp_path)
    reg.set_alias("digits", "champion", 1)
    processes.spawn([sys.executable, "-m", "deploy.cli", "--home", str(home), "serve",
                     "--http-port", "0", "--grpc-port", "0"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: discover(home), 60, "kloop serve did not start")
    admin = discover(home).admin()  # type: ignore[union-attr]
    first = control(home)
    api = first.client
    assert api is not None
    r = api.create_rollout("digits", "2", HOLD)
    at_step = _wait(lambda: (lambda x: x if x["step"] == 0 else None)(api.get_rollout(r["id"])),
                    30, "the rollout never reached its first step")
    assert at_step["weights"] == {"1": 90, "2": 10} and admin.traffic("digits") == {1: 90, 2: 10}
    assert len(_set_weights(at_step)) == 1

    first.kill()  # SIGKILL: nothing is cleaned up, nobody ticks; the canary keeps its weight
    assert admin.traffic("digits") == {1: 90, 2: 10}
    second = control(home)
    api = second.client
    assert api is not None
    before = at_step["updated"]
    resumed = _wait(lambda: (lambda x: x if x["updated"] > before + 0.5 else None)(
        api.get_rollout(r["id"])), 30, "the restarted service did not tick the rollout")
    assert resumed["phase"] == "Progressing" and resumed["step"] == 0
    assert resumed["weights"] == {"1": 90, "2": 10}
    assert len(_set_weights(resumed)) == 1, "a step was applied twice"
    assert admin.traffic("digits") == {1: 90, 2: 10}

    # the CLI talks to the service: pause, resume
    out = _kloop(home, "rollout", "pause", "digits")
    assert out.returncode == 0 and "pause recorded" in out.stdout, out.stdout + out.stderr
    assert api.get_rollout(r["id"])["paused"]
    out = _kloop(home, "rollout", "resume", "digits")
    assert out.returncode == 0, out.stderr
    assert not api.get_rollout(r["id"])["paused"]

    # promote through the generated gRPC stub: the remaining steps are skipped
    with grpc.insecure_channel(second.grpc_target) as channel:
        stub = pb_grpc.ControlStub(channel)
        with pytest.raises(grpc.RpcError) as e:
            stub.PromoteRollout(pb.RolloutActionRequest(id=r["id"]))
        assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED
        stub.PromoteRollout(pb.RolloutActionRequest(id=r["id"], reason="looks good"),
                            metadata=(("authorization", f"Bearer {second.token}"),))
        done = _wait(lambda: (lambda x: x if x.phase == "Succeeded" else None)(
            stub.GetRollout(pb.GetRolloutRequest(id=r["id"]))), 30, "promote did not finish")
    assert done.weights == {"2": 100} and reg.alias("digits", "champion") == 2
    assert admin.traffic("digits") == {2: 100}
    assert len([e for e in done.history if e.kind == "set_weights"]) == 1  # no step 2 or 3

    # undo from the CLI: back to v1, a former champion: no gate, no steps
    out = _kloop(home, "rollout", "undo", "digits", "--retire-after", "0")
    assert out.returncode == 0 and "a former champion" in out.stdout, out.stdout + out.stderr
    undo_id = out.stdout.split()[1].rstrip(":")
    undone = _wait(lambda: (lambda x: x if x["phase"] == "Succeeded" else None)(
        api.get_rollout(undo_id)), 30, "undo did not finish")
    assert undone["undo"] and "undo" in " ".join(undone["gate"]["reasons"])
    assert _set_weights(undone) == [] and reg.alias("digits", "champion") == 1
    assert admin.traffic("digits") == {1: 100}
    # and the service's series recorded the canary's traffic per version
    series = api._call("GET", f"/api/v1/rollouts/{r['id']}/series")["points"]
    assert {p["version"] for p in series} == {"1", "2"}
    assert {p["weight"] for p in series if p["version"] == "2"} >= {10}


def _run_page(api: ControlClient, run_id: str) -> dict[str, Any]:
    return api.get_run(run_id)


def test_killed_mid_training_it_resumes_the_run_from_its_checkpoint(
        tmp_path: Path, control: Callable[..., ControlProcess]) -> None:
    home = tmp_path / "home"
    first = control(home)
    api = first.client
    assert api is not None
    run = api.create_run({"task": "digits", "epochs": 5}, label="killed")
    _wait(lambda: (_run_page(api, run["id"]).get("progress") or {}).get("epoch", 0) >= 2
          and _run_page(api, run["id"])["steps"][0]["status"] == "running", 120,
          "training did not get to epoch 2")
    run_dir = str(home / "runs" / run["id"])
    assert _torchruns(run_dir)
    first.kill()
    _wait(lambda: not _torchruns(run_dir), 60, "torchrun outlived the killed service")

    second = control(home)
    api = second.client
    assert api is not None
    events = [kind for kind, _ in api.watch_run(run["id"])]
    final = api.get_run(run["id"])
    assert final["status"] == "succeeded", final
    assert final["resumes"] == 1 and "progress" in events and "log" in events
    train = final["steps"][0]
    assert "resumed from the checkpoint of epoch" in train["message"], train
    assert Registry(home / "registry").versions("digits") == [1]
    assert final["progress"]["done"] and final["progress"]["percent"] == 100.0


def test_a_training_step_killed_by_the_os_is_retried_and_shows_its_attempts(
        tmp_path: Path, control: Callable[..., ControlProcess]) -> None:
    home = tmp_path / "home"
    api = control(home, "--retry-backoff", "0.5").client
    assert api is not None
    run = api.create_run({"task": "digits", "epochs": 4})
    run_dir = str(home / "runs" / run["id"])
    _wait(lambda: (_run_page(api, run["id"]).get("progress") or {}).get("epoch", 0) >= 1, 120,
          "training did not get to epoch 1")
    agent = _wait(lambda: [p for p in _torchruns(run_dir)
                           if b"torch.distributed.run" in Path(f"/proc/{p}/cmdline").read_bytes()],
                  10, "no torchrun found")
    os.kill(agent[0], signal.SIGKILL)  # what the OOM killer does
    for _ in api.watch_run(run["id"]):
        pass
    final = api.get_run(run["id"])
    assert final["status"] == "succeeded", final
    train = final["steps"][0]
    assert train["attempts"] == 2, train
    log = api._call("GET", f"/api/v1/runs/{run['id']}/logs")["text"]
    assert "attempt 1/3 killed by SIGKILL; retrying in 0.5s" in log, log


def test_the_cli_creates_runs_in_the_service_and_cancels_and_retries_them(
        tmp_path: Path, control: Callable[..., ControlProcess]) -> None:
    home = tmp_path / "home"
    api = control(home).client
    assert api is not None
    started = time.monotonic()
    out = _kloop(home, "pipeline", "run", "--task", "digits", "--epochs", "3", "--label", "cli")
    assert out.returncode == 0, out.stdout + out.stderr
    assert time.monotonic() - started < 60  # it returned before training (the check exports)
    run_id = out.stdout.split()[1]
    assert api.get_run(run_id)["label"] == "cli"
    _wait(lambda: api.get_run(run_id)["steps"][0]["status"] == "running", 60, "no training")
    out = _kloop(home, "runs", "cancel", run_id)
    assert out.returncode == 0, out.stderr
    cancelled = _wait(lambda: (lambda x: x if x["status"] != "running" else None)(
        api.get_run(run_id)), 90, "cancel did not stop the run")
    assert cancelled["status"] == "cancelled" and cancelled["steps"][0]["status"] == "failed"
    _wait(lambda: not _torchruns(str(home / "runs" / run_id)), 60, "torchrun outlived the cancel")
    listed = _kloop(home, "runs", "--status", "cancelled")
    assert run_id in listed.stdout, listed.stdout
    out = _kloop(home, "runs", "retry", run_id)
    assert out.returncode == 0, out.stderr
    for _ in api.watch_run(run_id):
        pass
    final = api.get_run(run_id)
    assert final["status"] == "succeeded" and final["resumes"] == 1, final
    assert final["steps"][0]["attempts"] == 2  # started once, cancelled, started again
    assert json.dumps(final["outcome"]) == json.dumps("champion (first version)")


def test_sigterm_mid_canary_leaves_the_rollout_and_a_cancel_then_aborts_it(
        tmp_path: Path, processes: Processes, control: Callable[..., ControlProcess]) -> None:
    """A graceful stop is not a cancel: the run's canary keeps its step and the run is
    interrupted, resumed at the next start; a user's cancel then aborts the rollout (traffic
    back to the champion) and the run stays cancelled however often it is read."""
    home = tmp_path / "home"
    reg = Registry(home / "registry")
    publish_exported(reg.root, "digits", seed=1, accuracy=0.50, tmp=tmp_path,
                     data_fingerprint=digits_fingerprint())  # the split training measures
    reg.set_alias("digits", "champion", 1)
    processes.spawn([sys.executable, "-m", "deploy.cli", "--home", str(home), "serve",
                     "--http-port", "0", "--grpc-port", "0"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait(lambda: discover(home), 60, "kloop serve did not start")
    admin = discover(home).admin()  # type: ignore[union-attr]
    first = control(home)
    api = first.client
    assert api is not None
    run = api.create_run({"task": "digits", "epochs": 2},
                         policy={**HOLD, "gate_tolerance": 1.0, "gate_threshold": 0.0})
    rid = f"{run['id']}-rollout"

    def at_first_step() -> Any:
        state = api.get_run(run["id"])
        assert state["status"] == "running", state
        if not state["rollout_id"]:
            return None
        r = api.get_rollout(rid)
        return r if r["step"] == 0 else None

    before = _wait(at_first_step, 180, "the run's canary did not reach its first step")
    assert api.get_run(run["id"])["steps"][4]["status"] == "running"  # canary
    assert first.stop() == 0  # SIGTERM: graceful
    record = RunStore(home / "kloop.db").get(run["id"])  # no service: the store itself
    assert record.status == "interrupted", (record.status, record.outcome)
    r = SQLiteRolloutStore(home / "kloop.db").get(rid)
    assert r.phase.value == "Progressing" and r.step == 0, (r.phase, r.reason)
    assert admin.traffic("digits") == {1: 90, 2: 10}

    second = control(home)
    api = second.client
    assert api is not None
    _wait(lambda: api.get_run(run["id"])["status"] == "running"
          and api.get_run(run["id"])["resumes"] == 1, 60, "the run was not resumed")
    again = api.get_rollout(rid)
    assert again["step"] == 0 and len(_set_weights(again)) == len(_set_weights(before)) == 1
    api.cancel_run(run["id"])
    ended = _wait(lambda: (lambda x: x if x["status"] != "running" else None)(
        api.get_run(run["id"])), 60, "the cancel did not end the run")
    assert ended["status"] == "cancelled", ended
    assert api.get_rollout(rid)["phase"] == "Aborted"
    assert admin.traffic("digits") == {1: 100}
    assert reg.alias("digits", "champion") == 1
    for _ in range(2):  # reading it (which reconciles) does not turn it into "failed"
        assert api.get_run(run["id"])["status"] == "cancelled"
    assert RunStore(home / "kloop.db").get(run["id"]).status == "cancelled"
