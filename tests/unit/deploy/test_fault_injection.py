"""The rollout's end states under faults: a property-based suite over fault sequences.

The real state machine and controller (``deploy.rollout``, ``deploy.controller.tick``), the real
SQLite store and registry on disk and the real local backend, against a fake server with the
real server's rules (``tests.support.fault_world``), ticked one by one on a fake clock. Every
tick reopens the store and the backend, as a restarted controller would. Hypothesis draws the
set-up (first version or not, champion alias or adopted, good / failing / gate-failing
candidate) and a sequence of faults, one per tick:

    down            the server is unreachable for this tick (a run of them: an outage)
    restart         the server restarts: versions and weights lost, the champion alias
                    loaded again, counters from zero
    refuse          the server refuses every write this tick (403 management disabled)
    corrupt         a byte of the candidate's model file flips (from then on)
    conflict        another writer saves the rollout during this tick
    crash           the controller dies after its writes, before saving
    second_server   a second server tries to start on the same home (the lock must refuse it)
    quiet           no traffic this tick

then, optionally, the server goes away for good. For every draw:

* the rollout reaches a terminal phase within its bound (computed from the policy, plus one
  tick for each tick a fault took from the controller);
* whenever the server answers, the model's weights sum to 100, name only versions that served
  before the rollout or the candidate, and are never empty once the model served;
* the endings keep their promises: Succeeded moved the alias to the candidate (and was not
  corrupted before its promotion, and was not failing); RolledBack, Aborted and
  NeedsAttention never moved the alias; RolledBack and Aborted restored the champion at 100 %
  (without a champion, the candidate stays where it served); a terminal rollout stays
  terminal and the world stays put.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deploy.controller import tick
from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.server_backend import LocalBackend
from deploy.local.server_process import HomeBusy, HomeLock
from deploy.ports import Conflict
from deploy.rollout import (
    AnalysisPolicy,
    Phase,
    Rollout,
    RolloutPolicy,
    champion_for,
    new_rollout,
)
from kloop.artifact import Registry
from tests.support.fakes import AdminError, FakeClock, publish
from tests.support.fault_world import FakeServer, corrupt

MODEL = "digits"
INTERVAL_S = 5.0
REQUESTS_PER_TICK = 60
POLICY = RolloutPolicy(
    steps=(10, 50, 100), step_timeout_s=60, failure_limit=2, error_limit=3,
    outage_tolerance_s=15, retire_after_s=10, ready_timeout_s=30,
    analysis=AnalysisPolicy(min_requests=20, min_duration_s=10, max_p99_ratio=2),
)
FAULTS = ("none", "down", "restart", "refuse", "corrupt", "conflict", "crash", "second_server",
          "quiet")
CONTROLLER_FAULTS = ("conflict", "crash")  # ticks in which the controller makes no progress


def bound_s(p: RolloutPolicy) -> float:
    """The longest a rollout may take in a world that lets the controller run: each phase's
    own bound, an outage bound for each phase that can end in one, a few ticks of slack."""
    outage = p.outage_tolerance_s + p.error_limit * INTERVAL_S
    return (p.ready_timeout_s + len(p.steps) * p.step_timeout_s + p.retire_after_s
            + 4 * outage + 12 * INTERVAL_S)


class Crash(Exception):
    """The controller process died (between its writes and its save)."""


class CrashingStore(SQLiteRolloutStore):
    def save(self, rollout: Rollout, expected_generation: int | str) -> Rollout:
        raise Crash


class RacingStore(SQLiteRolloutStore):
    """Another writer saves the rollout between this tick's read and its save."""

    def get(self, rollout_id: str) -> Rollout:
        r = super().get(rollout_id)
        SQLiteRolloutStore(self.path).save(r, expected_generation=r.generation)
        return r


@dataclasses.dataclass(frozen=True)
class Setup:
    first_version: str  # "no" (a champion exists) | "served" | "unserved"
    alias: bool  # the champion alias is set (else the served version is adopted)
    candidate: str  # "good" | "failing" (30 % errors live) | "gate" (fails the gate)


setups = st.builds(
    Setup,
    first_version=st.sampled_from(("no", "no", "served", "unserved")),
    alias=st.booleans(),
    candidate=st.sampled_from(("good", "good", "failing", "gate")),
)
fault_runs = st.lists(
    st.tuples(st.sampled_from(FAULTS), st.integers(min_value=1, max_value=8)), max_size=8
).map(lambda runs: [f for f, n in runs for _ in range(n)])


