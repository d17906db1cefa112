"""The offline gate for any metric and direction: the primary metric's tolerance and threshold,
MLflow-style extra conditions, and the cases where it cannot judge (ERROR, never FAILED)."""

from __future__ import annotations

import argparse
import itertools
import math

import pytest

from deploy.rollout import GatePolicy, MetricThreshold, Verdict, gate
from tests.unit.deploy.gate_support import declared, manifest

CLS = declared("accuracy", accuracy="higher", f1="higher", loss="lower")
REG = declared("rmse", rmse="lower", mae="lower")
REG_60 = declared("rmse", rmse=("lower", 60.0), mae="lower")
P = GatePolicy()  # tolerance 0.01, the task's threshold


def cls(accuracy: float, fingerprint: str = "fp", **more: float):
    return manifest({"accuracy": accuracy, **more}, evaluation=CLS, fingerprint=fingerprint)


def reg(rmse: float, evaluation: dict = REG, **more: float):
    return manifest({"rmse": rmse, **more}, evaluation=evaluation)


def legacy(accuracy: float, **more: float):
    return manifest({"accuracy": accuracy, **more})


@pytest.mark.parametrize(
    "cand, champ, policy, verdict, says",
    [
        # higher is better: no worse than the champion by more than the tolerance
        (cls(0.94), cls(0.95), P, Verdict.SUCCESSFUL,
         "candidate accuracy 0.94 >= champion 0.95 - 0.01 = 0.94 (higher is better)"),
        (cls(0.9399), cls(0.95), P, Verdict.FAILED, "candidate accuracy 0.9399 < champion 0.95"),
        (cls(0.99), cls(0.95), P, Verdict.SUCCESSFUL, "0.99 >= champion"),
        # lower is better: the same, mirrored
        (reg(52.1), reg(55.3), P, Verdict.SUCCESSFUL,
         "candidate rmse 52.1 <= champion 55.3 + 0.01 = 55.31 (lower is better)"),
        (reg(55.31), reg(55.3), P, Verdict.SUCCESSFUL, "55.31 <= champion 55.3 + 0.01"),
        (reg(55.32), reg(55.3), P, Verdict.FAILED, "candidate rmse 55.32 > champion 55.3"),
        (reg(60), reg(55.3), GatePolicy(tolerance=5), Verdict.SUCCESSFUL, "+ 5 = 60.3"),
        # the absolute threshold: a floor when higher is better, a ceiling when lower
        (cls(0.7), None, GatePolicy(threshold=0.8), Verdict.FAILED,
         "candidate accuracy 0.7 < the policy's threshold 0.8 (higher is better)"),
        (cls(0.8), None, GatePolicy(threshold=0.8), Verdict.SUCCESSFUL, ">= the policy's"),
        (reg(70), None, GatePolicy(threshold=60), Verdict.FAILED,
         "candidate rmse 70 > the policy's threshold 60 (lower is better)"),
        (reg(60), None, GatePolicy(threshold=60), Verdict.SUCCESSFUL, "rmse 60 <= the policy's"),
        (reg(50), reg(50), GatePolicy(threshold=40), Verdict.FAILED, "> the policy's threshold"),
        # the task's declared threshold when the policy has none; the policy's wins
        (reg(59, REG_60), None, P, Verdict.SUCCESSFUL, "rmse 59 <= the task's threshold 60"),
        (reg(61, REG_60), None, P, Verdict.FAILED, "rmse 61 > the task's threshold 60"),
        (reg(61, REG_60), reg(61, REG_60), P, Verdict.FAILED, "the task's threshold 60"),
        (reg(55, REG_60), None, GatePolicy(threshold=50), Verdict.FAILED, "policy's threshold 50"),
        # a first version needs an absolute threshold; the 0.5 floor is only for legacy ones
        (reg(10), None, P, Verdict.ERROR, "a first version needs an absolute threshold on rmse"),
        (cls(0.9), None, P, Verdict.ERROR, "a first version needs an absolute threshold"),
        (legacy(0.9), None, P, Verdict.SUCCESSFUL, ">= the default threshold 0.5 for accuracy"),
        # an explicit metric other than the primary
        (cls(0.9, loss=0.3), cls(0.9, loss=0.2), GatePolicy(metric="loss", tolerance=0.05),
         Verdict.FAILED, "candidate loss 0.3 > champion 0.2 + 0.05 = 0.25 (lower is better)"),
        # cannot judge: ERROR with the reason
        (cls(0.9), cls(0.9), GatePolicy(metric="f2"), Verdict.ERROR,
         "metric f2 has no direction"),
        (legacy(0.9, f1=0.9), None, GatePolicy(metric="f1", threshold=0.5), Verdict.ERROR,
         "metric f1 has no direction"),
        (cls(0.99), cls(0.95, "other"), P, Verdict.ERROR, "evaluated on different data"),
        (reg(50), cls(0.9), P, Verdict.ERROR,
         "different primary metrics: candidate rmse (lower is better), champion accuracy "
         "(higher is better)"),
        (manifest({"score": 1}, evaluation=declared("score", score="higher")),
         manifest({"score": 1}, evaluation=declared("score", score="lower")), P, Verdict.ERROR,
         "judge score differently: candidate score (higher is better), champion score "
         "(lower is better)"),
        (reg(math.nan), reg(50), P, Verdict.ERROR, "candidate has no numeric 'rmse' metric"),
        (reg(50), reg(math.inf), P, Verdict.ERROR, "champion has no numeric 'rmse' metric"),
        # a legacy champion (no declaration) against a candidate declaring the same accuracy
        (cls(0.95), legacy(0.95), P, Verdict.SUCCESSFUL, ">= champion 0.95"),
    ],
)
def test_the_primary_metric(cand, champ, policy, verdict, says):
    r = gate(cand, champ, policy)
    assert r.verdict is verdict, r.reasons
    assert says in " | ".join(r.reasons)


