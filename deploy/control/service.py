"""The control plane: one process that owns the pipeline runs and the local rollouts.

``ControlPlane`` is the service's core, with no transport: the HTTP and gRPC APIs
(``deploy.control.http_api``, ``deploy.control.grpc_api``) call it and render what it returns
(``deploy.control.views``).

* **Runs.** ``create_run`` validates the spec, the task and the policy (nothing starts for a bad
  one), saves the run's record and runs the pipeline (``deploy.pipeline.runner.Pipeline``) in a
  thread of this process; ``cancel_run`` stops it (its training is stopped, its rollout aborted);
  ``retry_run`` continues a failed, cancelled or interrupted run from the step that did not finish
  (``Pipeline.resume``). A run's training step killed by a signal is retried with backoff.
* **Rollouts.** One ticker thread ticks every active rollout in the home's store against the
  local model server (``kloop serve``; found again on every round, so a server started later is
  picked up), including the rollouts of the service's own runs, which follow them in the store.
  Users steer them: promote, abort, pause, resume (``deploy.controller.user_request``, with
  optimistic concurrency), and undo to an earlier version.
* **Restarts.** Everything is in the store (``<home>/kloop.db``) and the run directories. Killed
  (even by SIGKILL) and started again, the service resumes every run it owned that was left
  running (its records read as ``interrupted`` once its process is gone) and ticks every active
  rollout on from its stored step: a rollout's step is never applied twice (the tick adopts
  writes it finds already done), and a run publishes at most one version.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from deploy.control.series import SeriesStore
from deploy.controller import (
    RealClock,
    former_champions,
    tick,
    user_request,
)
from deploy.local.home import Home
from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.runs import RESUMABLE, Run, RunNotResumable, RunPage, RunStore
from deploy.local.server_backend import LocalBackend
from deploy.local.server_process import ServerHandle, discover
from deploy.pipeline.runner import Pipeline, importable
from deploy.ports import ActiveRolloutExists, Clock, Conflict, NotFound
from deploy.rollout import (
    KNOBS,
    Rollout,
    RolloutPolicy,
    champion_for,
    new_rollout,
    new_undo_rollout,
    request_abort,
    request_pause,
    request_promote,
    request_resume,
)
from kloop.artifact import ArtifactError
from kloop.faults import Fault
from trainer.spec import SpecError, TrainSpec
from trainer.task import model_name_for

log = logging.getLogger("kloop.control")

CONTROL_PARAM = "control"  # a run's params say the service created it (and resumes it)


class InvalidArgument(ValueError):
    """The request is malformed: a wrong type, an unknown field, a value out of range."""


class FailedPrecondition(Exception):
    """The resource's state refuses the operation (a finished run cancelled, a rollout that
    moved since the caller read it, a second active rollout)."""


class Missing(LookupError):
    """No run, rollout, model or version by that name."""


@dataclasses.dataclass
class _Live:
    """A run this process is executing. ``stop`` asks it to stop; ``cancelled`` says whether
    a user asked (then its rollout is aborted and it ends cancelled) or the service is
    stopping (it ends interrupted, and the next start resumes it)."""

    run_id: str
    thread: threading.Thread | None = None
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    cancelled: bool = False


class ControlPlane:
    def __init__(
        self,
        home: Home,
        *,
        clock: Clock | None = None,
        tick_interval_s: float = 1.0,
        server: Callable[[], ServerHandle | None] | None = None,
        train_attempts: int = 3,
        retry_backoff_s: float = 2.0,
        max_parallel_runs: int = 2,
    ):
        if not (tick_interval_s > 0 and math.isfinite(tick_interval_s)):
            raise ValueError(f"tick_interval_s must be > 0, got {tick_interval_s}")
        self.home = home
        self.registry = home.registry
        self.runs = RunStore(home.db)
        self.rollouts = SQLiteRolloutStore(home.db)
        self.series = SeriesStore(home.db)
        self.clock = clock or RealClock()
        self.tick_interval_s = tick_interval_s
        self._server = server or (lambda: discover(home.root))
        self.train_attempts = train_attempts
        self.retry_backoff_s = retry_backoff_s
        self._slots = threading.BoundedSemaphore(max_parallel_runs)
        self._live: dict[str, _Live] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._ticker: threading.Thread | None = None
        self.server_seen: str = ""  # what the last tick round found (for /healthz)
        self.ticks = 0  # rounds done (tests wait on it)

    # ---- life -----------------------------------------------------------------------------

    def start(self) -> list[str]:
        """Resume the runs this service left running, start ticking rollouts; the resumed ids."""
        resumed = self.recover()
        self._ticker = threading.Thread(target=self._tick_loop, name="kloop-rollout-ticker",
                                        daemon=True)
        self._ticker.start()
        return resumed

    @property
    def closing(self) -> bool:
        """The service is stopping: watches end, no new round of ticks starts."""
        return self._closing.is_set()

    def begin_close(self) -> None:
        self._closing.set()

    def close(self, timeout_s: float = 60.0) -> None:
        """Stop ticking and stop the live runs, which stay resumable (``interrupted``): the
        next start resumes them."""
        self._closing.set()
        with self._lock:
            live = dict(self._live)
        for entry in live.values():
            entry.stop.set()  # not a cancel: the runs end interrupted, resumed at the next start
        deadline = time.monotonic() + timeout_s
        for entry in live.values():
            if entry.thread is not None:
                entry.thread.join(max(0.0, deadline - time.monotonic()))
        if self._ticker is not None:
            self._ticker.join(max(0.0, deadline - time.monotonic()))

    def recover(self) -> list[str]:
        """Resume every run the service created that a dead service left running."""
        self.runs.reconcile()  # a dead owner's running runs read as interrupted from now on
        resumed = []
        after = None
        while True:
            page = self.runs.page(status="interrupted", limit=200, after=after)
            for run in page.runs:
                if run.params.get(CONTROL_PARAM) and run.id not in self._live:
                    try:
                        self._launch_resume(run.id)
                        resumed.append(run.id)
                    except Exception as e:  # noqa: BLE001 - one unreadable record must not stop the service
                        log.warning("not resuming run %s: %s", run.id, e)
            if page.next is None:
                return resumed
            after = page.next

    # ---- runs -----------------------------------------------------------------------------

    def create_run(self, spec: Mapping[str, Any], *, policy: Mapping[str, Any] | None = None,
                   label: str = "", inject_fault: float = 0.0,
                   pythonpath: Sequence[str] = ()) -> Run:
        """Validate, save the record, start the pipeline in a thread; the run as saved."""
        train_spec = _spec(spec)
        rollout_policy = _policy(policy)
        if not (isinstance(inject_fault, int | float) and not isinstance(inject_fault, bool)
                and 0.0 <= inject_fault <= 1.0):
            raise InvalidArgument(f"inject_fault must be a fraction in [0, 1], got {inject_fault!r}")
        if not isinstance(label, str):
            raise InvalidArgument(f"label must be a string, got {type(label).__name__}")
        paths = [str(Path(p).expanduser().resolve()) for p in _strings(pythonpath, "pythonpath")]
        _check_task(train_spec, paths)
        fault = Fault(error_rate=float(inject_fault)) if inject_fault else None
        pipe = self._pipeline(rollout_policy, paths)
        run = pipe.create(train_spec, fault=fault, label=label)
        self._launch(run.id, pipe, lambda: pipe.execute(run, train_spec, fault))
        return run

    def get_run(self, run_id: str) -> Run:
        try:
            return self.runs.get(run_id)
        except KeyError as e:
            raise Missing(e.args[0]) from None

    def list_runs(self, *, model: str | None = None, status: str | None = None,
                  since: float | None = None, until: float | None = None,
                  newest_first: bool = True, limit: int = 50,
                  after: tuple[float, str] | None = None) -> RunPage:
        try:
            return self.runs.page(model=model, status=status, since=since, until=until,
                                  newest_first=newest_first, limit=limit, after=after)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None

    def cancel_run(self, run_id: str) -> Run:
        run = self.get_run(run_id)
        with self._lock:
            entry = self._live.get(run.id)
        if entry is None:
            if run.status == "running":
                raise FailedPrecondition(f"run {run.id} is run by another process (pid "
                                         f"{run.pid}), not this service: stop it there")
            raise FailedPrecondition(f"run {run.id} is {run.status}, not running")
        entry.cancelled = True
        entry.stop.set()
        return run

    def retry_run(self, run_id: str) -> Run:
        run = self.get_run(run_id)
        if run.status not in RESUMABLE:
            raise FailedPrecondition(f"run {run.id} is {run.status}; only "
                                     f"{', '.join(RESUMABLE)} runs can be retried")
        self._launch_resume(run.id)
        return self.get_run(run.id)

    def wait_run(self, run_id: str, timeout_s: float | None = None) -> Run:
        """Block until this service's thread for the run ends (tests, the demo)."""
        with self._lock:
            entry = self._live.get(run_id)
        if entry is not None and entry.thread is not None:
            entry.thread.join(timeout_s)
        return self.get_run(run_id)

    def live_runs(self) -> list[str]:
        with self._lock:
            return sorted(self._live)

    def _pipeline(self, policy: RolloutPolicy, pythonpath: Sequence[str]) -> Pipeline:
        return Pipeline(self.home, server=None, find_server=self._server, policy=policy,
                        log=log.info, clock=self.clock, tick_interval_s=self.tick_interval_s,
                        progress=False, pythonpath=pythonpath, ticking=False,
                        train_attempts=self.train_attempts,
                        retry_backoff_s=self.retry_backoff_s, params={CONTROL_PARAM: True})

    def _launch_resume(self, run_id: str) -> None:
        saved = self.get_run(run_id)
        try:
            policy = RolloutPolicy.from_dict(saved.params["policy"])
        except (KeyError, TypeError, ValueError) as e:
            raise FailedPrecondition(f"run {saved.id}'s record holds no policy this version "
                                     f"reads: {e}") from None
        pipe = self._pipeline(policy, saved.params.get("pythonpath", ()))
        entry = self._reserve(saved.id)  # before the claim: no claimed run without a thread
        try:
            claimed = self.runs.claim(saved.id)  # of two retries at once, one wins
        except RunNotResumable as e:
            self._release(saved.id)
            raise FailedPrecondition(str(e)) from None
        if not claimed.params.get(CONTROL_PARAM):  # a standalone run this service now owns
            claimed.params[CONTROL_PARAM] = True
            self.runs.save(claimed)
        self._start_thread(entry, pipe, lambda: pipe.resume(claimed.id, claimed=claimed))

    def _launch(self, run_id: str, pipe: Pipeline, body: Callable[[], Run]) -> None:
        self._start_thread(self._reserve(run_id), pipe, body)

    def _reserve(self, run_id: str) -> _Live:
        with self._lock:
            if run_id in self._live:
                raise FailedPrecondition(f"run {run_id} is already running in this service")
            entry = self._live[run_id] = _Live(run_id)
        return entry

    def _release(self, run_id: str) -> None:
        with self._lock:
            self._live.pop(run_id, None)

    def _start_thread(self, entry: _Live, pipe: Pipeline, body: Callable[[], Run]) -> None:
        pipe.should_stop = entry.stop.is_set
        pipe.stop_is_cancel = lambda: entry.cancelled

        def main() -> None:
            try:
                with self._slots:
                    body()
            except Exception:  # the run records its own failure; keep the service
                log.exception("run %s", entry.run_id)
            finally:
                self._release(entry.run_id)

        entry.thread = threading.Thread(target=main, name=f"kloop-run-{entry.run_id}",
                                        daemon=True)
        entry.thread.start()

    # ---- rollouts -------------------------------------------------------------------------

    def create_rollout(self, model: str, candidate: str,
                       policy: Mapping[str, Any] | None = None) -> Rollout:
        """A rollout of ``candidate`` (a number, "latest" or an alias) against the champion,
        ticked by this service (as ``kloop rollout`` would in the foreground)."""
        if not isinstance(model, str) or not model:
            raise InvalidArgument("model must name a model")
        if not isinstance(candidate, str) or not candidate:
            raise InvalidArgument("candidate must be a version number, 'latest' or an alias")
        rollout_policy = _policy(policy)
        try:
            version = self.registry.resolve(model, candidate)
            alias = self.registry.alias(model, "champion")
        except ArtifactError as e:
            raise Missing(str(e)) from None
        except ValueError as e:  # a name the registry refuses, a version that cannot be
            raise InvalidArgument(str(e)) from None
        served: Mapping[Any, int] = {}
        server = self._server()
        if alias is None and server is not None:
            world = LocalBackend(server.admin()).read(model)
            if world.error is not None:
                raise FailedPrecondition(f"{model} has no champion alias and the server could "
                                         f"not tell what it serves ({world.error})")
            served = world.weights
        try:
            champion = champion_for(model, version, alias, served)
            if alias is None and champion is not None:
                self.registry.set_alias(model, "champion", champion)
            rid = f"{model}-v{version}-{time.strftime('%Y%m%d-%H%M%S')}"
            r = new_rollout(rid, model, version, champion, rollout_policy, self.clock.now())
        except ValueError as e:
            raise FailedPrecondition(str(e)) from None
        return self._create(r)

    def undo(self, model: str, to_version: int,
             policy: Mapping[str, Any] | None = None) -> Rollout:
        """Back to ``to_version`` in one call. A version that was champion before is promoted
        at once, without the gate or traffic steps; any other earlier version is rolled out
        as a candidate (gate, then the steps); ``policy`` as ``create_rollout`` takes it."""
        if not isinstance(model, str) or not model:
            raise InvalidArgument("model must name a model")
        if isinstance(to_version, bool) or not isinstance(to_version, int) or to_version < 1:
            raise InvalidArgument(f"to_version must be a version number >= 1, got {to_version!r}")
        try:
            known = self.registry.versions(model)
        except ValueError as e:
            raise InvalidArgument(str(e)) from None
        if to_version not in known:
            raise Missing(f"{model} has no version {to_version}")
        rollout_policy = _policy(policy)
        champion = self.registry.alias(model, "champion")
        if champion == to_version:
            raise FailedPrecondition(f"v{to_version} is already {model}'s champion")
        now = self.clock.now()
        rid = f"{model}-undo-v{to_version}-{time.strftime('%Y%m%d-%H%M%S')}"
        if to_version in former_champions(self.rollouts, model):
            r = new_undo_rollout(rid, model, to_version, champion, rollout_policy, now)
        else:
            r = new_rollout(rid, model, to_version, champion, rollout_policy, now)
        return self._create(r)

    def _create(self, r: Rollout) -> Rollout:
        try:
            return self.rollouts.create(r)
        except ActiveRolloutExists as e:
            raise FailedPrecondition(str(e)) from None
        except Conflict as e:
            raise FailedPrecondition(str(e)) from None

    def get_rollout(self, rollout_id: str) -> Rollout:
        try:
            return self.rollouts.get(rollout_id)
        except NotFound as e:
            raise Missing(str(e)) from None

    def rollout_op(self, rollout_id: str, op: str, *, reason: str = "",
                   resource_version: str = "") -> Rollout:
        """promote | abort | pause | resume; ``resource_version`` makes a moved rollout a
        conflict (``FailedPrecondition``) instead of applying to a state the caller never saw."""
        ops: dict[str, Callable[[Rollout, str, float], Rollout]] = {
            "promote": request_promote, "abort": request_abort, "pause": request_pause,
            "resume": request_resume,
        }
        if op not in ops:
            raise InvalidArgument(f"unknown operation {op!r}; one of {', '.join(ops)}")
        expected: int | None = None
        if resource_version:
            try:
                expected = int(resource_version)
            except ValueError:
                raise InvalidArgument(f"resource_version {resource_version!r} is not one this "
                                      "service wrote") from None
        self.get_rollout(rollout_id)  # NotFound first, as Missing
        why = reason or f"{op} requested through the control plane"
        try:
            return user_request(self.rollouts, rollout_id,
                                lambda r: ops[op](r, why, self.clock.now()), self.clock,
                                expected_generation=expected)
        except Conflict as e:
            raise FailedPrecondition(str(e)) from None
        except ValueError as e:
            raise FailedPrecondition(str(e)) from None

    # ---- the ticker -----------------------------------------------------------------------

    def _tick_loop(self) -> None:
        while not self._closing.is_set():
            try:
                self.tick_all()
            except Exception:  # a bad round must not stop the ticker
                log.exception("rollout tick round")
            self._closing.wait(self.tick_interval_s)

    def tick_all(self) -> None:
        """One round: every active rollout ticked once against the local server."""
        active = self.rollouts.all_active()
        server = self._server()
        self.server_seen = server.http_url if server is not None else ""
        if server is not None and active:
            backend = LocalBackend(server.admin())
            for r in active:
                try:
                    tick(self.rollouts, backend, self.registry, r.id, self.clock)
                except Conflict:
                    pass  # someone else saved it (a user's pause): the next round judges again
                except Exception:  # one rollout's failure must not stop the others
                    log.exception("tick of rollout %s", r.id)
                self._sample(backend, r)
        self.ticks += 1


    def _sample(self, backend: LocalBackend, r: Rollout) -> None:
        """A point of the rollout's traffic series (``deploy.control.series``)."""
        world = backend.read(r.model)
        if world.samples is None:
            return
        versions = {v for v in (r.candidate, r.champion) if v is not None}
        self.series.record(r.id, self.clock.now(),
                           {str(v): int(w) for v, w in world.weights.items()},
                           {str(v): s for v, s in world.samples.items() if v in versions})

    def rollout_series(self, rollout_id: str) -> list[dict[str, Any]]:
        self.get_rollout(rollout_id)
        return self.series.points(rollout_id)


