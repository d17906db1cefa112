import dataclasses
import json
import math

import pytest

from deploy.rollout import (
    Action,
    Applied,
    GateResult,
    Phase,
    Rollout,
    RolloutPolicy,
    Verdict,
    VersionSample,
    World,
    decide,
    new_rollout,
    next_weight,
    transition,
)

INF = math.inf
POLICY = RolloutPolicy.from_dict(dict(steps=(10, 50, 100), min_requests=100, min_duration_s=60,
                                      step_timeout_s=600, failure_limit=2, error_limit=3,
                                      retire_after_s=60))
ZERO = VersionSample.zero(0)


def sample(requests, errors=0, slow=0):
    fast = requests - slow
    return VersionSample(requests, errors, ((0.01, fast), (0.5, requests), (INF, requests)), 0)


def ro(**kw):
    base = {"id": "r1", "model": "iris", "candidate": 2, "champion": 1, "policy": POLICY,
            "created": 0.0, "phase": Phase.PROGRESSING, "step": 0, "weights": {2: 10, 1: 90},
            "step_started_at": 0.0, "window_started_at": 0.0, "baseline": {2: ZERO, 1: ZERO}}
    return Rollout(**{**base, **kw})


def world(weights=None, cand=None, champ=None, error=None):
    samples = None if error else {2: cand or ZERO, 1: champ or ZERO}
    return World(weights=weights if weights is not None else {2: 10, 1: 90},
                 loaded=frozenset({1, 2}), samples=samples, error=error)


GOOD, CHAMP = sample(200), sample(2000)


# ---- policy ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    "kw, says",
    [
        ({"steps": (10, 50)}, "end at 100"),
        ({"steps": ()}, "end at 100"),
        ({"steps": (50, 10, 100)}, "strictly increasing"),
        ({"steps": (10, 10, 100)}, "strictly increasing"),
        ({"steps": (0, 100)}, "strictly increasing"),
        ({"min_requests": -1}, "min_requests"),
        ({"max_error_rate": -0.1}, "max_error_rate"),
        ({"max_error_rate": 2}, "fraction"),
        ({"failure_limit": 0}, "failure_limit"),
        ({"error_limit": -1}, "error_limit"),
        ({"max_p99_ratio": 0.5}, "max_p99_ratio"),
        ({"step_timeout_s": 30, "min_duration_s": 60}, "step_timeout_s"),
        ({"gate_tolerance": -0.1}, "gate tolerance"),
        ({"max_accuracy_drop": -0.1}, "gate tolerance"),  # the former key of gate_tolerance
        ({"gate_threshold": math.inf}, "gate threshold"),
        ({"gate_conditions": [{"metric": "f1", "tolerance": -1}]}, "tolerance must be >= 0"),
        ({"p99_slack_ms": math.nan}, "p99_slack_ms"),
    ],
)
def test_policy_rejects_bad_combinations(kw, says):
    with pytest.raises(ValueError, match=says):
        RolloutPolicy.from_dict(kw)


def test_policy_round_trip_and_unknown_fields():
    assert RolloutPolicy.from_dict(POLICY.to_dict()) == POLICY
    with pytest.raises(ValueError, match="unknown"):
        RolloutPolicy.from_dict({"stepz": [100]})


@pytest.mark.parametrize(
    "steps, current, want",
    [((10, 50, 100), 0, 10), ((10, 50, 100), 10, 50), ((10, 50, 100), 50, 100),
     ((10, 50, 100), 100, None), ((10, 50, 100), 30, 50), ((100,), 0, 100), ((5, 100), 99, 100)],
)
def test_next_weight(steps, current, want):
    assert next_weight(steps, current) == want


# ---- decide ------------------------------------------------------------------------------------

def test_pending_runs_the_gate():
    d = decide(ro(phase=Phase.PENDING, step=-1, weights={}), world(), POLICY, 0)
    assert d.action is Action.RUN_GATE


@pytest.mark.parametrize(
    "verdict, action, says",
    [
        (Verdict.SUCCESSFUL, Action.SET_WEIGHTS, "gate passed"),
        (Verdict.FAILED, Action.ROLLBACK, "before any traffic"),
        (Verdict.ERROR, Action.ABORT, "evaluated on different data"),
    ],
)
def test_gating(verdict, action, says):
    g = GateResult(verdict, ("evaluated on different data" if verdict is Verdict.ERROR else "x",))
    r = ro(phase=Phase.GATING, step=-1, weights={}, gate=g)
    d = decide(r, world(weights={1: 100}), POLICY, 0)
    assert d.action is action and says in d.reason
    if action is Action.SET_WEIGHTS:
        assert d.weights == {2: 10, 1: 90} and d.step == 0


