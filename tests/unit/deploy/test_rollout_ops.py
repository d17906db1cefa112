"""A user's operations on a rollout (promote, pause, resume, undo) and the controller helpers
that save them (``user_request``, ``former_champions``).

The decisions are table-tested on the pure functions; the flows run the real controller
against a real SQLite store, a real registry and the in-memory server fake, one tick at a time
on a fake clock (no sleeps)."""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import yaml

from deploy.cluster.cr_store import cr_from_rollout, rollout_from_cr, status_from_rollout
from deploy.controller import (
    USER_REQUEST_ATTEMPTS,
    former_champions,
    run_gate,
    tick,
    user_request,
)
from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.server_backend import LocalBackend
from deploy.ports import Conflict
from deploy.rollout import (
    Action,
    AnalysisPolicy,
    Applied,
    Event,
    GateResult,
    Phase,
    Rollout,
    RolloutPolicy,
    UserRequest,
    Verdict,
    VersionSample,
    World,
    decide,
    new_rollout,
    new_undo_rollout,
    request_abort,
    request_pause,
    request_promote,
    request_resume,
    transition,
)
from kloop.artifact import Registry
from tests.support.fakes import AdminError, FakeAdmin, FakeClock, publish

POLICY = RolloutPolicy(steps=(10, 50, 100), step_timeout_s=600, failure_limit=2, error_limit=3,
                       outage_tolerance_s=20, retire_after_s=30,
                       analysis=AnalysisPolicy(min_requests=50, min_duration_s=60))
PASSED = GateResult(Verdict.SUCCESSFUL, ("ok",))
ZERO = VersionSample.zero(0)
CRD = Path(__file__).resolve().parents[3] / "deploy" / "k8s" / "crds" / "kloop.dev_rollouts.yaml"


# ---- pure: helpers ------------------------------------------------------------------------------

def sample(requests, errors=0):
    return VersionSample(requests, errors, ((0.01, requests), (math.inf, requests)), 0)


def ro(**kw):
    """v2 canaried against v1 at step 1 of 3."""
    base = {"id": "r1", "model": "iris", "candidate": 2, "champion": 1, "policy": POLICY,
            "created": 0.0, "phase": Phase.PROGRESSING, "step": 0, "weights": {2: 10, 1: 90},
            "step_started_at": 0.0, "window_started_at": 0.0, "baseline": {2: ZERO, 1: ZERO}}
    return Rollout(**{**base, **kw})


def gated(**kw):
    """Gate passed, candidate asked to load at 0, no traffic yet."""
    return ro(**{"phase": Phase.GATING, "step": -1, "weights": {}, "gate": PASSED,
                 "step_started_at": None, "window_started_at": None, "baseline": {},
                 "preparing_since": 0.0, **kw})


def world(weights=None, cand=None, champ=None, error=None, loaded=(1, 2), failed=None):
    samples = None if error else {2: cand or ZERO, 1: champ or ZERO}
    return World(weights=weights if weights is not None else {2: 10, 1: 90},
                 loaded=frozenset(loaded), samples=samples, error=error, failed=failed or {})


GOOD, BAD, CHAMP = sample(200), sample(200, 40), sample(2000)
NOT_READY = world(weights={1: 100}, loaded=(1,))


# ---- pure: what a request is allowed to do --------------------------------------------------------

ENDED = ro(phase=Phase.ROLLED_BACK, reason="error rate")
ROLLING_BACK = ro(phase=Phase.ROLLING_BACK, outcome=Phase.ROLLED_BACK, reason="error rate")
PROMOTING = ro(phase=Phase.PROMOTING, promoted_at=5.0, weights={2: 100})
PENDING = ro(phase=Phase.PENDING, step=-1, weights={}, step_started_at=None)


