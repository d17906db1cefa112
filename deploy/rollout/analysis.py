"""Judgement: the evaluation gate (offline) and live analysis (online). Pure functions only.

Both answer with a ``Verdict``:

* ``successful`` -- the evidence says the candidate is good enough;
* ``failed`` -- the evidence says the candidate is worse than allowed (with which metric,
  the value and the limit);
* ``inconclusive`` -- not enough evidence yet (too few requests, too little time): wait;
* ``error`` -- the evidence could not be gathered (metrics missing or unreachable, counters
  reset, manifests without the metric, evaluated on different data) or cannot be read (a
  metric whose direction the task does not declare, candidate and champion declaring different
  primary metrics or directions).

"Could not measure" is never "failed": an unreachable scrape must not roll back a good model,
and a missing metric must not promote a bad one. The rollout counts ``error`` toward its own
limit and aborts (traffic back to the champion, candidate not blamed).
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping
from typing import Any, Protocol

from deploy.rollout.policy import AnalysisPolicy, GatePolicy, MetricThreshold
from deploy.rollout.samples import CounterReset, VersionDelta, VersionSample, delta, quantile


class Verdict(enum.Enum):
    SUCCESSFUL = "successful"
    FAILED = "failed"
    INCONCLUSIVE = "inconclusive"
    ERROR = "error"


# ---- evaluation gate -----------------------------------------------------------------------


class _HasEvaluation(Protocol):
    """What the gate reads from a manifest (``kloop.artifact.Manifest`` satisfies it)."""

    @property
    def metrics(self) -> Mapping[str, Any]: ...

    @property
    def data_fingerprint(self) -> str: ...

    @property
    def evaluation(self) -> Mapping[str, Any]: ...

    @property
    def primary_metric(self) -> str: ...

    def direction(self, metric: str) -> str | None: ...

    def threshold(self, metric: str) -> float | None: ...


@dataclasses.dataclass(frozen=True)
class GateResult:
    verdict: Verdict
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict.value, "reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateResult:
        return cls(Verdict(d["verdict"]), tuple(d["reasons"]))


# Manifests published before tasks declared their evaluation were all the digits CNN's: their
# floor is the one the gate always had (``GatePolicy.threshold``).
_LEGACY_THRESHOLDS = {"accuracy": 0.5}
_EPS = 1e-12  # float noise must not fail an exactly-at-limit candidate


class _CannotJudge(Exception):
    """The gate could not measure: its verdict is ERROR with this reason."""


@dataclasses.dataclass(frozen=True)
class _Check:
    ok: bool | None  # None: skipped (needs a champion there is not)
    reason: str


def gate(
    candidate: _HasEvaluation, champion: _HasEvaluation | None, policy: GatePolicy
) -> GateResult:
    """Judge the candidate's offline evaluation: absolute thresholds, and against the
    champion's evaluation on the same data. FAILED when any check fails (reasons: the failing
    checks first, then those that passed and those skipped); ERROR when one cannot be made."""
    if champion is not None:
        if candidate.data_fingerprint != champion.data_fingerprint:
            return GateResult(Verdict.ERROR, (
                "evaluated on different data; cannot compare "
                f"(candidate {candidate.data_fingerprint[:12]}, "
                f"champion {champion.data_fingerprint[:12]})",))
        changed = _signature_change(candidate, champion)
        if changed:
            # Unversioned requests are shaped for the champion's signature: every one routed
            # to this candidate would be answered 400, which live analysis does not count.
            return GateResult(Verdict.FAILED, (f"signature differs from the champion's: {changed}",))
    try:
        checks = _primary_checks(candidate, champion, policy)
        for condition in policy.conditions:
            checks += _condition_checks(candidate, champion, condition)
    except _CannotJudge as e:
        return GateResult(Verdict.ERROR, (str(e),))
    failed = [c.reason for c in checks if c.ok is False]
    passed = [c.reason for c in checks if c.ok is True]
    skipped = [c.reason for c in checks if c.ok is None]
    return GateResult(Verdict.FAILED if failed else Verdict.SUCCESSFUL,
                      tuple(failed + passed + skipped))


def _primary_checks(candidate: _HasEvaluation, champion: _HasEvaluation | None,
                    policy: GatePolicy) -> list[_Check]:
    """The threshold and "no worse than the champion by more than ``tolerance``"."""
    metric = policy.metric or candidate.primary_metric
    if champion is not None and policy.metric is None \
            and champion.primary_metric != candidate.primary_metric:
        raise _CannotJudge(
            f"candidate and champion declare different primary metrics: candidate "
            f"{_declared(candidate, candidate.primary_metric)}, champion "
            f"{_declared(champion, champion.primary_metric)}; cannot compare")
    direction = _direction(candidate, metric)
    cand = _value(candidate, metric, "candidate")
    checks = []
    threshold, source = _threshold(candidate, metric, policy)
    if threshold is not None:
        checks.append(_compare(metric, direction, cand, threshold, source))
    if champion is None:
        if threshold is None:
            raise _CannotJudge(
                f"a first version needs an absolute threshold on {metric} (--gate-threshold, "
                "gateThreshold, or one the task declares): no champion to compare with")
        return checks
    champ = _champion_value(candidate, champion, metric, direction)
    sign = "-" if direction == "higher" else "+"
    limit = champ - policy.tolerance if direction == "higher" else champ + policy.tolerance
    checks.append(_compare(metric, direction, cand, limit,
                           f"champion {champ:g} {sign} {policy.tolerance:g} = {limit:g}"))
    return checks


def _condition_checks(candidate: _HasEvaluation, champion: _HasEvaluation | None,
                      c: MetricThreshold) -> list[_Check]:
    """One ``MetricThreshold``: each limit it sets, in the direction the task declared."""
    direction = _direction(candidate, c.metric)
    cand = _value(candidate, c.metric, "candidate")
    checks = []
    if c.threshold is not None:
        checks.append(_compare(c.metric, direction, cand, c.threshold,
                               f"the condition's threshold {c.threshold:g}"))
    relative = {"min_absolute_change": c.min_absolute_change,
                "min_relative_change": c.min_relative_change, "tolerance": c.tolerance}
    wanted = {k: v for k, v in relative.items() if v is not None}
    if not wanted:
        return checks
    if champion is None:
        return checks + [_Check(None, f"condition {c.metric} {k} {v:g} skipped: no champion "
                                      "(a first version is judged by absolute thresholds only)")
                         for k, v in wanted.items()]
    champ = _champion_value(candidate, champion, c.metric, direction)
    better = 1.0 if direction == "higher" else -1.0  # the sign of an improvement
    for key, v in wanted.items():
        if key == "tolerance":
            margin, what = -v, f"{'-' if better > 0 else '+'} tolerance {v:g}"
        elif key == "min_absolute_change":
            margin, what = v, f"{'+' if better > 0 else '-'} min absolute change {v:g}"
        else:
            margin = v * abs(champ)
            what = f"{'+' if better > 0 else '-'} min relative change {v:g} x |{champ:g}|"
        limit = champ + better * margin
        checks.append(_compare(c.metric, direction, cand, limit,
                               f"champion {champ:g} {what} = {limit:g}"))
    return checks


def _compare(metric: str, direction: str, cand: float, limit: float, what: str) -> _Check:
    if direction == "higher":
        ok = cand >= limit - _EPS
        op = ">=" if ok else "<"
    else:
        ok = cand <= limit + _EPS
        op = "<=" if ok else ">"
    return _Check(ok, f"candidate {metric} {cand:g} {op} {what} ({direction} is better)")


def _threshold(candidate: _HasEvaluation, metric: str,
               policy: GatePolicy) -> tuple[float | None, str]:
    """The primary metric's absolute limit, and how a reason names it."""
    if policy.threshold is not None:
        return policy.threshold, f"the policy's threshold {policy.threshold:g}"
    declared = candidate.threshold(metric)
    if declared is not None:
        return declared, f"the task's threshold {declared:g}"
    if not candidate.evaluation and metric in _LEGACY_THRESHOLDS:
        t = _LEGACY_THRESHOLDS[metric]
        return t, f"the default threshold {t:g} for {metric}"
    return None, ""


