"""The KServe backend: a rollout as InferenceServices and Gateway API routes.

Two modes (see ``deploy.cluster.kserve_manifests`` for the objects):

* ``Standard``: one InferenceService per version (each with its own HPA); the split lives in
  the kloop-owned HTTPRoute AND GRPCRoute backendRefs (``<isvc>-predictor`` Services). ``read``
  takes the weights from the routes; if the two routes disagree, no split is reported, so the
  controller sees drift and rewrites both.
* ``Serverless`` (Knative): ONE InferenceService whose latest revision (the candidate) gets
  ``canaryTrafficPercent``; the champion's version is remembered in the annotation
  ``kloop.dev/champion`` so a rollback can restore its storageUri. ``read`` takes the split
  from ``status.components.predictor.traffic`` (what Knative routes), the spec only when KServe
  has not reported traffic yet.

Readiness is what KServe reports, never assumed from a write: a version is ready when its
InferenceService has ``Ready`` and ``PredictorReady`` True for the current generation, its
``modelStatus`` says ``Loaded`` (when present), and its predictor Deployment, if readable and
reporting, is ``Available``. ``FailedToLoad`` / ``BlockedByFailedLoad`` / ``InvalidSpec`` make
the version *failed* (``World.failed``), with KServe's ``lastFailureInfo`` as the reason.

Every write goes through ``deploy.cluster.kube`` (``apply`` is idempotent) and records an Event on the
InferenceService it concerns, so ``kubectl describe isvc`` tells the rollout's story.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

from deploy.cluster.kserve_manifests import isvc_name, model_dns_name, render_kserve
from deploy.cluster.kube import KINDS, Forbidden, Kube, KubeError, NotFound, Obj
from deploy.ports import BackendError, MetricsSource
from deploy.rollout import MetricsError, World, normalized
from kloop.model_version import Version

log = logging.getLogger(__name__)

ISVC = KINDS["InferenceService"]
HTTP_ROUTE = KINDS["HTTPRoute"]
GRPC_ROUTE = KINDS["GRPCRoute"]
HPA = KINDS["HorizontalPodAutoscaler"]
DEPLOYMENT = KINDS["Deployment"]
CHAMPION_ANNOTATION = "kloop.dev/champion"
FAILED_STATES = ("FailedToLoad",)
FAILED_TRANSITIONS = ("BlockedByFailedLoad", "InvalidSpec")


@dataclasses.dataclass(frozen=True)
class KServeConfig:
    """How versions are deployed; the rendering knobs are ``deploy.cluster.kserve_manifests.render_kserve``'s.

    mode: ``Standard`` (one InferenceService per version + Gateway API routes) or
      ``Serverless`` (Knative; one InferenceService, canaryTrafficPercent).
    namespace: where the InferenceServices and routes live.
    storage_uri_prefix: ``<prefix>/<model>/<version>`` is each version's storageUri (a PVC
      holding the registry, or an object store KServe's storage initializer reads).
    runtime: the ClusterServingRuntime; ``None`` = ``kloop`` (Standard: HTTP + h2c gRPC ports)
      or ``kloop-knative`` (Serverless: Knative allows one container port, HTTP).
    check_deployment: also require the predictor Deployment's ``Available`` condition when the
      Deployment exists and reports one (Standard mode; needs ``get`` on deployments, and is
      skipped when RBAC forbids it).
    """

    mode: Literal["Standard", "Serverless"] = "Standard"
    namespace: str = "default"
    storage_uri_prefix: str = "pvc://kloop-registry"
    resources: Mapping[str, Any] | None = None
    min_replicas: int = 1
    max_replicas: int = 3
    autoscaler: Literal["hpa", "external"] = "hpa"
    cpu_target_percent: int = 70
    runtime: str | None = None
    gateway: str = "kloop-gateway"
    gateway_namespace: str | None = None
    hostnames: tuple[str, ...] = ()
    http_port: int = 80  # the predictor Service's port for the runtime's first (http1) port
    grpc_port: int = 8081  # the predictor Service's port for the runtime's h2c port
    check_deployment: bool = True

    def __post_init__(self) -> None:
        if self.mode not in ("Standard", "Serverless"):
            raise ValueError(f"mode {self.mode!r}: expected 'Standard' or 'Serverless'")
        object.__setattr__(self, "hostnames", tuple(self.hostnames))

    def render(self, model: str, champion: Version | None, candidate: Version,
               weights: Mapping[Version, int]) -> list[Obj]:
        runtime = self.runtime or ("kloop" if self.mode == "Standard" else "kloop-knative")
        return render_kserve(
            model, champion, candidate, weights, mode=self.mode, namespace=self.namespace,
            storage_uri_prefix=self.storage_uri_prefix, resources=self.resources,
            min_replicas=self.min_replicas, max_replicas=self.max_replicas,
            autoscaler=self.autoscaler, cpu_target_percent=self.cpu_target_percent,
            runtime=runtime, gateway=self.gateway, gateway_namespace=self.gateway_namespace,
            hostnames=self.hostnames, http_port=self.http_port, grpc_port=self.grpc_port,
        )


@dataclasses.dataclass(frozen=True)
class Readiness:
    """One InferenceService as KServe reports it: ``failure`` set means it will not recover."""

    ready: bool
    reason: str
    failure: str | None = None


def readiness(isvc: Mapping[str, Any], deployment: Mapping[str, Any] | None = None) -> Readiness:
    """Ready / not ready / failed from the status KServe writes (pure; table-testable)."""
    status = isvc.get("status") or {}
    ms = status.get("modelStatus") or {}
    states = ms.get("states") or {}
    info = ms.get("lastFailureInfo") or {}
    failed = (states.get("activeModelState") in FAILED_STATES
              or states.get("targetModelState") in FAILED_STATES
              or ms.get("transitionStatus") in FAILED_TRANSITIONS)
    if failed:
        why = ": ".join(x for x in (info.get("reason"), info.get("message")) if x)
        state = states.get("activeModelState") or ms.get("transitionStatus")
        return Readiness(False, f"model {state}", f"{state}: {why or 'no failure info'}")
    generation = isvc.get("metadata", {}).get("generation")
    observed = status.get("observedGeneration")
    if generation is not None and observed is not None and observed < generation:
        return Readiness(False, f"status is for generation {observed}, spec is {generation}")
    conds = {c.get("type"): c for c in status.get("conditions") or []}
    for t in ("Ready", "PredictorReady"):
        c = conds.get(t)
        if c is None or c.get("status") != "True":
            why = (c or {}).get("message") or (c or {}).get("reason") or "not reported"
            return Readiness(False, f"{t} is not True: {why}")
    if states and states.get("activeModelState") != "Loaded":
        return Readiness(False, f"model is {states.get('activeModelState') or 'not loaded'}")
    if deployment is not None:
        avail = {c.get("type"): c for c in (deployment.get("status") or {}).get("conditions") or []}
        a = avail.get("Available")
        if a is not None and a.get("status") != "True":
            return Readiness(False, f"predictor Deployment not Available: {a.get('message', '')}")
    return Readiness(True, "ready")


def scrape_url(isvc: Mapping[str, Any]) -> str | None:
    """Where the version's server answers: ``status.address.url`` (cluster-local) first."""
    status = isvc.get("status") or {}
    return (status.get("address") or {}).get("url") or status.get("url") or None


