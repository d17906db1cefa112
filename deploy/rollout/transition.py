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
    return _streak(r, _transition(r, d, world, applied, now), now)


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
                            errors=0, errors_since=None, updated=now)
    return _log(r, now, Action.ABORT, reason, None)


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
    if (kind in (Action.WAIT, Action.PREPARE) and last is not None and last.kind is kind
            and last.verdict is verdict):
        event = dataclasses.replace(event, count=last.count + 1)
        return dataclasses.replace(r, history=r.history[:-1] + (event,))
    return dataclasses.replace(r, history=r.history + (event,))
