"""Pipeline run records: what ran, step by step, with status, timings, metrics and logs.

A run is one JSON document in the ``runs`` table of the same SQLite file as the rollouts
(``<home>/kloop.db``), rewritten whole on every step change: a reader (``kloop runs``, another
process) sees a consistent record, and history survives restarts. Steps are fixed by the
pipeline (``STEPS``); each is pending → running → succeeded | failed | skipped. A run is
running → succeeded | failed | interrupted | cancelled; ``interrupted``, ``failed`` and
``cancelled`` runs can be resumed (``kloop pipeline resume``, the control plane's retry), which
makes them running again under the same id, from the step that did not finish.

Why a record names its process: a pipeline killed by SIGKILL (or a reboot) cannot write its
end. The record carries the pid of the process that runs it and that process's identity (the
boot and its start time, so a reused pid is not mistaken for it); whoever reads runs
(``RunStore.get``, ``list``, ``reconcile``) marks a ``running`` run whose process is gone
``interrupted``, ending it at its last update. And a run's rollout may be finished by someone
else (``kloop rollout`` resuming it, an abort): readers then finish the run's gate, canary and
decide steps from the stored rollout. Both are written under the database's write lock after
reading the record again, so they never overwrite a live pipeline or a resume that claimed the
run in between.
"""

from __future__ import annotations

import builtins
import dataclasses
import functools
import json
import os
import re
import sqlite3
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.sqlite import DB_FILE, connect, migrate, transaction
from deploy.ports import NotFound
from deploy.rollout import Phase, Rollout, Verdict

STEPS = ("train", "evaluate", "publish", "gate", "canary", "decide")
RESUMABLE = ("interrupted", "failed", "cancelled")  # what ``kloop pipeline resume`` continues
STATUSES = ("running", "succeeded", "failed", "interrupted", "cancelled")
_DONE = ("succeeded", "failed", "skipped")  # a step's final statuses
_LEGACY_DIRECTIONS = {"accuracy": "higher", "loss": "lower"}  # the digits CNN's, before tasks

_SCHEMA = (
    """
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        status TEXT NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE INDEX runs_created ON runs (created)
    """,
    # Keyset paging (``RunStore.page``): newest first, by model or status, without a scan.
    """
    CREATE INDEX runs_created_id ON runs (created, id);
    CREATE INDEX runs_model_created ON runs (model, created, id);
    CREATE INDEX runs_status_created ON runs (status, created, id)
    """,
)


class RunNotResumable(Exception):
    """The run succeeded, or a live process runs it."""


