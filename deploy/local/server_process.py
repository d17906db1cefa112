"""Find, start and stop the local model server (``kloop serve``) from the control plane.

``kloop serve`` records where it listens in ``<home>/server.json`` (``{"http", "grpc", "pid"}``,
written by the server once it is ready) and its admin token in ``<home>/admin-token`` (mode
0600), so ``kloop rollout``, ``kloop status`` and ``kloop pipeline run`` in another terminal find
it without flags. ``ServerProcess`` starts one as a child process for the main job and the tests:
readiness is the ports file appearing, never a log line.
"""

from __future__ import annotations

import dataclasses
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
        self.home.mkdir(parents=True, exist_ok=True)
        self.ports_file.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "serving", "--registry", str(self.registry),
               "--http-port", "0", "--grpc-port", "0", "--ports-file", str(self.ports_file),
               *self.extra_args]
        env = {**os.environ, TOKEN_ENV: self.token}
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the model server exited with code {self.proc.returncode} while "
                                   f"starting; see {self.log_file}:\n{_tail(self.log_file)}")
            try:
                ports = json.loads(self.ports_file.read_text())
            except (FileNotFoundError, json.JSONDecodeError):
                time.sleep(0.05)
                continue
            self.handle = ServerHandle.from_ports(ports, self.token)
            return self.handle
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
