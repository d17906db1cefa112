"""Training never outlives what started it: SIGKILL ``kloop train`` (which can run no cleanup) and
torchrun and its worker are gone within a bounded wait; SIGKILL torchrun and its worker is gone,
and ``kloop train`` reports the failure. Real processes, found by scanning /proc for the run
directory in their command lines (torchrun runs in a process group of its own and its workers
in sessions of their own, so a process-group kill by the test could not be what stops them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support.processes import Processes

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="PR_SET_PDEATHSIG is Linux's")

GONE_WITHIN_S = 30.0  # torchrun gives its workers 30 s after SIGTERM; they take well under 1
# Far more than a test waits for (an epoch takes 0.05-0.6 s here): a run that trains on after
# the kill is still training, or has finished, when the wait ends; either fails the test.
EPOCHS = 300


def training_processes(marker: str) -> dict[int, str]:
    """Live processes (not zombies, whose command line is empty) whose command line holds
    ``marker``, pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue  # gone while we looked
        if marker in cmd:
            found[int(entry.name)] = cmd
    return found


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def epochs_done(progress: Path) -> int:
    try:
        lines = progress.read_text().splitlines()
    except FileNotFoundError:
        return 0
    return sum(1 for line in lines if line.endswith("}") and json.loads(line)["event"] == "epoch")


def start_training(tmp_path: Path, processes: Processes) -> tuple[subprocess.Popen[bytes], Path]:
    """``kloop train`` (one worker), once its first epoch is done."""
    home = tmp_path / "home"
    cmd = [sys.executable, "-m", "deploy.cli", "--home", str(home), "train", "--epochs", str(EPOCHS),
           "--nproc", "1", "--run-id", "lifetime"]
    proc = processes.spawn(cmd, log=tmp_path / "kloop-train.log")
    run_dir = home / "runs" / "lifetime" / "train"
    wait_for(lambda: epochs_done(run_dir / "progress.jsonl") >= 1 or proc.poll() is not None,
             180, "training did not start")
    assert proc.poll() is None, (tmp_path / "kloop-train.log").read_text()
    return proc, run_dir


def test_sigkill_of_kloop_train_stops_torchrun_and_its_workers(tmp_path: Path,
                                                               processes: Processes) -> None:
    proc, run_dir = start_training(tmp_path, processes)
    before = training_processes(str(run_dir))
    assert any("torch.distributed.run" in c for c in before.values()), before
    assert any("trainer.main" in c and "torch.distributed.run" not in c
               for c in before.values()), before
    proc.kill()
    assert proc.wait(10) == -signal.SIGKILL
    wait_for(lambda: not training_processes(str(run_dir)), GONE_WITHIN_S,
             f"training outlived kloop train: {training_processes(str(run_dir))}")
    assert epochs_done(run_dir / "progress.jsonl") < EPOCHS  # stopped, not finished


def test_sigkill_of_torchrun_stops_its_worker_and_fails_the_run(tmp_path: Path,
                                                                processes: Processes) -> None:
    proc, run_dir = start_training(tmp_path, processes)
    agents = [pid for pid, c in training_processes(str(run_dir)).items()
              if "torch.distributed.run" in c]
    assert len(agents) == 1
    os.kill(agents[0], signal.SIGKILL)
    wait_for(lambda: not training_processes(str(run_dir)), GONE_WITHIN_S,
             f"the worker outlived torchrun: {training_processes(str(run_dir))}")
    assert epochs_done(run_dir / "progress.jsonl") < EPOCHS  # stopped, not finished
    assert proc.wait(60) == 1
    assert "failed with exit code" in (tmp_path / "kloop-train.log").read_text()
