"""The in-cluster controller against the real API server: the CR store's optimistic
concurrency, and a whole rollout reconciled with ONLY the shipped RBAC (impersonating the
controller's ServiceAccount), with the real KServe backend. The test plays the KServe
controller (it writes InferenceService status) and serves synthetic per-version counters from
its own MetricsSource; time is a FakeClock, so a rollout takes a few seconds."""

from __future__ import annotations

import dataclasses
import math

import pytest

from deploy.cluster import kube as k
from deploy.cluster.cr_store import ROLLOUT, CRRolloutStore, rollout_from_cr, status_from_rollout
from deploy.cluster.kserve_backend import KServeBackend, KServeConfig
from deploy.cluster.leader import LeaderElector
from deploy.cluster.reconciler import Reconciler
from deploy.controller import tick
from deploy.ports import Conflict
from deploy.rollout import Phase
from deploy.rollout.samples import VersionSample
from kloop.artifact import Registry
from tests.cluster.test_manifests import apply_all, rendered
from tests.support.fakes import FakeClock, publish

SA = "system:serviceaccount:kloop-system:kloop-controller"
ISVC = k.KINDS["InferenceService"]
POLICY = {"steps": [10, 50, 100], "minRequests": 20, "minDurationSeconds": 1,
          "stepTimeoutSeconds": 120, "retireAfterSeconds": 1, "readyTimeoutSeconds": 60}


class Traffic:
    """The test's MetricsSource: cumulative counters per version, grown by ``serve``."""

    def __init__(self) -> None:
        self.requests: dict[int, float] = {}
        self.errors: dict[int, float] = {}

    def serve(self, weights: dict[str, int], n: int, bad: int | None = None) -> None:
        """``weights`` as the routes spell them (text)."""
        for text, w in weights.items():
            v = int(text)
            got = n * w // 100
            self.requests[v] = self.requests.get(v, 0) + got
            if v == bad:
                self.errors[v] = self.errors.get(v, 0) + got

    def samples(self, model, versions, at):
        return {v: VersionSample(self.requests.get(v, 0.0), self.errors.get(v, 0.0),
                                 ((0.005, self.requests.get(v, 0.0)),
                                  (math.inf, self.requests.get(v, 0.0))), at)
                for v in versions}


def play_kserve(admin: k.Kube, namespace: str) -> None:
    """What KServe's controller would write: every kloop InferenceService Ready."""
    for isvc in admin.list(ISVC, namespace, label_selector="app.kubernetes.io/managed-by=kloop")["items"]:
        isvc.update(apiVersion=ISVC.api_version, kind=ISVC.kind)
        name = isvc["metadata"]["name"]
        isvc["status"] = {
            "observedGeneration": isvc["metadata"]["generation"],
            "conditions": [{"type": t, "status": "True", "lastTransitionTime": "2026-01-01T00:00:00Z"}
                           for t in ("Ready", "PredictorReady")],
            "address": {"url": f"http://{name}-predictor.{namespace}.svc.cluster.local"},
        }
        admin.replace_status(isvc, namespace)


def route_weights(admin: k.Kube, namespace: str) -> dict[str, int]:
    try:
        route = admin.get(k.KINDS["HTTPRoute"], "digits", namespace)
    except k.NotFound:
        return {}
    prefix = "digits-v"
    return {ref["name"].removeprefix(prefix).removesuffix("-predictor"): int(ref.get("weight", 1))
            for rule in route["spec"]["rules"] for ref in rule["backendRefs"]}



@pytest.fixture
def registry(tmp_path) -> Registry:
    reg = Registry(tmp_path / "registry")
    publish(reg, tmp_path, "digits", 0.95)
    publish(reg, tmp_path, "digits", 0.95)
    reg.set_alias("digits", "champion", 1)
    return reg


def create_rollout(admin: k.Kube, namespace: str, name: str = "digits-v2") -> dict:
    return admin.create({"apiVersion": ROLLOUT.api_version, "kind": "Rollout",
                         "metadata": {"name": name},
                         "spec": {"model": "digits", "candidate": "2", "policy": POLICY}}, namespace)


def drive(rec: Reconciler, admin: k.Kube, namespace: str, name: str, clock: FakeClock,
          traffic: Traffic, *, bad: int | None = None, max_ticks: int = 60):
    for _ in range(max_ticks):
        if rec.elector is not None:
            rec.elector.step()  # what Reconciler.run does every loop
        r = rec.reconcile(namespace, name)
        play_kserve(admin, namespace)
        traffic.serve(route_weights(admin, namespace), 40, bad)
        clock.advance(2)
        if r is not None and r.phase.terminal:
            return r
    raise AssertionError(f"not done after {max_ticks} ticks: {rec.stores[namespace].get(name)}")


# ---- (a) the CR store ---------------------------------------------------------------------


