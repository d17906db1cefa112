"""The serving process's OpenMP spin: libgomp reads GOMP_SPINCOUNT once, so a server started after
torch loaded re-executes itself with it set (serving.openmp). Three real server processes, one per
way of starting one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO
from tests.support.processes import Processes
from tests.support.serving import wait_for_file


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


@pytest.mark.skipif(sys.platform != "linux", reason="libgomp's spin count is a Linux matter")
@pytest.mark.parametrize(("entry", "user_value"), [
    (["-m", "serving"], None),
    (["-m", "deploy.cli", "serve"], None),  # torch is loaded before `serve` runs: a restart
    (["-m", "deploy.cli", "serve"], "777"),
])
def test_server_runs_with_a_short_openmp_spin(registry_root: Path, tmp_path: Path,
                                               entry: list[str], user_value: str | None,
                                               processes: Processes) -> None:
    """libgomp reads GOMP_SPINCOUNT once, when torch loads: the serving process must have had
    it from its start (serving.openmp), whichever command started it, unless the user set it."""
    ports_file = tmp_path / "ports.json"
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(PYTHONPATH=str(REPO), KLOOP_HOME=str(tmp_path / "home"))
    if user_value is not None:
        env["GOMP_SPINCOUNT"] = user_value
    proc = processes.spawn(
        [sys.executable, *entry, "--registry", f"file://{registry_root}", "--http-port", "0",
         "--grpc-port", "0", "--ports-file", str(ports_file)],
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    ports = wait_for_file(ports_file, proc)
    assert ports["pid"] == proc.pid  # a restart replaces the process image, not the process
    assert _environ(proc.pid).get("GOMP_SPINCOUNT") == (user_value or "3000")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0, proc.stderr.read()  # type: ignore[union-attr]
