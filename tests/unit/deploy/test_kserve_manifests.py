import pytest
import yaml

from deploy.cluster.kserve_manifests import isvc_name, render_kserve, to_yaml
from tests.support.crds import validate


def _by_kind(objs):
    out = {}
    for o in objs:
        out.setdefault(o["kind"], []).append(o)
    return out


def test_standard_mode_isvc_per_version_and_weighted_routes():
    objs = render_kserve("iris", 1, 2, {1: 90, 2: 10}, namespace="ml",
                         storage_uri_prefix="s3://kloop-models/")
    for o in objs:
        validate(o)
    k = _by_kind(objs)
    assert len(k["InferenceService"]) == 2
    isvc = {o["metadata"]["name"]: o for o in k["InferenceService"]}
    v2 = isvc["iris-v2"]
    ann = v2["metadata"]["annotations"]
    assert ann["serving.kserve.io/deploymentMode"] == "Standard"
    assert ann["serving.kserve.io/autoscalerClass"] == "hpa"
    assert ann["serving.kserve.io/metric"] == "cpu"
    assert ann["serving.kserve.io/targetUtilizationPercentage"] == "70"
    assert v2["metadata"]["labels"]["networking.kserve.io/visibility"] == "cluster-local"
    pred = v2["spec"]["predictor"]
    assert (pred["minReplicas"], pred["maxReplicas"]) == (1, 3)
    m = pred["model"]
    assert m["modelFormat"] == {"name": "kloop"} and m["runtime"] == "kloop"
    assert m["protocolVersion"] == "v2" and m["storageUri"] == "s3://kloop-models/iris/2"
    assert {"name": "KLOOP_MODEL_VERSION", "value": "2"} in m["env"]
    for kind, port in (("HTTPRoute", 80), ("GRPCRoute", 8081)):
        (route,) = k[kind]
        assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
        assert route["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kloop"
        refs = route["spec"]["rules"][0]["backendRefs"]
        assert {r["name"]: r["weight"] for r in refs} == {
            "iris-v1-predictor": 90, "iris-v2-predictor": 10}
        assert sum(r["weight"] for r in refs) == 100
        assert {r["port"] for r in refs} == {port}


def test_standard_first_version_and_external_autoscaler():
    objs = render_kserve("iris", None, 1, {1: 100}, autoscaler="external",
                         gateway_namespace="gw", hostnames=["iris.example.com"])
    k = _by_kind(objs)
    assert len(k["InferenceService"]) == 1 and len(k["HorizontalPodAutoscaler"]) == 1
    ann = k["InferenceService"][0]["metadata"]["annotations"]
    assert ann["serving.kserve.io/autoscalerClass"] == "external"
    assert "serving.kserve.io/metric" not in ann
    hpa = k["HorizontalPodAutoscaler"][0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "iris-v1-predictor"
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert pods and pods[0]["metric"]["name"] == "kloop_inference_inflight_requests"
    for o in objs:
        if o["kind"] != "HorizontalPodAutoscaler":  # a built-in API, not a CRD
            validate(o)
    assert k["GRPCRoute"][0]["spec"]["hostnames"] == ["iris.example.com"]


def test_serverless_mode_one_isvc_with_canary_percent():
    (isvc,) = render_kserve("iris", 1, 2, {1: 80, 2: 20}, mode="Serverless",
                            storage_uri_prefix="pvc://kloop-registry")
    validate(isvc)
    assert isvc["metadata"]["name"] == "iris"
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Knative"
    pred = isvc["spec"]["predictor"]
    assert pred["canaryTrafficPercent"] == 20
    assert pred["model"]["storageUri"] == "pvc://kloop-registry/iris/2"


def test_serverless_at_100_percent_drops_the_canary_split():
    (isvc,) = render_kserve("iris", 1, 2, {2: 100, 1: 0}, mode="Serverless")
    validate(isvc)
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]


@pytest.mark.parametrize(
    "args, kw, says",
    [
        (("iris", 1, 2, {1: 90, 2: 20}), {}, "sum to 100"),
        (("iris", 1, 2, {3: 100}), {}, "not rendered"),
        (("iris", 1, "latest", {1: 100}), {}, "not a version number"),
        (("iris", 1, 0, {1: 100}), {}, "not a version number"),
        (("iris", 1, 2, {2: 100}), {"min_replicas": 5, "max_replicas": 2}, "replicas"),
        (("iris", 1, 2, {2: 100}), {"mode": "Raw"}, "mode"),
        (("x" * 60, 1, 2, {2: 100}), {}, "63"),
    ],
)
def test_render_rejects_bad_input(args, kw, says):
    with pytest.raises(ValueError, match=says):
        render_kserve(*args, **kw)


def test_to_yaml_multi_document_round_trip():
    objs = render_kserve("iris", 1, 2, {1: 50, 2: 50})
    docs = list(yaml.safe_load_all(to_yaml(objs)))
    assert docs == objs


def test_isvc_name_is_dns_safe():
    assert isvc_name("my_model.v", 3) == "my-model-v-v3"
