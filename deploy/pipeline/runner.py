"""The train-and-promote pipeline: train → evaluate → publish → gate → canary → decide.

Each step's status, timings, message and metrics are written to the run record
(``deploy.local.runs``)
as they change, so ``kloop runs`` in another terminal shows a live run and history survives.

Where the steps come from:

* train: ``trainer.launch.run_local`` (real torchrun, DDP); its progress events are shown live.
* evaluate: the exported program is loaded back *in this process* and evaluated on the held-out
  split; it must reproduce what the training run measured, or the run fails. What is published
  is what was measured.
* publish: ``trainer.publish`` (immutable, checksummed version in the registry).
* gate + canary: one rollout (``deploy.rollout``) ticked by ``deploy.controller`` against the
  running server. The rollout runs the evaluation gate first, then the traffic steps with live
  analysis, then promotes or rolls back. Without a server, only the gate runs here; the first
  version of a model that passes it becomes the champion directly (nothing to compare with).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from deploy.controller import RealClock, run_until_done
from deploy.local.home import Home
from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.local.runs import Run, RunStore, Step
from deploy.local.server_backend import LocalBackend
from deploy.local.server_process import ServerHandle
from deploy.ports import Clock
from deploy.rollout import Event, Phase, Rollout, RolloutPolicy, Verdict, gate, new_rollout
from kloop.artifact import Manifest
from kloop.faults import Fault
from kloop.model_version import Version
from trainer.data import load_split
from trainer.evaluate import evaluate
from trainer.export import load_exported
from trainer.launch import run_local
from trainer.publish import publish
from trainer.spec import TrainSpec

# The exported program and the eager model differ only by float summation order.
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

    def run(self, spec: TrainSpec, *, fault: Fault | None = None, label: str = "") -> Run:
        """Run every step; returns the finished record (status ``failed`` on a step error)."""
        params = {"spec": spec.to_dict(), "policy": self.policy.to_dict(),
                  "fault": fault.to_dict() if fault else None, "label": label}
        run = Run.new(spec.model_name, params, self.home.runs_dir)
        Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        self.runs.save(run)
        self.log(run, f"run {run.id} started{f' ({label})' if label else ''}: model {spec.model_name}")
        try:
            self._steps(run, spec, fault)
            run.status = "succeeded"
        except Exception as e:  # noqa: BLE001 - any step failure is recorded on the run; the caller sets the exit code
            run.status = "failed"
            run.outcome = run.outcome or f"failed: {e}"
            with open(Path(run.run_dir) / "pipeline.log", "a") as f:
                traceback.print_exc(file=f)
        finally:
            for s in run.steps:
                if s.status in ("pending", "running"):
                    s.status = "skipped" if s.status == "pending" else "failed"
                    s.finished = s.finished or time.time()
            run.finished = time.time()
            self.runs.save(run)
        self.log(run, f"run {run.id} {run.status}: {run.outcome}")
        return run

    # ---- steps -------------------------------------------------------------------------

    def _steps(self, run: Run, spec: TrainSpec, fault: Fault | None) -> None:
        run_dir = Path(run.run_dir)
        with self._step(run, "train") as st:
            result = run_local(spec, run_dir / "train", progress=self.progress)
            summary = {k: v for k, v in result.result.items() if isinstance(v, (int, float))}
            st.metrics = {"duration_s": round(result.duration_s, 2), **summary}
            epochs = [e for e in result.events if e.get("event") == "epoch"]
            if epochs:
                st.metrics.update(final_loss=epochs[-1].get("loss"),
                                  samples_per_s=epochs[-1].get("samples_per_s"))
            st.message = f"{spec.epochs} epochs on {spec.world_size} processes"

        with self._step(run, "evaluate") as st:
            split = load_split()
            module = load_exported(result.model_path)
            metrics = evaluate(module, split)
            trained = result.metrics
            if abs(metrics["accuracy"] - trained["accuracy"]) > _EVAL_TOLERANCE:
                raise PipelineError(f"the exported model scores {metrics['accuracy']:.4f} on the held-out "
                                    f"split, training reported {trained['accuracy']:.4f}")
            run.metrics = {k: metrics[k] for k in ("accuracy", "loss", "per_class_accuracy") if k in metrics}
            st.metrics = {"accuracy": metrics["accuracy"], "loss": metrics["loss"],
                          "num_examples": metrics.get("num_examples")}
            st.message = f"accuracy {metrics['accuracy']:.4f} on {metrics.get('num_examples')} held-out digits"

        with self._step(run, "publish") as st:
            manifest = publish(self.registry, spec, run_dir / "train", run.id)
            run.version = manifest.version
            st.metrics = {"version": manifest.version}
            st.message = f"{manifest.name} v{manifest.version} ({manifest.digest[:12]})"

        champion = self.registry.alias(spec.model_name, "champion")
        if self.server is None:
            self._gate_only(run, manifest, champion)
        else:
            self._rollout(run, manifest, champion, fault)

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
        backend = LocalBackend(admin)
        r = new_rollout(f"{run.id}-rollout", manifest.name, manifest.version, champion,
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
        gate_step, canary_step = run.step("gate"), run.step("canary")
        self._start(run, gate_step)

        def on_event(ro: Rollout, ev: Event) -> None:
            self.log(run, f"[rollout] {ev.kind_name}: {ev.message}")
            if ro.gate is not None and gate_step.status == "running":
                ok = ro.gate.verdict is Verdict.SUCCESSFUL
                self._finish(run, gate_step, "succeeded" if ok else "failed", "; ".join(ro.gate.reasons))
                if ok:
                    self._start(run, canary_step)
            if canary_step.status == "running":
                canary_step.metrics = {"weights": dict(ro.weights), "step": ro.step,
                                       "failed_analyses": ro.failed}
                self.runs.save(run)

        final = run_until_done(self.rollouts, backend, self.registry, r.id, self.clock,
                               self.tick_interval_s, on_event)
        if gate_step.status == "running":  # ended before the gate ran (e.g. aborted)
            self._finish(run, gate_step, "failed", final.reason)
        if canary_step.status == "running":
            ok = final.phase is Phase.SUCCEEDED
            self._finish(run, canary_step, "succeeded" if ok else "failed", final.reason)
        with self._step(run, "decide") as st:
            run.outcome = _outcome(final)
            st.message = f"{run.outcome}: {final.reason}" if final.reason else run.outcome
            st.metrics = {"phase": final.phase.value, "weights": dict(final.weights)}
        self.registry.remove_alias(manifest.name, "candidate")
        if final.phase is Phase.ABORTED:
            raise PipelineError(f"rollout {r.id} aborted: {final.reason}")

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

    def _start(self, run: Run, st: Step) -> None:
        st.status, st.started = "running", time.time()
        self.runs.save(run)
        self.log(run, f"step {st.name}: running")

    def _finish(self, run: Run, st: Step, status: str, message: str) -> None:
        st.status, st.message, st.finished = status, message, time.time()
        self.runs.save(run)
        self.log(run, f"step {st.name}: {status}{f' — {message}' if message else ''}")


def _outcome(r: Rollout) -> str:
    if r.phase is Phase.SUCCEEDED:
        return "promoted" if r.champion is not None else "champion (first version)"
    if r.phase is Phase.ROLLED_BACK:
        gated = r.gate is not None and r.gate.verdict is not Verdict.SUCCESSFUL
        return "rolled back by the gate" if gated else "rolled back by live analysis"
    return "aborted"
