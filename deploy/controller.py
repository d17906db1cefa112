"""The rollout controller: one repeatable ``tick`` and a loop around it.

A tick reads the world FIRST (actual weights and metrics from the backend), asks the pure
``decide`` for one decision, applies it with idempotent writes, and saves the rollout ONCE with
an optimistic-concurrency check. All state lives in the store, so a controller killed at any
point resumes from the next tick: if it died after writing weights but before saving, the next
tick sees those weights in the world and adopts the step instead of stepping again.

Written against ``deploy.ports`` only (store, backend, clock), so the same tick runs a local
rollout (SQLite, the local server) and an in-cluster one (Rollout CRs, KServe). Time comes from
a ``Clock`` so tests tick through a 30-minute rollout in milliseconds.

A user's request (pause, resume, promote, abort: ``deploy.rollout.request_*``) is saved by
``user_request`` with the same optimistic-concurrency check, so it and the controller's ticks
never overwrite each other: whoever saves second re-reads. An undo rollout
(``deploy.rollout.new_undo_rollout``) skips the gate only if ``former_champions`` confirms its
candidate was champion before.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from deploy.ports import BackendError, Clock, Conflict, Refused, RolloutBackend, RolloutStore
from deploy.rollout import (
    Action,
    Applied,
    Decision,
    Event,
    GateResult,
    Phase,
    Rollout,
    Verdict,
    decide,
    gate,
    transition,
)
from kloop.artifact import ArtifactError, Registry
from kloop.model_version import Version


class RealClock:
    """The system's clock (``time.time``, ``time.sleep``)."""

    def now(self) -> float:
        return time.time()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


def tick(
    store: RolloutStore,
    backend: RolloutBackend,
    registry: Registry,
    rollout_id: str,
    clock: Clock,
) -> Rollout:
    """Advance one rollout by at most one decision; returns it as stored.

    Raises ``deploy.ports.Conflict`` when another writer saved the rollout during this tick;
    nothing is lost (writes are idempotent), the caller simply ticks again.
    """
    r = store.get(rollout_id)
    if r.phase.terminal:
        return r
    world = backend.read(r.model)
    now = clock.now()
    d = decide(r, world, r.policy, now)
    if d.action is Action.RUN_GATE and r.undo and r.candidate not in former_champions(store,
                                                                                      r.model):
        applied = Applied(gate=GateResult(Verdict.ERROR, (
            f"undo refused: no stored rollout shows v{r.candidate} as a champion of "
            f"{r.model}; roll it out normally, through the gate",)))
    else:
        applied = apply(d, r, backend, registry)
    new = transition(r, d, world, applied, now)
    if new is r:
        return r
    return store.save(new, expected_generation=r.generation)


def apply(d: Decision, r: Rollout, backend: RolloutBackend, registry: Registry) -> Applied:
    """Perform the decision's writes. A backend failure is reported, not raised: it counts as
    "could not act" toward the outage bound, or ends the phase at once when the server refused
    it (``Refused``). Programming errors still raise."""
    try:
        match d.action:
            case Action.RUN_GATE:
                g = run_gate(r, registry)
                if g.verdict in (Verdict.SUCCESSFUL, Verdict.INCONCLUSIVE):
                    _prepare(r, backend)  # start loading now: readiness may take minutes
                return Applied(gate=g)
            case Action.PREPARE:
                _prepare(r, backend)
            case Action.SET_WEIGHTS:
                backend.ensure_loaded(r.model, r.candidate)
                if r.champion is not None:
                    backend.ensure_loaded(r.model, r.champion)
                backend.set_weights(r.model, d.weights or {})
            case Action.PROMOTE:
                reverify(registry, r.model, r.candidate)
                backend.promote(r.model, r.candidate)
                move_champion(registry, r.model, r.candidate)
            case Action.RETIRE:
                if r.champion is not None:
                    backend.retire(r.model, r.champion)
            case Action.ROLLBACK | Action.ABORT if r.phase is Phase.ROLLING_BACK:
                # The alias first: it needs no server, and a server that restarts (or comes
                # back after an outage) loads whatever the alias names.
                restore_champion(registry, r.model, r.champion, r.candidate)
                backend.rollback(r.model, r.champion, r.candidate)
            case Action.ROLLBACK | Action.ABORT:
                pass  # first the decision is saved (RollingBack); the writes come next tick
            case Action.WAIT | Action.GIVE_UP | Action.NOTHING:
                pass
    except Refused as e:
        blame = e.files and e.version == r.candidate
        return Applied(error=str(e), refused=True, blame=blame)
    except (BackendError, OSError) as e:
        return Applied(error=f"{type(e).__name__}: {e}")
    return Applied()


def reverify(registry: Registry, model: str, version: Version) -> None:
    """Check every file of ``version`` against its recorded sha256 before it becomes the
    champion: a file changed since the server loaded it would otherwise be promoted, and the
    next server start would refuse it."""
    try:
        registry.verify(model, version)
    except ArtifactError as e:
        raise Refused(f"v{version}'s files no longer verify: {e}", version=version,
                      files=True) from e


def _prepare(r: Rollout, backend: RolloutBackend) -> None:
    backend.ensure_loaded(r.model, r.candidate)
    if r.champion is not None:
        backend.ensure_loaded(r.model, r.champion)


