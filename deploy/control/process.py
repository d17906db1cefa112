"""``kloop up`` as a child process on free loopback ports: what the demo and the tests run.

``start`` waits for the child to record itself (``<home>/control.json``) and answer; ``stop``
sends SIGTERM (its runs stop as ``interrupted``; the next start resumes them) and SIGKILLs if it
overstays; ``kill`` is SIGKILL at once (what a crash does).
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from deploy.control.client import CONTROL_FILE, ControlClient
from deploy.control.server import ensure_token


class ControlProcess:
    def __init__(self, home: Path, *, log_file: Path | None = None,
                 extra_args: tuple[str, ...] = ()):
        self.home = home
        self.token = ensure_token(home)
        self.log_file = log_file or home / "control.log"
        self.extra_args = extra_args
        self.proc: subprocess.Popen[bytes] | None = None
        self.client: ControlClient | None = None

    def start(self, timeout: float = 60.0) -> ControlClient:
        record = self.home / CONTROL_FILE
        cmd = [sys.executable, "-m", "deploy.cli", "--home", str(self.home), "up",
               "--http-port", "0", "--grpc-port", "0", *self.extra_args]
        with open(self.log_file, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the control plane exited with code {self.proc.returncode} "
                                   f"while starting; see {self.log_file}:\n{_tail(self.log_file)}")
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError, OSError,
                                     urllib.error.URLError):
                doc = json.loads(record.read_text())
                if doc.get("pid") == self.proc.pid:
                    with urllib.request.urlopen(f"{doc['http']}/healthz", timeout=5):
                        pass
                    self.grpc_target = str(doc["grpc"])
                    self.client = ControlClient(str(doc["http"]), self.token)
                    return self.client
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"the control plane was not ready after {timeout:.0f}s; see "
                           f"{self.log_file}")

    def stop(self, timeout: float = 90.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: no cleanup runs (the record stays; the lock goes with the process)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> ControlClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return ""