def C(metric: str, **limits: float) -> GatePolicy:
    """A policy with one extra condition (the primary judged as by default)."""
    return GatePolicy(conditions=(MetricThreshold(metric, **limits),))


@pytest.mark.parametrize(
    "cand, champ, policy, verdict, says",
    [
        # min_absolute_change: beat the champion by at least this, in the metric's direction
        (cls(0.9, f1=0.9), cls(0.9, f1=0.85), C("f1", min_absolute_change=0.05),
         Verdict.SUCCESSFUL, "f1 0.9 >= champion 0.85 + min absolute change 0.05 = 0.9"),
        (cls(0.9, f1=0.89), cls(0.9, f1=0.85), C("f1", min_absolute_change=0.05),
         Verdict.FAILED, "f1 0.89 < champion 0.85"),
        (reg(50, mae=9), reg(50, mae=10), C("mae", min_absolute_change=1), Verdict.SUCCESSFUL,
         "mae 9 <= champion 10 - min absolute change 1 = 9 (lower is better)"),
        (reg(50, mae=9.5), reg(50, mae=10), C("mae", min_absolute_change=1), Verdict.FAILED,
         "mae 9.5 > champion 10 - min absolute change 1 = 9"),
        # min_relative_change: by at least this fraction of |champion|
        (reg(49), reg(55), C("rmse", min_relative_change=0.1), Verdict.SUCCESSFUL,
         "rmse 49 <= champion 55 - min relative change 0.1 x |55| = 49.5"),
        (reg(50), reg(55), C("rmse", min_relative_change=0.1), Verdict.FAILED,
         "rmse 50 > champion 55 - min relative change 0.1"),
        (cls(0.9, f1=0.88), cls(0.9, f1=0.8), C("f1", min_relative_change=0.1),
         Verdict.SUCCESSFUL, "f1 0.88 >= champion 0.8 + min relative change 0.1 x |0.8| = 0.88"),
        # tolerance on another metric
        (reg(50, mae=10.5), reg(50, mae=10), C("mae", tolerance=0.5), Verdict.SUCCESSFUL,
         "mae 10.5 <= champion 10 + tolerance 0.5 = 10.5"),
        (reg(50, mae=10.6), reg(50, mae=10), C("mae", tolerance=0.5), Verdict.FAILED,
         "mae 10.6 > champion 10 + tolerance 0.5"),
        # an absolute threshold applies with or without a champion
        (cls(0.9, f1=0.7), None, GatePolicy(threshold=0.5, conditions=(
            MetricThreshold("f1", threshold=0.8),)), Verdict.FAILED,
         "f1 0.7 < the condition's threshold 0.8"),
        (reg(50, mae=3), reg(50, mae=2), C("mae", threshold=4), Verdict.SUCCESSFUL,
         "mae 3 <= the condition's threshold 4"),
        # without a champion, comparisons are skipped, saying so
        (reg(50, REG_60, mae=9), None, C("mae", min_absolute_change=1, threshold=10),
         Verdict.SUCCESSFUL, "condition mae min_absolute_change 1 skipped: no champion"),
        # cannot judge
        (cls(0.9, latency=3), cls(0.9, latency=3), C("latency", threshold=5), Verdict.ERROR,
         "metric latency has no direction"),
        (cls(0.9, f1=0.9), cls(0.9), C("f1", tolerance=0.1), Verdict.ERROR,
         "champion has no numeric 'f1' metric"),
        (cls(0.9, f1=0.9), legacy(0.9, f1=0.9), C("f1", tolerance=0.1), Verdict.ERROR,
         "judge f1 differently"),
        (cls(0.9), cls(0.9), C("f1", threshold=0.1), Verdict.ERROR,
         "candidate has no numeric 'f1' metric"),
    ],
)
def test_conditions(cand, champ, policy, verdict, says):
    r = gate(cand, champ, policy)
    assert r.verdict is verdict, r.reasons
    assert says in " | ".join(r.reasons)