@pytest.mark.parametrize(
    "request_, r, says",
    [
        (request_promote, PENDING, "the gate has not passed yet"),
        (request_promote, gated(gate=None), "the gate has not passed yet"),
        (request_promote, gated(gate=GateResult(Verdict.FAILED, ("worse",))),
         "the gate has not passed yet (it was failed: worse)"),
        (request_promote, gated(gate=GateResult(Verdict.ERROR, ("other data",))),
         "the gate has not passed yet"),
        (request_promote, PROMOTING, "already promoting v2"),
        (request_promote, ROLLING_BACK, "it is rolling back: error rate"),
        (request_promote, ENDED, "already ended: RolledBack error rate"),
        (request_pause, PROMOTING, "already promoting"),
        (request_pause, ROLLING_BACK, "rolling back"),
        (request_pause, ENDED, "already ended"),
        (request_pause, ro(promote_requested=True), "promoting v2 was already requested"),
        (request_resume, PROMOTING, "already promoting"),
        (request_resume, ROLLING_BACK, "rolling back"),
        (request_resume, ENDED, "already ended"),
    ],
)
def test_requests_refused_where_they_make_no_sense(request_, r, says):
    with pytest.raises(ValueError, match="rollout r1 cannot be") as e:
        request_(r, "because", 10.0)
    assert says in str(e.value)


@pytest.mark.parametrize(
    "request_, r",
    [
        (request_promote, ro(promote_requested=True)),
        (request_pause, ro(paused=True)),
        (request_resume, ro()),  # not paused
        (request_resume, gated()),
    ],
)
def test_requests_already_in_force_return_the_rollout_itself(request_, r):
    assert request_(r, "again", 10.0) is r


@pytest.mark.parametrize(
    "request_, r, kind, flags, message",
    [
        (request_promote, ro(), UserRequest.PROMOTE, (False, True),
         "promote v2 at step 1/3 (10%), skipping the remaining steps: looks good"),
        (request_promote, gated(), UserRequest.PROMOTE, (False, True),
         "promote v2 before the first step, skipping the remaining steps: looks good"),
        (request_promote, ro(paused=True), UserRequest.PROMOTE, (False, True), "step 1/3"),
        (request_pause, PENDING, UserRequest.PAUSE, (True, False),
         "paused before the gate: looks good"),
        (request_pause, gated(), UserRequest.PAUSE, (True, False), "paused before the first step"),
        (request_pause, ro(), UserRequest.PAUSE, (True, False), "paused at step 1/3 (10%)"),
        (request_resume, ro(paused=True), UserRequest.RESUME, (False, False), "resumed at step 1/3"),
    ],
)
def test_requests_set_a_flag_and_record_an_event(request_, r, kind, flags, message):
    out = request_(r, "looks good", 10.0)
    assert (out.paused, out.promote_requested) == flags
    assert (out.phase, out.step, out.updated) == (r.phase, r.step, 10.0)
    e = out.history[-1]
    assert (e.kind, e.at, e.kind_name) == (kind, 10.0, kind.value)
    assert message in e.message


def test_resume_restarts_the_step_and_readiness_timers():
    r = request_resume(ro(paused=True, step_started_at=3.0), "", 500.0)
    assert r.step_started_at == 500.0
    r = request_resume(gated(paused=True, preparing_since=3.0), "", 500.0)
    assert (r.step_started_at, r.preparing_since) == (None, 500.0)  # unset timers stay unset


def test_abort_lifts_a_pause():
    r = request_abort(ro(paused=True), "enough", 10.0)
    assert (r.phase, r.paused) == (Phase.ROLLING_BACK, False)


# ---- pure: what decide does with them -----------------------------------------------------------