def _spec(d: Mapping[str, Any]) -> TrainSpec:
    """A TrainSpec from the API's spec object: as ``TrainSpec.to_dict`` has it, except that
    ``code`` may be a directory (its digest is computed here) and ``model_name`` defaults to
    the task's name."""
    from trainer import code as code_dir

    if not isinstance(d, Mapping):
        raise InvalidArgument(f"spec must be an object, got {type(d).__name__}")
    d = dict(d)
    if "task" not in d:
        raise InvalidArgument("spec.task is required (a registered task name or module:Class)")
    if isinstance(d.get("code"), str):
        directory = Path(d["code"]).expanduser()
        if not directory.is_absolute() or not directory.is_dir():
            raise InvalidArgument(f"spec.code {d['code']!r}: not an absolute path to a directory")
        d["code"] = {"path": str(directory.resolve()), "sha256": code_dir.digest(directory)}
    if "model_name" not in d and isinstance(d["task"], str):
        d["model_name"] = model_name_for(d["task"])
    try:
        return TrainSpec.from_dict(d)
    except (SpecError, TypeError, ValueError) as e:
        raise InvalidArgument(f"spec: {e}") from None


def _policy(d: Mapping[str, Any] | None) -> RolloutPolicy:
    if d is None:
        return RolloutPolicy()
    if not isinstance(d, Mapping):
        raise InvalidArgument(f"policy must be an object, got {type(d).__name__}")
    for key, value in d.items():
        _check_policy_type(key, value)
    try:
        return RolloutPolicy.from_dict(d)
    except (TypeError, ValueError, KeyError) as e:
        raise InvalidArgument(f"policy: {e}") from None