def test_several_conditions_all_must_pass_and_the_failure_is_named_first():
    policy = GatePolicy(conditions=(
        MetricThreshold("mae", threshold=12), MetricThreshold("mae", tolerance=0.1),
        MetricThreshold("rmse", min_relative_change=0.01)))
    r = gate(reg(50, mae=10.5), reg(55, mae=10), policy)
    assert r.verdict is Verdict.FAILED
    assert r.reasons[0].startswith("candidate mae 10.5 > champion 10 + tolerance 0.1")
    assert len(r.reasons) == 4  # the primary's tolerance and three conditions, each stated
    ok = gate(reg(50, mae=10.05), reg(55, mae=10), policy)
    assert ok.verdict is Verdict.SUCCESSFUL and len(ok.reasons) == 4


@pytest.mark.parametrize("cand, champ", list(itertools.product(
    (0.1, 0.49, 0.5, 0.93, 0.94, 0.95, 0.99), (None, 0.5, 0.95))))
def test_legacy_manifests_are_judged_as_before(cand, champ):
    """Before tasks declared their metrics: accuracy >= 0.5 and >= champion - 0.01."""
    before = cand >= 0.5 and (champ is None or cand >= champ - 0.01 - 1e-12)
    r = gate(legacy(cand), None if champ is None else legacy(champ), GatePolicy())
    assert r.verdict is (Verdict.SUCCESSFUL if before else Verdict.FAILED), r.reasons


# ---- construction ------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, says", [
    ({"metric": "f1", "min_absolute_change": -0.1}, "min_absolute_change must be >= 0"),
    ({"metric": "f1", "min_relative_change": -1}, "min_relative_change must be >= 0"),
    ({"metric": "f1", "tolerance": -0.01}, "tolerance must be >= 0"),
    ({"metric": "f1", "threshold": math.nan}, "finite"),
    ({"metric": "f1", "threshold": math.inf}, "finite"),
    ({"metric": "f1", "threshold": True}, "finite"),
    ({"metric": "f1", "threshold": "0.5"}, "finite"),
    ({"metric": "", "threshold": 1}, "name a metric"),
    ({"metric": "f1"}, "sets no limit"),
])
def test_metric_threshold_is_validated(kw, says):
    with pytest.raises(ValueError, match=says):
        MetricThreshold(**kw)


@pytest.mark.parametrize("kw, says", [
    ({"tolerance": -0.1}, "tolerance must be >= 0"),
    ({"tolerance": math.nan}, "finite"),
    ({"threshold": math.inf}, "finite"),
    ({"metric": ""}, "name a metric"),
    ({"conditions": ({"metric": "f1", "threshold": 1},)}, "must be a MetricThreshold"),
])
def test_gate_policy_is_validated(kw, says):
    with pytest.raises(ValueError, match=says):
        GatePolicy(**kw)