@pytest.mark.parametrize(
    "r, w, now, action, says",
    [
        # paused, passing step: hold it, judge a fresh window (a later failure is not diluted)
        (ro(paused=True), world(cand=GOOD, champ=CHAMP), 60, Action.WAIT, "paused at step 1/3"),
        # paused at the last step: no promotion either
        (ro(paused=True, step=2, weights={2: 100, 1: 0}), world({2: 100, 1: 0}, GOOD), 60,
         Action.WAIT, "paused at step 3/3"),
        # paused, inconclusive far past the step timeout: still waiting
        (ro(paused=True), world(cand=sample(5), champ=CHAMP), 10_000, Action.WAIT, "5/50"),
        # paused, failed analysis at the failure limit: rolled back all the same
        (ro(paused=True, failed=1), world(cand=BAD, champ=CHAMP), 60, Action.ROLLBACK,
         "failed (2/2)"),
        # paused, cannot measure for the outage bound: aborted all the same
        (ro(paused=True, errors=2, errors_since=10), world(error="refused"), 60, Action.ABORT,
         "could not measure 3 times"),
        # paused, cannot measure past the step timeout but under the outage bound: wait
        (ro(paused=True), world(error="refused"), 10_000, Action.WAIT, "could not measure (1/3)"),
        # paused in Gating, candidate ready: no first step
        (gated(paused=True), world({1: 100}), 5, Action.WAIT, "no traffic until resumed"),
        # paused in Gating, not ready past the readiness deadline: keep loading, no deadline
        (gated(paused=True), NOT_READY, 10_000, Action.PREPARE, "paused: no deadline"),
        # paused in Gating, the backend says it failed to load: rolled back at once
        (gated(paused=True), world({1: 100}, loaded=(1,), failed={2: "FailedToLoad"}), 5,
         Action.ROLLBACK, "failed to load"),
        # paused in Gating, the gate failed: rolled back
        (gated(paused=True, gate=GateResult(Verdict.FAILED, ("worse",))), NOT_READY, 5,
         Action.ROLLBACK, "gate failed"),
        # promotion requested mid-step: promote without waiting for the analysis
        (ro(promote_requested=True), world(cand=sample(5), champ=CHAMP), 1, Action.PROMOTE,
         "promotion requested at step 1/3 (10%)"),
        (ro(promote_requested=True), world(cand=BAD, champ=CHAMP), 60, Action.PROMOTE,
         "skipping the remaining steps"),
        # promotion requested, the server cannot be read: not now (could not measure)
        (ro(promote_requested=True), world(error="refused"), 1, Action.WAIT, "could not measure"),
        # promotion requested in Gating: promote once ready, load until then
        (gated(promote_requested=True), world({1: 100}), 5, Action.PROMOTE,
         "skipping the traffic steps"),
        (gated(promote_requested=True), NOT_READY, 5, Action.PREPARE, "waiting for v2"),
        (gated(promote_requested=True), NOT_READY, 600, Action.ROLLBACK, "never became ready"),
        # undo: straight to 100% once ready, no traffic steps
        (gated(undo=True), world({1: 100}), 5, Action.PROMOTE, "undo: v2 ready; straight to 100%"),
        (gated(undo=True), NOT_READY, 5, Action.PREPARE, "waiting for v2"),
        (gated(undo=True, paused=True), world({1: 100}), 5, Action.WAIT, "paused"),
    ],
)
def test_decide_with_requests(r, w, now, action, says):
    d = decide(r, w, POLICY, now)
    assert d.action is action and says in d.reason, d.reason


def test_paused_passing_window_is_rebaselined_not_counted():
    r = ro(paused=True)
    w = world(cand=GOOD, champ=CHAMP)
    d = decide(r, w, POLICY, 60)
    assert d.rebaseline and d.verdict is Verdict.SUCCESSFUL
    after = transition(r, d, w, Applied(), 60)
    assert (after.window_started_at, after.baseline[2], after.step, after.failed) == (
        60, GOOD, 0, 0)


def test_promote_after_the_gate_waits_for_the_candidate_then_never_sets_weights():
    r = request_promote(gated(preparing_since=None), "hurry", 1.0)
    now = 1.0
    for w in (NOT_READY, NOT_READY, world({1: 100})):  # loading, loading, ready
        now += 10
        r = transition(r, decide(r, w, POLICY, now), w, Applied(), now)
    assert (r.phase, dict(r.weights), r.promoted_at) == (Phase.PROMOTING, {2: 100}, 31.0)
    done = world({2: 100, 1: 0})
    r = transition(r, decide(r, done, POLICY, 61), done, Applied(), 61)
    assert r.phase is Phase.SUCCEEDED
    assert [e.kind_name for e in r.history] == ["promote_requested", "prepare", "promote",
                                                "retire"]
    assert r.history[1].count == 2  # the two loading ticks, coalesced


def test_a_rollback_lifts_the_pause():
    r = ro(paused=True, failed=1)
    w = world(cand=BAD, champ=CHAMP)
    r = transition(r, decide(r, w, POLICY, 60), w, Applied(), 60)
    assert (r.phase, r.paused) == (Phase.ROLLING_BACK, False)


def test_new_undo_rollout():
    r = new_undo_rollout("u1", "iris", 1, 3, POLICY, 7.0)
    assert (r.undo, r.candidate, r.champion, r.phase, r.created) == (True, 1, 3, Phase.PENDING,
                                                                     7.0)
    assert not new_rollout("n1", "iris", 1, 3, POLICY, 7.0).undo
    with pytest.raises(ValueError, match="v3 is already the champion of iris: nothing to undo"):
        new_undo_rollout("u1", "iris", 3, 3, POLICY, 7.0)


