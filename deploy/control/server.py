"""Run the control plane: ``ControlPlane`` behind its HTTP API, web UI and gRPC API, in one
process and one event loop (``kloop up``).

On start it takes ``<home>/control.lock`` (one control plane per home), makes the write token
``<home>/control.token`` (mode 0600) if there is none, resumes what a previous instance left
running, listens (127.0.0.1 by default), and records where in ``<home>/control.json`` for the
CLI to find it. SIGTERM or SIGINT stop it gracefully: its runs are stopped as ``interrupted``
(the next start resumes them) and the record is removed. A SIGKILL removes nothing: the next
start finds the lock free (the kernel released it) and a stale record, and resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import secrets
import signal
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import grpc
from aiohttp import web

from deploy.control.client import CONTROL_FILE, CONTROL_TOKEN
from deploy.control.grpc_api import add_to_server
from deploy.control.http_api import LOOPBACK_NAMES, make_app
from deploy.control.service import ControlPlane
from deploy.local.home import Home

CONTROL_LOCK = "control.lock"
log = logging.getLogger("kloop.control")


class ControlBusy(RuntimeError):
    """Another control plane runs on this home."""


@dataclasses.dataclass(frozen=True)
class ControlConfig:
    host: str = "127.0.0.1"
    http_port: int = 8700  # 0: any free port
    grpc_port: int = 8701
    private_reads: bool = False  # reads need the token too
    tick_interval_s: float = 1.0
    max_parallel_runs: int = 2
    train_attempts: int = 3
    retry_backoff_s: float = 2.0


def ensure_token(home: Path) -> str:
    """The home's control token, made (random, 0600) on first use."""
    path = home / CONTROL_TOKEN
    home.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    token = path.read_text().strip()
    if not token:
        raise ValueError(f"{path} is empty: remove it and start again for a new token")
    return token


@contextlib.contextmanager
def home_lock(home: Path) -> Iterator[IO[str]]:
    home.mkdir(parents=True, exist_ok=True)
    f = open(home / CONTROL_LOCK, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            raise ControlBusy(f"another control plane runs on {home} (pid "
                              f"{f.read().strip() or '?'}); stop it first, or use another "
                              "--home") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        yield f
    finally:
        f.close()


def serve(home: Home, config: ControlConfig) -> None:
    """Run until SIGTERM/SIGINT (blocking)."""
    with home_lock(home.root):
        token = ensure_token(home.root)
        plane = ControlPlane(home, tick_interval_s=config.tick_interval_s,
                             max_parallel_runs=config.max_parallel_runs,
                             train_attempts=config.train_attempts,
                             retry_backoff_s=config.retry_backoff_s)
        asyncio.run(_main(plane, token, config))


async def _main(plane: ControlPlane, token: str, config: ControlConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    resumed = await asyncio.to_thread(plane.start)
    if resumed:
        log.warning("resumed runs %s", ", ".join(resumed))
    loopback = config.host in ("127.0.0.1", "::1", "localhost")
    app = make_app(plane, token, private_reads=config.private_reads,
                   allowed_hosts=LOOPBACK_NAMES if loopback else None)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
    await runner.setup()
    http_sock = _bind(config.host, config.http_port)
    site = web.SockSite(runner, http_sock)
    await site.start()
    grpc_server = grpc.aio.server()
    add_to_server(grpc_server, plane, token, private_reads=config.private_reads)
    grpc_port = grpc_server.add_insecure_port(f"{config.host}:{config.grpc_port}")
    if grpc_port == 0:
        raise OSError(f"cannot listen for gRPC on {config.host}:{config.grpc_port}")
    await grpc_server.start()
    http_port = http_sock.getsockname()[1]
    record = plane.home.root / CONTROL_FILE
    _write_record(record, {"http": f"http://{_url_host(config.host)}:{http_port}",
                           "grpc": f"{_url_host(config.host)}:{grpc_port}", "pid": os.getpid()})
    print(f"kloop control plane: HTTP http://{_url_host(config.host)}:{http_port} "
          f"(UI at /, API at /api/v1), gRPC {config.host}:{grpc_port}; home "
          f"{plane.home.root}; token in {plane.home.root / CONTROL_TOKEN}", flush=True)
    try:
        await stop.wait()
    finally:
        with contextlib.suppress(FileNotFoundError):
            if json.loads(record.read_text()).get("pid") == os.getpid():
                record.unlink()
        plane.begin_close()  # the watches end at their next poll
        await grpc_server.stop(5)
        await runner.cleanup()
        await asyncio.to_thread(plane.close)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _write_record(path: Path, doc: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc) + "\n")
    os.replace(tmp, path)