def _direction(candidate: _HasEvaluation, metric: str) -> str:
    direction = candidate.direction(metric)
    if direction not in ("higher", "lower"):
        raise _CannotJudge(f"metric {metric} has no direction: the candidate's task declares "
                           "none, and the gate does not guess which way is better")
    return direction


def _champion_value(candidate: _HasEvaluation, champion: _HasEvaluation, metric: str,
                    direction: str) -> float:
    """The champion's value of ``metric``, if the champion judges it the same way."""
    theirs = champion.direction(metric)
    if theirs != direction:
        raise _CannotJudge(
            f"candidate and champion judge {metric} differently: candidate "
            f"{_declared(candidate, metric)}, champion {_declared(champion, metric)}; "
            "cannot compare")
    return _value(champion, metric, "champion")


def _declared(m: _HasEvaluation, metric: str) -> str:
    direction = m.direction(metric)
    return f"{metric} ({direction} is better)" if direction else f"{metric} (no direction declared)"


def _value(m: _HasEvaluation, metric: str, side: str) -> float:
    v = m.metrics.get(metric)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise _CannotJudge(f"{side} has no numeric {metric!r} metric")
    return float(v)


def _signature_change(candidate: object, champion: object) -> str:
    """What differs between the two signatures ("" when equal or when either has none)."""
    def fmt(tensors: Any) -> str:
        return ", ".join(f"{t.name} {t.datatype} {list(t.shape)}" for t in tensors)

    diffs = []
    for side in ("inputs", "outputs"):
        a, b = getattr(candidate, side, None), getattr(champion, side, None)
        if a is not None and b is not None and tuple(a) != tuple(b):
            diffs.append(f"{side} [{fmt(a)}] vs [{fmt(b)}]")
    return "; ".join(diffs)


