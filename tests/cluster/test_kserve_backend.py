"""The KServe backend against the REAL kube-apiserver (real KServe and Gateway API CRDs loaded).

No KServe controller runs here, so the test plays it: it writes InferenceService /status the
way KServe does (conditions Ready/PredictorReady, modelStatus, address.url, observedGeneration).
The model servers are real ``python -m serving --model-dir`` processes, one per version (what
the kloop ClusterServingRuntime runs); their URLs go into the ISVC status, and the backend
scrapes them (``ScrapeMetrics``). Requests are real, split by the weights the routes hold.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

from deploy.cluster.kserve_backend import (
    CHAMPION_ANNOTATION,
    KServeBackend,
    KServeConfig,
    readiness,
)
from deploy.cluster.kserve_manifests import isvc_name
from deploy.cluster.kube import KINDS, Kube, NotFound
from deploy.cluster.prometheus import ScrapeMetrics
from deploy.controller import tick
from deploy.local.rollout_store import SQLiteRolloutStore
from deploy.rollout import Phase, RolloutPolicy, new_rollout
from kloop.artifact import Registry
from serving.client import HttpClient
from tests.support.crds import REPO, validate
from tests.support.fakes import FakeClock
from tests.support.serving import MODEL, ModelDirServer, publish_version

ISVC, HTTP, GRPC = KINDS["InferenceService"], KINDS["HTTPRoute"], KINDS["GRPCRoute"]
RUNTIME = REPO / "deploy" / "k8s" / "runtime" / "clusterservingruntime.yaml"
NOW = "2026-01-01T00:00:00Z"


# ---- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def registry_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    work = tmp_path_factory.mktemp("export")
    reg = Registry(root)
    for seed in (1, 2, 3):
        publish_version(reg, seed, work)
    reg.set_alias(MODEL, "champion", 1)
    return root


@pytest.fixture(scope="module")
def servers(registry_root, tmp_path_factory) -> Iterator[dict[str, str]]:
    """One real runtime-mode server per version: version -> URL."""
    procs = {v: ModelDirServer(registry_root / MODEL / v, tmp_path_factory.mktemp(f"srv{v}"),
                               {"KLOOP_MODEL_NAME": MODEL, "KLOOP_MODEL_VERSION": v})
             for v in ("1", "2")}
    try:
        yield {v: p.start() for v, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()



def backend(kube: Kube, registry_root: Path, clock: FakeClock | None = None,
            mode: str = "Standard") -> KServeBackend:
    config = KServeConfig(mode=mode, namespace=kube.namespace)  # type: ignore[arg-type]
    return KServeBackend(kube, config, ScrapeMetrics(), now=(clock or FakeClock()).now)


# ---- playing the KServe controller ----------------------------------------------------------


def play_kserve(kube: Kube, name: str, *, url: str | None = None, ready: bool = True,
                failure: str | None = None, traffic: list[dict] | None = None) -> None:
    """Write /status as KServe does for a (non-)ready or failed predictor."""
    isvc = kube.get(ISVC, name)
    ok = "True" if ready and not failure else "False"
    conds = [{"type": t, "status": ok, "lastTransitionTime": NOW,
              **({} if ok == "True" else {"reason": "NotReady", "message": failure or "starting"})}
             for t in ("PredictorReady", "Ready")]
    state = "FailedToLoad" if failure else ("Loaded" if ready else "Loading")
    status: dict = {
        "observedGeneration": isvc["metadata"]["generation"], "conditions": conds,
        "modelStatus": {"transitionStatus": "BlockedByFailedLoad" if failure else (
                            "UpToDate" if ready else "InProgress"),
                        "states": {"activeModelState": state, "targetModelState": state}},
        "deploymentMode": "Standard",
    }
    if failure:
        status["modelStatus"]["lastFailureInfo"] = {"reason": "ModelLoadFailed", "message": failure}
    if url:
        status["address"] = {"url": url}
        status["url"] = url
    if traffic is not None:
        status["components"] = {"predictor": {"traffic": traffic}}
    kube.patch(ISVC, name, {"status": status}, status=True)


def route_weights(kube: Kube, kind) -> dict[str, int]:
    route = kube.get(kind, MODEL)
    refs = route["spec"]["rules"][0]["backendRefs"]
    return {r["name"].removeprefix(f"{MODEL}-v").removesuffix("-predictor"): r["weight"]
            for r in refs}


def exists(kube: Kube, kind, name: str) -> bool:
    try:
        kube.get(kind, name)
        return True
    except NotFound:
        return False


def send(servers: dict[str, str], weights: dict[str, int], n: int) -> None:
    """``n`` real requests, split across the versions' servers exactly by ``weights`` (what the
    gateway would do with the routes' backendRefs)."""
    images = np.random.default_rng(0).standard_normal((2, 1, 8, 8), dtype=np.float32)

    async def go() -> None:
        for v, w in weights.items():
            if w:
                async with HttpClient(servers[v]) as c:
                    for _ in range(n * w // 100):
                        assert (await c.infer(MODEL, {"image": images})).model_version == v
    asyncio.run(go())


# ---- the runtime ----------------------------------------------------------------------------


def test_cluster_serving_runtimes_are_valid_and_accepted(cluster):
    kube = Kube(cluster.api_client())
    docs = [d for d in yaml.safe_load_all(RUNTIME.read_text()) if d]
    assert [d["metadata"]["name"] for d in docs] == ["kloop", "kloop-knative"]
    for doc in docs:
        validate(doc)
        kube.apply(doc)
        got = kube.get(KINDS["ClusterServingRuntime"], doc["metadata"]["name"])
        ports = {p["name"]: p["containerPort"]
                 for p in got["spec"]["containers"][0]["ports"]}
        assert ports["http1"] == 8080
    kloop = docs[0]["spec"]
    assert kloop["containers"][0]["ports"][1] == {"name": "h2c", "containerPort": 8081,
                                                  "protocol": "TCP"}
    assert KServeConfig().grpc_port == 8081  # routes target the h2c port KServe exposes
    assert kloop["supportedModelFormats"][0]["autoSelect"] is True
    assert kloop["containers"][0]["args"][:2] == ["--model-dir", "/mnt/models"]


# ---- Standard mode --------------------------------------------------------------------------


def test_standard_mode_objects_readiness_and_traffic(kube, registry_root, servers):
    b = backend(kube, registry_root)
    b.ensure_loaded(MODEL, 1)
    b.ensure_loaded(MODEL, 1)  # idempotent
    isvc = kube.get(ISVC, isvc_name(MODEL, "1"))
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "Standard"
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] == "v2"
    assert b.read(MODEL).loaded == frozenset()  # applied is not ready
    play_kserve(kube, isvc_name(MODEL, "1"), ready=False)
    assert "Ready is not True" in b.readiness(MODEL)[1].reason
    play_kserve(kube, isvc_name(MODEL, "1"), url=servers["1"])
    b.set_weights(MODEL, {1: 100})
    w = b.read(MODEL)
    assert (w.error, w.loaded, dict(w.weights)) == (None, frozenset({1}), {1: 100})

    b.ensure_loaded(MODEL, 2)
    assert b.read(MODEL).loaded == frozenset({1})  # v2 created, not ready yet
    play_kserve(kube, isvc_name(MODEL, "2"), url=servers["2"])
    b.set_weights(MODEL, {2: 10, 1: 90})
    assert route_weights(kube, HTTP) == route_weights(kube, GRPC) == {"1": 90, "2": 10}
    send(servers, {"1": 90, "2": 10}, 50)
    w = b.read(MODEL)
    assert w.loaded == frozenset({1, 2}) and dict(w.weights) == {1: 90, 2: 10}
    assert w.samples[2].requests >= 5 and w.samples[1].requests >= 45

    b.promote(MODEL, 2)
    assert route_weights(kube, HTTP) == route_weights(kube, GRPC) == {"1": 0, "2": 100}
    assert Registry(registry_root).alias(MODEL, "champion") == 1  # the controller's to move
    b.retire(MODEL, 1)
    assert not exists(kube, ISVC, isvc_name(MODEL, "1"))
    assert route_weights(kube, HTTP) == route_weights(kube, GRPC) == {"2": 100}
    reasons = [e["reason"] for e in kube.events_for(kube.get(ISVC, isvc_name(MODEL, "2")))]
    assert {"Deployed", "TrafficShifted", "Promoted"} <= set(reasons)
    Registry(registry_root).set_alias(MODEL, "champion", 1)  # restore for other tests


