"""The control plane's read path with a big store: p50 and p99 of its list and get endpoints
and of its runs page, against a real ``kloop up`` (a child process) on loopback.

The store is filled first (10 000 runs over 5 models and every status, each with six steps, a
spec and metrics as a pipeline writes them; 1 000 rollouts with a history), then each request is
sent ``--requests`` times, one at a time, from this process (keep-alive, one connection):

* ``GET /api/v1/runs``: the first page (50), and a deep page (page 150, reached by its token),
  and a filtered page (a model and a status);
* ``GET /api/v1/runs/{id}``, ``GET /api/v1/rollouts``, ``GET /api/v1/rollouts/{id}`` (random ids);
* ``GET /`` (the runs page, server-rendered) and ``GET /?page_token=...`` (its page 150).

Besides the absolute figures (the issue's bar: p99 under 100 ms on this 2-core machine) it
prints, for the deep page, the ratio against OFFSET paging on the same table and index (what a
list without keyset paging does), measured in the same run::

    python loadtests/control_bench.py --runs 10000 --rollouts 1000 --requests 300 \\
        --out docs/benchmarks/control-plane.json
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import random
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Any

from deploy.control.process import ControlProcess
from deploy.local.home import Home
from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.runs import STATUSES, STEPS, Run, RunStore, Step
from deploy.rollout import Action, Event, Phase, RolloutPolicy, Verdict, new_rollout

MODELS = ("digits", "breast-cancer", "diabetes", "wine", "churn")


def fill(home: Home, runs: int, rollouts: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    t0 = time.time() - runs * 60.0
    records = []
    for i in range(runs):
        model = MODELS[i % len(MODELS)]
        created = t0 + i * 60.0
        status = STATUSES[1 + i % (len(STATUSES) - 1)]  # no live "running" run: nobody owns it
        steps = [Step(n, "succeeded", created + k, created + k + 1, f"{n} done",
                      {"duration_s": 1.0}, 1) for k, n in enumerate(STEPS)]
        records.append(Run(
            id=f"{time.strftime('%Y%m%d-%H%M%S', time.gmtime(created))}-{i:06x}", model=model,
            created=created, status=status, steps=steps, version=i // len(MODELS) + 1,
            outcome="promoted" if status == "succeeded" else f"{status}: benchmark",
            params={"spec": {"task": model, "epochs": rng.randint(1, 30),
                             "config": {"lr": rng.choice([0.1, 0.01, 0.001])}},
                    "policy": RolloutPolicy().to_dict(), "label": f"bench {i}"},
            metrics={"accuracy": rng.random(), "loss": rng.random(), "num_examples": 450},
            evaluation={"primary": "accuracy", "metrics": {"accuracy": {"direction": "higher"}}},
            run_dir=str(home.runs_dir / f"bench-{i}"), finished=created + 30.0))
    RunStore(home.db).save_all(records)
    store = SQLiteRolloutStore(home.db)
    rids = []
    for j in range(rollouts):
        model = MODELS[j % len(MODELS)]
        r = new_rollout(f"{model}-v{j + 2}-bench-{j:05d}", model, j + 2, j + 1, RolloutPolicy(),
                        t0 + j * 600.0)
        history = tuple(Event(at=r.created + k, kind=Action.WAIT, message=f"step {k}: waiting",
                              verdict=Verdict.INCONCLUSIVE, weights={j + 2: 10, j + 1: 90})
                        for k in range(20))
        r = dataclasses.replace(r, phase=Phase.SUCCEEDED, history=history, weights={j + 2: 100})
        store.create(r)
        rids.append(r.id)
    return [r.id for r in records], rids


def timed(conn: http.client.HTTPConnection, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        out.append((time.perf_counter() - started) * 1000.0)
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: {resp.status} {body[:200]!r}")
    return out


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10_000)
    ap.add_argument("--rollouts", type=int, default=1_000)
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--deep-page", type=int, default=150)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kloop-control-bench-") as tmp:
        home = Home(Path(tmp) / "home")
        t = time.monotonic()
        run_ids, rollout_ids = fill(home, args.runs, args.rollouts)
        print(f"filled {args.runs} runs and {args.rollouts} rollouts in {time.monotonic() - t:.1f}s",
              file=sys.stderr)
        control = ControlProcess(home.root)
        client = control.start()
        try:
            host = urllib.parse.urlsplit(client.url)
            conn = http.client.HTTPConnection(host.hostname or "127.0.0.1", host.port, timeout=30)
            token = ""
            for _ in range(args.deep_page - 1):
                conn.request("GET", f"/api/v1/runs?page_token={token}")
                token = json.loads(conn.getresponse().read())["next_page_token"]
            rng = random.Random(1)
            cases: dict[str, list[str]] = {
                "GET /api/v1/runs (page 1)": ["/api/v1/runs"],
                f"GET /api/v1/runs (page {args.deep_page})": [f"/api/v1/runs?page_token={token}"],
                "GET /api/v1/runs?model&status": ["/api/v1/runs?model=wine&status=failed"],
                "GET /api/v1/runs/{id}": [f"/api/v1/runs/{rng.choice(run_ids)}" for _ in range(50)],
                "GET /api/v1/rollouts (page 1)": ["/api/v1/rollouts"],
                "GET /api/v1/rollouts/{id}": [f"/api/v1/rollouts/{rng.choice(rollout_ids)}"
                                              for _ in range(50)],
                "GET / (runs page 1)": ["/"],
                f"GET / (runs page {args.deep_page})": [f"/?page_token={token}"],
            }
            rows: list[dict[str, Any]] = []
            for name, paths in cases.items():
                for p in paths[:3]:
                    timed(conn, p, 3)  # warm
                samples: list[float] = []
                per = max(1, args.requests // len(paths))
                for p in paths:
                    samples += timed(conn, p, per)
                rows.append({"request": name, "n": len(samples),
                             "p50_ms": round(statistics.median(samples), 2),
                             "p99_ms": round(pct(samples, 0.99), 2)})
        finally:
            control.stop()
        offset = _offset_ratio(home, args.deep_page, args.requests)
    print(f"{'request':40} {'n':>5} {'p50 ms':>8} {'p99 ms':>8}")
    for r in rows:
        print(f"{r['request']:40} {r['n']:>5} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")
    print(f"page {args.deep_page} of the runs table in SQLite alone: keyset {offset['keyset_ms']:.2f} ms, "
          f"OFFSET {offset['offset_ms']:.2f} ms (OFFSET / keyset = {offset['ratio']:.1f}x)")
    worst = max(float(r["p99_ms"]) for r in rows)
    print(f"worst p99 {worst:.1f} ms (target < 100 ms)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"runs": args.runs, "rollouts": args.rollouts,
                                        "rows": rows, "sqlite_deep_page": offset}, indent=1) + "\n")
    return 0 if worst < 100.0 else 1


def _offset_ratio(home: Home, page: int, n: int) -> dict[str, Any]:
    """The deep page's query alone, keyset against OFFSET, on the same connection."""
    db = sqlite3.connect(home.db)
    skip = 50 * (page - 1)
    key = db.execute("SELECT created, id FROM runs ORDER BY created DESC, id DESC LIMIT 1 OFFSET ?",
                     (skip - 1,)).fetchone()

    def best(q: str, a: tuple[Any, ...]) -> float:
        times = []
        for _ in range(max(20, n // 10)):
            t = time.perf_counter()
            db.execute(q, a).fetchall()
            times.append((time.perf_counter() - t) * 1000.0)
        return statistics.median(times)

    keyset = best("SELECT doc FROM runs WHERE (created, id) < (?, ?) ORDER BY created DESC, id DESC"
                  " LIMIT 51", tuple(key))
    offset = best("SELECT doc FROM runs ORDER BY created DESC, id DESC LIMIT 51 OFFSET ?", (skip,))
    db.close()
    return {"keyset_ms": round(keyset, 3), "offset_ms": round(offset, 3),
            "ratio": round(offset / keyset, 2)}


if __name__ == "__main__":
    sys.exit(main())
