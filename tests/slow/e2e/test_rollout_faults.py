"""Every rollout ends, and no ending takes the model offline (issue 16), with real processes: a
real ``kloop serve`` found through ``$KLOOP_HOME/server.json``, a real ``kloop rollout``, real
signals (SIGINT, SIGKILL, SIGTERM), real traffic counted per version by a client.

Checked, each with its end state (phase, exit code, message, the server's weights, the champion
alias): without a champion alias the served version is adopted and gates the candidates; a
first version that never gets enough traffic is aborted and keeps serving; a candidate whose
files do not verify (before or during its canary) is rolled back at once and never promoted; a
``--workers`` server's refusal aborts with its reason; a server killed mid-canary ends the
rollout within its outage bound; Ctrl-C says how to go on, ``kloop rollout abort`` restores
the champion; resuming with other flags is refused; a second server on one home exits 2;
``kloop status`` shows what is loaded at which weight; bad flags exit 2 with a short message.
The client never sees a 404 (model not loaded) while a server runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.server_process import SERVER_FILE, ServerHandle, discover
from deploy.local.traffic import LiveData, TrafficConfig, TrafficGenerator
from deploy.rollout import Phase, Rollout
from kloop.artifact import Registry
from tests.support.artifacts import publish_exported
from tests.support.paths import REPO
from tests.support.processes import Processes

MODEL = "digits"
FAST = ("--interval", "0.2")
# Latency noise on a shared 2-core machine must not fail a canary these tests mean to pass.
LENIENT = ("--max-p99-ratio", "3", "--p99-slack-ms", "50")


def _wait_for(predicate: Callable[[], object], timeout: float, what: str,
              proc: subprocess.Popen[Any] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited {proc.returncode} first"
                                 + (f":\n{log.read_text(errors='replace')}" if log else ""))
        if time.monotonic() > deadline:
            raise TimeoutError(what + (f":\n{log.read_text(errors='replace')}" if log else ""))
        time.sleep(0.05)


class Kloop:
    """The ``kloop`` command on one home: servers and rollouts as child processes of the test
    (``processes``: stopped at teardown whatever happened), short commands run to completion."""

    def __init__(self, tmp_path: Path, processes: Processes) -> None:
        self.home = tmp_path / "home"
        self.tmp = tmp_path
        self.processes = processes
        self.registry = Registry(self.home / "registry")
        self._env = {**{k: v for k, v in os.environ.items()
                        if k not in ("KLOOP_ADMIN_TOKEN", "KLOOP_HOME")},
                     "PYTHONPATH": str(REPO)}
        self._logs = 0

    @functools.cached_property
    def store(self) -> SQLiteRolloutStore:
        return SQLiteRolloutStore(self.home / "kloop.db")

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "deploy.cli", "--home", str(self.home), *args]

    def publish(self, seed: int, accuracy: float) -> int:
        return publish_exported(self.registry.root, MODEL, seed=seed, accuracy=accuracy,
                                tmp=self.tmp).version

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), check=False, capture_output=True, text=True,
                              timeout=timeout, env=self._env, cwd=REPO)

    def spawn(self, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
        """Started in the background; stdout and stderr go to the returned log file."""
        self._logs += 1
        log = self.tmp / f"{args[0]}-{self._logs}.log"
        return self.processes.spawn(self.argv(*args), log=log, env=self._env, cwd=REPO), log

    def serve(self, *extra: str) -> tuple[subprocess.Popen[bytes], ServerHandle]:
        ports = extra if "--http-port" in extra else ("--http-port", "0", "--grpc-port", "0")
        proc, log = self.spawn("serve", *ports, *extra)

        def found() -> ServerHandle | None:
            h = discover(self.home)
            return h if h is not None and h.pid == proc.pid else None

        _wait_for(found, 90, "kloop serve did not record server.json", proc, log)
        handle = found()
        assert handle is not None
        return proc, handle

    def kill(self, proc: subprocess.Popen[Any]) -> None:
        os.killpg(proc.pid, signal.SIGKILL)  # the group: a server's workers too
        proc.wait(30)

    def latest_rollout(self) -> Rollout:
        rollouts = self.store.list(model=MODEL)
        assert len(rollouts) >= 1, "no rollout was created"
        return rollouts[-1]


@contextlib.contextmanager
def _traffic(handle: ServerHandle, rate: float = 40) -> Iterator[TrafficGenerator]:
    images = np.random.default_rng(0).random((32, 1, 8, 8), dtype=np.float32)
    cfg = TrafficConfig(model=MODEL, http_url=handle.http_url, grpc_target=handle.grpc_target,
                        rate_per_s=rate)
    with TrafficGenerator(cfg, LiveData.labelled(images, [0] * 32)) as traffic:
        _wait_for(lambda: _served(traffic, "1", "2", "3") >= 4, 30, "no traffic was answered")
        yield traffic
    assert traffic.error is None, traffic.error


def _served(traffic: TrafficGenerator, *versions: str) -> int:
    by = traffic.by_version()
    return sum(by[v].requests - by[v].errors for v in versions if v in by)


def _not_found(traffic: TrafficGenerator) -> dict[str, int]:
    """Answers "model not loaded / no such model" (HTTP 404, gRPC NOT_FOUND) the client got."""
    return {m: n for m, n in traffic.failures().items() if m.startswith(("404", "NOT_FOUND"))}


def _flip_byte(reg: Registry, version: int) -> None:
    """One byte of the version's model file changed in place, as a disk or a hand might."""
    path = reg.path(MODEL, version) / reg.manifest(MODEL, version).model_file
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _loaded(handle: ServerHandle) -> list[str]:
    return [str(v) for v in handle.admin().models()[MODEL]["versions"]]


