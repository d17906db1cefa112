"""Tables people compare: runs, a run's steps, run-vs-run, and the status of models.

Rendering only (rich); the data comes from the stores, the registry and the server.

Metrics are the task's: a table shows the primary metric its runs or versions are judged by,
named with its direction in the header ("held-out rmse ↓"), never a fixed "accuracy". Rows that
disagree on it (a model name reused for another task) name their own metric in the cell.
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
from kloop.artifact import ArtifactError, Manifest, Registry

ARROWS = {"higher": "↑", "lower": "↓"}
# Keys of a run's or version's metrics that are bookkeeping, not metrics.
_NOT_METRICS = ("num_examples", "data_fingerprint")

# Wide enough for tables in files and CI logs (rich assumes 80 columns off a terminal).
console = Console(width=None if Console().is_terminal else 160)


def _t(ts: float | None) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _num(x: Any, digits: int = 4) -> str:
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x if x is not None else "-")  # ints (versions, counts) as they are


def metric_text(x: Any) -> str:
    """A metric's value: 4 decimals below 10 (accuracy 0.9722), 4 significant digits up to
    1000 (rmse 55.43), one decimal above; "-" for none."""
    if not isinstance(x, int | float) or isinstance(x, bool):
        return "-" if x is None else str(x)
    a = abs(x)
    return f"{x:.4f}" if a < 10 else f"{x:.4g}" if a < 1000 else f"{x:.1f}"


def metric_label(name: str, direction: str | None, prefix: str = "") -> str:
    """``name`` with its direction's arrow: "held-out rmse ↓"."""
    return " ".join(p for p in (prefix, name, ARROWS.get(direction or "", "")) if p)


def primary_column(rows: Sequence[tuple[str, str | None, Any]],
                   prefix: str = "held-out") -> tuple[str, list[str]]:
    """The header and cells of one column of primary metrics, from (metric, direction,
    value) per row: the metric in the header when every row shares it, else in each cell."""
    kinds = {(name, direction) for name, direction, _ in rows}
    if len(kinds) == 1:
        (name, direction), = kinds
        return metric_label(name, direction, prefix), [metric_text(v) for _, _, v in rows]
    return f"{prefix} metric", [metric_label(n, d, metric_text(v)) if v is not None else "-"
                                for n, d, v in rows]


def print_runs(runs: Sequence[Run]) -> None:
    t = Table(title="pipeline runs (newest first)")
    header, primary = primary_column([(r.primary_metric, r.direction(r.primary_metric),
                                       r.metrics.get(r.primary_metric)) for r in runs])
    for c in ("run", "model", "started", "seconds", "status", "version", header, "outcome",
              "steps"):
        t.add_column(c)
    for r, value in zip(runs, primary, strict=True):
        steps = " ".join(f"{s.name}:{s.status[:4]}" for s in r.steps)
        t.add_row(r.id, r.model, _t(r.created), _num(r.duration_s, 0), r.status, _num(r.version),
                  value, r.outcome, steps)
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
    configs = [s.get("config") or {} for s in specs]
    for k in sorted({k for c in configs for k in c}):
        values = [c.get(k) for c in configs]
        if len({repr(v) for v in values}) > 1:
            t.add_row(f"config.{k}", *(_num(v) for v in values))
    for name in _metric_names(runs):
        direction = next((d for r in runs if (d := r.direction(name)) is not None), None)
        t.add_row(metric_label(name, direction), *(metric_text(r.metrics.get(name)) for r in runs))
    t.add_row("train seconds", *(_num(r.step("train").duration_s, 1) for r in runs))
    t.add_row("version", *(_num(r.version) for r in runs))
    t.add_row("outcome", *(r.outcome for r in runs))
    console.print(t)


def _metric_names(runs: Sequence[Run]) -> list[str]:
    """Every metric the runs measured, their primary metrics first, in first-seen order."""
    names = [r.primary_metric for r in runs]
    names += [k for r in runs for k, v in r.metrics.items()
              if k not in _NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool)]
    return list(dict.fromkeys(names))


def _other_metrics(m: Manifest) -> str:
    return ", ".join(f"{k} {metric_text(v)}" for k, v in m.metrics.items()
                     if k != m.primary_metric and k not in _NOT_METRICS
                     and isinstance(v, int | float) and not isinstance(v, bool))


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
        manifests: dict[int, Manifest | ArtifactError] = {}
        for v in registry.versions(name):
            try:
                manifests[v] = registry.manifest(name, v)
            except ArtifactError as e:
                manifests[v] = e
        rows = [(m.primary_metric, m.direction(m.primary_metric),
                 m.metrics.get(m.primary_metric)) if isinstance(m, Manifest) else None
                for m in manifests.values()]
        known = [r for r in rows if r is not None]
        header, cells = primary_column(known) if known else ("held-out metric", [])
        values = iter(cells)
        for c in ("version", "alias", "created", header, "other metrics", "run", "loaded",
                  "weight"):
            t.add_column(c)
        for v, m in manifests.items():
            loaded = str(v) in live.get("versions", [])
            weight = live.get("weights", {}).get(str(v))
            if isinstance(m, Manifest):
                cols = (_t(m.created), next(values), _other_metrics(m), m.run_id)
            else:
                cols = ("-", "-", "", f"corrupt: {m}")
            t.add_row(str(v), by_version.get(v, ""), *cols,
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
