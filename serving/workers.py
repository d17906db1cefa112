"""``kloop serve --workers N``: N server processes sharing the HTTP and gRPC ports.

One Python process moves requests on one core (the event loop holds the GIL while it parses,
routes and answers), so a machine with more cores than the model needs serves more with more
processes. Each worker is a whole server (``serving.app``) started with ``group_size=N``: it
binds the same ports with SO_REUSEPORT, and the kernel spreads new connections over the
workers. What that implies, and why it is a choice rather than the default:

* a connection stays with one worker: a single gRPC channel (one HTTP/2 connection, what
  ``grpc_load.py`` and most clients open) is served by one process, so more workers help
  many clients, not one busy channel;
* every worker loads every model (memory x N; on a GPU, one CUDA context each);
* each worker's forward passes get cores / N torch threads unless ``--intra-op-threads`` says
  otherwise (``serving.cli.default_intra_op_threads``): more would make the workers' OpenMP
  threads wait for each other's cores, and a lone request runs on fewer threads than with one
  process;
* metrics are summed over the workers at each scrape (prometheus_client's multiprocess mode);
* versions and weights are fixed at start: a management call would reach one worker, so the
  workers refuse changes (409). Local rollouts need ``--workers 1``; on Kubernetes a pod
  serves one version and rollouts change routes, not pods, so workers fit there.

The supervisor (this module) starts the workers, writes the ports file once all of them
serve, forwards SIGTERM/SIGINT (each drains its in-flight requests), and stops the others
when one dies. The workers inherit its environment, the admin token (``KLOOP_ADMIN_TOKEN``)
included: they re-run its command line, where a token must never be (``ps`` shows it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from kloop.fsutil import atomic_write_bytes

log = logging.getLogger(__name__)
POLL_S = 0.1  # how often the supervisor looks at its workers
KILL_AFTER_S = 10.0  # past the grace period, a worker still running is killed


def remove_ports_file(path: Path) -> None:
    """Delete the ports file ``path`` if it records this process (its ``pid``): a server never
    deletes the record of another that wrote the same file since."""
    try:
        recorded = json.loads(path.read_text())
    except (OSError, ValueError):  # gone, or not a ports file: nothing of ours
        return
    if isinstance(recorded, dict) and recorded.get("pid") == os.getpid():
        path.unlink(missing_ok=True)


def own_command() -> list[str]:
    """This process's own command line, with this interpreter (``-m serving``, ``kloop serve``
    or ``-m deploy.cli serve`` alike)."""
    return [sys.executable, *sys.orig_argv[1:]]


def worker_command(workers: int, ports_file: Path) -> list[str]:
    """This process's own command line, as one worker of ``workers`` (the last occurrence of
    an option wins in argparse, so the appended ones override)."""
    return [*own_command(), "--group-size", str(workers), "--ports-file", str(ports_file)]


def supervise(workers: int, ports_file: Path | None, grace_seconds: float) -> int:
    """Run ``workers`` copies of this command as a group until SIGTERM/SIGINT; the workers'
    worst exit status (0 when all stopped cleanly)."""
    tmp = Path(tempfile.mkdtemp(prefix="kloop-workers-"))
    metrics_dir = tmp / "metrics"
    metrics_dir.mkdir()
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir))
    stop_requested = False

    def request_stop(signum: int, frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(workers):
            procs.append(subprocess.Popen(worker_command(workers, tmp / f"ports.{i}"), env=env))
        log.info("started %d workers: %s", workers, [p.pid for p in procs])
        return _watch(procs, tmp, ports_file, grace_seconds, lambda: stop_requested)
    finally:
        for p in procs:  # never leave a worker behind
            if p.poll() is None:
                p.kill()
                p.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if ports_file is not None:
            remove_ports_file(ports_file)
        shutil.rmtree(tmp, ignore_errors=True)


def _watch(procs: list[subprocess.Popen[bytes]], tmp: Path, ports_file: Path | None,
           grace_seconds: float, stopping: Callable[[], bool]) -> int:
    announced = False
    failed = False
    while True:
        if not announced and all((tmp / f"ports.{i}").exists() for i in range(len(procs))):
            ports = [json.loads((tmp / f"ports.{i}").read_text()) for i in range(len(procs))]
            if ports_file is not None:
                body = {"http": ports[0]["http"], "grpc": ports[0]["grpc"], "pid": os.getpid(),
                        "workers": [p["pid"] for p in ports]}
                atomic_write_bytes(ports_file, json.dumps(body).encode())
            log.info("%d workers serving http %d, grpc %d", len(procs), ports[0]["http"],
                     ports[0]["grpc"])
            announced = True
        dead = [p for p in procs if p.poll() is not None]
        if stopping() or dead:
            if dead and not stopping():
                log.error("worker %d exited with %d: stopping the others", dead[0].pid,
                          dead[0].returncode)
                failed = True
            break
        time.sleep(POLL_S)
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds + KILL_AFTER_S
    for p in procs:
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.error("worker %d did not stop in time: killing it", p.pid)
            p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    worst = max((abs(c) for c in codes), default=0)
    return 1 if failed and worst == 0 else worst
