"""Rollouts persisted in one SQLite file (``<home>/kloop.db``), safe for several processes.

Why SQLite: one file, transactions, and WAL lets the UI read while the controller writes.
Why a JSON document per rollout: the rollout's shape belongs to ``deploy.rollout``; the table
only indexes what queries need (id, model, phase, times) and guards concurrency.

Concurrency: every row has a ``generation``. ``save(rollout, expected_generation)`` writes only
if nobody moved the row since it was read, else raises ``Conflict``: two controllers (or a
controller and a user's abort) never overwrite each other's step silently. At most one active
(non-terminal) rollout per model is enforced by a partial unique index, not by a check-then-
insert race.

Other components keep their tables in the same file: open it with ``connect(path)`` and bring
their schema up to date with ``migrate(conn, "<component>", [step1_sql, step2_sql, ...])``;
steps are append-only and each runs once, recorded in ``schema_migrations``.

Errors::

    StoreError
    ├── NotFound       no rollout with that id
    └── Conflict       the row moved since it was read (generation mismatch)
        └── ActiveRolloutExists   the model already has an active rollout
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from deploy.rollout import Phase, Rollout

DB_FILE = "kloop.db"
_TERMINAL = tuple(p.value for p in Phase if p.terminal)


class StoreError(Exception):
    """Root of the store's errors."""


class NotFound(StoreError):
    pass


class Conflict(StoreError):
    pass


class ActiveRolloutExists(Conflict):
    pass


@contextlib.contextmanager
def connect(path: str | os.PathLike[str]) -> Iterator[sqlite3.Connection]:
    """A connection in autocommit mode (transactions are explicit: ``transaction(conn)``),
    WAL journal, and a busy timeout so concurrent writers wait instead of failing at once."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(os.fspath(path), isolation_level=None, timeout=10.0)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.row_factory = sqlite3.Row
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE``: take the write lock up front, so read-then-write cannot deadlock."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def migrate(conn: sqlite3.Connection, component: str, steps: Sequence[str]) -> None:
    """Run the steps of ``component``'s schema that this database has not run yet.

    Each step is SQL statements separated by ``;`` (no semicolons inside statements); all
    pending steps run in one transaction, so a failed upgrade leaves the old schema intact.
    """
    with transaction(conn):
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
        )
        row = conn.execute(
            "SELECT version FROM schema_migrations WHERE component = ?", (component,)
        ).fetchone()
        done = row[0] if row else 0
        if done > len(steps):
            raise StoreError(
                f"database has {component} schema v{done}, this kloop knows v{len(steps)}: upgrade"
            )
        for sql in steps[done:]:
            # executescript() would COMMIT mid-transaction: run the statements one by one.
            for statement in filter(None, (s.strip() for s in sql.split(";"))):
                conn.execute(statement)
        conn.execute(
            "INSERT INTO schema_migrations (component, version) VALUES (?, ?)"
            " ON CONFLICT(component) DO UPDATE SET version = excluded.version",
            (component, len(steps)),
        )


_ROLLOUT_SCHEMA = (
    """
    CREATE TABLE rollouts (
        id TEXT PRIMARY KEY,
        model TEXT NOT NULL,
        phase TEXT NOT NULL,
        active INTEGER NOT NULL,
        created REAL NOT NULL,
        updated REAL NOT NULL,
        generation INTEGER NOT NULL,
        doc TEXT NOT NULL
    );
    CREATE UNIQUE INDEX rollouts_one_active_per_model ON rollouts (model) WHERE active = 1;
    CREATE INDEX rollouts_by_model ON rollouts (model, created)
    """,
)


class RolloutStore:
    """Rollouts by id; a fresh connection per call, so one store can serve several threads."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        with connect(self.path) as conn:
            migrate(conn, "rollouts", _ROLLOUT_SCHEMA)

    @classmethod
    def at_home(cls, home: str | os.PathLike[str]) -> RolloutStore:
        return cls(Path(home) / DB_FILE)

    def create(self, rollout: Rollout) -> Rollout:
        """Insert a new rollout (generation 1); ``ActiveRolloutExists`` if the model has one."""
        with connect(self.path) as conn, transaction(conn):
            current = conn.execute(
                "SELECT id FROM rollouts WHERE model = ? AND active = 1", (rollout.model,)
            ).fetchone()
            if current is not None and not rollout.phase.terminal:
                raise ActiveRolloutExists(
                    f"model {rollout.model!r} already has active rollout {current['id']}"
                )
            try:
                conn.execute(
                    "INSERT INTO rollouts (id, model, phase, active, created, updated, generation,"
                    " doc) VALUES (?, ?, ?, ?, ?, ?, 1, ?)",
                    (rollout.id, rollout.model, rollout.phase.value, _active(rollout),
                     rollout.created, rollout.updated, _doc(rollout)),
                )
            except sqlite3.IntegrityError as e:
                raise Conflict(f"rollout {rollout.id} already exists") from e
        return _with_generation(rollout, 1)

    def save(self, rollout: Rollout, expected_generation: int) -> Rollout:
        """Write ``rollout`` if the stored row is still at ``expected_generation``."""
        with connect(self.path) as conn, transaction(conn):
            try:
                cur = conn.execute(
                    "UPDATE rollouts SET phase = ?, active = ?, updated = ?, doc = ?,"
                    " generation = generation + 1 WHERE id = ? AND generation = ?",
                    (rollout.phase.value, _active(rollout), rollout.updated, _doc(rollout),
                     rollout.id, expected_generation),
                )
            except sqlite3.IntegrityError as e:
                raise ActiveRolloutExists(f"model {rollout.model!r} has another active rollout") from e
            if cur.rowcount == 0:
                row = conn.execute(
                    "SELECT generation FROM rollouts WHERE id = ?", (rollout.id,)
                ).fetchone()
                if row is None:
                    raise NotFound(f"no rollout {rollout.id}")
                raise Conflict(
                    f"rollout {rollout.id} is at generation {row['generation']}, "
                    f"expected {expected_generation}: another writer moved it"
                )
        return _with_generation(rollout, expected_generation + 1)

    def get(self, rollout_id: str) -> Rollout:
        with connect(self.path) as conn:
            row = conn.execute(
                "SELECT doc, generation FROM rollouts WHERE id = ?", (rollout_id,)
            ).fetchone()
        if row is None:
            raise NotFound(f"no rollout {rollout_id}")
        return _load(row)

    def list(self, model: str | None = None) -> list[Rollout]:
        """Rollouts, oldest first; only ``model``'s when given."""
        with connect(self.path) as conn:
            if model is None:
                rows = conn.execute("SELECT doc, generation FROM rollouts ORDER BY created, id")
            else:
                rows = conn.execute(
                    "SELECT doc, generation FROM rollouts WHERE model = ? ORDER BY created, id",
                    (model,),
                )
            return [_load(r) for r in rows.fetchall()]

    def active(self, model: str) -> Rollout | None:
        with connect(self.path) as conn:
            row = conn.execute(
                "SELECT doc, generation FROM rollouts WHERE model = ? AND active = 1", (model,)
            ).fetchone()
        return _load(row) if row is not None else None


def _active(r: Rollout) -> int:
    return 0 if r.phase.value in _TERMINAL else 1


def _doc(r: Rollout) -> str:
    return json.dumps(r.to_dict(), sort_keys=True)


def _load(row: sqlite3.Row) -> Rollout:
    return Rollout.from_dict(json.loads(row["doc"]), generation=int(row["generation"]))


def _with_generation(r: Rollout, generation: int) -> Rollout:
    return dataclasses.replace(r, generation=generation)
