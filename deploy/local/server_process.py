"""Find, start and stop the local model server (``kloop serve``) from the control plane.

``kloop serve`` records where it listens in ``<home>/server.json`` (``{"http", "grpc", "pid"}``,
written by the server once it is ready) and its admin token in ``<home>/admin-token`` (mode
0600), so ``kloop rollout``, ``kloop status`` and ``kloop pipeline run`` in another terminal find
it without flags. ``ServerProcess`` starts one as a child process for the main job and the tests:
readiness is the ports file appearing, never a log line.

One server per home: whoever writes ``<home>/server.json`` first holds an exclusive ``flock`` on
``<home>/server.lock`` (``HomeLock``), with its pid written in it, for the life of the server
process. ``kloop serve`` takes it in its own process; ``ServerProcess`` takes it and hands the
locked descriptor to its child, keeping no copy, so in both cases the lock goes with the server
process however it ends (the kernel drops a ``flock`` with the last descriptor of it), and an
``exec`` keeps it (``serving.openmp`` re-executes ``python -m serving``; the child's copy is
inheritable). A second server on the same home is refused (``HomeBusy``) before it touches
``server.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from serving.cli import TOKEN_ENV
from serving.client import AdminClient

SERVER_FILE = "server.json"
TOKEN_FILE = "admin-token"
LOCK_FILE = "server.lock"


class HomeBusy(RuntimeError):
    """Another server holds the home's lock (``HomeLock``)."""

    def __init__(self, home: Path, pid: int | None) -> None:
        self.home, self.pid = home, pid
        super().__init__(
            f"another kloop serve (pid {pid if pid is not None else 'unknown'}) already serves "
            f"home {home}; stop it first, or use another --home")


class HomeLock:
    """The exclusive, non-blocking ``flock`` on ``<home>/server.lock`` (module docstring).

    ``acquire`` raises ``HomeBusy`` when another process holds it. The lock lasts as long as an
    open descriptor of it does: ``release`` closes this one."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, home: Path) -> HomeLock:
        home.mkdir(parents=True, exist_ok=True)
        path = home / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise HomeBusy(home, holder) from None
        except BaseException:
            os.close(fd)
            raise
        lock = cls(path, fd)
        lock.set_owner(os.getpid())
        return lock

    def set_owner(self, pid: int) -> None:
        """Write the pid of the process the lock is for (a contender names it)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> HomeLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 64, 0).decode(errors="replace").strip()
    return int(text) if text.isascii() and text.isdigit() else None


@dataclasses.dataclass(frozen=True)
class ServerHandle:
    """Where a running server answers, and the token for its management endpoints."""

    http_url: str
    grpc_target: str
    token: str
    pid: int | None = None

    def admin(self) -> AdminClient:
        return AdminClient(self.http_url, self.token)

    @classmethod
    def from_ports(cls, ports: dict[str, int], token: str, host: str = "127.0.0.1") -> ServerHandle:
        return cls(http_url=f"http://{host}:{ports['http']}", grpc_target=f"{host}:{ports['grpc']}",
                   token=token, pid=ports.get("pid"))


def ensure_token(home: Path) -> str:
    """The admin token kept in ``<home>/admin-token``, created (0600) on first use."""
    path = home / TOKEN_FILE
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        home.mkdir(parents=True, exist_ok=True)
        token = secrets.token_urlsafe(24)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return token


def discover(home: Path) -> ServerHandle | None:
    """The server that ``kloop serve`` recorded in ``home``, if its process is alive."""
    try:
        ports = json.loads((home / SERVER_FILE).read_text())
        token = (home / TOKEN_FILE).read_text().strip()
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    pid = ports.get("pid")
    if pid is not None and not _alive(int(pid)):
        return None
    return ServerHandle.from_ports(ports, token)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ServerProcess:
    """``python -m serving`` as a child process on free loopback ports.

    Use as a context manager; ``stop()`` sends SIGTERM (graceful: in-flight requests finish)
    and waits, then SIGKILLs if the server overstays ``timeout``.
    """

    def __init__(self, registry: Path, home: Path, *, token: str | None = None,
                 log_file: Path | None = None, extra_args: tuple[str, ...] = ()):
        self.registry = registry
        self.home = home
        self.token = token or ensure_token(home)
        self.log_file = log_file or home / "server.log"
        self.ports_file = home / SERVER_FILE
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.handle: ServerHandle | None = None

    def start(self, timeout: float = 60.0) -> ServerHandle:
        """Start the server and wait until it serves; ``HomeBusy`` if another serves the home."""
        with HomeLock.acquire(self.home) as lock:  # the child keeps its own copy of the lock
            self.ports_file.unlink(missing_ok=True)  # a dead server's: no live one holds the home
            cmd = [sys.executable, "-m", "serving", "--registry", str(self.registry),
                   "--http-port", "0", "--grpc-port", "0", "--ports-file", str(self.ports_file),
                   *self.extra_args]
            env = {**os.environ, TOKEN_ENV: self.token}
            with open(self.log_file, "ab") as log:
                self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                             start_new_session=True, pass_fds=(lock.fd,))
            lock.set_owner(self.proc.pid)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the model server exited with code {self.proc.returncode} while "
                                   f"starting; see {self.log_file}:\n{_tail(self.log_file)}")
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                ports = json.loads(self.ports_file.read_text())
                if ports.get("pid") == self.proc.pid:
                    self.handle = ServerHandle.from_ports(ports, self.token)
                    return self.handle
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"the model server was not ready after {timeout:.0f}s; see {self.log_file}")

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def __enter__(self) -> ServerHandle:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
