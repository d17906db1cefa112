"""The controller against a real store on disk, a real registry and the in-memory server fake,
one tick at a time on a fake clock. Every tick reopens the store and the backend, as a
restarted controller would."""

import pytest

from deploy.controller import move_champion, run_until_done, tick
from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.server_backend import LocalBackend
from deploy.ports import Conflict
from deploy.rollout import AnalysisPolicy, Phase, RolloutPolicy, Verdict, new_rollout
from kloop.artifact import Registry
from tests.support.fakes import AdminError, FakeAdmin, FakeClock, publish

POLICY = RolloutPolicy(steps=(10, 50, 100), step_timeout_s=600, failure_limit=1, error_limit=3,
                       outage_tolerance_s=20,
                       retire_after_s=30,
                       analysis=AnalysisPolicy(min_requests=50, min_duration_s=60))


class Env:
    def __init__(self, tmp_path, candidate_accuracy=0.95, fingerprint="fp-1"):
        self.registry = Registry(tmp_path / "registry")
        self.champion = publish(self.registry, tmp_path, "iris", 0.95)
        self.candidate = publish(self.registry, tmp_path, "iris", candidate_accuracy, fingerprint)
        self.registry.set_alias("iris", "champion", self.champion)
        self.registry.set_alias("iris", "candidate", self.candidate)
        self.admin = FakeAdmin()
        self.admin.load("iris", self.champion)
        self.admin.set_traffic("iris", {self.champion: 100})
        self.db = tmp_path / "kloop.db"
        self.clock = FakeClock(start=0.0)
        SQLiteRolloutStore(self.db).create(
            new_rollout("r1", "iris", self.candidate, self.champion, POLICY, self.clock.now()))

    def backend(self):
        return LocalBackend(self.admin, now=self.clock.now, admin_errors=(AdminError, OSError))

    def tick(self):
        """A fresh controller process: store and backend reopened."""
        return tick(SQLiteRolloutStore(self.db), self.backend(), self.registry, "r1", self.clock)

    def traffic(self, seconds=60, n=1000):
        self.admin.drive("iris", n)
        self.clock.advance(seconds)


def test_ten_fifty_hundred_promote_with_restarts(tmp_path):
    e = Env(tmp_path)
    assert e.tick().phase is Phase.GATING
    r = e.tick()
    assert (r.phase, dict(r.weights)) == (Phase.PROGRESSING, {2: 10, 1: 90})
    assert e.admin.weights["iris"] == {1: 90, 2: 10}
    seen = []
    for want in ({1: 50, 2: 50}, {1: 0, 2: 100}):
        e.traffic()
        r = e.tick()
        seen.append(dict(e.admin.weights["iris"]))
        assert e.admin.weights["iris"] == want
    e.traffic()
    r = e.tick()
    assert r.phase is Phase.PROMOTING
    assert e.registry.alias("iris", "champion") == 2  # the controller moved the alias
    assert e.registry.alias("iris", "candidate") is None
    assert e.admin.loaded["iris"] == {1, 2}  # old champion kept for a fast rollback
    e.clock.advance(10)
    assert e.tick().phase is Phase.PROMOTING  # retire_after_s not yet over
    e.clock.advance(30)
    r = e.tick()
    assert r.phase is Phase.SUCCEEDED and e.admin.loaded["iris"] == {2}
    assert [h.kind_name for h in r.history] == [
        "run_gate", "set_weights", "set_weights", "set_weights", "promote", "wait", "retire"]
    assert SQLiteRolloutStore(e.db).active("iris") is None
    assert e.tick() == r  # terminal: ticking again changes nothing


def test_weights_applied_but_not_saved_do_not_step_twice(tmp_path):
    e = Env(tmp_path)
    e.tick(), e.tick()
    e.traffic()
    # a controller wrote step 2's weights and died before saving the rollout
    e.backend().set_weights("iris", {2: 50, 1: 50})
    r = e.tick()
    assert (r.step, dict(r.weights)) == (1, {2: 50, 1: 50})
    assert e.admin.weights["iris"] == {1: 50, 2: 50}
    assert "adopting" in r.history[-1].message
    r = e.tick()  # no time passed: the adopted step waits for its own window
    assert r.step == 1 and r.history[-1].verdict is Verdict.INCONCLUSIVE