def test_standard_rollback_deletes_the_candidate(kube, registry_root, servers):
    b = backend(kube, registry_root)
    b.ensure_loaded(MODEL, 1)
    play_kserve(kube, isvc_name(MODEL, "1"), url=servers["1"])
    b.set_weights(MODEL, {1: 100})
    b.ensure_loaded(MODEL, 3)
    play_kserve(kube, isvc_name(MODEL, "3"), failure="torch.export.load: bad magic number")
    w = b.read(MODEL)
    assert 3 not in w.loaded
    assert w.failed == {3: "FailedToLoad: ModelLoadFailed: torch.export.load: bad magic number"}
    b.rollback(MODEL, 1, 3)
    b.rollback(MODEL, 1, 3)  # repeated after a crash: nothing left to do
    assert not exists(kube, ISVC, isvc_name(MODEL, "3"))
    assert route_weights(kube, HTTP) == route_weights(kube, GRPC) == {"1": 100}


def test_stale_status_and_unavailable_deployment_are_not_ready(kube, registry_root):
    b = backend(kube, registry_root)
    b.ensure_loaded(MODEL, 1)
    name = isvc_name(MODEL, "1")
    play_kserve(kube, name, url="http://x")
    isvc = kube.get(ISVC, name)
    assert readiness(isvc).ready
    stale = {**isvc, "metadata": {**isvc["metadata"], "generation": 2}}
    assert "generation 1" in readiness(stale).reason
    dep = {"status": {"conditions": [{"type": "Available", "status": "False",
                                      "message": "0/1 replicas"}]}}
    assert "not Available" in readiness(isvc, dep).reason


