"""How a candidate earns traffic: the rollout policy, the analysis and gate policies it holds,
and the one table (``KNOBS``) that names every setting on every surface.

A ``RolloutPolicy`` holds the traffic plan and limits, an ``AnalysisPolicy`` (what one live
analysis window must show) and a ``GatePolicy`` (what the offline evaluation must show). Each
validates its own fields at construction; the rollout policy adds the checks that span them.

Every setting is spelled three ways: its persisted key (``min_duration_s``: SQLite documents,
the CR's recorded status), its command-line flag (``--min-duration``) and its key in a Rollout
custom resource's ``spec.policy`` (``minDurationSeconds``). ``KNOBS`` lists each setting once
with its help; the flag and the CR key are derived from the persisted key by one rule each, so a
new setting appears on every surface by adding one line here. A renamed setting keeps its former
keys as ``aliases`` (spelled by the same rules), so records, scripts and custom resources
written before the rename still read: the gate's ``max_accuracy_drop`` and ``min_accuracy``
became ``gate_tolerance`` and ``gate_threshold`` when the gate learnt metrics other than accuracy.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal


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


def _finite_number(name: str, v: object) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {v!r}")
    return float(v)


def _metric_name(name: str, v: object) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{name} must name a metric, got {v!r}")
    return v


@dataclasses.dataclass(frozen=True)
class MetricThreshold:
    """One extra gate condition on a metric the manifests carry (MLflow's ``MetricThreshold``).

    Which way is better comes from the manifests (the task's declared ``direction``), never
    from here: a metric without a declared direction cannot be judged. All numbers are in the
    metric's own units; ``None`` leaves a check out.

    threshold: absolute floor (higher is better) or ceiling (lower is better); the only check
      a first version (no champion) gets.
    min_absolute_change: the candidate must BEAT the champion by at least this much.
    min_relative_change: the candidate must beat the champion by at least this fraction of
      ``|champion|`` (0.05 = 5%).
    tolerance: the candidate may be WORSE than the champion by at most this much.
    """

    metric: str
    threshold: float | None = None
    min_absolute_change: float | None = None
    min_relative_change: float | None = None
    tolerance: float | None = None

    LIMITS: ClassVar[tuple[str, ...]] = (
        "threshold", "min_absolute_change", "min_relative_change", "tolerance")

    def __post_init__(self) -> None:
        _metric_name("a gate condition's metric", self.metric)
        for name in self.LIMITS:
            value = getattr(self, name)
            if value is None:
                continue
            value = _finite_number(f"{self.metric}: {name}", value)
            if name != "threshold" and value < 0:
                raise ValueError(f"{self.metric}: {name} must be >= 0, got {value:g} (the "
                                 "direction comes from the task, not from the sign)")
            object.__setattr__(self, name, value)
        if all(getattr(self, name) is None for name in self.LIMITS):
            raise ValueError(f"the gate condition on {self.metric} sets no limit: give one of "
                             f"{', '.join(self.LIMITS)}")

    def to_dict(self) -> dict[str, Any]:
        """The metric and the limits set (what is absent is ``None``)."""
        return {f.name: v for f in dataclasses.fields(self)
                if (v := getattr(self, f.name)) is not None}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MetricThreshold:
        if not isinstance(d, Mapping):
            raise ValueError(f"a gate condition is an object with a metric, got {d!r}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown gate condition fields {sorted(unknown)}")
        if "metric" not in d:
            raise ValueError(f"a gate condition needs a metric: {dict(d)}")
        return cls(**d)

    @classmethod
    def parse(cls, text: str) -> MetricThreshold:
        """``METRIC:key=value[,key=value]`` (the command line's spelling), e.g.
        ``f1:threshold=0.8,tolerance=0.01``."""
        metric, sep, rest = text.partition(":")
        if not sep or not metric.strip() or not rest.strip():
            raise ValueError(f"{text!r} is not METRIC:key=value[,key=value] (keys "
                             f"{', '.join(cls.LIMITS)})")
        limits: dict[str, float] = {}
        for item in rest.split(","):
            key, eq, value = (part.strip() for part in item.partition("="))
            if not eq or key not in cls.LIMITS:
                raise ValueError(f"{item.strip()!r} in {text!r} is not key=value with a key "
                                 f"in {', '.join(cls.LIMITS)}")
            if key in limits:
                raise ValueError(f"{key} is given twice in {text!r}")
            try:
                limits[key] = float(value)
            except ValueError:
                raise ValueError(f"{key}={value!r} in {text!r} is not a number") from None
        return cls(metric.strip(), **limits)

    def __str__(self) -> str:
        """The command line's spelling: what ``parse`` reads back."""
        limits = ",".join(f"{k}={v:g}" for k, v in self.to_dict().items() if k != "metric")
        return f"{self.metric}:{limits}"


@dataclasses.dataclass(frozen=True)
class GatePolicy:
    """What the candidate's offline evaluation must show before it gets any traffic.

    Every number is in the judged metric's own units, and "worse" and "better" follow the
    direction the task declared for it in the manifest (``Manifest.direction``): accuracy is
    higher-is-better, RMSE lower-is-better. The gate never guesses a direction.

    metric: the primary metric judged; ``None`` = the candidate manifest's ``primary_metric``
      (the task's declaration; ``accuracy`` for manifests published before tasks declared one).
    tolerance: how much worse than the champion the candidate may score on the primary metric
      ("no worse than"): higher is better -> candidate >= champion - tolerance; lower is
      better -> candidate <= champion + tolerance. 0.01 tolerates evaluation noise on a few
      thousand held-out examples for a fraction metric (accuracy); set it in the metric's units
      for others (RMSE in the target's units).
    threshold: an absolute floor (higher is better) or ceiling (lower is better) on the primary
      metric, and the only check of a model's first version (no champion to compare with), so
      a first version is never promoted unjudged. ``None`` = the task's declared threshold
      (``Manifest.threshold``); for manifests without a declaration, 0.5 on accuracy (refuses
      a digits model that gets half its held-out examples wrong; a shuffled-label one scores
      about 0.1), else none. A first version with no threshold from either is refused (an
      error: nothing to judge it by).
    conditions: extra checks, any number, on any metric the manifests carry
      (``MetricThreshold``); all must pass. Empty by default: the primary metric is the task's
      own choice of what matters.
    """

    metric: str | None = None
    tolerance: float = 0.01
    threshold: float | None = None
    conditions: tuple[MetricThreshold, ...] = ()

    def __post_init__(self) -> None:
        if self.metric is not None:
            _metric_name("the gate's metric", self.metric)
        object.__setattr__(self, "tolerance", _finite_number("gate tolerance", self.tolerance))
        if self.tolerance < 0:
            raise ValueError(f"gate tolerance must be >= 0, got {self.tolerance:g} (the "
                             "direction comes from the task, not from the sign)")
        if self.threshold is not None:
            object.__setattr__(self, "threshold",
                               _finite_number("gate threshold", self.threshold))
        conditions = tuple(self.conditions)
        for c in conditions:
            if not isinstance(c, MetricThreshold):
                raise ValueError(f"a gate condition must be a MetricThreshold, got {c!r}")
        object.__setattr__(self, "conditions", conditions)


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
        """Every setting under its persisted key (flat: the nesting is this class's business),
        as JSON-ready values (lists, and a gate condition as an object)."""
        return {knob.name: knob.dump(knob.get(self)) for knob in KNOBS}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RolloutPolicy:
        """The policy ``to_dict`` wrote; absent keys take their defaults. A setting's former
        key (``Knob.aliases``: records saved before it was renamed) is read as the setting."""
        sections: dict[str, dict[str, Any]] = {"rollout": {}, "analysis": {}, "gate": {}}
        seen: dict[str, str] = {}
        unknown = []
        for key, value in d.items():
            knob = BY_NAME.get(key) or BY_ALIAS.get(key)
            if knob is None:
                unknown.append(key)
                continue
            if knob.name in seen:
                raise ValueError(f"{knob.name} is given twice (as {seen[knob.name]} and {key})")
            seen[knob.name] = key
            sections[knob.section][knob.field] = knob.load(value)
        if unknown:
            raise ValueError(f"unknown rollout policy fields {sorted(unknown)}")
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
    # Former persisted keys of a renamed setting: still read from saved records, and spelled
    # as flags and CR keys by the same rules (``--max-accuracy-drop``, ``maxAccuracyDrop``).
    aliases: tuple[str, ...] = ()
    # A list given one item per flag (``--gate-condition A --gate-condition B``): the flag is
    # the singular of the name.
    repeated: bool = False

    def __post_init__(self) -> None:
        if not self.field:
            object.__setattr__(self, "field", self.name)

    @property
    def flag(self) -> str:
        """``min_duration_s`` -> ``--min-duration``: the unit of seconds is the flag's default."""
        flag = _flag(self.name)
        return flag.removesuffix("s") if self.repeated else flag

    @property
    def alias_flags(self) -> tuple[str, ...]:
        return tuple(_flag(a) for a in self.aliases)

    @property
    def cr_key(self) -> str:
        """``min_duration_s`` -> ``minDurationSeconds`` (Kubernetes: camelCase, units spelled)."""
        return camel(self.name)

    @property
    def alias_cr_keys(self) -> tuple[str, ...]:
        return tuple(camel(a) for a in self.aliases)

    def get(self, policy: RolloutPolicy) -> Any:
        owner: object = policy if self.section == "rollout" else getattr(policy, self.section)
        return getattr(owner, self.field)

    @staticmethod
    def dump(value: Any) -> Any:
        """A setting's value as persisted: tuples as lists, a gate condition as an object."""
        if isinstance(value, tuple):
            return [v.to_dict() if isinstance(v, MetricThreshold) else v for v in value]
        return value

    def load(self, value: Any) -> Any:
        """The persisted value back as the field's: lists as tuples, objects as conditions."""
        if self.name == "steps" or self.repeated:
            if not isinstance(value, list | tuple):
                raise ValueError(f"{self.name} must be a list, got {value!r}")
            if self.repeated:
                return tuple(MetricThreshold.from_dict(v) if isinstance(v, Mapping) else v
                             for v in value)
            return tuple(value)
        return value


def _flag(name: str) -> str:
    return "--" + name.removesuffix("_s").replace("_", "-")


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
    Knob("gate_metric", "gate", "gate: the metric judged, none meaning the task's primary "
                                "metric (which way is better is always the task's)",
         field="metric"),
    Knob("gate_tolerance", "gate", "gate: how much worse than the champion the candidate may "
                                   "score, in the metric's units", field="tolerance",
         aliases=("max_accuracy_drop",)),
    Knob("gate_threshold", "gate", "gate: absolute floor (higher is better) or ceiling (lower) "
                                   "on the metric, none meaning the task's declared one (0.5 "
                                   "on accuracy for versions without a declaration)",
         field="threshold", aliases=("min_accuracy",)),
    Knob("gate_conditions", "gate", "gate: an extra condition METRIC:key=value[,key=value], "
                                    "keys threshold, min_absolute_change, min_relative_change, "
                                    "tolerance; repeat for several", field="conditions",
         repeated=True),
    Knob("retire_after_s", "rollout", "seconds the old champion stays loaded after promotion"),
    Knob("ready_timeout_s", "rollout", "seconds the candidate may take to become ready after "
                                       "the gate"),
)
BY_NAME: Mapping[str, Knob] = {k.name: k for k in KNOBS}
BY_ALIAS: Mapping[str, Knob] = {a: k for k in KNOBS for a in k.aliases}


def camel(name: str) -> str:
    """``min_duration_s`` -> ``minDurationSeconds``, ``p99_slack_ms`` -> ``p99SlackMs``."""
    head, *rest = name.split("_")
    rest = ["Seconds" if p == "s" else p[:1].upper() + p[1:] for p in rest]
    return head + "".join(rest)