class World:
    """The home, the registry, the server and the clock of one draw."""

    def __init__(self, root: Path, setup: Setup):
        self.home = root / "home"
        self.registry = Registry(self.home / "registry")
        self.db = self.home / "kloop.db"
        self.clock = FakeClock(start=0.0)
        self.setup = setup
        if setup.first_version == "no":
            champion = publish(self.registry, root, MODEL, 0.95)
            if setup.alias:
                self.registry.set_alias(MODEL, "champion", champion)
        if setup.first_version in ("no", "unserved"):  # started before the candidate exists
            self.server = FakeServer(self.registry)
        accuracy = 0.10 if setup.candidate == "gate" else 0.95
        self.candidate = publish(self.registry, root, MODEL, accuracy)
        if setup.first_version == "served":  # started after: it serves the candidate
            self.server = FakeServer(self.registry)
        if setup.candidate == "failing":
            self.server.error_rate[self.candidate] = 0.3
        self.lock = HomeLock.acquire(self.home)  # this server's hold on the home
        self.served_before = self.server.served(MODEL)
        alias = self.registry.alias(MODEL, "champion")
        self.champion = champion_for(MODEL, self.candidate, alias, self.served_before)
        if alias is None and self.champion is not None:  # as `kloop rollout` adopts it
            self.registry.set_alias(MODEL, "champion", self.champion)
        self.alias_before = self.registry.alias(MODEL, "champion")
        SQLiteRolloutStore(self.db).create(new_rollout(
            "r1", MODEL, self.candidate, self.champion, POLICY, self.clock.now()))
        self.corrupted_at: float | None = None
        self.gone = False  # the server went away for good

    def backend(self) -> LocalBackend:
        return LocalBackend(self.server, now=self.clock.now, admin_errors=(AdminError, OSError))

    def step(self, fault: str) -> None:
        """One tick of the world and the controller, with ``fault`` in force for it."""
        s = self.server
        s.down = fault == "down" or self.gone
        s.refusing = 403 if fault == "refuse" else None
        if fault == "restart" and not s.down:
            s.restart()
        if fault == "corrupt" and self.corrupted_at is None:
            corrupt(self.registry, MODEL, self.candidate)
            self.corrupted_at = self.clock.now()
        if fault == "second_server":
            with pytest.raises(HomeBusy):
                HomeLock.acquire(self.home)
        if not s.down and fault != "quiet":
            s.drive(MODEL, REQUESTS_PER_TICK)
        self.clock.advance(INTERVAL_S)
        store = {"conflict": RacingStore, "crash": CrashingStore}.get(fault, SQLiteRolloutStore)
        try:
            tick(store(self.db), self.backend(), self.registry, "r1", self.clock)
        except (Conflict, Crash):
            pass
        s.refusing = None
        if not s.down:
            self.check_served()

    def rollout(self) -> Rollout:
        return SQLiteRolloutStore(self.db).get("r1")

    def check_served(self) -> None:
        w = self.server.served(MODEL)
        allowed = set(self.served_before) | {self.candidate}
        if w:
            assert sum(w.values()) == 100, w
        assert set(w) <= allowed, f"serving {w}, allowed {allowed}"
        if self.served_before and not self.corrupted_and_restarted():
            assert w, "the model went offline"

    def corrupted_and_restarted(self) -> bool:
        """A corrupted candidate that was promoted cannot be loaded by a restarted server, and
        a first version has nothing older to fall back to: the one case where a restart may
        find nothing to serve (the server reports it; tests/component/serving)."""
        return self.corrupted_at is not None and self.champion is None


def check_ending(w: World, r: Rollout) -> None:
    served = w.server.served(MODEL)
    alias = w.registry.alias(MODEL, "champion")
    promoted_at = next((e.at for e in r.history if e.kind_name == "promote"), None)
    if r.phase is Phase.SUCCEEDED:
        assert alias == w.candidate
        assert w.setup.candidate == "good", r.reason
        assert w.corrupted_at is None or (promoted_at is not None
                                          and w.corrupted_at >= promoted_at), r.reason
        if not w.server.down and w.corrupted_at is None:
            assert served == {w.candidate: 100}
    else:
        assert alias == w.alias_before, f"{r.phase.value} moved the alias: {r.reason}"
    if r.phase in (Phase.ROLLED_BACK, Phase.ABORTED) and not w.server.down:
        if w.champion is not None:
            assert served == {w.champion: 100}, r.reason
            assert w.candidate not in w.server.loaded.get(MODEL, set())
        else:
            assert set(served) <= {w.candidate}
    if r.phase is Phase.NEEDS_ATTENTION:
        assert r.reason


