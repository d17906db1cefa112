"""Rollouts kept in ``kloop.dev/v1alpha1`` Rollout custom resources: the in-cluster store.

``CRRolloutStore`` implements ``deploy.ports.RolloutStore``, so ``deploy.controller.tick`` runs
unchanged against it. The mapping:

* CR ``metadata.name`` is the rollout id; the CR's namespace is the store's.
* CR ``spec`` is the USER's: model, candidate, champion, undo, policy (camelCase), backend,
  metrics. The controller never writes it. ``model``/``candidate``/``champion``/``undo`` are
  copied into status when the rollout starts, so a later edit of the spec cannot retarget a
  running rollout (there are no CEL immutability rules on 1.20; the copy is the guard). The
  policy is read from the spec on every tick, so tightening it takes effect at once
  (level-triggered).
* CR ``status`` is the rollout's status document, in camelCase, written with ONE ``PUT
  .../status`` per tick, or per user request (pause, resume, promote, abort): those are
  status, not spec, because they are saved with the same resourceVersion check as a tick.
* ``Rollout.generation`` is the CR's ``metadata.resourceVersion``: ``save`` sends it back, the
  API server answers 409 when anybody wrote the object since it was read, and that becomes
  ``deploy.ports.Conflict``, which ``tick``/``run_until_done`` already handle by re-reading.

At most one active rollout per model: the API server cannot enforce that (no unique index),
so ``active(model)`` is the OLDEST non-terminal Rollout of the model and the reconciler leaves
younger ones waiting.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Callable, Mapping
from typing import Any

from deploy.cluster import kube as k
from deploy.ports import Conflict, NotFound
from deploy.rollout import KNOBS, Phase, Rollout, RolloutPolicy
from deploy.rollout.policy import MetricThreshold, camel
from kloop.model_version import Version

ROLLOUT = k.KINDS["Rollout"]
API_VERSION = ROLLOUT.api_version

# A policy setting's persisted key <-> its CR spec.policy key (Kubernetes habit: camelCase, units
# spelled out): both from the one table of settings, ``deploy.rollout.KNOBS``.
POLICY_KEYS: dict[str, str] = {knob.name: knob.cr_key for knob in KNOBS}
# A renamed setting's former CR key (``maxAccuracyDrop``, ``minAccuracy``) -> its former persisted
# key, which ``RolloutPolicy.from_dict`` still reads: CRs written before the rename keep working.
LEGACY_POLICY_KEYS: dict[str, str] = {
    cr_key: alias for knob in KNOBS for alias, cr_key in zip(knob.aliases, knob.alias_cr_keys,
                                                             strict=True)}
_POLICY_FIELDS = {v: f for f, v in POLICY_KEYS.items()} | LEGACY_POLICY_KEYS
# A gate condition's fields, inside spec.policy.gateConditions[]: camelCase like the rest.
CONDITION_KEYS: dict[str, str] = {f.name: camel(f.name)
                                  for f in dataclasses.fields(MetricThreshold)}
_CONDITION_FIELDS = {v: f for f, v in CONDITION_KEYS.items()}
_CONDITIONS = POLICY_KEYS["gate_conditions"]

# Rollout.to_dict() status key <-> CR status key (the spec-ish keys are recorded in status, so a
# running rollout cannot be retargeted by editing its spec).
STATUS_KEYS: dict[str, str] = {
    f.name: "createdAt" if f.name == "created" else camel(f.name)
    for f in dataclasses.fields(Rollout) if f.name not in ("id", "generation")
}
_STATUS_FIELDS = {v: f for f, v in STATUS_KEYS.items()}
_REFERENCE_KEYS = {"requests": "requests", "server_errors": "serverErrors",
                   "error_rate": "errorRate", "p99_s": "p99Seconds"}


class InvalidSpec(ValueError):
    """The CR's spec passed the schema but not kloop's own checks (e.g. steps not increasing)."""


def policy_from_spec(spec_policy: Mapping[str, Any] | None) -> RolloutPolicy:
    fields = {}
    for key, value in (spec_policy or {}).items():
        if key not in _POLICY_FIELDS:
            raise InvalidSpec(f"unknown policy field {key!r}")
        if key == _CONDITIONS and isinstance(value, list):
            value = [_condition_from_spec(c) for c in value]
        fields[_POLICY_FIELDS[key]] = value
    try:
        return RolloutPolicy.from_dict(fields)
    except (ValueError, TypeError) as e:
        raise InvalidSpec(f"spec.policy: {e}") from e


def policy_to_spec(policy: RolloutPolicy) -> dict[str, Any]:
    """The settings that differ from the defaults, under their CR keys."""
    default = RolloutPolicy().to_dict()
    spec = {POLICY_KEYS[name]: value for name, value in policy.to_dict().items()
            if value is not None and value != default[name]}
    if _CONDITIONS in spec:
        spec[_CONDITIONS] = [{CONDITION_KEYS[f]: v for f, v in c.items()}
                             for c in spec[_CONDITIONS]]
    return spec


def _condition_from_spec(c: Any) -> Any:
    """One ``gateConditions`` item under the persisted keys (anything else is left for
    ``RolloutPolicy.from_dict`` to refuse)."""
    if not isinstance(c, Mapping):
        return c
    unknown = set(c) - set(_CONDITION_FIELDS)
    if unknown:
        raise InvalidSpec(f"spec.policy.{_CONDITIONS}: unknown fields {sorted(unknown)}")
    return {_CONDITION_FIELDS[k_]: v for k_, v in c.items()}


def cr_from_rollout(r: Rollout, namespace: str, *, backend: Mapping[str, Any] | None = None,
                    metrics: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A new Rollout CR (spec only) for ``r``: what ``kubectl apply`` of a user's YAML gives."""
    spec: dict[str, Any] = {"model": r.model, "candidate": str(r.candidate)}
    if r.champion is not None:
        spec["champion"] = str(r.champion)
    if r.undo:
        spec["undo"] = True
    policy = policy_to_spec(r.policy)
    if policy:
        spec["policy"] = policy
    if backend:
        spec["backend"] = dict(backend)
    if metrics:
        spec["metrics"] = dict(metrics)
    return {"apiVersion": API_VERSION, "kind": ROLLOUT.kind,
            "metadata": {"name": r.id, "namespace": namespace}, "spec": spec}


