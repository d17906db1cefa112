"""Tables people compare: runs, a run's steps, run-vs-run, and the status of models.

Rendering only (rich); the data comes from the stores, the registry and the server.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from deploy.local.runs import RESUMABLE, Run
from deploy.local.server_process import ServerHandle
from deploy.ports import RolloutStore
from kloop.artifact import ArtifactError, Registry

# Wide enough for tables in files and CI logs (rich assumes 80 columns off a terminal).
console = Console(width=None if Console().is_terminal else 160)


def _t(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _num(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x if x is not None else "-")


def print_runs(runs: Sequence[Run]) -> None:
    t = Table(title="pipeline runs (newest first)")
    for c in ("run", "model", "started", "seconds", "status", "version", "accuracy", "outcome",
              "steps"):
        t.add_column(c)
    for r in runs:
        steps = " ".join(f"{s.name}:{s.status[:4]}" for s in r.steps)
        t.add_row(r.id, r.model, _t(r.created), _num(r.duration_s, 0), r.status, _num(r.version),
                  _num(r.metrics.get("accuracy")), r.outcome, steps)
    console.print(t)
    stopped = [r.id for r in runs if r.status in RESUMABLE]
    if stopped:
        console.print(f"continue a stopped run with `kloop pipeline resume RUN` ({', '.join(stopped)})")


def print_run(run: Run) -> None:
    t = Table(title=f"run {run.id} — {run.status}: {run.outcome}")
    for c in ("step", "status", "seconds", "message", "metrics"):
        t.add_column(c, overflow="fold")
    for s in run.steps:
        metrics = ", ".join(f"{k}={_num(v, 3) if not isinstance(v, dict) else v}"
                            for k, v in s.metrics.items() if v is not None)
        t.add_row(s.name, s.status, _num(s.duration_s, 1), s.message, metrics)
    console.print(t)
    console.print(f"run dir: {run.run_dir} (pipeline.log, train/train.log, train/progress.jsonl)")
    if run.status in RESUMABLE:
        console.print(f"continue it with `kloop pipeline resume {run.id}`")


def print_comparison(runs: Sequence[Run]) -> None:
    """Experiment comparison: the parameters that differ, then the results side by side."""
    t = Table(title="run comparison")
    t.add_column("")
    for r in runs:
        t.add_column(r.id)
    specs = [r.params.get("spec", {}) for r in runs]
    keys = sorted({k for s in specs for k in s if not isinstance(s.get(k), dict)})
    for k in keys:
        values = [s.get(k) for s in specs]
        if len({repr(v) for v in values}) > 1:
            t.add_row(f"spec.{k}", *(_num(v) for v in values))
    t.add_row("accuracy", *(_num(r.metrics.get("accuracy")) for r in runs))
    t.add_row("loss", *(_num(r.metrics.get("loss")) for r in runs))
    t.add_row("train seconds", *(_num(r.step("train").duration_s, 1) for r in runs))
    t.add_row("version", *(_num(r.version) for r in runs))
    t.add_row("outcome", *(r.outcome for r in runs))
    console.print(t)


def print_status(registry: Registry, server: ServerHandle | None, rollouts: RolloutStore,
                 model: str | None) -> None:
    weights: dict[str, Mapping[str, Any]] = {}
    if server is not None:
        try:
            weights = server.admin().models()
            console.print(f"server: {server.http_url} (gRPC {server.grpc_target}, pid {server.pid})")
        except Exception as e:  # noqa: BLE001 - status must print even when the server is unhealthy
            console.print(f"server: {server.http_url} not answering: {e}")
    else:
        console.print("server: none running (start one with `kloop serve`)")
    for name in [model] if model else registry.models():
        aliases = registry.aliases(name)
        by_version = {v: a for a, v in aliases.items()}
        live = weights.get(name, {})
        t = Table(title=f"model {name} — registry {registry.root}")
        for c in ("version", "alias", "created", "accuracy", "loss", "run", "loaded", "weight"):
            t.add_column(c)
        for v in registry.versions(name):
            try:
                m = registry.manifest(name, v)
                acc, loss, run_id, created = m.metrics.get("accuracy"), m.metrics.get("loss"), m.run_id, m.created
            except ArtifactError as e:
                acc, loss, run_id, created = None, None, f"corrupt: {e}", None
            loaded = str(v) in live.get("versions", [])
            weight = live.get("weights", {}).get(str(v))
            t.add_row(str(v), by_version.get(v, ""), _t(created), _num(acc), _num(loss), run_id,
                      "yes" if loaded else "", "" if weight is None else f"{weight}%")
        console.print(t)
        history = rollouts.list(model=name)
        if history:
            h = Table(title=f"rollouts of {name}")
            for c in ("rollout", "candidate", "champion", "phase", "step", "weights", "reason"):
                h.add_column(c, overflow="fold")
            for r in history[-10:]:
                split = ", ".join(f"v{v}={w}%" for v, w in sorted(r.weights.items()))
                h.add_row(r.id, str(r.candidate), str(r.champion or "-"), r.phase.value,
                          str(r.step), split or "-", r.reason)
            console.print(h)