# ---- Serverless mode ------------------------------------------------------------------------


def test_serverless_canary_steps_and_promotion_removes_it(kube, registry_root, servers):
    b = backend(kube, registry_root, mode="Serverless")
    b.ensure_loaded(MODEL, 1)
    play_kserve(kube, MODEL, url=servers["1"])
    assert dict(b.read(MODEL).weights) == {1: 100}
    b.ensure_loaded(MODEL, 2)
    isvc = kube.get(ISVC, MODEL)
    pred = isvc["spec"]["predictor"]
    assert pred["canaryTrafficPercent"] == 0 and pred["model"]["storageUri"].endswith("/2")
    assert isvc["metadata"]["annotations"][CHAMPION_ANNOTATION] == "1"
    assert b.read(MODEL).loaded == frozenset({1})  # new generation, status is stale
    play_kserve(kube, MODEL, url=servers["2"])
    for pct in (10, 50):
        b.set_weights(MODEL, {2: pct, 1: 100 - pct})
        assert kube.get(ISVC, MODEL)["spec"]["predictor"]["canaryTrafficPercent"] == pct
        assert dict(b.read(MODEL).weights) == {2: pct, 1: 100 - pct}
    # what Knative actually routes wins over the spec
    play_kserve(kube, MODEL, url=servers["2"], traffic=[
        {"revisionName": "r2", "percent": 30, "latestRevision": True},
        {"revisionName": "r1", "percent": 70, "latestRevision": False}])
    assert dict(b.read(MODEL).weights) == {2: 30, 1: 70}
    b.promote(MODEL, 2)
    isvc = kube.get(ISVC, MODEL)
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    assert CHAMPION_ANNOTATION not in isvc["metadata"].get("annotations", {})
    Registry(registry_root).set_alias(MODEL, "champion", 1)


def test_serverless_rollback_restores_the_champion(kube, registry_root):
    b = backend(kube, registry_root, mode="Serverless")
    b.ensure_loaded(MODEL, 1)
    b.ensure_loaded(MODEL, 3)
    b.set_weights(MODEL, {3: 10, 1: 90})
    b.rollback(MODEL, 1, 3)
    isvc = kube.get(ISVC, MODEL)
    assert "canaryTrafficPercent" not in isvc["spec"]["predictor"]
    assert isvc["spec"]["predictor"]["model"]["storageUri"].endswith("/1")
    assert CHAMPION_ANNOTATION not in isvc["metadata"].get("annotations", {})


