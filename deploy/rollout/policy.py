"""How a candidate earns traffic: the rollout policy, the analysis and gate policies it holds,
and the one table (``KNOBS``) that names every setting on every surface.

A ``RolloutPolicy`` holds the traffic plan and limits, an ``AnalysisPolicy`` (what one live
analysis window must show) and a ``GatePolicy`` (what the offline evaluation must show). Each
validates its own fields at construction; the rollout policy adds the checks that span them.

Every setting is spelled three ways: its persisted key (``min_duration_s``: SQLite documents,
the CR's recorded status), its command-line flag (``--min-duration``) and its key in a Rollout
custom resource's ``spec.policy`` (``minDurationSeconds``). ``KNOBS`` lists each setting once
with its help; the flag and the CR key are derived from the persisted key by one rule each, so a
new setting appears on every surface by adding one line here.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any, Literal


def _non_negative(name: str, v: float) -> None:
    if not math.isfinite(v) or v < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {v}")


@dataclasses.dataclass(frozen=True)
class AnalysisPolicy:
    """Thresholds for one live analysis window (one traffic step).

    Window:
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
    """

    min_requests: int = 100
    min_duration_s: float = 60.0
    max_error_rate: float = 0.01
    max_error_ratio: float = 1.5
    error_rate_slack: float = 0.005
    max_p99_ratio: float = 1.5
    p99_slack_ms: float = 5.0

    def __post_init__(self) -> None:
        for name in ("min_requests", "min_duration_s", "max_error_rate", "error_rate_slack",
                     "p99_slack_ms"):
            _non_negative(name, getattr(self, name))
        if self.max_error_rate > 1:
            raise ValueError(f"max_error_rate {self.max_error_rate} is a fraction in [0, 1]")
        for name in ("max_error_ratio", "max_p99_ratio"):
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name} must be >= 1 (below 1 demands the candidate be better)")


@dataclasses.dataclass(frozen=True)
class GatePolicy:
    """How much worse than the champion a candidate may score offline.

    max_accuracy_drop: absolute accuracy (0..1) the candidate may lose against the champion;
      0.01 tolerates evaluation noise on a few thousand held-out examples.
    min_accuracy: an absolute floor (0..1) every candidate must reach; for a model's first
      version (no champion to compare with) it is the only check, so a first version is never
      promoted unjudged. 0.5 refuses a model that gets half its held-out examples wrong (a
      shuffled-label digits model scores about 0.1). ``None`` turns the floor off; a first version is then refused
      by the gate (an error: nothing to judge it by).
    metric: the manifest metric compared (higher is better).
    """

    max_accuracy_drop: float = 0.01
    min_accuracy: float | None = 0.5
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise ValueError(f"max_accuracy_drop {self.max_accuracy_drop} is not in [0, 1]")
        if self.min_accuracy is not None and not 0.0 <= self.min_accuracy <= 1.0:
            raise ValueError(f"min_accuracy {self.min_accuracy} is not in [0, 1]")
        if not self.metric:
            raise ValueError("the gate's metric must be named")


@dataclasses.dataclass(frozen=True)
class RolloutPolicy:
    """The traffic plan, its limits, and the analysis and gate policies. Rejected at
    construction when the combination is unsafe.

    Traffic:
      steps: candidate's traffic percent per step, strictly increasing, ending at 100 (the
        last step's analysis is what promotes; a model's first version skips to 100).
      step_timeout_s: seconds a step may stay without a conclusive analysis before the rollout
        is aborted (not blamed: it is "could not measure"); bounds a rollout nobody sends
        traffic to.
    Limits (Flagger's threshold semantics):
      failure_limit: failed analyses (counted over the whole rollout) that roll back; at 2, one
        bad window opens a fresh window and a second one rolls back.
      error_limit and outage_tolerance_s: how long the controller may be unable to act
        ("could not measure", the server unreachable, a write that failed) before it gives up:
        a streak of errors ends the phase once it holds at least ``error_limit`` errors AND has
        lasted ``outage_tolerance_s`` seconds, so the bound is in seconds whatever the tick
        interval, and one slow tick is not an outage. Giving up aborts (the champion is
        restored); a rollback that cannot complete within the same bound ends NeedsAttention.
    Readiness (before the first step):
      ready_timeout_s: seconds the candidate may take to become ready after the gate passed
        (pull an image, download the model, start a pod); 600 covers a cold node pulling a
        multi-GB image. Then it is rolled back and cleaned up.
    After promotion:
      retire_after_s: seconds the old champion stays loaded at weight 0, so a rollback soon
        after promotion needs no model load; then it is unloaded.
    analysis: each step's live analysis (``AnalysisPolicy``).
    gate: the offline evaluation before any traffic (``GatePolicy``).
    """

    steps: tuple[int, ...] = (10, 50, 100)
    step_timeout_s: float = 900.0
    failure_limit: int = 2
    error_limit: int = 5
    outage_tolerance_s: float = 30.0
    retire_after_s: float = 60.0
    ready_timeout_s: float = 600.0
    analysis: AnalysisPolicy = dataclasses.field(default_factory=AnalysisPolicy)
    gate: GatePolicy = dataclasses.field(default_factory=GatePolicy)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(int(s) for s in self.steps))
        s = self.steps
        if not s or s[-1] != 100:
            raise ValueError(f"steps {s} must end at 100: the last step's analysis promotes")
        if s[0] <= 0 or any(b <= a for a, b in itertools.pairwise(s)):
            raise ValueError(f"steps {s} must be strictly increasing percents in 1..100")
        for name in ("retire_after_s", "ready_timeout_s", "outage_tolerance_s", "step_timeout_s"):
            _non_negative(name, getattr(self, name))
        if not self.ready_timeout_s > 0:
            raise ValueError(f"ready_timeout_s must be > 0, got {self.ready_timeout_s}")
        for name in ("failure_limit", "error_limit"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not self.step_timeout_s > self.analysis.min_duration_s:
            raise ValueError(
                f"step_timeout_s {self.step_timeout_s} must exceed min_duration_s "
                f"{self.analysis.min_duration_s}, or every step times out before it can be judged"
            )

    def to_dict(self) -> dict[str, Any]:
        """Every setting under its persisted key (flat: the nesting is this class's business)."""
        out: dict[str, Any] = {}
        for knob in KNOBS:
            value = knob.get(self)
            out[knob.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutPolicy:
        """The policy ``to_dict`` wrote; absent keys take their defaults."""
        unknown = set(d) - set(BY_NAME)
        if unknown:
            raise ValueError(f"unknown rollout policy fields {sorted(unknown)}")
        sections: dict[str, dict[str, Any]] = {"rollout": {}, "analysis": {}, "gate": {}}
        for name, value in d.items():
            knob = BY_NAME[name]
            sections[knob.section][knob.field] = tuple(value) if name == "steps" else value
        return cls(**sections["rollout"], analysis=AnalysisPolicy(**sections["analysis"]),
                   gate=GatePolicy(**sections["gate"]))


Section = Literal["rollout", "analysis", "gate"]


@dataclasses.dataclass(frozen=True)
class Knob:
    """One policy setting: where it lives (``section``, ``field``) and how it is spelled."""

    name: str  # persisted key, unique over the sections
    section: Section
    help: str
    field: str = ""  # the dataclass field, when not ``name``

    def __post_init__(self) -> None:
        if not self.field:
            object.__setattr__(self, "field", self.name)

    @property
    def flag(self) -> str:
        """``min_duration_s`` -> ``--min-duration``: the unit of seconds is the flag's default."""
        return "--" + self.name.removesuffix("_s").replace("_", "-")

    @property
    def cr_key(self) -> str:
        """``min_duration_s`` -> ``minDurationSeconds`` (Kubernetes: camelCase, units spelled)."""
        return camel(self.name)

    def get(self, policy: RolloutPolicy) -> Any:
        owner: object = policy if self.section == "rollout" else getattr(policy, self.section)
        return getattr(owner, self.field)


KNOBS: tuple[Knob, ...] = (
    Knob("steps", "rollout", "candidate traffic percent per step, ending at 100"),
    Knob("min_requests", "analysis", "candidate requests per step before judging"),
    Knob("min_duration_s", "analysis", "seconds per step before judging"),
    Knob("step_timeout_s", "rollout", "seconds a step may stay inconclusive before aborting"),
    Knob("max_error_rate", "analysis", "candidate 5xx rate always accepted (fraction)"),
    Knob("max_error_ratio", "analysis", "accepted candidate error rate relative to the champion's"),
    Knob("error_rate_slack", "analysis", "absolute slack over the champion's error rate"),
    Knob("max_p99_ratio", "analysis", "accepted candidate p99 relative to the champion's"),
    Knob("p99_slack_ms", "analysis", "absolute p99 slack in milliseconds"),
    Knob("failure_limit", "rollout", "failed analyses that roll back"),
    Knob("error_limit", "rollout", "consecutive errors (could not measure or act) before giving "
                                   "up, together with outage_tolerance_s"),
    Knob("outage_tolerance_s", "rollout", "seconds a streak of errors (server unreachable, "
                                          "failed writes) may last before giving up"),
    Knob("max_accuracy_drop", "gate", "gate: accuracy the candidate may lose vs the champion"),
    Knob("min_accuracy", "gate", "gate: absolute minimum accuracy"),
    Knob("gate_metric", "gate", "gate: the manifest metric compared (higher is better)",
         field="metric"),
    Knob("retire_after_s", "rollout", "seconds the old champion stays loaded after promotion"),
    Knob("ready_timeout_s", "rollout", "seconds the candidate may take to become ready after "
                                       "the gate"),
)
BY_NAME: Mapping[str, Knob] = {k.name: k for k in KNOBS}


def camel(name: str) -> str:
    """``min_duration_s`` -> ``minDurationSeconds``, ``p99_slack_ms`` -> ``p99SlackMs``."""
    head, *rest = name.split("_")
    rest = ["Seconds" if p == "s" else p[:1].upper() + p[1:] for p in rest]
    return head + "".join(rest)