def status_from_rollout(r: Rollout) -> dict[str, Any]:
    """The CR status document; ``None`` and ``""`` are left out (absent reads as the default)."""
    doc = r.to_dict()
    out: dict[str, Any] = {}
    for field, key in STATUS_KEYS.items():
        value = doc.get(field)
        if field == "champion_reference" and value is not None:
            value = {_REFERENCE_KEYS[f]: v for f, v in value.items() if v is not None}
        if field == "history":
            value = [{k_: v for k_, v in e.items() if v is not None} for e in value or ()]
        if value is not None and value != "":  # the client serializes "" as null: omit it
            out[key] = _finite(value)
    return out


def rollout_from_cr(obj: Mapping[str, Any],
                    champion_of: Callable[[str], Version | None] | None = None) -> Rollout:
    """The rollout a CR holds. Before the first status write, it is a Pending rollout built
    from the spec; its champion is the spec's or, if absent, ``champion_of(model)``."""
    meta, spec = obj["metadata"], obj.get("spec") or {}
    status = dict(obj.get("status") or {})
    policy = policy_from_spec(spec.get("policy"))
    if "phase" not in status:
        champion = spec.get("champion")
        if champion is None and champion_of is not None:
            champion = champion_of(spec["model"])
        if champion is not None and str(champion) == str(spec["candidate"]):
            raise InvalidSpec(f"candidate {spec['candidate']} is already the champion")
        created = _timestamp(meta.get("creationTimestamp"))
        status = {"phase": Phase.PENDING.value, "model": spec["model"],
                  "candidate": str(spec["candidate"]),
                  "champion": None if champion is None else str(champion),
                  "undo": bool(spec.get("undo", False)),
                  "createdAt": created, "updated": created}
    d: dict[str, Any] = {f: None for f in STATUS_KEYS}
    for key, value in status.items():
        if key in _STATUS_FIELDS:
            d[_STATUS_FIELDS[key]] = value
    ref = d["champion_reference"]
    if ref is not None:
        d["champion_reference"] = {f: ref.get(key) for f, key in _REFERENCE_KEYS.items()}
    d["history"] = [{"verdict": None, "weights": {}, "count": 1, **e} for e in d["history"] or []]
    d.update(
        id=meta["name"], model=d["model"] or spec["model"],
        candidate=d["candidate"] or str(spec["candidate"]),
        policy=policy.to_dict(),  # the spec's policy is in force, not the one last recorded
        created=d["created"] if d["created"] is not None else 0.0,
        step=-1 if d["step"] is None else d["step"], weights=d["weights"] or {},
        baseline=d["baseline"] or {}, failed=d["failed"] or 0, errors=d["errors"] or 0,
        reason=d["reason"] or "", updated=d["updated"] or 0.0,
    )
    return Rollout.from_dict(d, generation=meta.get("resourceVersion", ""))


