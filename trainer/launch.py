"""Run a ``TrainSpec`` locally under a real ``torchrun`` and follow its progress.

Why a subprocess and not ``torch.multiprocessing`` in this process: the local run must be the
same program, started the same way, as in a pod (``python -m torch.distributed.run ... -m
trainer.main``), so what passes here passes there.

Progress is followed through ``<run-dir>/progress.jsonl`` (structured events written by rank 0),
never by parsing log lines. All processes' output goes to ``<run-dir>/train.log``; its tail is
attached to ``TrainingFailed`` when torchrun exits non-zero.

The training dies with the process that started it, even one killed by SIGKILL, which can run
no cleanup: on Linux torchrun is started through ``python -m trainer.launch --die-with PID``,
which asks the kernel (``prctl(PR_SET_PDEATHSIG)``) to SIGTERM it when its parent dies and then
execs torchrun, whose SIGTERM handler stops its workers (SIGTERM, then SIGKILL after 30 s); the
workers in turn ask for SIGTERM when torchrun dies (``trainer.distributed.die_with_agent``).
torchrun runs in a process group of its own, so a stop (an exception or Ctrl-C here) signals
that group, not this process's terminal group. A wrapper and not ``preexec_fn``: the callers
run threads (a progress bar, traffic), and ``preexec_fn`` is unsafe in a threaded process.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

from trainer.progress import format_event, read_events
from trainer.rundir import LOG_FILE, METRICS_FILE, PROGRESS_FILE, RESULT_FILE
from trainer.spec import TrainSpec

_POLL_S = 0.2  # how often the progress file is read while training runs
_TAIL_LINES = 60  # lines of train.log attached to TrainingFailed
_STOP_GRACE_S = 40.0  # torchrun gives its workers 30 s after SIGTERM before it SIGKILLs them
SPEC_FILE = "spec.json"
AGENT_PID_ENV = "KLOOP_TORCHRUN_PID"  # torchrun's pid, for its workers (set by the wrapper)
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class TrainingFailed(RuntimeError):
    """torchrun exited non-zero; ``output_tail`` holds the end of the processes' output."""

    def __init__(self, returncode: int, output_tail: str, run_dir: Path) -> None:
        super().__init__(
            f"training in {run_dir} failed with exit code {returncode}; last output:\n{output_tail}"
        )
        self.returncode = returncode
        self.output_tail = output_tail
        self.run_dir = run_dir


class TrainingStopped(RuntimeError):
    """``should_stop`` asked the run to stop: torchrun and its workers were stopped."""


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
    """The local command line: one node, ``spec.nproc_per_node`` processes, a private port.
    A worker that dies makes torchrun restart the group (up to ``spec.max_restarts`` times),
    and the restarted workers resume from the last checkpoint (``trainer.loop``)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", "1",
        "--nproc-per-node", str(spec.nproc_per_node),
        "--rdzv-backend", "c10d",
        "--rdzv-endpoint", f"127.0.0.1:{port}",
        "--max-restarts", str(spec.max_restarts),
        "-m", "trainer.main",
        "--spec", str(run_dir / SPEC_FILE),
        "--run-dir", str(run_dir),
    ]
    return [*cmd, "--resume"] if resume else cmd


def run_local(
    spec: TrainSpec, run_dir: Path, resume: bool = False, *, progress: bool = True,
    pythonpath: Sequence[str] = (), should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train ``spec`` with torchrun on this machine; block until done. Raises ``TrainingFailed``,
    or ``TrainingStopped`` once ``should_stop()`` (polled while it runs) says so; the checkpoints
    written so far stay for a resume. The workers import the task from ``spec.code``'s
    directory, ``pythonpath`` and kloop's."""
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
        proc = subprocess.Popen(_dying_with_this_process(cmd), stdout=log, stderr=subprocess.STDOUT,
                                env=_child_env(spec, pythonpath), cwd=_repo_root(), process_group=0)
        try:
            while True:
                done = proc.poll() is not None
                new, offset = read_events(progress_path, offset)
                for ev in new:
                    events.append(ev)
                    show(ev)
                if done:
                    break
                if should_stop is not None and should_stop():
                    _stop(proc)
                    raise TrainingStopped(f"training in {run_dir} was stopped")
                time.sleep(_POLL_S)
        except BaseException:
            _stop(proc)
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


