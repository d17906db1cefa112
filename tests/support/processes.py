"""Child processes the tests start, and the one teardown they all share.

``Processes.spawn`` starts a command in a session of its own (so a stop reaches its children
too: torchrun's workers, a server's ``--workers``); ``close`` stops whatever is still running:
SIGTERM to the process group, a grace period, then SIGKILL, and waits, so no test leaves a
process behind whatever it asserted. The root conftest offers it as the ``processes`` fixture
(one per test); a module- or session-scoped fixture holds a ``Processes`` of its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


class Processes:
    def __init__(self, grace_s: float = 10.0) -> None:
        self.grace_s = grace_s
        self._procs: list[subprocess.Popen[Any]] = []

    def spawn(self, cmd: Sequence[str], *, log: Path | None = None,
              env: Mapping[str, str] | None = None, cwd: Path | None = None,
              **popen: Any) -> subprocess.Popen[Any]:
        """Start ``cmd``; with ``log``, its stdout and stderr go (appended) to that file."""
        with contextlib.ExitStack() as stack:
            if log is not None:  # the child holds its own descriptor; ours closes at once
                out = stack.enter_context(open(log, "ab"))
                popen.setdefault("stdout", out)
                popen.setdefault("stderr", subprocess.STDOUT)
            proc = subprocess.Popen(list(cmd), env=dict(env) if env is not None else None,
                                    cwd=cwd, start_new_session=True, **popen)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[Any], grace_s: float | None = None) -> int:
        """SIGTERM the process group, wait ``grace_s``, then SIGKILL the group (what it started
        may outlive it); its exit code. Stopping a process twice is a no-op the second time."""
        if proc not in self._procs:
            return proc.wait(10)
        if proc.poll() is None:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(self.grace_s if grace_s is None else grace_s)
            except subprocess.TimeoutExpired:
                pass
        _signal_group(proc, signal.SIGKILL)
        code = proc.wait(10)
        self._procs.remove(proc)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return code

    def close(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)


def _signal_group(proc: subprocess.Popen[Any], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, sig)
