"""KServe manifests for a rollout's traffic split (pure rendering; applying them is elsewhere).

Two shapes, because KServe offers two ways to split traffic:

* ``Standard`` (plain Deployments, KServe >= 0.15's name for RawDeployment): one
  InferenceService per version, each with its own HPA (``autoscalerClass: hpa`` on CPU, or
  ``external`` with a kloop-owned ``autoscaling/v2`` HPA), made ``cluster-local`` so KServe
  creates no ingress of its own; kloop owns a Gateway API ``HTTPRoute`` and ``GRPCRoute`` whose
  backendRefs (the ``<isvc>-predictor`` Services) carry the weights. Each side scales on its own
  load, and the split is exact.
* ``Serverless`` (Knative): ONE InferenceService; the latest revision (the candidate's
  ``storageUri``) gets ``canaryTrafficPercent``, the previous ready revision the rest. KServe
  0.20 calls this mode ``Knative`` and still accepts ``Serverless`` as a deprecated alias; the
  annotation is written as ``Knative`` to match the CRDs this renders for.

Both run the ``kloop`` ClusterServingRuntime with ``protocolVersion: v2``. The runtime serves the
model under its own name (not the InferenceService's) and labels metrics with the version, so
the env carries ``KLOOP_MODEL_NAME`` and ``KLOOP_MODEL_VERSION``; that is what lets one route
send ``/v2/models/<model>/infer`` to either version and analysis tell them apart.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import yaml

from kloop.artifact import Manifest
from kloop.model_version import Version

ISVC_API = "serving.kserve.io/v1beta1"
GATEWAY_API = "gateway.networking.k8s.io/v1"
OIP_GRPC_SERVICE = "inference.GRPCInferenceService"
MANAGED_BY = {"app.kubernetes.io/managed-by": "kloop"}
DEFAULT_RESOURCES: Mapping[str, Any] = {
    "requests": {"cpu": "1", "memory": "2Gi"},
    "limits": {"cpu": "2", "memory": "4Gi"},
}

VersionRef = Manifest | Version


def render_kserve(
    model: str,
    champion: VersionRef | None,
    candidate: VersionRef,
    weights: Mapping[Version, int],
    *,
    mode: Literal["Standard", "Serverless", "Knative"] = "Standard",
    namespace: str = "default",
    storage_uri_prefix: str = "pvc://kloop-registry",
    resources: Mapping[str, Any] | None = None,
    min_replicas: int = 1,
    max_replicas: int = 3,
    autoscaler: Literal["hpa", "external"] = "hpa",
    cpu_target_percent: int = 70,
    runtime: str | None = None,
    gateway: str = "kloop-gateway",
    gateway_namespace: str | None = None,
    hostnames: Sequence[str] = (),
    http_port: int = 80,
    grpc_port: int = 8081,
) -> list[dict[str, Any]]:
    """The objects that serve ``model`` split by ``weights`` ({version: percent}, sum 100).

    Ports follow the ``kloop`` ClusterServingRuntime (deploy/k8s/runtime): in Standard mode
    KServe gives the predictor Service port 80 for the runtime's FIRST container port (``http1``,
    8080) and keeps the number of the others, so ``http_port`` is 80 and ``grpc_port`` is the
    ``h2c`` port, 8081. Serverless uses the ``kloop-knative`` runtime (Knative allows one port).
    """
    cand = _version(candidate)
    champ = _version(champion) if champion is not None else None
    split = {str(v): int(w) for v, w in weights.items()}  # from here on, versions are label text
    _check(model, cand, champ, split, min_replicas, max_replicas, cpu_target_percent)
    if runtime is None:  # Knative allows one container port: its runtime serves HTTP only
        runtime = "kloop" if mode == "Standard" else "kloop-knative"
    common: dict[str, Any] = {
        "model": model, "namespace": namespace, "prefix": storage_uri_prefix.rstrip("/"),
        "resources": dict(resources if resources is not None else DEFAULT_RESOURCES),
        "min_replicas": min_replicas, "max_replicas": max_replicas, "runtime": runtime,
    }
    if mode in ("Serverless", "Knative"):
        return [_serverless_isvc(version=cand, canary=split.get(cand, 100) if champ else None,
                                 autoscaler=autoscaler, cpu_target=cpu_target_percent, **common)]
    if mode != "Standard":
        raise ValueError(f"mode {mode!r}: expected 'Standard' or 'Serverless'")
    versions = [v for v in (champ, cand) if v is not None]
    objs: list[dict[str, Any]] = [
        _standard_isvc(version=v, autoscaler=autoscaler, cpu_target=cpu_target_percent, **common)
        for v in versions
    ]
    if autoscaler == "external":
        objs += [_hpa(model, v, namespace, min_replicas, max_replicas, cpu_target_percent)
                 for v in versions]
    parent = {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gateway}
    if gateway_namespace:
        parent["namespace"] = gateway_namespace
    objs.append(_route("HTTPRoute", model, namespace, parent, hostnames, versions, split,
                       http_port, [{"path": {"type": "PathPrefix", "value": f"/v2/models/{model}"}}]))
    objs.append(_route("GRPCRoute", model, namespace, parent, hostnames, versions, split,
                       grpc_port, [{"method": {"type": "Exact", "service": OIP_GRPC_SERVICE}}]))
    return objs


def to_yaml(objs: Sequence[Mapping[str, Any]]) -> str:
    """Multi-document YAML, ready for ``kubectl apply -f -``."""
    return yaml.safe_dump_all([dict(o) for o in objs], sort_keys=False)


def isvc_name(model: str, version: Version | str) -> str:
    """``<model>-v<version>`` as a DNS-1035 label (KServe appends ``-predictor``)."""
    return f"{_dns(model)}-v{version}"


def model_dns_name(model: str) -> str:
    """The model's name as a DNS-1035 label: its routes' name, Serverless mode's one
    InferenceService, the ``kloop.dev/model`` label."""
    return _dns(model)


# ---- pieces -------------------------------------------------------------------------------


def _version(ref: VersionRef) -> str:
    v = ref.version if isinstance(ref, Manifest) else ref
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"version {ref!r} is not a version number")
    return str(v)


def _dns(name: str) -> str:
    return re.sub(r"[^a-z0-9-]", "-", name.lower()).strip("-")


def _check(model: str, cand: str, champ: str | None, weights: Mapping[str, int],
           min_replicas: int, max_replicas: int, cpu_target: int) -> None:
    expected = {cand} | ({champ} if champ else set())
    if set(weights) - expected:
        raise ValueError(f"weights name versions {sorted(set(weights) - expected)} not rendered")
    if sum(weights.values()) != 100 or any(w < 0 for w in weights.values()):
        raise ValueError(f"weights {dict(weights)} must be >= 0 and sum to 100")
    if not 0 <= min_replicas <= max_replicas or max_replicas < 1:
        raise ValueError(f"replicas {min_replicas}..{max_replicas} are not a valid range")
    if not 1 <= cpu_target <= 100:
        raise ValueError(f"cpu target {cpu_target}% is not in 1..100")
    longest = isvc_name(model, max(expected, key=len)) + "-predictor"
    if len(longest) > 63:
        raise ValueError(f"{longest!r} exceeds 63 characters: use a shorter model name")


def _labels(model: str, version: str | None = None) -> dict[str, str]:
    out = {**MANAGED_BY, "kloop.dev/model": _dns(model)}
    if version is not None:
        out["kloop.dev/version"] = version
    return out


def _predictor_model(model: str, version: str, prefix: str, runtime: str,
                     resources: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "modelFormat": {"name": "kloop"},
        "runtime": runtime,
        "protocolVersion": "v2",
        "storageUri": f"{prefix}/{model}/{version}",
        "env": [
            {"name": "KLOOP_MODEL_NAME", "value": model},
            {"name": "KLOOP_MODEL_VERSION", "value": version},
        ],
        "resources": dict(resources),
    }


def _standard_isvc(*, model: str, version: str, namespace: str, prefix: str,
                   resources: Mapping[str, Any], min_replicas: int, max_replicas: int,
                   runtime: str, autoscaler: str, cpu_target: int) -> dict[str, Any]:
    annotations = {
        "serving.kserve.io/deploymentMode": "Standard",
        "serving.kserve.io/autoscalerClass": autoscaler,
    }
    if autoscaler == "hpa":
        annotations["serving.kserve.io/metric"] = "cpu"
        annotations["serving.kserve.io/targetUtilizationPercentage"] = str(cpu_target)
    return {
        "apiVersion": ISVC_API,
        "kind": "InferenceService",
        "metadata": {
            "name": isvc_name(model, version),
            "namespace": namespace,
            "labels": {**_labels(model, version), "networking.kserve.io/visibility": "cluster-local"},
            "annotations": annotations,
        },
        "spec": {"predictor": {
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "model": _predictor_model(model, version, prefix, runtime, resources),
        }},
    }


def _serverless_isvc(*, model: str, version: str, canary: int | None, namespace: str,
                     prefix: str, resources: Mapping[str, Any], min_replicas: int,
                     max_replicas: int, runtime: str, autoscaler: str,
                     cpu_target: int) -> dict[str, Any]:
    annotations = {"serving.kserve.io/deploymentMode": "Knative"}
    if autoscaler == "hpa":
        # Knative's HPA class scales on CPU like Standard mode's HPA (instead of KPA's
        # request concurrency), so both modes scale on the same signal.
        annotations.update({
            "autoscaling.knative.dev/class": "hpa.autoscaling.knative.dev",
            "autoscaling.knative.dev/metric": "cpu",
            "autoscaling.knative.dev/target": str(cpu_target),
        })
    predictor: dict[str, Any] = {
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "model": _predictor_model(model, version, prefix, runtime, resources),
    }
    if canary is not None and canary < 100:
        predictor["canaryTrafficPercent"] = canary
    return {
        "apiVersion": ISVC_API,
        "kind": "InferenceService",
        "metadata": {
            "name": _dns(model),
            "namespace": namespace,
            "labels": _labels(model),
            "annotations": annotations,
        },
        "spec": {"predictor": predictor},
    }


INFLIGHT_METRIC = "kloop_inference_inflight_requests"
INFLIGHT_TARGET = 8  # in-flight requests per predictor pod before the HPA adds one


def _hpa(model: str, version: str, namespace: str, min_replicas: int, max_replicas: int,
         cpu_target: int) -> dict[str, Any]:
    """kloop's own HPA for ``autoScalerClass: external`` (KServe then creates none): it scales
    on the server's in-flight requests per pod (a Pods metric, served to the HPA by a custom
    metrics adapter such as prometheus-adapter from the scraped kloop metrics) and on CPU; the
    HPA follows whichever asks for more replicas."""
    name = isvc_name(model, version)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": namespace, "labels": _labels(model, version)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                               "name": f"{name}-predictor"},
            "minReplicas": max(min_replicas, 1),
            "maxReplicas": max_replicas,
            "metrics": [
                {"type": "Pods", "pods": {
                    "metric": {"name": INFLIGHT_METRIC},
                    "target": {"type": "AverageValue", "averageValue": str(INFLIGHT_TARGET)},
                }},
                {"type": "Resource", "resource": {
                    "name": "cpu", "target": {"type": "Utilization", "averageUtilization": cpu_target},
                }},
            ],
        },
    }


def _route(kind: str, model: str, namespace: str, parent: Mapping[str, str],
           hostnames: Sequence[str], versions: Sequence[str], weights: Mapping[str, int],
           port: int, matches: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "parentRefs": [dict(parent)],
        "rules": [{
            "matches": matches,
            "backendRefs": [
                {"kind": "Service", "name": f"{isvc_name(model, v)}-predictor", "port": port,
                 "weight": weights.get(v, 0)}
                for v in versions
            ],
        }],
    }
    if hostnames:
        spec["hostnames"] = list(hostnames)
    return {
        "apiVersion": GATEWAY_API,
        "kind": kind,
        "metadata": {"name": _dns(model), "namespace": namespace, "labels": _labels(model)},
        "spec": spec,
    }
