"""Pipeline run records: what ran, step by step, with status, timings, metrics and logs.

A run is one JSON document in the ``runs`` table of the same SQLite file as the rollouts
(``<home>/kloop.db``), rewritten whole on every step change: a reader (``kloop runs``, another
process) sees a consistent record, and history survives restarts. Steps are fixed by the
pipeline (``STEPS``); each is pending → running → succeeded | failed | skipped.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy.local.sqlite import DB_FILE, connect, migrate

STEPS = ("train", "evaluate", "publish", "gate", "canary", "decide")

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
)


@dataclasses.dataclass
class Step:
    name: str
    status: str = "pending"
    started: float | None = None
    finished: float | None = None
    message: str = ""
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def duration_s(self) -> float | None:
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started


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
    finished: float | None = None

    @classmethod
    def new(cls, model: str, params: Mapping[str, Any], run_dir_root: Path) -> Run:
        run_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        return cls(id=run_id, model=model, created=time.time(), params=dict(params),
                   run_dir=str(run_dir_root / run_id))

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


class RunStore:
    """Runs in SQLite. One short transaction per write; safe to share the file across processes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with connect(self.path) as db:
            migrate(db, "runs", _SCHEMA)

    @classmethod
    def at_home(cls, home: str | Path) -> RunStore:
        return cls(Path(home) / DB_FILE)

    def save(self, run: Run) -> None:
        doc = json.dumps(run.to_dict(), sort_keys=True)
        with connect(self.path) as db:
            db.execute(
                "INSERT INTO runs (id, model, status, created, updated, doc) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (id) DO UPDATE SET status = excluded.status, updated = excluded.updated,"
                " doc = excluded.doc",
                (run.id, run.model, run.status, run.created, time.time(), doc),
            )

    def get(self, run_id: str) -> Run:
        """The run with this id, or the only run whose id ends with it (a short id)."""
        with connect(self.path) as db:
            rows = db.execute("SELECT id, doc FROM runs WHERE id = ?", (run_id,)).fetchall()
            if not rows:
                suffix = run_id.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
                rows = db.execute("SELECT id, doc FROM runs WHERE id LIKE ? ESCAPE '\\'",
                                  (f"%{suffix}",)).fetchall()
        if not rows:
            raise KeyError(f"no run {run_id!r} in {self.path}")
        if len(rows) > 1:
            raise KeyError(f"{run_id!r} matches several runs: {', '.join(r[0] for r in rows)}")
        return Run.from_dict(json.loads(rows[0][1]))

    def list(self, model: str | None = None, limit: int = 50) -> list[Run]:
        q = "SELECT doc FROM runs"
        args: tuple[Any, ...] = ()
        if model:
            q += " WHERE model = ?"
            args = (model,)
        q += " ORDER BY created DESC LIMIT ?"
        with connect(self.path) as db:
            rows = db.execute(q, (*args, limit)).fetchall()
        return [Run.from_dict(json.loads(r[0])) for r in rows]