def _out(p: subprocess.CompletedProcess[str]) -> str:
    return f"exit {p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"


# ---- the champion: the alias, else the version serving now --------------------------------


def test_without_a_champion_alias_the_served_version_is_adopted_and_gates_candidates(
        tmp_path: Path, processes: Processes) -> None:
    k = Kloop(tmp_path, processes)
    for seed, acc in ((1, 0.80), (2, 0.85), (3, 0.94)):
        k.publish(seed, acc)
    _, handle = k.serve()
    assert handle.admin().traffic(MODEL) == {3: 100}, "no alias: the server starts on the latest"
    gate = ("--min-requests", "0", "--min-duration", "0", "--interval", "0.3")

    # 1. No alias, no traffic: v3 (served) is adopted; v1 is 0.14 worse and rolled back.
    started = time.monotonic()
    first = k.run("rollout", MODEL, "--candidate", "1", *gate, timeout=90)
    took = time.monotonic() - started
    assert first.returncode == 1, _out(first)
    assert "vs champion v3 (no alias: the version serving now, now the champion alias)" in \
        first.stdout, _out(first)
    r = k.latest_rollout()
    assert (r.phase, r.champion) == (Phase.ROLLED_BACK, 3), r.reason
    assert "gate failed" in r.reason, r.reason
    assert took < 60, f"the gate's rollback took {took:.0f}s"
    assert k.registry.alias(MODEL, "champion") == 3, "the adopted champion is recorded"
    assert handle.admin().traffic(MODEL) == {3: 100}

    # The model is free again: the next candidate's rollout is accepted (and gated on v3).
    second = k.run("rollout", MODEL, "--candidate", "2", *gate, timeout=90)
    assert "already has active rollout" not in second.stderr, _out(second)
    assert second.returncode == 1 and "vs champion v3" in second.stdout, _out(second)
    assert k.latest_rollout().candidate == 2 and k.latest_rollout().phase is Phase.ROLLED_BACK

    # 3. Under traffic, no alias again, a bad v4 published after the server started: the gate
    # judges it against v3 (what users get), and v4 never sees a request.
    k.registry.remove_alias(MODEL, "champion")
    k.publish(4, 0.10)
    with _traffic(handle) as traffic:
        third = k.run("rollout", MODEL, "--candidate", "latest", *LENIENT, *FAST, timeout=90)
        _wait_for(lambda: _served(traffic, "3") >= 20, 30, "v3 stopped answering")
    assert third.returncode == 1, _out(third)
    assert "digits v4 vs champion v3 (no alias" in third.stdout, _out(third)
    r = k.latest_rollout()
    assert (r.candidate, r.champion, r.phase) == (4, 3, Phase.ROLLED_BACK), r.reason
    assert "gate failed" in r.reason and "accuracy" in r.reason, r.reason
    served = traffic.by_version()
    assert "4" not in served, f"v4 got traffic: {served}"
    assert served["3"].requests > 0 and not _not_found(traffic), traffic.failures()
    assert handle.admin().traffic(MODEL) == {3: 100}
    assert k.registry.alias(MODEL, "champion") == 3


# ---- a first version; one server per home; what `kloop status` shows ------------------------


