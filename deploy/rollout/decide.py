"""Choosing the next action: the pure ``decide``.

One tick is: the controller reads the world, ``decide`` picks ONE ``Decision`` from the
rollout and the world, the controller applies it with idempotent writes, and
``deploy.rollout.transition`` computes the new rollout from the decision and whether the write
succeeded. Nothing here does I/O or reads a clock: ``now`` is passed in.

Readiness: a candidate that passed the gate is loaded at once (the gate's write, or PREPARE),
but it takes traffic only once the backend reports it READY (``World.loaded``); locally that
is the next tick, on KServe whenever the InferenceService says so. Until then the rollout
WAITs in Gating, and gives up (blaming the candidate) when the backend reports it failed or
``ready_timeout_s`` passes.

The user's requests (``deploy.rollout.state``'s docstring): a promotion request, or an undo
rollout, takes a ready candidate straight to PROMOTE, from Gating without any traffic step. A
paused rollout WAITs where it would have advanced, and no deadline (step or readiness) runs
out while it is paused; its analysis still runs, each passed window starting a fresh one, so a
canary that turns bad during a long pause is judged on recent traffic, fails, and rolls back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from deploy.rollout.analysis import Analysis, Verdict, analyse
from deploy.rollout.policy import RolloutPolicy
from deploy.rollout.state import WRITE_FAILED, Action, Phase, Rollout
from deploy.rollout.world import World, normalized
from kloop.model_version import Version


def next_weight(steps: Sequence[int], current: int) -> int | None:
    """The candidate's next traffic percent after ``current``; ``None`` when at the last step.

    ``current`` need not be a step (traffic set by hand): the next step is the first above it.
    """
    for s in steps:
        if s > current:
            return s
    return None


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    weights: Mapping[Version, int] | None = None  # SET_WEIGHTS
    step: int | None = None  # SET_WEIGHTS: the step index those weights belong to
    verdict: Verdict | None = None
    analysis: Analysis | None = None
    rebaseline: bool = False  # WAIT: start a fresh analysis window from this world


def step_weights(r: Rollout, step: int) -> dict[Version, int]:
    w = r.steps[step]
    out = {r.candidate: w}
    if r.champion is not None:
        out[r.champion] = 100 - w
    return out


def decide(r: Rollout, world: World, policy: RolloutPolicy, now: float) -> Decision:
    """The one thing to do next. Pure: same rollout, world and time give the same decision."""
    if r.phase.terminal:
        return Decision(Action.NOTHING, f"rollout is {r.phase.value}")
    if r.phase is Phase.ROLLING_BACK:
        if r.errors and outage_over(r, policy, now):
            return Decision(Action.GIVE_UP, f"could not restore the champion: {_streak(r, now)}",
                            verdict=Verdict.ERROR)
        action = Action.ABORT if r.outcome is Phase.ABORTED else Action.ROLLBACK
        return Decision(action, f"restoring the champion: {r.reason}")
    if r.errors and _last_write_failed(r) and outage_over(r, policy, now):
        if r.phase is Phase.PROMOTING and r.promoted_at is not None:
            return Decision(Action.GIVE_UP, f"promoted v{r.candidate}; v{r.champion} stays loaded "
                                            f"at weight 0, retiring it failed: {_streak(r, now)}",
                            verdict=Verdict.ERROR)
        return Decision(Action.ABORT, f"could not act: {_streak(r, now)}", verdict=Verdict.ERROR)
    if r.phase is Phase.PENDING:
        return Decision(Action.RUN_GATE, "compare candidate and champion offline")
    if r.phase is Phase.GATING:
        return _after_gate(r, world, policy, now)
    if r.phase is Phase.PROMOTING:
        return _promoting(r, policy, now)
    return _progressing(r, world, policy, now)


def outage_over(r: Rollout, policy: RolloutPolicy, now: float, extra: int = 0) -> bool:
    """Has the rollout's streak of errors (plus ``extra`` this tick) reached the outage bound:
    at least ``error_limit`` errors, lasting at least ``outage_tolerance_s`` seconds?"""
    n = r.errors + extra
    since = r.errors_since if r.errors and r.errors_since is not None else now
    return n >= policy.error_limit and now - since >= policy.outage_tolerance_s


def _streak(r: Rollout, now: float) -> str:
    since = r.errors_since if r.errors_since is not None else now
    last = r.history[-1].message if r.history else "?"
    return f"{r.errors} errors in a row over {now - since:.1f}s; last: {last}"


def _last_write_failed(r: Rollout) -> bool:
    return bool(r.history) and r.history[-1].kind == WRITE_FAILED


def _after_gate(r: Rollout, world: World, policy: RolloutPolicy, now: float) -> Decision:
    """Gate result (stored by RUN_GATE) -> first traffic, rollback or abort."""
    g = r.gate
    if g is None:
        return Decision(Action.RUN_GATE, "gate result missing; running it again")
    msg = "; ".join(g.reasons)
    if g.verdict is Verdict.ERROR:
        return Decision(Action.ABORT, f"gate could not compare: {msg}", verdict=g.verdict)
    if g.verdict is Verdict.FAILED:
        return Decision(Action.ROLLBACK, f"gate failed before any traffic: {msg}", verdict=g.verdict)
    if world.error is not None or world.samples is None:
        return _could_not_measure(r, policy, now, f"cannot read the world: {world.error}")
    if r.candidate not in world.loaded:
        return _awaiting_ready(r, world, policy, now)
    if r.paused:
        return Decision(Action.WAIT, f"paused: gate passed ({msg}); v{r.candidate} ready; "
                                     "no traffic until resumed", verdict=g.verdict)
    if r.undo:
        return Decision(Action.PROMOTE, f"undo: v{r.candidate} ready; straight to 100% "
                                        "(it was champion before)", verdict=g.verdict)
    if r.promote_requested:
        return Decision(Action.PROMOTE, f"promotion requested: gate passed ({msg}); "
                                        f"v{r.candidate} ready; skipping the traffic steps",
                        verdict=g.verdict)
    return Decision(Action.SET_WEIGHTS, f"gate passed ({msg}); v{r.candidate} ready; "
                                        "first step",
                    weights=step_weights(r, 0), step=0, verdict=g.verdict)


def _awaiting_ready(r: Rollout, world: World, policy: RolloutPolicy, now: float) -> Decision:
    """The gate passed but the candidate is not ready: load it, wait, or give up."""
    v = r.candidate
    if v in world.failed:
        return Decision(Action.ROLLBACK, f"candidate never became ready: v{v} failed to load: "
                                         f"{world.failed[v]}", verdict=Verdict.FAILED)
    if r.preparing_since is None:
        return Decision(Action.PREPARE, f"loading v{v} before it takes traffic")
    waited = now - r.preparing_since
    if waited >= policy.ready_timeout_s and not r.paused:
        return Decision(Action.ROLLBACK, f"candidate never became ready: v{v} not ready "
                                         f"{waited:g}s after it was deployed (ready_timeout_s "
                                         f"{policy.ready_timeout_s:g})", verdict=Verdict.FAILED)
    # PREPARE again (idempotent) rather than only wait: a server that restarted meanwhile has
    # forgotten the load, and would otherwise make a good candidate time out.
    deadline = "paused: no deadline" if r.paused else f"{waited:g}s of {policy.ready_timeout_s:g}s"
    return Decision(Action.PREPARE, f"waiting for v{v} to become ready ({deadline})")


def _promoting(r: Rollout, policy: RolloutPolicy, now: float) -> Decision:
    if r.promoted_at is None:
        return Decision(Action.PROMOTE, f"retrying promotion: {r.reason}")
    if r.champion is None:
        return Decision(Action.RETIRE, f"promoted v{r.candidate}, the model's first champion")
    if now - r.promoted_at >= policy.retire_after_s:
        return Decision(Action.RETIRE, f"promoted v{r.candidate}; retiring v{r.champion}")
    return Decision(Action.WAIT, f"keeping v{r.champion} loaded at weight 0 for a fast rollback "
                                 f"({policy.retire_after_s:g}s after promotion)")


def _progressing(r: Rollout, world: World, policy: RolloutPolicy, now: float) -> Decision:
    where = f"step {r.step + 1}/{len(r.steps)} ({r.steps[r.step]}%)"
    if r.promote_requested and world.error is None and r.candidate in world.loaded:
        return Decision(Action.PROMOTE, f"promotion requested at {where}: skipping the "
                                        "remaining steps")
    if world.error is not None or world.samples is None:
        return _could_not_measure(r, policy, now, f"cannot read the world: {world.error}")
    actual, expected = normalized(world.weights), normalized(r.weights)
    if actual != expected:
        return _reconcile_weights(r, actual)
    samples, base = world.samples, r.baseline
    a = analyse(
        samples.get(r.candidate), base.get(r.candidate),
        samples.get(r.champion) if r.champion is not None else None,
        base.get(r.champion) if r.champion is not None else None,
        policy.analysis, _elapsed(r.window_started_at, now), r.champion_reference,
    )
    if a.verdict is Verdict.SUCCESSFUL and r.paused:
        return Decision(Action.WAIT, f"paused at {where}; passed, judging a fresh window: "
                                     f"{a.message}", verdict=a.verdict, analysis=a,
                        rebaseline=True)
    if a.verdict is Verdict.SUCCESSFUL:
        if r.step + 1 >= len(r.steps):
            return Decision(Action.PROMOTE, f"{where} passed: {a.message}",
                            verdict=a.verdict, analysis=a)
        return Decision(Action.SET_WEIGHTS, f"{where} passed: {a.message}",
                        weights=step_weights(r, r.step + 1), step=r.step + 1,
                        verdict=a.verdict, analysis=a)
    if a.verdict is Verdict.FAILED:
        n = r.failed + 1
        if n >= policy.failure_limit:
            return Decision(Action.ROLLBACK, f"{where} failed ({n}/{policy.failure_limit}): "
                                             f"{a.message}", verdict=a.verdict, analysis=a)
        return Decision(Action.WAIT, f"{where} failed ({n}/{policy.failure_limit}), new window: "
                                     f"{a.message}", verdict=a.verdict, analysis=a, rebaseline=True)
    if a.verdict is Verdict.ERROR:
        d = _could_not_measure(r, policy, now, f"{where}: {a.message}")
        return dataclasses.replace(d, analysis=a, rebaseline=a.counter_reset)
    if _timed_out(r, policy, now):
        return Decision(Action.ABORT, f"{where} timed out after {policy.step_timeout_s:g} s "
                                      f"without a conclusive analysis: {a.message}",
                        verdict=a.verdict, analysis=a)
    return Decision(Action.WAIT, f"{where}: {a.message}", verdict=a.verdict, analysis=a)


def _could_not_measure(r: Rollout, policy: RolloutPolicy, now: float, why: str) -> Decision:
    n = r.errors + 1
    if outage_over(r, policy, now, extra=1):
        since = r.errors_since if r.errors and r.errors_since is not None else now
        return Decision(Action.ABORT, f"could not measure {n} times in a row over "
                                      f"{now - since:.1f}s: {why}", verdict=Verdict.ERROR)
    if _timed_out(r, policy, now):
        return Decision(Action.ABORT, f"step timed out; last: {why}", verdict=Verdict.ERROR)
    return Decision(Action.WAIT, f"could not measure ({n}/{policy.error_limit}): {why}",
                    verdict=Verdict.ERROR)


def _elapsed(since: float | None, now: float) -> float:
    return 0.0 if since is None else now - since


def _timed_out(r: Rollout, policy: RolloutPolicy, now: float) -> bool:
    """A paused step never times out (a resume restarts its timer)."""
    if r.paused or r.step_started_at is None:
        return False
    return now - r.step_started_at >= policy.step_timeout_s


def _reconcile_weights(r: Rollout, actual: Mapping[Version, int]) -> Decision:
    """The world's weights differ from the status'. If they are the next step's, a previous
    tick wrote them and died before saving: adopt that step (never step twice). Anything else
    is drift (a restarted server, a manual change): restore the step's weights."""
    nxt = r.step + 1
    if nxt < len(r.steps) and actual == normalized(step_weights(r, nxt)):
        return Decision(Action.SET_WEIGHTS, f"weights {actual} already at step {nxt + 1}; adopting",
                        weights=step_weights(r, nxt), step=nxt)
    return Decision(Action.SET_WEIGHTS, f"traffic drifted to {actual}; restoring {dict(r.weights)}",
                    weights=dict(r.weights), step=r.step)
