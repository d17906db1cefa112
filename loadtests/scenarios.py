"""Load scenarios as data: a plan is a list of stages, each holding a user count until a time.

``stage_at`` is a pure function of the plan and the elapsed time. Nothing here imports locust
(whose import monkey-patches the process with gevent), so the scenarios are tested in plain
pytest; ``loadtests.shapes`` is the locust adapter.
"""

from __future__ import annotations

import dataclasses
from typing import Any

DEFAULT_STEADY_SECONDS = 60.0  # steady without --run-time still ends by itself


@dataclasses.dataclass(frozen=True)
class Stage:
    until_s: float  # elapsed seconds at which this stage ends
    users: int
    spawn_rate: float  # users started (or stopped) per second to reach `users`


def steady(users: int, spawn_rate: float, duration_s: float) -> list[Stage]:
    return [Stage(duration_s, users, spawn_rate)]


def step(step_users: int, step_s: float, steps: int) -> list[Stage]:
    """One more batch of users every step; each batch starts within a second."""
    return [Stage(step_s * (i + 1), step_users * (i + 1), float(step_users)) for i in range(steps)]


def spike(baseline_users: int, baseline_s: float, spike_users: int, spike_s: float) -> list[Stage]:
    """Baseline, a spike that arrives (and leaves) within a second, baseline again."""
    jump = float(max(abs(spike_users - baseline_users), 1))
    return [
        Stage(baseline_s, baseline_users, float(baseline_users)),
        Stage(baseline_s + spike_s, spike_users, jump),
        Stage(2 * baseline_s + spike_s, baseline_users, jump),
    ]


def stage_at(plan: list[Stage], elapsed_s: float) -> Stage | None:
    """The stage in force ``elapsed_s`` into the test; None once the plan is over."""
    for stage in plan:
        if elapsed_s < stage.until_s:
            return stage
    return None


def plan_from_options(opts: Any) -> list[Stage]:
    if opts.scenario == "step":
        return step(opts.step_users, opts.step_seconds, opts.steps)
    if opts.scenario == "spike":
        return spike(opts.baseline_users, opts.baseline_seconds, opts.spike_users, opts.spike_seconds)
    return steady(opts.num_users or 1, opts.spawn_rate or 1.0, opts.run_time or DEFAULT_STEADY_SECONDS)