def test_a_first_version_that_times_out_is_aborted_and_keeps_serving(
        tmp_path: Path, processes: Processes) -> None:
    k = Kloop(tmp_path, processes)
    k.publish(1, 0.90)
    server, handle = k.serve()
    assert handle.admin().traffic(MODEL) == {1: 100}

    # 2. A first version (no champion) that never reaches --min-requests: the step times out,
    # the rollout aborts, and v1 -- all the model has -- keeps serving throughout.
    with _traffic(handle, rate=20) as traffic:
        started = time.monotonic()
        out = k.run("rollout", MODEL, "--candidate", "1", "--min-requests", "1000",
                    "--min-duration", "0", "--step-timeout", "3", "--interval", "0.3",
                    timeout=90)
        took = time.monotonic() - started
        after = _served(traffic, "1")
        _wait_for(lambda: _served(traffic, "1") >= after + 10, 30,
                  "v1 stopped serving after the abort")
    assert out.returncode == 1, _out(out)
    assert "(none: first version)" in out.stdout, _out(out)
    r = k.latest_rollout()
    assert r.phase is Phase.ABORTED, f"{r.phase}: {r.reason}"
    assert "timed out" in r.reason, r.reason
    assert took < 60, f"a 3 s step timeout took {took:.0f}s to end the rollout"
    assert handle.admin().traffic(MODEL) == {1: 100}
    assert not _not_found(traffic), f"the client saw the model offline: {traffic.failures()}"
    assert set(traffic.by_version()) == {"1"}, traffic.failures()

    # 6. A second server on the same home exits 2; the first keeps serving and its record.
    record = (k.home / SERVER_FILE).read_text()
    second = k.run("serve", "--http-port", "0", "--grpc-port", "0", timeout=120)
    assert second.returncode == 2, _out(second)
    assert "already serves home" in second.stderr and str(server.pid) in second.stderr, \
        _out(second)
    assert (k.home / SERVER_FILE).read_text() == record, "the second server touched server.json"
    assert server.poll() is None and handle.admin().traffic(MODEL) == {1: 100}

    # 7. `kloop status` finds the first server and shows what is loaded at which weight.
    k.publish(2, 0.91)
    handle.admin().load(MODEL, 2)
    handle.admin().set_traffic(MODEL, {1: 90, 2: 10})
    status = k.run("status", timeout=60)
    assert status.returncode == 0, _out(status)
    assert f"server: {handle.http_url}" in status.stdout, _out(status)
    rows = _status_rows(status.stdout)
    assert rows.get("1", [])[-2:] == ["yes", "90%"], f"v1 row {rows.get('1')}:\n{status.stdout}"
    assert rows.get("2", [])[-2:] == ["yes", "10%"], f"v2 row {rows.get('2')}:\n{status.stdout}"


def _status_rows(text: str) -> dict[str, list[str]]:
    """The version table's rows by version: version, alias, ..., loaded, weight."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in re.split(r"[│|┃]", line)[1:-1]]
        if len(cells) == 8 and cells[0].isdigit():
            rows[cells[0]] = cells
    return rows


# ---- candidates whose files do not verify ---------------------------------------------------


def test_a_candidate_whose_files_do_not_verify_is_rolled_back_and_never_promoted(
        tmp_path: Path, processes: Processes) -> None:
    k = Kloop(tmp_path, processes)
    for seed, acc in ((1, 0.90), (2, 0.91), (3, 0.92)):
        k.publish(seed, acc)
    k.registry.set_alias(MODEL, "champion", 1)
    server, handle = k.serve()
    assert handle.admin().traffic(MODEL) == {1: 100}

    with _traffic(handle) as traffic:
        # 4a. v2's model file changed before its rollout: the load is refused (422) and the
        # rollout ends at once, blaming v2's files, instead of retrying the load.
        _flip_byte(k.registry, 2)
        started = time.monotonic()
        out = k.run("rollout", MODEL, "--candidate", "2", *FAST, timeout=90)
        took = time.monotonic() - started
        assert out.returncode == 1, _out(out)
        r = k.latest_rollout()
        assert r.phase is Phase.ROLLED_BACK, f"{r.phase}: {r.reason}"
        assert "sha256" in r.reason and "does not match" in r.reason, r.reason
        assert len(r.history) <= 4, [e.message for e in r.history]  # a few ticks, no retries
        assert r.updated - r.created < 10 and took < 60, \
            f"a refused load took {r.updated - r.created:.1f}s ({took:.0f}s with the command)"
        assert handle.admin().traffic(MODEL) == {1: 100}
        assert _loaded(handle) == ["1"]

        # 5. v3's model file changes while its canary runs: it is not promoted.
        canary, log = k.spawn("rollout", MODEL, "--candidate", "3", "--steps", "50,100",
                              "--min-requests", "10", "--min-duration", "1",
                              "--retire-after", "0", *LENIENT, *FAST)
        _wait_for(lambda: (a := k.store.active(MODEL)) is not None and a.step >= 0, 60,
                  "v3's canary did not reach its first step", canary, log)
        _flip_byte(k.registry, 3)
        assert canary.wait(90) == 1, log.read_text()
        _wait_for(lambda: _served(traffic, "1") >= 20, 30, "v1 stopped answering")
    r = k.latest_rollout()
    assert (r.candidate, r.phase) == (3, Phase.ROLLED_BACK), f"{r.phase}: {r.reason}"
    assert "files no longer verify" in r.reason and "sha256" in r.reason, r.reason
    assert traffic.by_version().get("3") is not None, "v3 never got canary traffic"
    assert not _not_found(traffic), f"the client saw the model offline: {traffic.failures()}"
    assert k.registry.alias(MODEL, "champion") == 1, "a changed candidate became the champion"
    assert handle.admin().traffic(MODEL) == {1: 100}
    assert _loaded(handle) == ["1"]

    # A restart serves the champion, which the rollback never moved.
    server.send_signal(signal.SIGTERM)
    assert server.wait(60) == 0
    _, handle = k.serve()
    assert handle.admin().traffic(MODEL) == {1: 100}
    _serves_only_v1(handle)


def _serves_only_v1(handle: ServerHandle) -> None:
    """A client of a (re)started server gets v1's answers, and nothing else."""
    with _traffic(handle) as traffic:
        _wait_for(lambda: _served(traffic, "1") >= 10, 30, "v1 did not answer")
    assert set(traffic.by_version()) == {"1"}, traffic.failures()


