"""Run records reconciled with the world when they are read: a ``running`` run whose process is
gone becomes ``interrupted`` (resumable, its end fixed at its last update), and a run whose
rollout was finished by someone else learns the outcome from the stored rollout. Real SQLite
files and real pids (this process; a pid above the kernel's ``pid_max``, which no process has;
this process's pid with another identity, which is how a reused pid looks)."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest

from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.runs import (
    STEPS,
    Run,
    RunNotResumable,
    RunStore,
    owner_alive,
    process_token,
    rollout_outcome,
)
from deploy.local.sqlite import connect
from deploy.rollout import GateResult, Phase, Rollout, RolloutPolicy, Verdict, new_rollout

GONE_PID = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process can have it
TERMINAL = [p for p in Phase if p.terminal]


def _run(store: RunStore, tmp_path: Path, *, at: str = "train", pid: int | None = GONE_PID,
         token: str | None = "x:1") -> Run:
    """A run saved while its step ``at`` was running (the steps before it succeeded)."""
    run = Run.new("digits", {"spec": {}}, tmp_path / "runs")
    run.created -= 10  # its steps began in the past
    run.pid, run.pid_token = pid, token
    for name in STEPS[:STEPS.index(at)]:
        st = run.step(name)
        st.status, st.started, st.finished = "succeeded", run.created, run.created + 1
    st = run.step(at)
    st.status, st.started, st.message = "running", run.created + 1, "working"
    store.save(run)
    return run


def _terminal(rid: str, phase: Phase, *, gate: Verdict | None = Verdict.SUCCESSFUL,
              champion: int | None = 1) -> Rollout:
    r = new_rollout(rid, "digits", 2, champion, RolloutPolicy(), 100.0)
    return dataclasses.replace(
        r, phase=phase, reason=f"ended {phase.value}", updated=200.0, step=1,
        weights={2: 100} if phase is Phase.SUCCEEDED else {1: 100},
        gate=GateResult(gate, ("accuracy ok",)) if gate is not None else None)


def test_process_token_tells_a_live_process_from_a_gone_or_reused_pid() -> None:
    mine = process_token(os.getpid())
    assert mine and mine == process_token(os.getpid())
    assert process_token(GONE_PID) is None
    run = Run.new("digits", {}, Path("/nowhere"))
    assert (run.pid, run.pid_token) == (os.getpid(), mine)
    assert owner_alive(run) is True
    assert owner_alive(dataclasses.replace(run, pid_token="another-boot:1")) is False
    assert owner_alive(dataclasses.replace(run, pid=GONE_PID)) is False
    assert owner_alive(dataclasses.replace(run, pid=None)) is None


@pytest.mark.parametrize("how", ["gone", "pid reused"])
def test_a_running_run_whose_process_is_gone_reads_as_interrupted(tmp_path: Path, how: str) -> None:
    store = RunStore(tmp_path / "kloop.db")
    pid = GONE_PID if how == "gone" else os.getpid()
    saved = _run(store, tmp_path, at="evaluate", pid=pid, token="another-boot:1")
    [listed] = store.list()
    assert listed.status == "interrupted"
    assert listed.outcome == f"the pipeline process (pid {pid}) died"
    ev = listed.step("evaluate")
    assert ev.status == "failed" and ev.message == f"the pipeline process (pid {pid}) died; working"
    assert listed.step("train").status == "succeeded"
    assert [listed.step(n).status for n in STEPS[2:]] == ["pending"] * 4  # left for a resume
    # Its end is its last update, so its duration stops growing.
    assert listed.finished is not None and ev.finished == listed.finished
    assert listed.finished <= time.time()
    again = RunStore(tmp_path / "kloop.db").get(saved.id[-6:])
    assert again.status == "interrupted" and again.finished == listed.finished
    assert again.duration_s == listed.duration_s and ev.duration_s == again.step("evaluate").duration_s
    with connect(tmp_path / "kloop.db") as db:
        assert db.execute("SELECT status FROM runs").fetchone()[0] == "interrupted"


def test_the_end_of_an_interrupted_run_is_its_last_update(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "kloop.db")
    saved = _run(store, tmp_path)
    with connect(tmp_path / "kloop.db") as db:  # as if the process died an hour ago
        db.execute("UPDATE runs SET updated = ? WHERE id = ?", (saved.created + 3600, saved.id))
    run = store.get(saved.id)
    assert run.finished == saved.created + 3600 == run.step("train").finished
    assert run.duration_s == 3600


def test_live_and_ownerless_runs_are_left_running(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "kloop.db")
    live = _run(store, tmp_path, pid=os.getpid(), token=process_token(os.getpid()))
    legacy = _run(store, tmp_path, pid=None, token=None)  # written before runs named their process
    assert store.reconcile() == []
    assert store.get(live.id).status == "running" and store.get(legacy.id).status == "running"


def test_reconcile_reports_the_runs_it_marked(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "kloop.db")
    dead = _run(store, tmp_path)
    _run(store, tmp_path, pid=os.getpid(), token=process_token(os.getpid()))
    assert [r.id for r in store.reconcile()] == [dead.id]
    assert store.reconcile() == []  # saved: nothing left to do


def test_a_record_without_the_new_fields_still_loads(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "kloop.db")
    doc = Run.new("digits", {}, tmp_path).to_dict()
    for field in ("pid", "pid_token", "updated", "resumes"):
        del doc[field]
    with connect(tmp_path / "kloop.db") as db:
        db.execute("INSERT INTO runs (id, model, status, created, updated, doc) VALUES"
                   " (?, 'digits', 'running', ?, 5.0, ?)", (doc["id"], doc["created"], json.dumps(doc)))
    run = store.get(doc["id"])
    assert run.status == "running" and run.pid is None and run.updated == 5.0


@pytest.mark.parametrize("phase", TERMINAL, ids=lambda p: p.value)
def test_an_interrupted_run_learns_the_outcome_of_its_rollout_finished_elsewhere(
        tmp_path: Path, phase: Phase) -> None:
    store = RunStore(tmp_path / "kloop.db")
    saved = _run(store, tmp_path, at="canary")
    r = _terminal(f"{saved.id}-rollout", phase)
    saved.rollout_id = r.id
    store.save(saved)
    SQLiteRolloutStore(tmp_path / "kloop.db").create(r)
    run = store.get(saved.id)
    ok = phase in (Phase.SUCCEEDED, Phase.ROLLED_BACK)
    assert run.status == ("succeeded" if ok else "failed")
    assert run.outcome == rollout_outcome(r) and run.outcome
    assert run.finished == 200.0
    canary, decide = run.step("canary"), run.step("decide")
    assert canary.status == ("succeeded" if phase is Phase.SUCCEEDED else "failed")
    assert canary.message == f"ended {phase.value}" and canary.finished == 200.0
    assert decide.status == "succeeded"
    assert decide.message.startswith(f"{run.outcome}: ended {phase.value}")
    assert f"rollout {r.id} finished after this run stopped" in decide.message
    assert decide.metrics["phase"] == phase.value
    assert run.step("gate").status == "succeeded"
    assert store.reconcile() == []  # learned once, and saved


def test_a_rollout_that_failed_its_gate_skips_the_canary(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "kloop.db")
    saved = _run(store, tmp_path, at="gate")
    r = _terminal(f"{saved.id}-rollout", Phase.ROLLED_BACK, gate=Verdict.FAILED)
    saved.rollout_id = r.id
    store.save(saved)
    SQLiteRolloutStore(tmp_path / "kloop.db").create(r)
    run = store.get(saved.id)
    assert (run.status, run.outcome) == ("succeeded", "rolled back by the gate")
    assert [run.step(n).status for n in ("gate", "canary", "decide")] == ["failed", "skipped", "succeeded"]
    assert run.step("gate").message == "accuracy ok"


def test_an_active_rollout_leaves_the_run_interrupted(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "kloop.db")
    saved = _run(store, tmp_path, at="canary")
    r = SQLiteRolloutStore(tmp_path / "kloop.db").create(
        dataclasses.replace(new_rollout(f"{saved.id}-rollout", "digits", 2, 1, RolloutPolicy(), 1.0),
                            phase=Phase.PROGRESSING))
    saved.rollout_id = r.id
    store.save(saved)
    run = store.get(saved.id)
    assert run.status == "interrupted" and run.step("decide").status == "pending"


def test_a_live_pipeline_records_its_own_rollout(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "kloop.db")
    saved = _run(store, tmp_path, at="canary", pid=os.getpid(), token=process_token(os.getpid()))
    r = _terminal(f"{saved.id}-rollout", Phase.SUCCEEDED)
    saved.rollout_id = r.id
    store.save(saved)
    SQLiteRolloutStore(tmp_path / "kloop.db").create(r)
    run = store.get(saved.id)
    assert run.status == "running" and run.step("canary").status == "running"


def test_claim_makes_this_process_the_owner_once(tmp_path: Path) -> None:
    store = RunStore(tmp_path / "kloop.db")
    saved = _run(store, tmp_path)
    run = store.claim(saved.id)
    assert (run.status, run.pid, run.pid_token, run.resumes) == (
        "running", os.getpid(), process_token(os.getpid()), 1)
    assert run.finished is None and store.get(saved.id).status == "running"
    with pytest.raises(RunNotResumable, match=f"running in pid {os.getpid()}"):
        store.claim(saved.id)
    run.status = "succeeded"
    store.save(run)
    with pytest.raises(RunNotResumable, match="succeeded"):
        store.claim(saved.id)


@pytest.mark.parametrize(("phase", "gate", "champion", "outcome"), [
    (Phase.SUCCEEDED, Verdict.SUCCESSFUL, 1, "promoted"),
    (Phase.SUCCEEDED, Verdict.SUCCESSFUL, None, "champion (first version)"),
    (Phase.ROLLED_BACK, Verdict.FAILED, 1, "rolled back by the gate"),
    (Phase.ROLLED_BACK, Verdict.SUCCESSFUL, 1, "rolled back by live analysis"),
    (Phase.ROLLED_BACK, Verdict.INCONCLUSIVE, 1, "rolled back by live analysis"),
    (Phase.ABORTED, None, 1, "aborted"),
    (Phase.NEEDS_ATTENTION, Verdict.SUCCESSFUL, 1, "needs attention"),
])
def test_rollout_outcome(phase: Phase, gate: Verdict | None, champion: int | None,
                         outcome: str) -> None:
    assert rollout_outcome(_terminal("r", phase, gate=gate, champion=champion)) == outcome


@pytest.mark.parametrize("phase", TERMINAL, ids=lambda p: p.value)
def test_every_terminal_phase_has_a_readable_outcome(phase: Phase) -> None:
    text = rollout_outcome(_terminal("r", phase))
    assert text and text == text.lower() and phase.value not in text
