"""Every object of ``deploy/k8s`` (rendered by kustomize) is accepted by the real API server,
and kloop's Rollout CRD rejects invalid specs with a message that names the field."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.cluster import kube as k
from deploy.cluster.cr_store import (
    CONDITION_KEYS,
    LEGACY_POLICY_KEYS,
    POLICY_KEYS,
    ROLLOUT,
    STATUS_KEYS,
    policy_from_spec,
)
from deploy.cluster.kserve_manifests import render_kserve
from deploy.rollout import GatePolicy, MetricThreshold
from tests.support.crds import REPO

K8S = REPO / "deploy" / "k8s"


def rendered() -> list[dict]:
    """``kubectl kustomize deploy/k8s`` (kustomize is built into kubectl)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with built-in kustomize) not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S)], check=False, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def apply_all(kube: k.Kube, objs: list[dict]) -> list[dict]:
    """Namespaces first, then the rest, as kubectl does."""
    order = sorted(objs, key=lambda o: o["kind"] != "Namespace")
    return [kube.apply(o) for o in order]



def test_kustomization_renders_what_is_shipped():
    objs = rendered()
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert {("CustomResourceDefinition", "rollouts.kloop.dev"), ("Namespace", "kloop-system"),
            ("ServiceAccount", "kloop-controller"), ("ClusterRole", "kloop-controller"),
            ("ClusterRoleBinding", "kloop-controller"), ("Role", "kloop-controller-leader-election"),
            ("RoleBinding", "kloop-controller-leader-election"), ("Deployment", "kloop-controller"),
            ("PersistentVolumeClaim", "kloop-registry"), ("ConfigMap", "kloop-grafana-dashboard"),
            ("ConfigMap", "kloop-prometheus-scrape")} <= kinds
    assert any(o["kind"] == "ClusterServingRuntime" for o in objs)
    for o in objs:
        if k.kind_of(o).namespaced:
            assert o["metadata"]["namespace"] == "kloop-system", o["metadata"]["name"]
    dep = next(o for o in objs if o["kind"] == "Deployment")
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "kloop-controller"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (c,) = pod["containers"]
    assert c["image"] == "ghcr.io/kloop/kloop-controller:0.1.0"
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert c["livenessProbe"] and c["readinessProbe"] and c["resources"]["limits"]


def test_every_object_is_accepted_by_the_api_server(admin):
    objs = rendered()
    applied = apply_all(admin, objs)
    assert len(applied) == len(objs)
    for o in objs:  # read back: stored, not silently dropped
        got = admin.get(k.kind_of(o), o["metadata"]["name"], o["metadata"].get("namespace"))
        assert got["metadata"]["uid"]
    assert apply_all(admin, objs)  # idempotent: applying again is accepted too


def test_rendered_rollout_objects_are_accepted(admin, namespace):
    """What the KServe backend applies for a rollout, incl. the external-autoscaler HPA
    (autoscaling/v2 in the product; written as v2beta2 on this 1.20 server by deploy.cluster.kube)."""
    objs = render_kserve("digits", 1, 2, {"1": 90, "2": 10}, namespace=namespace,
                         autoscaler="external")
    assert any(o["kind"] == "HorizontalPodAutoscaler" and o["apiVersion"] == "autoscaling/v2"
               for o in objs)
    for o in objs:
        assert admin.create(o, namespace)["metadata"]["uid"]


def rollout(name: str, spec: dict) -> dict:
    return {"apiVersion": ROLLOUT.api_version, "kind": "Rollout",
            "metadata": {"name": name}, "spec": spec}


