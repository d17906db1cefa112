"""The control plane's resources as JSON-ready views, one shape for HTTP and gRPC.

Each view is the proto3 JSON form of a message in ``proto/control.proto`` (field names as
written there), so the HTTP API returns it as it is and the gRPC API parses it into the message
(``google.protobuf.json_format.ParseDict``): the two protocols cannot drift apart.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from deploy.control.progress import Progress, run_curves
from deploy.local.runs import Run, Step
from deploy.rollout import Rollout
from kloop.artifact import ArtifactError, Registry

RUN_ROLLOUT_SUFFIX = "-rollout"  # a pipeline run's rollout is "<run id>-rollout"


def step_view(st: Step) -> dict[str, Any]:
    return {"name": st.name, "status": st.status, "started": st.started or 0.0,
            "finished": st.finished or 0.0, "duration_s": round(st.duration_s or 0.0, 3),
            "message": st.message, "metrics": _json_safe(st.metrics), "attempts": st.attempts}


def run_view(run: Run, progress: Progress | None = None, *, full: bool = True) -> dict[str, Any]:
    """A run; ``full=False`` leaves out params and step metrics (the list's rows)."""
    primary = run.primary_metric
    value = run.metrics.get(primary)
    has_value = (isinstance(value, int | float) and not isinstance(value, bool)
                 and math.isfinite(value))
    view: dict[str, Any] = {
        "id": run.id, "model": run.model, "status": run.status,
        "label": str(run.params.get("label") or ""), "created": run.created,
        "finished": run.finished or 0.0, "duration_s": round(run.duration_s, 3),
        "version": run.version or 0, "outcome": run.outcome, "rollout_id": run.rollout_id or "",
        "primary_metric": primary, "direction": run.direction(primary) or "",
        "primary_value": float(value) if has_value and value is not None else 0.0, "has_primary_value": has_value,
        "metrics": _json_safe(run.metrics), "resumes": run.resumes,
        "steps": [step_view(s) if full else {"name": s.name, "status": s.status,
                                             "attempts": s.attempts} for s in run.steps],
    }
    if full:
        view["params"] = _json_safe(run.params)
    if progress is not None:
        view["progress"] = progress_view(progress)
    return view


def change_key(run_doc: str) -> str:
    """What a watch compares to decide the run changed: its JSON without the durations that
    grow by themselves while it runs."""
    d = json.loads(run_doc)
    d.pop("duration_s", None)
    for st in d.get("steps", ()):
        if st.get("status") == "running":
            st.pop("duration_s", None)
    return json.dumps(d, sort_keys=True)


def progress_view(p: Progress) -> dict[str, Any]:
    d = p.to_dict()
    return {k: (0.0 if v is None and k in ("loss", "samples_per_s", "remaining_s") else v)
            for k, v in d.items()}


def rollout_view(r: Rollout, *, full: bool = True) -> dict[str, Any]:
    """A rollout; ``full=False`` (the list's rows) carries only the last event of its history
    and no policy."""
    events = r.history if full else r.history[-1:]
    history = [{"at": e.at, "kind": e.kind_name, "message": e.message,
                "verdict": e.verdict.value if e.verdict else "",
                "weights": {str(v): int(w) for v, w in e.weights.items()}, "count": e.count}
               for e in events]
    return {
        "id": r.id, "model": r.model, "candidate": int(r.candidate),
        "champion": int(r.champion) if r.champion is not None else 0,
        "phase": r.phase.value, "active": not r.phase.terminal, "step": r.step,
        "steps": list(r.steps), "weights": {str(v): int(w) for v, w in r.weights.items()},
        "paused": bool(getattr(r, "paused", False)), "undo": bool(getattr(r, "undo", False)),
        "reason": r.reason,
        "gate": ({"verdict": r.gate.verdict.value, "reasons": list(r.gate.reasons)}
                 if r.gate is not None else None),
        "failed_analyses": r.failed, "failure_limit": r.policy.failure_limit,
        "created": r.created, "updated": r.updated, "resource_version": str(r.generation),
        "history": history, "policy": _json_safe(r.policy.to_dict()) if full else {},
        "run_id": r.id.removesuffix(RUN_ROLLOUT_SUFFIX) if r.id.endswith(RUN_ROLLOUT_SUFFIX) else "",
    }


def model_view(registry: Registry, name: str, rollouts: Sequence[Rollout]) -> dict[str, Any]:
    """A model's versions (newest first) with metrics, aliases and lineage: the run that
    produced each, and the rollouts in which it was the candidate."""
    aliases = registry.aliases(name)
    by_version: dict[int, list[str]] = {}
    for a, v in aliases.items():
        by_version.setdefault(v, []).append(a)
    rolled: dict[int, list[str]] = {}
    for r in rollouts:
        rolled.setdefault(int(r.candidate), []).append(r.id)
    versions = []
    for v in sorted(registry.versions(name), reverse=True):
        try:
            m = registry.manifest(name, v)
        except ArtifactError as e:
            versions.append({"version": v, "created": 0.0, "metrics": {}, "primary_metric": "",
                             "aliases": sorted(by_version.get(v, [])), "digest": "",
                             "run_id": "", "lineage": {"error": str(e)},
                             "rollouts": rolled.get(v, [])})
            continue
        versions.append({"version": v, "created": m.created, "metrics": _json_safe(m.metrics),
                         "primary_metric": m.primary_metric,
                         "aliases": sorted(by_version.get(v, [])), "digest": m.digest,
                         "run_id": m.run_id, "lineage": _json_safe(m.lineage),
                         "rollouts": rolled.get(v, [])})
    active = next((r.id for r in rollouts if not r.phase.terminal), "")
    return {"name": name, "aliases": dict(aliases), "versions": versions,
            "active_rollout": active}


def comparison(runs: Sequence[Run]) -> dict[str, Any]:
    """N runs side by side: the parameters that differ, every metric, the per-epoch curves."""
    flat = [_flatten({"spec": r.params.get("spec", {}), "policy": r.params.get("policy", {}),
                      "label": r.params.get("label", "")}) for r in runs]
    keys = sorted(set().union(*flat)) if flat else []
    diff = {k: [f.get(k) for f in flat] for k in keys
            if len({json.dumps(f.get(k), sort_keys=True) for f in flat}) > 1}
    names = sorted(set().union(*(r.metrics for r in runs))) if runs else []
    metrics = {n: [_json_safe(r.metrics.get(n)) for r in runs] for n in names}
    curves = []
    for r in runs:
        for metric, (xs, ys) in sorted(run_curves(r.run_dir).items()):
            curves.append({"run_id": r.id, "metric": metric, "x": xs, "y": ys})
    return {"runs": [run_view(r, full=False) for r in runs], "param_diff": _json_safe(diff),
            "metrics": metrics, "curves": curves}


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = _json_safe(v)
    return out


def json_safe(v: Any) -> Any:
    """``v`` with non-finite floats as null, for JSON and protobuf's Struct."""
    return _json_safe(v)


def _json_safe(v: Any) -> Any:
    """Non-finite floats as null (JSON has none, and protobuf's Struct refuses them)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    return v


# ---- page tokens -------------------------------------------------------------------------------


def page_token(key: tuple[float, str] | None) -> str:
    if key is None:
        return ""
    return base64.urlsafe_b64encode(json.dumps([key[0], key[1]]).encode()).decode()


def parse_page_token(token: str) -> tuple[float, str] | None:
    """The (created, id) a token names; ``ValueError`` for one this service did not write."""
    if not token:
        return None
    try:
        created, rid = json.loads(base64.urlsafe_b64decode(token.encode()))
    except (ValueError, binascii.Error, TypeError) as e:
        raise ValueError(f"page_token {token!r} is not one this service wrote") from e
    if isinstance(created, bool) or not isinstance(created, int | float) or not isinstance(rid, str):
        raise ValueError(f"page_token {token!r} is not one this service wrote")
    return float(created), rid
