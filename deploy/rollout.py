"""The rollout as data, and the pure functions that move it: ``decide`` and ``transition``.

A rollout is a persisted state machine (see ``Phase``)::

    Pending --run gate--> Gating --gate ok, candidate ready--> Progressing (step 0 .. n-1)
        --last step ok--> Promoting --old champion retired--> Succeeded
    Gating --gate failed--> RolledBack            (before any traffic)
    Gating --candidate FailedToLoad | not ready after ready_timeout_s--> RolledBack
    Gating --gate error--> Aborted                (e.g. evaluated on different data)
    Progressing --failed checks reach failure_limit--> RollingBack --> RolledBack
    Progressing --errors reach error_limit | step timeout--> RollingBack --> Aborted

Readiness: a candidate that passed the gate is loaded at once (the gate's write, or PREPARE),
but it takes traffic only once the backend reports it READY (``World.loaded``); locally that
is the next tick, on KServe whenever the InferenceService says so. Until then the rollout
WAITs in Gating, and gives up (blaming the candidate) when the backend reports it failed or
``ready_timeout_s`` passes.

``RollingBack`` is where a decided rollback/abort waits while its write has not succeeded;
``RolledBack`` blames the candidate, ``Aborted`` does not (the controller could not measure).

One tick is: the controller reads the world, ``decide`` picks ONE ``Decision`` from the
rollout and the world (pure), the controller applies it with idempotent writes, and
``transition`` computes the new rollout from the decision and whether the write succeeded
(pure). Nothing here does I/O or reads a clock: ``now`` is passed in.
"""

from __future__ import annotations

import dataclasses
import enum
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from deploy.analysis import (
    Analysis,
    AnalysisPolicy,
    GatePolicy,
    GateResult,
    Verdict,
    VersionStats,
    analyse,
)
from deploy.backends import World, normalized
from deploy.metrics import VersionSample


class Phase(enum.Enum):
    PENDING = "Pending"
    GATING = "Gating"
    PROGRESSING = "Progressing"
    PROMOTING = "Promoting"
    SUCCEEDED = "Succeeded"
    ROLLING_BACK = "RollingBack"
    ROLLED_BACK = "RolledBack"
    ABORTED = "Aborted"

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.ABORTED)


