"""Pipeline runs that die: ``kloop pipeline run`` killed by SIGKILL, as a real process.

* interrupted (Ctrl-C) while training: it stops its training and records the run
  ``interrupted``;
* killed while training: its training stops with it, ``kloop runs`` shows the run
  ``interrupted`` (not running, its duration fixed), and ``kloop pipeline resume`` continues it
  under the same id from the last checkpoint to a published champion; a succeeded run is
  refused;
* killed during the canary (a real ``kloop serve`` under live traffic): the run's rollout is
  resumed by ``kloop pipeline resume`` (ticked on to promotion, no step applied twice, the
  version not published again), or by hand with ``kloop rollout``, and the record learns the
  outcome either way;
* ``kloop status`` shows which versions are loaded and their weights.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.runs import Run, RunStore
from deploy.local.server_process import ServerHandle, discover
from deploy.local.traffic import LiveData, TrafficConfig, TrafficGenerator
from deploy.rollout import Phase
from kloop.artifact import Registry
from tests.slow.trainer.test_process_lifetime import (
    EPOCHS,
    epochs_done,
    training_processes,
    wait_for,
)
from tests.support.artifacts import digits_fingerprint, publish_exported
from tests.support.processes import Processes

TRAIN = ["--epochs", "1", "--nproc", "1"]
CANARY = ["--steps", "10,50,100", "--min-requests", "15", "--min-duration", "1",
          "--retire-after", "0", "--max-p99-ratio", "3", "--min-accuracy", "0"]


def kloop(home: Path) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", "--home", str(home)]


def run_kloop(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*kloop(home), *args], check=False, capture_output=True, text=True,
                          timeout=timeout)


def only_run(home: Path) -> Run:
    [run] = RunStore(home / "kloop.db").list()
    return run


def test_killed_in_training_then_resumed_from_its_checkpoint(tmp_path: Path,
                                                             processes: Processes) -> None:
    home = tmp_path / "home"
    first = processes.spawn([*kloop(home), "pipeline", "run", "--epochs", "8", "--nproc", "1",
                             "--min-accuracy", "0"], log=tmp_path / "first.log")
    store = RunStore(home / "kloop.db")
    # The second epoch's event comes after the first epoch's checkpoint was written.
    wait_for(lambda: any(epochs_done(p) >= 2 for p in home.glob("runs/*/train/progress.jsonl"))
             or first.poll() is not None, 240, "training did not reach its second epoch")
    assert first.poll() is None, (tmp_path / "first.log").read_text()
    [progress] = home.glob("runs/*/train/progress.jsonl")
    first.kill()
    first.wait(10)
    wait_for(lambda: not training_processes(str(progress.parent)), 30,
             f"training outlived the pipeline: {training_processes(str(progress.parent))}")

    listed = run_kloop(home, "runs")
    assert listed.returncode == 0, listed.stderr
    assert "interrupted" in listed.stdout and "running" not in listed.stdout
    assert "kloop pipeline resume" in listed.stdout
    run = only_run(home)
    assert run.status == "interrupted"
    assert run.step("train").status == "failed"
    assert run.step("train").message.startswith(f"the pipeline process (pid {first.pid}) died")
    assert [s.status for s in run.steps[1:]] == ["pending"] * 5
    assert run.finished is not None and only_run(home).duration_s == run.duration_s  # not growing

    resumed = run_kloop(home, "pipeline", "resume", run.id[-6:])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    after = store.get(run.id)
    assert (after.status, after.outcome, after.version, after.resumes) == (
        "succeeded", "champion (first version)", 1, 1)
    assert [s.status for s in after.steps] == ["succeeded"] * 3 + ["succeeded", "skipped", "succeeded"]
    assert "resumed from the checkpoint of epoch" in after.step("train").message
    assert "rerun on resume" in after.step("evaluate").message
    starts = [json.loads(line) for line in progress.read_text().splitlines()
              if json.loads(line)["event"] == "start"]
    assert [s["resumed"] for s in starts] == [False, True] and starts[1]["start_epoch"] >= 2
    assert Registry(home / "registry").alias("digits", "champion") == 1
    assert [r.id for r in store.list()] == [run.id]  # the same record, not a new run

    again = run_kloop(home, "pipeline", "resume", run.id)
    assert again.returncode == 2 and "succeeded" in again.stderr and "Traceback" not in again.stderr


def test_ctrl_c_stops_the_training_and_leaves_a_resumable_run(tmp_path: Path,
                                                              processes: Processes) -> None:
    home = tmp_path / "home"
    proc = processes.spawn([*kloop(home), "pipeline", "run", "--epochs", str(EPOCHS),
                            "--nproc", "1"], log=tmp_path / "pipeline.log")
    wait_for(lambda: any(epochs_done(p) >= 1 for p in home.glob("runs/*/train/progress.jsonl"))
             or proc.poll() is not None, 240, "training did not start")
    [progress] = home.glob("runs/*/train/progress.jsonl")
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 130, (tmp_path / "pipeline.log").read_text()
    # It waited for torchrun, which waited for its worker: nothing is left to wait for.
    assert not training_processes(str(progress.parent))
    assert epochs_done(progress) < EPOCHS
    run = only_run(home)
    assert (run.status, run.outcome) == ("interrupted", f"KeyboardInterrupt in pid {proc.pid}")
    assert [s.status for s in run.steps] == ["failed"] + ["pending"] * 5


@dataclass
class KilledInCanary:
    home: Path
    run: Run  # as the next reader sees it: interrupted
    server: ServerHandle
    registry: Registry


@pytest.fixture
def killed_in_canary(tmp_path: Path, processes: Processes) -> Iterator[KilledInCanary]:
    """A champion v1 serving live traffic; ``kloop pipeline run`` trains v2 and is SIGKILLed
    once its canary has moved past the first step. Traffic keeps flowing while the test runs."""
    home = tmp_path / "home"
    reg = Registry(home / "registry")
    _publish_champion(reg, tmp_path)
    processes.spawn([*kloop(home), "serve", "--http-port", "0", "--grpc-port", "0"],
                    log=tmp_path / "serve.log")
    wait_for(lambda: discover(home) is not None, 60, "kloop serve did not start")
    handle = discover(home)
    assert handle is not None
    images = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    cfg = TrafficConfig(model="digits", http_url=handle.http_url, grpc_target=handle.grpc_target,
                        rate_per_s=120)
    rollouts = SQLiteRolloutStore(home / "kloop.db")
    with TrafficGenerator(cfg, LiveData.labelled(images, [0] * 32)):
        pipeline = processes.spawn([*kloop(home), "pipeline", "run", *TRAIN, *CANARY,
                                    "--interval", "0.3"], log=tmp_path / "pipeline.log")
        wait_for(lambda: (r := rollouts.active("digits")) is not None and r.step >= 1
                 or pipeline.poll() is not None, 300, "the canary did not reach its second step")
        assert pipeline.poll() is None, (tmp_path / "pipeline.log").read_text()
        pipeline.kill()
        pipeline.wait(10)
        run = only_run(home)
        assert run.status == "interrupted" and run.step("canary").status == "failed"
        assert rollouts.get(f"{run.id}-rollout").phase is Phase.PROGRESSING
        yield KilledInCanary(home, run, handle, reg)


def test_resume_ticks_the_runs_rollout_on_to_promotion(killed_in_canary: KilledInCanary) -> None:
    k = killed_in_canary
    out = run_kloop(k.home, "pipeline", "resume", k.run.id, "--interval", "0.3")
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resuming rollout {k.run.id}-rollout" in out.stdout
    run = RunStore(k.home / "kloop.db").get(k.run.id)
    assert (run.status, run.outcome, run.version) == ("succeeded", "promoted", 2)
    assert [s.status for s in run.steps] == ["succeeded"] * 6
    assert run.step("decide").message.endswith("(resumed)")
    assert k.registry.versions("digits") == [1, 2]  # published once
    assert k.registry.alias("digits", "champion") == 2
    assert k.registry.alias("digits", "candidate") is None
    final = SQLiteRolloutStore(k.home / "kloop.db").get(f"{k.run.id}-rollout")
    steps = [e.weights.get(2) for e in final.history if e.kind_name == "set_weights"]
    assert steps == [10, 50, 100], steps  # each step once, none repeated after the resume
    assert k.server.admin().traffic("digits") == {2: 100}


def test_a_rollout_resumed_by_hand_is_recorded_on_the_run(killed_in_canary: KilledInCanary) -> None:
    k = killed_in_canary
    out = run_kloop(k.home, "rollout", "digits", "--candidate", "2", "--interval", "0.3", *CANARY)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"resuming rollout {k.run.id}-rollout" in out.stdout
    shown = run_kloop(k.home, "runs", "show", k.run.id)
    assert shown.returncode == 0, shown.stderr
    assert "succeeded: promoted" in shown.stdout
    run = RunStore(k.home / "kloop.db").get(k.run.id)
    assert (run.status, run.outcome) == ("succeeded", "promoted")
    assert [s.status for s in run.steps] == ["succeeded"] * 6
    assert "finished after this run stopped" in run.step("decide").message
    refused = run_kloop(k.home, "pipeline", "resume", k.run.id)
    assert refused.returncode == 2 and "succeeded" in refused.stderr


def test_status_shows_what_is_loaded_and_its_weight(tmp_path: Path, processes: Processes) -> None:
    home = tmp_path / "home"
    reg = Registry(home / "registry")
    publish_exported(reg.root, "digits", seed=1, accuracy=0.90, tmp=tmp_path)
    publish_exported(reg.root, "digits", seed=2, accuracy=0.91, tmp=tmp_path)
    publish_exported(reg.root, "digits", seed=3, accuracy=0.92, tmp=tmp_path)  # not loaded
    reg.set_alias("digits", "champion", 1)
    processes.spawn([*kloop(home), "serve", "--http-port", "0", "--grpc-port", "0"],
                    log=tmp_path / "serve.log")
    wait_for(lambda: discover(home) is not None, 60, "kloop serve did not start")
    handle = discover(home)
    assert handle is not None
    admin = handle.admin()
    admin.load("digits", 2)
    admin.set_traffic("digits", {1: 90, 2: 10})
    out = run_kloop(home, "status")
    assert out.returncode == 0, out.stderr
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[1:-1]]
            for line in out.stdout.splitlines() if line.startswith("│")
            and line.split("│")[1].strip().isdigit()}
    assert set(rows) >= {"1", "2", "3"}, out.stdout
    loaded, weight = -2, -1  # the table's last two columns
    assert (rows["1"][loaded], rows["1"][weight]) == ("yes", "90%")
    assert (rows["2"][loaded], rows["2"][weight]) == ("yes", "10%")
    assert (rows["3"][loaded], rows["3"][weight]) == ("", "")


def _publish_champion(reg: Registry, tmp: Path) -> None:
    """v1: an untrained digits CNN with a low recorded accuracy, evaluated on the pipeline's
    own held-out split (the gate compares only versions measured on the same data)."""
    publish_exported(reg.root, "digits", seed=1, accuracy=0.1, tmp=tmp / "champion",
                     data_fingerprint=digits_fingerprint())
    reg.set_alias("digits", "champion", 1)