def test_a_server_with_workers_refuses_the_rollout_and_says_why(
        tmp_path: Path, processes: Processes) -> None:
    import socket

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    k = Kloop(tmp_path, processes)
    k.publish(1, 0.90)
    k.publish(2, 0.91)
    k.registry.set_alias(MODEL, "champion", 1)
    _, handle = k.serve("--workers", "2", "--http-port", str(free_port()),
                        "--grpc-port", str(free_port()))

    # 4b. A --workers server answers the load with 409: aborted at once, with its reason.
    started = time.monotonic()
    out = k.run("rollout", MODEL, "--candidate", "2", *FAST, timeout=90)
    took = time.monotonic() - started
    assert out.returncode == 1, _out(out)
    r = k.latest_rollout()
    assert r.phase is Phase.ABORTED, f"{r.phase}: {r.reason}"
    assert "worker processes" in r.reason and "management disabled" not in r.reason, r.reason
    assert took < 60, f"a refused load took {took:.0f}s to end the rollout"
    assert handle.admin().traffic(MODEL) == {1: 100}
    assert k.registry.alias(MODEL, "champion") == 1


# ---- resume, Ctrl-C, abort ------------------------------------------------------------------


def test_resume_with_other_flags_is_refused_and_ctrl_c_then_abort_restores_the_champion(
        tmp_path: Path, processes: Processes) -> None:
    k = Kloop(tmp_path, processes)
    k.publish(1, 0.90)
    k.publish(2, 0.91)
    k.registry.set_alias(MODEL, "champion", 1)
    _, handle = k.serve()
    flags = ("rollout", MODEL, "--candidate", "2", "--steps", "10,50,100",
             "--min-requests", "1000", "--min-duration", "0", *FAST)
    at_10 = {2: 10, 1: 90}

    with _traffic(handle) as traffic:
        # 8. Killed at 10 %, then started again with another --min-requests: refused, named.
        first, log = k.spawn(*flags)
        _wait_for(lambda: (a := k.store.active(MODEL)) is not None and a.step >= 0, 60,
                  "the rollout did not reach its first step", first, log)
        k.kill(first)
        killed = k.store.active(MODEL)
        assert killed is not None and killed.phase is Phase.PROGRESSING
        assert dict(killed.weights) == at_10 and handle.admin().traffic(MODEL) == at_10

        other = k.run(*[("999" if f == "1000" else f) for f in flags], timeout=60)
        assert other.returncode == 2, _out(other)
        assert "--min-requests 999 (stored: 1000)" in other.stderr, _out(other)
        assert k.store.active(MODEL) == killed, "a refused resume changed the rollout"

        # The same flags resume it, at the same step.
        again, log = k.spawn(*flags)
        _wait_for(lambda: f"resuming rollout {killed.id}" in log.read_text(), 60,
                  "the rollout did not resume", again, log)  # printed once it has ticked

        # 9. Ctrl-C: exit 130, and the message says how to resume or abort.
        again.send_signal(signal.SIGINT)
        assert again.wait(30) == 130, log.read_text()
        said = log.read_text()
        assert "kloop rollout abort digits" in said, said
        assert "kloop rollout digits --candidate 2" in said, said
        assert k.store.active(MODEL) is not None, "Ctrl-C must leave the rollout as it is"
        assert handle.admin().traffic(MODEL) == at_10

        abort = k.run("rollout", "abort", MODEL, timeout=60)
        assert abort.returncode == 1, _out(abort)
        assert "Aborted" in abort.stdout, _out(abort)
        _wait_for(lambda: _served(traffic, "1") >= 20, 30, "v1 stopped answering")
    r = k.store.get(killed.id)
    assert r.phase is Phase.ABORTED and "aborted by the user" in r.reason, r.reason
    assert handle.admin().traffic(MODEL) == {1: 100}
    assert _loaded(handle) == ["1"], "the aborted candidate stays loaded"
    assert k.registry.alias(MODEL, "champion") == 1
    assert not _not_found(traffic), f"the client saw the model offline: {traffic.failures()}"

    status = k.run("rollout", "status", MODEL, timeout=60)
    assert status.returncode == 0, _out(status)
    assert killed.id in status.stdout and "Aborted" in status.stdout, _out(status)

    # --interval 0: refused while parsing, before any rollout exists.
    count = len(k.store.list(model=MODEL))
    zero = k.run("rollout", MODEL, "--candidate", "2", "--interval", "0", timeout=60)
    assert zero.returncode == 2 and "--interval" in zero.stderr, _out(zero)
    assert len(k.store.list(model=MODEL)) == count and k.store.active(MODEL) is None