@pytest.mark.parametrize(
    "r, w, now, action, verdict, says",
    [
        # step passes -> next step's weights
        (ro(), world(cand=GOOD, champ=CHAMP), 60, Action.SET_WEIGHTS, Verdict.SUCCESSFUL, "passed"),
        # last step passes -> promote
        (ro(step=2, weights={2: 100, 1: 0}), world({2: 100, 1: 0}, GOOD, ZERO), 60,
         Action.PROMOTE, Verdict.SUCCESSFUL, "step 3/3"),
        # error spike at the failure limit -> roll back
        (ro(failed=1), world(cand=sample(200, 20), champ=CHAMP), 60, Action.ROLLBACK,
         Verdict.FAILED, "error rate 0.1000"),
        # first failure under the limit -> new window, not yet rollback
        (ro(), world(cand=sample(200, 20), champ=CHAMP), 60, Action.WAIT, Verdict.FAILED, "1/2"),
        # too little traffic, even all errors: wait
        (ro(), world(cand=sample(20, 20), champ=CHAMP), 300, Action.WAIT, Verdict.INCONCLUSIVE,
         "20/100 requests"),
        # too little time: wait
        (ro(), world(cand=GOOD, champ=CHAMP), 59, Action.WAIT, Verdict.INCONCLUSIVE, "59/60 s"),
        # metrics unreachable: error verdict, waits under the limit
        (ro(), world(error="connection refused"), 60, Action.WAIT, Verdict.ERROR, "1/3"),
        # error limit reached and the streak lasted outage_tolerance_s: abort, never a rollback
        (ro(errors=2, errors_since=10), world(error="connection refused"), 60, Action.ABORT,
         Verdict.ERROR, "3 times in a row over 50.0s"),
        # as many errors, but within outage_tolerance_s (30 s): still waiting, whatever the
        # tick interval
        (ro(errors=2, errors_since=40), world(error="connection refused"), 60, Action.WAIT,
         Verdict.ERROR, "3/3"),
        # a streak long enough in seconds but with too few errors (one slow tick): waiting
        (ro(errors=1, errors_since=0), world(error="connection refused"), 60, Action.WAIT,
         Verdict.ERROR, "2/3"),
        # counter reset: error, not failed
        (ro(baseline={2: sample(5000), 1: ZERO}), world(cand=GOOD, champ=CHAMP), 60,
         Action.WAIT, Verdict.ERROR, "restarted"),
        # step timeout while inconclusive: abort
        (ro(), world(cand=sample(5), champ=CHAMP), 600, Action.ABORT, Verdict.INCONCLUSIVE,
         "timed out"),
        # world already at the next step (applied, not saved): adopt, do not step twice
        (ro(), world({2: 50, 1: 50}, GOOD, CHAMP), 60, Action.SET_WEIGHTS, None, "adopting"),
        # drift (server restarted with the champion at 100): restore this step
        (ro(), world({1: 100}, GOOD, CHAMP), 60, Action.SET_WEIGHTS, None, "drifted"),
    ],
)
def test_decide_progressing(r, w, now, action, verdict, says):
    d = decide(r, w, POLICY, now)
    assert (d.action, d.verdict) == (action, verdict), d.reason
    assert says in d.reason


def test_decide_steps_and_adoption_carry_weights():
    d = decide(ro(), world(cand=GOOD, champ=CHAMP), POLICY, 60)
    assert d.weights == {2: 50, 1: 50} and d.step == 1
    adopt = decide(ro(), world({2: 50, 1: 50}, GOOD, CHAMP), POLICY, 60)
    assert adopt.weights == {2: 50, 1: 50} and adopt.step == 1  # not 100
    drift = decide(ro(), world({1: 100}), POLICY, 60)
    assert drift.weights == {2: 10, 1: 90} and drift.step == 0


def test_error_never_counts_as_failed():
    r = ro(failed=1)  # one more failure would roll back
    for i in range(4):
        now = 60 + 15 * i
        d = decide(r, world(error="down"), POLICY, now)
        assert d.action is not Action.ROLLBACK
        r = transition(r, d, world(error="down"), Applied(), now)
        assert r.failed == 1
    assert r.phase is Phase.ABORTED and r.outcome is Phase.ABORTED
    assert "traffic restored (v1 100%)" in r.history[-1].message


def test_promoting_keeps_old_champion_then_retires():
    r = ro(phase=Phase.PROMOTING, step=2, weights={2: 100}, promoted_at=100.0)
    assert decide(r, world(), POLICY, 120).action is Action.WAIT
    assert decide(r, world(), POLICY, 160).action is Action.RETIRE
    assert decide(dataclasses.replace(r, promoted_at=None), world(), POLICY, 120).action \
        is Action.PROMOTE