def test_cr_store_round_trip_and_conflict(admin, namespace, registry):
    store = CRRolloutStore(admin, namespace, champion_of=lambda m: 1)
    create_rollout(admin, namespace)
    r = store.get("digits-v2")
    assert (r.phase, r.model, r.candidate, r.champion) == (Phase.PENDING, "digits", 2, 1)
    assert r.policy.steps == (10, 50, 100) and r.policy.analysis.min_requests == 20
    assert isinstance(r.generation, str) and r.generation  # the resourceVersion

    moved = dataclasses.replace(r, phase=Phase.GATING, reason="first writer")
    saved = store.save(moved, expected_generation=r.generation)
    assert saved.generation != r.generation
    again = store.get("digits-v2")
    assert again.to_dict() == saved.to_dict()  # status round trip through the schema
    obj = admin.get(ROLLOUT, "digits-v2", namespace)
    assert obj["status"] == status_from_rollout(saved) | obj["status"]
    assert obj["spec"]["policy"] == POLICY  # the controller never wrote the spec

    with pytest.raises(Conflict):  # a stale resourceVersion: the real API server's 409
        store.save(dataclasses.replace(r, reason="second writer"), expected_generation=r.generation)
    assert store.get("digits-v2").reason == "first writer"


def test_tick_retries_a_conflict_cleanly(cluster, admin, namespace, registry):
    class Interfering(k.Kube):
        """Our wrapper: someone else writes the Rollout just before the first status PUT."""

        interfere = 1

        def replace_status(self, obj, namespace=None):
            if obj["kind"] == "Rollout" and self.interfere:
                self.interfere -= 1
                other = admin.get(ROLLOUT, obj["metadata"]["name"], namespace)
                other.update(apiVersion=ROLLOUT.api_version, kind="Rollout")
                other["metadata"].setdefault("annotations", {})["touched"] = "yes"
                admin.replace(other, namespace)
            return super().replace_status(obj, namespace)

    kube = Interfering.connect(k.KubeConfig(kubeconfig=cluster.kubeconfig, namespace=namespace))
    clock = FakeClock()
    backend = KServeBackend(kube, KServeConfig(namespace=namespace), Traffic(), now=clock.now)
    store = CRRolloutStore(kube, namespace, champion_of=lambda m: 1)
    create_rollout(admin, namespace)
    with pytest.raises(Conflict):
        tick(store, backend, registry, "digits-v2", clock)  # tick itself raises on 409
    rec = Reconciler(kube, [namespace], registry, lambda obj: backend, clock)
    kube.interfere = 1
    r = rec.reconcile(namespace, "digits-v2")  # the reconciler re-reads and ticks again
    assert r is not None and r.phase is Phase.GATING
    assert [e.kind_name for e in r.history] == ["run_gate"]  # one decision, recorded once


# ---- (b) the controller with exactly the shipped RBAC ---------------------------------------


def test_rollout_succeeds_with_only_the_shipped_rbac(cluster, admin, namespace, registry, request):
    apply_all(admin, [o for o in rendered()
                      if o["kind"] in ("Namespace", "ServiceAccount", "ClusterRole",
                                       "ClusterRoleBinding", "Role", "RoleBinding")])
    sa = k.Kube.connect(k.KubeConfig(kubeconfig=cluster.kubeconfig, namespace=namespace,
                                     impersonate=SA, impersonate_group="system:serviceaccounts"))
    request.addfinalizer(sa.close)
    clock, traffic = FakeClock(), Traffic()
    elector = LeaderElector(sa, "kloop-controller", "kloop-system", "rbac-test", clock)
    backend = KServeBackend(sa, KServeConfig(namespace=namespace), traffic, now=clock.now)
    rec = Reconciler(sa, [namespace], registry, lambda obj: backend, clock, elector=elector)
    create_rollout(admin, namespace)

    assert rec.reconcile(namespace, "digits-v2") is None  # not leader yet: does nothing
    assert elector.step()  # leases get/create/update in kloop-system: allowed
    r = drive(rec, admin, namespace, "digits-v2", clock, traffic)

    assert r.phase is Phase.SUCCEEDED, r.reason
    steps = [dict(e.weights) for e in r.history if e.kind_name == "set_weights"]
    assert [s.get(2) for s in steps] == [10, 50, 100]  # analysis between the steps
    assert [e.kind_name for e in r.history][-2:] == ["promote", "retire"]
    assert r.weights == {2: 100} and registry.alias("digits", "champion") == 2
    obj = admin.get(ROLLOUT, "digits-v2", namespace)
    obj.update(apiVersion=ROLLOUT.api_version, kind="Rollout")
    reasons = [e["reason"] for e in admin.events_for(obj)]
    assert {"RunGate", "SetWeights", "Promote", "Retire"} <= set(reasons)  # events: create

    # ... and nothing beyond the shipped rules.
    forbidden = [
        lambda: sa.replace({**obj, "spec": {**obj["spec"], "candidate": "1"}}, namespace),
        lambda: sa.create({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
                           "spec": {"containers": [{"name": "c", "image": "busybox"}]}}, namespace),
        lambda: sa.list(k.KINDS["ConfigMap"], "kloop-system"),
        lambda: sa.get(k.KINDS["Lease"], "someone-elses-lease", "kube-system"),
        lambda: sa.delete(ROLLOUT, "digits-v2", namespace),
        lambda: sa.list(k.KINDS["Event"], namespace),
    ]
    for call in forbidden:
        with pytest.raises(k.Forbidden):
            call()


