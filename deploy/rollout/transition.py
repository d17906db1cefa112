"""The rollout after a decision was applied (or failed to apply): the pure ``transition``; and
after a user's request: ``request_abort``, ``request_promote``, ``request_pause``,
``request_resume``.

A request only records the user's wish (a phase, or a flag the next ``decide`` reads) and an
event in the history; the controller's next tick performs it, with the same reads and writes
as every other decision. Each raises ``ValueError`` where it makes no sense (the message says
why) and returns the rollout unchanged (``is``) where it is already in force, so a retried
request is harmless.
"""

from __future__ import annotations

import dataclasses

from deploy.rollout.analysis import Analysis, GateResult, Verdict, VersionStats
from deploy.rollout.decide import Decision
from deploy.rollout.samples import VersionSample
from deploy.rollout.state import (
    WRITE_FAILED,
    Action,
    Event,
    EventKind,
    Phase,
    Rollout,
    UserRequest,
)
from deploy.rollout.world import World
from kloop.model_version import Version


@dataclasses.dataclass(frozen=True)
class Applied:
    """What applying a decision did: ``error`` when a write failed; ``gate`` for RUN_GATE.

    ``refused``: the server answered the write with a refusal that a retry cannot change (a
    version whose files fail verification, management disabled); ``blame`` says whether the
    candidate's own files are the cause (then the rollout rolls back, else it aborts).
    """

    error: str | None = None
    gate: GateResult | None = None
    refused: bool = False
    blame: bool = False


def transition(r: Rollout, d: Decision, world: World, applied: Applied, now: float) -> Rollout:
    """The rollout after ``d`` was applied (or failed to apply) at ``now``. Pure."""
    if d.action is Action.NOTHING:
        return r
    return _streak(r, _unpaused_once_decided(_transition(r, d, world, applied, now)), now)


def request_abort(r: Rollout, reason: str, now: float) -> Rollout:
    """A user's abort (``kloop rollout abort``): the decision is recorded as RollingBack with
    outcome Aborted; the next tick restores the champion. Raises ``ValueError`` where there is
    nothing to abort (a terminal rollout, or one whose promotion already moved the alias)."""
    if r.phase.terminal:
        raise ValueError(f"rollout {r.id} already ended: {r.phase.value} {r.reason}".rstrip())
    if r.phase is Phase.PROMOTING and r.promoted_at is not None:
        raise ValueError(f"rollout {r.id} already promoted v{r.candidate} (the champion alias "
                         f"moved); it is only waiting to retire v{r.champion}")
    if r.phase is Phase.ROLLING_BACK:
        return r
    r = dataclasses.replace(r, phase=Phase.ROLLING_BACK, outcome=Phase.ABORTED, reason=reason,
                            errors=0, errors_since=None, paused=False, updated=now)
    return _log(r, now, Action.ABORT, reason, None)


_PAUSABLE = (Phase.PENDING, Phase.GATING, Phase.PROGRESSING)
_GATE_PASSED = (Verdict.SUCCESSFUL, Verdict.INCONCLUSIVE)


def request_promote(r: Rollout, reason: str, now: float) -> Rollout:
    """A user's "promote" (``kubectl argo rollouts promote --full``): skip the remaining
    steps. The next tick promotes once the candidate is ready: from Progressing at once, from
    Gating when the backend reports it loaded (no traffic step at all). Lifts a pause. Allowed
    in Progressing, and in Gating once the gate passed (successful or inconclusive); the live
    analysis of the current step is not waited for. Raises ``ValueError`` elsewhere."""
    if r.phase is Phase.PENDING or (r.phase is Phase.GATING and r.gate is None):
        raise ValueError(f"rollout {r.id} cannot be promoted: the gate has not passed yet")
    if r.phase is Phase.GATING and r.gate is not None and r.gate.verdict not in _GATE_PASSED:
        raise ValueError(f"rollout {r.id} cannot be promoted: the gate has not passed yet "
                         f"(it was {r.gate.verdict.value}: {'; '.join(r.gate.reasons)})")
    _refuse_unless_running(r, "promoted")
    if r.promote_requested:
        return r
    r = dataclasses.replace(r, promote_requested=True, paused=False, updated=now)
    return _log(r, now, UserRequest.PROMOTE,
                _said(f"promote v{r.candidate} {_where(r)}, skipping the remaining steps",
                      reason), None)


