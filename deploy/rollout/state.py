"""The rollout as data: its phases, the actions it records, and the document a store keeps.

A rollout is a persisted state machine (see ``Phase``)::

    Pending --run gate--> Gating --gate ok, candidate ready--> Progressing (step 0 .. n-1)
        --last step ok--> Promoting --candidate re-verified, alias moved, old champion
        retired--> Succeeded
    Gating --gate failed | candidate refused or FailedToLoad | not ready in time--> RollingBack
        --> RolledBack
    Gating --gate error--> Aborted                (e.g. evaluated on different data)
    Progressing --failed checks reach failure_limit--> RollingBack --> RolledBack
    Progressing --outage | step timeout | user abort--> RollingBack --> Aborted
    RollingBack --writes refused, or failing for the outage bound--> NeedsAttention

    user promote (gate passed):  Gating --candidate ready--> Promoting   (no traffic steps)
                                 Progressing (any step) --> Promoting     (remaining steps skipped)
    undo (``undo``: the candidate was champion before):
                                 Pending --gate not re-run--> Gating --candidate ready-->
                                 Promoting --> Succeeded
                                 (no stored rollout shows it as champion: gate error, Aborted)
    user pause / resume (Pending, Gating, Progressing): ``paused`` holds the rollout where it is

A pause (``paused``) stops the rollout from *advancing*: no first traffic step, no next step,
no promotion, and no step timeout. It hides nothing: the gate still runs, the candidate is
still loaded, each step's live analysis keeps running in fresh windows, and a failed one still
counts toward ``failure_limit`` and rolls back; "could not measure" still ends the rollout at
the outage bound. A resume restarts the step timer. A promotion request (``promote_requested``)
lifts a pause and promotes on the next tick, once the candidate is ready. The user's requests
(``deploy.rollout.transition.request_*``) are recorded in the history as ``UserRequest``
events.

Every phase is bounded: Pending and Promoting by the outage bound (``error_limit`` errors
lasting ``outage_tolerance_s``), Gating by ``ready_timeout_s``, each step by
``step_timeout_s``, RollingBack by the outage bound, after which it ends NeedsAttention
instead of retrying forever. The one exception is a user's pause: it holds for as long as
the user wants (bounded only by failures and the outage bound). A load or write the server *refuses* (a hash mismatch, management
disabled) is not retried at all.

``RollingBack`` is where a decided rollback/abort waits while its write has not succeeded;
``RolledBack`` blames the candidate, ``Aborted`` does not (the controller could not measure,
or a user aborted); both mean "traffic restored". ``NeedsAttention`` means the restore could
not be confirmed: the reason says what was last seen. A server that restarts loads the
champion alias, which a rollback never moved. Every terminal phase frees the model for its
next rollout.

``to_dict``/``from_dict`` give the document stores keep (SQLite, a custom resource's status):
plain JSON, versions as text (the wire's habit), read back into ``Version`` numbers.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import Any, Literal

from deploy.rollout.analysis import GateResult, Verdict, VersionStats
from deploy.rollout.policy import RolloutPolicy
from deploy.rollout.samples import VersionSample
from kloop.model_version import Version, parse_version


class Phase(enum.Enum):
    PENDING = "Pending"
    GATING = "Gating"
    PROGRESSING = "Progressing"
    PROMOTING = "Promoting"
    SUCCEEDED = "Succeeded"
    ROLLING_BACK = "RollingBack"
    ROLLED_BACK = "RolledBack"
    ABORTED = "Aborted"
    NEEDS_ATTENTION = "NeedsAttention"

    @property
    def terminal(self) -> bool:
        return self in (Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.ABORTED, Phase.NEEDS_ATTENTION)


class Action(enum.Enum):
    """What one tick decides to do (``deploy.rollout.decide``); its history records it."""

    RUN_GATE = "run_gate"  # evaluate the offline gate (status.gate); if it passed, load candidate
    PREPARE = "prepare"  # load the candidate (and champion) without routing anything to it
    SET_WEIGHTS = "set_weights"  # load the candidate, route ``weights``, start a window
    WAIT = "wait"  # nothing to write; maybe start a fresh analysis window
    PROMOTE = "promote"  # 100% to the candidate, champion alias moved
    RETIRE = "retire"  # unload the old champion; the rollout succeeded
    ROLLBACK = "rollback"  # 100% to the champion, candidate unloaded; candidate blamed
    ABORT = "abort"  # same writes as rollback; candidate not blamed
    GIVE_UP = "give_up"  # stop retrying a write: RollingBack -> NeedsAttention, or a retire
    NOTHING = "nothing"  # terminal phase (never recorded)


class UserRequest(enum.Enum):
    """What a user asked of a running rollout, as its history records it (an abort is recorded
    as the ``Action.ABORT`` it decides). Values differ from every ``Action`` value, so an
    event's kind reads back unambiguously."""

    PAUSE = "paused"
    RESUME = "resumed"
    PROMOTE = "promote_requested"