# ---- the server dies mid-canary -------------------------------------------------------------


def test_a_server_killed_mid_canary_ends_the_rollout_within_its_outage_bound(
        tmp_path: Path, processes: Processes) -> None:
    k = Kloop(tmp_path, processes)
    k.publish(1, 0.90)
    k.publish(2, 0.91)
    k.registry.set_alias(MODEL, "champion", 1)
    server, handle = k.serve()

    with _traffic(handle) as traffic:
        rollout, log = k.spawn("rollout", MODEL, "--candidate", "2", "--min-requests", "1000",
                               "--min-duration", "0", "--outage-tolerance", "3",
                               "--error-limit", "3", *FAST)
        _wait_for(lambda: (a := k.store.active(MODEL)) is not None and a.step >= 0, 60,
                  "the rollout did not reach its first step", rollout, log)
        assert not _not_found(traffic), f"the client saw the model offline: {traffic.failures()}"
        # 10. The server dies and stays down: the rollout gives up within its bound.
        k.kill(server)
        killed_at = time.monotonic()
        code = rollout.wait(90)
        took = time.monotonic() - killed_at
    assert code == 1, log.read_text()
    assert took < 60, f"the rollout ran {took:.0f}s with its server gone (tolerance 3 s)"
    r = k.latest_rollout()
    assert r.phase in (Phase.NEEDS_ATTENTION, Phase.ABORTED), f"{r.phase}: {r.reason}"
    assert r.reason, "a rollout that gave up must say why"
    assert f"{r.phase.value} {r.reason}" in log.read_text(), log.read_text()
    assert k.registry.alias(MODEL, "champion") == 1, "the alias moved during an outage"

    # Started again, the server serves the champion alone.
    _, handle = k.serve()
    assert handle.admin().traffic(MODEL) == {1: 100}
    assert _loaded(handle) == ["1"]
    _serves_only_v1(handle)


# ---- argument errors ------------------------------------------------------------------------


def test_bad_rollout_flags_exit_2_with_a_short_clear_message(
        tmp_path: Path, processes: Processes) -> None:
    k = Kloop(tmp_path, processes)

    weight = k.run("rollout", MODEL, "--candidate", "2", "--weight", "101", "--target", "kserve",
                   "--dry-run", timeout=60)
    assert weight.returncode == 2, _out(weight)
    assert "--weight: must be a percent in 0..100, got 101" in weight.stderr, _out(weight)
    assert "choose from" not in weight.stderr and "99, 100" not in weight.stderr, weight.stderr

    inf = k.run("rollout", MODEL, "--candidate", "2", "--step-timeout", "inf", timeout=60)
    assert inf.returncode == 2, _out(inf)
    assert "--step-timeout: must be a finite number, got inf" in inf.stderr, _out(inf)
    assert "Traceback" not in inf.stderr, inf.stderr
    assert not k.home.exists(), "a refused command created the home"
