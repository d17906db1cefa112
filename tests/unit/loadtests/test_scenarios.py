"""The scenarios as plans: what user count each is at, second by second, and that each ends."""

from __future__ import annotations

import argparse
import sys

import pytest

from loadtests.scenarios import (
    DEFAULT_STEADY_SECONDS,
    Stage,
    plan_from_options,
    spike,
    stage_at,
    steady,
    step,
)


def users_at(plan: list[Stage], t: float) -> int | None:
    stage = stage_at(plan, t)
    return None if stage is None else stage.users


@pytest.mark.parametrize(("t", "users"), [(0, 4), (5.9, 4), (6, None), (100, None)])
def test_steady_holds_then_ends(t: float, users: int | None) -> None:
    assert users_at(steady(4, 2.0, 6.0), t) == users


@pytest.mark.parametrize(("t", "users"), [(0, 5), (9.9, 5), (10, 10), (25, 15), (29.9, 15), (30, None)])
def test_step_adds_users_each_step(t: float, users: int | None) -> None:
    assert users_at(step(5, 10.0, 3), t) == users


@pytest.mark.parametrize(("t", "users"), [(0, 5), (19, 5), (20, 50), (29, 50), (30, 5), (49, 5), (50, None)])
def test_spike_rises_and_falls_back(t: float, users: int | None) -> None:
    assert users_at(spike(5, 20.0, 50, 10.0), t) == users


def test_spike_arrives_within_a_second() -> None:
    base, peak, after = spike(5, 20.0, 50, 10.0)
    assert peak.spawn_rate >= peak.users - base.users
    assert after.spawn_rate >= peak.users - after.users


def test_steady_without_run_time_still_ends() -> None:
    opts = argparse.Namespace(scenario="steady", num_users=3, spawn_rate=None, run_time=None)
    assert plan_from_options(opts) == [Stage(DEFAULT_STEADY_SECONDS, 3, 1.0)]


def test_scenarios_do_not_import_locust() -> None:
    # Importing locust monkey-patches this whole pytest process with gevent.
    assert "locust" not in sys.modules