# ---- documents ----------------------------------------------------------------------------------

NEW_FIELDS = ("undo", "paused", "promote_requested")


def test_document_round_trip_with_the_new_fields_and_without_them():
    r = request_pause(ro(undo=True), "look", 3.0)
    r = request_resume(r, "go", 4.0)
    r = dataclasses.replace(request_promote(r, "ship", 5.0), paused=True)
    doc = json.loads(json.dumps(r.to_dict()))
    assert {k: doc[k] for k in NEW_FIELDS} == {"undo": True, "paused": True,
                                               "promote_requested": True}
    assert Rollout.from_dict(doc) == r
    assert [e.kind for e in Rollout.from_dict(doc).history] == [
        UserRequest.PAUSE, UserRequest.RESUME, UserRequest.PROMOTE]
    old = {k: v for k, v in doc.items() if k not in NEW_FIELDS}  # stored before they existed
    back = Rollout.from_dict(old)
    assert (back.undo, back.paused, back.promote_requested) == (False, False, False)
    assert Rollout.from_dict({**doc, **dict.fromkeys(NEW_FIELDS)}).paused is False  # nulls


@pytest.mark.parametrize("kind, want", [("set_weights", Action.SET_WEIGHTS), ("error", "error"),
                                        ("abort", Action.ABORT), ("paused", UserRequest.PAUSE),
                                        ("resumed", UserRequest.RESUME),
                                        ("promote_requested", UserRequest.PROMOTE)])
def test_event_kinds_read_back(kind, want):
    assert Event.from_dict({"at": 1.0, "kind": kind, "message": "m"}).kind == want
    with pytest.raises(ValueError):
        Event.from_dict({"at": 1.0, "kind": "bogus", "message": "m"})


def test_new_fields_survive_a_custom_resource_status():
    r = dataclasses.replace(request_promote(ro(undo=True), "ship", 5.0), paused=True)
    status = status_from_rollout(r)
    assert {k: status[k] for k in ("undo", "paused", "promoteRequested")} == {
        "undo": True, "paused": True, "promoteRequested": True}
    obj = {"metadata": {"name": "r1", "resourceVersion": "17"},
           "spec": {"model": "iris", "candidate": "2", "policy": {}},
           "status": json.loads(json.dumps(status))}
    back = rollout_from_cr(obj)
    assert (back.undo, back.paused, back.promote_requested) == (True, True, True)
    assert back.history == r.history
    old = {**obj, "status": {k: v for k, v in status.items()
                             if k not in ("undo", "paused", "promoteRequested")}}
    assert not rollout_from_cr(old).paused


def test_undo_is_in_a_custom_resources_spec_and_copied_when_it_starts():
    cr = cr_from_rollout(new_undo_rollout("u1", "iris", 1, 3, POLICY, 0.0), "ns")
    assert cr["spec"]["undo"] is True
    cr["metadata"]["resourceVersion"] = "1"
    pending = rollout_from_cr(cr)
    assert (pending.phase, pending.undo, pending.candidate, pending.champion) == (
        Phase.PENDING, True, 1, 3)
    plain = cr_from_rollout(new_rollout("n1", "iris", 1, 3, POLICY, 0.0), "ns")
    assert "undo" not in plain["spec"]