class KServeBackend:
    """``deploy.ports.RolloutBackend`` on KServe. Every write is idempotent (read, compare,
    write). Versions are numbers here and text only where Kubernetes objects spell them."""

    def __init__(self, kube: Kube, config: KServeConfig, metrics: MetricsSource,
                 now: Callable[[], float] = time.time):
        self.kube = kube
        self.config = config
        self.metrics = metrics
        self._now = now

    @property
    def ns(self) -> str:
        return self.config.namespace

    # ---- reading ------------------------------------------------------------------------

    def read(self, model: str) -> World:
        try:
            if self.config.mode == "Standard":
                weights, versions = self._read_standard(model)
            else:
                weights, versions = self._read_serverless(model)
        except KubeError as e:
            return World(weights={}, loaded=frozenset(), samples=None,
                         error=f"Kubernetes API: {type(e).__name__}: {e}")
        loaded = frozenset(v for v, (r, _) in versions.items() if r.ready)
        failed = {v: r.failure for v, (r, _) in versions.items() if r.failure}
        urls = {v: versions[v][1] for v in sorted(loaded)}
        try:
            samples = self.metrics.samples(model, urls, self._now())
        except MetricsError as e:
            return World(weights=weights, loaded=loaded, samples=None, error=str(e),
                         failed=failed)
        return World(weights=weights, loaded=loaded, samples=samples, failed=failed)

    def readiness(self, model: str) -> dict[Version, Readiness]:
        """Each deployed version's readiness (for ``kloop describe`` and tests)."""
        read = self._read_standard if self.config.mode == "Standard" else self._read_serverless
        return {v: r for v, (r, _) in read(model)[1].items()}

    def _read_standard(self, model: str) -> tuple[dict[Version, int], _Versions]:
        http = self._route_weights(HTTP_ROUTE, model)
        grpc = self._route_weights(GRPC_ROUTE, model)
        weights = http if http == grpc else {}
        if http != grpc:
            log.warning("%s: HTTPRoute %s and GRPCRoute %s disagree", model, http, grpc)
        versions: _Versions = {}
        for isvc in self._isvcs(model):
            v = _number(isvc["metadata"].get("labels", {}).get("kloop.dev/version"))
            if v is not None:
                versions[v] = (readiness(isvc, self._deployment(isvc)), scrape_url(isvc))
        return weights, versions

    def _read_serverless(self, model: str) -> tuple[dict[Version, int], _Versions]:
        isvc = self._get(ISVC, isvc_name_serverless(model))
        if isvc is None:
            return {}, {}
        latest = _spec_version(isvc)
        if latest is None:
            return {}, {}
        champion = _champion(isvc)
        r = readiness(isvc)
        url = scrape_url(isvc)
        versions: _Versions = {latest: (r, url)}
        if champion and champion != latest:
            # The champion's revision served before the candidate was deployed; Knative keeps
            # it serving until the canary is promoted, so it stays ready.
            versions[champion] = (Readiness(True, "previous rolled-out revision"), url)
        return _serverless_weights(isvc, latest, champion), versions

    def _route_weights(self, kind: Any, model: str) -> dict[Version, int]:
        route = self._get(kind, model_dns_name(model))
        if route is None:
            return {}
        prefix = f"{model_dns_name(model)}-v"
        out: dict[Version, int] = {}
        for rule in route.get("spec", {}).get("rules", []):
            for ref in rule.get("backendRefs", []):
                name = ref.get("name", "")
                v = _number(name.removeprefix(prefix).removesuffix("-predictor"))
                if name.startswith(prefix) and v is not None:
                    out[v] = out.get(v, 0) + int(ref.get("weight", 1))
        return out

    def _isvcs(self, model: str) -> list[Obj]:
        sel = f"app.kubernetes.io/managed-by=kloop,kloop.dev/model={model_dns_name(model)}"
        return list(self.kube.list(ISVC, self.ns, label_selector=sel).get("items", []))

    def _deployment(self, isvc: Obj) -> Obj | None:
        if not self.config.check_deployment:
            return None
        try:
            return self._get(DEPLOYMENT, f"{isvc['metadata']['name']}-predictor")
        except Forbidden:
            return None  # optional evidence; the ISVC's own conditions still decide

    def _get(self, kind: Any, name: str) -> Obj | None:
        try:
            return self.kube.get(kind, name, self.ns)
        except NotFound:
            return None

    # ---- writing ------------------------------------------------------------------------

    def ensure_loaded(self, model: str, version: Version) -> None:
        with _translated(f"deploy {model} v{version}"):
            if self.config.mode == "Standard":
                for obj in self.config.render(model, None, version, {version: 100}):
                    if obj["kind"] in ("InferenceService", "HorizontalPodAutoscaler"):
                        self._apply(obj, model, version, "Deployed",
                                    f"kloop deployed {model} v{version}")
                return
            isvc = self._get(ISVC, isvc_name_serverless(model))
            if isvc is None:
                (obj,) = self.config.render(model, None, version, {version: 100})
                self._apply(obj, model, version, "Deployed", f"kloop deployed {model} v{version}")
                return
            latest = _spec_version(isvc)
            if latest is None:
                raise BackendError(f"{model}: InferenceService {isvc_name_serverless(model)} "
                                   "names no version (KLOOP_MODEL_VERSION, storageUri)")
            if version in (latest, _champion(isvc)):
                return
            # The serving version becomes the champion; the new one starts as a 0% canary.
            (obj,) = self.config.render(model, latest, version, {version: 0, latest: 100})
            obj["metadata"]["annotations"][CHAMPION_ANNOTATION] = str(latest)
            self._apply(obj, model, version, "CanaryDeployed",
                        f"kloop deployed {model} v{version} as a 0% canary next to v{latest}")

    def set_weights(self, model: str, weights: Mapping[Version, int]) -> None:
        if sum(weights.values()) != 100:
            raise ValueError(f"weights {dict(weights)} do not sum to 100")
        with _translated(f"set traffic of {model} to {dict(weights)}"):
            if self.config.mode == "Standard":
                self._set_routes(model, weights)
            else:
                self._set_canary(model, weights)

    def promote(self, model: str, candidate: Version) -> None:
        with _translated(f"promote {model} v{candidate}"):
            if self.config.mode == "Standard":
                current = self._route_weights(HTTP_ROUTE, model)
                self._set_routes(model, {v: 0 for v in current} | {candidate: 100})
            else:
                self._set_canary(model, {candidate: 100})
                isvc = self._get(ISVC, isvc_name_serverless(model))
                if isvc is not None and CHAMPION_ANNOTATION in isvc["metadata"].get("annotations", {}):
                    self.kube.patch(ISVC, isvc["metadata"]["name"],
                                    {"metadata": {"annotations": {CHAMPION_ANNOTATION: None}}},
                                    self.ns)
            self._event(model, candidate, "Promoted", f"kloop promoted {model} v{candidate}")

    def retire(self, model: str, version: Version) -> None:
        with _translated(f"retire {model} v{version}"):
            if self.config.mode == "Serverless":
                return  # its Knative revision is garbage-collected once it serves nothing
            current = self._route_weights(HTTP_ROUTE, model)
            if current.get(version, 0) > 0:
                raise BackendError(f"{model} v{version} still takes traffic; not retiring it")
            rest = {v: w for v, w in current.items() if v != version}
            if rest:
                self._set_routes(model, rest)
            self._delete_version(model, version, "Retired",
                                 f"kloop retired {model} v{version} after promotion")

    def rollback(self, model: str, champion: Version | None, candidate: Version) -> None:
        with _translated(f"roll back {model} v{candidate}"):
            if self.config.mode == "Serverless":
                self._rollback_serverless(model, champion, candidate)
                return
            if champion is not None:
                self.ensure_loaded(model, champion)
                self._set_routes(model, {champion: 100})
            elif self._route_weights(HTTP_ROUTE, model).get(candidate, 0) > 0:
                return  # a first version that serves: all the model has, it stays
            else:
                for kind in (HTTP_ROUTE, GRPC_ROUTE):
                    self.kube.delete(kind, model_dns_name(model), self.ns,
                                     propagation="Background")
            self._delete_version(model, candidate, "RolledBack",
                                 f"kloop rolled back {model} v{candidate}"
                                 + (f" to v{champion}" if champion else ""))

    # ---- pieces -------------------------------------------------------------------------

    def _set_routes(self, model: str, weights: Mapping[Version, int]) -> None:
        """Both routes name exactly the versions in ``weights`` (zeros kept: a retired-later
        champion stays one write away), so HTTP and gRPC always split alike."""
        weights = {v: int(w) for v, w in weights.items()}
        current = self._route_weights(HTTP_ROUTE, model)
        if current == weights and self._route_weights(GRPC_ROUTE, model) == weights:
            return
        ordered = sorted(weights)
        if len(ordered) > 2:
            raise BackendError(f"{model}: routes split between two versions, got {weights}")
        champion, candidate = (ordered[0], ordered[1]) if len(ordered) == 2 else (None, ordered[0])
        for obj in self.config.render(model, champion, candidate, weights):
            if obj["kind"] in ("HTTPRoute", "GRPCRoute"):
                self.kube.apply(obj, self.ns)
        self._event(model, max(weights), "TrafficShifted",
                    f"kloop routed {model}: {_fmt(normalized(weights))} (was {_fmt(normalized(current))})")

    def _set_canary(self, model: str, weights: Mapping[Version, int]) -> None:
        isvc = self._get(ISVC, isvc_name_serverless(model))
        if isvc is None:
            raise BackendError(f"{model}: no InferenceService {isvc_name_serverless(model)}")
        latest = _spec_version(isvc)
        if latest is None:
            raise BackendError(f"{model}: InferenceService {isvc_name_serverless(model)} "
                               "names no version (KLOOP_MODEL_VERSION, storageUri)")
        champion = _champion(isvc)
        unknown = set(normalized(weights)) - {latest, champion}
        if unknown:
            raise BackendError(f"{model}: weights name {sorted(unknown)}, but the "
                               f"InferenceService serves v{latest} (champion v{champion})")
        pct = int(weights.get(latest, 0))
        spec = isvc["spec"]["predictor"]
        current = spec.get("canaryTrafficPercent", 100)
        if pct == current:
            return
        patch_value = None if pct == 100 else pct  # 100%: the canary field is removed
        self.kube.patch(ISVC, isvc["metadata"]["name"],
                        {"spec": {"predictor": {"canaryTrafficPercent": patch_value}}}, self.ns)
        self._event(model, latest, "TrafficShifted",
                    f"kloop set canaryTrafficPercent of v{latest} to {pct} (was {current})")

    def _rollback_serverless(self, model: str, champion: Version | None,
                             candidate: Version) -> None:
        name = isvc_name_serverless(model)
        isvc = self._get(ISVC, name)
        if isvc is None:
            return
        if champion is None and _spec_version(isvc) == candidate:
            return  # a first version that serves: all the model has, it stays
        if champion is None:
            self._event(model, candidate, "RolledBack", f"kloop removed {model} v{candidate}")
            self.kube.delete(ISVC, name, self.ns, propagation="Background")
            return
        if _spec_version(isvc) == champion and "canaryTrafficPercent" not in isvc["spec"]["predictor"]:
            return
        # 0% first, so the candidate stops serving even before the champion's revision is back.
        if isvc["spec"]["predictor"].get("canaryTrafficPercent", 100) != 0:
            self.kube.patch(ISVC, name, {"spec": {"predictor": {"canaryTrafficPercent": 0}}},
                            self.ns)
        (obj,) = self.config.render(model, None, champion, {champion: 100})
        self.kube.apply(obj, self.ns)
        self.kube.patch(ISVC, name, {"metadata": {"annotations": {CHAMPION_ANNOTATION: None}}},
                        self.ns)
        self._event(model, champion, "RolledBack",
                    f"kloop rolled back {model} v{candidate}: storageUri restored to v{champion}")

    def _delete_version(self, model: str, version: Version, reason: str, message: str) -> None:
        name = isvc_name(model, version)
        if self._get(ISVC, name) is None:
            return
        self._event(model, version, reason, message)
        # Background: the ISVC goes now; the garbage collector removes what KServe made for it
        # (Foreground would keep it, finalizer set, until every dependent is gone).
        if self.config.autoscaler == "external":
            self.kube.delete(HPA, name, self.ns, propagation="Background")
        self.kube.delete(ISVC, name, self.ns, propagation="Background")

    def _apply(self, obj: Obj, model: str, version: Version, reason: str, message: str) -> None:
        before = self._get(KINDS[obj["kind"]], obj["metadata"]["name"])
        after = self.kube.apply(obj, self.ns)
        if obj["kind"] == "InferenceService" and (
                before is None or before.get("metadata", {}).get("resourceVersion")
                != after.get("metadata", {}).get("resourceVersion")):
            self.kube.event(after, reason, message)

    def _event(self, model: str, version: Version, reason: str, message: str) -> None:
        name = isvc_name(model, version) if self.config.mode == "Standard" else isvc_name_serverless(model)
        isvc = self._get(ISVC, name)
        if isvc is not None:
            self.kube.event(isvc, reason, message)