# ---- whole rollouts through the controller ---------------------------------------------------

POLICY = RolloutPolicy.from_dict(dict(
    steps=(10, 50, 100), min_requests=20, min_duration_s=60, step_timeout_s=600, failure_limit=1,
    error_limit=3, retire_after_s=30, p99_slack_ms=50, ready_timeout_s=300))


def start(kube, registry_root, servers, tmp_path, policy=POLICY):
    """v1 already serving (as a previous rollout left it); a rollout of v2 created."""
    clock = FakeClock(start=0.0)
    b = backend(kube, registry_root, clock)
    b.ensure_loaded(MODEL, 1)
    play_kserve(kube, isvc_name(MODEL, "1"), url=servers["1"])
    b.set_weights(MODEL, {1: 100})
    store = SQLiteRolloutStore(tmp_path / "kloop.db")
    store.create(new_rollout("r1", MODEL, 2, 1, policy, clock.now()))

    def step():
        return tick(store, b, Registry(registry_root), "r1", clock)
    return clock, step


def test_rollout_gate_ready_10_50_100_promote(kube, registry_root, servers, tmp_path):
    clock, step = start(kube, registry_root, servers, tmp_path)
    r = step()  # gate passes; the candidate's InferenceService is applied
    assert r.phase is Phase.GATING and exists(kube, ISVC, isvc_name(MODEL, "2"))
    r = step()
    assert r.phase is Phase.GATING and "waiting for v2" in r.history[-1].message
    assert route_weights(kube, HTTP) == {"1": 100}  # no traffic to a candidate not ready
    clock.advance(20)
    play_kserve(kube, isvc_name(MODEL, "2"), url=servers["2"])
    for want in ({"1": 90, "2": 10}, {"1": 50, "2": 50}, {"1": 0, "2": 100}):
        r = step()
        assert r.phase is Phase.PROGRESSING, r.history[-1].message
        assert route_weights(kube, HTTP) == route_weights(kube, GRPC) == want
        send(servers, want, 200)
        clock.advance(60)
    r = step()
    assert r.phase is Phase.PROMOTING, r.history[-1].message
    assert Registry(registry_root).alias(MODEL, "champion") == 2
    assert exists(kube, ISVC, isvc_name(MODEL, "1"))  # kept for a fast rollback
    clock.advance(30)
    r = step()
    assert r.phase is Phase.SUCCEEDED
    assert not exists(kube, ISVC, isvc_name(MODEL, "1"))
    assert route_weights(kube, HTTP) == {"2": 100}
    assert [h.kind_name for h in r.history] == [
        "run_gate", "prepare", "set_weights", "set_weights", "set_weights", "promote", "retire"]
    Registry(registry_root).set_alias(MODEL, "champion", 1)


@pytest.mark.parametrize("failure", [None, "out of memory while loading"])
def test_candidate_never_ready_rolls_back_and_is_deleted(kube, registry_root, servers, tmp_path,
                                                         failure):
    clock, step = start(kube, registry_root, servers, tmp_path)
    step(), step()
    if failure:
        play_kserve(kube, isvc_name(MODEL, "2"), failure=failure)
    else:
        clock.advance(POLICY.ready_timeout_s)
    r = step()  # the decision is saved first (RollingBack); the cleanup is the next tick
    assert r.phase is Phase.ROLLING_BACK and exists(kube, ISVC, isvc_name(MODEL, "2"))
    r = step()
    assert r.phase is Phase.ROLLED_BACK and r.reason.startswith("candidate never became ready")
    assert (failure or "not ready 300s") in r.reason
    assert not exists(kube, ISVC, isvc_name(MODEL, "2"))
    assert route_weights(kube, HTTP) == route_weights(kube, GRPC) == {"1": 100}
    assert dataclasses.replace(r, history=()).weights == {1: 100}