@dataclasses.dataclass
class Step:
    name: str
    status: str = "pending"
    started: float | None = None
    finished: float | None = None
    message: str = ""
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    attempts: int = 0  # times the step started in this run (a retried step shows several)

    @property
    def duration_s(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    def reset(self) -> None:
        """Back to pending, for a resumed run to do again."""
        self.status, self.started, self.finished, self.message = "pending", None, None, ""
        self.metrics = {}


@dataclasses.dataclass
class Run:
    id: str
    model: str
    created: float
    params: dict[str, Any]
    status: str = "running"
    steps: list[Step] = dataclasses.field(default_factory=lambda: [Step(n) for n in STEPS])
    version: int | None = None  # the version this run published
    outcome: str = ""  # promoted | rolled back | champion (first version) | failed: ...
    rollout_id: str | None = None
    run_dir: str = ""
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)  # evaluation metrics
    # How the task judges them (``ResolvedTask.evaluation``: the primary metric, each metric's
    # direction and threshold), as the manifest has it. Empty in records written before runs
    # trained tasks: those were the digits CNN's (``primary_metric`` answers "accuracy").
    evaluation: dict[str, Any] = dataclasses.field(default_factory=dict)
    finished: float | None = None
    # Who runs it: the pipeline process, and its identity (``process_token``) against pid
    # reuse. None in records written before runs named their process: those are never judged.
    pid: int | None = None
    pid_token: str | None = None
    updated: float | None = None  # the last save (RunStore.save sets it)
    resumes: int = 0  # times ``kloop pipeline resume`` picked it up

    @classmethod
    def new(cls, model: str, params: Mapping[str, Any], run_dir_root: Path) -> Run:
        """A run owned by this process."""
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        run = cls(id=run_id, model=model, created=time.time(), params=dict(params),
                  run_dir=str(run_dir_root / run_id))
        run.pid, run.pid_token = os.getpid(), process_token(os.getpid())
        return run

    @property
    def duration_s(self) -> float:
        return (self.finished or time.time()) - self.created

    @property
    def primary_metric(self) -> str:
        """The metric the run is judged by (its task's), "accuracy" in older records."""
        return str(self.evaluation.get("primary") or "accuracy")

    def direction(self, metric: str) -> str | None:
        """"higher" or "lower" (which is better) for ``metric``, None when not declared."""
        declared = self.evaluation.get("metrics", {}).get(metric)
        if isinstance(declared, Mapping):
            d = declared.get("direction")
            return d if d in ("higher", "lower") else None
        return None if self.evaluation else _LEGACY_DIRECTIONS.get(metric)

    def step(self, name: str) -> Step:
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(f"no step {name!r}; steps are {STEPS}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Run:
        d = dict(d)
        d["steps"] = [Step(**s) for s in d["steps"]]
        return cls(**d)


# ---- who runs a run -------------------------------------------------------------------------


def process_token(pid: int) -> str | None:
    """An identity of process ``pid`` that a later process reusing the pid does not share, or
    ``None`` when no such process runs (a zombie, dead but not yet reaped, counts as gone).

    On Linux: this boot's id and the process's start time (``/proc/PID/stat``, field 22).
    Elsewhere only existence can be checked: ``""`` for "it exists"."""
    if not _HAS_PROC:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass  # someone else's process: it exists
        return ""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces and ")"
    if fields[0] in ("Z", "X"):
        return None
    return f"{_boot_id()}:{fields[19]}"


def owner_alive(run: Run) -> bool | None:
    """Is the process that runs ``run`` still running? None when the record names none."""
    if run.pid is None:
        return None
    token = process_token(run.pid)
    if token is None:
        return False
    return not run.pid_token or not token or token == run.pid_token


_HAS_PROC = Path("/proc/self/stat").exists()


@functools.cache
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


# ---- what a finished rollout means for its run -----------------------------------------------


def rollout_outcome(r: Rollout) -> str:
    """A run's outcome from its rollout's phase; a phase without a sentence of its own (an
    abort, NeedsAttention, one added later) reads as its name in words."""
    if r.phase is Phase.SUCCEEDED:
        return "promoted" if r.champion is not None else "champion (first version)"
    if r.phase is Phase.ROLLED_BACK:
        gated = r.gate is not None and not gate_passed(r.gate.verdict)
        return "rolled back by the gate" if gated else "rolled back by live analysis"
    return re.sub(r"(?<!^)(?=[A-Z])", " ", r.phase.value).lower()


def gate_passed(verdict: Verdict) -> bool:
    """The rollout goes on to traffic after these gate verdicts (``deploy.rollout.decide``)."""
    return verdict in (Verdict.SUCCESSFUL, Verdict.INCONCLUSIVE)


def outcome_status(phase: Phase) -> str:
    """The run's status once its rollout ended in ``phase``: promoted and rolled back are the
    pipeline doing its job; anything else (aborted, needs attention) is a failed run."""
    return "succeeded" if phase in (Phase.SUCCEEDED, Phase.ROLLED_BACK) else "failed"


def record_rollout(run: Run, r: Rollout, *, end: float, note: str = "") -> None:
    """Finish ``run``'s gate, canary and decide steps, and its outcome, from its terminal
    rollout: the rollout is where their truth is kept. A step this changes ends at ``end``;
    ``note`` is added to the decide step's message."""
    gate_step, canary, decide = run.step("gate"), run.step("canary"), run.step("decide")
    passed = r.gate is not None and gate_passed(r.gate.verdict)
    if r.gate is not None:
        _set(gate_step, "succeeded" if passed else "failed", "; ".join(r.gate.reasons),
             end, start=r.created)
    else:  # ended before the gate ran (e.g. aborted)
        _set(gate_step, "failed", r.reason, end, start=r.created)
    if passed:
        _set(canary, "succeeded" if r.phase is Phase.SUCCEEDED else "failed", r.reason, end,
             start=gate_step.finished or end)
        canary.metrics = {"weights": {str(v): w for v, w in r.weights.items()}, "step": r.step,
                          "failed_analyses": r.failed}
    else:
        _set(canary, "skipped", canary.message if canary.status == "skipped" else "", end,
             start=None)
    run.outcome = rollout_outcome(r)
    message = f"{run.outcome}: {r.reason}" if r.reason else run.outcome
    _set(decide, "succeeded", f"{message} ({note})" if note else message, end, start=end)
    decide.metrics = {"phase": r.phase.value, "weights": {str(v): w for v, w in r.weights.items()}}


def _set(st: Step, status: str, message: str, end: float, *, start: float | None) -> None:
    if (st.status, st.message) != (status, message) or st.finished is None:
        st.finished = end  # what the rollout says is new: it ended when the rollout did
    st.status, st.message = status, message
    if st.started is None and start is not None:
        st.started = min(start, st.finished)


def reconcile(run: Run, rollout: Rollout | None, *, alive: bool | None) -> bool:
    """Bring a record read from the store up to date with the world; True if it changed.

    * ``running`` while its process (``alive``, see ``owner_alive``) is gone: ``interrupted``,
      its running step failed, ending at the record's last update;
    * not running, its rollout terminal, its decide step not done: the steps the rollout
      decided are recorded from it (``record_rollout``), and the run's status follows.
    """
    changed = False
    if run.status == "running" and alive is False:
        end = run.updated or run.created
        note = f"the pipeline process (pid {run.pid}) died"
        for s in run.steps:
            if s.status == "running":
                s.status, s.finished = "failed", max(end, s.started or end)
                s.message = f"{note}; {s.message}" if s.message else note
        run.status, run.outcome, run.finished = "interrupted", note, end
        changed = True
    if (run.status != "running" and rollout is not None and rollout.phase.terminal
            and run.step("decide").status != "succeeded"):
        record_rollout(run, rollout, end=rollout.updated,
                       note=f"rollout {rollout.id} finished after this run stopped")
        run.status, run.finished = outcome_status(rollout.phase), rollout.updated
        changed = True
    return changed


# ---- the store ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunPage:
    runs: list[Run]
    next: tuple[float, str] | None  # pass as ``after`` for the next page; None on the last


class RunStore:
    """Runs in SQLite. One short transaction per write; safe to share the file across processes.

    Reads (``get``, ``list``) return records reconciled with the world (``reconcile``), and
    save what reconciling changed."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with connect(self.path) as db:
            migrate(db, "runs", _SCHEMA)
        self.rollouts = SQLiteRolloutStore(self.path)

    @classmethod
    def at_home(cls, home: str | Path) -> RunStore:
        return cls(Path(home) / DB_FILE)

    def save(self, run: Run) -> None:
        run.updated = time.time()
        with connect(self.path) as db:
            _write(db, run)

    def save_all(self, runs: builtins.list[Run]) -> None:
        """Several records in one transaction (an import, a benchmark's fixture)."""
        now = time.time()
        with connect(self.path) as db, transaction(db):
            for run in runs:
                run.updated = run.updated or now
                _write(db, run)

    def get(self, run_id: str) -> Run:
        """The run with this id, or the only run whose id ends with it (a short id)."""
        with connect(self.path) as db:
            rows = db.execute("SELECT id, doc, updated FROM runs WHERE id = ?", (run_id,)).fetchall()
            if not rows:
                suffix = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                rows = db.execute("SELECT id, doc, updated FROM runs WHERE id LIKE ? ESCAPE '\\'",
                                  (f"%{suffix}",)).fetchall()
        if not rows:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        if len(rows) > 1:
            raise KeyError(f"{run_id!r} matches several runs: {', '.join(r[0] for r in rows)}")
        return self._reconciled(_load(rows[0]))

    def list(self, model: str | None = None, limit: int = 50) -> list[Run]:
        q = "SELECT doc, updated FROM runs"
        args: tuple[Any, ...] = ()
        if model:
            q += " WHERE model = ?"
            args = (model,)
        q += " ORDER BY created DESC LIMIT ?"
        with connect(self.path) as db:
            rows = db.execute(q, (*args, limit)).fetchall()
        return [self._reconciled(_load(r)) for r in rows]

    def page(self, *, model: str | None = None, status: str | None = None,
             since: float | None = None, until: float | None = None, newest_first: bool = True,
             limit: int = 50, after: tuple[float, str] | None = None) -> RunPage:
        """One page of runs in creation order (newest first unless ``newest_first=False``),
        filtered by model, status and creation time (``since <= created < until``).

        Keyset paging: ``after`` is the (created, id) of the previous page's last run
        (``RunPage.next``), so page 200 costs what page 1 does, with any number of runs.
        The status filter is on the stored status; a run whose process died reads as
        ``interrupted`` once reconciled (``reconcile`` is the way to bring those up to date)."""
        if not 1 <= limit <= 1000:
            raise ValueError(f"limit must be in 1..1000, got {limit}")
        where: builtins.list[str] = []
        args: builtins.list[object] = []
        if model:
            where.append("model = ?")
            args.append(model)
        if status:
            if status not in STATUSES:
                raise ValueError(f"status {status!r} is not one of {', '.join(STATUSES)}")
            where.append("status = ?")
            args.append(status)
        if since is not None:
            where.append("created >= ?")
            args.append(since)
        if until is not None:
            where.append("created < ?")
            args.append(until)
        if after is not None:
            where.append("(created, id) < (?, ?)" if newest_first else "(created, id) > (?, ?)")
            args.extend(after)
        order = "DESC" if newest_first else "ASC"
        q = ("SELECT doc, updated FROM runs" + (" WHERE " + " AND ".join(where) if where else "")
             + f" ORDER BY created {order}, id {order} LIMIT ?")
        with connect(self.path) as db:
            rows = db.execute(q, (*args, limit + 1)).fetchall()
        runs = [self._reconciled(_load(r)) for r in rows[:limit]]
        more = len(rows) > limit
        return RunPage(runs, (runs[-1].created, runs[-1].id) if more and runs else None)

    def counts(self) -> dict[str, int]:
        """How many runs have each stored status."""
        with connect(self.path) as db:
            rows = db.execute("SELECT status, COUNT(*) AS n FROM runs GROUP BY status").fetchall()
        return {str(r["status"]): int(r["n"]) for r in rows}

    def reconcile(self) -> builtins.list[Run]:
        """Reconcile every run that may need it (not succeeded); the ones that changed."""
        with connect(self.path) as db:
            rows = db.execute("SELECT doc, updated FROM runs WHERE status != 'succeeded'"
                              " ORDER BY created").fetchall()
        changed: builtins.list[Run] = []
        for row in rows:
            before = _load(row)
            after = self._reconciled(before)
            if after.to_dict() != before.to_dict():
                changed.append(after)
        return changed

    def claim(self, run_id: str) -> Run:
        """Make this process the owner of resumable run ``run_id`` (status ``running`` again),
        atomically: of two resumes at once, one wins. ``RunNotResumable`` otherwise."""
        run = self.get(run_id)  # reconciled: a dead owner's run is interrupted by now
        with connect(self.path) as db, transaction(db):
            row = db.execute("SELECT doc, updated FROM runs WHERE id = ?", (run.id,)).fetchone()
            run = _load(row)
            if run.status not in RESUMABLE:
                who = f" in pid {run.pid}" if run.status == "running" and run.pid else ""
                raise RunNotResumable(f"run {run.id} is {run.status}{who}"
                                      + (f" ({run.outcome})" if run.outcome else "")
                                      + f"; only {' or '.join(RESUMABLE)} runs can be resumed")
            run.pid, run.pid_token = os.getpid(), process_token(os.getpid())
            run.status, run.finished, run.resumes = "running", None, run.resumes + 1
            run.updated = time.time()
            _write(db, run)
        return run

    def _reconciled(self, run: Run) -> Run:
        """``run`` reconciled (see ``reconcile``), saved if that changed it. The change is
        decided again on the record as stored under the write lock, so a pipeline that saved or
        a resume that claimed the run in between is never overwritten."""
        if not _may_change(run):
            return run
        rollout = self._rollout(run)
        if not reconcile(Run.from_dict(run.to_dict()), rollout, alive=owner_alive(run)):
            return run  # the common case, decided on a copy without taking the write lock
        with connect(self.path) as db, transaction(db):
            row = db.execute("SELECT doc, updated FROM runs WHERE id = ?", (run.id,)).fetchone()
            current = _load(row)
            if reconcile(current, rollout, alive=owner_alive(current)):
                current.updated = time.time()
                _write(db, current)
        return current

    def _rollout(self, run: Run) -> Rollout | None:
        if run.rollout_id is None:
            return None
        try:
            return self.rollouts.get(run.rollout_id)
        except NotFound:
            return None


def _may_change(run: Run) -> bool:
    if run.status == "running":
        return run.pid is not None
    return run.rollout_id is not None and run.step("decide").status != "succeeded"


def _load(row: sqlite3.Row) -> Run:
    run = Run.from_dict(json.loads(row["doc"]))
    run.updated = float(row["updated"])  # the table's, also for records older than the field
    return run


def _write(db: sqlite3.Connection, run: Run) -> None:
    doc = json.dumps(run.to_dict(), sort_keys=True)
    db.execute(
        "INSERT INTO runs (id, model, status, created, updated, doc) VALUES (?, ?, ?, ?, ?, ?)"
        " ON CONFLICT (id) DO UPDATE SET status = excluded.status, updated = excluded.updated,"
        " doc = excluded.doc",
        (run.id, run.model, run.status, run.created, run.updated or time.time(), doc),
    )