def request_pause(r: Rollout, reason: str, now: float) -> Rollout:
    """A user's pause: the rollout stays where it is (no first traffic step, no next step, no
    promotion; no step or readiness deadline runs out) until ``request_resume``. The gate,
    loading the candidate and the live analysis go on: a failed analysis still counts toward
    ``failure_limit`` and rolls back, and "could not measure" still aborts at the outage bound.
    Allowed in Pending, Gating and Progressing, unless a promotion was requested (abort
    instead); a no-op on a paused rollout."""
    _refuse_unless_running(r, "paused")
    if r.paused:
        return r
    if r.promote_requested:
        raise ValueError(f"rollout {r.id} cannot be paused: promoting v{r.candidate} was "
                         "already requested; abort it instead")
    r = dataclasses.replace(r, paused=True, updated=now)
    return _log(r, now, UserRequest.PAUSE, _said(f"paused {_where(r)}", reason), None)


def request_resume(r: Rollout, reason: str, now: float) -> Rollout:
    """Lift a pause. The step's (and the readiness) timer restarts at ``now``: the paused time
    does not count toward ``step_timeout_s``. A no-op on a rollout that is not paused;
    ``ValueError`` on one that ended, is rolling back or is promoting."""
    _refuse_unless_running(r, "resumed")
    if not r.paused:
        return r
    r = dataclasses.replace(
        r, paused=False, updated=now,
        step_started_at=None if r.step_started_at is None else now,
        preparing_since=None if r.preparing_since is None else now,
    )
    return _log(r, now, UserRequest.RESUME, _said(f"resumed {_where(r)}", reason), None)


def _refuse_unless_running(r: Rollout, what: str) -> None:
    """``ValueError`` unless ``r`` is Pending, Gating or Progressing."""
    if r.phase.terminal:
        raise ValueError(f"rollout {r.id} cannot be {what}: it already ended: "
                         f"{r.phase.value} {r.reason}".rstrip())
    if r.phase is Phase.ROLLING_BACK:
        raise ValueError(f"rollout {r.id} cannot be {what}: it is rolling back: {r.reason}")
    if r.phase is Phase.PROMOTING:
        raise ValueError(f"rollout {r.id} cannot be {what}: it is already promoting "
                         f"v{r.candidate}")


def _where(r: Rollout) -> str:
    if r.phase is Phase.PROGRESSING and 0 <= r.step < len(r.steps):
        return f"at step {r.step + 1}/{len(r.steps)} ({r.steps[r.step]}%)"
    return "before the gate" if r.phase is Phase.PENDING else "before the first step"


def _said(what: str, reason: str) -> str:
    return f"{what}: {reason}" if reason else what


def _unpaused_once_decided(r: Rollout) -> Rollout:
    """A pause holds a running rollout; one that rolls back or ends is no longer paused."""
    if r.paused and r.phase not in _PAUSABLE:
        return dataclasses.replace(r, paused=False)
    return r


def _streak(before: Rollout, after: Rollout, now: float) -> Rollout:
    """Keep ``errors_since`` with ``errors``: set when a streak starts, cleared when it ends."""
    if after.errors == 0:
        since = None
    elif before.errors == 0 or after.errors_since is None:
        since = now
    else:
        since = after.errors_since
    return after if since == after.errors_since else dataclasses.replace(after, errors_since=since)


