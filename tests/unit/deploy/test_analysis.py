import math

import pytest

from deploy.rollout.analysis import AnalysisPolicy, GatePolicy, Verdict, VersionStats, analyse, gate
from deploy.rollout.samples import VersionSample
from kloop.artifact import Manifest
from tests.unit.deploy.gate_support import manifest

INF = math.inf


def M(metrics: dict, fingerprint: str = "fp") -> Manifest:
    """A manifest published before tasks declared their evaluation (legacy: accuracy)."""
    return manifest(metrics, fingerprint=fingerprint)


P = GatePolicy(tolerance=0.01)


@pytest.mark.parametrize(
    "cand, champ, policy, verdict, says",
    [
        (M({"accuracy": 0.95}), M({"accuracy": 0.95}), P, Verdict.SUCCESSFUL, "champion"),
        (M({"accuracy": 0.94}), M({"accuracy": 0.95}), P, Verdict.SUCCESSFUL, "0.94 >="),
        (M({"accuracy": 0.93}), M({"accuracy": 0.95}), P, Verdict.FAILED, "0.93 <"),
        (M({"accuracy": 0.99}), M({"accuracy": 0.95}, "other"), P, Verdict.ERROR,
         "evaluated on different data; cannot compare"),
        (M({}), M({"accuracy": 0.95}), P, Verdict.ERROR, "candidate has no numeric"),
        (M({"accuracy": 0.9}), M({"loss": 1.0}), P, Verdict.ERROR, "champion has no numeric"),
        (M({"accuracy": "high"}), None, P, Verdict.ERROR, "candidate has no numeric"),
        # no champion: only the absolute floor applies (0.5 by default), and one is needed
        (M({"accuracy": 0.5}), None, P, Verdict.SUCCESSFUL, ">= the default threshold 0.5"),
        (M({"accuracy": 0.1}), None, P, Verdict.FAILED, "< the default threshold 0.5"),
        (M({"loss": 0.1}), None, GatePolicy(metric="loss"), Verdict.ERROR,
         "a first version needs an absolute threshold"),
        (M({"accuracy": 0.5}), None, GatePolicy(threshold=0.8), Verdict.FAILED, "threshold 0.8"),
        (M({"accuracy": 0.85}), None, GatePolicy(threshold=0.8), Verdict.SUCCESSFUL, "threshold"),
        # both checks apply with a champion
        (M({"accuracy": 0.95}), M({"accuracy": 0.95}), GatePolicy(threshold=0.97),
         Verdict.FAILED, "threshold"),
    ],
)
def test_gate(cand, champ, policy, verdict, says):
    r = gate(cand, champ, policy)
    assert r.verdict is verdict
    assert says in " ".join(r.reasons)


def test_gate_policy_rejects_out_of_range():
    with pytest.raises(ValueError):
        GatePolicy(tolerance=-0.1)
    with pytest.raises(ValueError):
        GatePolicy(threshold=math.nan)


AP = AnalysisPolicy(min_requests=100, min_duration_s=60, max_error_rate=0.01,
                    max_error_ratio=1.5, error_rate_slack=0.005, max_p99_ratio=1.5,
                    p99_slack_ms=5)
ZERO = VersionSample.zero(0)


def s(requests, errors, fast, slow=0):
    """``fast`` requests at <= 10 ms, ``slow`` at <= 500 ms."""
    n = fast + slow
    return VersionSample(requests, errors, ((0.01, fast), (0.5, n), (INF, n)), 0)


@pytest.mark.parametrize(
    "cand, champ, elapsed, verdict, says",
    [
        (s(200, 0, 200), s(2000, 0, 2000), 60, Verdict.SUCCESSFUL, "error rate"),
        # candidate 2% vs champion 0.1%: over max(0.15%, 0.6%, 1%)
        (s(200, 4, 200), s(2000, 2, 2000), 60, Verdict.FAILED, "error rate 0.0200 vs limit 0.0100"),
        # champion itself at 4%: candidate 5% is within 4% * 1.5
        (s(200, 10, 200), s(2000, 80, 2000), 60, Verdict.SUCCESSFUL, "error rate"),
        # one error in 200 (0.5%) with a perfect champion: within the absolute rate
        (s(200, 1, 200), s(2000, 0, 2000), 60, Verdict.SUCCESSFUL, "error rate"),
        # p99 regression: candidate's tail at 500 ms, champion's at 10 ms
        (s(200, 0, 190, 10), s(2000, 0, 2000), 60, Verdict.FAILED, "p99"),
        (s(99, 0, 99), s(2000, 0, 2000), 600, Verdict.INCONCLUSIVE, "99/100 requests"),
        (s(500, 0, 500), s(2000, 0, 2000), 30, Verdict.INCONCLUSIVE, "30/60 s"),
        # too little traffic even though every request failed: wait, not failed
        (s(50, 50, 50), s(2000, 0, 2000), 600, Verdict.INCONCLUSIVE, "50/100"),
        (None, s(2000, 0, 2000), 60, Verdict.ERROR, "candidate metrics are missing"),
        (s(200, 0, 0), s(2000, 0, 2000), 60, Verdict.ERROR, "no latency histogram"),
    ],
)
def test_analyse(cand, champ, elapsed, verdict, says):
    a = analyse(cand, ZERO, champ, ZERO, AP, elapsed)
    assert a.verdict is verdict, a.reasons
    assert says in a.message


def test_failure_reason_names_metric_value_and_limit():
    a = analyse(s(200, 0, 190, 10), ZERO, s(2000, 0, 2000), ZERO, AP, 60)
    assert "p99" in a.message and "limit" in a.message and "champion" in a.message


def test_counter_reset_is_error_not_failed():
    base = s(5000, 0, 5000)
    a = analyse(s(200, 50, 200), base, s(2000, 0, 2000), ZERO, AP, 60)
    assert a.verdict is Verdict.ERROR and a.counter_reset


def test_missing_champion_sample_is_error():
    a = analyse(s(200, 0, 200), ZERO, None, ZERO, AP, 60)
    assert a.verdict is Verdict.ERROR


def test_idle_champion_uses_the_reference_window():
    ref = VersionStats(requests=1000, server_errors=0, error_rate=0.0, p99_s=0.01)
    slow = analyse(s(200, 0, 190, 10), ZERO, s(0, 0, 0), ZERO, AP, 60, reference=ref)
    assert slow.verdict is Verdict.FAILED and "p99" in slow.message
    ok = analyse(s(200, 0, 200), ZERO, s(0, 0, 0), ZERO, AP, 60, reference=ref)
    assert ok.verdict is Verdict.SUCCESSFUL


def test_first_version_is_judged_on_absolute_limits_only():
    ok = analyse(s(200, 1, 190, 10), ZERO, None, None, AP, 60)
    assert ok.verdict is Verdict.SUCCESSFUL and "absolute" in ok.message
    bad = analyse(s(200, 10, 200), ZERO, None, None, AP, 60)
    assert bad.verdict is Verdict.FAILED


def test_gate_fails_a_candidate_whose_signature_differs() -> None:
    from kloop.artifact import TensorSpec

    def M(name: str) -> Manifest:
        return manifest({"accuracy": 0.99}, inputs=(TensorSpec(name, "FP32", (-1, 1, 8, 8)),))

    r = gate(M("pixels"), M("image"), GatePolicy())
    assert r.verdict is Verdict.FAILED
    assert "pixels" in r.reasons[0] and "image" in r.reasons[0]
    assert gate(M("image"), M("image"), GatePolicy()).verdict is Verdict.SUCCESSFUL