# ---- live analysis -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class VersionStats:
    """One version's window, summarised: what a verdict's reason quotes."""

    requests: float
    server_errors: float
    error_rate: float | None
    p99_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VersionStats:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def stats(d: VersionDelta) -> VersionStats:
    return VersionStats(d.requests, d.server_errors, d.error_rate, quantile(0.99, d.buckets))


@dataclasses.dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    reasons: tuple[str, ...]
    candidate: VersionStats | None = None
    champion: VersionStats | None = None
    counter_reset: bool = False  # the window is lost: start a new one

    @property
    def message(self) -> str:
        return "; ".join(self.reasons)


def analyse(
    candidate_now: VersionSample | None,
    candidate_base: VersionSample | None,
    champion_now: VersionSample | None,
    champion_base: VersionSample | None,
    policy: AnalysisPolicy,
    elapsed_s: float,
    reference: VersionStats | None = None,
) -> Analysis:
    """The verdict on the window ``base..now`` of a step that began ``elapsed_s`` ago.

    ``champion_*`` are ``None`` when there is no champion (a model's first version).
    ``reference`` is the champion's last well-measured window: at the 100% step the champion
    serves nothing, so the candidate is compared with what the champion did before.
    """
    if candidate_now is None or candidate_base is None:
        return Analysis(Verdict.ERROR, ("candidate metrics are missing",))
    has_champion = champion_now is not None or champion_base is not None
    if has_champion and (champion_now is None or champion_base is None):
        return Analysis(Verdict.ERROR, ("champion metrics are missing",))
    try:
        cand = stats(delta(candidate_now, candidate_base))
        champ = None
        if champion_now is not None and champion_base is not None:
            champ = stats(delta(champion_now, champion_base))
    except CounterReset as e:
        return Analysis(Verdict.ERROR, (str(e),), counter_reset=True)
    if cand.requests < policy.min_requests or elapsed_s < policy.min_duration_s:
        return Analysis(
            Verdict.INCONCLUSIVE,
            (
                (
                    f"candidate served {cand.requests:g}/{policy.min_requests} requests "
                    f"in {elapsed_s:.0f}/{policy.min_duration_s:g} s"
                ),
            ),
            cand,
            champ,
        )
    if cand.p99_s is None:
        return Analysis(
            Verdict.ERROR, ("candidate served requests but has no latency histogram",), cand, champ
        )
    ref = champ if champ is not None and champ.requests >= policy.min_requests else reference
    failures, notes = _judge(cand, ref, policy)
    verdict = Verdict.FAILED if failures else Verdict.SUCCESSFUL
    return Analysis(verdict, tuple(failures or notes), cand, champ)


def _judge(
    cand: VersionStats, ref: VersionStats | None, policy: AnalysisPolicy
) -> tuple[list[str], list[str]]:
    """(failures, notes): every failing check with its value and limit, else what passed."""
    failures: list[str] = []
    notes: list[str] = []
    rate = cand.error_rate or 0.0
    ref_rate = ref.error_rate if ref is not None and ref.error_rate is not None else None
    if ref_rate is None:
        limit = policy.max_error_rate
        source = "absolute limit (no champion traffic to compare)"
    else:
        limit = max(
            ref_rate * policy.max_error_ratio,
            ref_rate + policy.error_rate_slack,
            policy.max_error_rate,
        )
        source = f"champion {ref_rate:.4f}"
    line = f"error rate {rate:.4f} vs limit {limit:.4f} ({source})"
    (failures if rate > limit else notes).append(line)
    if ref is not None and ref.p99_s is not None and cand.p99_s is not None:
        p99_limit = ref.p99_s * policy.max_p99_ratio + policy.p99_slack_ms / 1000.0
        line = (
            f"p99 {cand.p99_s * 1000:.1f} ms vs limit {p99_limit * 1000:.1f} ms "
            f"(champion {ref.p99_s * 1000:.1f} ms)"
        )
        (failures if cand.p99_s > p99_limit else notes).append(line)
    else:
        notes.append("p99 not compared: no champion latency to compare with")
    return failures, notes