def test_terminal_does_nothing():
    for p in (Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.ABORTED):
        assert decide(ro(phase=p), world(), POLICY, 0).action is Action.NOTHING


def test_first_version_goes_straight_to_100():
    r = ro(champion=None, phase=Phase.GATING, step=-1, weights={},
           gate=GateResult(Verdict.SUCCESSFUL, ("ok",)))
    d = decide(r, world(weights={}), POLICY, 0)
    assert d.weights == {2: 100} and d.step == 0


# ---- transition --------------------------------------------------------------------------------

def test_set_weights_starts_a_step_with_a_baseline():
    w = world(cand=GOOD, champ=CHAMP)
    d = decide(ro(), w, POLICY, 60)
    r = transition(ro(), d, w, Applied(), 60)
    assert (r.phase, r.step, dict(r.weights)) == (Phase.PROGRESSING, 1, {2: 50, 1: 50})
    assert r.step_started_at == 60 and r.window_started_at == 60
    assert r.baseline == {2: GOOD, 1: CHAMP}
    assert r.champion_reference is not None and r.champion_reference.requests == 2000
    assert r.history[-1].kind_name == "set_weights"


def test_rollback_after_failure_limit():
    r = ro()
    bad = world(cand=sample(200, 20), champ=CHAMP)
    d1 = decide(r, bad, POLICY, 60)
    r = transition(r, d1, bad, Applied(), 60)
    assert (r.phase, r.failed, r.window_started_at) == (Phase.PROGRESSING, 1, 60)
    bad2 = world(cand=sample(400, 40), champ=sample(4000))
    d2 = decide(r, bad2, POLICY, 120)
    assert d2.action is Action.ROLLBACK
    r = transition(r, d2, bad2, Applied(), 120)
    # decided and saved first: nothing is written until the next tick
    assert (r.phase, r.outcome, r.failed) == (Phase.ROLLING_BACK, Phase.ROLLED_BACK, 2)
    assert dict(r.weights) == {1: 90, 2: 10}
    d3 = decide(r, bad2, POLICY, 121)
    assert d3.action is Action.ROLLBACK
    r = transition(r, d3, bad2, Applied(), 121)
    assert (r.phase, r.failed, dict(r.weights)) == (Phase.ROLLED_BACK, 2, {1: 100})


def test_failed_rollback_write_is_recorded_and_retried():
    bad = world(cand=sample(200, 20), champ=CHAMP)
    r = ro(failed=1)
    d = decide(r, bad, POLICY, 60)
    r = transition(r, d, bad, Applied(error="server down"), 60)
    assert (r.phase, r.outcome, r.errors) == (Phase.ROLLING_BACK, Phase.ROLLED_BACK, 1)
    # however good the next window looks, the decision stands
    d = decide(r, world(cand=GOOD, champ=CHAMP), POLICY, 70)
    assert d.action is Action.ROLLBACK
    r = transition(r, d, world(), Applied(), 70)
    assert r.phase is Phase.ROLLED_BACK and "error rate" in r.reason


def test_gate_fail_rolls_back_before_any_traffic():
    r = ro(phase=Phase.PENDING, step=-1, weights={})
    r = transition(r, decide(r, world(), POLICY, 0), world(),
                   Applied(gate=GateResult(Verdict.FAILED, ("worse",))), 0)
    assert r.phase is Phase.GATING
    for now in (1, 2):  # decide (saved), then restore the champion
        d = decide(r, world({1: 100}), POLICY, now)
        r = transition(r, d, world({1: 100}), Applied(), now)
    assert r.phase is Phase.ROLLED_BACK and r.step == -1 and "worse" in r.reason


def test_waits_are_coalesced_in_history():
    r = ro()
    w = world(cand=sample(5), champ=CHAMP)
    for t in (10, 20, 30):
        r = transition(r, decide(r, w, POLICY, t), w, Applied(), t)
    assert len(r.history) == 1 and r.history[0].count == 3 and r.history[0].at == 30


def test_rollout_json_round_trip():
    w = world(cand=GOOD, champ=CHAMP)
    r = transition(ro(gate=GateResult(Verdict.SUCCESSFUL, ("ok",))), decide(ro(), w, POLICY, 60),
                   w, Applied(), 60)
    doc = json.loads(json.dumps(r.to_dict()))
    assert Rollout.from_dict(doc) == r