WRITE_FAILED: Literal["error"] = "error"
EventKind = Action | UserRequest | Literal["error"]
"""An event records an action, a user's request, or ``"error"``: the action's write failed."""


@dataclasses.dataclass(frozen=True)
class Event:
    at: float
    kind: EventKind
    message: str
    verdict: Verdict | None = None
    weights: Mapping[Version, int] = dataclasses.field(default_factory=dict)
    count: int = 1  # repeated waits with the same verdict are coalesced into one event

    @property
    def kind_name(self) -> str:
        """``"set_weights"``, ``"error"``: how the kind is written."""
        return self.kind if isinstance(self.kind, str) else self.kind.value

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind_name, "message": self.message,
                "verdict": self.verdict.value if self.verdict is not None else None,
                "weights": _weights_out(self.weights), "count": self.count}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Event:
        verdict = d.get("verdict")
        return cls(at=d["at"], kind=_kind(d["kind"]), message=d["message"],
                   verdict=Verdict(verdict) if verdict is not None else None,
                   weights=_weights_in(d.get("weights") or {}), count=d.get("count", 1))


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Spec (id .. undo) and status (the rest). ``generation`` belongs to the store: its
    optimistic-concurrency token, opaque to everyone else (SQLite: a counter; a Rollout custom
    resource: the object's resourceVersion, a string).

    ``undo``: the candidate was this model's champion before (``new_undo_rollout``); its gate
    is not re-run and it goes to 100% without traffic steps, as soon as it is ready.
    ``paused`` and ``promote_requested`` are the user's requests (see the module docstring).
    """

    id: str
    model: str
    candidate: Version
    champion: Version | None
    policy: RolloutPolicy
    created: float
    undo: bool = False
    phase: Phase = Phase.PENDING
    step: int = -1  # index into the effective steps; -1 before any traffic
    weights: Mapping[Version, int] = dataclasses.field(default_factory=dict)
    step_started_at: float | None = None  # step timeout runs from here
    window_started_at: float | None = None  # analysis window (min_duration_s) runs from here
    baseline: Mapping[Version, VersionSample] = dataclasses.field(default_factory=dict)
    failed: int = 0  # failed analyses in this rollout
    errors: int = 0  # consecutive error verdicts / failed writes
    errors_since: float | None = None  # when that streak began (the outage bound runs from it)
    gate: GateResult | None = None
    champion_reference: VersionStats | None = None
    promoted_at: float | None = None
    preparing_since: float | None = None  # candidate asked to load; ready_timeout_s runs from here
    outcome: Phase | None = None  # where RollingBack ends: RolledBack or Aborted
    paused: bool = False  # a user's pause: hold, keep judging, never time out
    promote_requested: bool = False  # a user's "promote": skip the remaining steps
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
            "id": self.id, "model": self.model, "candidate": str(self.candidate),
            "champion": None if self.champion is None else str(self.champion),
            "policy": self.policy.to_dict(), "created": self.created, "undo": self.undo,
            "phase": self.phase.value, "step": self.step, "weights": _weights_out(self.weights),
            "step_started_at": self.step_started_at, "window_started_at": self.window_started_at,
            "baseline": {str(v): s.to_dict() for v, s in self.baseline.items()},
            "failed": self.failed, "errors": self.errors, "errors_since": self.errors_since,
            "gate": self.gate.to_dict() if self.gate else None,
            "champion_reference": (
                self.champion_reference.to_dict() if self.champion_reference else None
            ),
            "promoted_at": self.promoted_at, "preparing_since": self.preparing_since,
            "outcome": self.outcome.value if self.outcome else None,
            "paused": self.paused, "promote_requested": self.promote_requested,
            "reason": self.reason, "updated": self.updated,
            "history": [e.to_dict() for e in self.history],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], generation: int | str = 0) -> Rollout:
        """The rollout ``to_dict`` wrote; fields added since (``undo``, ``paused``,
        ``promote_requested``) read as their defaults from older documents (absent or null)."""
        return cls(
            id=d["id"], model=d["model"], candidate=parse_version(d["candidate"]),
            champion=None if d["champion"] is None else parse_version(d["champion"]),
            policy=RolloutPolicy.from_dict(d["policy"]), created=d["created"],
            undo=bool(d.get("undo")),
            phase=Phase(d["phase"]), step=d["step"], weights=_weights_in(d["weights"]),
            step_started_at=d["step_started_at"], window_started_at=d["window_started_at"],
            baseline={parse_version(v): VersionSample.from_dict(s)
                      for v, s in d["baseline"].items()},
            failed=d["failed"], errors=d["errors"], errors_since=d.get("errors_since"),
            gate=GateResult.from_dict(d["gate"]) if d["gate"] else None,
            champion_reference=(
                VersionStats.from_dict(d["champion_reference"]) if d["champion_reference"] else None
            ),
            promoted_at=d["promoted_at"], preparing_since=d.get("preparing_since"),
            outcome=Phase(d["outcome"]) if d["outcome"] else None,
            paused=bool(d.get("paused")), promote_requested=bool(d.get("promote_requested")),
            reason=d["reason"], updated=d["updated"],
            history=tuple(Event.from_dict(e) for e in d["history"]),
            generation=generation,
        )


def champion_for(model: str, candidate: Version, alias: Version | None,
                 served: Mapping[Version, int]) -> Version | None:
    """Whom the candidate is judged against and falls back to: the ``champion`` alias; without
    one, the version that serves today (``served``: the server's weights for the model), so a
    registry that never set the alias still gates and canaries against what users get. ``None``
    for a first version (nothing serves, or only the candidate does). A split between several
    versions with no alias names no champion: refused with ``ValueError``."""
    if alias is not None:
        return alias
    serving = sorted(v for v, w in served.items() if int(w) > 0)
    if not serving or serving == [candidate]:
        return None
    if len(serving) == 1:
        return serving[0]
    split = ", ".join(f"v{v} {served[v]}%" for v in serving)
    raise ValueError(f"{model} has no champion alias and its traffic is split ({split}): "
                     "there is no one version to judge the candidate against; finish or abort "
                     "that split, or set the alias")


def new_rollout(
    id: str, model: str, candidate: Version, champion: Version | None, policy: RolloutPolicy,
    now: float,
) -> Rollout:
    if champion == candidate:
        raise ValueError(f"candidate {candidate} is already the champion of {model}")
    return Rollout(id=id, model=model, candidate=candidate, champion=champion, policy=policy,
                   created=now, updated=now)


def new_undo_rollout(
    id: str, model: str, to_version: Version, champion: Version | None, policy: RolloutPolicy,
    now: float,
) -> Rollout:
    """A rollout back to ``to_version``, a version that was ``model``'s champion before
    (``kubectl argo rollouts undo --to-revision``): it passed its gate and its traffic steps
    once, so the gate is not re-run and it goes to 100% as soon as it is ready. The caller
    checks that it was champion (``deploy.controller.former_champions``); the controller checks
    again before skipping the gate."""
    if to_version == champion:
        raise ValueError(f"v{to_version} is already the champion of {model}: nothing to undo")
    return dataclasses.replace(new_rollout(id, model, to_version, champion, policy, now),
                               undo=True)


def _kind(name: str) -> EventKind:
    if name == WRITE_FAILED:
        return WRITE_FAILED
    try:
        return Action(name)
    except ValueError:
        return UserRequest(name)


def _weights_out(weights: Mapping[Version, int]) -> dict[str, int]:
    return {str(v): int(w) for v, w in weights.items()}


def _weights_in(weights: Mapping[str, Any]) -> dict[Version, int]:
    return {parse_version(v): int(w) for v, w in weights.items()}