_Versions = dict[Version, tuple[Readiness, str | None]]
"""Each deployed version: its readiness and where its server answers."""


def isvc_name_serverless(model: str) -> str:
    """Serverless mode's one InferenceService per model (``kserve_manifests``' naming)."""
    return model_dns_name(model)


def _number(text: object) -> Version | None:
    """A version number spelled in a label, name or annotation; None for anything else."""
    s = str(text) if text is not None else ""
    return int(s) if s.isascii() and s.isdecimal() else None


def _spec_version(isvc: Mapping[str, Any]) -> Version | None:
    m = isvc["spec"]["predictor"].get("model", {})
    for e in m.get("env", []):
        if e.get("name") == "KLOOP_MODEL_VERSION":
            return _number(e.get("value"))
    return _number(str(m.get("storageUri", "")).rstrip("/").rsplit("/", 1)[-1])


def _champion(isvc: Mapping[str, Any]) -> Version | None:
    return _number(isvc["metadata"].get("annotations", {}).get(CHAMPION_ANNOTATION))


def _serverless_weights(isvc: Mapping[str, Any], latest: Version,
                        champion: Version | None) -> dict[Version, int]:
    """What Knative routes (status.components.predictor.traffic), else what the spec asks."""
    traffic: Sequence[Mapping[str, Any]] = (
        ((isvc.get("status") or {}).get("components") or {}).get("predictor", {}).get("traffic")
        or [])
    if traffic:
        out: dict[Version, int] = {}
        for t in traffic:
            v = latest if t.get("latestRevision") else champion
            if v is not None:
                out[v] = out.get(v, 0) + int(t.get("percent") or 0)
        return out
    pct = int(isvc["spec"]["predictor"].get("canaryTrafficPercent", 100))
    if champion and pct < 100:
        return {latest: pct, champion: 100 - pct}
    return {latest: 100}


def _fmt(weights: Mapping[Version, int]) -> str:
    return ", ".join(f"v{v}={w}%" for v, w in weights.items()) or "nothing"


@contextmanager
def _translated(what: str) -> Iterator[None]:
    try:
        yield
    except KubeError as e:
        raise BackendError(f"{what}: {type(e).__name__}: {e}") from e


__all__ = ["KServeBackend", "KServeConfig", "Readiness", "readiness", "scrape_url"]