@pytest.mark.parametrize(("spec", "field", "says"), [
    ({"candidate": "2"}, "spec.model", "Required value"),
    ({"model": "digits", "candidate": "2", "policy": {"steps": [-10, 100]}},
     "spec.policy.steps", "greater than or equal to 1"),
    ({"model": "digits", "candidate": "2", "policy": {"steps": [10, 150]}},
     "spec.policy.steps", "less than or equal to 100"),
    ({"model": "digits", "candidate": "two"}, "spec.candidate", "should match"),
    ({"model": "digits", "candidate": "2", "backend": {"mode": "Knative?"}},
     "spec.backend.mode", "Unsupported value"),
    ({"model": "digits", "candidate": "2", "policy": {"maxErrorRate": 2}},
     "spec.policy.maxErrorRate", "less than or equal to 1"),
    ({"model": "digits", "candidate": "2", "policy": {"gateTolerance": -1}},
     "spec.policy.gateTolerance", "greater than or equal to 0"),
    ({"model": "digits", "candidate": "2", "policy": {"gateConditions": [{"threshold": 1}]}},
     "spec.policy.gateConditions.metric", "Required value"),
    ({"model": "digits", "candidate": "2",
      "policy": {"gateConditions": [{"metric": "f1", "minRelativeChange": -0.1}]}},
     "spec.policy.gateConditions.minRelativeChange", "greater than or equal to 0"),
])
def test_invalid_spec_is_rejected_with_a_clear_message(admin, namespace, spec, field, says):
    with pytest.raises(k.Invalid) as e:
        admin.create(rollout("bad", spec), namespace)
    assert field in e.value.message and says in e.value.message, e.value.message


def test_invalid_status_is_rejected(admin, namespace):
    obj = admin.create(rollout("r", {"model": "digits", "candidate": "2"}), namespace)
    obj["status"] = {"phase": "Winning", "step": 0}
    with pytest.raises(k.Invalid) as e:
        admin.replace_status(obj, namespace)
    assert "status.phase" in e.value.message and "Unsupported value" in e.value.message
    obj["status"] = {"phase": "Progressing", "weights": {"2": -5}}
    with pytest.raises(k.Invalid) as e:
        admin.replace_status(obj, namespace)
    assert "status.weights" in e.value.message


def test_crd_schema_covers_every_rollout_field():
    """Unknown fields are PRUNED by the API server, silently: a status or policy field added
    to deploy.rollout without the CRD would vanish on every save."""
    (doc,) = [d for d in yaml.safe_load_all((K8S / "crds" / "kloop.dev_rollouts.yaml").read_text())]
    schema = doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
    assert (set(POLICY_KEYS.values()) | set(LEGACY_POLICY_KEYS)
            == set(schema["spec"]["properties"]["policy"]["properties"]))
    conditions = schema["spec"]["properties"]["policy"]["properties"]["gateConditions"]
    assert set(CONDITION_KEYS.values()) == set(conditions["items"]["properties"])
    assert set(STATUS_KEYS.values()) <= set(schema["status"]["properties"])


def test_gate_settings_survive_the_api_server(admin, namespace):
    """Not pruned on the way in: a condition's fields and the former gate keys read back."""
    policy = {"gateMetric": "rmse", "gateTolerance": 0.5, "gateThreshold": 60,
              "gateConditions": [{"metric": "mae", "threshold": 10, "minAbsoluteChange": 0.1},
                                 {"metric": "r2", "minRelativeChange": 0.01, "tolerance": 0.02}]}
    got = admin.create(rollout("gated", {"model": "digits", "candidate": "2",
                                          "policy": policy}), namespace)
    assert got["spec"]["policy"] == policy
    assert policy_from_spec(got["spec"]["policy"]).gate == GatePolicy(
        metric="rmse", tolerance=0.5, threshold=60, conditions=(
            MetricThreshold("mae", threshold=10, min_absolute_change=0.1),
            MetricThreshold("r2", min_relative_change=0.01, tolerance=0.02)))
    old = admin.create(rollout("legacy", {"model": "digits", "candidate": "2", "policy": {
        "maxAccuracyDrop": 0.02, "minAccuracy": 0.6}}), namespace)
    assert policy_from_spec(old["spec"]["policy"]).gate == GatePolicy(tolerance=0.02,
                                                                      threshold=0.6)


def test_grafana_dashboard_is_valid_json():
    import json

    dash = json.loads(Path(K8S / "grafana" / "kloop-canary.json").read_text())
    exprs = " ".join(t["expr"] for p in dash["panels"] for t in p["targets"])
    for metric in ("kloop_inference_requests_total", "kloop_inference_errors_total",
                   "kloop_inference_request_duration_seconds_bucket", "kloop_model_traffic_weight"):
        assert metric in exprs
