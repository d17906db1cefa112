"""Run a ``TrainSpec`` locally under a real ``torchrun`` and follow its progress.

Why a subprocess and not ``torch.multiprocessing`` in this process: the local run must be the
same program, started the same way, as in a pod (``python -m torch.distributed.run ... -m
trainer.main``), so what passes here passes there.

Progress is followed through ``<run-dir>/progress.jsonl`` (structured events written by rank 0),
never by parsing log lines. All processes' output goes to ``<run-dir>/train.log``; its tail is
attached to ``TrainingFailed`` when torchrun exits non-zero.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from trainer.progress import format_event, read_events
from trainer.rundir import LOG_FILE, METRICS_FILE, PROGRESS_FILE, RESULT_FILE
from trainer.spec import TrainSpec

_POLL_S = 0.2  # how often the progress file is read while training runs
_TAIL_LINES = 60  # lines of train.log attached to TrainingFailed
SPEC_FILE = "spec.json"


class TrainingFailed(RuntimeError):
    """torchrun exited non-zero; ``output_tail`` holds the end of the processes' output."""

    def __init__(self, returncode: int, output_tail: str, run_dir: Path) -> None:
        super().__init__(
            f"training in {run_dir} failed with exit code {returncode}; last output:\n{output_tail}"
        )
        self.returncode = returncode
        self.output_tail = output_tail
        self.run_dir = run_dir


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What a finished local run produced."""

    run_dir: Path
    metrics: dict[str, Any]  # held-out evaluation of the exported model (metrics.json)
    model_path: Path  # run_dir/export/model.pt2
    events: list[dict[str, Any]]  # this launch's progress events, in order
    duration_s: float  # wall time of the launch, torchrun start to exit
    result: dict[str, Any]  # result.json: metrics plus the training summary


def torchrun_command(spec: TrainSpec, run_dir: Path, *, resume: bool, port: int) -> list[str]:
    """The local command line: one node, ``spec.nproc_per_node`` processes, a private port."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1",
        "--nproc-per-node", str(spec.nproc_per_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--max-restarts", "0",
        "-m", "trainer.main",
        "--spec", str(run_dir / SPEC_FILE),
        "--run-dir", str(run_dir),
    ]
    return [*cmd, "--resume"] if resume else cmd


def run_local(
    spec: TrainSpec, run_dir: Path, resume: bool = False, *, progress: bool = True
) -> TrainResult:
    """Train ``spec`` with torchrun on this machine; block until done. Raises ``TrainingFailed``."""
    if spec.num_nodes != 1:
        raise ValueError(f"a local run has one node; spec asks for num_nodes={spec.num_nodes}")
    run_dir = Path(run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SPEC_FILE).write_text(json.dumps(spec.to_dict(), indent=2, sort_keys=True) + "\n")
    progress_path = run_dir / PROGRESS_FILE
    offset = progress_path.stat().st_size if progress_path.exists() else 0
    cmd = torchrun_command(spec, run_dir, resume=resume, port=_free_port())
    events: list[dict[str, Any]] = []
    started = time.monotonic()
    with open(run_dir / LOG_FILE, "ab") as log, _display(spec, progress) as show:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=_child_env(spec), cwd=_repo_root())
        try:
            while True:
                done = proc.poll() is not None
                new, offset = read_events(progress_path, offset)
                for ev in new:
                    events.append(ev)
                    show(ev)
                if done:
                    break
                time.sleep(_POLL_S)
        except BaseException:
            proc.terminate()
            proc.wait()
            raise
    duration = time.monotonic() - started
    if proc.returncode != 0:
        if not any(ev.get("event") == "done" for ev in events):
            raise TrainingFailed(proc.returncode, _tail(run_dir / LOG_FILE), run_dir)
        # Every rank passed the final barrier and rank 0 exported and evaluated ("done"):
        # a process that then dies while the process group is torn down (gloo can abort in
        # its destructor) leaves a complete, correct result behind. Say so; do not lose it.
        print(f"train: warning: torchrun exited with code {proc.returncode} after training "
              f"completed (a process crashed during shutdown; see {run_dir / LOG_FILE})",
              file=sys.stderr)
    result = json.loads((run_dir / RESULT_FILE).read_text())
    return TrainResult(
        run_dir=run_dir,
        metrics=json.loads((run_dir / METRICS_FILE).read_text()),
        model_path=run_dir / result["model_path"],
        events=events,
        duration_s=duration,
        result=result,
    )


def _child_env(spec: TrainSpec) -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process on CPU: N processes x all cores each would oversubscribe the machine.
    if spec.device != "cuda":
        env["OMP_NUM_THREADS"] = "1"
    root = str(_repo_root())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(collections.deque(f, maxlen=lines))
    except FileNotFoundError:
        return "(no output)"


@contextlib.contextmanager
def _display(spec: TrainSpec, enabled: bool) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A sink for events: a rich progress bar on a terminal, plain lines otherwise, or nothing."""
    if not enabled:
        yield lambda ev: None
        return
    if not sys.stdout.isatty():
        yield lambda ev: print(format_event(ev), flush=True)
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("[bold]train[/bold] {task.description}"),
        BarColumn(),
        TextColumn("epoch {task.completed:.0f}/{task.total:.0f}"),
        TimeElapsedColumn(),
    ) as bar:
        task = bar.add_task("starting", total=spec.epochs)

        def show(ev: dict[str, Any]) -> None:
            if ev["event"] == "start":
                bar.update(task, completed=ev["start_epoch"] - 1, description=f"on {ev['world_size']} proc")
            elif ev["event"] == "step":
                bar.update(task, completed=ev["epoch"] - 1 + ev["step"] / ev["steps"],
                           description=f"loss {ev['loss']:.4f}")
            elif ev["event"] == "epoch":
                bar.update(task, completed=ev["epoch"],
                           description=f"loss {ev['loss']:.4f} acc {ev['accuracy']:.3f} {ev['samples_per_s']:.0f}/s")
            elif ev["event"] == "done":
                bar.update(task, completed=spec.epochs,
                           description=f"held-out accuracy {ev['metrics']['accuracy']:.4f}")
            if ev["event"] != "step":  # step lines would scroll the bar away; it shows them
                bar.console.print(format_event(ev), highlight=False)

        yield show