def test_error_spike_rolls_back(tmp_path):
    e = Env(tmp_path)
    e.tick(), e.tick()
    e.admin.error_rate[2] = 0.3
    e.traffic()
    r = e.tick()  # the decision is saved first, nothing written yet
    assert r.phase is Phase.ROLLING_BACK and e.admin.weights["iris"] == {1: 90, 2: 10}
    r = e.tick()
    assert r.phase is Phase.ROLLED_BACK and "error rate" in r.reason
    assert e.admin.weights["iris"] == {1: 100} and e.admin.loaded["iris"] == {1}
    assert e.registry.alias("iris", "champion") == 1


def test_gate_failure_rolls_back_before_any_traffic(tmp_path):
    e = Env(tmp_path, candidate_accuracy=0.80)
    e.tick(), e.tick()
    r = e.tick()
    assert r.phase is Phase.ROLLED_BACK and "gate failed" in r.reason
    assert ("load", "iris", 2) not in e.admin.calls
    assert e.admin.weights["iris"] == {1: 100}


def test_gate_error_aborts_with_the_reason(tmp_path):
    e = Env(tmp_path, fingerprint="other-data")
    e.tick(), e.tick()
    r = e.tick()
    assert r.phase is Phase.ABORTED
    assert "evaluated on different data; cannot compare" in r.reason


def test_unreachable_server_aborts_after_error_limit_and_retries_the_abort(tmp_path):
    e = Env(tmp_path)
    e.tick(), e.tick()
    e.admin.down = True
    phases = []
    for _ in range(4):
        e.clock.advance(10)
        phases.append(e.tick().phase)
    # 2 errors wait; the 3rd decides to abort but the write fails -> RollingBack, then retried
    assert phases[:3] == [Phase.PROGRESSING, Phase.PROGRESSING, Phase.ROLLING_BACK]
    e.admin.down = False
    r = e.tick()
    assert r.phase is Phase.ABORTED and r.failed == 0
    assert e.admin.weights["iris"] == {1: 100}


def test_step_timeout_aborts(tmp_path):
    e = Env(tmp_path)
    e.tick(), e.tick()
    e.clock.advance(600)  # no traffic at all
    e.tick()
    r = e.tick()
    assert r.phase is Phase.ABORTED and "timed out" in r.reason


def test_concurrent_writer_conflict(tmp_path):
    e = Env(tmp_path)

    class Racing(SQLiteRolloutStore):
        def get(self, rollout_id):
            r = super().get(rollout_id)
            SQLiteRolloutStore(self.path).save(r, expected_generation=r.generation)  # the other
            return r

    with pytest.raises(Conflict):
        tick(Racing(e.db), e.backend(), e.registry, "r1", e.clock)


def test_run_until_done_without_sleeping(tmp_path):
    e = Env(tmp_path)

    class TrafficClock(FakeClock):
        def sleep(self, seconds):
            e.admin.drive("iris", 200)
            super().sleep(seconds)

    e.clock = TrafficClock(start=0.0)
    events = []
    r = run_until_done(SQLiteRolloutStore(e.db), e.backend(), e.registry, "r1", e.clock,
                       interval_s=30, on_event=lambda ro, ev: events.append(ev.kind_name))
    assert r.phase is Phase.SUCCEEDED
    assert events[0] == "run_gate" and events[-1] == "retire" and "promote" in events
    with pytest.raises(ValueError):
        run_until_done(SQLiteRolloutStore(e.db), e.backend(), e.registry, "r1", e.clock,
                       interval_s=0)


def test_killed_after_the_rollback_writes_the_rollback_still_completes(tmp_path):
    """The controller dies after restoring the champion but before saving: the next one finds
    RollingBack and finishes it; it never treats the champion's 100 % as drift."""
    e = Env(tmp_path)
    e.tick(), e.tick()
    e.admin.error_rate[2] = 0.3
    e.traffic()
    assert e.tick().phase is Phase.ROLLING_BACK
    e.backend().rollback("iris", 1, 2)  # the writes of a tick that then died unsaved
    r = e.tick()
    assert r.phase is Phase.ROLLED_BACK
    assert e.admin.weights["iris"] == {1: 100} and e.admin.loaded["iris"] == {1}


def test_move_champion_is_idempotent_and_leaves_another_candidate_alias(tmp_path):
    e = Env(tmp_path)
    move_champion(e.registry, "iris", e.candidate)
    move_champion(e.registry, "iris", e.candidate)  # a retried promotion: nothing changes
    assert e.registry.alias("iris", "champion") == e.candidate
    assert e.registry.alias("iris", "candidate") is None
    e.registry.set_alias("iris", "candidate", e.champion)
    move_champion(e.registry, "iris", e.candidate)
    assert e.registry.alias("iris", "candidate") == e.champion  # not the promoted one's alias
