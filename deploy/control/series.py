"""Each active rollout's traffic over time: weight, request rate, error rate and p99 per
version, for the rollout page's charts.

The ticker records one point per version per round: the cumulative counters the model server
exports (what the analysis judges, ``deploy.rollout.samples``) and the weight it routes. Rates
are the differences between consecutive points, computed when read; a counter that went down
(the server restarted) starts the series again. Kept in the state database next to the
rollouts, bounded per rollout (``MAX_POINTS`` per version: at one round a second, an hour).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from deploy.local.sqlite import connect, migrate, transaction
from deploy.rollout import CounterReset, VersionSample, delta, quantile

MAX_POINTS = 3600

_SCHEMA = (
    """
    CREATE TABLE rollout_series (
        rollout_id TEXT NOT NULL,
        at REAL NOT NULL,
        version TEXT NOT NULL,
        weight INTEGER NOT NULL,
        sample TEXT NOT NULL
    );
    CREATE INDEX rollout_series_by_rollout ON rollout_series (rollout_id, version, at)
    """,
)


class SeriesStore:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        with connect(self.path) as db:
            migrate(db, "rollout_series", _SCHEMA)

    def record(self, rollout_id: str, at: float, weights: Mapping[str, int],
               samples: Mapping[str, VersionSample]) -> None:
        """One point per version in ``samples`` (weight 0 where ``weights`` has none)."""
        rows = [(rollout_id, at, v, int(weights.get(v, 0)), json.dumps(s.to_dict()))
                for v, s in samples.items()]
        if not rows:
            return
        with connect(self.path) as db, transaction(db):
            db.executemany("INSERT INTO rollout_series VALUES (?, ?, ?, ?, ?)", rows)
            for v in samples:
                db.execute(
                    "DELETE FROM rollout_series WHERE rollout_id = ? AND version = ? AND at <="
                    " (SELECT at FROM rollout_series WHERE rollout_id = ? AND version = ?"
                    "  ORDER BY at DESC LIMIT 1 OFFSET ?)",
                    (rollout_id, v, rollout_id, v, MAX_POINTS))

    def points(self, rollout_id: str) -> list[dict[str, Any]]:
        """``{at, version, weight, requests_per_s, error_rate, p99_ms}`` per version and
        round, from the second point of each version on (a rate needs two)."""
        with connect(self.path) as db:
            rows = db.execute("SELECT at, version, weight, sample FROM rollout_series WHERE"
                              " rollout_id = ? ORDER BY version, at", (rollout_id,)).fetchall()
        out: list[dict[str, Any]] = []
        prev: dict[str, VersionSample] = {}
        for row in rows:
            v = str(row["version"])
            s = VersionSample.from_dict(json.loads(row["sample"]))
            before = prev.get(v)
            prev[v] = s
            if before is None or s.at <= before.at:
                continue
            try:
                d = delta(s, before)
            except CounterReset:
                continue
            seconds = s.at - before.at
            p99 = quantile(0.99, d.buckets) if d.requests else None
            out.append({"at": s.at, "version": v, "weight": int(row["weight"]),
                        "requests_per_s": round(d.requests / seconds, 3),
                        "error_rate": round(d.server_errors / d.requests, 5) if d.requests else 0.0,
                        "p99_ms": round(p99 * 1000.0, 3) if p99 is not None else None})
        out.sort(key=lambda p: (p["at"], p["version"]))
        return out
