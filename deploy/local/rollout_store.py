"""Rollouts persisted in the local state database (``deploy.local.sqlite``), safe for several
processes: ``SQLiteRolloutStore`` implements ``deploy.ports.RolloutStore``.

Why a JSON document per rollout: the rollout's shape belongs to ``deploy.rollout``; the table
only indexes what queries need (id, model, phase, times) and guards concurrency.

Concurrency: every row has a ``generation``. ``save(rollout, expected_generation)`` writes only
if nobody moved the row since it was read, else raises ``deploy.ports.Conflict``: two
controllers (or a controller and a user's abort) never overwrite each other's step silently.
At most one active (non-terminal) rollout per model is enforced by a partial unique index, not
by a check-then-insert race (``deploy.ports.ActiveRolloutExists``).
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import sqlite3
from pathlib import Path

from deploy.local.sqlite import DB_FILE, connect, migrate, transaction
from deploy.ports import ActiveRolloutExists, Conflict, NotFound
from deploy.rollout import Phase, Rollout

_TERMINAL = tuple(p.value for p in Phase if p.terminal)


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
    # Keyset paging, newest first (``page``).
    """
    CREATE INDEX rollouts_created_id ON rollouts (created, id)
    """,
)


class SQLiteRolloutStore:
    """Rollouts by id; a fresh connection per call, so one store can serve several threads."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        with connect(self.path) as conn:
            migrate(conn, "rollouts", _ROLLOUT_SCHEMA)

    @classmethod
    def at_home(cls, home: str | os.PathLike[str]) -> SQLiteRolloutStore:
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

    def save(self, rollout: Rollout, expected_generation: int | str) -> Rollout:
        """Write ``rollout`` if the stored row is still at ``expected_generation``."""
        expected = int(expected_generation)  # this store's generations are counters
        with connect(self.path) as conn, transaction(conn):
            try:
                cur = conn.execute(
                    "UPDATE rollouts SET phase = ?, active = ?, updated = ?, doc = ?,"
                    " generation = generation + 1 WHERE id = ? AND generation = ?",
                    (rollout.phase.value, _active(rollout), rollout.updated, _doc(rollout),
                     rollout.id, expected),
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
                    f"expected {expected}: another writer moved it"
                )
        return _with_generation(rollout, expected + 1)

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

    def all_active(self) -> builtins.list[Rollout]:
        """Every active (non-terminal) rollout, oldest first."""
        with connect(self.path) as conn:
            rows = conn.execute("SELECT doc, generation FROM rollouts WHERE active = 1"
                                " ORDER BY created, id").fetchall()
        return [_load(r) for r in rows]

    def page(self, *, model: str | None = None, active_only: bool = False, limit: int = 50,
             after: tuple[float, str] | None = None,
             ) -> tuple[builtins.list[Rollout], tuple[float, str] | None]:
        """Newest first, keyset-paged like ``RunStore.page``: the rollouts and the key to pass
        as ``after`` for the next page (None on the last)."""
        if not 1 <= limit <= 1000:
            raise ValueError(f"limit must be in 1..1000, got {limit}")
        where: list[str] = []
        args: list[object] = []
        if model:
            where.append("model = ?")
            args.append(model)
        if active_only:
            where.append("active = 1")
        if after is not None:
            where.append("(created, id) < (?, ?)")
            args.extend(after)
        q = ("SELECT doc, generation FROM rollouts" + (" WHERE " + " AND ".join(where) if where else "")
             + " ORDER BY created DESC, id DESC LIMIT ?")
        with connect(self.path) as conn:
            rows = conn.execute(q, (*args, limit + 1)).fetchall()
        out: builtins.list[Rollout] = [_load(r) for r in rows[:limit]]
        return out, ((out[-1].created, out[-1].id) if len(rows) > limit and out else None)

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