@dataclasses.dataclass(frozen=True)
class RolloutPolicy:
    """How a candidate earns traffic. Rejected at construction when the combination is unsafe.

    Traffic:
      steps: candidate's traffic percent per step, strictly increasing, ending at 100 (the
        last step's analysis is what promotes; a model's first version skips to 100).
      step_timeout_s: seconds a step may stay without a conclusive analysis before the rollout
        is aborted (not blamed: it is "could not measure"); bounds a rollout nobody sends
        traffic to.
    Analysis window (per step):
      min_requests: candidate requests needed before judging; ~100 makes one error 1%.
      min_duration_s: seconds a step runs before judging, so a burst is not the whole story.
    Error rate (server errors, 5xx, over requests):
      max_error_rate: absolute rate always accepted (0.01 = 1%); the only limit without a
        champion to compare with.
      max_error_ratio / error_rate_slack: otherwise accepted up to
        max(champion * ratio, champion + slack), so a champion at 0 errors does not make a
        single candidate error a failure.
    Latency:
      max_p99_ratio / p99_slack_ms: candidate p99 <= champion p99 * ratio + slack (ms); the
        slack keeps sub-millisecond noise from failing a step.
    Limits (Flagger's threshold semantics):
      failure_limit: failed analyses (counted over the whole rollout) that roll back; at 2, one
        bad window opens a fresh window and a second one rolls back.
      error_limit: consecutive "could not measure" verdicts before the rollout aborts.
    Gate (offline, before any traffic):
      max_accuracy_drop, min_accuracy: see ``deploy.analysis.GatePolicy``.
    Readiness (before the first step):
      ready_timeout_s: seconds the candidate may take to become ready after the gate passed
        (pull an image, download the model, start a pod); 600 covers a cold node pulling a
        multi-GB image. Then it is rolled back and cleaned up.
    After promotion:
      retire_after_s: seconds the old champion stays loaded at weight 0, so a rollback soon
        after promotion needs no model load; then it is unloaded.
    """

    steps: tuple[int, ...] = (10, 50, 100)
    min_requests: int = 100
    min_duration_s: float = 60.0
    step_timeout_s: float = 900.0
    max_error_rate: float = 0.01
    max_error_ratio: float = 1.5
    error_rate_slack: float = 0.005
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 5.0
    failure_limit: int = 2
    error_limit: int = 5
    max_accuracy_drop: float = 0.01
    min_accuracy: float | None = None
    retire_after_s: float = 60.0
    ready_timeout_s: float = 600.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        s = self.steps
        if not s or s[-1] != 100:
            raise ValueError(f"steps {s} must end at 100: the last step's analysis promotes")
        if s[0] <= 0 or any(b <= a for a, b in itertools.pairwise(s)):
            raise ValueError(f"steps {s} must be strictly increasing percents in 1..100")
        for name in ("min_requests", "min_duration_s", "max_error_rate", "error_rate_slack",
                     "p99_slack_ms", "retire_after_s", "ready_timeout_s"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if not self.ready_timeout_s > 0:
            raise ValueError(f"ready_timeout_s must be > 0, got {self.ready_timeout_s}")
        if self.max_error_rate > 1:
            raise ValueError(f"max_error_rate {self.max_error_rate} is a fraction in [0, 1]")
        for name in ("max_error_ratio", "max_p99_ratio"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1 (below 1 demands the candidate be better)")
        for name in ("failure_limit", "error_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.step_timeout_s > self.min_duration_s:
            raise ValueError(
                f"step_timeout_s {self.step_timeout_s} must exceed min_duration_s "
                f"{self.min_duration_s}, or every step times out before it can be judged"
            )
        GatePolicy(self.max_accuracy_drop, self.min_accuracy)  # validates the gate fields

    @property
    def analysis(self) -> AnalysisPolicy:
        return AnalysisPolicy(
            min_requests=self.min_requests, min_duration_s=self.min_duration_s,
            max_error_rate=self.max_error_rate, max_error_ratio=self.max_error_ratio,
            error_rate_slack=self.error_rate_slack, max_p99_ratio=self.max_p99_ratio,
            p99_slack_ms=self.p99_slack_ms,
        )

    @property
    def gate(self) -> GatePolicy:
        return GatePolicy(max_accuracy_drop=self.max_accuracy_drop, min_accuracy=self.min_accuracy)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["steps"] = list(self.steps)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutPolicy:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown rollout policy fields {sorted(unknown)}")
        return cls(**{k: (tuple(v) if k == "steps" else v) for k, v in d.items()})


def next_weight(steps: Sequence[int], current: int) -> int | None:
    """The candidate's next traffic percent after ``current``; ``None`` when at the last step.

    ``current`` need not be a step (traffic set by hand): the next step is the first above it.
    """
    for s in steps:
        if s > current:
            return s
    return None


@dataclasses.dataclass(frozen=True)
class Event:
    at: float
    kind: str  # the Action's value, or "error" when its write failed
    message: str
    verdict: str | None = None
    weights: Mapping[str, int] = dataclasses.field(default_factory=dict)
    count: int = 1  # repeated waits with the same verdict are coalesced into one event

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "weights": dict(self.weights)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        return cls(**{**d, "weights": dict(d.get("weights", {}))})


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Spec (id .. created) and status (the rest). ``generation`` belongs to the store: its
    optimistic-concurrency token, opaque to everyone else (SQLite: a counter; a Rollout custom
    resource: the object's resourceVersion, a string)."""

    id: str
    model: str
    candidate: str
    champion: str | None
    policy: RolloutPolicy
    created: float
    phase: Phase = Phase.PENDING
    step: int = -1  # index into the effective steps; -1 before any traffic
    weights: Mapping[str, int] = dataclasses.field(default_factory=dict)
    step_started_at: float | None = None  # step timeout runs from here
    window_started_at: float | None = None  # analysis window (min_duration_s) runs from here
    baseline: Mapping[str, VersionSample] = dataclasses.field(default_factory=dict)
    failed: int = 0  # failed analyses in this rollout
    errors: int = 0  # consecutive error verdicts / failed writes
    gate: GateResult | None = None
    champion_reference: VersionStats | None = None
    promoted_at: float | None = None
    preparing_since: float | None = None  # candidate asked to load; ready_timeout_s runs from here
    outcome: Phase | None = None  # where RollingBack ends: RolledBack or Aborted
    reason: str = ""
    updated: float = 0.0
    history: tuple[Event, ...] = ()
    generation: int | str = 0

    @property
    def steps(self) -> tuple[int, ...]:
        """Without a champion there is nobody to share traffic with: one step, 100%."""
        return self.policy.steps if self.champion is not None else (100,)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "model": self.model, "candidate": self.candidate,
            "champion": self.champion, "policy": self.policy.to_dict(), "created": self.created,
            "phase": self.phase.value, "step": self.step, "weights": dict(self.weights),
            "step_started_at": self.step_started_at, "window_started_at": self.window_started_at,
            "baseline": {v: s.to_dict() for v, s in self.baseline.items()},
            "failed": self.failed, "errors": self.errors,
            "gate": self.gate.to_dict() if self.gate else None,
            "champion_reference": (
                self.champion_reference.to_dict() if self.champion_reference else None
            ),
            "promoted_at": self.promoted_at, "preparing_since": self.preparing_since,
            "outcome": self.outcome.value if self.outcome else None,
            "reason": self.reason, "updated": self.updated,
            "history": [e.to_dict() for e in self.history],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], generation: int | str = 0) -> Rollout:
        return cls(
            id=d["id"], model=d["model"], candidate=d["candidate"], champion=d["champion"],
            policy=RolloutPolicy.from_dict(d["policy"]), created=d["created"],
            phase=Phase(d["phase"]), step=d["step"], weights=dict(d["weights"]),
            step_started_at=d["step_started_at"], window_started_at=d["window_started_at"],
            baseline={v: VersionSample.from_dict(s) for v, s in d["baseline"].items()},
            failed=d["failed"], errors=d["errors"],
            gate=GateResult.from_dict(d["gate"]) if d["gate"] else None,
            champion_reference=(
                VersionStats.from_dict(d["champion_reference"]) if d["champion_reference"] else None
            ),
            promoted_at=d["promoted_at"], preparing_since=d.get("preparing_since"),
            outcome=Phase(d["outcome"]) if d["outcome"] else None,
            reason=d["reason"], updated=d["updated"],
            history=tuple(Event.from_dict(e) for e in d["history"]),
            generation=generation,
        )


def new_rollout(
    id: str, model: str, candidate: str, champion: str | None, policy: RolloutPolicy, now: float
) -> Rollout:
    if champion == candidate:
        raise ValueError(f"candidate {candidate} is already the champion of {model}")
    return Rollout(id=id, model=model, candidate=str(candidate),
                   champion=None if champion is None else str(champion), policy=policy,
                   created=now, updated=now)


# ---- decide ---------------------------------------------------------------------------------


class Action(enum.Enum):
    RUN_GATE = "run_gate"  # evaluate the offline gate (status.gate); if it passed, load candidate
    PREPARE = "prepare"  # load the candidate (and champion) without routing anything to it
    SET_WEIGHTS = "set_weights"  # load the candidate, route ``weights``, start a window
    WAIT = "wait"  # nothing to write; maybe start a fresh analysis window
    PROMOTE = "promote"  # 100% to the candidate, champion alias moved
    RETIRE = "retire"  # unload the old champion; the rollout succeeded
    ROLLBACK = "rollback"  # 100% to the champion, candidate unloaded; candidate blamed
    ABORT = "abort"  # same writes as rollback; candidate not blamed
    NOTHING = "nothing"  # terminal phase


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    weights: Mapping[str, int] | None = None  # SET_WEIGHTS
    step: int | None = None  # SET_WEIGHTS: the step index those weights belong to
    verdict: Verdict | None = None
    analysis: Analysis | None = None
    rebaseline: bool = False  # WAIT: start a fresh analysis window from this world


def step_weights(r: Rollout, step: int) -> dict[str, int]:
    w = r.steps[step]
    out = {r.candidate: w}
    if r.champion is not None:
        out[r.champion] = 100 - w
    return out


def decide(r: Rollout, world: World, policy: RolloutPolicy, now: float) -> Decision:
    """The one thing to do next. Pure: same rollout, world and time give the same decision."""
    if r.phase.terminal:
        return Decision(Action.NOTHING, f"rollout is {r.phase.value}")
    if r.phase is Phase.PENDING:
        return Decision(Action.RUN_GATE, "compare candidate and champion offline")
    if r.phase is Phase.GATING:
        return _after_gate(r, world, policy, now)
    if r.phase is Phase.ROLLING_BACK:
        action = Action.ABORT if r.outcome is Phase.ABORTED else Action.ROLLBACK
        return Decision(action, f"restoring the champion: {r.reason}")
    if r.phase is Phase.PROMOTING:
        return _promoting(r, policy, now)
    return _progressing(r, world, policy, now)


def _after_gate(r: Rollout, world: World, policy: RolloutPolicy, now: float) -> Decision:
    """Gate result (stored by RUN_GATE) -> first traffic, rollback or abort."""
    g = r.gate
    if g is None:
        return Decision(Action.RUN_GATE, "gate result missing; running it again")
    msg = "; ".join(g.reasons)
    if g.verdict is Verdict.ERROR:
        return Decision(Action.ABORT, f"gate could not compare: {msg}", verdict=g.verdict)
    if g.verdict is Verdict.FAILED:
        return Decision(Action.ROLLBACK, f"gate failed before any traffic: {msg}", verdict=g.verdict)
    if world.error is not None or world.samples is None:
        return _could_not_measure(r, policy, now, f"cannot read the world: {world.error}")
    if r.candidate in world.loaded:
        return Decision(Action.SET_WEIGHTS, f"gate passed ({msg}); v{r.candidate} ready; "
                                            "first step",
                        weights=step_weights(r, 0), step=0, verdict=g.verdict)
    return _awaiting_ready(r, world, policy, now)


def _awaiting_ready(r: Rollout, world: World, policy: RolloutPolicy, now: float) -> Decision:
    """The gate passed but the candidate is not ready: load it, wait, or give up."""
    v = r.candidate
    if v in world.failed:
        return Decision(Action.ROLLBACK, f"candidate never became ready: v{v} failed to load: "
                                         f"{world.failed[v]}", verdict=Verdict.FAILED)
    if r.preparing_since is None:
        return Decision(Action.PREPARE, f"loading v{v} before it takes traffic")
    waited = now - r.preparing_since
    if waited >= policy.ready_timeout_s:
        return Decision(Action.ROLLBACK, f"candidate never became ready: v{v} not ready "
                                         f"{waited:g}s after it was deployed (ready_timeout_s "
                                         f"{policy.ready_timeout_s:g})", verdict=Verdict.FAILED)
    return Decision(Action.WAIT, f"waiting for v{v} to become ready "
                                 f"({waited:g}s of {policy.ready_timeout_s:g}s)")


def _promoting(r: Rollout, policy: RolloutPolicy, now: float) -> Decision:
    if r.promoted_at is None:
        return Decision(Action.PROMOTE, f"retrying promotion: {r.reason}")
    if r.champion is None or now - r.promoted_at >= policy.retire_after_s:
        return Decision(Action.RETIRE, f"promoted v{r.candidate}; retiring v{r.champion}")
    return Decision(Action.WAIT, f"keeping v{r.champion} loaded at weight 0 for a fast rollback "
                                 f"({policy.retire_after_s:g}s after promotion)")


def _progressing(r: Rollout, world: World, policy: RolloutPolicy, now: float) -> Decision:
    if r.errors >= policy.error_limit:
        return Decision(Action.ABORT, f"{r.errors} consecutive errors; last: "
                                      f"{r.history[-1].message if r.history else '?'}",
                        verdict=Verdict.ERROR)
    if world.error is not None or world.samples is None:
        return _could_not_measure(r, policy, now, f"cannot read the world: {world.error}")
    actual, expected = normalized(world.weights), normalized(r.weights)
    if actual != expected:
        return _reconcile_weights(r, actual)
    samples, base = world.samples, r.baseline
    a = analyse(
        samples.get(r.candidate), base.get(r.candidate),
        samples.get(r.champion) if r.champion is not None else None,
        base.get(r.champion) if r.champion is not None else None,
        policy.analysis, _elapsed(r.window_started_at, now), r.champion_reference,
    )
    where = f"step {r.step + 1}/{len(r.steps)} ({r.steps[r.step]}%)"
    if a.verdict is Verdict.SUCCESSFUL:
        if r.step + 1 >= len(r.steps):
            return Decision(Action.PROMOTE, f"{where} passed: {a.message}",
                            verdict=a.verdict, analysis=a)
        return Decision(Action.SET_WEIGHTS, f"{where} passed: {a.message}",
                        weights=step_weights(r, r.step + 1), step=r.step + 1,
                        verdict=a.verdict, analysis=a)
    if a.verdict is Verdict.FAILED:
        n = r.failed + 1
        if n >= policy.failure_limit:
            return Decision(Action.ROLLBACK, f"{where} failed ({n}/{policy.failure_limit}): "
                                             f"{a.message}", verdict=a.verdict, analysis=a)
        return Decision(Action.WAIT, f"{where} failed ({n}/{policy.failure_limit}), new window: "
                                     f"{a.message}", verdict=a.verdict, analysis=a, rebaseline=True)
    if a.verdict is Verdict.ERROR:
        d = _could_not_measure(r, policy, now, f"{where}: {a.message}")
        return dataclasses.replace(d, analysis=a, rebaseline=a.counter_reset)
    if _timed_out(r, policy, now):
        return Decision(Action.ABORT, f"{where} timed out after {policy.step_timeout_s:g} s "
                                      f"without a conclusive analysis: {a.message}",
                        verdict=a.verdict, analysis=a)
    return Decision(Action.WAIT, f"{where}: {a.message}", verdict=a.verdict, analysis=a)


def _could_not_measure(r: Rollout, policy: RolloutPolicy, now: float, why: str) -> Decision:
    n = r.errors + 1
    if n >= policy.error_limit:
        return Decision(Action.ABORT, f"could not measure {n} times in a row: {why}",
                        verdict=Verdict.ERROR)
    if _timed_out(r, policy, now):
        return Decision(Action.ABORT, f"step timed out; last: {why}", verdict=Verdict.ERROR)
    return Decision(Action.WAIT, f"could not measure ({n}/{policy.error_limit}): {why}",
                    verdict=Verdict.ERROR)


def _elapsed(since: float | None, now: float) -> float:
    return 0.0 if since is None else now - since


def _timed_out(r: Rollout, policy: RolloutPolicy, now: float) -> bool:
    return r.step_started_at is not None and now - r.step_started_at >= policy.step_timeout_s


def _reconcile_weights(r: Rollout, actual: Mapping[str, int]) -> Decision:
    """The world's weights differ from the status'. If they are the next step's, a previous
    tick wrote them and died before saving: adopt that step (never step twice). Anything else
    is drift (a restarted server, a manual change): restore the step's weights."""
    nxt = r.step + 1
    if nxt < len(r.steps) and actual == normalized(step_weights(r, nxt)):
        return Decision(Action.SET_WEIGHTS, f"weights {actual} already at step {nxt + 1}; adopting",
                        weights=step_weights(r, nxt), step=nxt)
    return Decision(Action.SET_WEIGHTS, f"traffic drifted to {actual}; restoring {dict(r.weights)}",
                    weights=dict(r.weights), step=r.step)


# ---- transition -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Applied:
    """What applying a decision did: ``error`` when a write failed; ``gate`` for RUN_GATE."""

    error: str | None = None
    gate: GateResult | None = None


def transition(r: Rollout, d: Decision, world: World, applied: Applied, now: float) -> Rollout:
    """The rollout after ``d`` was applied (or failed to apply) at ``now``. Pure."""
    if d.action is Action.NOTHING:
        return r
    if applied.error is not None:
        return _write_failed(r, d, applied.error, now)
    r = dataclasses.replace(r, updated=now)
    match d.action:
        case Action.RUN_GATE:
            passed = applied.gate is not None and applied.gate.verdict in (
                Verdict.SUCCESSFUL, Verdict.INCONCLUSIVE)
            r = dataclasses.replace(r, phase=Phase.GATING, gate=applied.gate,
                                    preparing_since=now if passed else r.preparing_since)
            message = "; ".join(applied.gate.reasons) if applied.gate else d.reason
            verdict = applied.gate.verdict if applied.gate else None
            return _log(r, now, d.action.value, message, verdict)
        case Action.SET_WEIGHTS:
            new_step = d.step != r.step
            r = dataclasses.replace(
                r, phase=Phase.PROGRESSING, step=d.step if d.step is not None else r.step,
                weights=dict(d.weights or {}), errors=0,
                step_started_at=now if new_step or r.step_started_at is None else r.step_started_at,
                window_started_at=now, baseline=_baseline(r, world, now),
                champion_reference=_reference(r, d.analysis),
            )
        case Action.PREPARE:
            r = dataclasses.replace(r, preparing_since=now, errors=0)
        case Action.WAIT:
            r = _waited(r, d, world, now)
        case Action.PROMOTE:
            r = dataclasses.replace(r, phase=Phase.PROMOTING, promoted_at=now, errors=0,
                                    weights={r.candidate: 100}, reason=d.reason)
        case Action.RETIRE:
            r = dataclasses.replace(r, phase=Phase.SUCCEEDED, reason=d.reason)
        case Action.ROLLBACK | Action.ABORT if r.phase is not Phase.ROLLING_BACK:
            # Two phases: the decision is saved before anything is written, so a controller
            # that dies after the writes finds "RollingBack" and finishes it -- it never
            # mistakes the restored champion weights for drift and re-routes to the candidate.
            outcome = Phase.ABORTED if d.action is Action.ABORT else Phase.ROLLED_BACK
            r = dataclasses.replace(
                r, phase=Phase.ROLLING_BACK, outcome=outcome, reason=d.reason,
                failed=r.failed + (d.verdict is Verdict.FAILED and r.phase is Phase.PROGRESSING),
            )
        case Action.ROLLBACK | Action.ABORT:
            r = dataclasses.replace(
                r, phase=r.outcome or Phase.ROLLED_BACK,
                weights={r.champion: 100} if r.champion is not None else {},
            )
    return _log(r, now, d.action.value, d.reason, d.verdict)


def _waited(r: Rollout, d: Decision, world: World, now: float) -> Rollout:
    r = dataclasses.replace(
        r,
        errors=r.errors + 1 if d.verdict is Verdict.ERROR else 0,
        failed=r.failed + (d.verdict is Verdict.FAILED),
        champion_reference=_reference(r, d.analysis),
    )
    if d.rebaseline and world.samples is not None:
        r = dataclasses.replace(r, baseline=_baseline(r, world, now), window_started_at=now)
    return r


def _write_failed(r: Rollout, d: Decision, error: str, now: float) -> Rollout:
    """A write failed: count it as "could not act". A decided rollback/abort/promotion is
    recorded anyway, so a later, luckier analysis cannot undo the decision."""
    r = dataclasses.replace(r, errors=r.errors + 1, updated=now)
    if d.action in (Action.ROLLBACK, Action.ABORT):
        outcome = Phase.ABORTED if d.action is Action.ABORT else Phase.ROLLED_BACK
        failed = r.failed + (d.verdict is Verdict.FAILED and r.phase is Phase.PROGRESSING)
        reason = r.reason if r.phase is Phase.ROLLING_BACK else d.reason
        r = dataclasses.replace(r, phase=Phase.ROLLING_BACK, outcome=outcome, failed=failed,
                                reason=reason)
    elif d.action is Action.PROMOTE:
        r = dataclasses.replace(r, phase=Phase.PROMOTING, promoted_at=None, reason=d.reason)
    return _log(r, now, "error", f"{d.action.value} failed: {error}", Verdict.ERROR.value)


def _baseline(r: Rollout, world: World, now: float) -> dict[str, VersionSample]:
    """Counters at the start of a window. A version with no series has served nothing yet
    (e.g. the candidate before its first step): its baseline is a measured zero."""
    samples = world.samples or {}
    versions = [v for v in (r.candidate, r.champion) if v is not None]
    return {v: samples.get(v, VersionSample.zero(now)) for v in versions}


def _reference(r: Rollout, a: Analysis | None) -> VersionStats | None:
    """Remember the champion's latest well-measured window for the step where it idles."""
    if a is not None and a.champion is not None and a.champion.requests >= r.policy.min_requests:
        return a.champion
    return r.champion_reference


def _log(r: Rollout, now: float, kind: str, message: str,
         verdict: Verdict | str | None) -> Rollout:
    v = verdict.value if isinstance(verdict, Verdict) else verdict
    event = Event(at=now, kind=kind, message=message, verdict=v, weights=dict(r.weights))
    last = r.history[-1] if r.history else None
    if kind == "wait" and last is not None and last.kind == kind and last.verdict == v:
        event = dataclasses.replace(event, count=last.count + 1)
        return dataclasses.replace(r, history=r.history[:-1] + (event,))
    return dataclasses.replace(r, history=r.history + (event,))
