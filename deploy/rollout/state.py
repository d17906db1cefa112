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

Every phase is bounded: Pending and Promoting by the outage bound (``error_limit`` errors
lasting ``outage_tolerance_s``), Gating by ``ready_timeout_s``, each step by
``step_timeout_s``, RollingBack by the outage bound, after which it ends NeedsAttention
instead of retrying forever. A load or write the server *refuses* (a hash mismatch, management
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


WRITE_FAILED: Literal["error"] = "error"
EventKind = Action | Literal["error"]
"""An event records an action, or ``"error"``: the action's write failed."""


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
        kind: EventKind = WRITE_FAILED if d["kind"] == WRITE_FAILED else Action(d["kind"])
        verdict = d.get("verdict")
        return cls(at=d["at"], kind=kind, message=d["message"],
                   verdict=Verdict(verdict) if verdict is not None else None,
                   weights=_weights_in(d.get("weights") or {}), count=d.get("count", 1))


@dataclasses.dataclass(frozen=True)
class Rollout:
    """Spec (id .. created) and status (the rest). ``generation`` belongs to the store: its
    optimistic-concurrency token, opaque to everyone else (SQLite: a counter; a Rollout custom
    resource: the object's resourceVersion, a string)."""

    id: str
    model: str
    candidate: Version
    champion: Version | None
    policy: RolloutPolicy
    created: float
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
            "policy": self.policy.to_dict(), "created": self.created,
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
            "reason": self.reason, "updated": self.updated,
            "history": [e.to_dict() for e in self.history],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], generation: int | str = 0) -> Rollout:
        return cls(
            id=d["id"], model=d["model"], candidate=parse_version(d["candidate"]),
            champion=None if d["champion"] is None else parse_version(d["champion"]),
            policy=RolloutPolicy.from_dict(d["policy"]), created=d["created"],
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


def _weights_out(weights: Mapping[Version, int]) -> dict[str, int]:
    return {str(v): int(w) for v, w in weights.items()}


def _weights_in(weights: Mapping[str, Any]) -> dict[Version, int]:
    return {parse_version(v): int(w) for v, w in weights.items()}