def move_champion(registry: Registry, model: str, candidate: Version) -> None:
    """Point the registry's ``champion`` alias at ``candidate`` and drop its ``candidate``
    alias (idempotent): the registry half of a promotion, the same for every backend."""
    try:
        if registry.alias(model, "champion") != candidate:
            registry.set_alias(model, "champion", candidate)
        if registry.alias(model, "candidate") == candidate:
            registry.remove_alias(model, "candidate")
    except (ArtifactError, OSError) as e:
        raise BackendError(f"moving {model}'s champion alias to {candidate}: {e}") from e


def restore_champion(registry: Registry, model: str, champion: Version | None,
                     candidate: Version) -> None:
    """The registry half of a rollback: a promotion whose save was lost (the controller died,
    or another writer saved first) may have moved the ``champion`` alias to the candidate
    before the rollout was aborted; move it back (idempotent), so a restarted server serves the
    champion, not a candidate that was never promoted."""
    try:
        if registry.alias(model, "champion") == candidate:
            if champion is None:
                registry.remove_alias(model, "champion")
            else:
                registry.set_alias(model, "champion", champion)
    except (ArtifactError, OSError) as e:
        raise BackendError(f"restoring {model}'s champion alias: {e}") from e


def run_gate(r: Rollout, registry: Registry) -> GateResult:
    """The offline gate on the registry's manifests. A missing or corrupt manifest is a gate
    error (abort, nothing to compare), not a failure of the candidate. An undo rollout's
    candidate passed as champion before: its gate is not re-run (its files are still
    re-verified before promotion)."""
    if r.undo:
        return GateResult(Verdict.SUCCESSFUL, (f"v{r.candidate} was champion before: undo "
                                               "does not re-run the gate",))
    try:
        cand = registry.manifest(r.model, r.candidate)
        champ = registry.manifest(r.model, r.champion) if r.champion is not None else None
    except ArtifactError as e:
        return GateResult(Verdict.ERROR, (f"cannot read manifests: {e}",))
    return gate(cand, champ, r.policy.gate)


def former_champions(store: RolloutStore, model: str) -> set[Version]:
    """Versions that were ``model``'s champion before, as the stored rollouts show: the
    champion of every rollout of the model, and the candidate of every one that succeeded.
    The current champion is among them; a caller offering undo targets leaves it out."""
    out: set[Version] = set()
    for r in store.list(model):
        if r.champion is not None:
            out.add(r.champion)
        if r.phase is Phase.SUCCEEDED:
            out.add(r.candidate)
    return out


USER_REQUEST_ATTEMPTS: Final = 10
"""How often ``user_request`` re-reads after losing a race to another writer (ticks save once
per interval, so one retry nearly always wins)."""
_RETRY_WAIT_S: Final = 0.05


def user_request(
    store: RolloutStore,
    rollout_id: str,
    op: Callable[[Rollout], Rollout],
    clock: Clock,
    expected_generation: int | str | None = None,
) -> Rollout:
    """Apply a user's request ``op`` (e.g. ``lambda r: request_pause(r, reason, now)``) to the
    stored rollout and save it; returns the rollout as stored.

    With ``expected_generation`` (the generation the user last read), the request holds only
    for that state: ``deploy.ports.Conflict`` at once when the stored rollout is at another
    generation, or when another writer saves first (of two users racing from the same read,
    one wins, the other must re-read). Generations compare as text, so an API may pass a
    SQLite counter as a string. Without it, the request is re-applied to a fresh read when a
    tick saves in between, up to ``USER_REQUEST_ATTEMPTS`` times (``clock`` waits a moment
    between), then ``Conflict``. An ``op`` that leaves the rollout as it is (returns it
    unchanged: already paused, already promoting) saves nothing. ``ValueError`` from ``op``
    (a request that makes no sense now) and ``deploy.ports.NotFound`` propagate.
    """
    last: Conflict | None = None
    for attempt in range(USER_REQUEST_ATTEMPTS):
        if attempt:
            clock.sleep(_RETRY_WAIT_S)
        r = store.get(rollout_id)
        if expected_generation is not None and str(r.generation) != str(expected_generation):
            raise Conflict(f"rollout {rollout_id} is at generation {r.generation}, not "
                           f"{expected_generation}: it moved since it was read; read it again")
        new = op(r)
        if new is r:
            return r
        try:
            return store.save(new, expected_generation=r.generation)
        except Conflict as e:
            if expected_generation is not None:
                raise
            last = e
    raise Conflict(f"rollout {rollout_id}: another writer saved first "
                   f"{USER_REQUEST_ATTEMPTS} times in a row; try again") from last


def run_until_done(
    store: RolloutStore,
    backend: RolloutBackend,
    registry: Registry,
    rollout_id: str,
    clock: Clock,
    interval_s: float,
    on_event: Callable[[Rollout, Event], None] | None = None,
) -> Rollout:
    """Tick every ``interval_s`` until the rollout is terminal; report each new event."""
    if interval_s <= 0:
        raise ValueError("interval_s must be > 0")
    seen: Event | None = None
    while True:
        try:
            r = tick(store, backend, registry, rollout_id, clock)
        except Conflict:
            r = store.get(rollout_id)  # someone else moved it; judge again from their state
        if on_event is not None and r.history and r.history[-1] != seen:
            seen = r.history[-1]
            on_event(r, seen)
        if r.phase.terminal:
            return r
        clock.sleep(interval_s)


__all__ = ["USER_REQUEST_ATTEMPTS", "RealClock", "apply", "former_champions", "move_champion",
           "restore_champion", "reverify", "run_gate", "run_until_done", "tick", "user_request"]
