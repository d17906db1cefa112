"""Judgement: the evaluation gate (offline) and live analysis (online). Pure functions only.

Both answer with a ``Verdict``:

* ``successful`` -- the evidence says the candidate is good enough;
* ``failed`` -- the evidence says the candidate is worse than allowed (with which metric,
  the value and the limit);
* ``inconclusive`` -- not enough evidence yet (too few requests, too little time): wait;
* ``error`` -- the evidence could not be gathered (metrics missing or unreachable, counters
  reset, manifests without the metric, evaluated on different data).

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

from deploy.rollout.policy import AnalysisPolicy, GatePolicy
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


@dataclasses.dataclass(frozen=True)
class GateResult:
    verdict: Verdict
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"verdict": self.verdict.value, "reasons": list(self.reasons)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GateResult:
        return cls(Verdict(d["verdict"]), tuple(d["reasons"]))


def gate(
    candidate: _HasEvaluation, champion: _HasEvaluation | None, policy: GatePolicy
) -> GateResult:
    """Compare the candidate's offline evaluation with the champion's, on the same data."""
    cand = _metric(candidate, policy.metric)
    if cand is None:
        return GateResult(Verdict.ERROR, (f"candidate has no numeric {policy.metric!r} metric",))
    reasons: list[str] = []
    failed = False
    if policy.min_accuracy is not None:
        ok = cand >= policy.min_accuracy
        failed |= not ok
        reasons.append(
            f"candidate {policy.metric} {cand:.4f} {'>=' if ok else '<'} "
            f"minimum {policy.min_accuracy:.4f}"
        )
    if champion is not None:
        if candidate.data_fingerprint != champion.data_fingerprint:
            return GateResult(
                Verdict.ERROR,
                (
                    (
                        "evaluated on different data; cannot compare "
                        f"(candidate {candidate.data_fingerprint[:12]}, "
                        f"champion {champion.data_fingerprint[:12]})"
                    ),
                ),
            )
        changed = _signature_change(candidate, champion)
        if changed:
            # Unversioned requests are shaped for the champion's signature: every one routed
            # to this candidate would be answered 400, which live analysis does not count.
            return GateResult(Verdict.FAILED, (f"signature differs from the champion's: {changed}",))
        champ = _metric(champion, policy.metric)
        if champ is None:
            return GateResult(Verdict.ERROR, (f"champion has no numeric {policy.metric!r} metric",))
        limit = champ - policy.max_accuracy_drop
        ok = cand >= limit - 1e-12  # float noise must not fail an exactly-at-limit candidate
        failed |= not ok
        reasons.append(
            f"candidate {policy.metric} {cand:.4f} {'>=' if ok else '<'} champion {champ:.4f} "
            f"- {policy.max_accuracy_drop:.4f} = {limit:.4f}"
        )
    if not reasons:
        return GateResult(Verdict.ERROR, ("a first version needs an absolute floor (min_accuracy): "
                                          "no champion to compare with",))
    return GateResult(Verdict.FAILED if failed else Verdict.SUCCESSFUL, tuple(reasons))


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


def _metric(m: _HasEvaluation, name: str) -> float | None:
    v = m.metrics.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        return None
    return float(v)


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
