"""The rollout, pure: policy, state, the decision and the transition, analysis, metric samples.

Nothing in this package does I/O or reads a clock (``now`` is always passed in), so every
judgement is a table-testable function. The controller (``deploy.controller``) is what reads
the world, applies decisions and saves the result.

Modules, lowest first: ``samples`` (cumulative counters from Prometheus text, windows,
quantiles) < ``policy`` (``RolloutPolicy`` with its ``AnalysisPolicy`` and ``GatePolicy``, the
gate's ``MetricThreshold`` conditions, and ``KNOBS``, every setting's spelling) < ``analysis``
(the gate and the live verdicts) < ``state`` (``Phase``, ``Action``, ``Event``, ``Rollout``) <
``world`` (what a backend saw) < ``decide`` < ``transition``.
"""

from deploy.rollout.analysis import Analysis, GateResult, Verdict, VersionStats, analyse, gate
from deploy.rollout.decide import Decision, decide, next_weight, outage_over, step_weights
from deploy.rollout.policy import (
    KNOBS,
    AnalysisPolicy,
    GatePolicy,
    Knob,
    MetricThreshold,
    RolloutPolicy,
)
from deploy.rollout.samples import (
    CounterReset,
    MetricsError,
    VersionDelta,
    VersionSample,
    delta,
    parse,
    quantile,
    samples_for,
)
from deploy.rollout.state import (
    WRITE_FAILED,
    Action,
    Event,
    EventKind,
    Phase,
    Rollout,
    UserRequest,
    champion_for,
    new_rollout,
    new_undo_rollout,
)
from deploy.rollout.transition import (
    Applied,
    request_abort,
    request_pause,
    request_promote,
    request_resume,
    restored_weights,
    transition,
)
from deploy.rollout.world import World, normalized

__all__ = [
    "KNOBS", "WRITE_FAILED", "Action", "Analysis", "AnalysisPolicy", "Applied", "CounterReset",
    "Decision", "Event", "EventKind", "GatePolicy", "GateResult", "Knob", "MetricThreshold",
    "MetricsError", "Phase",
    "Rollout", "RolloutPolicy", "UserRequest", "Verdict", "VersionDelta", "VersionSample",
    "VersionStats", "World", "analyse", "champion_for", "decide", "delta", "gate", "new_rollout",
    "new_undo_rollout", "next_weight", "normalized", "outage_over", "parse", "quantile",
    "request_abort", "request_pause", "request_promote", "request_resume", "restored_weights",
    "samples_for", "step_weights", "transition",
]