def test_a_negative_threshold_is_a_number_like_any_other():
    assert GatePolicy(threshold=-3).threshold == -3.0
    assert MetricThreshold("log_likelihood", threshold=-120).threshold == -120.0


# ---- the command line --------------------------------------------------------------------------


@pytest.mark.parametrize("text, want", [
    ("f1:threshold=0.8", MetricThreshold("f1", threshold=0.8)),
    ("rmse:min_absolute_change=1,tolerance=0.5",
     MetricThreshold("rmse", min_absolute_change=1, tolerance=0.5)),
    (" f1 : threshold = 0.8 , min_relative_change=0.02",
     MetricThreshold("f1", threshold=0.8, min_relative_change=0.02)),
    ("nll:threshold=-2.5", MetricThreshold("nll", threshold=-2.5)),
])
def test_condition_text_parses(text, want):
    assert MetricThreshold.parse(text) == want
    assert MetricThreshold.parse(str(want)) == want  # str() is the flag's spelling


@pytest.mark.parametrize("text, says", [
    ("f1", "not METRIC:key=value"),
    ("f1:", "not METRIC:key=value"),
    (":threshold=1", "not METRIC:key=value"),
    ("f1:threshold", "not key=value"),
    ("f1:floor=1", "not key=value with a key in threshold"),
    ("f1:threshold=high", "is not a number"),
    ("f1:threshold=1,threshold=2", "given twice"),
    ("f1:min_absolute_change=-1", "must be >= 0"),
    ("f1:threshold=inf", "finite"),
])
def test_condition_text_is_refused(text, says):
    with pytest.raises(ValueError, match=says):
        MetricThreshold.parse(text)


def _parser() -> argparse.ArgumentParser:
    from deploy.cli import common

    p = argparse.ArgumentParser(prog="kloop rollout")
    common.add_policy_args(p)
    return p


def test_gate_flags_reach_the_policy():
    from deploy.cli import common

    args = _parser().parse_args([
        "--gate-metric", "rmse", "--gate-tolerance", "0.5", "--gate-threshold", "60",
        "--gate-condition", "mae:threshold=10", "--gate-condition", "mae:tolerance=0.2"])
    assert common.policy(args).gate == GatePolicy(
        metric="rmse", tolerance=0.5, threshold=60,
        conditions=(MetricThreshold("mae", threshold=10), MetricThreshold("mae", tolerance=0.2)))
    assert common.given_policy(args)["gate_conditions"] == [
        {"metric": "mae", "threshold": 10.0}, {"metric": "mae", "tolerance": 0.2}]
    assert common.policy(_parser().parse_args([])).gate == GatePolicy()


def test_the_former_gate_flags_are_aliases():
    from deploy.cli import common

    args = _parser().parse_args(["--max-accuracy-drop", "0.02", "--min-accuracy", "0.6"])
    assert common.policy(args).gate == GatePolicy(tolerance=0.02, threshold=0.6)


@pytest.mark.parametrize("argv, flag", [
    (["--gate-condition", "f1"], "--gate-condition"),
    (["--gate-condition", "f1:floor=0.8"], "--gate-condition"),
    (["--gate-condition", "f1:tolerance=-1"], "--gate-condition"),
    (["--gate-tolerance", "-1"], "--gate-tolerance"),
    (["--max-accuracy-drop", "-1"], "--gate-tolerance"),
    (["--gate-threshold", "nan"], "--gate-threshold"),
    (["--gate-threshold", "high"], "--gate-threshold"),
    (["--gate-metric", ""], "--gate-metric"),
])
def test_bad_gate_flags_are_refused_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        _parser().parse_args(argv)
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"argument {flag}" in last, last


def test_a_changed_condition_is_shown_as_its_flag_spells_it():
    from deploy.cli.rollout_cmd import _show

    assert _show([{"metric": "f1", "threshold": 0.8}, {"metric": "mae", "tolerance": 1.0}]) \
        == "f1:threshold=0.8 mae:tolerance=1"