_POLICY_INT = {"min_requests", "failure_limit", "error_limit"}
_POLICY_TEXT = {"gate_metric"}
_POLICY_LIST = {"steps", "gate_conditions"}


def _check_policy_type(key: str, value: object) -> None:
    """A JSON value of the wrong type is refused, never coerced: whole numbers where the
    setting counts, numbers where it measures, lists where it lists."""
    def bad(want: str) -> InvalidArgument:
        return InvalidArgument(f"policy.{key} must be {want}, got {json.dumps(value)}")

    knob = next((k for k in KNOBS if key == k.name or key in k.aliases), None)
    if knob is None:
        return  # RolloutPolicy.from_dict names the unknown fields
    key = knob.name
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if key in _POLICY_INT:
        if not (number and isinstance(value, int)):
            raise bad("a whole number")
    elif key in _POLICY_LIST:
        if not isinstance(value, list):
            raise bad("a list")
        if key == "steps" and not all(isinstance(x, int) and not isinstance(x, bool)
                                      for x in value):
            raise bad("a list of whole percents")
    elif key in _POLICY_TEXT:
        if value is not None and not isinstance(value, str):
            raise bad("a metric name or null")
    elif value is not None and not number:
        raise bad("a number")


def _strings(v: object, what: str) -> list[str]:
    if not isinstance(v, list | tuple) or not all(isinstance(x, str) for x in v):
        raise InvalidArgument(f"{what} must be a list of strings")
    return list(v)


def _check_task(spec: TrainSpec, pythonpath: Sequence[str]) -> None:
    """The task resolved and checked here, before any process starts (``trainer.task_check``)."""
    from trainer.task import TaskError
    from trainer.task_check import resolve

    paths = ([spec.code.path] if spec.code is not None else []) + list(pythonpath)
    try:
        with importable(paths):
            resolve(spec.task, spec.config)
    except TaskError as e:
        raise InvalidArgument(str(e)) from None