def load_result(run_dir: Path) -> TrainResult:
    """The result a finished run left in ``run_dir`` (``result.json``, ``metrics.json``),
    without training: events and duration are those of no launch (empty, 0)."""
    run_dir = Path(run_dir).resolve()
    result = json.loads((run_dir / RESULT_FILE).read_text())
    return TrainResult(run_dir=run_dir, metrics=json.loads((run_dir / METRICS_FILE).read_text()),
                       model_path=run_dir / result["model_path"], events=[], duration_s=0.0,
                       result=result)


def die_with_parent(sig: signal.Signals = signal.SIGTERM, expected_parent: int | None = None) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; elsewhere
    a no-op, False). With ``expected_parent``, a parent that already died before the request
    (this process was reparented) gets the same answer at once: ``sig`` to this process.

    The kernel watches the parent *thread* that started this process: start children from a
    thread that outlives them (``run_local`` blocks its thread until torchrun exits)."""
    if not sys.platform.startswith("linux"):
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, ctypes.c_ulong(int(sig)), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")
    if expected_parent is not None and os.getppid() != expected_parent:
        os.kill(os.getpid(), sig)
    return True


def _dying_with_this_process(cmd: Sequence[str]) -> list[str]:
    """``cmd`` behind the wrapper that makes it die with this process (see the module doc)."""
    if not sys.platform.startswith("linux"):
        return list(cmd)
    return [sys.executable, "-m", "trainer.launch", "--die-with", str(os.getpid()), "--", *cmd]


def _exec_dying_with_parent(argv: Sequence[str]) -> NoReturn:
    """``python -m trainer.launch --die-with PID -- CMD...``: exec CMD, SIGTERMed when PID (this
    process's parent) dies; CMD's children find its pid in ``AGENT_PID_ENV``."""
    if len(argv) < 4 or argv[0] != "--die-with" or argv[2] != "--":
        sys.exit("usage: python -m trainer.launch --die-with PARENT_PID -- COMMAND [ARG...]")
    die_with_parent(signal.SIGTERM, expected_parent=int(argv[1]))
    os.environ[AGENT_PID_ENV] = str(os.getpid())  # exec keeps the pid: this is torchrun's
    cmd = list(argv[3:])
    os.execvp(cmd[0], cmd)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop torchrun's process group: SIGTERM (torchrun stops its workers), then SIGKILL."""
    if proc.poll() is not None:
        return  # reaped: its group id may already belong to someone else
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(_STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _child_env(spec: TrainSpec, pythonpath: Sequence[str] = ()) -> dict[str, str]:
    env = dict(os.environ)
    # One thread per process on CPU: N processes x all cores each would oversubscribe the machine.
    if spec.device != "cuda":
        env["OMP_NUM_THREADS"] = "1"
    paths = [spec.code.path] if spec.code is not None else []
    paths += [*pythonpath, str(_repo_root()), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(p for p in paths if p))
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
                held = " ".join(f"{k} {v:.4g}" for k, v in ev.get("held_out", {}).items())
                bar.update(task, completed=ev["epoch"],
                           description=f"loss {ev['loss']:.4f} {held} {ev['samples_per_s']:.0f}/s")
            elif ev["event"] == "done":
                primary = ev.get("primary_metric", "")
                bar.update(task, completed=spec.epochs,
                           description=f"held-out {primary} {ev['metrics'].get(primary, float('nan')):.4f}")
            if ev["event"] != "step":  # step lines would scroll the bar away; it shows them
                bar.console.print(format_event(ev), highlight=False)

        yield show


if __name__ == "__main__":
    _exec_dying_with_parent(sys.argv[1:])