def test_new_rollout_refuses_candidate_equal_champion():
    with pytest.raises(ValueError):
        new_rollout("x", "iris", 1, 1, POLICY, 0)
    r = new_rollout("x", "iris", 2, 1, POLICY, 5)  # type: ignore[arg-type]
    assert (r.candidate, r.champion, r.phase) == (2, 1, Phase.PENDING)


# ---- readiness of the candidate before its first traffic ----------------------------------------

PASSED = GateResult(Verdict.SUCCESSFUL, ("ok",))


def gated(**kw):
    return ro(**{"phase": Phase.GATING, "step": -1, "weights": {}, "gate": PASSED,
                 "step_started_at": None, "window_started_at": None, "baseline": {}, **kw})


def not_ready(failed=None):
    return World(weights={1: 100}, loaded=frozenset({1}), samples={1: ZERO},
                 failed=failed or {})


@pytest.mark.parametrize(
    "r, w, now, action, says",
    [
        # ready at once (a synchronous backend): first step
        (gated(preparing_since=0.0), world({1: 100}), 0, Action.SET_WEIGHTS, "v2 ready"),
        # not ready, never asked to load (e.g. the gate's load failed): prepare
        (gated(), not_ready(), 0, Action.PREPARE, "loading v2"),
        # asked, still loading: wait, saying how long
        (gated(preparing_since=0.0), not_ready(), 30, Action.PREPARE, "30s of 600s"),
        # deadline over: roll back, blaming the candidate
        (gated(preparing_since=0.0), not_ready(), 600, Action.ROLLBACK,
         "candidate never became ready: v2 not ready 600s"),
        # the backend says it failed: roll back at once, with its message
        (gated(preparing_since=0.0), not_ready({2: "FailedToLoad: bad model"}), 1,
         Action.ROLLBACK, "candidate never became ready: v2 failed to load: FailedToLoad: bad"),
        # the world cannot be read: could not measure, not a readiness failure
        (gated(preparing_since=0.0), world(error="timeout"), 700, Action.WAIT, "could not measure"),
    ],
)
def test_candidate_readiness(r, w, now, action, says):
    d = decide(r, w, POLICY, now)
    assert d.action is action and says in d.reason, d.reason
    if action is Action.ROLLBACK:
        assert d.verdict is Verdict.FAILED
    if action is Action.SET_WEIGHTS:
        assert d.weights == {2: 10, 1: 90}


def test_no_traffic_to_a_candidate_that_is_not_ready():
    """Whatever the time, the first SET_WEIGHTS comes only once the candidate is loaded; until
    then the load is asked for again (idempotent: a restarted server forgot it)."""
    r = gated(preparing_since=0.0)
    for now in (0, 10, 100, 599):
        assert decide(r, not_ready(), POLICY, now).action is Action.PREPARE


def test_passing_gate_starts_the_ready_clock_and_failing_gate_does_not():
    r = ro(phase=Phase.PENDING, step=-1, weights={})
    d = decide(r, world(), POLICY, 5)
    assert transition(r, d, world(), Applied(gate=PASSED), 5).preparing_since == 5
    bad = Applied(gate=GateResult(Verdict.FAILED, ("worse",)))
    assert transition(r, d, world(), bad, 5).preparing_since is None


def test_prepare_then_wait_then_rollback_on_deadline():
    r = gated()
    d = decide(r, not_ready(), POLICY, 0)
    r = transition(r, d, not_ready(), Applied(), 0)
    assert (r.phase, r.preparing_since, r.history[-1].kind_name) == (Phase.GATING, 0, "prepare")
    for now in (10, 20):
        r = transition(r, decide(r, not_ready(), POLICY, now), not_ready(), Applied(), now)
    assert r.history[-1].kind_name == "prepare" and r.history[-1].count == 3  # coalesced
    assert r.preparing_since == 0  # the deadline runs from the first load
    for now in (600, 601):
        d = decide(r, not_ready(), POLICY, now)
        r = transition(r, d, not_ready(), Applied(), now)
    assert (r.phase, dict(r.weights)) == (Phase.ROLLED_BACK, {1: 100})
    assert r.reason.startswith("candidate never became ready")


def test_ready_timeout_is_validated_and_round_trips():
    with pytest.raises(ValueError, match="ready_timeout_s"):
        RolloutPolicy(ready_timeout_s=0)
    p = RolloutPolicy(ready_timeout_s=42)
    assert RolloutPolicy.from_dict(p.to_dict()) == p
    r = gated(preparing_since=7.0)
    assert Rollout.from_dict(r.to_dict()).preparing_since == 7.0
    old = {k: v for k, v in r.to_dict().items() if k != "preparing_since"}
    assert Rollout.from_dict(old).preparing_since is None  # stored before the field existed
