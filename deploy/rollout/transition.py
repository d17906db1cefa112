"""The rollout after a decision was applied (or failed to apply): the pure ``transition``."""

from __future__ import annotations

import dataclasses

from deploy.rollout.analysis import Analysis, GateResult, Verdict, VersionStats
from deploy.rollout.decide import Decision
from deploy.rollout.samples import VersionSample
from deploy.rollout.state import WRITE_FAILED, Action, Event, EventKind, Phase, Rollout
from deploy.rollout.world import World
from kloop.model_version import Version


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
            return _log(r, now, d.action, message, verdict)
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
    return _log(r, now, d.action, d.reason, d.verdict)


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
    return _log(r, now, WRITE_FAILED, f"{d.action.value} failed: {error}", Verdict.ERROR)


def _baseline(r: Rollout, world: World, now: float) -> dict[Version, VersionSample]:
    """Counters at the start of a window. A version with no series has served nothing yet
    (e.g. the candidate before its first step): its baseline is a measured zero."""
    samples = world.samples or {}
    versions = [v for v in (r.candidate, r.champion) if v is not None]
    return {v: samples.get(v, VersionSample.zero(now)) for v in versions}


def _reference(r: Rollout, a: Analysis | None) -> VersionStats | None:
    """Remember the champion's latest well-measured window for the step where it idles."""
    if a is not None and a.champion is not None and a.champion.requests >= r.policy.analysis.min_requests:
        return a.champion
    return r.champion_reference


def _log(r: Rollout, now: float, kind: EventKind, message: str,
         verdict: Verdict | None) -> Rollout:
    event = Event(at=now, kind=kind, message=message, verdict=verdict, weights=dict(r.weights))
    last = r.history[-1] if r.history else None
    if kind is Action.WAIT and last is not None and last.kind is kind and last.verdict is verdict:
        event = dataclasses.replace(event, count=last.count + 1)
        return dataclasses.replace(r, history=r.history[:-1] + (event,))
    return dataclasses.replace(r, history=r.history + (event,))
