"""One server per ``--home``, and ``kloop serve --workers 2`` with the home's admin token: real
``kloop serve`` and ``ServerProcess`` servers (several processes, the OpenMP re-exec).

Checked: a second ``kloop serve`` on a home exits 2 naming the first, which keeps serving and
keeps its ``server.json``; the lock goes with the server process however it ends, across the
re-exec of ``python -m serving``; the workers of a group get the home's token from the
environment (never on a command line) and answer a change with the workers' 409; the supervisor
leaves a ``server.json`` that records another process."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from deploy.local.server_process import (
    LOCK_FILE,
    SERVER_FILE,
    TOKEN_FILE,
    HomeBusy,
    HomeLock,
    ServerProcess,
)
from tests.support.paths import REPO
from tests.support.processes import Processes
from tests.support.serving import MODEL


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    """No token and no OpenMP settings of the caller's: the home's token, and the re-exec."""
    drop = ("KLOOP_ADMIN_TOKEN", "KLOOP_HOME", "GOMP_SPINCOUNT", "OMP_WAIT_POLICY")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, "PYTHONPATH": str(REPO)}


def _kloop_serve(home: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "deploy.cli", "--home", str(home), "serve", *args]


def _home(registry_root: Path, tmp_path: Path) -> Path:
    home = tmp_path / "home"
    shutil.copytree(registry_root, home / "registry")
    return home


def _wait_for_record(home: Path, proc: subprocess.Popen[bytes], log: Path,
                     timeout: float = 90.0) -> dict[str, int]:
    """The home's server.json once the server wrote it (atomically: complete once there)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"exited {proc.returncode}: {log.read_text(errors='replace')}"
        try:
            record = json.loads((home / SERVER_FILE).read_text())
        except FileNotFoundError:
            time.sleep(0.05)
            continue
        if record.get("pid") == proc.pid:
            return dict(record)
        time.sleep(0.05)
    raise AssertionError(f"no server.json of pid {proc.pid} after {timeout}s: {log.read_text()}")


def _status(url: str, method: str = "GET", token: str | None = None) -> tuple[int, str]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)


def test_a_second_kloop_serve_on_one_home_exits_2_and_the_first_keeps_serving(
        registry_root: Path, tmp_path: Path, processes: Processes) -> None:
    home = _home(registry_root, tmp_path)
    log = tmp_path / "first.log"
    first = processes.spawn(_kloop_serve(home, "--http-port", "0", "--grpc-port", "0"),
                            cwd=REPO, env=_env(), log=log)
    record = _wait_for_record(home, first, log)
    assert (home / LOCK_FILE).read_text().strip() == str(first.pid)

    second = subprocess.run(_kloop_serve(home, "--http-port", "0", "--grpc-port", "0"),
                            cwd=REPO, env=_env(), capture_output=True, text=True, timeout=120,
                            check=False)
    assert second.returncode == 2, second.stderr
    assert (f"kloop serve: another kloop serve (pid {first.pid}) already serves home {home}; "
            "stop it first, or use another --home") in second.stderr
    assert json.loads((home / SERVER_FILE).read_text()) == record
    assert _status(f"http://127.0.0.1:{record['http']}/v2/health/ready")[0] == 200

    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=60) == 0, log.read_text()
    assert not (home / SERVER_FILE).exists()
    HomeLock.acquire(home).release()  # the lock went with the process


def test_a_server_process_keeps_the_home_lock_across_its_re_exec_and_loses_it_when_killed(
        registry_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY"):  # so that the child re-executes itself
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    server = ServerProcess(registry_root, home)
    try:
        handle = server.start()
        assert server.proc is not None and handle.pid == server.proc.pid
        assert _environ(server.proc.pid).get("GOMP_SPINCOUNT") == "3000"  # it did re-exec
        with pytest.raises(HomeBusy) as busy:
            HomeLock.acquire(home)
        assert busy.value.pid == server.proc.pid
        with pytest.raises(HomeBusy):
            ServerProcess(registry_root, home).start()
        assert json.loads((home / SERVER_FILE).read_text())["pid"] == server.proc.pid

        server.proc.kill()  # no clean stop: the kernel drops the lock with the process
        server.proc.wait(30)
        HomeLock.acquire(home).release()
    finally:
        server.stop()


def test_kloop_serve_with_two_workers_answers_a_change_with_the_workers_conflict(
        registry_root: Path, tmp_path: Path, processes: Processes) -> None:
    home = _home(registry_root, tmp_path)
    http_port, grpc_port = _free_port(), _free_port()
    log = tmp_path / "server.log"
    proc = processes.spawn(
        _kloop_serve(home, "--workers", "2", "--http-port", str(http_port), "--grpc-port",
                     str(grpc_port), "--grace-seconds", "5"),
        cwd=REPO, env=_env(), log=log)
    record = _wait_for_record(home, proc, log)
    token = (home / TOKEN_FILE).read_text().strip()
    base = f"http://127.0.0.1:{http_port}"

    for _ in range(4):  # new connections, spread over both workers
        assert _status(f"{base}/admin/models", token=token)[0] == 200
        status, body = _status(f"{base}/admin/models/{MODEL}/versions/1/load", "POST", token)
        assert status == 409, body
        assert "this server runs 2 worker processes" in json.loads(body)["error"]
    for pid in [proc.pid, *record["workers"]]:
        assert token.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()

    other = {**record, "pid": os.getpid()}  # as if another server wrote it since
    (home / SERVER_FILE).write_text(json.dumps(other))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0, log.read_text()
    assert json.loads((home / SERVER_FILE).read_text()) == other