def test_crd_schema_keeps_the_new_fields():
    """The API server prunes fields its schema does not list."""
    schema = yaml.safe_load(CRD.read_text())["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    status = schema["properties"]["status"]["properties"]
    for key in ("undo", "paused", "promoteRequested"):
        assert status[key]["type"] == "boolean"
    assert schema["properties"]["spec"]["properties"]["undo"]["type"] == "boolean"


# ---- flows: the real controller, store and registry ---------------------------------------------

class Env:
    """v1 serving as champion, v2 published as candidate; rollout r1 of v2 unless ``create``
    is false. Every tick reopens the store and the backend, as a restarted controller would."""

    def __init__(self, tmp_path, candidate_accuracy=0.95, create=True):
        self.tmp = tmp_path
        self.registry = Registry(tmp_path / "registry")
        self.champion = publish(self.registry, tmp_path, "iris", 0.95)
        self.candidate = publish(self.registry, tmp_path, "iris", candidate_accuracy)
        self.registry.set_alias("iris", "champion", self.champion)
        self.admin = FakeAdmin()
        self.admin.load("iris", self.champion)
        self.admin.set_traffic("iris", {self.champion: 100})
        self.db = tmp_path / "kloop.db"
        self.clock = FakeClock(start=0.0)
        if create:
            self.store.create(new_rollout("r1", "iris", self.candidate, self.champion, POLICY,
                                          self.clock.now()))

    @property
    def store(self):
        return SQLiteRolloutStore(self.db)

    def tick(self, rollout_id="r1"):
        backend = LocalBackend(self.admin, now=self.clock.now, admin_errors=(AdminError, OSError))
        return tick(self.store, backend, self.registry, rollout_id, self.clock)

    def traffic(self, seconds=60, n=1000):
        self.admin.drive("iris", n)
        self.clock.advance(seconds)

    def user(self, request_, reason="", rollout_id="r1"):
        return user_request(self.store, rollout_id,
                            lambda r: request_(r, reason, self.clock.now()), self.clock)


def test_promote_at_step_one_skips_the_remaining_steps(tmp_path):
    e = Env(tmp_path)
    e.tick()
    r = e.tick()
    assert (r.phase, r.step, e.admin.weights["iris"]) == (Phase.PROGRESSING, 0, {1: 90, 2: 10})
    e.clock.advance(5)  # no analysis window has completed: promotion does not wait for one
    r = e.user(request_promote, "looks good")
    assert r.promote_requested and r.phase is Phase.PROGRESSING  # the next tick does the work
    r = e.tick()
    assert (r.phase, dict(r.weights)) == (Phase.PROMOTING, {2: 100})
    assert e.admin.weights["iris"] == {1: 0, 2: 100}
    assert e.registry.alias("iris", "champion") == e.candidate
    e.clock.advance(POLICY.retire_after_s)
    r = e.tick()
    assert r.phase is Phase.SUCCEEDED and e.admin.loaded["iris"] == {2}
    assert [h.kind_name for h in r.history] == [
        "run_gate", "set_weights", "promote_requested", "promote", "retire"]
    assert "looks good" in r.history[2].message


def test_paused_step_holds_past_its_timeout_and_resumes_from_there(tmp_path):
    e = Env(tmp_path)
    e.tick(), e.tick()
    r = e.user(request_pause, "watch it")
    for _ in range(20):  # 1220 s of passing analyses, twice the step timeout
        e.traffic()
        r = e.tick()  # passed: held, a fresh window starts
        assert (r.phase, r.step, r.paused) == (Phase.PROGRESSING, 0, True)
        e.clock.advance(1)
        r = e.tick()  # inconclusive (a 1 s window), where a running step would time out
        assert (r.phase, r.step, r.paused) == (Phase.PROGRESSING, 0, True)
    assert e.admin.weights["iris"] == {1: 90, 2: 10}
    assert (r.failed, r.errors) == (0, 0)
    # the held windows are one event (latest message, a count), not one per tick
    assert [h.kind_name for h in r.history] == ["run_gate", "set_weights", "paused", "wait"]
    assert r.history[-1].count == 40
    r = e.user(request_resume, "ok")
    assert (r.paused, r.step_started_at) == (False, e.clock.now())
    e.traffic()
    r = e.tick()
    assert (r.phase, r.step, e.admin.weights["iris"]) == (Phase.PROGRESSING, 1, {1: 50, 2: 50})


def test_resumed_step_times_out_from_the_resume(tmp_path):
    e = Env(tmp_path)
    e.tick(), e.tick()
    e.user(request_pause)
    for _ in range(10):  # nobody sends traffic: inconclusive, 1000 s, no timeout
        e.clock.advance(100)
        assert e.tick().phase is Phase.PROGRESSING
    resumed_at = e.clock.now()
    e.user(request_resume)
    e.clock.advance(POLICY.step_timeout_s - 1)
    assert e.tick().phase is Phase.PROGRESSING
    e.clock.advance(1)
    assert e.tick().phase is Phase.ROLLING_BACK
    r = e.tick()
    assert r.phase is Phase.ABORTED and "timed out after 600 s" in r.reason
    assert e.clock.now() - resumed_at == POLICY.step_timeout_s


def test_pause_does_not_hide_a_failing_canary(tmp_path):
    e = Env(tmp_path)
    e.tick(), e.tick()
    e.user(request_pause, "hold")
    e.admin.error_rate[e.candidate] = 0.3
    e.traffic()
    r = e.tick()
    assert (r.phase, r.failed, r.paused) == (Phase.PROGRESSING, 1, True)  # 1/2: a fresh window
    e.traffic()
    r = e.tick()
    assert r.phase is Phase.ROLLING_BACK and not r.paused
    r = e.tick()
    assert r.phase is Phase.ROLLED_BACK and "failed (2/2)" in r.reason
    assert e.admin.weights["iris"] == {1: 100}
    assert e.registry.alias("iris", "champion") == e.champion


def test_paused_before_the_gate_gates_and_loads_but_sends_no_traffic(tmp_path):
    e = Env(tmp_path)
    e.user(request_pause)
    r = e.tick()
    assert r.phase is Phase.GATING and r.gate.verdict is Verdict.SUCCESSFUL
    assert e.admin.loaded["iris"] == {1, 2}  # prepared
    for _ in range(3):
        e.clock.advance(POLICY.ready_timeout_s)
        r = e.tick()
        assert (r.phase, r.step) == (Phase.GATING, -1)
    assert e.admin.weights["iris"] == {1: 100, 2: 0}
    e.user(request_resume)
    r = e.tick()
    assert (r.phase, r.step, e.admin.weights["iris"]) == (Phase.PROGRESSING, 0, {1: 90, 2: 10})


def test_undo_skips_the_gate_and_the_steps(tmp_path):
    # v1 -> v2 succeeded earlier (recorded as such); v1 scores worse than v2
    e = Env(tmp_path, candidate_accuracy=0.99, create=False)
    done = new_rollout("r1", "iris", e.candidate, e.champion, POLICY, 0.0)
    e.store.create(dataclasses.replace(done, phase=Phase.SUCCEEDED))
    e.registry.set_alias("iris", "champion", e.candidate)
    e.admin.load("iris", e.candidate)
    e.admin.set_traffic("iris", {e.candidate: 100})
    e.admin.unload("iris", e.champion)
    assert former_champions(e.store, "iris") - {e.candidate} == {e.champion}

    undo = new_undo_rollout("u1", "iris", e.champion, e.candidate, POLICY, e.clock.now())
    assert run_gate(dataclasses.replace(undo, undo=False), e.registry).verdict is Verdict.FAILED
    e.store.create(undo)
    r = e.tick("u1")
    assert (r.phase, r.gate.verdict) == (Phase.GATING, Verdict.SUCCESSFUL)
    assert "undo does not re-run the gate" in r.gate.reasons[0]
    r = e.tick("u1")
    assert (r.phase, dict(r.weights)) == (Phase.PROMOTING, {e.champion: 100})
    assert e.admin.weights["iris"] == {e.champion: 100, e.candidate: 0}
    assert e.registry.alias("iris", "champion") == e.champion
    e.clock.advance(POLICY.retire_after_s)
    r = e.tick("u1")
    assert r.phase is Phase.SUCCEEDED and e.admin.loaded["iris"] == {e.champion}
    assert [h.kind_name for h in r.history] == ["run_gate", "promote", "retire"]
    assert not any(c[0] == "set_traffic" and set(c[2].values()) - {0, 100}
                   for c in e.admin.calls)  # never a split


def test_undo_to_a_version_that_was_never_champion_is_refused(tmp_path):
    e = Env(tmp_path, create=False)
    e.store.create(new_undo_rollout("u1", "iris", e.candidate, e.champion, POLICY, 0.0))
    r = e.tick("u1")
    assert (r.phase, r.gate.verdict) == (Phase.GATING, Verdict.ERROR)
    assert e.tick("u1").phase is Phase.ROLLING_BACK
    r = e.tick("u1")
    assert r.phase is Phase.ABORTED and "undo refused" in r.reason
    assert e.admin.weights["iris"] == {1: 100} and ("load", "iris", 2) not in e.admin.calls


def test_former_champions(tmp_path):
    store = SQLiteRolloutStore(tmp_path / "kloop.db")

    def stored(id, candidate, champion, phase, model="iris"):
        r = new_rollout(id, model, candidate, champion, POLICY, float(len(store.list())))
        store.create(dataclasses.replace(r, phase=phase))

    assert former_champions(store, "iris") == set()
    stored("a", 1, None, Phase.SUCCEEDED)  # a first version, promoted
    stored("b", 2, 1, Phase.SUCCEEDED)
    stored("c", 3, 2, Phase.ROLLED_BACK)  # never champion
    stored("d", 4, 2, Phase.ABORTED)
    stored("e", 5, 2, Phase.PROGRESSING)  # running: its champion counts, its candidate not yet
    stored("x", 9, 8, Phase.SUCCEEDED, model="digits")
    assert former_champions(store, "iris") == {1, 2}
    assert former_champions(store, "digits") == {8, 9}


# ---- user_request: saving a request beside the controller's ticks --------------------------------

class RacingStore(SQLiteRolloutStore):
    """Another writer (a tick) saves right after each of the next ``races`` reads."""

    def __init__(self, path, races):
        super().__init__(path)
        self.races = races

    def get(self, rollout_id):
        r = super().get(rollout_id)
        if self.races > 0:
            self.races -= 1
            SQLiteRolloutStore(self.path).save(dataclasses.replace(r, reason=f"tick {r.generation}"),
                                               expected_generation=r.generation)
        return r


def pause(r):
    return request_pause(r, "mine", 1.0)


def promote(r):
    return request_promote(r, "theirs", 1.0)


def started(tmp_path):
    """r1 in Progressing, as the SQLite store keeps it."""
    e = Env(tmp_path)
    e.tick(), e.tick()
    return e


def test_two_users_from_the_same_read_one_wins(tmp_path):
    e = started(tmp_path)
    read = e.store.get("r1")
    won = user_request(e.store, "r1", pause, e.clock, expected_generation=read.generation)
    assert won.paused and won.generation == read.generation + 1
    with pytest.raises(Conflict, match="read it again"):
        user_request(e.store, "r1", promote, e.clock, expected_generation=read.generation)
    assert e.store.get("r1") == won
    # a generation given as text (an API's) means the same; a promotion lifts the pause
    promoted = user_request(e.store, "r1", promote, e.clock,
                            expected_generation=str(won.generation))
    assert (promoted.promote_requested, promoted.paused) == (True, False)


def test_expected_generation_that_loses_the_save_raises_at_once(tmp_path):
    e = started(tmp_path)
    gen = e.store.get("r1").generation
    racing = RacingStore(e.db, races=5)
    with pytest.raises(Conflict, match="another writer moved it"):
        user_request(racing, "r1", pause, e.clock, expected_generation=gen)
    assert racing.races == 4  # one read, no retry
    assert not e.store.get("r1").paused


def test_without_expected_generation_it_retries_over_concurrent_ticks(tmp_path):
    e = started(tmp_path)
    gen = e.store.get("r1").generation
    racing = RacingStore(e.db, races=3)
    before = e.clock.now()
    r = user_request(racing, "r1", pause, e.clock)
    assert r.paused and r.generation == gen + 4  # three ticks, then the request
    assert r.reason == f"tick {gen + 2}"  # applied to the latest read: the tick's save is kept
    assert e.store.get("r1") == r
    assert e.clock.now() > before  # waited between attempts, on the injected clock

    racing = RacingStore(e.db, races=100)
    with pytest.raises(Conflict, match=f"{USER_REQUEST_ATTEMPTS} times"):
        user_request(racing, "r1", request_resume_op, e.clock)
    assert racing.races == 100 - USER_REQUEST_ATTEMPTS


def request_resume_op(r):
    return request_resume(r, "", 1.0)


def test_a_refused_request_propagates_and_saves_nothing(tmp_path):
    e = Env(tmp_path)  # Pending: the gate has not run
    gen = e.store.get("r1").generation
    with pytest.raises(ValueError, match="the gate has not passed yet"):
        user_request(e.store, "r1", promote, e.clock)
    assert e.store.get("r1").generation == gen


def test_a_request_already_in_force_saves_nothing(tmp_path):
    e = started(tmp_path)
    r = user_request(e.store, "r1", pause, e.clock)
    again = user_request(e.store, "r1", pause, e.clock, expected_generation=r.generation)
    assert again == r and e.store.get("r1").generation == r.generation