def run(tmp_path: Path, setup: Setup, faults: list[str], gone_for_good: bool) -> World:
    w = World(tmp_path, setup)
    ticks = 0
    lost = 0  # ticks in which the controller could not progress (its own faults)
    for fault in faults:
        w.step(fault)
        ticks += 1
        lost += fault in CONTROLLER_FAULTS
        if w.rollout().phase.terminal:
            break
    w.gone = gone_for_good
    limit = bound_s(POLICY) / INTERVAL_S + lost
    while not w.rollout().phase.terminal:
        assert ticks <= limit, (f"not terminal after {ticks} ticks ({ticks * INTERVAL_S:g}s, "
                                f"bound {limit:g}): {w.rollout().phase.value}, "
                                f"{[e.message for e in w.rollout().history[-3:]]}")
        w.step("none")
        ticks += 1
    assert ticks <= limit
    final = w.rollout()
    check_ending(w, final)
    for _ in range(3):  # a terminal rollout stays put, and so does the world
        before = w.server.served(MODEL)
        w.step("none")
        assert w.rollout() == final
        assert w.server.served(MODEL) == before
    return w


@settings(max_examples=150, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(setup=setups, faults=fault_runs, gone=st.booleans())
def test_every_rollout_ends_and_no_ending_takes_the_model_offline(
        tmp_path_factory: pytest.TempPathFactory, setup: Setup, faults: list[str],
        gone: bool) -> None:
    run(tmp_path_factory.mktemp("draw"), setup, faults, gone)


@pytest.mark.parametrize("first_version", ["no", "served", "unserved"])
@pytest.mark.parametrize("alias", [True, False])
def test_without_faults_a_good_candidate_is_promoted(tmp_path: Path, first_version: str,
                                                     alias: bool) -> None:
    w = run(tmp_path, Setup(first_version, alias, "good"), [], False)
    r = w.rollout()
    assert r.phase is Phase.SUCCEEDED, r.reason
    assert w.server.served(MODEL) == {w.candidate: 100}


@pytest.mark.parametrize("candidate, phase", [("failing", Phase.ROLLED_BACK),
                                              ("gate", Phase.ROLLED_BACK)])
def test_without_faults_a_bad_candidate_is_rolled_back(tmp_path: Path, candidate: str,
                                                       phase: Phase) -> None:
    w = run(tmp_path, Setup("no", True, candidate), [], False)
    assert w.rollout().phase is phase
    assert w.server.served(MODEL) == {w.champion: 100}


@pytest.mark.parametrize("fault, phase, says", [
    ("corrupt", Phase.ROLLED_BACK, "does not match"),
    ("refuse", Phase.ABORTED, "403"),
])
def test_a_candidate_that_cannot_load_ends_the_rollout_at_once(tmp_path: Path, fault: str,
                                                               phase: Phase, says: str) -> None:
    w = World(tmp_path, Setup("no", True, "good"))
    w.step(fault)  # the gate's tick: it loads the candidate
    r = w.rollout()
    assert r.phase is Phase.ROLLING_BACK and says in r.reason, r.reason
    w.step("none")
    r = w.rollout()
    assert r.phase is phase and says in r.reason, r.reason
    assert w.server.served(MODEL) == {w.champion: 100}


def test_a_server_gone_for_good_ends_needs_attention_within_the_bound(tmp_path: Path) -> None:
    w = World(tmp_path, Setup("no", True, "good"))
    for _ in range(3):
        w.step("none")
    assert w.rollout().phase is Phase.PROGRESSING
    w.gone = True
    started = w.clock.now()
    while not w.rollout().phase.terminal:
        w.step("none")
    r = w.rollout()
    assert r.phase is Phase.NEEDS_ATTENTION and "could not restore the champion" in r.reason
    assert w.clock.now() - started <= 2 * (POLICY.outage_tolerance_s
                                           + POLICY.error_limit * INTERVAL_S) + 2 * INTERVAL_S
    assert w.registry.alias(MODEL, "champion") == w.champion  # a restart serves the champion
    w.gone = False
    w.server.restart()
    assert w.server.served(MODEL) == {w.champion: 100}


def test_corrupted_during_the_canary_is_not_promoted(tmp_path: Path) -> None:
    w = World(tmp_path, Setup("no", True, "good"))
    while w.rollout().step < 2:  # the last step: the next good analysis promotes
        w.step("none")
    w.step("corrupt")
    while not w.rollout().phase.terminal:
        w.step("none")
    r = w.rollout()
    assert r.phase is Phase.ROLLED_BACK and "no longer verify" in r.reason, r.reason
    assert r.reason.startswith(f"v{w.candidate} not promoted"), r.reason
    assert w.registry.alias(MODEL, "champion") == w.champion
    w.server.restart()
    assert w.server.served(MODEL) == {w.champion: 100}