class Backends:
    """A backend factory that records what the reconciler tells it to forget."""

    def __init__(self, backend: KServeBackend) -> None:
        self.backend = backend
        self.forgotten: list[tuple[str, str]] = []

    def __call__(self, obj: dict) -> KServeBackend:
        return self.backend

    def forget(self, namespace: str, name: str) -> None:
        self.forgotten.append((namespace, name))


def test_bad_candidate_rolls_back_and_spec_errors_abort(admin, namespace, registry):
    clock, traffic = FakeClock(), Traffic()
    backends = Backends(KServeBackend(admin, KServeConfig(namespace=namespace), traffic,
                                      now=clock.now))
    rec = Reconciler(admin, [namespace], registry, backends, clock)
    created = create_rollout(admin, namespace)
    rec._noted |= {(namespace, "digits-v2", "Waiting", "w"), (namespace, "other", "Waiting", "w")}
    r = drive(rec, admin, namespace, "digits-v2", clock, traffic, bad=2)
    assert r.phase is Phase.ROLLED_BACK, r.reason
    assert route_weights(admin, namespace) == {"1": 100}
    assert registry.alias("digits", "champion") == 1
    # Ended: the factory may drop its backend, and only this Rollout's notes go.
    assert backends.forgotten == [(namespace, "digits-v2")]
    assert rec._noted == {(namespace, "other", "Waiting", "w")}
    # Deleted: the watch queues it (not only spec changes), and the reconcile finds it gone.
    admin.delete(ROLLOUT, "digits-v2", namespace)
    assert rec._wants(namespace, "DELETED", created) is True
    assert rec.reconcile(namespace, "digits-v2") is None
    assert backends.forgotten == [(namespace, "digits-v2")] * 2

    # Past the schema, not past kloop: steps not increasing -> Aborted with the reason.
    bad = admin.create({"apiVersion": ROLLOUT.api_version, "kind": "Rollout",
                        "metadata": {"name": "digits-bad"},
                        "spec": {"model": "digits", "candidate": "2",
                                 "policy": {"steps": [50, 10, 100]}}}, namespace)
    assert rec.reconcile(namespace, "digits-bad") is None
    status = admin.get(ROLLOUT, "digits-bad", namespace)["status"]
    assert status["phase"] == "Aborted" and "strictly increasing" in status["reason"]
    bad.update(apiVersion=ROLLOUT.api_version, kind="Rollout")
    assert any(e["reason"] == "InvalidSpec" and e["type"] == "Warning"
               for e in admin.events_for(bad))
    assert rollout_from_cr  # (imported for the round-trip test above)


# ---- (c, partial) the controller as real processes --------------------------------------------


def test_two_controller_processes_one_leader_and_sigterm_hands_over(cluster, admin, namespace,
                                                                    registry, processes):
    import os
    import signal
    import subprocess
    import sys
    import time

    def start(identity: str) -> subprocess.Popen:
        return processes.spawn(
            [sys.executable, "-m", "deploy.cli", "controller", "--kubeconfig", str(cluster.kubeconfig),
             "-n", namespace, "--lease-namespace", namespace, "--registry", str(registry.root),
             "--metrics", "scrape", "--identity", identity, "--lease-duration", "4",
             "--renew", "1", "--interval", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})

    def holder_is(ok, timeout=20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                h = admin.get(k.KINDS["Lease"], "kloop-controller", namespace)["spec"].get(
                    "holderIdentity")
            except k.NotFound:
                h = None
            if ok(h):
                return h
            time.sleep(0.2)
        raise AssertionError(f"lease holder never satisfied the condition (last: {h})")

    procs = {"p1": start("p1"), "p2": start("p2")}
    first = holder_is(lambda h: h in procs)
    time.sleep(2)
    assert holder_is(lambda h: h is not None) == first  # renewed, not flapping
    procs[first].send_signal(signal.SIGTERM)
    assert procs[first].wait(timeout=15) == 0  # released the Lease, exited 0
    other = next(p for p in procs if p != first)
    assert holder_is(lambda h: h == other, timeout=10) == other  # took over
