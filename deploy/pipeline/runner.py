"""The train-and-promote pipeline: train → evaluate → publish → gate → canary → decide.

Each step's status, timings, message and metrics are written to the run record
(``deploy.local.runs``)
as they change, so ``kloop runs`` in another terminal shows a live run and history survives.

Where the steps come from:

* train: ``trainer.launch.run_local`` (real torchrun, DDP); its progress events are shown live.
* evaluate: the exported program is loaded back *in this process* and measured with the task's
  own metrics on the task's held-out split (``trainer.task_check.load``, ``metric_sums``); every
  metric must reproduce what the training run measured, on the same split (its fingerprint),
  or the run fails. What is published is what was measured. The step says the primary metric
  and its direction ("rmse 55.4 (lower is better) on 111 held-out items").

The task's module is imported in the training workers and here: from the spec's code directory
(``spec.code``), else from ``pythonpath`` (the CLI passes ``--code`` or the current directory),
which the run keeps in its record so that a resume in another directory finds it again.
* publish: ``trainer.publish`` (immutable, checksummed version in the registry).
* gate + canary: one rollout (``deploy.rollout``) ticked by ``deploy.controller`` against the
  running server. The rollout runs the evaluation gate first, then the traffic steps with live
  analysis, then promotes or rolls back. Without a server, only the gate runs here; the first
  version of a model that passes it becomes the champion directly (nothing to compare with).

A run that stopped (its process killed: the next reader of runs marks it ``interrupted``; or a
step failed) continues with ``Pipeline.resume``, under the same id and record: train resumes
from the run's last checkpoint (or is kept, if it had finished), evaluate reruns, publish keeps
the version the run already published, and the run's rollout is ticked on if still active, or
its outcome recorded if it ended meanwhile (``kloop rollout`` resumed it, someone aborted it).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
import signal
import site
import sys
import sysconfig
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from deploy.controller import RealClock, run_until_done, user_request
from deploy.local.home import Home
from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.runs import (
    Run,
    RunStore,
    Step,
    gate_passed,
    outcome_status,
    record_rollout,
)
from deploy.local.server_backend import LocalBackend
from deploy.local.server_process import ServerHandle
from deploy.pipeline.report import metric_text
from deploy.ports import Clock, NotFound
from deploy.rollout import (
    Event,
    Rollout,
    RolloutPolicy,
    Verdict,
    champion_for,
    gate,
    new_rollout,
    request_abort,
)
from kloop.artifact import ArtifactError, Manifest
from kloop.faults import Fault
from kloop.model_version import Version
from kloop.modelfile import load_exported
from trainer.data import fingerprint, length
from trainer.evaluate import finalize, metric_sums
from trainer.launch import TrainingFailed, TrainingStopped, TrainResult, load_result, run_local
from trainer.publish import publish
from trainer.spec import TrainSpec
from trainer.task_check import load

# What training measured on the exported program, measured again here: only the order of
# float sums may differ (relative, as trainer.loop checks the export against the eager model).
_EVAL_TOLERANCE = 1e-4


class PipelineError(RuntimeError):
    """A step could not do its work (not: the candidate was judged worse)."""


class Pipeline:
    def __init__(
        self,
        home: Home,
        *,
        server: ServerHandle | None,
        policy: RolloutPolicy,
        log: Callable[[str], None] = print,
        clock: Clock | None = None,
        tick_interval_s: float = 1.0,
        progress: bool = True,
        pythonpath: Sequence[str] = (),
        ticking: bool = True,
        should_stop: Callable[[], bool] = lambda: False,
        stop_is_cancel: Callable[[], bool] = lambda: True,
        find_server: Callable[[], ServerHandle | None] | None = None,
        train_attempts: int = 3,
        retry_backoff_s: float = 2.0,
        params: Mapping[str, Any] | None = None,
    ):
        self.home = home
        self.registry = home.registry
        self.runs = RunStore(home.db)
        self.rollouts = SQLiteRolloutStore(home.db)
        self.server = server
        self.policy = policy
        self._log = log
        self.clock = clock or RealClock()
        self.tick_interval_s = tick_interval_s
        self.progress = progress
        self.pythonpath = tuple(pythonpath)
        # False when someone else ticks the rollouts (the control plane's ticker): the run then
        # follows its rollout in the store, and pause/promote/abort from others take effect.
        self.ticking = ticking
        # Polled between steps, while training and while following the rollout. A stop is a
        # user's cancel (``stop_is_cancel``: the run's rollout is aborted, the run ends
        # cancelled) or the process shutting down (the rollout is left as it is, the run ends
        # interrupted: whoever resumes it follows the same rollout on).
        self.should_stop = should_stop
        self.stop_is_cancel = stop_is_cancel
        # Where the model server is, asked again when the rollout starts (a server started
        # during a long training is used); without it, ``server`` as given.
        self.find_server = find_server
        if train_attempts < 1:
            raise ValueError(f"train_attempts must be >= 1, got {train_attempts}")
        self.train_attempts = train_attempts  # a train step killed by a signal is retried
        self.retry_backoff_s = retry_backoff_s  # doubled after each failed attempt
        self.extra_params = dict(params or {})  # kept in the run's params (who created it)

    def run(self, spec: TrainSpec, *, fault: Fault | None = None, label: str = "") -> Run:
        """Run every step; returns the finished record (status ``failed`` on a step error)."""
        return self.execute(self.create(spec, fault=fault, label=label), spec, fault)

    def create(self, spec: TrainSpec, *, fault: Fault | None = None, label: str = "") -> Run:
        """The run's record, saved (status running, every step pending): its id is known
        before any step starts; ``execute`` runs it."""
        for stale in self.runs.reconcile():  # runs whose process died are marked first
            if stale.status == "interrupted":
                self._log(f"run {stale.id} was interrupted ({stale.outcome}); continue it with "
                          f"`kloop pipeline resume {stale.id}`")
        params = {"spec": spec.to_dict(), "policy": self.policy.to_dict(),
                  "fault": fault.to_dict() if fault else None, "label": label,
                  "pythonpath": list(self.pythonpath), **self.extra_params}
        run = Run.new(spec.model_name, params, self.home.runs_dir)
        Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        self.runs.save(run)
        self.log(run, f"run {run.id} started{f' ({label})' if label else ''}: model {spec.model_name}")
        return run

    def execute(self, run: Run, spec: TrainSpec, fault: Fault | None = None) -> Run:
        """Run the steps of a run ``create`` made (in this process)."""
        return self._execute(run, spec, fault, resumed=False)

    def resume(self, run_id: str, *, claimed: Run | None = None) -> Run:
        """Continue a stopped run (``interrupted`` or ``failed``) from its last finished step,
        in this process; ``deploy.local.runs.RunNotResumable`` for a succeeded or live run.
        The spec and fault are the run's own; the policy of a rollout it created is the
        rollout's, and this pipeline's for one it creates now. ``claimed``: the record as the
        caller's ``RunStore.claim`` returned it (already this process's)."""
        run = claimed if claimed is not None else self.runs.claim(run_id)
        spec = TrainSpec.from_dict(run.params["spec"])
        fault = Fault.from_dict(run.params["fault"]) if run.params.get("fault") else None
        saved = tuple(run.params.get("pythonpath", ()))  # where the run found its task
        self.pythonpath = (*saved, *(p for p in self.pythonpath if p not in saved))
        for s in run.steps:
            if s.status != "succeeded" or s.name == "evaluate":
                s.reset()
        run.outcome = ""
        self.runs.save(run)
        self.log(run, f"run {run.id} resumed in pid {run.pid} (resume #{run.resumes})")
        return self._execute(run, spec, fault, resumed=True)

    def _execute(self, run: Run, spec: TrainSpec, fault: Fault | None, *, resumed: bool) -> Run:
        try:
            self._steps(run, spec, fault, resumed=resumed)
            run.status = "succeeded"
        except RunCancelled as e:
            run.status, run.outcome = "cancelled", f"cancelled: {e}"
        except RunInterrupted as e:
            run.status, run.outcome = "interrupted", f"interrupted: {e}"
        except Exception as e:  # noqa: BLE001 - any step failure is recorded on the run; the caller sets the exit code
            run.status = "failed"
            run.outcome = run.outcome or f"failed: {e}"
            with open(Path(run.run_dir) / "pipeline.log", "a") as f:
                traceback.print_exc(file=f)
        except BaseException as e:  # Ctrl-C: resumable, so the steps not run stay pending
            run.status = "interrupted"
            run.outcome = f"{type(e).__name__} in pid {run.pid}"
            raise
        finally:
            for s in run.steps:
                if s.status == "running":
                    s.status, s.finished = "failed", time.time()
                    if run.status in ("interrupted", "cancelled"):
                        s.message = run.outcome
                elif s.status == "pending" and run.status not in ("interrupted", "cancelled"):
                    s.status, s.finished = "skipped", time.time()
            run.finished = time.time()
            self.runs.save(run)
        self.log(run, f"run {run.id} {run.status}: {run.outcome}")
        return run

    # ---- steps -------------------------------------------------------------------------

    def _steps(self, run: Run, spec: TrainSpec, fault: Fault | None, *, resumed: bool) -> None:
        result = self._train(run, spec, resumed=resumed)
        self._evaluate(run, spec, result, resumed=resumed)
        manifest = self._publish(run, spec, resumed=resumed)
        if self.find_server is not None:
            self.server = self.find_server()
        existing = self._existing_rollout(run) if resumed else None
        if existing is not None:
            self._follow(run, existing, manifest, note="resumed")
            return
        champion = self.registry.alias(spec.model_name, "champion")
        if self.server is None:
            self._gate_only(run, manifest, champion)
        else:
            self._rollout(run, manifest, champion, fault)

    def _train(self, run: Run, spec: TrainSpec, *, resumed: bool) -> TrainResult:
        train_dir = Path(run.run_dir) / "train"
        if run.step("train").status == "succeeded":  # resumed after training had finished
            return load_result(train_dir)
        with self._step(run, "train") as st:
            result = self._train_attempts(run, st, spec, train_dir, resumed=resumed)
            summary = {k: v for k, v in result.result.items() if isinstance(v, (int, float))}
            st.metrics = {"duration_s": round(result.duration_s, 2), **summary}
            epochs = [e for e in result.events if e.get("event") == "epoch"]
            if epochs:
                st.metrics.update(final_loss=epochs[-1].get("loss"),
                                  samples_per_s=epochs[-1].get("samples_per_s"))
            st.message = f"{spec.epochs} epochs on {spec.world_size} processes"
            if resumed:
                start = next((e for e in result.events if e.get("event") == "start"), {})
                done = int(start.get("start_epoch", 1)) - 1
                st.message += (f" (resumed from the checkpoint of epoch {done})" if done > 0
                               else " (resumed; no checkpoint yet, so trained from the start)")
        return result

    def _train_attempts(self, run: Run, st: Step, spec: TrainSpec, train_dir: Path, *,
                        resumed: bool) -> TrainResult:
        """``run_local``, again (resuming from the last checkpoint) after a transient failure:
        torchrun killed by a signal (the OS's OOM killer, an operator's kill), up to
        ``train_attempts`` in all, waiting ``retry_backoff_s``, doubled each time. A task that
        raises fails at once: a retry would fail the same way."""
        delay = self.retry_backoff_s
        for attempt in range(1, self.train_attempts + 1):
            if attempt > 1:
                st.attempts += 1
                self.runs.save(run)
            try:
                return run_local(spec, train_dir, resume=resumed or attempt > 1,
                                 progress=self.progress, pythonpath=self.pythonpath,
                                 should_stop=self.should_stop)
            except TrainingStopped as e:
                raise self._stop_error(str(e)) from e
            except TrainingFailed as e:
                if not _transient(e.returncode) or attempt == self.train_attempts:
                    raise
                self.log(run, f"step train: attempt {attempt}/{self.train_attempts} "
                              f"{_exit_text(e.returncode)}; retrying in {delay:g}s from the last "
                              "checkpoint")
                st.message = f"attempt {attempt} {_exit_text(e.returncode)}; retrying"
                self.runs.save(run)
                self.clock.sleep(delay)
                delay *= 2
                if self.should_stop():
                    raise self._stop_error("stopped while waiting to retry training") from e
        raise AssertionError("unreachable")

    def _evaluate(self, run: Run, spec: TrainSpec, result: TrainResult, *,
                  resumed: bool) -> None:
        """The exported program measured here with the task's metrics on the task's held-out
        split: every metric, and the split's fingerprint, must be what training recorded."""
        with self._step(run, "evaluate") as st:
            with importable(self._task_path(spec)):
                rt = load(spec.task, spec.config)
                data = rt.instance().datasets()
            signature = result.result.get("signature", {})
            inputs = [t["name"] for t in signature.get("inputs", ())]
            outputs = [t["name"] for t in signature.get("outputs", ())]
            if not inputs or not outputs:
                raise PipelineError(f"{result.run_dir} records no signature: not a task run")
            n = length(data.held_out, "held_out")
            module = load_exported(result.model_path)
            metrics = finalize(rt.metrics, metric_sums(module, data.held_out, range(n), inputs,
                                                       outputs, rt.metrics))
            _check_reproduced(metrics, result.metrics)
            fp = fingerprint(data.definition, data.held_out)
            if fp != result.metrics.get("data_fingerprint"):
                raise PipelineError(
                    f"the held-out split is not the one training measured (fingerprint "
                    f"{fp[:12]}, training recorded {str(result.metrics.get('data_fingerprint'))[:12]})")
            evaluation = rt.evaluation()
            primary = rt.primary_metric
            direction = evaluation["metrics"][primary]["direction"]
            run.metrics = {**metrics, "num_examples": n}
            run.evaluation = evaluation
            st.metrics = {**metrics, "num_examples": n}
            st.message = (f"{primary} {metric_text(metrics[primary])} ({direction} is better) on {n} "
                          "held-out items")
            if resumed:
                st.message += " (rerun on resume)"

    def _task_path(self, spec: TrainSpec) -> list[str]:
        """Where the task's module is imported from: its code directory, then ``pythonpath``."""
        return ([spec.code.path] if spec.code is not None else []) + list(self.pythonpath)

    def _publish(self, run: Run, spec: TrainSpec, *, resumed: bool) -> Manifest:
        version = run.version if run.version is not None else (
            self._published_by(run, spec.model_name) if resumed else None)
        if version is not None:  # resumed: publish once per run, never a second version
            manifest = self.registry.manifest(spec.model_name, version)
            st = run.step("publish")
            if st.status != "succeeded":
                run.version = manifest.version
                self._start(run, st)
                st.metrics = {"version": manifest.version}
                self._finish(run, st, "succeeded", f"{manifest.name} v{manifest.version} "
                                                   f"({manifest.digest[:12]}; published before "
                                                   "the run was resumed)")
            return manifest
        with self._step(run, "publish") as st:
            manifest = publish(self.registry, spec, Path(run.run_dir) / "train", run.id)
            run.version = manifest.version
            st.metrics = {"version": manifest.version}
            st.message = f"{manifest.name} v{manifest.version} ({manifest.digest[:12]})"
        return manifest

    def _published_by(self, run: Run, model: str) -> Version | None:
        """The version this run published, found by its run id: the process may have died
        after the registry wrote it and before the record said so."""
        for v in reversed(self.registry.versions(model)):
            try:
                if self.registry.manifest(model, v).run_id == run.id:
                    return v
            except ArtifactError:
                continue
        return None

    def _existing_rollout(self, run: Run) -> Rollout | None:
        """The rollout this run created, if any (its id is fixed by the run's: the process may
        have died after creating it and before recording it)."""
        try:
            return self.rollouts.get(run.rollout_id or _rollout_id(run))
        except NotFound:
            return None

    def _gate_only(self, run: Run, manifest: Manifest, champion: Version | None) -> None:
        with self._step(run, "gate") as st:
            champ = self.registry.manifest(manifest.name, champion) if champion is not None else None
            result = gate(manifest, champ, self.policy.gate)
            st.message = "; ".join(result.reasons)
            st.status = "succeeded" if result.verdict is Verdict.SUCCESSFUL else "failed"
        passed = result.verdict is Verdict.SUCCESSFUL
        with self._step(run, "canary") as st:
            st.status = "skipped"
            st.message = "no server running: start one with `kloop serve`, then `kloop rollout`"
        with self._step(run, "decide") as st:
            if passed and champion is None:
                self.registry.set_alias(manifest.name, "champion", manifest.version)
                run.outcome = "champion (first version)"
            elif passed:
                self.registry.set_alias(manifest.name, "candidate", manifest.version)
                run.outcome = "candidate (gate passed; not canaried without a server)"
            else:
                run.outcome = "rejected by the gate: " + "; ".join(result.reasons)
            st.message = run.outcome

    def _rollout(self, run: Run, manifest: Manifest, champion: Version | None,
                 fault: Fault | None) -> None:
        assert self.server is not None
        admin = self.server.admin()
        if champion is None:  # no alias: the version the server serves now, adopted as it
            served = LocalBackend(admin).read(manifest.name)
            if served.error is not None:
                raise PipelineError(f"{manifest.name} has no champion alias and the server could "
                                    f"not tell what it serves: {served.error}")
            champion = champion_for(manifest.name, manifest.version, None, served.weights)
            if champion is not None:
                self.registry.set_alias(manifest.name, "champion", champion)
                self.log(run, f"no champion alias: v{champion}, which the server serves, "
                              "is the champion")
        r = new_rollout(_rollout_id(run), manifest.name, manifest.version, champion,
                        self.policy, self.clock.now())
        self.rollouts.create(r)
        run.rollout_id = r.id
        self.registry.set_alias(manifest.name, "candidate", manifest.version)
        if fault is not None:
            # Loaded at weight 0 (nothing routes to it yet) so the fault is in place before
            # the first canary request; the rollout's own load is then a no-op.
            admin.load(manifest.name, manifest.version)
            admin.set_fault(manifest.name, manifest.version, fault)
            self.log(run, f"injected fault into v{manifest.version}: {fault}")
        self._follow(run, r, manifest)

    def _follow(self, run: Run, r: Rollout, manifest: Manifest, note: str = "") -> None:
        """Tick rollout ``r`` (new, or resumed) until it ends, keeping the gate and canary
        steps current; then record the decision. A rollout that already ended is recorded."""
        run.rollout_id = r.id
        gate_step, canary_step = run.step("gate"), run.step("canary")
        cancelled = False
        if r.phase.terminal:
            final = r
            self.log(run, f"rollout {r.id} had ended meanwhile: {r.phase.value} {r.reason}")
        else:
            if self.server is None and self.ticking:
                raise PipelineError(f"rollout {r.id} is still {r.phase.value}: start the server "
                                    "(`kloop serve`, or pass --server) and resume again")
            # No stop check here: the rollout exists, and a stop is handled while following it
            # (a cancel aborts it; a shutdown leaves it for the resumed run to follow on).
            self._start(run, canary_step if gate_step.status == "succeeded" else gate_step,
                        check_stop=False)
            if note:
                self.log(run, f"resuming rollout {r.id} (phase {r.phase.value}, step {r.step})")

            def on_event(ro: Rollout, ev: Event) -> None:
                self.log(run, f"[rollout] {ev.kind_name}: {ev.message}")
                if ro.gate is not None and gate_step.status == "running":
                    ok = gate_passed(ro.gate.verdict)
                    self._finish(run, gate_step, "succeeded" if ok else "failed",
                                 "; ".join(ro.gate.reasons))
                    if ok:
                        self._start(run, canary_step, check_stop=False)
                if canary_step.status == "running":
                    canary_step.metrics = {"weights": {str(v): w for v, w in ro.weights.items()},
                                           "step": ro.step, "failed_analyses": ro.failed}
                    self.runs.save(run)

            if self.ticking:
                assert self.server is not None  # checked above
                final = run_until_done(self.rollouts, LocalBackend(self.server.admin()),
                                       self.registry, r.id, self.clock, self.tick_interval_s,
                                       on_event)
            else:
                final, cancelled = self._watch_rollout(r.id, on_event)
        record_rollout(run, final, end=time.time(), note=note)
        self.runs.save(run)
        for st in (gate_step, canary_step, run.step("decide")):
            self.log(run, f"step {st.name}: {st.status}{f' — {st.message}' if st.message else ''}")
        self.registry.remove_alias(manifest.name, "candidate")
        if cancelled:
            raise RunCancelled(f"rollout {final.id} aborted: {final.reason}")
        if outcome_status(final.phase) != "succeeded":
            raise PipelineError(f"rollout {final.id} ended {final.phase.value}: {final.reason}")

    def _watch_rollout(self, rollout_id: str,
                       on_event: Callable[[Rollout, Event], None]) -> tuple[Rollout, bool]:
        """Follow a rollout that someone else ticks until it ends: the final rollout, and
        whether this run's cancel aborted it. A cancel aborts it (unless it already promoted:
        then it finishes); a shutdown leaves it as it is (``RunInterrupted``)."""
        seen: Event | None = None
        aborted = False
        while True:
            r = self.rollouts.get(rollout_id)
            if r.history and r.history[-1] != seen:
                seen = r.history[-1]
                on_event(r, seen)
            if r.phase.terminal:
                return r, aborted
            if self.should_stop() and not aborted:
                if not self.stop_is_cancel():
                    raise RunInterrupted(f"stopped while following rollout {r.id} "
                                         f"({r.phase.value}, step {r.step}); it goes on")
                with contextlib.suppress(ValueError):  # already promoted: let it finish
                    user_request(self.rollouts, r.id, lambda ro: request_abort(
                        ro, "aborted: its pipeline run was cancelled", self.clock.now()),
                        self.clock)
                    aborted = True
            self.clock.sleep(self.tick_interval_s)

    def _stop_error(self, where: str) -> Exception:
        return RunCancelled(where) if self.stop_is_cancel() else RunInterrupted(where)

    # ---- bookkeeping -------------------------------------------------------------------

    def log(self, run: Run, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        with open(Path(run.run_dir) / "pipeline.log", "a") as f:
            f.write(line + "\n")
        self._log(line)

    @contextlib.contextmanager
    def _step(self, run: Run, name: str) -> Iterator[Step]:
        st = run.step(name)
        self._start(run, st)
        try:
            yield st
        except Exception as e:
            self._finish(run, st, "failed", f"{type(e).__name__}: {e}")
            raise
        self._finish(run, st, st.status if st.status != "running" else "succeeded", st.message)

    def _start(self, run: Run, st: Step, *, check_stop: bool = True) -> None:
        if check_stop and self.should_stop():
            raise self._stop_error(f"before step {st.name}")
        st.status, st.started = "running", time.time()
        st.attempts += 1
        self.runs.save(run)
        self.log(run, f"step {st.name}: running")

    def _finish(self, run: Run, st: Step, status: str, message: str) -> None:
        st.status, st.message, st.finished = status, message, time.time()
        self.runs.save(run)
        self.log(run, f"step {st.name}: {status}{f' — {message}' if message else ''}")


class RunCancelled(Exception):
    """A user cancelled the run (``should_stop`` and ``stop_is_cancel``); it ends
    ``cancelled``, resumable."""


class RunInterrupted(Exception):
    """The process running the run is stopping (``should_stop``, not a cancel); the run ends
    ``interrupted``, for the next start to resume."""


def _transient(returncode: int) -> bool:
    """torchrun ended by a signal (negative: this process saw it die of one; 128 + N: a shell
    or torchrun reporting it), not by an error of the task's."""
    return returncode < 0 or returncode in (128 + 9, 128 + 15)


def _exit_text(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def _rollout_id(run: Run) -> str:
    return f"{run.id}-rollout"


_IMPORTING = threading.RLock()


@contextlib.contextmanager
def importable(paths: Sequence[str]) -> Iterator[None]:
    """``paths`` first on ``sys.path`` while the task is imported (as the CLI's ``task_path``).

    A long-lived process (the control plane) imports many runs' tasks: the modules imported from
    ``paths`` leave ``sys.modules`` again when the scope ends (the objects stay usable), so a
    task edited since is imported as it is now, and two code directories with a module of the
    same name do not get each other's. One thread at a time (``sys.path`` and ``sys.modules``
    are the process's)."""
    roots = [str(Path(p).expanduser().resolve()) for p in paths]
    with _IMPORTING:
        _forget_modules_under(roots)
        importlib.invalidate_caches()
        added = [p for p in roots if p not in sys.path]
        sys.path[:0] = added
        try:
            yield
        finally:
            for p in added:
                with contextlib.suppress(ValueError):
                    sys.path.remove(p)
            _forget_modules_under(roots)  # what was imported from them is this scope's


def _forget_modules_under(roots: Sequence[str]) -> None:
    """Drop from ``sys.modules`` every module whose file lies under one of ``roots``, except
    kloop's own packages (a task directory may be kloop's checkout, as the README's example
    is)."""
    installed = _installed_dirs()
    # A copy in one step (atomic under the GIL): other threads import while this one looks.
    for name, module in sys.modules.copy().items():
        file = getattr(module, "__file__", None)
        if not file or name.partition(".")[0] in _KLOOP_PACKAGES:
            continue
        path = str(Path(file).resolve())
        if any(path.startswith(d) for d in installed):
            continue  # installed packages (a venv may live inside the task's directory)
        if any(path.startswith(root.rstrip("/") + "/") for root in roots):
            sys.modules.pop(name, None)


_KLOOP_PACKAGES = {"kloop", "trainer", "serving", "deploy"}


@functools.cache
def _installed_dirs() -> tuple[str, ...]:
    """The standard library's and the installed packages' directories, resolved."""
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs |= set(site.getsitepackages()) | {site.getusersitepackages()}
    return tuple(str(Path(d).resolve()).rstrip("/") + "/" for d in dirs if d)


def _check_reproduced(measured: Mapping[str, float], trained: Mapping[str, Any]) -> None:
    """Each metric within ``_EVAL_TOLERANCE`` (relative, at least absolute) of training's."""
    off = []
    for name, value in measured.items():
        then = trained.get(name)
        if not isinstance(then, int | float) or isinstance(then, bool):
            off.append(f"{name}: training recorded none")
        elif not (abs(value - then) <= _EVAL_TOLERANCE * max(1.0, abs(then))
                  or (math.isnan(value) and math.isnan(then))):
            off.append(f"{name} {metric_text(value)}, training reported {metric_text(then)}")
    if off:
        raise PipelineError("the exported model does not reproduce training's held-out metrics: "
                            + "; ".join(off))

