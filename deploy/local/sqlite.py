"""kloop's local state database: one SQLite file (``<home>/kloop.db``) shared by components.

Why SQLite: one file, transactions, and WAL lets readers (``kloop status``, another process)
read while a controller writes. Each component keeps its own tables in the same file: open it
with ``connect(path)`` and bring its schema up to date with ``migrate(conn, "<component>",
[step1_sql, step2_sql, ...])``; steps are append-only and each runs once, recorded in
``schema_migrations``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from deploy.ports import StoreError

DB_FILE = "kloop.db"


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
