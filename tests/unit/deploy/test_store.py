import dataclasses

import pytest

from deploy.local.rollout_store import SQLiteRolloutStore as RolloutStore
from deploy.local.sqlite import connect, migrate
from deploy.ports import ActiveRolloutExists, Conflict, NotFound, StoreError
from deploy.rollout import Phase, RolloutPolicy, new_rollout

P = RolloutPolicy()


def test_create_get_list_active(tmp_path):
    s = RolloutStore.at_home(tmp_path)
    r = s.create(new_rollout("a", "iris", 2, 1, P, 1.0))
    assert r.generation == 1
    assert s.get("a") == r
    assert s.active("iris") == r and s.active("other") is None
    s.create(new_rollout("b", "other", 1, None, P, 2.0))
    assert [x.id for x in s.list()] == ["a", "b"]
    assert [x.id for x in s.list("iris")] == ["a"]
    with pytest.raises(NotFound):
        s.get("zzz")


def test_one_active_rollout_per_model(tmp_path):
    s = RolloutStore(tmp_path / "k.db")
    a = s.create(new_rollout("a", "iris", 2, 1, P, 1.0))
    with pytest.raises(ActiveRolloutExists):
        s.create(new_rollout("b", "iris", 3, 1, P, 2.0))
    s.save(dataclasses.replace(a, phase=Phase.ABORTED), expected_generation=1)
    assert s.active("iris") is None
    s.create(new_rollout("b", "iris", 3, 1, P, 2.0))  # now allowed
    with pytest.raises(Conflict):
        s.create(new_rollout("b", "x", 3, 1, P, 2.0))  # duplicate id


def test_two_writers_one_gets_conflict(tmp_path):
    path = tmp_path / "k.db"
    RolloutStore(path).create(new_rollout("a", "iris", 2, 1, P, 1.0))
    w1, w2 = RolloutStore(path), RolloutStore(path)  # two processes' views
    r1, r2 = w1.get("a"), w2.get("a")
    saved = w1.save(dataclasses.replace(r1, step=0), expected_generation=r1.generation)
    assert saved.generation == 2
    with pytest.raises(Conflict, match="another writer"):
        w2.save(dataclasses.replace(r2, step=1), expected_generation=r2.generation)
    assert w2.get("a").step == 0
    with pytest.raises(NotFound):
        w1.save(dataclasses.replace(r1, id="nope"), expected_generation=1)


def test_migrations_run_once_and_other_components_share_the_file(tmp_path):
    path = tmp_path / "k.db"
    RolloutStore(path)
    steps = ["CREATE TABLE runs (id TEXT PRIMARY KEY)",
             "ALTER TABLE runs ADD COLUMN status TEXT; CREATE INDEX runs_status ON runs (status)"]
    with connect(path) as conn:
        migrate(conn, "runs", steps[:1])
        migrate(conn, "runs", steps)
        migrate(conn, "runs", steps)  # idempotent
        conn.execute("INSERT INTO runs (id, status) VALUES ('r', 'ok')")
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        with pytest.raises(StoreError, match="upgrade"):
            migrate(conn, "runs", steps[:1])
    RolloutStore(path)  # reopening does not re-run the rollouts schema