def _transition(r: Rollout, d: Decision, world: World, applied: Applied, now: float) -> Rollout:
    if applied.error is not None:
        if applied.refused:
            return _refused(r, d, applied, now)
        return _write_failed(r, d, applied.error, now)
    r = dataclasses.replace(r, updated=now)
    match d.action:
        case Action.RUN_GATE:
            passed = applied.gate is not None and applied.gate.verdict in (
                Verdict.SUCCESSFUL, Verdict.INCONCLUSIVE)
            r = dataclasses.replace(r, phase=Phase.GATING, gate=applied.gate, errors=0,
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
        case Action.PREPARE:  # the readiness deadline runs from the first one
            since = r.preparing_since if r.preparing_since is not None else now
            r = dataclasses.replace(r, preparing_since=since, errors=0)
        case Action.WAIT:
            r = _waited(r, d, world, now)
        case Action.PROMOTE:
            r = dataclasses.replace(r, phase=Phase.PROMOTING, promoted_at=now, errors=0,
                                    weights={r.candidate: 100}, reason=d.reason)
        case Action.RETIRE:
            r = dataclasses.replace(r, phase=Phase.SUCCEEDED, reason=d.reason)
        case Action.GIVE_UP if r.phase is Phase.ROLLING_BACK:
            r = dataclasses.replace(r, phase=Phase.NEEDS_ATTENTION, reason=d.reason)
        case Action.GIVE_UP:  # promoted; the old champion could not be retired
            r = dataclasses.replace(r, phase=Phase.SUCCEEDED, reason=d.reason)
        case Action.ROLLBACK | Action.ABORT if r.phase is not Phase.ROLLING_BACK:
            # Two phases: the decision is saved before anything is written, so a controller
            # that dies after the writes finds "RollingBack" and finishes it -- it never
            # mistakes the restored champion weights for drift and re-routes to the candidate.
            outcome = Phase.ABORTED if d.action is Action.ABORT else Phase.ROLLED_BACK
            r = dataclasses.replace(
                r, phase=Phase.ROLLING_BACK, outcome=outcome, reason=d.reason, errors=0,
                failed=r.failed + (d.verdict is Verdict.FAILED and r.phase is Phase.PROGRESSING),
            )
        case Action.ROLLBACK | Action.ABORT:
            weights = restored_weights(r, world)
            r = dataclasses.replace(r, phase=r.outcome or Phase.ROLLED_BACK, weights=weights,
                                    errors=0)
            split = ", ".join(f"v{v} {w}%" for v, w in sorted(weights.items())) or "nothing"
            return _log(r, now, d.action, f"traffic restored ({split}): {r.reason}", d.verdict)
    return _log(r, now, d.action, d.reason, d.verdict)


def restored_weights(r: Rollout, world: World) -> dict[Version, int]:
    """What serves once a rollback's writes are done: the champion at 100 %; without one the
    candidate stays where it carries traffic (it is all the model has: a rollback never takes
    a serving model offline), else nothing of this model serves."""
    if r.champion is not None:
        return {r.champion: 100}
    return {r.candidate: 100} if world.weights.get(r.candidate, 0) > 0 else {}


def _refused(r: Rollout, d: Decision, applied: Applied, now: float) -> Rollout:
    """The server refused a write in a way a retry cannot change: end the phase now."""
    error = applied.error or "refused"
    r = dataclasses.replace(r, updated=now, errors=0)
    if r.phase is Phase.ROLLING_BACK:
        r = dataclasses.replace(r, phase=Phase.NEEDS_ATTENTION,
                                reason=f"could not restore the champion: {error}")
    elif r.phase is Phase.PROMOTING and r.promoted_at is not None:
        r = dataclasses.replace(r, phase=Phase.SUCCEEDED,
                                reason=f"promoted v{r.candidate}; v{r.champion} stays loaded: "
                                       f"retiring it was refused: {error}")
    else:
        outcome = Phase.ROLLED_BACK if applied.blame else Phase.ABORTED
        if d.action is Action.PROMOTE:
            what = f"v{r.candidate} not promoted"
        elif applied.blame:
            what = f"v{r.candidate} cannot be loaded"
        else:
            what = f"{d.action.value} refused"
        r = dataclasses.replace(r, phase=Phase.ROLLING_BACK, outcome=outcome,
                                reason=f"{what}: {error}")
    return _log(r, now, WRITE_FAILED, f"{d.action.value} refused: {error}", Verdict.ERROR)


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
    if last is not None and (_repeated(kind, verdict, last) or _held(r, kind, verdict, last)):
        event = dataclasses.replace(event, count=last.count + 1)
        return dataclasses.replace(r, history=r.history[:-1] + (event,))
    return dataclasses.replace(r, history=r.history + (event,))


def _repeated(kind: EventKind, verdict: Verdict | None, last: Event) -> bool:
    return kind in (Action.WAIT, Action.PREPARE) and last.kind is kind and last.verdict is verdict


_HOLDING = (Verdict.SUCCESSFUL, Verdict.INCONCLUSIVE)


def _held(r: Rollout, kind: EventKind, verdict: Verdict | None, last: Event) -> bool:
    """A paused rollout's waits alternate between a passed window and the fresh one it opens;
    they are one event (the latest, with a count), so a long pause does not grow the history
    (a custom resource's status has a size limit). A failure or an error still stands out."""
    return (r.paused and kind is Action.WAIT and last.kind is Action.WAIT
            and verdict in _HOLDING and last.verdict in _HOLDING)