class CRRolloutStore:
    """Rollout CRs in one namespace, through ``deploy.cluster.kube.Kube``."""

    def __init__(self, kube: k.Kube, namespace: str,
                 champion_of: Callable[[str], Version | None] | None = None):
        self.kube = kube
        self.namespace = namespace
        self.champion_of = champion_of

    def get_object(self, rollout_id: str) -> dict[str, Any]:
        try:
            return self.kube.get(ROLLOUT, rollout_id, self.namespace)
        except k.NotFound as e:
            raise NotFound(f"no rollout {self.namespace}/{rollout_id}") from e

    def get(self, rollout_id: str) -> Rollout:
        return rollout_from_cr(self.get_object(rollout_id), self.champion_of)

    def create(self, rollout: Rollout, *, backend: Mapping[str, Any] | None = None,
               metrics: Mapping[str, Any] | None = None) -> Rollout:
        """Create the CR (spec only; status is the controller's)."""
        try:
            obj = self.kube.create(cr_from_rollout(rollout, self.namespace, backend=backend,
                                                   metrics=metrics), self.namespace)
        except k.Conflict as e:
            raise Conflict(f"rollout {rollout.id} already exists") from e
        return dataclasses.replace(rollout, generation=obj["metadata"]["resourceVersion"])

    def save(self, rollout: Rollout, expected_generation: int | str) -> Rollout:
        """Write the status with ONE ``PUT /status`` if the CR is still at resourceVersion
        ``expected_generation``; ``Conflict`` otherwise."""
        body = {
            "apiVersion": API_VERSION, "kind": ROLLOUT.kind,
            "metadata": {"name": rollout.id, "namespace": self.namespace,
                         "resourceVersion": str(expected_generation)},
            "status": status_from_rollout(rollout),
        }
        try:
            obj = self.kube.replace_status(body, self.namespace)
        except k.Conflict as e:
            raise Conflict(f"rollout {rollout.id} moved since resourceVersion "
                           f"{expected_generation}: {e.message}") from e
        except k.NotFound as e:
            raise NotFound(f"no rollout {self.namespace}/{rollout.id}") from e
        return dataclasses.replace(rollout, generation=obj["metadata"]["resourceVersion"])

    def objects(self) -> list[dict[str, Any]]:
        """The CRs, oldest first."""
        items = self.kube.list(ROLLOUT, self.namespace).get("items", [])
        for item in items:
            item.setdefault("apiVersion", API_VERSION)
            item.setdefault("kind", ROLLOUT.kind)
        return sorted(items, key=lambda o: (o["metadata"].get("creationTimestamp") or "",
                                            o["metadata"]["name"]))

    def list(self, model: str | None = None) -> list[Rollout]:
        out = []
        for obj in self.objects():
            try:
                r = rollout_from_cr(obj, self.champion_of)
            except InvalidSpec:
                continue
            if model is None or r.model == model:
                out.append(r)
        return out

    def active(self, model: str) -> Rollout | None:
        return next((r for r in self.list(model) if not r.phase.terminal), None)


def _timestamp(value: str | None) -> float:
    if not value:
        return 0.0
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def _finite(value: Any) -> Any:
    """JSON has no inf/NaN: a histogram bound of +Inf is already a string ("+Inf") in the
    sample's own encoding; anything else non-finite becomes None (absent)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k_: _finite(v) for k_, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


__all__ = ["CRRolloutStore", "InvalidSpec", "cr_from_rollout", "policy_from_spec",
           "rollout_from_cr", "status_from_rollout"]
